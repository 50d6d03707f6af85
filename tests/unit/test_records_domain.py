"""The records service's rules on the pure domain model: no NATS, no PostgreSQL."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.records import domain
from services.records.domain import AwaitingAssignment, Program, Referral
from shared.contracts import (
    Command,
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
    parse_payload,
)
from shared.unit_of_work import NotYetKnown

H = "general-hospital"
NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
TODAY = NOW.date()
REFERRAL = Referral(referral_id="r1", department="emergency-medicine", supporter_id="s1")


def outreach(outcome: str = "accepted", **changes: Any) -> RecordOutreach:
    fields: dict[str, Any] = {
        "referral_id": "r1",
        "supporter_id": "s1",
        "outcome": outcome,
        "at": NOW - timedelta(hours=3),
    }
    return RecordOutreach(**(fields | changes))


def interaction(**changes: Any) -> RecordInteraction:
    fields: dict[str, Any] = {
        "referral_id": "r1",
        "supporter_id": "s1",
        "occurred_on": TODAY - timedelta(days=1),
        "minutes": 30,
    }
    return RecordInteraction(**(fields | changes))


def survey(**changes: Any) -> SubmitSurveyResponse:
    fields: dict[str, Any] = {
        "response_id": "q1",
        "department": "emergency-medicine",
        "submitted_on": TODAY,
        "aware": True,
        "had_interaction": True,
        "helpful": 5,
        "wellbeing_improved": True,
    }
    return SubmitSurveyResponse(**(fields | changes))


def rejected(reason: ReasonCode, call: Any, *args: Any) -> Rejected:
    with pytest.raises(Rejected) as caught:
        call(*args)
    assert caught.value.reason_code == reason
    return caught.value


def waits(reason: ReasonCode, call: Any, *args: Any) -> NotYetKnown:
    """Refused only for want of other services' facts: the command waits (CONTRACT 1.1)."""
    with pytest.raises(NotYetKnown) as caught:
        call(*args)
    assert caught.value.reason_code == reason
    return caught.value


def recorded(*commands: RecordOutreach | RecordInteraction) -> list[Event]:
    """The outreach stream after recording these commands in order."""
    history: list[Event] = []
    for cmd in commands:
        if isinstance(cmd, RecordOutreach):
            history += domain.record_outreach(H, cmd, REFERRAL, history, NOW)
        else:
            history += domain.record_interaction(H, cmd, REFERRAL, history, TODAY)
    return history


# --- RecordOutreach -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "event_type"),
    [
        ("accepted", OutreachAccepted),
        ("declined", OutreachDeclined),
        ("unreachable", OutreachUnreachable),
    ],
)
def test_each_outcome_gives_its_event_with_the_referral_department(
    outcome: str, event_type: type[Event]
) -> None:
    cmd = outreach(outcome)
    [event] = domain.record_outreach(H, cmd, REFERRAL, [], NOW)
    assert type(event) is event_type
    assert event.to_data() == cmd.to_data() | {
        "hospital": H,
        "department": "emergency-medicine",
    }


def test_a_decline_keeps_its_reason() -> None:
    [event] = domain.record_outreach(
        H, outreach("declined", decline_reason="no_time"), REFERRAL, [], NOW
    )
    assert isinstance(event, OutreachDeclined)
    assert event.decline_reason == "no_time"


def test_a_decline_without_a_reason_is_recorded() -> None:
    [event] = domain.record_outreach(H, outreach("declined"), REFERRAL, [], NOW)
    assert isinstance(event, OutreachDeclined)
    assert event.decline_reason is None


@pytest.mark.parametrize("outcome", ["accepted", "unreachable"])
def test_a_decline_reason_with_another_outcome_is_invalid(outcome: str) -> None:
    cmd = outreach(outcome, decline_reason="privacy")
    err = rejected(ReasonCode.invalid_payload, domain.record_outreach, H, cmd, REFERRAL, [], NOW)
    assert "privacy" not in err.detail


def test_outreach_up_to_five_minutes_ahead_of_the_clock_is_accepted() -> None:
    cmd = outreach(at=NOW + timedelta(minutes=5))
    assert domain.record_outreach(H, cmd, REFERRAL, [], NOW)


def test_outreach_more_than_five_minutes_in_the_future_is_invalid() -> None:
    cmd = outreach(at=NOW + timedelta(minutes=5, seconds=1))
    rejected(ReasonCode.invalid_payload, domain.record_outreach, H, cmd, REFERRAL, [], NOW)


