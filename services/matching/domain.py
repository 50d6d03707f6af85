"""The matching rules: the registry, the supporter roster and who supports which referral.

Pure: no I/O, no clock, no asyncio. Time comes in as arguments (`now` is processing time,
dates in payloads are business time). Every decision returns the contract events it records
or raises `Rejected`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal

from shared.contracts import (
    AssignmentOverdue,
    CloseDepartment,
    DepartmentClosed,
    DepartmentLaunched,
    Event,
    EventNature,
    HospitalRegistered,
    LaunchDepartment,
    NoSupporterAvailable,
    Rank,
    ReasonCode,
    RegisterHospital,
    RegisterSupporter,
    Rejected,
    RetireSupporter,
    SupporterAssigned,
    SupporterRetired,
    SupporterTrained,
)

DUE_AFTER = timedelta(hours=48)
RECENT_WINDOW = timedelta(days=365)
# A date more than this far ahead of processing time is a typo, not a plan.
FUTURE_TOLERANCE = timedelta(days=1)
RATIO_GOAL = 10.0

NO_SUPPORTERS_IN_DEPARTMENT = "no_supporters_in_department"
ALL_EXCLUDED_AS_PHYSICIAN_OR_REFERRER = "all_excluded_as_physician_or_referrer"
ALL_EXCLUDED_BY_RANK = "all_excluded_by_rank"
ALL_EXCLUDED_BY_INTERVENTIONAL = "all_excluded_by_interventional"
ALL_ALREADY_TRIED = "all_already_tried"


# --- streams ----------------------------------------------------------------------------------


def hospital_stream(hospital: str) -> str:
    return f"hospital:{hospital}"


def department_stream(hospital: str, department: str) -> str:
    return f"department:{hospital}:{department}"


def supporter_stream(hospital: str, supporter_id: str) -> str:
    return f"supporter:{hospital}:{supporter_id}"


def assignment_stream(hospital: str, referral_id: str) -> str:
    return f"assignment:{hospital}:{referral_id}"


def start_of_day(day: date) -> datetime:
    """A date stands for the start of that day, UTC (CONTRACT.md, business time)."""
    return datetime.combine(day, time(0, 0), tzinfo=UTC)


def _reject_future(day: date, name: str, now: datetime) -> None:
    if start_of_day(day) > now + FUTURE_TOLERANCE:
        raise Rejected(ReasonCode.invalid_payload, f"{name}: more than a day in the future")


# --- the registry: hospitals and departments --------------------------------------------------


@dataclass(frozen=True)
class Hospital:
    hospital: str
    name: str
    physician_count: int


def hospital_from(history: Iterable[Event]) -> Hospital | None:
    state: Hospital | None = None
    for event in history:
        if isinstance(event, HospitalRegistered):
            state = Hospital(event.hospital, event.name, event.physician_count)
    return state


def register_hospital(
    current: Hospital | None, hospital: str, cmd: RegisterHospital
) -> list[Event]:
    if current is not None:
        if (current.name, current.physician_count) == (cmd.name, cmd.physician_count):
            return []  # the same registration again: already done
        raise Rejected(
            ReasonCode.conflicting_duplicate,
            "hospital already registered with other values",
        )
    return [
        HospitalRegistered(hospital=hospital, name=cmd.name, physician_count=cmd.physician_count)
    ]


@dataclass(frozen=True)
class Department:
    hospital: str
    department: str
    physician_count: int
    launched_on: date
    closed_on: date | None = None

    @property
    def is_open(self) -> bool:
        return self.closed_on is None

    @property
    def status(self) -> Literal["active", "closed"]:
        return "active" if self.is_open else "closed"


def department_from(history: Iterable[Event]) -> Department | None:
    state: Department | None = None
    for event in history:
        if isinstance(event, DepartmentLaunched):
            state = Department(
                event.hospital,
                event.department,
                event.physician_count,
                event.launched_on,
            )
        elif isinstance(event, DepartmentClosed) and state is not None:
            state = replace(state, closed_on=event.closed_on)
    return state


def launch_department(
    hospital_state: Hospital | None,
    current: Department | None,
    hospital: str,
    cmd: LaunchDepartment,
    now: datetime,
) -> list[Event]:
    if hospital_state is None:
        raise Rejected(ReasonCode.unknown_hospital, "hospital is not registered")
    if current is not None:
        if not current.is_open:
            raise Rejected(ReasonCode.invalid_transition, "a closed department cannot relaunch")
        if (current.physician_count, current.launched_on) == (
            cmd.physician_count,
            cmd.launched_on,
        ):
            return []
        raise Rejected(
            ReasonCode.conflicting_duplicate,
            "department already launched with other values",
        )
    _reject_future(cmd.launched_on, "launched_on", now)
    return [
        DepartmentLaunched(
            hospital=hospital,
            department=cmd.department,
            physician_count=cmd.physician_count,
            launched_on=cmd.launched_on,
        )
    ]


def close_department(
    current: Department | None, hospital: str, cmd: CloseDepartment, now: datetime
) -> list[Event]:
    if current is None:
        raise Rejected(ReasonCode.unknown_department, "department is not launched")
    if not current.is_open:
        raise Rejected(ReasonCode.invalid_transition, "department is already closed")
    if cmd.closed_on < current.launched_on:
        raise Rejected(ReasonCode.invalid_payload, "closed_on: before the department launched")
    _reject_future(cmd.closed_on, "closed_on", now)
    return [DepartmentClosed(hospital=hospital, department=cmd.department, closed_on=cmd.closed_on)]


# --- the roster -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Supporter:
    hospital: str
    supporter_id: str
    department: str
    rank: Rank
    interventional: bool
    trained_on: date
    retired_on: date | None = None

    @property
    def is_active(self) -> bool:
        return self.retired_on is None

    @property
    def status(self) -> Literal["active", "retired"]:
        return "active" if self.is_active else "retired"


def supporter_from(history: Iterable[Event]) -> Supporter | None:
    state: Supporter | None = None
    for event in history:
        if isinstance(event, SupporterTrained):
            state = Supporter(
                event.hospital,
                event.supporter_id,
                event.department,
                event.rank,
                event.interventional,
                event.trained_on,
            )
        elif isinstance(event, SupporterRetired) and state is not None:
            state = replace(state, retired_on=event.retired_on)
    return state


def register_supporter(
    hospital_state: Hospital | None,
    department_state: Department | None,
    current: Supporter | None,
    hospital: str,
    cmd: RegisterSupporter,
    now: datetime,
) -> list[Event]:
    if hospital_state is None:
        raise Rejected(ReasonCode.unknown_hospital, "hospital is not registered")
    if current is not None:
        same = (
            current.department,
            current.rank,
            current.interventional,
            current.trained_on,
        )
        if same == (cmd.department, cmd.rank, cmd.interventional, cmd.trained_on):
            return []
        raise Rejected(
            ReasonCode.conflicting_duplicate,
            "supporter already registered with other values",
        )
    if department_state is None or not department_state.is_open:
        raise Rejected(ReasonCode.unknown_department, "department is not launched or is closed")
    _reject_future(cmd.trained_on, "trained_on", now)
    return [
        SupporterTrained(
            hospital=hospital,
            supporter_id=cmd.supporter_id,
            department=cmd.department,
            rank=cmd.rank,
            interventional=cmd.interventional,
            trained_on=cmd.trained_on,
        )
    ]


def retire_supporter(
    current: Supporter | None, hospital: str, cmd: RetireSupporter, now: datetime
) -> list[Event]:
    if current is None:
        raise Rejected(ReasonCode.unknown_supporter, "supporter is not registered")
    if not current.is_active:
        raise Rejected(ReasonCode.invalid_transition, "supporter is already retired")
    if cmd.retired_on < current.trained_on:
        raise Rejected(ReasonCode.invalid_payload, "retired_on: before the supporter trained")
    _reject_future(cmd.retired_on, "retired_on", now)
    return [
        SupporterRetired(
            hospital=hospital,
            supporter_id=cmd.supporter_id,
            retired_on=cmd.retired_on,
            department=current.department,
        )
    ]


@dataclass
class Roster:
    """Everything the registry and roster streams say, folded: what the read tables hold."""

    hospitals: dict[str, Hospital] = field(default_factory=dict)
    departments: dict[tuple[str, str], Department] = field(default_factory=dict)
    supporters: dict[tuple[str, str], Supporter] = field(default_factory=dict)
    # (hospital, referral_id) -> that referral's assignment stream, folded
    assignments: dict[tuple[str, str], AssignmentHistory] = field(default_factory=dict)


def roster_from(events: Iterable[Event]) -> Roster:
    """Fold any sequence of the service's events in commit order (a rebuild from scratch)."""
    roster = Roster()
    for event in events:
        if isinstance(event, HospitalRegistered):
            roster.hospitals[event.hospital] = Hospital(
                event.hospital, event.name, event.physician_count
            )
        elif isinstance(event, DepartmentLaunched):
            roster.departments[(event.hospital, event.department)] = Department(
                event.hospital,
                event.department,
                event.physician_count,
                event.launched_on,
            )
        elif isinstance(event, DepartmentClosed):
            key = (event.hospital, event.department)
            if key in roster.departments:
                roster.departments[key] = replace(
                    roster.departments[key], closed_on=event.closed_on
                )
        elif isinstance(event, SupporterTrained):
            roster.supporters[(event.hospital, event.supporter_id)] = Supporter(
                event.hospital,
                event.supporter_id,
                event.department,
                event.rank,
                event.interventional,
                event.trained_on,
            )
        elif isinstance(event, SupporterRetired):
            key2 = (event.hospital, event.supporter_id)
            if key2 in roster.supporters:
                roster.supporters[key2] = replace(
                    roster.supporters[key2], retired_on=event.retired_on
                )
        elif isinstance(event, SupporterAssigned | AssignmentOverdue | NoSupporterAvailable):
            key3 = (event.hospital, event.referral_id)
            before = roster.assignments.get(key3, AssignmentHistory())
            roster.assignments[key3] = _next_assignment(before, event)
    return roster


