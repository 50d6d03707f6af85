"""4. Rebuild and 5. query, over one simulated region of 500 hospitals (over a million events).

The region goes straight into the stream (postctl.simulate.straight). `postctl analytics rebuild`
(services.analytics.rebuild) replays it into the read models, against a bare nats-py pull
consumer reading the same messages (no parsing, no database: the limit). Then the analytics
service serves GET /reaim/{hospital} over those read models, measured one request at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import urllib.request
from datetime import date, timedelta
from pathlib import Path

import httpx
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

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
from postctl import region as region_tokens
from postctl.progress import Progress
from postctl.simulate import direct
from postctl.simulate import straight as region
from services.analytics import handlers as analytics_handlers
from services.analytics.rebuild import rebuild
from shared.contracts import STREAM_NAME, evt_subject
from shared.runtime import Platform
from shared.service import ensure_stream
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
        await ensure_stream(js)  # the national region is written without it
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


def reader(platform: Platform) -> dict[str, str]:
    """The header of a region token issued for the benchmarks on `platform` (postctl/region.py):
    the reads are measured as a region reader makes them, the token check included."""
    token = region_tokens.reader_token("bench", {**os.environ, **platform.env()})
    return region_tokens.bearer(token)


async def query_latencies(
    port: int,
    hospitals: list[str],
    requests: int,
    periods: bool = False,
    headers: dict[str, str] | None = None,
) -> list[float]:
    """`GET /reaim/{hospital}` of random hospitals, one at a time. With `periods`, each asks
    for a different random `from`, so no answer is kept from before: every one is computed."""
    rng = random.Random(5)
    latencies: list[float] = []
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=30, headers=headers
    ) as http:
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
        fig["gauges_wait_seconds"] = await wait_for_gauges(port, 1, timeout=240)
        fig["gauge_refresh_seconds"] = _metric(port, "post_analytics_gauge_refresh_seconds_sum")
        ids = sorted({h.hospital for h in plan.hospitals})
        full_gc = 'python_gc_collections_total{generation="2"}'
        before = await asyncio.to_thread(_metric, port, full_gc)
        latencies = await query_latencies(
            port, ids, int(max(100, 1000 * scale)), headers=reader(platform)
        )
        fig["query_ms"] = percentiles(latencies)
        # Full garbage collections during the queries: each walks every object of the process.
        fig["query_full_gc"] = await asyncio.to_thread(_metric, port, full_gc) - before
        hits = 'post_analytics_answer_lookups_total{result="hit"}'
        fig["query_kept_answers"] = await asyncio.to_thread(_metric, port, hits)
        # The same with a period nobody asked before: the answer computed from the read models.
        computed = await query_latencies(
            port, ids, int(max(100, 300 * scale)), periods=True, headers=reader(platform)
        )
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


# --- issue 15: analytics at national scale ---------------------------------------------------

NATIONAL_HOSPITALS = 6000
NATIONAL_YEARS = 5
# The national target, built straight into the read models; POST_BENCH_NATIONAL_HOSPITALS asks
# for another size.
NATIONAL_DEFAULT = NATIONAL_HOSPITALS


def _status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def scrape(port: int) -> dict[str, int]:
    """One scrape of /metrics: its series (sample lines) and bytes, all and RE-AIM only."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        started = time.perf_counter()
        body = (await http.get("/metrics")).content
        took = time.perf_counter() - started
    lines = [line for line in body.split(b"\n") if line and not line.startswith(b"#")]
    reaim = [line for line in lines if line.startswith(b"post_reaim_")]
    return {
        "series": len(lines),
        "bytes": len(body),
        "reaim_series": len(reaim),
        "reaim_bytes": sum(len(line) + 1 for line in reaim),
        "ms": round(took * 1000, 1),
    }


def _scrape_counts(body: bytes) -> tuple[int, int]:
    """(hospitals, departments) whose interactions gauge a scrape holds."""
    lines = [x for x in body.split(b"\n") if x.startswith(b"post_reaim_interactions{")]
    hospital = [x for x in lines if b'hospital=""' not in x]
    whole = sum(1 for x in hospital if b'department=""' in x)
    return whole, len(hospital) - whole


