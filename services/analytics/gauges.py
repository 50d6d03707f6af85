"""The RE-AIM figures as Prometheus gauges, and the analytics service's own metrics.

A background task (``GaugeRefresh``, built in app.py with what it uses) recomputes the all-time
figures of the hospitals whose facts changed since it last looked (their ``scope_versions``), a
few hospitals' facts at a time, and the region's from the pre-aggregated read models (store.py);
the collector exports each hospital's latest samples. The region has a gauge for every figure;
every hospital for its headline figures (``domain.HEADLINE``, about 10: a national region's
scrape stays bounded); the hospitals of ``POST_ANALYTICS_DEPARTMENT_GAUGES``, bounded
(``department_gauges``), for every figure of the hospital and of each of its departments.
Nothing here is registered at import: ``export`` registers it when the service starts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from threading import Lock

import asyncpg
import structlog
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from pydantic import BaseModel

from services.analytics import answers, domain, reaim, store
from services.analytics.facts import (
    answer_key,
    facts_by_hospital,
    hospital_versions,
    load_facts,
    read_snapshot,
    render,
)
from shared.contracts import Event
from shared.settings import current, env_name

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
    """Gauge key -> the RE-AIM object it belongs to, read from the answer's model: its numeric
    keys, the breakdowns and the program years."""
    names = domain.numeric_keys()
    for name, part in domain.Figures.model_fields.items():
        assert isinstance(part.annotation, type) and issubclass(part.annotation, BaseModel)
        for key in part.annotation.model_fields:
            if key in BREAKDOWNS or key == "interactions_by_program_year":
                names[key] = name
    return names


GAUGES = _gauge_names()


def samples_of(
    figures: domain.Figures, hospital: str, department: str, headline: bool = False
) -> Iterator[tuple[str, Sample]]:
    """The samples of one scope's all-time figures (`headline`: only domain.HEADLINE's); a
    null figure has no sample."""
    base = (hospital, department)
    for key, value in reaim.numeric_figures(figures).items():
        if value is not None and (not headline or key in domain.HEADLINE):
            yield key, (base, float(value))
    if headline:
        return
    for key in BREAKDOWNS:
        counts: dict[str, int] = getattr(getattr(figures, GAUGES[key]), key)
        for item, count in counts.items():
            yield key, ((*base, item), float(count))
    for year, count in enumerate(figures.maintenance.interactions_by_program_year, 1):
        yield "interactions_by_program_year", ((*base, str(year)), float(count))


Computed = Callable[[domain.Scope, domain.Facts, domain.Figures], None]
# One scope's samples and the gauge each belongs to: a hospital's list holds its departments'.
Scoped = list[tuple[str, Sample]]


def hospital_samples(
    hospital: str,
    facts: domain.Facts,
    departments: bool = True,
    computed: Computed | None = None,
) -> Scoped:
    """The samples of one registered hospital (`facts`: its own): with `departments`, every
    figure of it and of each of its launched departments; without, its headline figures
    (domain.HEADLINE: a national region's scrape stays bounded). Pure."""
    scoped: Scoped = []
    scopes = [domain.Scope(hospital)]
    if departments:
        launched = sorted(d.department for d in facts.departments if d.launched_on is not None)
        scopes += [domain.Scope(hospital, department) for department in launched]
    for scope in scopes:
        figures = reaim.compute(facts, scope=scope, period_from=None, period_to=None)
        if computed is not None:
            computed(scope, facts, figures)
        scoped.extend(samples_of(figures, hospital, scope.department or "", not departments))
    return scoped


def snapshot_of(facts: domain.Facts, computed: Computed | None = None) -> Snapshot:
    """Every gauge sample: the region (hospital ""), each registered hospital (department ""),
    and each launched department of a registered hospital. Pure: for tests and small regions;
    the service computes the same per hospital (`refresh_gauges_once`)."""
    region = reaim.compute(facts, scope=domain.Scope(), period_from=None, period_to=None)
    if computed is not None:
        computed(domain.Scope(), facts, region)
    scopes = {"": list(samples_of(region, "", ""))}
    by_hospital = facts_by_hospital(facts)
    for h in sorted(h.hospital for h in facts.hospitals):
        mine = by_hospital.get(h, domain.Facts(hospitals=[]))
        scopes[h] = hospital_samples(h, mine, True, computed)
    return by_gauge(scopes)


def by_gauge(scopes: dict[str, Scoped], exports: Callable[[str], bool] | None = None) -> Snapshot:
    """Samples by gauge, of the scopes `exports` says this instance exports."""
    snapshot: Snapshot = {key: [] for key in GAUGES}
    for hospital, scoped in scopes.items():
        if exports is None or exports(hospital):
            for key, sample in scoped:
                snapshot[key].append(sample)
    return snapshot


class ReaimCollector:
    """Exports the latest samples as `post_reaim_<key>` gauges. The refresh replaces one
    hospital's samples at a time (`scopes`: hospital, "" for the region, -> its samples)."""

    def __init__(self) -> None:
        self.scopes: dict[str, Scoped] = {}
        # With several analytics instances each exports the hospitals it holds (the region:
        # the holder of partition 0), so a Prometheus sum over instances counts each once.
        self.exports: Callable[[str], bool] = lambda hospital: True

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        snapshot = by_gauge(dict(self.scopes), self.exports)
        for key, samples in sorted(snapshot.items()):
            extra = [BREAKDOWNS[key]] if key in BREAKDOWNS else []
            if key == "interactions_by_program_year":
                extra = ["program_year"]
            family = GaugeMetricFamily(
                f"post_reaim_{key}",
                f'RE-AIM {GAUGES[key]}: {key} (CONTRACT.md), all time; hospital="" is the'
                ' region, department="" the whole hospital.',
                labels=[*_LABELS, *extra],
            )
            for labels, value in samples:
                family.add_metric(list(labels), value)
            yield family


# The process's collector, as prometheus_client's REGISTRY is the process's registry: one
# `/metrics` per process, so one `post_reaim_*` family each, whatever the number of analytics
# services a process runs (one in a deployment; the in-process tests start several). A
# GaugeRefresh is given it (app.py) or its own (a test's).
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


@dataclass
class GaugeState:
    """What the last refreshes computed: each hospital's samples with the version they were
    computed at, so the next refresh computes only the hospitals whose facts changed."""

    versions: dict[str, int] = field(default_factory=dict)  # "" the region: the sum
    departments: dict[str, bool] = field(default_factory=dict)
    scopes: dict[str, Scoped] = field(default_factory=dict)


# Hospitals whose facts are loaded together: a few thousand rows each, so memory stays bounded
# by this many hospitals' facts, never the region's.
CHUNK = 25
DEPARTMENT_GAUGES_ENV = env_name("analytics_department_gauges")
DEPARTMENT_GAUGES_MAX_ENV = env_name("analytics_department_gauges_max")
DEPARTMENT_GAUGES_MAX = 500
LAUNCHED_SQL = (
    "SELECT hospital, count(*) FROM departments WHERE launched_on IS NOT NULL"
    " GROUP BY hospital ORDER BY hospital"
)


def department_gauges(
    launched: list[tuple[str, int]], chosen: str, most: int = DEPARTMENT_GAUGES_MAX
) -> set[str]:
    """The hospitals whose departments get gauges: those `chosen` ("*": all, "": none, else a
    comma-separated list) in id order, whole hospitals, while their launched departments add
    up to at most `most`. Every instance computes the same set. Pure."""
    wanted = {h.strip() for h in chosen.split(",") if h.strip()}
    picked: set[str] = set()
    total = 0
    for hospital, count in launched:
        if "*" not in wanted and hospital not in wanted:
            continue
        if total + count > most:
            break
        total += count
        picked.add(hospital)
    return picked


def _department_setting() -> tuple[str, int]:
    settings = current()
    return settings.analytics_department_gauges, settings.analytics_department_gauges_max


async def refresh_gauges_once(
    pool: asyncpg.Pool,
    cache: answers.AnswerCache | None = None,
    state: GaugeState | None = None,
    exports: Callable[[str], bool] | None = None,
    collector: ReaimCollector = COLLECTOR,
) -> float:
    """Recompute the gauges of every hospital (that this instance exports) whose facts changed
    since `state` was computed (without one: all), a few hospitals at a time, and the region's
    in PostgreSQL; keep the all-time answers computed on the way in `cache`. Returns how long
    it took."""
    started = time.perf_counter()
    state = state if state is not None else GaugeState()
    exports = exports or (lambda hospital: True)
    chosen, most = _department_setting()
    async with pool.acquire() as conn:
        versions = await hospital_versions(conn)
        with_departments = department_gauges(list(await conn.fetch(LAUNCHED_SQL)), chosen, most)
    for gone in [h for h in state.scopes if h and (h not in versions or not exports(h))]:
        del state.scopes[gone]  # a partition handed over: its holder exports it now
        state.versions.pop(gone, None)
    changed = [
        h
        for h in sorted(versions)
        if exports(h)
        and (
            state.versions.get(h) != versions[h]
            or state.departments.get(h) != (h in with_departments)
        )
    ]
    for k in range(0, len(changed), CHUNK):
        # A partition handed over meanwhile (instances starting): not ours to compute now.
        chunk = [h for h in changed[k : k + CHUNK] if exports(h)]
        if chunk:
            await _refresh_hospitals(pool, chunk, with_departments, cache, state)
    if exports("") and state.versions.get("") != sum(versions.values()):
        await _refresh_region(pool, cache, state)
    elif not exports(""):
        state.scopes.pop("", None)
        state.versions.pop("", None)
    collector.scopes = state.scopes
    took = time.perf_counter() - started
    GAUGE_REFRESH_SECONDS.observe(took)
    return took


async def _refresh_hospitals(
    pool: asyncpg.Pool,
    hospitals: list[str],
    with_departments: set[str],
    cache: answers.AnswerCache | None,
    state: GaugeState,
) -> None:
    async def read(conn: asyncpg.Connection) -> tuple[dict[str, int], domain.Facts]:
        found = await conn.fetch(
            "SELECT hospital, version FROM scope_versions WHERE hospital = ANY($1::text[])",
            hospitals,
        )
        return {r[0]: r[1] for r in found}, await load_facts(conn, domain.Scope(), hospitals)

    versions, facts = await read_snapshot(pool, read)

    def compute() -> dict[str, Scoped]:
        def keep(scope: domain.Scope, part: domain.Facts, figures: domain.Figures) -> None:
            if cache is not None:
                period = reaim.period_of(part.within(scope), None, None)
                body = render(scope, period, figures)
                cache.put(
                    answer_key(scope, None, None), versions.get(scope.hospital or "", 0), body
                )

        by_hospital = facts_by_hospital(facts)
        registered = {h.hospital for h in facts.hospitals}
        return {
            h: hospital_samples(h, by_hospital[h], h in with_departments, keep)
            if h in registered
            else []
            for h in hospitals
        }

    for h, scoped in (await asyncio.to_thread(compute)).items():
        state.scopes[h] = scoped
        state.versions[h] = versions.get(h, 0)
        state.departments[h] = h in with_departments


async def _refresh_region(
    pool: asyncpg.Pool, cache: answers.AnswerCache | None, state: GaugeState
) -> None:
    """The region's all-time figures, from the pre-aggregated read models (store.py)."""

    async def read(conn: asyncpg.Connection) -> tuple[int, tuple[reaim.Period, domain.Figures]]:
        version = int(await conn.fetchval(TOTAL_VERSION_SQL))
        return version, await store.compute(conn, domain.Scope(), None, None)

    version, (period, figures) = await read_snapshot(pool, read)
    if cache is not None:
        cache.put(
            answer_key(domain.Scope(), None, None), version, render(domain.Scope(), period, figures)
        )
    state.scopes[""] = list(samples_of(figures, "", ""))
    state.versions[""] = version


TOTAL_VERSION_SQL = "SELECT coalesce(sum(version), 0) FROM scope_versions"


class GaugeRefresh:
    """The background task of one analytics instance: every 15 seconds recompute the gauges of
    the hospitals whose facts changed, whichever instance projected them, and of the hospitals
    this instance has just taken over. Built in app.py with what it uses: the pool, this
    instance's answer cache, which hospitals it exports (`exports`: the hospitals of the
    partitions it holds, "" for the region when it holds partition 0) and which partitions it
    holds now (`partitions`). It owns what the last refresh computed (`state`)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        cache: answers.AnswerCache,
        exports: Callable[[str], bool],
        partitions: Callable[[], list[int]],
        collector: ReaimCollector = COLLECTOR,
    ) -> None:
        self.pool = pool
        self.cache = cache
        self.exports = exports
        self.partitions = partitions
        self.collector = collector
        self.state = GaugeState()

    async def run(self) -> None:
        """Register the metrics (the service has started), then refresh forever."""
        export()
        self.collector.exports = self.exports
        seen: tuple[int, frozenset[int]] = (-1, frozenset())
        refreshed = 0.0
        while True:
            took = 0.0
            held = self.partitions()
            if not held:  # starting, or a spare instance: nothing of ours to export
                await asyncio.sleep(1.0)
                continue
            try:
                # Every fact row, whichever instance projected it, bumps its hospital's version.
                now = (int(await self.pool.fetchval(TOTAL_VERSION_SQL)), frozenset(held))
            except Exception as exc:  # the database away for a moment: the next round asks
                log.warning("gauge_version_unavailable", error=repr(exc))
                now = seen
            stale = time.monotonic() - refreshed > GAUGE_MAX_AGE_SECONDS
            if now != seen or stale:
                try:
                    took = await refresh_gauges_once(
                        self.pool, self.cache, self.state, self.exports, self.collector
                    )
                    seen, refreshed = now, time.monotonic()
                except Exception as exc:  # the next round tries again; the last samples stay
                    log.warning("gauge_refresh_failed", error=repr(exc))
            # A big region takes seconds to compute: never spend more than a third of the time
            # on it.
            await asyncio.sleep(max(GAUGE_INTERVAL_SECONDS, 2 * took))