def physicians_per_supporter(physician_count: int, active_supporters: int) -> float | None:
    """Physicians per active supporter, 1 place, half up; None without supporters."""
    if active_supporters <= 0:
        return None
    ratio = Decimal(physician_count) / Decimal(active_supporters)
    return float(ratio.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def meets_ratio(ratio: float | None) -> bool:
    """The program's goal: at most 10 physicians per supporter (the shown, rounded figure)."""
    return ratio is not None and ratio <= RATIO_GOAL


# --- assignment -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferralToAssign:
    """What matching keeps of a `ReferralCreated` to choose (and re-choose) a supporter."""

    hospital: str
    referral_id: str
    department: str
    physician_id: str
    rank: Rank
    event_nature: EventNature
    requested_at: datetime
    referrer_id: str | None = None
    assign_to: str | None = None


@dataclass(frozen=True)
class Candidate:
    """A supporter of the referral's hospital, with their load at the time of choosing."""

    supporter_id: str
    department: str
    rank: Rank
    interventional: bool
    active: bool
    open_assignments: int
    # `requested_at` of every referral ever assigned to them; the domain applies the window.
    assigned_requested_at: tuple[datetime, ...] = ()


@dataclass(frozen=True)
class AssignmentHistory:
    """One referral's assignment stream, folded."""

    assigned: tuple[str, ...] = ()  # in order of assignment
    overdue: frozenset[str] = frozenset()
    current: str | None = None  # the latest assignment that has not gone overdue or been moved
    due_at: datetime | None = None
    waiting_reason: str | None = None  # set while the latest outcome is NoSupporterAvailable

    @property
    def tried(self) -> frozenset[str]:
        """Everyone who had the referral: they are skipped from now on."""
        return frozenset(self.assigned) | self.overdue

    @property
    def decided(self) -> bool:
        return bool(self.assigned) or self.waiting_reason is not None


def assignment_from(history: Iterable[Event]) -> AssignmentHistory:
    state = AssignmentHistory()
    for event in history:
        state = _next_assignment(state, event)
    return state


def _next_assignment(state: AssignmentHistory, event: Event) -> AssignmentHistory:
    if isinstance(event, SupporterAssigned):
        return replace(
            state,
            assigned=(*state.assigned, event.supporter_id),
            current=event.supporter_id,
            due_at=event.due_at,
            waiting_reason=None,
        )
    if isinstance(event, AssignmentOverdue):
        current = None if state.current == event.supporter_id else state.current
        return replace(state, overdue=state.overdue | {event.supporter_id}, current=current)
    if isinstance(event, NoSupporterAvailable):
        return replace(state, current=None, due_at=None, waiting_reason=event.reason)
    return state


@dataclass(frozen=True)
class Choice:
    """The outcome of matching: a supporter with a reason, or nobody with the reason why."""

    supporter_id: str | None
    reason: str
    # Why a lead's `assign_to` was not honoured (logged), None when it was or none was given.
    manual_refused: str | None = None


def recent_assignments(candidate: Candidate, requested_at: datetime) -> int:
    """Assignments whose referral was requested in the 365 days up to `requested_at`."""
    start = requested_at - RECENT_WINDOW
    return sum(1 for t in candidate.assigned_requested_at if start < t <= requested_at)


def _why_not(
    candidate: Candidate | None,
    referral: ReferralToAssign,
    department_open: bool,
    tried: frozenset[str],
) -> str | None:
    """The first rule a supporter fails for this referral, None when they are eligible."""
    if candidate is None:
        return "not_on_roster"
    if candidate.department != referral.department:
        return "not_in_department"
    if not department_open:
        return "department_closed"
    if not candidate.active:
        return "retired"
    if candidate.supporter_id == referral.physician_id:
        return "is_physician"
    if candidate.supporter_id == referral.referrer_id:
        return "is_referrer"
    if candidate.rank.level < referral.rank.level:
        return "rank"
    if referral.event_nature == "interventional" and not candidate.interventional:
        return "interventional"
    if candidate.supporter_id in tried:
        return "already_tried"
    return None


def choose_supporter(
    referral: ReferralToAssign,
    candidates: Sequence[Candidate],
    *,
    department_open: bool,
    tried: frozenset[str] = frozenset(),
    reassigning: bool = False,
) -> Choice:
    """Apply the contract's matching rules in order; deterministic whatever the list order.

    `tried` are the supporters who already had this referral (skipped). `reassigning` is set
    once the referral has been assigned before: the reason is then `reassigned` and a lead's
    `assign_to`, meant for the first match, no longer applies.
    """
    by_id = {c.supporter_id: c for c in candidates}
    refused: str | None = None
    if referral.assign_to is not None and not reassigning:
        lead_choice = by_id.get(referral.assign_to)
        refused = _why_not(lead_choice, referral, department_open, tried)
        if refused is None:
            return Choice(referral.assign_to, "manual")

    # Each stage narrows the set; the stage that empties it names the reason.
    stages: list[tuple[str, list[Candidate]]] = []
    pool = [
        c
        for c in by_id.values()
        if department_open and c.active and c.department == referral.department
    ]
    stages.append((NO_SUPPORTERS_IN_DEPARTMENT, pool))
    pool = [c for c in pool if c.supporter_id not in (referral.physician_id, referral.referrer_id)]
    stages.append((ALL_EXCLUDED_AS_PHYSICIAN_OR_REFERRER, pool))
    pool = [c for c in pool if c.rank.level >= referral.rank.level]
    stages.append((ALL_EXCLUDED_BY_RANK, pool))
    if referral.event_nature == "interventional":
        pool = [c for c in pool if c.interventional]
    stages.append((ALL_EXCLUDED_BY_INTERVENTIONAL, pool))
    pool = [c for c in pool if c.supporter_id not in tried]
    stages.append((ALL_ALREADY_TRIED, pool))
    for reason, remaining in stages:
        if not remaining:
            return Choice(None, reason, refused)

    best = min(
        pool,
        key=lambda c: (
            c.open_assignments,
            recent_assignments(c, referral.requested_at),
            c.supporter_id,
        ),
    )
    return Choice(best.supporter_id, "reassigned" if reassigning else "matched", refused)


def outcome_events(referral: ReferralToAssign, choice: Choice, now: datetime) -> list[Event]:
    """The event a choice records: `SupporterAssigned` due 48 h later, or `NoSupporterAvailable`."""
    if choice.supporter_id is None:
        return [
            NoSupporterAvailable(
                hospital=referral.hospital,
                referral_id=referral.referral_id,
                department=referral.department,
                reason=choice.reason,
            )
        ]
    return [
        SupporterAssigned(
            hospital=referral.hospital,
            referral_id=referral.referral_id,
            supporter_id=choice.supporter_id,
            department=referral.department,
            assigned_at=now,
            due_at=now + DUE_AFTER,
            reason=choice.reason,  # type: ignore[arg-type]
        )
    ]


def assign_referral(
    referral: ReferralToAssign,
    history: AssignmentHistory,
    candidates: Sequence[Candidate],
    *,
    department_open: bool,
    now: datetime,
) -> tuple[Choice, list[Event]]:
    """Match a referral (new, or waiting for a supporter): the choice and its event."""
    choice = choose_supporter(
        referral,
        candidates,
        department_open=department_open,
        tried=history.tried,
        reassigning=bool(history.assigned),
    )
    return choice, outcome_events(referral, choice, now)


def expire_assignment(
    referral: ReferralToAssign,
    history: AssignmentHistory,
    candidates: Sequence[Candidate],
    *,
    department_open: bool,
    now: datetime,
) -> tuple[Choice | None, list[Event]]:
    """The 48 hours passed without outreach: record it and hand over to the next best."""
    if history.current is None or history.due_at is None or history.due_at > now:
        return None, []  # nothing open and due (closed, already expired or moved)
    overdue = AssignmentOverdue(
        hospital=referral.hospital,
        referral_id=referral.referral_id,
        supporter_id=history.current,
        due_at=history.due_at,
    )
    choice = choose_supporter(
        referral,
        candidates,
        department_open=department_open,
        tried=history.tried | {history.current},
        reassigning=True,
    )
    return choice, [overdue, *outcome_events(referral, choice, now)]


def reassign_from_retired(
    referral: ReferralToAssign,
    history: AssignmentHistory,
    candidates: Sequence[Candidate],
    *,
    retired_supporter: str,
    department_open: bool,
    now: datetime,
) -> tuple[Choice | None, list[Event]]:
    """A retiring supporter's open referral goes to the next best (no overdue: not late)."""
    if history.current != retired_supporter:
        return None, []
    choice = choose_supporter(
        referral,
        candidates,
        department_open=department_open,
        tried=history.tried,
        reassigning=True,
    )
    return choice, outcome_events(referral, choice, now)
