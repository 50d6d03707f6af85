"""The projection: every contract event of every hospital becomes a fact row, and the gauges.

Each event maps to one order-independent upsert (``row_of``): the live consumer executes it in
the message's transaction (where shared records the message in ``processed``), and the rebuild
executes the same rows in batches. The analytics service appends no events of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from services.analytics import answers, domain, reaim, views
from shared.contracts import (
    AssignmentOverdue,
    DepartmentClosed,
    DepartmentLaunched,
    Event,
    HospitalRegistered,
    InteractionCompleted,
    NoSupporterAvailable,
    OutreachAccepted,
    OutreachDeclined,
    OutreachUnreachable,
    ReferralCreated,
    SupporterAssigned,
    SupporterRetired,
    SupporterTrained,
    SurveyResponseRecorded,
)
from shared.unit_of_work import UnitOfWork

if TYPE_CHECKING:
    from shared.service import Service

log = structlog.get_logger()

EVENTS_PROJECTED = Counter(
    "post_analytics_events_projected_total",
    "Contract events turned into RE-AIM fact rows, by event type.",
    ["event_type"],
)
GAUGE_REFRESH_SECONDS = Histogram(
    "post_analytics_gauge_refresh_seconds",
    "Time to recompute every RE-AIM gauge from the fact tables.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
GAUGE_INTERVAL_SECONDS = 15.0
# Without a new event here the gauges are still right (a rebuild gives the same answers);
# recompute anyway now and then.
GAUGE_MAX_AGE_SECONDS = 300.0


# --- event -> fact row ----------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One upsert: the SQL (shared by every event of a kind) and its arguments."""

    sql: str
    args: tuple[Any, ...]


HOSPITAL_SQL = """
INSERT INTO hospitals (hospital, physician_count) VALUES ($1, $2)
ON CONFLICT (hospital) DO UPDATE SET physician_count = EXCLUDED.physician_count
"""
LAUNCH_SQL = """
INSERT INTO departments (hospital, department, physician_count, launched_on)
VALUES ($1, $2, $3, $4)
ON CONFLICT (hospital, department) DO UPDATE SET
    physician_count = EXCLUDED.physician_count,
    launched_on = LEAST(departments.launched_on, EXCLUDED.launched_on)
"""
CLOSE_SQL = """
INSERT INTO departments (hospital, department, closed_on) VALUES ($1, $2, $3)
ON CONFLICT (hospital, department) DO UPDATE SET closed_on = EXCLUDED.closed_on
"""
TRAINED_SQL = """
INSERT INTO supporters (hospital, supporter_id, department, trained_on) VALUES ($1, $2, $3, $4)
ON CONFLICT (hospital, supporter_id) DO UPDATE SET
    department = EXCLUDED.department, trained_on = EXCLUDED.trained_on
"""
RETIRED_SQL = """
INSERT INTO supporters (hospital, supporter_id, department, retired_on) VALUES ($1, $2, $3, $4)
ON CONFLICT (hospital, supporter_id) DO UPDATE SET
    retired_on = EXCLUDED.retired_on,
    department = COALESCE(supporters.department, EXCLUDED.department)
"""
# A creation seen twice keeps its first values: one referral, one row.
REFERRAL_SQL = """
INSERT INTO referrals (hospital, referral_id, department, physician_id, source, requested_at)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (hospital, referral_id) DO UPDATE SET
    department = COALESCE(referrals.department, EXCLUDED.department),
    physician_id = COALESCE(referrals.physician_id, EXCLUDED.physician_id),
    source = COALESCE(referrals.source, EXCLUDED.source),
    requested_at = COALESCE(referrals.requested_at, EXCLUDED.requested_at)
"""
# The latest matching outcome is the one with the highest stream sequence.
MATCHING_SQL = """
INSERT INTO referrals (hospital, referral_id, department, matching_outcome, matching_seq)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (hospital, referral_id) DO UPDATE SET
    matching_outcome = EXCLUDED.matching_outcome,
    matching_seq = EXCLUDED.matching_seq,
    department = COALESCE(referrals.department, EXCLUDED.department)
WHERE referrals.matching_seq IS NULL OR EXCLUDED.matching_seq IS NULL
    OR EXCLUDED.matching_seq > referrals.matching_seq
"""
OUTREACH_SQL = """
INSERT INTO outreach
    (hospital, event_id, referral_id, department, outcome, at, decline_reason, stream_seq)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (hospital, event_id) DO NOTHING
"""
INTERACTION_SQL = """
INSERT INTO interactions
    (hospital, event_id, referral_id, department, occurred_on, minutes, escalated, stream_seq)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (hospital, event_id) DO NOTHING
"""
SURVEY_SQL = """
INSERT INTO surveys (hospital, response_id, department, submitted_on, aware, had_interaction,
    helpful, wellbeing_improved, comfort_improved, would_recommend)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (hospital, response_id) DO NOTHING
"""

