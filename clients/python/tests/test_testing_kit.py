"""The package's FastStream integration, offline on TestNatsBroker: typed handlers (live and
durable), typed publishers with the CloudEvents envelope and ids, answers as awaitables."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from post_client import (
    CommandRefused,
    Envelope,
    Hospital,
    NoSupporterAvailable,
    Rank,
    ReasonCode,
    ReferralCreated,
    RegisterHospital,
    RequestReferral,
    SupporterAssigned,
    SupporterTrained,
    idempotent_id,
)
from post_client.testing import hospital_under_test, refuse_with

H = "st-marys"
AT = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


def referral(referral_id: str = "r-1") -> RequestReferral:
    return RequestReferral(
        referral_id=referral_id,
        physician_id="p-1",
        department="emergency-medicine",
        rank=Rank.attending,
        source="self",
        event_nature="other",
        requested_at=AT,
    )


def created(cmd: RequestReferral) -> ReferralCreated:
    return ReferralCreated(hospital=H, **cmd.model_dump())


def assigned(referral_id: str = "r-1") -> SupporterAssigned:
    return SupporterAssigned(
        hospital=H,
        referral_id=referral_id,
        supporter_id="s-1",
        department="emergency-medicine",
        assigned_at=AT,
        due_at=AT + timedelta(hours=48),
        reason="matched",
    )


async def test_a_command_is_a_cloudevent_with_its_id_as_nats_msg_id() -> None:
    hospital = Hospital(H)
    async with hospital_under_test(hospital) as platform:
        sent = await hospital.send(referral(), id="cmd-1")
        assert sent.id == "cmd-1"
        [ce] = platform.envelopes()
        assert (ce.specversion, ce.id, ce.type) == ("1.0", "cmd-1", "RequestReferral")
        assert ce.source == f"/hospitals/{H}/system"
        assert ce.datacontenttype == "application/json"
        assert platform.commands(RequestReferral) == [referral()]


async def test_a_publisher_takes_only_its_own_command_type() -> None:
    hospital = Hospital(H)
    async with hospital_under_test(hospital):
        with pytest.raises(TypeError):
            await hospital.publisher(RequestReferral).publish(
                RegisterHospital(name="St Mary's", physician_count=10)  # type: ignore[arg-type]
            )


async def test_the_answer_and_what_follows_are_awaitable() -> None:
    hospital = Hospital(H)
    async with hospital_under_test(hospital) as platform:
        platform.answer_with(RequestReferral, lambda cmd: [created(cmd), assigned()])
        sent = await hospital.send(referral())
        answer = await sent
        assert isinstance(answer, ReferralCreated) and answer.referral_id == "r-1"
        then = await sent.followed_by(SupporterAssigned, NoSupporterAvailable, timeout=5)
        assert then == assigned()


async def test_a_refusal_raises_with_its_reason_code() -> None:
    hospital = Hospital(H)
    async with hospital_under_test(hospital) as platform:
        platform.answer_with(RequestReferral, refuse_with(H, ReasonCode.unknown_department))
        sent = await hospital.send(referral())
        with pytest.raises(CommandRefused) as refused:
            await sent.answer(timeout=5)
        assert refused.value.reason_code == ReasonCode.unknown_department
        assert refused.value.rejected.command_id == sent.id
        with pytest.raises(CommandRefused):
            await sent.followed_by(SupporterAssigned, timeout=5)


async def test_an_unanswered_command_times_out() -> None:
    hospital = Hospital(H)
    async with hospital_under_test(hospital):
        sent = await hospital.send(referral())
        with pytest.raises(TimeoutError):
            await sent.answer(timeout=0.2)


async def test_handlers_take_typed_events_live_and_durable() -> None:
    hospital = Hospital(H)
    live: list[SupporterAssigned] = []
    durable: list[tuple[SupporterAssigned, str]] = []
    trained: list[SupporterTrained] = []

    @hospital.on(SupporterAssigned)
    async def tell_live(event: SupporterAssigned) -> None:
        live.append(event)

    @hospital.durable(SupporterAssigned)
    async def tell(event: SupporterAssigned, envelope: Envelope) -> None:
        durable.append((event, envelope.id))

    @hospital.durable(SupporterTrained)
    async def note(event: SupporterTrained) -> None:
        trained.append(event)

    async with hospital_under_test(hospital) as platform:
        event_id = await platform.deliver(assigned(), id="evt-1")
        # an event no handler takes is acknowledged, not an error
        await platform.deliver(
            NoSupporterAvailable(
                hospital=H, referral_id="r-2", department="anesthesia", reason="none_eligible"
            )
        )
    assert live == [assigned()]
    assert durable == [(assigned(), event_id)] and event_id == "evt-1"
    assert trained == []


async def test_idempotent_ids_are_stable_and_distinct() -> None:
    assert idempotent_id(H, "referral", "r-1") == idempotent_id(H, "referral", "r-1")
    assert idempotent_id(H, "referral", "r-1") != idempotent_id(H, "referral", "r-2")
    assert idempotent_id(H, "referral", "r-1") != idempotent_id("other", "referral", "r-1")
    assert Hospital(H).idempotent_id("x") == idempotent_id(H, "x")


def test_a_hospital_id_is_a_slug() -> None:
    with pytest.raises(ValueError):
        Hospital("St Mary's")


def test_models_are_strict_and_typed() -> None:
    with pytest.raises(ValueError):
        RequestReferral(**{**referral().model_dump(), "note": "free text"})
    assert referral().requested_at == AT
    assert isinstance(date(2026, 1, 1), date)


def test_an_event_with_fields_added_later_still_decodes() -> None:
    from post_client import decode_event
    from post_client.contracts import encode, make_cloudevent

    data = {**assigned().to_data(), "added_in_a_later_version": 1}
    body = encode(make_cloudevent(type_="SupporterAssigned", source="/hospitals/x/p", data=data))
    envelope, event = decode_event(body)
    assert event == assigned() and envelope.type == "SupporterAssigned"
    unknown = encode(make_cloudevent(type_="SomethingNew", source="/hospitals/x/p", data={}))
    assert decode_event(unknown)[1] is None


async def test_a_failing_durable_handler_fails_the_test_that_delivers_to_it() -> None:
    hospital = Hospital(H)

    @hospital.durable(SupporterAssigned)
    async def tell(event: SupporterAssigned) -> None:
        raise RuntimeError("paging system down")

    async with hospital_under_test(hospital) as platform:
        with pytest.raises(RuntimeError, match="paging system down"):
            await platform.deliver(assigned())
