"""4. Rebuild and 5. query, over one simulated region of 500 hospitals (over a million events).

The region goes straight into the stream (bench.region). `postctl analytics rebuild`
(services.analytics.rebuild) replays it into the read models, against a bare nats-py pull
consumer reading the same messages (no parsing, no database: the limit). Then the analytics
service serves GET /reaim/{hospital} over those read models, measured one request at a time.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import urllib.request
from datetime import date, timedelta

import httpx
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench import region
from bench.common import (
    Section,
    Timer,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    percentiles,
    rate,
    rss_kib,
)
from services.analytics import handlers as analytics_handlers
from services.analytics.rebuild import rebuild
from shared.contracts import STREAM_NAME, evt_subject
from shared.runtime import Platform
from shared.settings import Settings

HOSPITALS = 500
YEARS = 8  # 500 hospitals over 8 program years: about 1.2 million events


async def bare_read(nats_url: str, ack: bool, batch: int = 1000) -> tuple[int, float]:
    """Every event message of the stream through an ephemeral pull consumer; (count, seconds)."""
    nc = await nats.connect(nats_url, name="post-bench-bare")
    try:
        js = nc.jetstream()
        total = (await js.stream_info(STREAM_NAME)).state.messages
        sub = await js.pull_subscribe(
            evt_subject("*", ">"),
            stream=STREAM_NAME,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT if ack else AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL,
                max_ack_pending=-1,
                inactive_threshold=60,
            ),
        )
        count = 0
        with Timer() as t:
            while count < total:
                try:
                    msgs = await sub.fetch(batch, timeout=2.0)
                except (nats.errors.TimeoutError, TimeoutError):
                    break
                count += len(msgs)
                if ack:
                    for msg in msgs:
                        await msg.ack()
        await sub.unsubscribe()
        return count, t.seconds
    finally:
        await nc.close()


async def skip_to_end(nats_url: str) -> None:
    """The analytics service's durable consumer, made at the end of the stream: the rebuild has
    already applied everything (the live service would only find it all in `processed`)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_consumer(
            STREAM_NAME,
            ConsumerConfig(
                durable_name="analytics",
                filter_subjects=[evt_subject("*", t) for t in analytics_handlers.PROJECTIONS],
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.NEW,
                ack_wait=60,
                max_deliver=-1,
                max_ack_pending=10_000,
            ),
        )
    finally:
        await nc.close()


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


