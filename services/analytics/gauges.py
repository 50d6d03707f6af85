"""The RE-AIM figures as Prometheus gauges, and the analytics service's own metrics.

A background task recomputes every scope's all-time figures from the fact tables when events
came in (``refresh_gauges``) and swaps the snapshot the collector exports. Nothing here is
registered at import: ``export`` registers it when the service starts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from threading import Lock
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from services.analytics import answers, domain, reaim
from services.analytics.facts import (
    answer_key,
    facts_by_hospital,
    hospital_versions,
    load_facts,
    render,
    snapshot,
)
from shared.contracts import Event

if TYPE_CHECKING:
    from shared.service import Service

log = structlog.get_logger()

GAUGE_INTERVAL_SECONDS = 15.0
# Without a new event here the gauges are still right (a rebuild gives the same answers);
# recompute anyway now and then.
GAUGE_MAX_AGE_SECONDS = 300.0

BREAKDOWNS = {
    "referrals_by_source": "source",
    "decline_reasons": "reason",
}
_LABELS = ["hospital", "department"]


# A gauge sample: its labels (hospital, department ("" for all of them), then any breakdown)
# and its value. A plain tuple, not an object: a region has a couple of hundred thousand, and
# the garbage collector stops tracking a tuple of strings and floats (not a NamedTuple).
Sample = tuple[tuple[str, ...], float]


Snapshot = dict[str, list[Sample]]


def _gauge_names() -> dict[str, str]:
    """Gauge key -> the RE-AIM object it belongs to (from an empty answer: every key)."""
    empty = reaim.compute(domain.Facts(), scope=domain.Scope(), period_from=None, period_to=None)
    exported = {*reaim.numeric_figures(empty), *BREAKDOWNS, "interactions_by_program_year"}
    return {key: name for name in reaim.OBJECTS for key in empty[name] if key in exported}


GAUGES = _gauge_names()


def samples_of(
    figures: dict[str, Any], hospital: str, department: str
) -> Iterator[tuple[str, Sample]]:
    """The samples of one scope's all-time figures; a null figure has no sample."""
    base = (hospital, department)
    for key, value in reaim.numeric_figures(figures).items():
        if value is not None:
            yield key, (base, float(value))
    for key in BREAKDOWNS:
        for item, count in figures[GAUGES[key]][key].items():
            yield key, ((*base, item), float(count))
    for year, count in enumerate(figures["maintenance"]["interactions_by_program_year"], 1):
        yield "interactions_by_program_year", ((*base, str(year)), float(count))


Computed = Callable[[domain.Scope, domain.Facts, dict[str, Any]], None]


def snapshot_of(facts: domain.Facts, computed: Computed | None = None) -> Snapshot:
    """Every gauge sample: the region (hospital ""), each registered hospital (department ""),
    and each launched department of a registered hospital. Pure; run in a worker thread.
    `computed` is shown each scope's all-time figures as they are computed."""
    snapshot: Snapshot = {key: [] for key in GAUGES}

    def add(samples: Iterable[tuple[str, Sample]]) -> None:
        for key, sample in samples:
            snapshot[key].append(sample)

    def figures(part: domain.Facts, scope: domain.Scope) -> dict[str, Any]:
        result = reaim.compute(part, scope=scope, period_from=None, period_to=None)
        if computed is not None:
            computed(scope, part, result)
        return result

    add(samples_of(figures(facts, domain.Scope()), "", ""))
    by_hospital = facts_by_hospital(facts)
    for h in sorted(h.hospital for h in facts.hospitals):
        mine = by_hospital.get(h, domain.Facts(hospitals=[]))
        add(samples_of(figures(mine, domain.Scope(h)), h, ""))
        launched = sorted(d.department for d in mine.departments if d.launched_on is not None)
        for department in launched:
            add(samples_of(figures(mine, domain.Scope(h, department)), h, department))
    return snapshot