# Rows are rebuilt from these tables alone; `processed` is shared's tracking table.
FACT_TABLES = (
    "hospitals",
    "departments",
    "supporters",
    "referrals",
    "outreach",
    "interactions",
    "surveys",
)


def hospital_registered(e: HospitalRegistered, seq: int | None, event_id: str) -> Row:
    return Row(HOSPITAL_SQL, (e.hospital, e.physician_count))


def department_launched(e: DepartmentLaunched, seq: int | None, event_id: str) -> Row:
    return Row(LAUNCH_SQL, (e.hospital, e.department, e.physician_count, e.launched_on))


def department_closed(e: DepartmentClosed, seq: int | None, event_id: str) -> Row:
    return Row(CLOSE_SQL, (e.hospital, e.department, e.closed_on))


def supporter_trained(e: SupporterTrained, seq: int | None, event_id: str) -> Row:
    return Row(TRAINED_SQL, (e.hospital, e.supporter_id, e.department, e.trained_on))


def supporter_retired(e: SupporterRetired, seq: int | None, event_id: str) -> Row:
    return Row(RETIRED_SQL, (e.hospital, e.supporter_id, e.department, e.retired_on))


def referral_created(e: ReferralCreated, seq: int | None, event_id: str) -> Row:
    return Row(
        REFERRAL_SQL,
        (e.hospital, e.referral_id, e.department, e.physician_id, e.source, e.requested_at),
    )


def supporter_assigned(e: SupporterAssigned, seq: int | None, event_id: str) -> Row:
    return Row(MATCHING_SQL, (e.hospital, e.referral_id, e.department, domain.ASSIGNED, seq))


def no_supporter_available(e: NoSupporterAvailable, seq: int | None, event_id: str) -> Row:
    return Row(MATCHING_SQL, (e.hospital, e.referral_id, e.department, domain.NO_SUPPORTER, seq))


def assignment_overdue(e: AssignmentOverdue, seq: int | None, event_id: str) -> None:
    """No fact: the reassignment or NoSupporterAvailable that follows is the outcome."""
    return None


def outreach_recorded(
    e: OutreachAccepted | OutreachDeclined | OutreachUnreachable, seq: int | None, event_id: str
) -> Row:
    return Row(
        OUTREACH_SQL,
        (
            e.hospital,
            event_id,
            e.referral_id,
            e.department,
            e.outcome,
            e.at,
            e.decline_reason,
            seq,
        ),
    )


def interaction_completed(e: InteractionCompleted, seq: int | None, event_id: str) -> Row:
    return Row(
        INTERACTION_SQL,
        (
            e.hospital,
            event_id,
            e.referral_id,
            e.department,
            e.occurred_on,
            e.minutes,
            e.escalated,
            seq,
        ),
    )


def survey_response_recorded(e: SurveyResponseRecorded, seq: int | None, event_id: str) -> Row:
    return Row(
        SURVEY_SQL,
        (
            e.hospital,
            e.response_id,
            e.department,
            e.submitted_on,
            e.aware,
            e.had_interaction,
            e.helpful,
            e.wellbeing_improved,
            e.comfort_improved,
            e.would_recommend,
        ),
    )


PROJECTIONS: dict[str, Callable[[Any, int | None, str], Row | None]] = {
    "HospitalRegistered": hospital_registered,
    "DepartmentLaunched": department_launched,
    "DepartmentClosed": department_closed,
    "SupporterTrained": supporter_trained,
    "SupporterRetired": supporter_retired,
    "ReferralCreated": referral_created,
    "SupporterAssigned": supporter_assigned,
    "NoSupporterAvailable": no_supporter_available,
    "AssignmentOverdue": assignment_overdue,
    "OutreachAccepted": outreach_recorded,
    "OutreachDeclined": outreach_recorded,
    "OutreachUnreachable": outreach_recorded,
    "InteractionCompleted": interaction_completed,
    "SurveyResponseRecorded": survey_response_recorded,
}