async def wait_for_gauges(port: int, refreshes: int, timeout: float) -> float:
    """Until the service has computed its RE-AIM gauges `refreshes` times (it does so twice
    after a start, in a worker thread that competes with requests); returns the wait."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        count = await asyncio.to_thread(_metric, port, "post_analytics_gauge_refresh_seconds_count")
        if count >= refreshes:
            break
        await asyncio.sleep(1)
    return time.perf_counter() - started


async def query_latencies(
    port: int, hospitals: list[str], requests: int, periods: bool = False
) -> list[float]:
    """`GET /reaim/{hospital}` of random hospitals, one at a time. With `periods`, each asks
    for a different random `from`, so no answer is kept from before: every one is computed."""
    rng = random.Random(5)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        for h in hospitals[:20]:  # warm-up
            (await http.get(f"/reaim/{h}")).raise_for_status()
        for n in range(requests):
            hospital = rng.choice(hospitals)
            params = {"from": str(date(2018, 1, 1) + timedelta(days=n))} if periods else {}
            started = time.perf_counter()
            resp = await http.get(f"/reaim/{hospital}", params=params)
            latencies.append((time.perf_counter() - started) * 1000)
            resp.raise_for_status()
    return latencies


async def run(platform: Platform, scale: float = 1.0) -> Section:
    section = Section("rebuild and query")
    fig = section.figures
    hospitals = max(10, int(HOSPITALS * scale))
    plan = region.scenario(hospitals, YEARS)
    fig["region"] = {"hospitals": hospitals, "years": YEARS, "events": region.count_events(plan)}
    fig["region"]["publish"] = await region.publish_region(platform.nats_url, plan)

    # the limit first (also warms the stream's files into the page cache for both)
    count, seconds = await bare_read(platform.nats_url, ack=False)
    fig["bare_read"] = {"messages": count, "per_second": rate(count, seconds)}

    settings = Settings(nats_url=platform.nats_url, database_url=platform.db_url)
    with _SlowConsumerCount() as dropped:
        summary = await rebuild(settings)
    fig["rebuild_slow_consumer_errors"] = dropped.count
    fig["rebuild"] = summary
    fig["rebuild_per_second"] = summary["events_per_second"]
    fig["ratio_rebuild_vs_bare"] = summary["events_per_second"] / fig["bare_read"]["per_second"]
    fig["rebuild_complete"] = summary["messages"] >= fig["region"]["events"]
    fig["rebuild_target_met"] = fig["ratio_rebuild_vs_bare"] >= 0.5 and fig["rebuild_complete"]

    # the query: the analytics service alone, over the rebuilt read models
    await skip_to_end(platform.nats_url)
    proc = platform.start_service("analytics")
    port = platform.service_ports["analytics"]
    try:
        await _ready(port, proc.alive)
        fig["gauges_wait_seconds"] = await wait_for_gauges(port, 2, timeout=240)
        fig["gauge_refresh_seconds"] = _metric(port, "post_analytics_gauge_refresh_seconds_sum")
        ids = sorted({h.hospital for h in plan.hospitals})
        full_gc = 'python_gc_collections_total{generation="2"}'
        before = await asyncio.to_thread(_metric, port, full_gc)
        latencies = await query_latencies(port, ids, int(max(100, 1000 * scale)))
        fig["query_ms"] = percentiles(latencies)
        # Full garbage collections during the queries: each walks every object of the process.
        fig["query_full_gc"] = await asyncio.to_thread(_metric, port, full_gc) - before
        hits = 'post_analytics_answer_lookups_total{result="hit"}'
        fig["query_kept_answers"] = await asyncio.to_thread(_metric, port, hits)
        # The same with a period nobody asked before: the answer computed from the read models.
        computed = await query_latencies(port, ids, int(max(100, 300 * scale)), periods=True)
        fig["query_computed_ms"] = percentiles(computed)
        assert proc.proc is not None
        fig["analytics_rss_kib_with_region"] = rss_kib(proc.proc.pid)
    finally:
        proc.stop()
        platform.processes.pop("analytics", None)
    p99 = fig["query_ms"]["p99"]
    fig["query_target_met"] = p99 is not None and p99 < 20

    pub = fig["region"]["publish"]
    section.row(
        f"region: {hospitals} hospitals, {fig['region']['events']:,} events",
        f"written at {fmt_rate(pub['per_second'])}",
    )
    section.row("rebuild (postctl analytics rebuild)", fmt_rate(fig["rebuild_per_second"]))
    read = f"{summary['messages']:,} of {fig['region']['events']:,}"
    section.row("  events it read", read, "all", fig["rebuild_complete"])
    section.row("  nats-py 'slow consumer' drops meanwhile", f"{dropped.count:,}")
    section.row("  bare pull consumer, no ack (limit)", fmt_rate(fig["bare_read"]["per_second"]))
    section.row(
        "  rebuild / bare",
        fmt_ratio(fig["ratio_rebuild_vs_bare"]),
        ">= 0.50x",
        fig["rebuild_target_met"],
    )
    ms = fig["query_ms"]
    section.row(f"GET /reaim/{{hospital}}, {hospitals} hospitals: p50", fmt_ms(ms["p50"]))
    section.row("  p90", fmt_ms(ms["p90"]))
    section.row("  p99", fmt_ms(ms["p99"]), "< 20 ms", fig["query_target_met"])
    section.row("  full garbage collections during them", f"{fig['query_full_gc']:.0f}")
    section.row("  answers served as kept (answer cache)", f"{fig['query_kept_answers']:.0f}")
    computed = fig["query_computed_ms"]
    section.row(
        "  with a new `from` each (computed): p50 / p99",
        f"{fmt_ms(computed['p50'])} / {fmt_ms(computed['p99'])}",
    )
    rss = (fig["analytics_rss_kib_with_region"] or 0) / 1024
    section.row("RSS analytics with the region's read models", f"{rss:.0f} MiB")
    return section


class _SlowConsumerCount(logging.Filter):
    """Counts nats-py's "slow consumer, messages dropped" errors, instead of printing each."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.logger = logging.getLogger("nats.aio.client")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], nats.errors.SlowConsumerError):
            self.count += 1
            return False
        return True

    def __enter__(self) -> _SlowConsumerCount:
        self.logger.addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeFilter(self)


async def _ready(port: int, alive: object, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        while time.monotonic() < deadline:
            if callable(alive) and not alive():
                raise RuntimeError("the analytics service exited")
            try:
                if (await http.get("/readyz", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError("the analytics service is not ready")
