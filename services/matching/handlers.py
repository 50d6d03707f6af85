"""The matching service's reactions: load, decide (domain.py), append, project to the tables.

Every handler runs in one transaction (`uow`); the read tables are updated by `project` from
exactly the events appended, so they can always be rebuilt from the event store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
import structlog
from prometheus_client import Counter, Gauge, Histogram

from services.matching import domain
from shared.contracts import (
    AssignmentOverdue,
    CloseDepartment,
    DepartmentClosed,
    DepartmentLaunched,
    Event,
    HospitalRegistered,
    InteractionCompleted,
    LaunchDepartment,
    NoSupporterAvailable,
    OutreachAccepted,
    OutreachDeclined,
    OutreachUnreachable,
    Rank,
    ReasonCode,
    ReferralCreated,
    RegisterHospital,
    RegisterSupporter,
    Rejected,
    RetireSupporter,
    SupporterAssigned,
    SupporterRetired,
    SupporterTrained,
)
from shared.unit_of_work import UnitOfWork, events_and_version

if TYPE_CHECKING:
    from shared.service import Service

log = structlog.get_logger()

# --- metrics (labels: hospital, department, reason: all bounded) ------------------------------

ASSIGNMENTS = Counter(
    "post_matching_assignments_total",
    "Referrals assigned to a supporter, by reason (manual, matched, reassigned).",
    ["hospital", "reason"],
)
NO_SUPPORTER = Counter(
    "post_matching_no_supporter_total",
    "Matching outcomes without an eligible supporter, by reason.",
    ["hospital", "reason"],
)
OVERDUE = Counter(
    "post_matching_overdue_total",
    "Assignments that reached due_at (48 hours) without outreach.",
    ["hospital"],
)
REFERRAL_TO_ASSIGNMENT = Histogram(
    "post_matching_referral_to_assignment_seconds",
    "Processing time from receiving a referral to its first assignment.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 300, 3600, 86400, 7 * 86400),
)
OPEN_ASSIGNMENTS = Gauge(
    "post_matching_open_assignments",
    "Assignments waiting for outreach, per department (refreshed by the timer).",
    ["hospital", "department"],
)

# An overdue sweep takes at most this many assignments per tick, so one tick stays short.
OVERDUE_BATCH = 500


# --- the read tables follow the events --------------------------------------------------------


async def project(conn: asyncpg.Connection, events: Sequence[Event], now: datetime) -> None:
    """Apply appended events to the read tables, in the same transaction."""
    for event in events:
        if isinstance(event, HospitalRegistered):
            await conn.execute(
                "INSERT INTO hospitals (hospital, name, physician_count) VALUES ($1, $2, $3)",
                event.hospital,
                event.name,
                event.physician_count,
            )
        elif isinstance(event, DepartmentLaunched):
            await conn.execute(
                "INSERT INTO departments (hospital, department, physician_count, launched_on)"
                " VALUES ($1, $2, $3, $4)",
                event.hospital,
                event.department,
                event.physician_count,
                event.launched_on,
            )
        elif isinstance(event, DepartmentClosed):
            await conn.execute(
                "UPDATE departments SET closed_on = $3 WHERE hospital = $1 AND department = $2",
                event.hospital,
                event.department,
                event.closed_on,
            )
        elif isinstance(event, SupporterTrained):
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
        elif isinstance(event, SupporterRetired):
            await conn.execute(
                "UPDATE supporters SET retired_on = $3 WHERE hospital = $1 AND supporter_id = $2",
                event.hospital,
                event.supporter_id,
                event.retired_on,
            )
        elif isinstance(event, SupporterAssigned):
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
        elif isinstance(event, AssignmentOverdue):
            await conn.execute(
                "UPDATE assignments SET status = 'overdue', ended_at = $4"
                " WHERE hospital = $1 AND referral_id = $2 AND supporter_id = $3",
                event.hospital,
                event.referral_id,
                event.supporter_id,
                now,
            )
        elif isinstance(event, NoSupporterAvailable):
            await _end_open_assignment(conn, event.hospital, event.referral_id, now)
            await _set_referral_status(
                conn, event.hospital, event.referral_id, "waiting", event.reason
            )


async def _end_open_assignment(
    conn: asyncpg.Connection, hospital: str, referral_id: str, now: datetime
) -> None:
    # A new outcome for a referral ends the assignment it replaces (a retired supporter's).
    await conn.execute(
        "UPDATE assignments SET status = 'reassigned', ended_at = $3"
        " WHERE hospital = $1 AND referral_id = $2 AND status = 'open'",
        hospital,
        referral_id,
        now,
    )


async def _set_referral_status(
    conn: asyncpg.Connection, hospital: str, referral_id: str, status: str, reason: str | None
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


async def _record(
    uow: UnitOfWork, stream: str, version: int, events: Sequence[Event], *, chained: bool = False
) -> None:
    if not events:
        return
    await uow.append(stream, version, events, chained=chained)
    await project(uow.conn, events, uow.now())


async def _record_or_repeat(
    uow: UnitOfWork, stream: str, version: int, events: Sequence[Event], history: Sequence[Event]
) -> None:
    """A registration repeated identically is answered with the fact it repeats."""
    if not events:
        await uow.repeat(history[0])
        return
    await uow.append(stream, version, events)
    await project(uow.conn, events, uow.now())


# --- registry and roster commands -------------------------------------------------------------


async def register_hospital(cmd: RegisterHospital, uow: UnitOfWork) -> None:
    stream = domain.hospital_stream(uow.hospital)
    history, version = await uow.load(stream)
    events = domain.register_hospital(domain.hospital_from(history), uow.hospital, cmd)
    await _record_or_repeat(uow, stream, version, events, history)


async def launch_department(cmd: LaunchDepartment, uow: UnitOfWork) -> None:
    hospital_history, _ = await uow.load(domain.hospital_stream(uow.hospital))
    stream = domain.department_stream(uow.hospital, cmd.department)
    history, version = await uow.load(stream)
    events = domain.launch_department(
        domain.hospital_from(hospital_history),
        domain.department_from(history),
        uow.hospital,
        cmd,
        uow.now(),
    )
    await _record_or_repeat(uow, stream, version, events, history)


async def close_department(cmd: CloseDepartment, uow: UnitOfWork) -> None:
    stream = domain.department_stream(uow.hospital, cmd.department)
    history, version = await uow.load(stream)
    events = domain.close_department(domain.department_from(history), uow.hospital, cmd, uow.now())
    await _record(uow, stream, version, events)


async def register_supporter(cmd: RegisterSupporter, uow: UnitOfWork) -> None:
    hospital_history, _ = await uow.load(domain.hospital_stream(uow.hospital))
    department_history, _ = await uow.load(domain.department_stream(uow.hospital, cmd.department))
    stream = domain.supporter_stream(uow.hospital, cmd.supporter_id)
    history, version = await uow.load(stream)
    events = domain.register_supporter(
        domain.hospital_from(hospital_history),
        domain.department_from(department_history),
        domain.supporter_from(history),
        uow.hospital,
        cmd,
        uow.now(),
    )
    await _record_or_repeat(uow, stream, version, events, history)
    if events:
        await _retry_waiting(uow, cmd.department)


async def retire_supporter(cmd: RetireSupporter, uow: UnitOfWork) -> None:
    stream = domain.supporter_stream(uow.hospital, cmd.supporter_id)
    history, version = await uow.load(stream)
    events = domain.retire_supporter(domain.supporter_from(history), uow.hospital, cmd, uow.now())
    await _record(uow, stream, version, events)
    rows = await uow.conn.fetch(
        "SELECT a.referral_id FROM assignments a"
        " WHERE a.hospital = $1 AND a.supporter_id = $2 AND a.status = 'open'"
        " ORDER BY a.requested_at, a.referral_id",
        uow.hospital,
        cmd.supporter_id,
    )
    for row in rows:
        referral = await _load_referral(uow.conn, uow.hospital, row["referral_id"])
        if referral is None:
            continue
        assignment = domain.assignment_stream(uow.hospital, referral.referral_id)
        past, past_version = await uow.load(assignment)
        candidates, department_open = await _candidates(uow.conn, referral)
        choice, outcome = domain.reassign_from_retired(
            referral,
            domain.assignment_from(past),
            candidates,
            retired_supporter=cmd.supporter_id,
            department_open=department_open,
            now=uow.now(),
        )
        await _record(uow, assignment, past_version, outcome)
        if choice is not None:
            _count(uow.hospital, choice)


# --- referrals and outreach -------------------------------------------------------------------


async def referral_created(event: ReferralCreated, uow: UnitOfWork) -> None:
    if event.hospital != uow.hospital:
        raise Rejected(ReasonCode.invalid_payload, "event hospital differs from its subject")
    message_time: datetime | None = getattr(uow, "message_time", None)
    inserted = await uow.conn.fetchval(
        "INSERT INTO referrals (hospital, referral_id, physician_id, referrer_id, department,"
        " rank, event_nature, requested_at, assign_to, received_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        " ON CONFLICT (hospital, referral_id) DO NOTHING RETURNING 1",
        uow.hospital,
        event.referral_id,
        event.physician_id,
        event.referrer_id,
        event.department,
        event.rank.value,
        event.event_nature,
        event.requested_at,
        event.assign_to,
        message_time or uow.now(),
    )
    if inserted is None:
        log.info("referral_already_matched")  # a second ReferralCreated for it: nothing to do
        return
    referral = _referral_of(uow.hospital, event)
    stream = domain.assignment_stream(uow.hospital, referral.referral_id)
    history, version = await uow.load(stream)
    past = domain.assignment_from(history)
    if past.decided:
        return
    choice = await _assign(uow, referral, past, stream, version)
    if choice.supporter_id is not None and message_time is not None:
        REFERRAL_TO_ASSIGNMENT.observe(max((uow.now() - message_time).total_seconds(), 0.0))


async def outreach_recorded(
    event: OutreachAccepted | OutreachDeclined | OutreachUnreachable | InteractionCompleted,
    uow: UnitOfWork,
) -> None:
    """Any outreach or interaction keeps the 48-hour promise: the assignment is closed."""
    closed = await uow.conn.execute(
        "UPDATE assignments SET status = 'closed', ended_at = $3"
        " WHERE hospital = $1 AND referral_id = $2 AND status = 'open'",
        uow.hospital,
        event.referral_id,
        uow.now(),
    )
    await uow.conn.execute(
        "UPDATE referrals SET status = 'closed', waiting_reason = NULL"
        " WHERE hospital = $1 AND referral_id = $2",
        uow.hospital,
        event.referral_id,
    )
    log.info("assignment_closed", closed=closed.split()[-1])


# --- assignment -------------------------------------------------------------------------------


def _referral_of(hospital: str, event: ReferralCreated) -> domain.ReferralToAssign:
    return domain.ReferralToAssign(
        hospital=hospital,
        referral_id=event.referral_id,
        department=event.department,
        physician_id=event.physician_id,
        rank=event.rank,
        event_nature=event.event_nature,
        requested_at=event.requested_at,
        referrer_id=event.referrer_id,
        assign_to=event.assign_to,
    )


async def _load_referral(
    conn: asyncpg.Connection, hospital: str, referral_id: str
) -> domain.ReferralToAssign | None:
    row = await conn.fetchrow(
        "SELECT * FROM referrals WHERE hospital = $1 AND referral_id = $2", hospital, referral_id
    )
    if row is None:
        return None
    return domain.ReferralToAssign(
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


async def _candidates(
    conn: asyncpg.Connection, referral: domain.ReferralToAssign
) -> tuple[list[domain.Candidate], bool]:
    """The referral's department's supporters (and the lead's pick), with their loads."""
    rows = await conn.fetch(
        "SELECT s.supporter_id, s.department, s.rank, s.interventional,"
        " s.retired_on IS NULL AS active,"
        " count(a.referral_id) FILTER (WHERE a.status = 'open') AS open_assignments,"
        " coalesce(array_agg(a.requested_at) FILTER (WHERE a.referral_id IS NOT NULL),"
        " '{}') AS assigned_requested_at"
        " FROM supporters s LEFT JOIN assignments a"
        " ON a.hospital = s.hospital AND a.supporter_id = s.supporter_id"
        " WHERE s.hospital = $1 AND (s.department = $2 OR s.supporter_id = $3)"
        " GROUP BY s.hospital, s.supporter_id",
        referral.hospital,
        referral.department,
        referral.assign_to,
    )
    department_open = await conn.fetchval(
        "SELECT closed_on IS NULL FROM departments WHERE hospital = $1 AND department = $2",
        referral.hospital,
        referral.department,
    )
    candidates = [
        domain.Candidate(
            supporter_id=r["supporter_id"],
            department=r["department"],
            rank=Rank(r["rank"]),
            interventional=r["interventional"],
            active=r["active"],
            open_assignments=r["open_assignments"],
            assigned_requested_at=tuple(r["assigned_requested_at"]),
        )
        for r in rows
    ]
    return candidates, bool(department_open)


async def _assign(
    uow: UnitOfWork,
    referral: domain.ReferralToAssign,
    past: domain.AssignmentHistory,
    stream: str,
    version: int,
) -> domain.Choice:
    candidates, department_open = await _candidates(uow.conn, referral)
    choice, events = domain.assign_referral(
        referral, past, candidates, department_open=department_open, now=uow.now()
    )
    if choice.manual_refused is not None:
        log.info("assign_to_not_honoured", why=choice.manual_refused)
    await _record(uow, stream, version, events)
    _count(uow.hospital, choice)
    return choice


def _count(hospital: str, choice: domain.Choice) -> None:
    if choice.supporter_id is None:
        NO_SUPPORTER.labels(hospital, choice.reason).inc()
    else:
        ASSIGNMENTS.labels(hospital, choice.reason).inc()


async def _retry_waiting(uow: UnitOfWork, department: str) -> None:
    """A new supporter picks up the department's waiting referrals, oldest first."""
    rows = await uow.conn.fetch(
        "SELECT referral_id, received_at FROM referrals"
        " WHERE hospital = $1 AND department = $2 AND status = 'waiting'"
        " ORDER BY requested_at, referral_id",
        uow.hospital,
        department,
    )
    for row in rows:
        referral = await _load_referral(uow.conn, uow.hospital, row["referral_id"])
        if referral is None:
            continue
        stream = domain.assignment_stream(uow.hospital, referral.referral_id)
        history, version = await uow.load(stream)
        past = domain.assignment_from(history)
        candidates, department_open = await _candidates(uow.conn, referral)
        choice, events = domain.assign_referral(
            referral, past, candidates, department_open=department_open, now=uow.now()
        )
        if choice.supporter_id is None:
            continue  # still nobody: it keeps waiting, no new event
        await _record(uow, stream, version, events)
        _count(uow.hospital, choice)
        if not past.assigned:
            waited = (uow.now() - row["received_at"]).total_seconds()
            REFERRAL_TO_ASSIGNMENT.observe(max(waited, 0.0))


# --- the 48-hour timer ------------------------------------------------------------------------


async def expire_assignment(uow: UnitOfWork, referral_id: str, supporter_id: str) -> bool:
    """Record one overdue assignment and reassign its referral; False if no longer due."""
    row = await uow.conn.fetchrow(
        "SELECT due_at FROM assignments WHERE hospital = $1 AND referral_id = $2"
        " AND supporter_id = $3 AND status = 'open' FOR UPDATE",
        uow.hospital,
        referral_id,
        supporter_id,
    )
    if row is None or row["due_at"] > uow.now():
        return False  # outreach came in, or someone else expired it first
    referral = await _load_referral(uow.conn, uow.hospital, referral_id)
    if referral is None:
        return False
    stream = domain.assignment_stream(uow.hospital, referral_id)
    stored = await uow.store.read_stream(uow.conn, stream)
    history, version = events_and_version(stored)
    # No message woke the timer: its events follow from the assignment that went overdue, in
    # the chain of the command that started it (the referral's RequestReferral).
    assigned = [s for s in stored if s.event_type == "SupporterAssigned"]
    if assigned:
        uow.caused_by(assigned[-1].event_id, assigned[-1].metadata.get("correlation_id", ""))
    candidates, department_open = await _candidates(uow.conn, referral)
    choice, events = domain.expire_assignment(
        referral,
        domain.assignment_from(history),
        candidates,
        department_open=department_open,
        now=uow.now(),
    )
    if choice is None:
        log.warning("overdue_row_without_open_assignment", referral_stream=stream)
        return False
    await _record(uow, stream, version, events, chained=True)  # the reassignment: of the overdue
    OVERDUE.labels(uow.hospital).inc()
    _count(uow.hospital, choice)
    return True


async def sweep_overdue(service: Service) -> int:
    """Expire every open assignment whose due_at has passed; returns how many were."""
    now = service.clock.now()
    rows = await service.pool.fetch(
        "SELECT hospital, referral_id, supporter_id FROM assignments"
        " WHERE status = 'open' AND due_at <= $1 ORDER BY due_at LIMIT $2",
        now,
        OVERDUE_BATCH,
    )
    expired = 0
    for row in rows:
        try:
            async with service.unit_of_work(row["hospital"]) as uow:
                if await expire_assignment(uow, row["referral_id"], row["supporter_id"]):
                    expired += 1
        except Exception as exc:  # one bad row must not stop the others; retried next tick
            log.warning("overdue_failed", error=repr(exc), hospital=row["hospital"])
    return expired


async def refresh_open_gauge(service: Service) -> None:
    rows = await service.pool.fetch(
        "SELECT d.hospital, d.department, count(a.referral_id) AS open"
        " FROM departments d LEFT JOIN assignments a ON a.hospital = d.hospital"
        " AND a.department = d.department AND a.status = 'open'"
        " GROUP BY d.hospital, d.department"
    )
    for row in rows:
        OPEN_ASSIGNMENTS.labels(row["hospital"], row["department"]).set(row["open"])


async def overdue_timer(service: Service) -> None:
    """Every `timer_interval` seconds: expire due assignments (from the table: restart-safe)."""
    interval = float(getattr(service.settings, "timer_interval", 1.0))
    while True:
        try:
            await sweep_overdue(service)
            await refresh_open_gauge(service)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database may be away for a moment: try next tick
            log.warning("overdue_timer_failed", error=repr(exc))
        await asyncio.sleep(interval)