def row_of(event: Event, stream_seq: int | None, event_id: str) -> Row | None:
    """The fact row of one event (None: nothing to record); pure."""
    return PROJECTIONS[event.type_name](event, stream_seq, event_id)


# Every fact row bumps its hospital's version (answers.py), in the same statement: each row's
# first argument is its hospital.
BUMP_SQL = """
INSERT INTO scope_versions AS v (hospital, version) SELECT DISTINCT unnest($1::text[]), 1
ON CONFLICT (hospital) DO UPDATE SET version = v.version + 1
"""
_BUMP_CTE = (
    "WITH bumped AS (INSERT INTO scope_versions AS v (hospital, version) VALUES ($1, 1)"
    " ON CONFLICT (hospital) DO UPDATE SET version = v.version + 1) "
)
_VERSIONED: dict[str, str] = {}


def versioned(sql: str) -> str:
    """The row's upsert and its hospital's version bump as one statement."""
    found = _VERSIONED.get(sql)
    if found is None:
        found = _VERSIONED[sql] = _BUMP_CTE + sql.strip()
    return found


async def project(
    conn: asyncpg.Connection, event: Event, stream_seq: int | None, event_id: str
) -> None:
    """Write one event's fact and bump its hospital's version, in the caller's transaction."""
    row = row_of(event, stream_seq, event_id)
    if row is not None:
        await conn.execute(versioned(row.sql), *row.args)
    EVENTS_PROJECTED.labels(event.type_name).inc()
    COLLECTOR.changes += 1


async def project_event(event: Event, uow: UnitOfWork) -> None:
    """The handler of every contract event: shared has recorded the message in `processed`."""
    await project(uow.conn, event, uow.stream_seq, uow.message_id)


# --- gauges ---------------------------------------------------------------------------------

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
    by_hospital = views.facts_by_hospital(facts)
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
        self.changes = 0  # events projected by this process (a counter, not exact: cheap)

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
            for labels, value in samples:
                family.add_metric(list(labels), value)
            yield family


COLLECTOR = ReaimCollector()
REGISTRY.register(COLLECTOR)  # type: ignore[arg-type]


async def refresh_gauges_once(
    pool: asyncpg.Pool, cache: answers.AnswerCache | None = None
) -> float:
    """Recompute every gauge, and keep the all-time answers computed on the way in `cache`;
    returns how long it took."""
    started = time.perf_counter()
    async with pool.acquire() as conn, views.snapshot(conn):
        versions = await views.hospital_versions(conn)
        facts = await views.load_facts(conn, domain.Scope())

    def keep(scope: domain.Scope, part: domain.Facts, figures: dict[str, Any]) -> None:
        assert cache is not None
        hospital = scope.hospital
        version = sum(versions.values()) if hospital is None else versions.get(hospital, 0)
        body = views.render(scope, part, figures, None, None)
        cache.put(views.answer_key(scope, None, None), version, body)

    COLLECTOR.snapshot = await asyncio.to_thread(
        snapshot_of, facts, None if cache is None else keep
    )
    took = time.perf_counter() - started
    GAUGE_REFRESH_SECONDS.observe(took)
    return took


async def refresh_gauges(service: Service) -> None:
    """Background task: recompute the gauges every 15 seconds when events came in."""
    seen, refreshed, trailing = -1, 0.0, False
    while True:
        stale = time.monotonic() - refreshed > GAUGE_MAX_AGE_SECONDS
        took = 0.0
        changed = COLLECTOR.changes != seen
        if changed or trailing or stale:
            # One more round after a change: an event counted here may commit after our read.
            trailing, seen = changed, COLLECTOR.changes
            try:
                took = await refresh_gauges_once(service.pool, answers.cache_for(service.name))
                refreshed = time.monotonic()
            except Exception as exc:  # the next round tries again; the last snapshot stays
                log.warning("gauge_refresh_failed", error=repr(exc))
        # A big region takes seconds to compute: never spend more than a third of the time on it.
        await asyncio.sleep(max(GAUGE_INTERVAL_SECONDS, 2 * took))
