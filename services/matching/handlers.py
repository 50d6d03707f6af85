"""The matching service's reactions: load, decide (domain), append, project (store).

Every handler runs in one transaction (`uow`). The tables follow this service's own events
through `store.project` (one registered function per event type), except what other
services' facts write (`referrals`, a closed assignment): store.py says how each is rebuilt.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import structlog
from prometheus_client import Counter, Histogram

from services.matching import domain, store
from shared.contracts import (
    CloseDepartment,
    Event,
    InteractionCompleted,
    LaunchDepartment,
    MatchingPolicy,
    OutreachAccepted,
    OutreachDeclined,
    OutreachUnreachable,
    PhysicianForgotten,
    ReasonCode,
    ReferralCreated,
    RegisterHospital,
    RegisterSupporter,
    Rejected,
    RetireSupporter,
    SetMatchingPolicy,
    SetSupporterAvailability,
)
from shared.unit_of_work import UnitOfWork

log = structlog.get_logger()

# --- metrics (labels: hospital, reason: both bounded) -----------------------------------------

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
REFERRAL_TO_ASSIGNMENT = Histogram(
    "post_matching_referral_to_assignment_seconds",
    "Processing time from receiving a referral to its first assignment.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 300, 3600, 86400, 7 * 86400),
)


async def record(
    uow: UnitOfWork,
    stream: str,
    version: int,
    events: Sequence[Event],
    history: Sequence[Event] = (),
) -> None:
    """Append a decision's events and project them. A creating command that decided none
    (it repeats what `history` holds) is answered with a copy of the creation."""
    await uow.append_or_repeat(stream, version, events, history)
    await store.project_all(uow.conn, events, uow.now())


def count(hospital: str, choice: domain.Choice) -> None:
    if choice.supporter_id is None:
        NO_SUPPORTER.labels(hospital, choice.reason).inc()
    else:
        ASSIGNMENTS.labels(hospital, choice.reason).inc()


# --- registry and roster commands -------------------------------------------------------------


async def register_hospital(cmd: RegisterHospital, uow: UnitOfWork) -> None:
    stream = domain.hospital_stream(uow.hospital)
    history, version = await uow.load(stream)
    events = domain.register_hospital(domain.hospital_from(history), uow.hospital, cmd)
    await record(uow, stream, version, events, history)


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
    await record(uow, stream, version, events, history)


async def close_department(cmd: CloseDepartment, uow: UnitOfWork) -> None:
    stream = domain.department_stream(uow.hospital, cmd.department)
    history, version = await uow.load(stream)
    events = domain.close_department(domain.department_from(history), uow.hospital, cmd, uow.now())
    await record(uow, stream, version, events)


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
    await record(uow, stream, version, events, history)
    if events:
        await serve_waiting(uow, from_department=cmd.department)


async def retire_supporter(cmd: RetireSupporter, uow: UnitOfWork) -> None:
    stream = domain.supporter_stream(uow.hospital, cmd.supporter_id)
    history, version = await uow.load(stream)
    events = domain.retire_supporter(domain.supporter_from(history), uow.hospital, cmd, uow.now())
    await record(uow, stream, version, events)
    await hand_over(uow, cmd.supporter_id)


async def set_supporter_availability(cmd: SetSupporterAvailability, uow: UnitOfWork) -> None:
    """A pause hands the supporter's open referrals over at once (no overdue: nobody was
    late); resuming or a new cap may let them serve referrals that wait."""
    stream = domain.supporter_stream(uow.hospital, cmd.supporter_id)
    history, version = await uow.load(stream)
    supporter = domain.supporter_from(history)
    events = domain.set_supporter_availability(supporter, uow.hospital, cmd, uow.now())
    await record(uow, stream, version, events)
    if not cmd.available:
        await hand_over(uow, cmd.supporter_id)
    elif supporter is not None:
        await serve_waiting(uow, from_department=supporter.department)


async def set_matching_policy(cmd: SetMatchingPolicy, uow: UnitOfWork) -> None:
    """A new policy applies to every assignment from now on, the waiting referrals first."""
    hospital_history, _ = await uow.load(domain.hospital_stream(uow.hospital))
    department = None
    if cmd.department is not None:
        department, _ = await uow.load(domain.department_stream(uow.hospital, cmd.department))
    stream = domain.policy_stream(uow.hospital)
    _, version = await uow.load(stream)
    events = domain.set_matching_policy(
        domain.hospital_from(hospital_history),
        domain.department_from(department or []),
        uow.hospital,
        cmd,
    )
    await record(uow, stream, version, events)
    await serve_waiting(uow, from_department=None)


# --- referrals and outreach -------------------------------------------------------------------


async def referral_created(event: ReferralCreated, uow: UnitOfWork) -> None:
    if event.hospital != uow.hospital:
        raise Rejected(ReasonCode.invalid_payload, "event hospital differs from its subject")
    received_at = uow.message_time or uow.now()
    if not await store.insert_referral(uow.conn, event, received_at):
        log.info("referral_already_matched")  # a second ReferralCreated for it: nothing to do
        return
    new = {event.referral_id: (domain.ReferralToAssign.of(event), received_at)}
    await rematch(uow, [event.referral_id], leaving=None, known=new)


async def physician_forgotten(event: PhysicianForgotten, uow: UnitOfWork) -> None:
    await store.forget_physician(uow.conn, event)


async def outreach_recorded(
    event: OutreachAccepted | OutreachDeclined | OutreachUnreachable | InteractionCompleted,
    uow: UnitOfWork,
) -> None:
    """Any outreach or interaction keeps the 48-hour promise: the assignment is closed, and
    its supporter, now with one open assignment fewer, may be below their cap again."""
    supporter = await store.close_assignment(uow.conn, uow.hospital, event.referral_id, uow.now())
    log.info("assignment_closed", closed=int(supporter is not None))
    if supporter is not None:
        await serve_waiting_if_freed(uow, supporter)


# --- matching again ---------------------------------------------------------------------------


async def hand_over(uow: UnitOfWork, supporter_id: str) -> None:
    """A supporter retired or paused: each of their open referrals, oldest request first,
    goes to the next best (`reassigned`) or waits."""
    referral_ids = await store.open_referrals_of(uow.conn, uow.hospital, supporter_id)
    await rematch(uow, referral_ids, leaving=supporter_id)


async def serve_waiting(uow: UnitOfWork, *, from_department: str | None) -> None:
    """Someone may have become eligible: a supporter of `from_department` (trained, available
    again, below their cap), or anyone (None: a policy changed). The hospital's waiting
    referrals they could serve are matched in the order of requested_at, then referral_id."""
    in_force = await store.policies(uow.conn, uow.hospital)
    waiting = [
        referral_id
        for referral_id, department in await store.waiting_referrals(uow.conn, uow.hospital)
        if from_department in (None, department)
        or domain.policy_in_force(in_force, department) != "same_department"
    ]
    await rematch(uow, waiting, leaving=None, in_force=in_force)


async def serve_waiting_if_freed(uow: UnitOfWork, supporter_id: str) -> None:
    """A supporter lost an open assignment: if that took them below their cap, they may serve
    a waiting referral."""
    department = await store.frees_up(uow.conn, uow.hospital, supporter_id)
    if department is not None:
        await serve_waiting(uow, from_department=department)


async def rematch(
    uow: UnitOfWork,
    referral_ids: Sequence[str],
    *,
    leaving: str | None,
    in_force: dict[str, MatchingPolicy] | None = None,
    known: dict[str, tuple[domain.ReferralToAssign, datetime]] | None = None,
) -> None:
    """Match referrals, in the order given, under the policy in force for each.

    A new referral is matched (or waits); with `leaving`, that supporter's open referral goes
    to the next best; otherwise a waiting referral is assigned when someone is eligible now,
    and nothing new is recorded while still nobody is.
    """
    if in_force is None:
        in_force = await store.policies(uow.conn, uow.hospital)
    for referral_id in referral_ids:
        found = (known or {}).get(referral_id)
        if found is None:  # `known`: the ones just written, not read back
            found = await store.load_referral(uow.conn, uow.hospital, referral_id)
        if found is None:
            continue
        referral, received_at = found
        stream = domain.assignment_stream(uow.hospital, referral_id)
        history, version = await uow.load(stream)
        past = domain.assignment_from(history)
        policy = domain.policy_in_force(in_force, referral.department)
        candidates, department_open = await store.candidates(uow.conn, referral, policy)
        choice: domain.Choice | None
        if leaving is None and not past.decided:  # a new referral: its first matching outcome
            choice, events = domain.assign_referral(
                referral,
                past,
                candidates,
                department_open=department_open,
                now=uow.now(),
                policy=policy,
            )
        else:
            choice, events = domain.rematch(
                referral,
                past,
                candidates,
                leaving=leaving,
                department_open=department_open,
                now=uow.now(),
                policy=policy,
            )
        if choice is None:
            continue
        if choice.manual_refused is not None:
            log.info("assign_to_not_honoured", why=choice.manual_refused)
        await record(uow, stream, version, events)
        count(uow.hospital, choice)
        if choice.supporter_id is not None and not past.assigned:
            _observe_first_assignment(uow.now(), received_at)


def _observe_first_assignment(now: datetime, received_at: datetime) -> None:
    REFERRAL_TO_ASSIGNMENT.observe(max((now - received_at).total_seconds(), 0.0))
