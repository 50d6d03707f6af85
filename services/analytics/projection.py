"""The projection: every contract event of every hospital becomes a fact row.

Each event maps to one order-independent upsert (``row_of``): the live handler executes it in
the message's transaction (where shared records the message in ``processed``), and the rebuild
executes the same rows in batches. All the rebuild needs, and nothing of HTTP or Prometheus.
The pre-aggregated read models follow the fact rows through triggers (migrations/005).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import singledispatch
from typing import Any

import asyncpg

from services.analytics import domain
from shared import registry
from shared.contracts import (
    AssignmentOverdue,
    Event,
    InteractionCompleted,
    MatchingPolicySet,
    NoSupporterAvailable,
    OutreachAccepted,
    OutreachDeclined,
    OutreachUnreachable,
    PhysicianForgotten,
    ReferralCreated,
    SupporterAssigned,
    SupporterAvailabilityChanged,
    SupporterRetired,
    SupporterTrained,
    SurveyResponseRecorded,
)

# --- event -> fact row ----------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One upsert: the SQL (shared by every event of a kind) and its arguments."""

    sql: str
    args: tuple[Any, ...]


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


def _earliest(columns: tuple[str, ...], when: str) -> str:
    """SET clauses keeping the smaller of the row's and the new values of `columns`: a minimum,
    so the order in which records arrive never matters."""
    return ",\n    ".join(
        f"{c} = CASE WHEN {when} THEN EXCLUDED.{c} ELSE r.{c} END" for c in columns
    )


_FIRST = ("first_at", "first_kind", "first_seq", "first_id", "first_outcome")
_DECLINE = ("decline_at", "decline_seq", "decline_id", "decline_reason")
# A referral's first record (its first outcome) and first decline, kept on its row for the
# region's figures (region.py): the minimum by (at, kind, stream_seq, event_id), as reaim.py.
_KEEP_FIRSTS = f"""
ON CONFLICT (hospital, referral_id) DO UPDATE SET
    department = COALESCE(r.department, EXCLUDED.department),
    {
    _earliest(
        _FIRST,
        "r.first_at IS NULL OR (EXCLUDED.first_at, EXCLUDED.first_kind,"
        " EXCLUDED.first_seq, EXCLUDED.first_id) < (r.first_at, r.first_kind, r.first_seq,"
        " r.first_id)",
    )
},
    {
    _earliest(
        _DECLINE,
        "EXCLUDED.decline_at IS NOT NULL AND (r.decline_at IS NULL OR"
        " (EXCLUDED.decline_at, EXCLUDED.decline_seq, EXCLUDED.decline_id) < (r.decline_at,"
        " r.decline_seq, r.decline_id))",
    )
}
"""
OUTREACH_SQL = f"""
WITH fact AS (
    INSERT INTO outreach
        (hospital, event_id, referral_id, department, outcome, at, decline_reason, stream_seq)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    ON CONFLICT (hospital, event_id) DO NOTHING
)
INSERT INTO referrals AS r (hospital, referral_id, department, {", ".join(_FIRST + _DECLINE)})
VALUES ($1, $3, $4, $6, 0, coalesce($8, 0), $2, $5,
    CASE WHEN $5 = 'declined' THEN $6 END, CASE WHEN $5 = 'declined' THEN coalesce($8, 0) END,
    CASE WHEN $5 = 'declined' THEN $2 END, CASE WHEN $5 = 'declined' THEN $7 END)
{_KEEP_FIRSTS}"""
# An interaction is an accepted first record at the start of its day (CONTRACT.md).
INTERACTION_SQL = f"""
WITH fact AS (
    INSERT INTO interactions
        (hospital, event_id, referral_id, department, occurred_on, minutes, escalated, stream_seq)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    ON CONFLICT (hospital, event_id) DO NOTHING
)
INSERT INTO referrals AS r (hospital, referral_id, department, {", ".join(_FIRST + _DECLINE)})
VALUES ($1, $3, $4, $5::date::timestamp AT TIME ZONE 'UTC', 1, coalesce($8, 0), $2,
    'accepted', NULL, NULL, NULL, NULL)
{_KEEP_FIRSTS}"""