def test_outreach_from_years_ago_is_accepted() -> None:
    cmd = outreach(at=NOW - timedelta(days=3 * 365))
    assert domain.record_outreach(H, cmd, REFERRAL, [], NOW)


def test_outreach_for_an_unknown_referral_waits() -> None:
    with pytest.raises(AwaitingAssignment):
        domain.record_outreach(H, outreach(), None, [], NOW)


def test_outreach_for_a_referral_not_yet_assigned_waits() -> None:
    unassigned = Referral(referral_id="r1", department="emergency-medicine", supporter_id=None)
    with pytest.raises(AwaitingAssignment):
        domain.record_outreach(H, outreach(), unassigned, [], NOW)


def test_an_invalid_payload_is_refused_at_once_rather_than_waiting() -> None:
    cmd = outreach("accepted", decline_reason="other")
    rejected(ReasonCode.invalid_payload, domain.record_outreach, H, cmd, None, [], NOW)


def test_outreach_from_a_supporter_not_assigned_waits() -> None:
    cmd = outreach(supporter_id="s2")
    err = waits(
        ReasonCode.not_assigned_supporter,
        domain.record_outreach,
        H,
        cmd,
        REFERRAL,
        [],
        NOW,
    )
    assert "s2" not in err.detail and "s1" not in err.detail


def test_after_a_reassignment_only_the_new_supporter_may_record() -> None:
    reassigned = Referral(referral_id="r1", department="emergency-medicine", supporter_id="s2")
    waits(
        ReasonCode.not_assigned_supporter,
        domain.record_outreach,
        H,
        outreach(),
        reassigned,
        [],
        NOW,
    )
    assert domain.record_outreach(H, outreach(supporter_id="s2"), reassigned, [], NOW)


@pytest.mark.parametrize("outcome", ["accepted", "declined", "unreachable"])
def test_after_unreachable_any_outcome_is_allowed(outcome: str) -> None:
    history = recorded(outreach("unreachable"), outreach("unreachable"))
    [event] = domain.record_outreach(H, outreach(outcome), REFERRAL, history, NOW)
    assert event.to_data()["outcome"] == outcome


@pytest.mark.parametrize("outcome", ["accepted", "declined", "unreachable"])
def test_after_accepted_no_other_outcome_is_allowed(outcome: str) -> None:
    history = recorded(outreach("accepted"))
    rejected(
        ReasonCode.invalid_transition,
        domain.record_outreach,
        H,
        outreach(outcome),
        REFERRAL,
        history,
        NOW,
    )


@pytest.mark.parametrize("outcome", ["accepted", "declined", "unreachable"])
def test_after_declined_no_other_outcome_is_allowed(outcome: str) -> None:
    history = recorded(outreach("declined", decline_reason="no_need"))
    rejected(
        ReasonCode.invalid_transition,
        domain.record_outreach,
        H,
        outreach(outcome),
        REFERRAL,
        history,
        NOW,
    )


def test_the_same_outreach_again_is_judged_like_any_other() -> None:
    history = recorded(outreach("unreachable"))
    assert domain.record_outreach(H, outreach("unreachable"), REFERRAL, history, NOW)
    history = recorded(outreach("accepted"))
    rejected(
        ReasonCode.invalid_transition,
        domain.record_outreach,
        H,
        outreach("accepted"),
        REFERRAL,
        history,
        NOW,
    )


@pytest.mark.parametrize("outcome", ["accepted", "declined", "unreachable"])
def test_after_an_interaction_without_outreach_no_outcome_is_allowed(
    outcome: str,
) -> None:
    history = recorded(interaction())
    rejected(
        ReasonCode.invalid_transition,
        domain.record_outreach,
        H,
        outreach(outcome),
        REFERRAL,
        history,
        NOW,
    )


def test_after_unreachable_then_an_interaction_no_outcome_is_allowed() -> None:
    history = recorded(outreach("unreachable"), interaction())
    rejected(
        ReasonCode.invalid_transition,
        domain.record_outreach,
        H,
        outreach("accepted"),
        REFERRAL,
        history,
        NOW,
    )


def test_a_waiting_referral_is_checked_before_its_state() -> None:
    history = recorded(outreach("declined"))
    with pytest.raises(AwaitingAssignment):
        domain.record_outreach(H, outreach(), None, history, NOW)


# --- RecordInteraction ----------------------------------------------------------------------


