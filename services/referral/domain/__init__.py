"""The Referral: intake rules and the status it follows through the other services' facts.

Pure: no I/O, no clock, no asyncio. What the handler looked up (the hospital, the department,
an open referral from the same safety event) and the time come in as arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum

from shared.contracts import (
    AssignmentOverdue,
    Event,
    InteractionCompleted,
    NoSupporterAvailable,
    OutreachAccepted,
    OutreachDeclined,
    OutreachUnreachable,
    ReasonCode,
    ReferralCreated,
    Rejected,
    RequestReferral,
    SupporterAssigned,
)
from shared.errors import NotYetKnown
from shared.registry import Department as Department  # as the service knows it

# Clocks of hospital systems drift; a little lead is not "the future".
FUTURE_TOLERANCE = timedelta(minutes=5)


def stream_id(hospital: str, referral_id: str) -> str:
    return f"referral:{hospital}:{referral_id}"


class Status(StrEnum):
    requested = "requested"
    assigned = "assigned"
    waiting_for_supporter = "waiting_for_supporter"
    overdue = "overdue"
    accepted = "accepted"
    declined = "declined"
    unreachable = "unreachable"
    in_support = "in_support"


# A referral in one of these no longer stops the same safety event from referring again.
CLOSED = frozenset({Status.declined, Status.unreachable})

_BEFORE_OUTCOME = frozenset(
    {Status.requested, Status.assigned, Status.waiting_for_supporter, Status.overdue}
)
_REACHABLE = frozenset({Status.assigned, Status.overdue, Status.unreachable})

# fact type -> (status it leads to, statuses it may come from)
TRANSITIONS: dict[type[Event], tuple[Status, frozenset[Status]]] = {
    SupporterAssigned: (Status.assigned, _BEFORE_OUTCOME),
    NoSupporterAvailable: (
        Status.waiting_for_supporter,
        frozenset({Status.requested, Status.waiting_for_supporter, Status.overdue}),
    ),
    AssignmentOverdue: (Status.overdue, frozenset({Status.assigned})),
    # unreachable is a failed attempt, not an answer: another attempt may still reach them.
    OutreachAccepted: (Status.accepted, _REACHABLE),
    OutreachDeclined: (Status.declined, _REACHABLE),
    OutreachUnreachable: (Status.unreachable, _REACHABLE),
    # An interaction implies acceptance (CONTRACT.md), so it may follow an assignment directly.
    InteractionCompleted: (Status.in_support, _REACHABLE | {Status.accepted, Status.in_support}),
}

FACT_TYPES: tuple[type[Event], ...] = tuple(TRANSITIONS)
Fact = (
    SupporterAssigned
    | NoSupporterAvailable
    | AssignmentOverdue
    | OutreachAccepted
    | OutreachDeclined
    | OutreachUnreachable
    | InteractionCompleted
)


@dataclass(frozen=True)
class Referral:
    """The current state of one referral, as the read table keeps it."""

    hospital: str
    referral_id: str
    status: Status = Status.requested
    supporter_id: str | None = None
    assignment_reason: str | None = None
    interactions: int = 0

    @property
    def is_open(self) -> bool:
        return self.status not in CLOSED

    def apply(self, fact: Event) -> Referral:
        """The referral after a fact of another service; `invalid_transition` if nonsense."""
        rule = TRANSITIONS.get(type(fact))
        if rule is None:
            raise Rejected(
                ReasonCode.invalid_transition, f"{fact.type_name} is not a referral fact"
            )
        target, allowed = rule
        if self.status not in allowed:
            raise Rejected(
                ReasonCode.invalid_transition,
                f"{fact.type_name} cannot follow status {self.status.value}",
            )
        if isinstance(fact, SupporterAssigned):
            return replace(
                self, status=target, supporter_id=fact.supporter_id, assignment_reason=fact.reason
            )
        if isinstance(fact, InteractionCompleted):
            return replace(self, status=target, interactions=self.interactions + 1)
        return replace(self, status=target)


def closing_date(fact: Event) -> date | None:
    """The business date a fact closes its referral on, for retention: an outreach's or an
    interaction's (a referral closes at its last one); None for any other fact."""
    if isinstance(fact, OutreachAccepted | OutreachDeclined | OutreachUnreachable):
        return fact.at.date()
    if isinstance(fact, InteractionCompleted):
        return fact.occurred_on
    return None


def follow(referral: Referral, facts: Sequence[Event]) -> Referral:
    for fact in facts:
        referral = referral.apply(fact)
    return referral


@dataclass(frozen=True)
class Intake:
    """What the handler found out before deciding on a `RequestReferral`."""

    hospital_registered: bool
    department: Department | None
    # The id of an open referral of the same physician from the same safety event, if any.
    open_safety_referral: str | None = None


def safety_event_key(cmd: RequestReferral) -> str:
    """What identifies "the same safety event": its id, else who reported it and when."""
    if cmd.safety_event_id is not None:
        return f"id:{cmd.safety_event_id}"
    return f"by:{cmd.referrer_id or ''}@{cmd.requested_at.astimezone(UTC).isoformat()}"


def _payload_of(created: ReferralCreated) -> dict[str, object]:
    data = created.model_dump()
    data.pop("hospital")
    return data


def request_referral(
    history: Sequence[Event],
    hospital: str,
    cmd: RequestReferral,
    intake: Intake,
    now: datetime,
) -> list[Event]:
    """Decide on a referral request: the events to append (none for a repeat), `Rejected`, or
    `NotYetKnown` while matching's facts about the hospital or department are on their way
    (a burst of onboarding commands: CONTRACT.md 1.1). A closing is final: it is `Rejected`."""
    created = next((e for e in history if isinstance(e, ReferralCreated)), None)
    if created is not None:
        # Checked first: a repeat must stay a repeat even if the department has closed since.
        if _payload_of(created) == cmd.model_dump():
            return []
        raise Rejected(
            ReasonCode.conflicting_duplicate,
            "referral_id is already used in this hospital with a different payload",
        )
    if not intake.hospital_registered:
        raise NotYetKnown("hospital is not registered", reason_code=ReasonCode.unknown_hospital)
    department = intake.department
    if department is None or not department.launched:
        raise NotYetKnown("department is not launched", reason_code=ReasonCode.unknown_department)
    if department.closed_at(cmd.requested_at):
        raise Rejected(ReasonCode.unknown_department, "department is closed")
    if cmd.requested_at > now + FUTURE_TOLERANCE:
        raise Rejected(ReasonCode.invalid_payload, "requested_at is in the future")
    if cmd.source == "safety_event" and intake.open_safety_referral is not None:
        raise Rejected(
            ReasonCode.already_referred,
            "physician already has an open referral from this safety event: "
            f"{intake.open_safety_referral}",
        )
    return [ReferralCreated(hospital=hospital, **cmd.model_dump())]