async def wait_for_hospitals(ports: list[int], hospitals: int, timeout: float) -> float:
    """Until the instances' scrapes together hold every hospital's gauges, each once."""
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as http:
        while time.perf_counter() - started < timeout:
            held = 0
            for port in ports:
                body = (await http.get(f"http://127.0.0.1:{port}/metrics")).content
                held += _scrape_counts(body)[0]
            if held == hospitals:
                break
            await asyncio.sleep(5)
    return time.perf_counter() - started


async def period_latencies(
    port: int, paths: list[str], requests: int, seed: int, headers: dict[str, str] | None = None
) -> list[float]:
    """GET of random `paths`, each with a period nobody asked before (random `from` and `to`,
    both new for every request): every answer is computed."""
    rng = random.Random(seed)
    latencies: list[float] = []
    first = date(2019, 6, 1).toordinal()
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=120, headers=headers
    ) as http:
        (await http.get(paths[0])).raise_for_status()  # warm-up
        for n in range(requests):
            start = first + rng.randint(0, 5 * 365) + n % 7  # never the same pair twice
            end = start + rng.choice([7, 30, 91, 365, 730, 5 * 365])
            params = {"from": str(date.fromordinal(start)), "to": str(date.fromordinal(end))}
            started = time.perf_counter()
            resp = await http.get(rng.choice(paths), params=params)
            latencies.append((time.perf_counter() - started) * 1000)
            resp.raise_for_status()
    return latencies