def test_an_interaction_after_acceptance_is_recorded() -> None:
    history = recorded(outreach("accepted"))
    [event] = domain.record_interaction(H, interaction(minutes=45), REFERRAL, history, TODAY)
    assert isinstance(event, InteractionCompleted)
    assert event.model_dump() == {
        "hospital": H,
        "referral_id": "r1",
        "supporter_id": "s1",
        "occurred_on": TODAY - timedelta(days=1),
        "minutes": 45,
        "escalated": False,
        "department": "emergency-medicine",
        "follow_up": False,
        "implied_acceptance": False,
    }


@pytest.mark.parametrize(("given_", "normalised"), [(None, False), (False, False), (True, True)])
def test_escalated_is_normalised(given_: bool | None, normalised: bool) -> None:
    [event] = domain.record_interaction(H, interaction(escalated=given_), REFERRAL, [], TODAY)
    assert isinstance(event, InteractionCompleted)
    assert event.escalated is normalised


def test_later_interactions_are_follow_ups() -> None:
    history = recorded(outreach("accepted"), interaction(), interaction())
    flags = [e.follow_up for e in history if isinstance(e, InteractionCompleted)]
    assert flags == [False, True]


def test_an_interaction_without_outreach_implies_acceptance() -> None:
    [event] = domain.record_interaction(H, interaction(), REFERRAL, [], TODAY)
    assert isinstance(event, InteractionCompleted)
    assert event.implied_acceptance is True
    assert event.follow_up is False


def test_every_interaction_before_any_outreach_implies_acceptance() -> None:
    history = recorded(interaction(), interaction())
    assert [e.implied_acceptance for e in history if isinstance(e, InteractionCompleted)] == [
        True,
        True,
    ]


def test_an_interaction_after_unreachable_is_allowed_and_implies_nothing() -> None:
    history = recorded(outreach("unreachable"))
    [event] = domain.record_interaction(H, interaction(), REFERRAL, history, TODAY)
    assert isinstance(event, InteractionCompleted)
    assert event.implied_acceptance is False


def test_an_interaction_after_a_decline_is_refused() -> None:
    history = recorded(outreach("declined", decline_reason="discomfort"))
    rejected(
        ReasonCode.invalid_transition,
        domain.record_interaction,
        H,
        interaction(),
        REFERRAL,
        history,
        TODAY,
    )


def test_an_interaction_today_is_accepted() -> None:
    assert domain.record_interaction(H, interaction(occurred_on=TODAY), REFERRAL, [], TODAY)


def test_an_interaction_tomorrow_is_invalid() -> None:
    cmd = interaction(occurred_on=TODAY + timedelta(days=1))
    rejected(
        ReasonCode.invalid_payload,
        domain.record_interaction,
        H,
        cmd,
        REFERRAL,
        [],
        TODAY,
    )


def test_an_interaction_for_an_unknown_or_unassigned_referral_waits() -> None:
    with pytest.raises(AwaitingAssignment):
        domain.record_interaction(H, interaction(), None, [], TODAY)
    unassigned = Referral(referral_id="r1", department="anesthesia", supporter_id=None)
    with pytest.raises(AwaitingAssignment):
        domain.record_interaction(H, interaction(), unassigned, [], TODAY)


def test_an_interaction_from_a_supporter_not_assigned_waits() -> None:
    cmd = interaction(supporter_id="s9")
    waits(
        ReasonCode.not_assigned_supporter,
        domain.record_interaction,
        H,
        cmd,
        REFERRAL,
        [],
        TODAY,
    )


@pytest.mark.parametrize("minutes", [0, 601, -5])
def test_minutes_outside_1_to_600_are_invalid(minutes: int) -> None:
    body = interaction().to_data() | {"minutes": minutes}
    with pytest.raises(Rejected) as caught:
        parse_payload(RecordInteraction, body)
    assert caught.value.reason_code == ReasonCode.invalid_payload


@pytest.mark.parametrize("extra", ["notes", "physician_name", "email"])
@pytest.mark.parametrize(
    ("model", "body"),
    [
        (RecordOutreach, outreach().to_data()),
        (RecordInteraction, interaction().to_data()),
        (SubmitSurveyResponse, survey().to_data()),
    ],
)
def test_an_extra_field_is_refused_without_echoing_it(
    extra: str, model: type[Command], body: dict[str, Any]
) -> None:
    secret = "Dr Jane Roe felt awful after the case"
    with pytest.raises(Rejected) as caught:
        parse_payload(model, body | {extra: secret})
    assert caught.value.reason_code == ReasonCode.unknown_field
    assert secret not in caught.value.detail


# --- the outreach state machine as a whole ---------------------------------------------------

_step = st.one_of(
    st.sampled_from(["accepted", "declined", "unreachable"]).map(lambda o: ("outreach", o)),
    st.just(("interaction", "")),
)


