"""The Referral's rules on the pure domain: no NATS, no PostgreSQL."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from services.referral import domain
from services.referral.domain import Department, Intake, Referral, Status
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
    parse_payload,
)
from shared.unit_of_work import NotYetKnown

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
HOSPITAL = "st-elsewhere"
OPEN = Intake(hospital_registered=True, department=Department(launched_on=date(2024, 1, 1)))


def command(**changes: Any) -> RequestReferral:
    data: dict[str, Any] = {
        "referral_id": "r-1",
        "physician_id": "p-1",
        "department": "emergency-medicine",
        "rank": "attending",
        "source": "self",
        "event_nature": "other",
        "requested_at": "2025-03-10T11:00:00Z",
    }
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not None}
    return parse_payload(RequestReferral, data)


def decide(
    cmd: RequestReferral, intake: Intake = OPEN, history: list[Event] | None = None
) -> list[Event]:
    return domain.request_referral(history or [], HOSPITAL, cmd, intake, NOW)


def rejection(
    cmd: RequestReferral, intake: Intake = OPEN, history: list[Event] | None = None
) -> Rejected:
    with pytest.raises(Rejected) as caught:
        decide(cmd, intake, history)
    return caught.value


def waiting(cmd: RequestReferral, intake: Intake) -> NotYetKnown:
    """Refused only for want of matching's facts: the command waits for them (CONTRACT 1.1)."""
    with pytest.raises(NotYetKnown) as caught:
        decide(cmd, intake)
    return caught.value


# --- intake ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["self", "third_party", "safety_event"])
def test_a_valid_request_creates_the_referral_with_the_payload_and_the_hospital(
    source: str,
) -> None:
    cmd = command(source=source, referrer_id="ref-9", assign_to="s-4")
    [created] = decide(cmd)
    assert isinstance(created, ReferralCreated)
    assert created.hospital == HOSPITAL
    assert created.model_dump(exclude={"hospital"}) == cmd.model_dump()
    assert created.requested_at == datetime(2025, 3, 10, 11, 0, tzinfo=UTC)


def test_times_are_normalised_to_utc() -> None:
    [created] = decide(command(requested_at="2025-03-10T13:00:00+02:00"))
    assert created.to_data()["requested_at"] == "2025-03-10T11:00:00Z"


def test_an_unregistered_hospital_is_unknown_and_waits() -> None:
    intake = Intake(hospital_registered=False, department=None)
    assert waiting(command(), intake).reason_code is ReasonCode.unknown_hospital


def test_the_hospital_is_checked_before_the_department() -> None:
    intake = Intake(hospital_registered=False, department=Department(date(2024, 1, 1)))
    assert waiting(command(), intake).reason_code is ReasonCode.unknown_hospital


def test_a_department_never_launched_is_unknown_and_waits() -> None:
    intake = Intake(hospital_registered=True, department=None)
    error = waiting(command(), intake)
    assert error.reason_code is ReasonCode.unknown_department
    assert "not launched" in error.detail


def test_a_department_closed_only_but_never_launched_is_unknown() -> None:
    intake = Intake(True, Department(launched_on=None, closed_on=date(2025, 1, 1)))
    assert "not launched" in waiting(command(), intake).detail


def test_a_closed_department_is_unknown_and_the_detail_says_closed() -> None:
    intake = Intake(True, Department(date(2024, 1, 1), closed_on=date(2025, 3, 1)))
    error = rejection(command(), intake)
    assert error.reason_code is ReasonCode.unknown_department
    assert "closed" in error.detail


def test_a_department_is_closed_from_the_start_of_its_closing_day_utc() -> None:
    intake = Intake(True, Department(date(2024, 1, 1), closed_on=date(2025, 3, 10)))
    assert rejection(command(requested_at="2025-03-10T00:00:00Z"), intake).reason_code is (
        ReasonCode.unknown_department
    )
    # A referral of before the closing (an import of history) is still welcome.
    [created] = decide(command(requested_at="2025-03-09T23:59:59Z"), intake)
    assert isinstance(created, ReferralCreated)


def test_requested_at_up_to_five_minutes_ahead_is_tolerated() -> None:
    [created] = decide(command(requested_at="2025-03-10T12:05:00Z"))
    assert isinstance(created, ReferralCreated)


def test_requested_at_more_than_five_minutes_ahead_is_in_the_future() -> None:
    error = rejection(command(requested_at="2025-03-10T12:05:01Z"))
    assert error.reason_code is ReasonCode.invalid_payload
    assert error.detail == "requested_at is in the future"


def test_the_department_is_checked_before_the_time() -> None:
    intake = Intake(hospital_registered=True, department=None)
    cmd = command(requested_at="2030-01-01T00:00:00Z")
    assert waiting(cmd, intake).reason_code is ReasonCode.unknown_department


