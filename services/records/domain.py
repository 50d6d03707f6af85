"""Records: outreach outcomes, de-identified interactions and survey responses.

Pure rules: no I/O, no clock. Time comes in as arguments (`now`, `today`); what the service has
learned from other services' events comes in as `Referral` / `Program` values. A refusal that
rests on those facts is `NotYetKnown`: the fact may be on its way (CONTRACT.md 1.1), so the
command waits for it; one that rests on the command or records' own streams is `Rejected`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from shared.contracts import (
    Event,
    InteractionCompleted,
    OutreachAccepted,
    OutreachDeclined,
    OutreachUnreachable,
    ReasonCode,
    RecordInteraction,
    RecordOutreach,
    Rejected,
    SubmitSurveyResponse,
    SurveyResponseRecorded,
)
from shared.errors import NotYetKnown

# Clocks of hospital systems drift; a little ahead of ours is not a record from the future.
CLOCK_SKEW = timedelta(minutes=5)

OutreachRecorded = OutreachAccepted | OutreachDeclined | OutreachUnreachable
_OUTREACH_EVENTS: dict[str, type[OutreachRecorded]] = {
    "accepted": OutreachAccepted,
    "declined": OutreachDeclined,
    "unreachable": OutreachUnreachable,
}


def outreach_stream(hospital: str, referral_id: str) -> str:
    return f"outreach:{hospital}:{referral_id}"


def survey_stream(hospital: str, response_id: str) -> str:
    return f"survey:{hospital}:{response_id}"


class AwaitingAssignment(NotYetKnown):
    """The referral or its assignment has not been seen yet: the command must wait for it."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, reason_code=ReasonCode.unknown_referral)


@dataclass(frozen=True)
class Referral:
    """What records learned of a referral from ReferralCreated and SupporterAssigned."""

    referral_id: str
    department: str
    supporter_id: str | None  # the currently assigned supporter; None before any assignment


@dataclass(frozen=True)
class OutreachHistory:
    """A referral's records so far, folded from its outreach stream."""

    last_outcome: str | None = None
    outreach_count: int = 0
    interaction_count: int = 0

    @property
    def declined(self) -> bool:
        return self.last_outcome == "declined"

    @property
    def engaged(self) -> bool:
        """Accepted, explicitly or by an interaction: the outreach is over, interactions go on."""
        return self.last_outcome == "accepted" or self.interaction_count > 0


def fold_outreach(history: Sequence[Event]) -> OutreachHistory:
    state = OutreachHistory()
    for event in history:
        if isinstance(event, OutreachAccepted | OutreachDeclined | OutreachUnreachable):
            state = OutreachHistory(
                last_outcome=event.outcome,
                outreach_count=state.outreach_count + 1,
                interaction_count=state.interaction_count,
            )
        elif isinstance(event, InteractionCompleted):
            state = OutreachHistory(
                last_outcome=state.last_outcome,
                outreach_count=state.outreach_count,
                interaction_count=state.interaction_count + 1,
            )
    return state


def assigned_supporter(referral: Referral | None, supporter_id: str) -> Referral:
    """The referral, if `supporter_id` is the one assigned to it now."""
    if referral is None:
        raise AwaitingAssignment("referral not known yet")
    if referral.supporter_id is None:
        raise AwaitingAssignment("referral has no assigned supporter yet")
    if referral.supporter_id != supporter_id:
        # A reassignment to this supporter may be on its way.
        raise NotYetKnown(
            "the supporter is not the one currently assigned to this referral",
            reason_code=ReasonCode.not_assigned_supporter,
        )
    return referral


def record_outreach(
    hospital: str,
    cmd: RecordOutreach,
    referral: Referral | None,
    history: Sequence[Event],
    now: datetime,
) -> list[Event]:
    """Accept an outreach outcome, or raise Rejected / NotYetKnown."""
    # Checks of the payload alone come first: waiting for an assignment cannot fix them.
    if cmd.decline_reason is not None and cmd.outcome != "declined":
        raise Rejected(ReasonCode.invalid_payload, "decline_reason is only for outcome declined")
    if cmd.at > now + CLOCK_SKEW:
        raise Rejected(ReasonCode.invalid_payload, "at is in the future")
    known = assigned_supporter(referral, cmd.supporter_id)
    state = fold_outreach(history)
    if state.declined:
        raise Rejected(ReasonCode.invalid_transition, "the referral was declined")
    if state.engaged:
        raise Rejected(ReasonCode.invalid_transition, "the referral was already accepted")
    event_type = _OUTREACH_EVENTS[cmd.outcome]
    return [event_type(**cmd.model_dump(), hospital=hospital, department=known.department)]


def record_interaction(
    hospital: str,
    cmd: RecordInteraction,
    referral: Referral | None,
    history: Sequence[Event],
    today: date,
) -> list[Event]:
    """Accept a completed interaction, or raise Rejected / NotYetKnown."""
    if cmd.occurred_on > today:
        raise Rejected(ReasonCode.invalid_payload, "occurred_on is in the future")
    known = assigned_supporter(referral, cmd.supporter_id)
    state = fold_outreach(history)
    if state.declined:
        raise Rejected(ReasonCode.invalid_transition, "the referral was declined")
    return [
        InteractionCompleted(
            hospital=hospital,
            referral_id=cmd.referral_id,
            supporter_id=cmd.supporter_id,
            occurred_on=cmd.occurred_on,
            minutes=cmd.minutes,
            escalated=bool(cmd.escalated),
            department=known.department,
            follow_up=state.interaction_count > 0,
            implied_acceptance=state.outreach_count == 0,
        )
    ]


@dataclass(frozen=True)
class Program:
    """Whether the hospital and the survey's department are known to the program."""

    hospital_registered: bool
    department_launched: bool  # launched at some time; a closed department still takes surveys


_INTERACTION_ONLY = ("helpful", "wellbeing_improved", "comfort_improved")


def submit_survey_response(
    hospital: str,
    cmd: SubmitSurveyResponse,
    program: Program,
    history: Sequence[Event],
    today: date,
) -> list[Event]:
    """Record a survey response once; the same response again is no news, a different one is
    refused. Raises Rejected, or NotYetKnown while the hospital or department is not known."""
    if cmd.submitted_on > today:
        raise Rejected(ReasonCode.invalid_payload, "submitted_on is in the future")
    if not cmd.had_interaction:
        given = [name for name in _INTERACTION_ONLY if getattr(cmd, name) is not None]
        if given:
            raise Rejected(
                ReasonCode.invalid_payload,
                f"{', '.join(given)} only apply when had_interaction is true",
            )
    if not program.hospital_registered:
        raise NotYetKnown("hospital is not registered", reason_code=ReasonCode.unknown_hospital)
    if not program.department_launched:
        raise NotYetKnown(
            "department was never launched", reason_code=ReasonCode.unknown_department
        )
    response = SurveyResponseRecorded(**cmd.model_dump(), hospital=hospital)
    recorded = [e for e in history if isinstance(e, SurveyResponseRecorded)]
    if recorded:
        if recorded[-1].model_dump() == response.model_dump():
            return []
        raise Rejected(
            ReasonCode.conflicting_duplicate,
            "response_id was already recorded with different answers",
        )
    return [response]