@given(st.lists(_step, max_size=8))
def test_any_sequence_obeys_the_state_machine(steps: list[tuple[str, str]]) -> None:
    history: list[Event] = []
    for kind, outcome in steps:
        state = domain.fold_outreach(history)
        try:
            if kind == "outreach":
                history += domain.record_outreach(H, outreach(outcome), REFERRAL, history, NOW)
            else:
                history += domain.record_interaction(H, interaction(), REFERRAL, history, TODAY)
        except Rejected as err:
            assert err.reason_code == ReasonCode.invalid_transition
            assert state.declined or (kind == "outreach" and state.engaged)
        else:
            assert not state.declined
            assert kind == "interaction" or not state.engaged
    outcomes = [e.to_data()["outcome"] for e in history if "outcome" in e.to_data()]
    # At most one accepted or declined outcome, and nothing is recorded after a decline.
    assert sum(o in ("accepted", "declined") for o in outcomes) <= 1
    if any(isinstance(e, OutreachDeclined) for e in history):
        assert isinstance(history[-1], OutreachDeclined)


# --- SubmitSurveyResponse -------------------------------------------------------------------

KNOWN = Program(hospital_registered=True, department_launched=True)


def test_a_survey_response_is_recorded_with_its_hospital() -> None:
    cmd = survey(would_recommend=True, satisfaction=4)
    [event] = domain.submit_survey_response(H, cmd, KNOWN, [], TODAY)
    assert isinstance(event, SurveyResponseRecorded)
    assert event.to_data() == cmd.to_data() | {"hospital": H}


def test_a_survey_for_an_unknown_hospital_waits() -> None:
    program = Program(hospital_registered=False, department_launched=False)
    waits(
        ReasonCode.unknown_hospital,
        domain.submit_survey_response,
        H,
        survey(),
        program,
        [],
        TODAY,
    )


def test_a_survey_for_a_department_never_launched_waits() -> None:
    program = Program(hospital_registered=True, department_launched=False)
    waits(
        ReasonCode.unknown_department,
        domain.submit_survey_response,
        H,
        survey(),
        program,
        [],
        TODAY,
    )


def test_a_survey_submitted_in_the_future_is_invalid() -> None:
    cmd = survey(submitted_on=TODAY + timedelta(days=1))
    rejected(
        ReasonCode.invalid_payload,
        domain.submit_survey_response,
        H,
        cmd,
        KNOWN,
        [],
        TODAY,
    )


@pytest.mark.parametrize(
    "answer",
    [{"helpful": 3}, {"wellbeing_improved": False}, {"comfort_improved": True}],
)
def test_interaction_answers_without_an_interaction_are_invalid(
    answer: dict[str, Any],
) -> None:
    cmd = survey(
        **({"had_interaction": False, "helpful": None, "wellbeing_improved": None} | answer)
    )
    rejected(
        ReasonCode.invalid_payload,
        domain.submit_survey_response,
        H,
        cmd,
        KNOWN,
        [],
        TODAY,
    )


def test_a_survey_without_an_interaction_may_still_recommend_and_rate() -> None:
    cmd = survey(
        had_interaction=False,
        helpful=None,
        wellbeing_improved=None,
        would_recommend=True,
        satisfaction=2,
    )
    assert domain.submit_survey_response(H, cmd, KNOWN, [], TODAY)


def test_the_same_response_again_records_nothing() -> None:
    history = domain.submit_survey_response(H, survey(), KNOWN, [], TODAY)
    assert domain.submit_survey_response(H, survey(), KNOWN, history, TODAY) == []


def test_the_same_response_id_with_other_answers_is_a_conflicting_duplicate() -> None:
    history = domain.submit_survey_response(H, survey(), KNOWN, [], TODAY)
    cmd = survey(helpful=2)
    err = rejected(
        ReasonCode.conflicting_duplicate,
        domain.submit_survey_response,
        H,
        cmd,
        KNOWN,
        history,
        TODAY,
    )
    assert "q1" not in err.detail


def test_survey_payload_checks_come_before_program_checks() -> None:
    program = Program(hospital_registered=False, department_launched=False)
    cmd = survey(submitted_on=date(2999, 1, 1))
    rejected(
        ReasonCode.invalid_payload,
        domain.submit_survey_response,
        H,
        cmd,
        program,
        [],
        TODAY,
    )


def test_stream_names_carry_the_hospital() -> None:
    assert domain.outreach_stream(H, "r1") == "outreach:general-hospital:r1"
    assert domain.survey_stream("other", "r1") == "survey:other:r1"
