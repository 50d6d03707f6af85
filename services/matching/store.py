"""Matching's read tables: every SQL statement that writes or reads them, and nothing else.

How each table is rebuilt (DESIGN.md: a read model is rebuildable from its own store or says
how it is rebuilt):

- `hospitals`, `departments`, `supporters`, `policies` and `assignments` (all but the
  `closed` status) follow this service's own events: `project` applies them in the
  transaction that appends them, and `domain.roster_from` over the event store gives them back
  (tests/e2e/test_matching_e2e.py compares the two).
- `referrals`, and an assignment's `closed` status, follow other services' facts:
  `ReferralCreated` (referral) and `OutreachAccepted`/`OutreachDeclined`/
  `OutreachUnreachable`/`InteractionCompleted` (records). Matching does not copy them into its
  own event store: they name physicians, whom `ForgetPhysician` must be able to erase, and
  the `POST` stream already keeps them. Only a replay of those event types from the stream's
  first message rebuilds these rows; there is no tool for that yet (`postctl analytics
  rebuild` is analytics's).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import singledispatch
from typing import Literal

import asyncpg

from services.matching import domain
from shared.contracts import (
    AssignmentOverdue,
    DepartmentClosed,
    DepartmentLaunched,
    Event,
    HospitalRegistered,
    MatchingPolicy,
    MatchingPolicySet,
    NoSupporterAvailable,
    PhysicianForgotten,
    Rank,
    ReferralCreated,
    SupporterAssigned,
    SupporterAvailabilityChanged,
    SupporterRetired,
    SupporterTrained,
)
from shared.partitions import PARTITIONS

# --- written from this service's own events ---------------------------------------------------


async def project_all(conn: asyncpg.Connection, events: Sequence[Event], now: datetime) -> None:
    """Apply appended events to the read tables, in the same transaction (`now`: the service
    clock, when an assignment ended)."""
    for event in events:
        await project(event, conn, now)


@singledispatch
async def project(event: Event, conn: asyncpg.Connection, now: datetime) -> None:
    """The read tables one event changes: none, unless its type is registered below."""


@project.register
async def _hospital_registered(
    event: HospitalRegistered, conn: asyncpg.Connection, now: datetime
) -> None:
    await conn.execute(
        "INSERT INTO hospitals (hospital, name, physician_count) VALUES ($1, $2, $3)",
        event.hospital,
        event.name,
        event.physician_count,
    )


@project.register
async def _department_launched(
    event: DepartmentLaunched, conn: asyncpg.Connection, now: datetime
) -> None:
    await conn.execute(
        "INSERT INTO departments (hospital, department, physician_count, launched_on)"
        " VALUES ($1, $2, $3, $4)",
        event.hospital,
        event.department,
        event.physician_count,
        event.launched_on,
    )


@project.register
async def _department_closed(
    event: DepartmentClosed, conn: asyncpg.Connection, now: datetime
) -> None:
    await conn.execute(
        "UPDATE departments SET closed_on = $3 WHERE hospital = $1 AND department = $2",
        event.hospital,
        event.department,
        event.closed_on,
    )


@project.register
async def _supporter_trained(
    event: SupporterTrained, conn: asyncpg.Connection, now: datetime
) -> None:
    await conn.execute(
        "INSERT INTO supporters (hospital, supporter_id, department, rank,"
        " interventional, trained_on) VALUES ($1, $2, $3, $4, $5, $6)",
        event.hospital,
        event.supporter_id,
        event.department,
        event.rank.value,
        event.interventional,
        event.trained_on,
    )


@project.register
async def _supporter_retired(
    event: SupporterRetired, conn: asyncpg.Connection, now: datetime
) -> None:
    await conn.execute(
        "UPDATE supporters SET retired_on = $3 WHERE hospital = $1 AND supporter_id = $2",
        event.hospital,
        event.supporter_id,
        event.retired_on,
    )


@project.register
async def _availability_changed(
    event: SupporterAvailabilityChanged, conn: asyncpg.Connection, now: datetime
) -> None:
    await conn.execute(
        "UPDATE supporters SET available = $3, max_open_assignments = $4"
        " WHERE hospital = $1 AND supporter_id = $2",
        event.hospital,
        event.supporter_id,
        event.available,
        event.max_open_assignments,
    )


@project.register
async def _policy_set(event: MatchingPolicySet, conn: asyncpg.Connection, now: datetime) -> None:
    await conn.execute(
        "INSERT INTO policies (hospital, department, policy) VALUES ($1, $2, $3)"
        " ON CONFLICT (hospital, department) DO UPDATE SET policy = excluded.policy",
        event.hospital,
        event.department or domain.HOSPITAL_WIDE,
        event.policy,
    )


@project.register
async def _supporter_assigned(
    event: SupporterAssigned, conn: asyncpg.Connection, now: datetime
) -> None:
    await _end_open_assignment(conn, event.hospital, event.referral_id, now)
    await conn.execute(
        "INSERT INTO assignments (hospital, referral_id, supporter_id, department,"
        " requested_at, assigned_at, due_at, reason)"
        " SELECT $1, $2, $3, $4, r.requested_at, $5, $6, $7 FROM referrals r"
        " WHERE r.hospital = $1 AND r.referral_id = $2",
        event.hospital,
        event.referral_id,
        event.supporter_id,
        event.department,
        event.assigned_at,
        event.due_at,
        event.reason,
    )
    await _set_referral_status(conn, event.hospital, event.referral_id, "assigned", None)


@project.register
async def _assignment_overdue(
    event: AssignmentOverdue, conn: asyncpg.Connection, now: datetime
) -> None:
    await conn.execute(
        "UPDATE assignments SET status = 'overdue', ended_at = $4"
        " WHERE hospital = $1 AND referral_id = $2 AND supporter_id = $3",
        event.hospital,
        event.referral_id,
        event.supporter_id,
        now,
    )


@project.register
async def _no_supporter(
    event: NoSupporterAvailable, conn: asyncpg.Connection, now: datetime
) -> None:
    await _end_open_assignment(conn, event.hospital, event.referral_id, now)
    await _set_referral_status(conn, event.hospital, event.referral_id, "waiting", event.reason)


async def _end_open_assignment(
    conn: asyncpg.Connection, hospital: str, referral_id: str, now: datetime
) -> None:
    # A new outcome for a referral ends the assignment it replaces (a retired or paused one's).
    await conn.execute(
        "UPDATE assignments SET status = 'reassigned', ended_at = $3"
        " WHERE hospital = $1 AND referral_id = $2 AND status = 'open'",
        hospital,
        referral_id,
        now,
    )


async def _set_referral_status(
    conn: asyncpg.Connection,
    hospital: str,
    referral_id: str,
    status: Literal["assigned", "waiting"],
    reason: str | None,
) -> None:
    # A referral closed by outreach stays closed whatever matching does afterwards.
    await conn.execute(
        "UPDATE referrals SET status = $3, waiting_reason = $4"
        " WHERE hospital = $1 AND referral_id = $2 AND status <> 'closed'",
        hospital,
        referral_id,
        status,
        reason,
    )


# --- written from other services' facts (rebuilt only by a replay of the stream) -------------


async def insert_referral(
    conn: asyncpg.Connection, event: ReferralCreated, received_at: datetime
) -> bool:
    """Keep what matching needs of a referral; False when it was already kept."""
    inserted = await conn.fetchval(
        "INSERT INTO referrals (hospital, referral_id, physician_id, referrer_id, department,"
        " rank, event_nature, requested_at, assign_to, received_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        " ON CONFLICT (hospital, referral_id) DO NOTHING RETURNING 1",
        event.hospital,
        event.referral_id,
        event.physician_id,
        event.referrer_id,
        event.department,
        event.rank.value,
        event.event_nature,
        event.requested_at,
        event.assign_to,
        received_at,
    )
    return inserted is not None


async def forget_physician(conn: asyncpg.Connection, event: PhysicianForgotten) -> None:
    """A forgotten physician's referrals name the forget's id instead (as physician and as
    referrer): matching is told which referrals, never the id."""
    for column, referrals in (
        ("physician_id", event.referral_ids),
        ("referrer_id", event.referred_ids),
    ):
        if referrals:
            await conn.execute(
                f"UPDATE referrals SET {column} = $3 WHERE hospital = $1"
                " AND referral_id = ANY($2::text[])",
                event.hospital,
                referrals,
                event.forget_id,
            )


async def close_assignment(
    conn: asyncpg.Connection, hospital: str, referral_id: str, now: datetime
) -> str | None:
    """Outreach kept the promise: close the referral and its open assignment. Returns the
    supporter whose assignment closed, None when none was open."""
    supporter = await conn.fetchval(
        "UPDATE assignments SET status = 'closed', ended_at = $3"
        " WHERE hospital = $1 AND referral_id = $2 AND status = 'open' RETURNING supporter_id",
        hospital,
        referral_id,
        now,
    )
    await conn.execute(
        "UPDATE referrals SET status = 'closed', waiting_reason = NULL"
        " WHERE hospital = $1 AND referral_id = $2",
        hospital,
        referral_id,
    )
    return supporter  # type: ignore[no-any-return]


# --- what matching decides on -----------------------------------------------------------------


async def load_referral(
    conn: asyncpg.Connection, hospital: str, referral_id: str
) -> tuple[domain.ReferralToAssign, datetime] | None:
    """The referral as matching keeps it, and when matching received it."""
    row = await conn.fetchrow(
        "SELECT * FROM referrals WHERE hospital = $1 AND referral_id = $2", hospital, referral_id
    )
    if row is None:
        return None
    referral = domain.ReferralToAssign(
        hospital=hospital,
        referral_id=row["referral_id"],
        department=row["department"],
        physician_id=row["physician_id"],
        rank=Rank(row["rank"]),
        event_nature=row["event_nature"],
        requested_at=row["requested_at"],
        referrer_id=row["referrer_id"],
        assign_to=row["assign_to"],
    )
    return referral, row["received_at"]


async def policies(conn: asyncpg.Connection, hospital: str) -> dict[str, MatchingPolicy]:
    """The latest policy set per department (`domain.HOSPITAL_WIDE`: the hospital's)."""
    rows = await conn.fetch("SELECT department, policy FROM policies WHERE hospital = $1", hospital)
    return {r["department"]: r["policy"] for r in rows}


async def candidates(
    conn: asyncpg.Connection, referral: domain.ReferralToAssign, policy: MatchingPolicy
) -> tuple[list[domain.Candidate], bool]:
    """The supporters the policy may look at (and the lead's pick), with their loads; and
    whether the referral's department is open."""
    # One statement: the referral's department (a row even without candidates), then the
    # candidates, each with their load.
    rows = await conn.fetch(
        "SELECT referral_department.open AS referral_department_open, c.* FROM"
        " (SELECT (SELECT closed_on IS NULL FROM departments"
        "  WHERE hospital = $1 AND department = $2) AS open) referral_department"
        " LEFT JOIN LATERAL ("
        " SELECT s.supporter_id, s.department, s.rank, s.interventional,"
        " s.retired_on IS NULL AS active, s.available, s.max_open_assignments,"
        " d.closed_on IS NULL AS department_open,"
        " count(a.referral_id) FILTER (WHERE a.status = 'open') AS open_assignments,"
        " coalesce(array_agg(a.requested_at) FILTER (WHERE a.referral_id IS NOT NULL),"
        " '{}') AS assigned_requested_at"
        " FROM supporters s"
        " JOIN departments d ON d.hospital = s.hospital AND d.department = s.department"
        " LEFT JOIN assignments a ON a.hospital = s.hospital AND a.supporter_id = s.supporter_id"
        " WHERE s.hospital = $1 AND ($4 OR s.department = $2 OR s.supporter_id = $3)"
        " GROUP BY s.hospital, s.supporter_id, d.closed_on) c ON true",
        referral.hospital,
        referral.department,
        referral.assign_to,
        policy != "same_department",
    )
    department_open = rows[0]["referral_department_open"]
    rows = [r for r in rows if r["supporter_id"] is not None]
    found = [
        domain.Candidate(
            supporter_id=r["supporter_id"],
            department=r["department"],
            rank=Rank(r["rank"]),
            interventional=r["interventional"],
            active=r["active"],
            open_assignments=r["open_assignments"],
            assigned_requested_at=tuple(r["assigned_requested_at"]),
            department_open=r["department_open"],
            available=r["available"],
            max_open_assignments=r["max_open_assignments"],
        )
        for r in rows
    ]
    return found, bool(department_open)


async def open_referrals_of(
    conn: asyncpg.Connection, hospital: str, supporter_id: str
) -> list[str]:
    """The referrals a supporter has open, oldest request first."""
    rows = await conn.fetch(
        "SELECT referral_id FROM assignments"
        " WHERE hospital = $1 AND supporter_id = $2 AND status = 'open'"
        " ORDER BY requested_at, referral_id",
        hospital,
        supporter_id,
    )
    return [r["referral_id"] for r in rows]


async def waiting_referrals(conn: asyncpg.Connection, hospital: str) -> list[tuple[str, str]]:
    """(referral_id, department) of the referrals waiting for a supporter, in the order they
    are served: requested_at, then referral_id."""
    rows = await conn.fetch(
        "SELECT referral_id, department FROM referrals"
        " WHERE hospital = $1 AND status = 'waiting' ORDER BY requested_at, referral_id",
        hospital,
    )
    return [(r["referral_id"], r["department"]) for r in rows]


async def frees_up(conn: asyncpg.Connection, hospital: str, supporter_id: str) -> str | None:
    """The department of a supporter who just lost an open assignment, when that took them
    below their cap while active and available (so they may serve someone waiting)."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        "SELECT s.department FROM supporters s"
        " WHERE s.hospital = $1 AND s.supporter_id = $2 AND s.retired_on IS NULL"
        " AND s.available AND s.max_open_assignments IS NOT NULL"
        " AND s.max_open_assignments > (SELECT count(*) FROM assignments a"
        "   WHERE a.hospital = s.hospital AND a.supporter_id = s.supporter_id"
        "   AND a.status = 'open')",
        hospital,
        supporter_id,
    )


# --- the 48-hour timer ------------------------------------------------------------------------


async def due_assignments(
    pool: asyncpg.Pool, now: datetime, limit: int, partitions: list[int] | None = None
) -> list[asyncpg.Record]:
    """Open assignments whose due_at has passed (hospital, referral_id, supporter_id), of the
    hospitals of `partitions` (None: every hospital)."""
    return await pool.fetch(  # type: ignore[no-any-return]
        "SELECT hospital, referral_id, supporter_id FROM assignments"
        " WHERE status = 'open' AND due_at <= $1"
        " AND ($3::int[] IS NULL OR post_partition(hospital, $4) = ANY($3::int[]))"
        " ORDER BY due_at LIMIT $2",
        now,
        limit,
        partitions,
        PARTITIONS,
    )


async def lock_open_assignment(
    conn: asyncpg.Connection, hospital: str, referral_id: str, supporter_id: str
) -> datetime | None:
    """Lock one open assignment's row until the transaction ends; its due_at, None when it is
    no longer open. With the status check and the event store's expected version, this makes
    each overdue fire once however many matching instances sweep at the same time."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        "SELECT due_at FROM assignments WHERE hospital = $1 AND referral_id = $2"
        " AND supporter_id = $3 AND status = 'open' FOR UPDATE",
        hospital,
        referral_id,
        supporter_id,
    )


