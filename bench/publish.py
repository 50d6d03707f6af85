"""2. Publishing: the outbox relay's events per second into JetStream, against a plain nats-py
publisher of the same bodies (same size, the same window of publishes in flight), the limit."""

from __future__ import annotations

import asyncio

import asyncpg
import nats

from bench.common import Section, Timer, fmt_rate, fmt_ratio, rate, sample_event, sample_message
from shared.eventstore import EventStore, NewEvent, create_pool, migrate
from shared.outbox import OutboxRelay
from shared.partitions import partition_of
from shared.runtime import Platform
from shared.service import ensure_stream

WINDOW = 500  # the relay's batch: publishes in flight before their acks are awaited


async def _fill_outbox(pool: asyncpg.Pool, events: int, hospital: str) -> None:
    """`events` committed events waiting in the outbox, 500 per append."""
    store = EventStore()
    event = sample_event(hospital)
    meta = {"hospital": hospital, "correlation_id": "c", "causation_id": "c", "service": "bench"}
    async with pool.acquire() as conn:
        for n in range(0, events, 500):
            batch = [NewEvent(event, meta) for _ in range(min(500, events - n))]
            await store.append(conn, f"relay-{n}", 0, batch)


async def relay_rate(platform: Platform, events: int, tag: str) -> float:
    schema = f"bench_relay_{tag}"
    pool = await create_pool(platform.db_url, schema, max_size=2)
    nc = await nats.connect(platform.nats_url)
    try:
        await migrate(pool, schema, None)
        hospital = f"bench-relay-{tag}"
        await _fill_outbox(pool, events, hospital)
        js = nc.jetstream()
        await ensure_stream(js)
        relay = OutboxRelay(f"bench-{tag}", js, batch_size=WINDOW)
        published = 0
        async with pool.acquire() as conn:
            with Timer() as t:
                while n := await relay.publish_pending(conn, partition_of(hospital)):
                    published += n
        assert published == events, (published, events)
        return rate(published, t.seconds)
    finally:
        await nc.close()
        await pool.close()


async def plain_rate(platform: Platform, events: int, tag: str) -> float:
    nc = await nats.connect(platform.nats_url)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        messages = [sample_message(f"bench-plain-{tag}", n) for n in range(events)]
        with Timer() as t:
            for start in range(0, events, WINDOW):
                await asyncio.gather(
                    *(
                        js.publish(subject, body, headers={"Nats-Msg-Id": msg_id})
                        for subject, body, msg_id in messages[start : start + WINDOW]
                    )
                )
        return rate(events, t.seconds)
    finally:
        await nc.close()


async def run(platform: Platform, scale: float = 1.0, rounds: int = 3) -> Section:
    section = Section("publishing")
    events = int(30_000 * scale)
    relay, plain = [], []
    for r in range(rounds):
        plain.append(await plain_rate(platform, events, str(r)))
        relay.append(await relay_rate(platform, events, str(r)))
    ratios = sorted(a / b for a, b in zip(relay, plain, strict=True))
    fig = section.figures
    fig.update(
        events=events,
        window=WINDOW,
        message_bytes=len(sample_message()[1]),
        relay_rounds=relay,
        plain_rounds=plain,
        relay=sorted(relay)[len(relay) // 2],
        plain=sorted(plain)[len(plain) // 2],
        ratio_relay_vs_plain=ratios[len(ratios) // 2],
    )
    fig["target_met"] = fig["ratio_relay_vs_plain"] >= 0.5
    section.row("outbox relay into JetStream", fmt_rate(fig["relay"]))
    section.row("  plain nats-py pipelined publish", fmt_rate(fig["plain"]))
    section.row(
        "  relay / plain", fmt_ratio(fig["ratio_relay_vs_plain"]), ">= 0.50x", fig["target_met"]
    )
    return section
