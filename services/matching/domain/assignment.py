"""Who supports which referral: the matching rules, the policies and the 48-hour timer.

Pure: no I/O, no clock, no asyncio. `now` (processing time) comes in as an argument. Every
decision returns the contract events it records.

The rules, in order (CONTRACT.md): an active supporter in the departments the policy in force
allows; not the physician and not the referrer; rank at least the physician's; interventional
when the event was; not someone who already had the referral; available and below their cap
(version 1.1). The fewest open assignments, then the fewest in the last 365 days, then the
supporter_id, wins.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from shared.contracts import (
    AssignmentOverdue,
    AssignmentReason,
    Event,
    EventNature,
    MatchingPolicy,
    NoSupporterAvailable,
    Rank,
    ReferralCreated,
    SupporterAssigned,
)

DUE_AFTER = timedelta(hours=48)
RECENT_WINDOW = timedelta(days=365)

# `NoSupporterAvailable.reason`: the rule at which nobody was left. The first names the
# departments the policy allows.
NoSupporterReason = Literal[
    "no_supporters_in_department",
    "no_supporters_in_other_departments",
    "no_supporters_in_hospital",
    "all_excluded_as_physician_or_referrer",
    "all_excluded_by_rank",
    "all_excluded_by_interventional",
    "all_already_tried",
    "all_unavailable",
]
NO_SUPPORTERS_IN_DEPARTMENT: NoSupporterReason = "no_supporters_in_department"
NO_SUPPORTERS_IN_OTHER_DEPARTMENTS: NoSupporterReason = "no_supporters_in_other_departments"
NO_SUPPORTERS_IN_HOSPITAL: NoSupporterReason = "no_supporters_in_hospital"
ALL_EXCLUDED_AS_PHYSICIAN_OR_REFERRER: NoSupporterReason = "all_excluded_as_physician_or_referrer"
ALL_EXCLUDED_BY_RANK: NoSupporterReason = "all_excluded_by_rank"
ALL_EXCLUDED_BY_INTERVENTIONAL: NoSupporterReason = "all_excluded_by_interventional"
ALL_ALREADY_TRIED: NoSupporterReason = "all_already_tried"
# someone passes every other rule; all such are paused or full
ALL_UNAVAILABLE: NoSupporterReason = "all_unavailable"

_FIRST_RULE: dict[MatchingPolicy, NoSupporterReason] = {
    "same_department": NO_SUPPORTERS_IN_DEPARTMENT,
    "other_department": NO_SUPPORTERS_IN_OTHER_DEPARTMENTS,
    "same_then_other": NO_SUPPORTERS_IN_HOSPITAL,
}
_LATER_RULES = (
    ALL_EXCLUDED_AS_PHYSICIAN_OR_REFERRER,
    ALL_EXCLUDED_BY_RANK,
    ALL_EXCLUDED_BY_INTERVENTIONAL,
    ALL_ALREADY_TRIED,
    ALL_UNAVAILABLE,
)

# Where a policy looks, in order: `same_then_other` is `same_department`, and only when nobody
# there is eligible `other_department`.
_TIERS: dict[MatchingPolicy, tuple[MatchingPolicy, ...]] = {
    "same_department": ("same_department",),
    "other_department": ("other_department",),
    "same_then_other": ("same_department", "other_department"),
}


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

    @classmethod
    def of(cls, event: ReferralCreated) -> ReferralToAssign:
        """What matching keeps of the referral, from the fact itself (a new referral is
        matched from the event, not read back from the row just written)."""
        return cls(
            hospital=event.hospital,
            referral_id=event.referral_id,
            department=event.department,
            physician_id=event.physician_id,
            rank=event.rank,
            event_nature=event.event_nature,
            requested_at=event.requested_at,
            referrer_id=event.referrer_id,
            assign_to=event.assign_to,
        )


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
    # Their department is launched and not closed (for the referral's own department the
    # caller's `department_open` decides).
    department_open: bool = True
    available: bool = True
    max_open_assignments: int | None = None

    @property
    def free(self) -> bool:
        """Not paused and below their cap (an absent cap is no cap)."""
        cap = self.max_open_assignments
        return self.available and (cap is None or self.open_assignments < cap)


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
        state = next_assignment(state, event)
    return state


def next_assignment(state: AssignmentHistory, event: Event) -> AssignmentHistory:
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
    reason: AssignmentReason | NoSupporterReason
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
    policy: MatchingPolicy = "same_department",
) -> str | None:
    """The first rule a supporter fails for this referral, None when they pass them all: the
    one place the rules are written. (Under `same_then_other`, one who passes in another
    department still comes after the referral's department: see `eligible`.)"""
    if candidate is None:
        return "not_on_roster"
    in_department = candidate.department == referral.department
    if policy == "same_then_other":  # each supporter is judged in the tier of their department
        policy = "same_department" if in_department else "other_department"
    if policy == "same_department":
        if not in_department:
            return "not_in_department"
        if not department_open:
            return "department_closed"
    else:
        if in_department:
            return "in_referrals_department"
        if not candidate.department_open:
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
    if not candidate.available:
        return "paused"
    if not candidate.free:
        return "at_cap"
    return None


# How many of the rules, as `NoSupporterAvailable.reason` names them, a supporter passed, by
# the first one they fail.
_RULES_PASSED: dict[str | None, int] = {
    "not_in_department": 0,
    "in_referrals_department": 0,
    "department_closed": 0,
    "retired": 0,
    "is_physician": 1,
    "is_referrer": 1,
    "rank": 2,
    "interventional": 3,
    "already_tried": 4,
    "paused": 5,
    "at_cap": 5,
    None: 6,
}


def eligible(
    referral: ReferralToAssign,
    candidates: Iterable[Candidate],
    *,
    department_open: bool,
    tried: frozenset[str] = frozenset(),
    policy: MatchingPolicy = "same_department",
) -> list[Candidate]:
    """Everyone the policy in force lets matching choose from: under `same_then_other`, the
    referral's department's eligible supporters, or only when there are none the others'."""
    pool = list({c.supporter_id: c for c in candidates}.values())
    for tier in _TIERS[policy]:
        found = [c for c in pool if _why_not(c, referral, department_open, tried, tier) is None]
        if found:
            return found
    return []


def choose_supporter(
    referral: ReferralToAssign,
    candidates: Sequence[Candidate],
    *,
    department_open: bool,
    tried: frozenset[str] = frozenset(),
    reassigning: bool = False,
    policy: MatchingPolicy = "same_department",
) -> Choice:
    """Apply the matching rules under the policy in force; deterministic whatever the order.

    `department_open` is the referral's department's state. `tried` are the supporters who
    already had this referral (skipped). `reassigning` is set once the referral has been
    assigned before: the reason is then `reassigned` and a lead's `assign_to`, meant for the
    first match, no longer applies.
    """
    by_id = {c.supporter_id: c for c in candidates}
    pool = eligible(
        referral, by_id.values(), department_open=department_open, tried=tried, policy=policy
    )
    refused: str | None = None
    if referral.assign_to is not None and not reassigning:
        if any(c.supporter_id == referral.assign_to for c in pool):
            return Choice(referral.assign_to, "manual")
        lead_choice = by_id.get(referral.assign_to)
        refused = _why_not(lead_choice, referral, department_open, tried, policy)
        refused = refused or "department_has_eligible_supporters"

    if not pool:
        # The rule that emptied the set: the one after the most any supporter passed.
        passed = max(
            (
                _RULES_PASSED[_why_not(c, referral, department_open, tried, policy)]
                for c in by_id.values()
            ),
            default=0,
        )
        return Choice(None, (_FIRST_RULE[policy], *_LATER_RULES)[passed], refused)

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
    policy: MatchingPolicy = "same_department",
) -> tuple[Choice, list[Event]]:
    """Match a new referral: the choice and its event."""
    choice = choose_supporter(
        referral,
        candidates,
        department_open=department_open,
        tried=history.tried,
        reassigning=bool(history.assigned),
        policy=policy,
    )
    return choice, outcome_events(referral, choice, now)