class ReaimCollector:
    """Exports the latest snapshot as `post_reaim_<key>` gauges; swapped whole on refresh."""

    def __init__(self) -> None:
        self.snapshot: Snapshot = {}
        # With several analytics instances each exports the hospitals it holds (the region:
        # the holder of partition 0), so a Prometheus sum over instances counts each once.
        self.exports: Callable[[str], bool] = lambda hospital: True

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for key, samples in sorted(self.snapshot.items()):
            extra = [BREAKDOWNS[key]] if key in BREAKDOWNS else []
            if key == "interactions_by_program_year":
                extra = ["program_year"]
            family = GaugeMetricFamily(
                f"post_reaim_{key}",
                f'RE-AIM {GAUGES[key]}: {key} (CONTRACT.md), all time; hospital="" is the'
                ' region, department="" the whole hospital.',
                labels=[*_LABELS, *extra],
            )
            exports = self.exports
            for labels, value in samples:
                if exports(labels[0]):
                    family.add_metric(list(labels), value)
            yield family


COLLECTOR = ReaimCollector()


# Created unregistered: importing the analytics modules (the rebuild, a test) registers nothing.
# `export` registers them when a service starts.
EVENTS_PROJECTED = Counter(
    "post_analytics_events_projected_total",
    "Contract events turned into RE-AIM fact rows, by event type.",
    ["event_type"],
    registry=None,
)
GAUGE_REFRESH_SECONDS = Histogram(
    "post_analytics_gauge_refresh_seconds",
    "Time to recompute every RE-AIM gauge from the fact tables.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=None,
)
_EXPORTED: list[CollectorRegistry] = []
_EXPORT_LOCK = Lock()


def export(registry: CollectorRegistry = REGISTRY) -> None:
    """Register the analytics metrics and gauges, once per registry: several analytics
    services in one process (tests) share them, as they share the process's /metrics."""
    with _EXPORT_LOCK:
        if any(r is registry for r in _EXPORTED):
            return
        for collector in (
            COLLECTOR,
            EVENTS_PROJECTED,
            GAUGE_REFRESH_SECONDS,
            answers.LOOKUPS,
            answers.CACHED_BYTES,
        ):
            registry.register(collector)  # type: ignore[arg-type]
        _EXPORTED.append(registry)


def projected(event: Event) -> None:
    """Count an event the live handler has projected (the next refresh then recomputes)."""
    EVENTS_PROJECTED.labels(event.type_name).inc()


async def refresh_gauges_once(
    pool: asyncpg.Pool, cache: answers.AnswerCache | None = None
) -> float:
    """Recompute every gauge, and keep the all-time answers computed on the way in `cache`;
    returns how long it took."""
    started = time.perf_counter()
    async with pool.acquire() as conn, snapshot(conn):
        versions = await hospital_versions(conn)
        facts = await load_facts(conn, domain.Scope())

    def keep(scope: domain.Scope, part: domain.Facts, figures: dict[str, Any]) -> None:
        assert cache is not None
        hospital = scope.hospital
        version = sum(versions.values()) if hospital is None else versions.get(hospital, 0)
        body = render(scope, part, figures, None, None)
        cache.put(answer_key(scope, None, None), version, body)

    COLLECTOR.snapshot = await asyncio.to_thread(
        snapshot_of, facts, None if cache is None else keep
    )
    took = time.perf_counter() - started
    GAUGE_REFRESH_SECONDS.observe(took)
    return took


TOTAL_VERSION_SQL = "SELECT coalesce(sum(version), 0) FROM scope_versions"


async def refresh_gauges(service: Service) -> None:
    """Background task: register the metrics (the service has started), then recompute the
    gauges every 15 seconds when a fact came in, whichever instance projected it."""
    export()
    COLLECTOR.exports = lambda hospital: (
        service.owns(hospital) if hospital else 0 in service.partitions
    )
    seen, refreshed = -1, 0.0
    while True:
        took = 0.0
        try:
            # Every fact row, whichever instance projected it, bumps its hospital's version.
            total = int(await service.pool.fetchval(TOTAL_VERSION_SQL))
        except Exception as exc:  # the database away for a moment: the next round asks again
            log.warning("gauge_version_unavailable", error=repr(exc))
            total = seen
        stale = time.monotonic() - refreshed > GAUGE_MAX_AGE_SECONDS
        if total != seen or stale:
            try:
                took = await refresh_gauges_once(service.pool, answers.cache_for(service.name))
                seen, refreshed = total, time.monotonic()
            except Exception as exc:  # the next round tries again; the last snapshot stays
                log.warning("gauge_refresh_failed", error=repr(exc))
        # A big region takes seconds to compute: never spend more than a third of the time on it.
        await asyncio.sleep(max(GAUGE_INTERVAL_SECONDS, 2 * took))