async def run_national(platform: Platform, scale: float = 1.0) -> Section:
    """Issues 15 and 26: a national region (hospitals x 5 years) built straight into the read
    models (postctl.simulate.direct), then the analytics service over it: memory, queries with
    new periods at every scope, the scrape."""
    section = Section("analytics at national scale")
    fig = section.figures
    wanted = int(os.environ.get("POST_BENCH_NATIONAL_HOSPITALS", NATIONAL_DEFAULT))
    hospitals = max(20, int(wanted * scale))
    region_queries = int(os.environ.get("POST_BENCH_NATIONAL_REGION_QUERIES", 30))
    fig["region"] = {"hospitals": hospitals, "years": NATIONAL_YEARS, "target": NATIONAL_HOSPITALS}
    # Building the region is set-up: straight into the read models (postctl.simulate.direct),
    # by two processes. The rebuild from the stream is measured by the `replay` section.
    with Progress() as progress:
        fig["region"]["build"] = await direct.write_region(
            platform.db_url,
            hospitals,
            NATIONAL_YEARS,
            on_chunk=progress.task("national region: events written").update,
        )
    events = int(fig["region"]["build"]["events"])
    fig["region"]["events"] = events

    await skip_to_end(platform.nats_url)
    proc = platform.start_service("analytics")
    port = platform.service_ports["analytics"]
    try:
        await _ready(port, proc.alive)
        assert proc.proc is not None
        pid = proc.proc.pid
        fig["rss_kib_started"] = rss_kib(pid)
        # The first refresh computes every hospital (later ones: only those that changed).
        fig["gauges_wait_seconds"] = await wait_for_gauges(port, 1, timeout=3600)
        fig["gauge_refresh_seconds"] = _metric(port, "post_analytics_gauge_refresh_seconds_sum")
        fig["metrics"] = await scrape(port)
        fig["metrics"]["per_hospital"] = round(fig["metrics"]["reaim_series"] / hospitals, 1)
        ids = [h.hospital for p in region.national(min(hospitals, 200), NATIONAL_YEARS)
               for h in p.hospitals]  # fmt: skip
        headers = reader(platform)
        fig["hospital_kept_ms"] = percentiles(
            await query_latencies(port, ids, 300, headers=headers)
        )
        paths = [f"/reaim/{h}" for h in ids]
        fig["hospital_new_period_ms"] = percentiles(
            await period_latencies(port, paths, 300, 1, headers)
        )
        departments = [f"/reaim/{d.hospital}/{d.department}"
                       for p in region.national(min(hospitals, 200), NATIONAL_YEARS)
                       for d in p.departments]  # fmt: skip
        fig["department_new_period_ms"] = percentiles(
            await period_latencies(port, departments, 300, 3, headers)
        )
        fig["region_new_period_ms"] = percentiles(
            await period_latencies(port, ["/reaim"], region_queries, 2, headers)
        )
        fig["rss_kib"] = rss_kib(pid)
        fig["rss_peak_kib"] = _status_kib(pid, "VmHWM")

        # The same region shared by several instances: each exports the hospitals of the
        # partitions it holds, so each scrape holds a share of the series.
        instances = int(os.environ.get("POST_BENCH_NATIONAL_INSTANCES", 4))
        others = [platform.start_service("analytics", k) for k in range(1, instances)]
        ports = [port] + [platform.port("analytics", k) for k in range(1, instances)]
        for other, other_port in zip(others, ports[1:], strict=True):
            await _ready(other_port, other.alive)
        await asyncio.sleep(5)  # the partitions shared out (rebalanced every second)
        fig["shared_wait_seconds"] = await wait_for_hospitals(ports, hospitals, 3600)
        scrapes = [await scrape(p) for p in ports]
        fig["shared"] = {
            "instances": instances,
            "scrapes": scrapes,
            "max_series": max(x["series"] for x in scrapes),
            "max_bytes": max(x["bytes"] for x in scrapes),
            "rss_peak_kib": [
                _status_kib(p.proc.pid, "VmHWM") for p in [proc, *others] if p.proc is not None
            ],
        }
    finally:
        for key in [k for k in platform.processes if k.startswith("analytics")]:
            platform.processes.pop(key).stop()

    mib = (fig["rss_peak_kib"] or 0) / 1024
    metrics = fig["metrics"]
    region_p99 = fig["region_new_period_ms"]["p99"] or 0.0
    hospital_p99 = fig["hospital_new_period_ms"]["p99"] or 0.0
    department_p99 = fig["department_new_period_ms"]["p99"] or 0.0
    build = fig["region"]["build"]
    fig["build_target_met"] = build["seconds"] <= 600 or hospitals < NATIONAL_HOSPITALS
    fig["department_query_target_met"] = department_p99 <= 20
    fig["rss_target_met"] = mib <= 300
    fig["region_query_target_met"] = region_p99 <= 200
    fig["hospital_query_target_met"] = hospital_p99 <= 20
    fig["scrape_target_met"] = metrics["series"] <= 100_000 and metrics["bytes"] <= 10_000_000
    shared = fig["shared"]
    fig["shared_scrape_target_met"] = (
        shared["max_series"] <= 100_000 and shared["max_bytes"] <= 10_000_000
    )

    section.row(
        f"national region: {hospitals:,} hospitals x {NATIONAL_YEARS} years, {events:,} events",
        f"built in {build['seconds']:.0f} s ({fmt_rate(build['per_second'])})",
        "<= 600 s at 6,000",
        fig["build_target_met"],
    )
    section.row(
        "  of which indexes / aggregates by grouping",
        f"{build['index_ms'] / 1000:.0f} s / {build['aggregate_ms'] / 1000:.0f} s",
    )
    section.row("  first gauge refresh (every hospital)", f"{fig['gauges_wait_seconds']:.0f} s")
    section.row("  analytics RSS, peak", f"{mib:.0f} MiB", "<= 300 MiB", fig["rss_target_met"])
    section.row(
        "  GET /reaim, a new period each: p50 / p99",
        f"{fmt_ms(fig['region_new_period_ms']['p50'])} / {fmt_ms(region_p99)}",
        "p99 <= 200 ms",
        fig["region_query_target_met"],
    )
    section.row(
        "  GET /reaim/{hospital}, a new period each: p50 / p99",
        f"{fmt_ms(fig['hospital_new_period_ms']['p50'])} / {fmt_ms(hospital_p99)}",
        "p99 <= 20 ms",
        fig["hospital_query_target_met"],
    )
    section.row(
        "  GET /reaim/{hospital}/{department}, a new period each: p50 / p99",
        f"{fmt_ms(fig['department_new_period_ms']['p50'])} / {fmt_ms(department_p99)}",
        "p99 <= 20 ms",
        fig["department_query_target_met"],
    )
    section.row(
        "  GET /reaim/{hospital}, all time (kept): p99", fmt_ms(fig["hospital_kept_ms"]["p99"])
    )
    section.row(
        "  /metrics: series / bytes",
        f"{metrics['series']:,} / {metrics['bytes'] / 1e6:.1f} MB",
        "<= 100k / 10 MB",
        fig["scrape_target_met"],
    )
    section.row("  RE-AIM series per hospital (departments included)", f"{metrics['per_hospital']}")
    section.row(
        f"  /metrics of {shared['instances']} instances: the largest scrape",
        f"{shared['max_series']:,} / {shared['max_bytes'] / 1e6:.1f} MB",
        "<= 100k / 10 MB",
        fig["shared_scrape_target_met"],
    )
    return section