def rematch(
    referral: ReferralToAssign,
    history: AssignmentHistory,
    candidates: Sequence[Candidate],
    *,
    leaving: str | None,
    department_open: bool,
    now: datetime,
    policy: MatchingPolicy = "same_department",
) -> tuple[Choice | None, list[Event]]:
    """Match a referral again, (None, []) when nothing changes.

    With `leaving` (a supporter retiring or pausing): their open referral goes to the next
    best (`reassigned`, no overdue: nobody was late), or waits. Without: a referral waiting
    for a supporter is assigned if someone is eligible now; still nobody records nothing new.
    """
    if leaving is not None:
        if history.current != leaving:
            return None, []
        choice = choose_supporter(
            referral,
            candidates,
            department_open=department_open,
            tried=history.tried,
            reassigning=True,
            policy=policy,
        )
        return choice, outcome_events(referral, choice, now)
    if history.waiting_reason is None:
        return None, []
    choice, events = assign_referral(
        referral, history, candidates, department_open=department_open, now=now, policy=policy
    )
    if choice.supporter_id is None:
        return None, []
    return choice, events


def expire_assignment(
    referral: ReferralToAssign,
    history: AssignmentHistory,
    candidates: Sequence[Candidate],
    *,
    department_open: bool,
    now: datetime,
    policy: MatchingPolicy = "same_department",
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
        policy=policy,
    )
    return choice, [overdue, *outcome_events(referral, choice, now)]
