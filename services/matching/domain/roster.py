"""The registry, the supporter roster and the matching policies: the facts matching decides on.

Pure: no I/O, no clock, no asyncio. Time comes in as arguments (`now` is processing time,
dates in payloads are business time). Every decision returns the contract events it records
or raises `Rejected`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal

from services.matching.domain.assignment import AssignmentHistory, next_assignment
from shared.contracts import (
    AssignmentOverdue,
    CloseDepartment,
    DepartmentClosed,
    DepartmentLaunched,
    Event,
    HospitalRegistered,
    LaunchDepartment,
    MatchingPolicy,
    MatchingPolicySet,
    NoSupporterAvailable,
    Rank,
    ReasonCode,
    RegisterHospital,
    RegisterSupporter,
    Rejected,
    RetireSupporter,
    SetMatchingPolicy,
    SetSupporterAvailability,
    SupporterAssigned,
    SupporterAvailabilityChanged,
    SupporterRetired,
    SupporterTrained,
)

# A date more than this far ahead of processing time is a typo, not a plan.
FUTURE_TOLERANCE = timedelta(days=1)
RATIO_GOAL = 10.0
# Nothing set means the rules of version 1 (CONTRACT.md, "Matching policy").
DEFAULT_POLICY: MatchingPolicy = "same_department"
HOSPITAL_WIDE = ""  # the department key of a hospital's own policy


# --- streams ----------------------------------------------------------------------------------


def hospital_stream(hospital: str) -> str:
    return f"hospital:{hospital}"


def department_stream(hospital: str, department: str) -> str:
    return f"department:{hospital}:{department}"


def supporter_stream(hospital: str, supporter_id: str) -> str:
    return f"supporter:{hospital}:{supporter_id}"


def assignment_stream(hospital: str, referral_id: str) -> str:
    return f"assignment:{hospital}:{referral_id}"


def policy_stream(hospital: str) -> str:
    return f"policy:{hospital}"


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
        state = _next_department(state, event)
    return state


def _next_department(state: Department | None, event: Event) -> Department | None:
    if isinstance(event, DepartmentLaunched):
        return Department(
            event.hospital, event.department, event.physician_count, event.launched_on
        )
    if isinstance(event, DepartmentClosed) and state is not None:
        return replace(state, closed_on=event.closed_on)
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
    # The latest SupporterAvailabilityChanged: each replaces the one before.
    available: bool = True
    max_open_assignments: int | None = None

    @property
    def is_active(self) -> bool:
        return self.retired_on is None

    @property
    def status(self) -> Literal["active", "retired"]:
        return "active" if self.is_active else "retired"


def supporter_from(history: Iterable[Event]) -> Supporter | None:
    state: Supporter | None = None
    for event in history:
        state = _next_supporter(state, event)
    return state


def _next_supporter(state: Supporter | None, event: Event) -> Supporter | None:
    if isinstance(event, SupporterTrained):
        return Supporter(
            event.hospital,
            event.supporter_id,
            event.department,
            event.rank,
            event.interventional,
            event.trained_on,
        )
    if state is None:
        return None
    if isinstance(event, SupporterRetired):
        return replace(state, retired_on=event.retired_on)
    if isinstance(event, SupporterAvailabilityChanged):
        return replace(
            state, available=event.available, max_open_assignments=event.max_open_assignments
        )
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


def _active(current: Supporter | None, day: date, name: str, now: datetime) -> Supporter:
    """The checks of a change to a trained supporter dated `day` (its field `name`)."""
    if current is None:
        raise Rejected(ReasonCode.unknown_supporter, "supporter is not registered")
    if not current.is_active:
        raise Rejected(ReasonCode.invalid_transition, "supporter is already retired")
    if day < current.trained_on:
        raise Rejected(ReasonCode.invalid_payload, f"{name}: before the supporter trained")
    _reject_future(day, name, now)
    return current


def retire_supporter(
    current: Supporter | None, hospital: str, cmd: RetireSupporter, now: datetime
) -> list[Event]:
    current = _active(current, cmd.retired_on, "retired_on", now)
    return [
        SupporterRetired(
            hospital=hospital,
            supporter_id=cmd.supporter_id,
            retired_on=cmd.retired_on,
            department=current.department,
        )
    ]


def set_supporter_availability(
    current: Supporter | None, hospital: str, cmd: SetSupporterAvailability, now: datetime
) -> list[Event]:
    """Pause, resume or cap a supporter; each change replaces the one before."""
    current = _active(current, cmd.changed_on, "changed_on", now)
    return [
        SupporterAvailabilityChanged(
            hospital=hospital,
            supporter_id=cmd.supporter_id,
            available=cmd.available,
            max_open_assignments=cmd.max_open_assignments,
            changed_on=cmd.changed_on,
            department=current.department,
        )
    ]


# --- matching policies ------------------------------------------------------------------------


def set_matching_policy(
    hospital_state: Hospital | None,
    department_state: Department | None,
    hospital: str,
    cmd: SetMatchingPolicy,
) -> list[Event]:
    """A hospital's policy, or a department's (which overrides it). A closed department may
    still have referrals waiting, so its policy can still be set."""
    if hospital_state is None:
        raise Rejected(ReasonCode.unknown_hospital, "hospital is not registered")
    if cmd.department is not None and department_state is None:
        raise Rejected(ReasonCode.unknown_department, "department was never launched")
    return [MatchingPolicySet(hospital=hospital, policy=cmd.policy, department=cmd.department)]


def policy_in_force(policies: Mapping[str, MatchingPolicy], department: str) -> MatchingPolicy:
    """The referral's department's policy, else its hospital's, else version 1's rules.
    `policies` maps a department (HOSPITAL_WIDE for the hospital) to the latest one set."""
    return policies.get(department) or policies.get(HOSPITAL_WIDE) or DEFAULT_POLICY


@dataclass
class Roster:
    """Everything the registry and roster streams say, folded: what the read tables hold."""

    hospitals: dict[str, Hospital] = field(default_factory=dict)
    departments: dict[tuple[str, str], Department] = field(default_factory=dict)
    supporters: dict[tuple[str, str], Supporter] = field(default_factory=dict)
    # (hospital, department or HOSPITAL_WIDE) -> the latest policy set
    policies: dict[tuple[str, str], MatchingPolicy] = field(default_factory=dict)
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
        elif isinstance(event, DepartmentLaunched | DepartmentClosed):
            key = (event.hospital, event.department)
            department = _next_department(roster.departments.get(key), event)
            if department is not None:
                roster.departments[key] = department
        elif isinstance(event, SupporterTrained | SupporterRetired | SupporterAvailabilityChanged):
            key2 = (event.hospital, event.supporter_id)
            supporter = _next_supporter(roster.supporters.get(key2), event)
            if supporter is not None:
                roster.supporters[key2] = supporter
        elif isinstance(event, MatchingPolicySet):
            roster.policies[(event.hospital, event.department or HOSPITAL_WIDE)] = event.policy
        elif isinstance(event, SupporterAssigned | AssignmentOverdue | NoSupporterAvailable):
            key3 = (event.hospital, event.referral_id)
            before = roster.assignments.get(key3, AssignmentHistory())
            roster.assignments[key3] = next_assignment(before, event)
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