def test_years_of_history_may_be_imported() -> None:
    [created] = decide(command(requested_at="2019-06-01T08:00:00Z"))
    assert isinstance(created, ReferralCreated)


def test_a_third_party_referrer_may_be_the_physician() -> None:
    [created] = decide(command(source="third_party", referrer_id="p-1"))
    assert isinstance(created, ReferralCreated)


def test_the_same_payload_again_is_a_repeat_and_appends_nothing() -> None:
    cmd = command(source="third_party", referrer_id="ref-1")
    history = decide(cmd)
    assert decide(cmd, history=history) == []


def test_a_repeat_in_another_time_zone_is_still_the_same_payload() -> None:
    history = decide(command())
    assert decide(command(requested_at="2025-03-10T12:00:00+01:00"), history=history) == []


def test_a_repeat_stays_a_repeat_after_the_department_closed() -> None:
    history = decide(command())
    closed = Intake(True, Department(date(2024, 1, 1), closed_on=date(2025, 3, 1)))
    assert decide(command(), closed, history) == []


@pytest.mark.parametrize(
    "changes",
    [
        {"physician_id": "p-2"},
        {"rank": "senior"},
        {"department": "anesthesia"},
        {"source": "third_party"},
        {"event_nature": "interventional"},
        {"requested_at": "2025-03-10T11:00:01Z"},
        {"referrer_id": "ref-1"},
        {"assign_to": "s-1"},
        {"safety_event_id": "se-1"},
    ],
)
def test_the_same_referral_id_with_another_payload_is_a_conflicting_duplicate(
    changes: dict[str, Any],
) -> None:
    history = decide(command())
    error = rejection(command(**changes), history=history)
    assert error.reason_code is ReasonCode.conflicting_duplicate
    # Rejection details never echo input values.
    for value in changes.values():
        assert value not in error.detail


def test_a_physician_with_an_open_referral_from_the_same_safety_event_is_not_referred_twice() -> (
    None
):
    intake = Intake(True, Department(date(2024, 1, 1)), open_safety_referral="r-0")
    error = rejection(command(referral_id="r-5", source="safety_event"), intake)
    assert error.reason_code is ReasonCode.already_referred
    assert "r-0" in error.detail


def test_an_open_referral_from_a_safety_event_does_not_block_other_sources() -> None:
    intake = Intake(True, Department(date(2024, 1, 1)), open_safety_referral="r-0")
    [created] = decide(command(referral_id="r-5", source="self"), intake)
    assert isinstance(created, ReferralCreated)


def test_the_same_safety_event_is_its_id_when_given() -> None:
    a = command(source="safety_event", safety_event_id="se-1", referrer_id="x")
    b = command(source="safety_event", safety_event_id="se-1", referrer_id="y")
    c = command(source="safety_event", safety_event_id="se-2", referrer_id="x")
    assert domain.safety_event_key(a) == domain.safety_event_key(b)
    assert domain.safety_event_key(a) != domain.safety_event_key(c)


def test_without_an_id_the_same_safety_event_is_the_same_referrer_and_time() -> None:
    a = command(source="safety_event", referrer_id="rep-1")
    b = command(source="safety_event", referrer_id="rep-1", requested_at="2025-03-10T12:00+01:00")
    c = command(source="safety_event", referrer_id="rep-2")
    d = command(source="safety_event", referrer_id="rep-1", requested_at="2025-03-10T11:00:01Z")
    assert domain.safety_event_key(a) == domain.safety_event_key(b)
    assert domain.safety_event_key(a) != domain.safety_event_key(c)
    assert domain.safety_event_key(a) != domain.safety_event_key(d)
    # An id and a (referrer, time) pair never collide.
    assert domain.safety_event_key(a) != domain.safety_event_key(
        command(source="safety_event", safety_event_id="rep-1")
    )


# --- the status it follows ------------------------------------------------------------------

AT = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)


def assigned(supporter: str = "s-1", reason: str = "matched") -> SupporterAssigned:
    return SupporterAssigned(
        hospital=HOSPITAL,
        referral_id="r-1",
        supporter_id=supporter,
        department="emergency-medicine",
        assigned_at=AT,
        due_at=AT + timedelta(hours=48),
        reason=reason,  # type: ignore[arg-type]
    )


def no_supporter() -> NoSupporterAvailable:
    return NoSupporterAvailable(
        hospital=HOSPITAL, referral_id="r-1", department="emergency-medicine", reason="none"
    )


def overdue() -> AssignmentOverdue:
    return AssignmentOverdue(
        hospital=HOSPITAL, referral_id="r-1", supporter_id="s-1", due_at=AT + timedelta(hours=48)
    )


def outreach(kind: type[OutreachAccepted | OutreachDeclined | OutreachUnreachable]) -> Event:
    return kind(
        hospital=HOSPITAL,
        referral_id="r-1",
        supporter_id="s-1",
        at=AT,
        department="emergency-medicine",
    )