async def open_by_department(
    pool: asyncpg.Pool, partitions: list[int] | None = None
) -> list[asyncpg.Record]:
    """(hospital, department, open): open assignments per department, for the gauge, of the
    hospitals of `partitions` (None: every hospital)."""
    return await pool.fetch(  # type: ignore[no-any-return]
        "SELECT d.hospital, d.department, count(a.referral_id) AS open"
        " FROM departments d LEFT JOIN assignments a ON a.hospital = d.hospital"
        " AND a.department = d.department AND a.status = 'open'"
        " WHERE $1::int[] IS NULL OR post_partition(d.hospital, $2) = ANY($1::int[])"
        " GROUP BY d.hospital, d.department",
        partitions,
        PARTITIONS,
    )


# --- the HTTP views ---------------------------------------------------------------------------


async def hospital_known(pool: asyncpg.Pool, hospital: str) -> bool:
    return await pool.fetchval("SELECT 1 FROM hospitals WHERE hospital = $1", hospital) is not None


async def departments_with_supporters(pool: asyncpg.Pool, hospital: str) -> list[asyncpg.Record]:
    """Each department with its count of supporters not retired."""
    return await pool.fetch(  # type: ignore[no-any-return]
        "SELECT d.department, d.physician_count, d.launched_on, d.closed_on,"
        " count(s.supporter_id) FILTER (WHERE s.retired_on IS NULL) AS active_supporters"
        " FROM departments d LEFT JOIN supporters s"
        " ON s.hospital = d.hospital AND s.department = d.department"
        " WHERE d.hospital = $1 GROUP BY d.hospital, d.department ORDER BY d.department",
        hospital,
    )


async def supporters_with_load(pool: asyncpg.Pool, hospital: str) -> list[asyncpg.Record]:
    """Each supporter with their availability and count of open assignments."""
    return await pool.fetch(  # type: ignore[no-any-return]
        "SELECT s.supporter_id, s.department, s.rank, s.interventional, s.retired_on,"
        " s.available, s.max_open_assignments, count(a.referral_id) AS open_assignments"
        " FROM supporters s LEFT JOIN assignments a ON a.hospital = s.hospital"
        " AND a.supporter_id = s.supporter_id AND a.status = 'open'"
        " WHERE s.hospital = $1 GROUP BY s.hospital, s.supporter_id"
        " ORDER BY s.department, s.supporter_id",
        hospital,
    )