AVAILABILITY_SQL = """
INSERT INTO availability_changes
    (hospital, event_id, supporter_id, department, changed_on, available, stream_seq)
VALUES ($1, $2, $3, $4, $5, $6, $7)
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
    "availability_changes",
)
# What the aggregate triggers keep (migrations/005, 007), and agg_build() fills from the facts.
AGGREGATE_TABLES = (
    "agg_interactions",
    "agg_minutes",
    "agg_delays",
    "agg_referrals",
    "agg_surveys",
    "referral_days",
    "supported_days",
    "supported_grid",
    "region_parts",
    "region_asof",
    "region_slugs",
    "referred_grid",
)


@singledispatch
def row_of(event: Event, stream_seq: int | None, event_id: str) -> Row | None:
    """The fact row of one event (None: nothing to record); pure. One function per event
    class, registered below (`functools.singledispatch`, as matching's projection)."""
    raise TypeError(f"analytics does not consume {event.type_name}")


def registered(e: registry.Fact, seq: int | None, event_id: str) -> Row:
    """Hospitals and departments: the one rule every service's copy follows."""
    return Row(*registry.upsert(e))


for _fact in registry.FACT_TYPES:
    row_of.register(_fact)(registered)


@row_of.register
def supporter_trained(e: SupporterTrained, seq: int | None, event_id: str) -> Row:
    return Row(TRAINED_SQL, (e.hospital, e.supporter_id, e.department, e.trained_on))


@row_of.register
def supporter_retired(e: SupporterRetired, seq: int | None, event_id: str) -> Row:
    return Row(RETIRED_SQL, (e.hospital, e.supporter_id, e.department, e.retired_on))


@row_of.register
def supporter_availability_changed(
    e: SupporterAvailabilityChanged, seq: int | None, event_id: str
) -> Row:
    return Row(
        AVAILABILITY_SQL,
        (e.hospital, event_id, e.supporter_id, e.department, e.changed_on, e.available, seq),
    )


@row_of.register
def matching_policy_set(e: MatchingPolicySet, seq: int | None, event_id: str) -> None:
    """No fact: no RE-AIM figure depends on how matching chose."""
    return None


@row_of.register
def referral_created(e: ReferralCreated, seq: int | None, event_id: str) -> Row:
    return Row(
        REFERRAL_SQL,
        (e.hospital, e.referral_id, e.department, e.physician_id, e.source, e.requested_at),
    )


# A forgotten physician's referrals name the forget's id instead: one physician still, counted
# once by physicians_supported. Its `requested_on` is no fact: no date is recorded.
FORGOTTEN_SQL = """
UPDATE referrals SET physician_id = $2 WHERE hospital = $1 AND referral_id = ANY($3::text[])
"""


@row_of.register
def physician_forgotten(e: PhysicianForgotten, seq: int | None, event_id: str) -> Row | None:
    if not e.referral_ids:
        return None
    return Row(FORGOTTEN_SQL, (e.hospital, e.forget_id, list(e.referral_ids)))


@row_of.register
def supporter_assigned(e: SupporterAssigned, seq: int | None, event_id: str) -> Row:
    return Row(MATCHING_SQL, (e.hospital, e.referral_id, e.department, domain.ASSIGNED, seq))


@row_of.register
def no_supporter_available(e: NoSupporterAvailable, seq: int | None, event_id: str) -> Row:
    return Row(MATCHING_SQL, (e.hospital, e.referral_id, e.department, domain.NO_SUPPORTER, seq))


@row_of.register
def assignment_overdue(e: AssignmentOverdue, seq: int | None, event_id: str) -> None:
    """No fact: the reassignment or NoSupporterAvailable that follows is the outcome."""
    return None


@row_of.register(OutreachAccepted)
@row_of.register(OutreachDeclined)
@row_of.register(OutreachUnreachable)
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


@row_of.register
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


@row_of.register
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


# The event types the service consumes: every one with a projection.
PROJECTIONS: frozenset[str] = frozenset(
    cls.__name__ for cls in row_of.registry if cls is not object
)


# Every fact row bumps its hospital's version (answers.py), in the same statement: each row's
# first argument is its hospital.
#
# And every fact row first takes the aggregates' fence: a transaction-scoped advisory lock of
# the schema. The triggers (migrations/005_aggregates.sql) update the region's rows ('' for the
# hospital) from every partition, in the order its batch's events come; two partitions' batches
# taking the rows of two days (or departments) in opposite orders deadlocked, and the loser's
# hospital was held back. Taken before any row of the statement (the bump reads the fence, and
# the rows' AFTER triggers fire at the statement's end), it orders the batches that write facts
# instead. It costs next to no parallelism: batches of the live stream already waited for each
# other on today's region rows. Re-entrant, released at the commit.
FENCE_SQL = (
    "SELECT pg_advisory_xact_lock(hashtextextended('post-analytics-aggregates:' ||"
    " current_schema(), 0)) AS taken"
)
BUMP_SQL = """
INSERT INTO scope_versions AS v (hospital, version) SELECT DISTINCT unnest($1::text[]), 1
ON CONFLICT (hospital) DO UPDATE SET version = v.version + 1
"""
_BUMP_CTE = (
    f"WITH fence AS ({FENCE_SQL}), bumped AS (INSERT INTO scope_versions AS v (hospital, version)"
    " SELECT $1::text, 1 FROM fence ON CONFLICT (hospital) DO UPDATE SET version = v.version + 1) "
)
_VERSIONED: dict[str, str] = {}


def versioned(sql: str) -> str:
    """The row's upsert and its hospital's version bump as one statement."""
    found = _VERSIONED.get(sql)
    if found is None:
        body = sql.strip()
        # A statement with CTEs of its own: one WITH list.
        joined = _BUMP_CTE.rstrip() + ", " + body[5:] if body.startswith("WITH ") else None
        found = _VERSIONED[sql] = joined or _BUMP_CTE + body
    return found


async def project(
    conn: asyncpg.Connection, event: Event, stream_seq: int | None, event_id: str
) -> None:
    """Write one event's fact and bump its hospital's version, in the caller's transaction."""
    row = row_of(event, stream_seq, event_id)
    if row is not None:
        await conn.execute(versioned(row.sql), *row.args)
