"""`postctl analytics rebuild`: drop the read models and replay the whole POST stream.

It empties the fact tables and ``processed``, then reads every event message up to the
stream's last sequence at start with a bounded ephemeral consumer, and writes the same rows as
the live handler (``projection.row_of``) in batched transactions, recording each message in
``processed`` like the live consumer does. Both insert into ``processed`` first and apply
only what they inserted, so the running service may keep consuming meanwhile: each message
is applied once, by whichever of the two gets to it first.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nats
import structlog
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.analytics import projection
from shared.contracts import (
    STREAM_NAME,
    Rejected,
    Unanswerable,
    evt_subject,
    parse_envelope,
    parse_event,
    parse_subject,
)
from shared.eventstore import create_pool, migrate
from shared.settings import Settings

log = structlog.get_logger()

SCHEMA = "analytics"
MIGRATIONS = Path(__file__).parent / "migrations"
BATCH = 1000
IDLE_SECONDS = 2.0
DEADLOCK_RETRIES = 5
IN_FLIGHT_BATCHES = 4  # batches the server may send ahead of the database


@dataclass
class Message:
    """One stream message, read: its `processed` key, sequence and (when it has one) fact."""

    key: str
    seq: int
    event_type: str
    row: projection.Row | None


def read_message(msg: Msg) -> Message | None:
    """None for a message the live consumer would not record either (not a CloudEvent)."""
    try:
        hospital, _, event_type = parse_subject(msg.subject)
        ce = parse_envelope(msg.data)
    except (ValueError, Unanswerable, Rejected):
        return None
    seq = msg.metadata.sequence.stream
    row = None
    if event_type in projection.PROJECTIONS:
        try:
            row = projection.row_of(parse_event(event_type, ce.data), seq, ce.id)
        except Rejected as refused:  # live, the same event is logged and skipped
            log.warning("event_refused", reason=refused.reason_code, detail=refused.detail)
    return Message(f"{hospital}:{ce.id}", seq, event_type, row)


async def apply_batch(conn: asyncpg.Connection, batch: list[Message]) -> int:
    """Record the batch in `processed` and write the facts of the messages new to it."""
    # A copy counts once (the first); stream order kept for the statements below.
    firsts = sorted({m.key: m for m in reversed(batch)}.values(), key=lambda m: m.seq)
    new = {
        r["message_id"]
        for r in await conn.fetch(
            "INSERT INTO processed (message_id, stream_seq)"
            " SELECT * FROM unnest($1::text[], $2::bigint[])"
            " ON CONFLICT (message_id) DO NOTHING RETURNING message_id",
            [m.key for m in firsts],
            [m.seq for m in firsts],
        )
    }
    by_sql: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    applied = 0
    for m in firsts:
        if m.key in new and m.row is not None:
            by_sql[m.row.sql].append(m.row.args)
            applied += 1
    # Upserts are order-independent across statements; within one, executemany keeps order.
    hospitals: set[str] = set()
    for sql, args in by_sql.items():
        await conn.executemany(sql, args)
        hospitals.update(a[0] for a in args)
    if hospitals:  # once per hospital and batch, not per row as live
        await conn.execute(projection.BUMP_SQL, sorted(hospitals))
    return applied


async def _apply_with_retry(pool: asyncpg.Pool, batch: list[Message]) -> int:
    for attempt in range(1, DEADLOCK_RETRIES + 1):
        try:
            async with pool.acquire() as conn, conn.transaction():
                return await apply_batch(conn, batch)
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
            # A live handler touched the same rows; it has finished by now.
            if attempt == DEADLOCK_RETRIES:
                raise
            await asyncio.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


async def rebuild(
    settings: Settings | None = None,
    *,
    schema: str = SCHEMA,
    batch_size: int = BATCH,
    idle_seconds: float = IDLE_SECONDS,
) -> dict[str, Any]:
    """Replay the stream into empty read models (of `schema`); returns counts and the speed."""
    settings = settings or Settings()
    started = time.perf_counter()
    pool = await create_pool(settings.database_url, schema, min_size=1, max_size=2)
    nc = await nats.connect(settings.nats_url, name="post-analytics-rebuild")
    counts = {"messages": 0, "events_applied": 0, "skipped": 0}
    try:
        await migrate(pool, schema, MIGRATIONS)
        async with pool.acquire() as lock:
            # One rebuild of a schema at a time.
            await lock.execute("SELECT pg_advisory_lock(hashtext($1))", f"rebuild:{schema}")
            try:
                tables = ", ".join((*projection.FACT_TABLES, "processed"))
                async with lock.transaction():
                    await lock.execute(f"TRUNCATE {tables}")
                    # Every answer computed before is void (answers.py).
                    await lock.execute("UPDATE scope_versions SET version = version + 1")
                js = nc.jetstream()
                last_seq = (await js.stream_info(STREAM_NAME)).state.last_seq
                if last_seq:
                    await _replay(js, pool, last_seq, batch_size, idle_seconds, counts)
                rows = {
                    table: await lock.fetchval(f"SELECT count(*) FROM {table}")
                    for table in projection.FACT_TABLES
                }
            finally:
                await lock.execute("SELECT pg_advisory_unlock(hashtext($1))", f"rebuild:{schema}")
    finally:
        await nc.close()
        await pool.close()
    seconds = time.perf_counter() - started
    return {
        **counts,
        "last_seq": last_seq,
        "rows": rows,
        "seconds": round(seconds, 3),
        "events_per_second": round(counts["messages"] / seconds, 1) if seconds else None,
    }


async def _replay(
    js: Any,
    pool: asyncpg.Pool,
    last_seq: int,
    batch_size: int,
    idle_seconds: float,
    counts: dict[str, int],
) -> None:
    """Read every event message with a sequence up to `last_seq`, in order, in batches.

    A push consumer that acknowledges each batch once it is written (AckPolicy.ALL) and may
    have at most a few batches unacknowledged: the server waits for the database, memory stays
    bounded, and nothing is dropped. (An unbounded push consumer overran the client on a
    million events: nats-py dropped messages as a slow consumer and the rebuild ended early.)
    The end is the stream's last sequence at start, or the last event before it.
    """
    batch: list[Message] = []
    done = asyncio.Event()
    failures: list[BaseException] = []

    async def flush(ack: Msg) -> None:
        if batch:
            applied = await _apply_with_retry(pool, batch)
            counts["events_applied"] += applied
            counts["skipped"] += len(batch) - applied
            batch.clear()
        await ack.ack()  # AckPolicy.ALL: this message and every one before it

    async def on_message(msg: Msg) -> None:
        if done.is_set():
            return
        try:
            meta = msg.metadata
            if meta.sequence.stream > last_seq:  # the live consumer handles what came after
                await flush(msg)
                done.set()
                return
            counts["messages"] += 1
            message = read_message(msg)
            if message is None:
                counts["skipped"] += 1
            else:
                batch.append(message)
            last = meta.sequence.stream == last_seq or meta.num_pending == 0
            if last or len(batch) >= batch_size:
                await flush(msg)
            if last:
                done.set()
        except Exception as exc:  # raised below, once the subscription is gone
            failures.append(exc)
            done.set()

    sub = await js.subscribe(
        evt_subject("*", ">"),
        stream=STREAM_NAME,
        cb=on_message,
        manual_ack=True,
        config=ConsumerConfig(
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=batch_size * IN_FLIGHT_BATCHES,
            ack_wait=120,
            inactive_threshold=60,
        ),
    )
    try:
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), timeout=idle_seconds)
            except TimeoutError:
                # A stream with no event at all up to last_seq never calls back: ask the server.
                info = await sub.consumer_info()
                if not info.num_pending and not info.num_ack_pending and not batch:
                    break
    finally:
        await sub.unsubscribe()
    if failures:
        raise failures[0]