def interaction() -> InteractionCompleted:
    return InteractionCompleted(
        hospital=HOSPITAL,
        referral_id="r-1",
        supporter_id="s-1",
        occurred_on=date(2025, 3, 11),
        minutes=30,
        department="emergency-medicine",
    )


def new() -> Referral:
    return Referral(HOSPITAL, "r-1")


def test_a_new_referral_is_requested_and_open() -> None:
    assert new().status is Status.requested
    assert new().is_open


def test_an_assignment_keeps_the_supporter_and_the_reason() -> None:
    referral = new().apply(assigned("s-7", "manual"))
    assert referral.status is Status.assigned
    assert referral.supporter_id == "s-7"
    assert referral.assignment_reason == "manual"


def test_the_life_of_a_referral_that_is_overdue_then_reassigned_then_supported() -> None:
    referral = domain.follow(
        new(),
        [
            no_supporter(),
            assigned("s-1"),
            overdue(),
            assigned("s-2", "reassigned"),
            outreach(OutreachAccepted),
            interaction(),
            interaction(),
        ],
    )
    assert referral.status is Status.in_support
    assert referral.supporter_id == "s-2"
    assert referral.assignment_reason == "reassigned"
    assert referral.interactions == 2


@pytest.mark.parametrize(
    ("facts", "status"),
    [
        ([no_supporter()], Status.waiting_for_supporter),
        ([assigned()], Status.assigned),
        ([assigned(), overdue()], Status.overdue),
        ([assigned(), overdue(), no_supporter()], Status.waiting_for_supporter),
        ([assigned(), outreach(OutreachAccepted)], Status.accepted),
        ([assigned(), outreach(OutreachDeclined)], Status.declined),
        ([assigned(), outreach(OutreachUnreachable)], Status.unreachable),
        ([assigned(), overdue(), outreach(OutreachAccepted)], Status.accepted),
        ([assigned(), outreach(OutreachUnreachable), outreach(OutreachAccepted)], Status.accepted),
        ([assigned(), interaction()], Status.in_support),
        ([assigned(), outreach(OutreachUnreachable), interaction()], Status.in_support),
    ],
)
def test_sensible_transitions(facts: list[Event], status: Status) -> None:
    assert domain.follow(new(), facts).status is status


def test_an_interaction_without_outreach_counts_as_acceptance_and_is_counted() -> None:
    referral = domain.follow(new(), [assigned(), interaction()])
    assert referral.status is Status.in_support
    assert referral.interactions == 1


@pytest.mark.parametrize(
    "facts",
    [
        [overdue()],
        [outreach(OutreachAccepted)],
        [outreach(OutreachDeclined)],
        [interaction()],
        [no_supporter(), interaction()],
        [no_supporter(), overdue()],
        [assigned(), no_supporter()],
        [assigned(), outreach(OutreachDeclined), outreach(OutreachAccepted)],
        [assigned(), outreach(OutreachDeclined), interaction()],
        [assigned(), outreach(OutreachDeclined), assigned("s-2")],
        [assigned(), outreach(OutreachAccepted), outreach(OutreachDeclined)],
        [assigned(), outreach(OutreachAccepted), assigned("s-2")],
        [assigned(), outreach(OutreachAccepted), overdue()],
        [assigned(), interaction(), outreach(OutreachAccepted)],
    ],
)
def test_nonsense_transitions_are_invalid(facts: list[Event]) -> None:
    with pytest.raises(Rejected) as caught:
        domain.follow(new(), facts)
    assert caught.value.reason_code is ReasonCode.invalid_transition


def test_a_refused_transition_leaves_the_referral_as_it_was() -> None:
    referral = domain.follow(new(), [assigned(), outreach(OutreachDeclined)])
    with pytest.raises(Rejected):
        referral.apply(interaction())
    assert referral.status is Status.declined
    assert referral.interactions == 0


def test_declined_and_unreachable_referrals_are_closed() -> None:
    assert not domain.follow(new(), [assigned(), outreach(OutreachDeclined)]).is_open
    assert not domain.follow(new(), [assigned(), outreach(OutreachUnreachable)]).is_open
    for status in set(Status) - domain.CLOSED:
        assert Referral(HOSPITAL, "r-1", status=status).is_open


def test_a_fact_that_is_not_about_referral_status_is_invalid() -> None:
    created = decide(command())[0]
    with pytest.raises(Rejected) as caught:
        new().apply(created)
    assert caught.value.reason_code is ReasonCode.invalid_transition


def test_the_stream_of_a_referral_is_per_hospital() -> None:
    assert domain.stream_id("a", "r-1") == "referral:a:r-1"
    assert domain.stream_id("a", "r-1") != domain.stream_id("b", "r-1")
