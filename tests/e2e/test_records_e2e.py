"""Records end to end: commands through NATS (and HTTP), the four running services, the contract.

Every test opens its own hospital, so the shared stack carries no state from one to the next.
The records clock is never moved here: a command waiting for its assignment is judged against
the time it was stored, and a moved clock would cut that wait short for every later test.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

from shared.client import CloudEventDict, PlatformClient
from shared.contracts import (
    Command,
    LaunchDepartment,
    Outcome,
    Rank,
    RecordInteraction,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    SubmitSurveyResponse,
    encode,
    make_cloudevent,
)

pytestmark = pytest.mark.e2e

TODAY = datetime.now(UTC).date()
DEPARTMENT = "emergency-medicine"


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# A refusal of another service's fact waits for it (stack: 6 s, then ~6.2 s to the answer).
WAITED = 30.0


async def expect(
    client: PlatformClient, hospital: str, command: Command, type_: str, timeout: float = 10.0
) -> Any:
    answer = await client.send_and_wait(hospital, command, timeout=timeout)
    assert answer["type"] == type_, answer["data"]
    return answer["data"]


async def refused(
    client: PlatformClient, hospital: str, command: Command, timeout: float = 10.0
) -> str:
    data = await expect(client, hospital, command, "CommandRejected", timeout)
    assert data["command_type"] == command.type_name
    return str(data["reason_code"])


async def open_program(
    client: PlatformClient, hospital: str, supporters: Sequence[str] = ("s-1",)
) -> None:
    """A registered hospital with one launched department and these trained supporters."""
    register = RegisterHospital(name="Test hospital", physician_count=300)
    await expect(client, hospital, register, "HospitalRegistered")
    launch = LaunchDepartment(
        department=DEPARTMENT, physician_count=40, launched_on=date(2024, 1, 1)
    )
    await expect(client, hospital, launch, "DepartmentLaunched")
    for supporter_id in supporters:
        await train(client, hospital, supporter_id)


async def train(client: PlatformClient, hospital: str, supporter_id: str) -> None:
    command = RegisterSupporter(
        supporter_id=supporter_id,
        department=DEPARTMENT,
        rank=Rank.senior,
        interventional=True,
        trained_on=date(2024, 2, 1),
    )
    await expect(client, hospital, command, "SupporterTrained")


def referral(referral_id: str) -> RequestReferral:
    return RequestReferral(
        referral_id=referral_id,
        physician_id=_id("p"),
        department=DEPARTMENT,
        rank=Rank.resident,
        source="safety_event",
        event_nature="other",
        requested_at=datetime.now(UTC) - timedelta(hours=2),
        referrer_id="ref-1",
    )


def of_referral(referral_id: str) -> Callable[[CloudEventDict], bool]:
    return lambda e: e["data"].get("referral_id") == referral_id


async def assigned_referral(client: PlatformClient, hospital: str) -> tuple[str, str]:
    """A new referral and the supporter matching assigned it to."""
    referral_id = _id("r")
    await client.send(hospital, referral(referral_id))
    assigned = await client.wait_for(hospital, "SupporterAssigned", of_referral(referral_id))
    return referral_id, assigned["data"]["supporter_id"]


def outreach(referral_id: str, supporter_id: str, outcome: Outcome, **more: Any) -> RecordOutreach:
    at = datetime.now(UTC) - timedelta(minutes=30)
    return RecordOutreach(
        referral_id=referral_id, supporter_id=supporter_id, outcome=outcome, at=at, **more
    )


def interaction(referral_id: str, supporter_id: str, **more: Any) -> RecordInteraction:
    fields: dict[str, Any] = {"occurred_on": TODAY, "minutes": 45} | more
    return RecordInteraction(referral_id=referral_id, supporter_id=supporter_id, **fields)


def survey(response_id: str, **more: Any) -> SubmitSurveyResponse:
    fields: dict[str, Any] = {
        "department": DEPARTMENT,
        "submitted_on": TODAY,
        "aware": True,
        "had_interaction": True,
        "helpful": 4,
        "wellbeing_improved": True,
        "would_recommend": True,
    } | more
    return SubmitSurveyResponse(response_id=response_id, **fields)


async def test_accepted_outreach_then_two_interactions(
    client: PlatformClient, hospital: str
) -> None:
    await open_program(client, hospital)
    referral_id, supporter_id = await assigned_referral(client, hospital)

    accepted = await expect(
        client, hospital, outreach(referral_id, supporter_id, "accepted"), "OutreachAccepted"
    )
    assert accepted["department"] == DEPARTMENT and accepted["hospital"] == hospital
    first = await expect(
        client, hospital, interaction(referral_id, supporter_id), "InteractionCompleted"
    )
    second = await expect(
        client,
        hospital,
        interaction(referral_id, supporter_id, minutes=20, escalated=True),
        "InteractionCompleted",
    )
    assert (first["follow_up"], first["implied_acceptance"], first["escalated"]) == (
        False,
        False,
        False,
    )
    assert (second["follow_up"], second["minutes"], second["escalated"]) == (True, 20, True)
    assert len(client.of_type(hospital, "OutreachAccepted")) == 1
    assert len(client.of_type(hospital, "InteractionCompleted")) == 2


async def test_a_decline_is_recorded_and_nothing_after_it(
    client: PlatformClient, hospital: str
) -> None:
    await open_program(client, hospital)
    referral_id, supporter_id = await assigned_referral(client, hospital)

    declined = await expect(
        client,
        hospital,
        outreach(referral_id, supporter_id, "declined", decline_reason="no_time"),
        "OutreachDeclined",
    )
    assert declined["decline_reason"] == "no_time" and declined["outcome"] == "declined"
    later = outreach(referral_id, supporter_id, "accepted")
    assert await refused(client, hospital, later) == "invalid_transition"
    talk = interaction(referral_id, supporter_id)
    assert await refused(client, hospital, talk) == "invalid_transition"


async def test_an_interaction_without_outreach_implies_acceptance(
    client: PlatformClient, hospital: str
) -> None:
    await open_program(client, hospital)
    referral_id, supporter_id = await assigned_referral(client, hospital)

    talk = interaction(referral_id, supporter_id, occurred_on=TODAY - timedelta(days=1))
    completed = await expect(client, hospital, talk, "InteractionCompleted")
    assert completed["implied_acceptance"] is True and completed["follow_up"] is False
    late = outreach(referral_id, supporter_id, "accepted")
    assert await refused(client, hospital, late) == "invalid_transition"


async def test_an_outreach_sent_before_its_assignment_waits_for_it(
    client: PlatformClient, hospital: str
) -> None:
    await open_program(client, hospital, supporters=())
    referral_id = _id("r")
    await client.send(hospital, referral(referral_id))
    # No supporter yet: the referral waits, and so does the outreach sent for it.
    await client.wait_for(hospital, "NoSupporterAvailable", of_referral(referral_id))
    command_id = await client.send(hospital, outreach(referral_id, "s-late", "accepted"))
    await asyncio.sleep(1.0)
    assert client.caused_by(command_id) == []

    await train(client, hospital, "s-late")
    await client.wait_for(hospital, "SupporterAssigned", of_referral(referral_id))
    answer = await client.outcome(command_id, timeout=20)
    assert answer["type"] == "OutreachAccepted", answer["data"]
    assert answer["data"]["supporter_id"] == "s-late"


async def test_records_from_a_supporter_not_assigned_are_refused(
    client: PlatformClient, hospital: str
) -> None:
    await open_program(client, hospital, supporters=("s-1", "s-2"))
    referral_id, supporter_id = await assigned_referral(client, hospital)
    other = "s-2" if supporter_id == "s-1" else "s-1"

    # Each waits for a reassignment to `other` that never comes (CONTRACT.md 1.1).
    assert await refused(client, hospital, outreach(referral_id, other, "accepted"), WAITED) == (
        "not_assigned_supporter"
    )
    assert await refused(client, hospital, interaction(referral_id, other), WAITED) == (
        "not_assigned_supporter"
    )
    assert not client.of_type(hospital, "OutreachAccepted")
    assert not client.of_type(hospital, "InteractionCompleted")


async def test_a_survey_response_sent_twice_is_recorded_once(
    client: PlatformClient, hospital: str
) -> None:
    await open_program(client, hospital, supporters=())
    response_id = _id("q")
    command = survey(response_id)
    command_id = await client.send(hospital, command)
    recorded = await client.outcome(command_id)
    assert recorded["type"] == "SurveyResponseRecorded"
    assert recorded["data"] == command.to_data() | {"hospital": hospital}

    await client.send(hospital, command, id_=command_id)  # the same command again
    again_id = await client.send(hospital, command)  # the same answers under a new command id
    conflicting = survey(response_id, helpful=1)
    assert await refused(client, hospital, conflicting) == "conflicting_duplicate"
    # Commands are handled in order: once the last is answered, the repeats were handled.
    assert len(client.caused_by(command_id)) == 1  # the same command: processed once
    again = client.caused_by(again_id)  # the same answers: answered with the recorded fact
    assert [e["data"] for e in again] == [recorded["data"]]


async def test_survey_refusals(client: PlatformClient, hospital: str) -> None:
    # Each waits for the registration or launch that never comes (CONTRACT.md 1.1).
    assert await refused(client, hospital, survey(_id("q")), WAITED) == "unknown_hospital"
    await open_program(client, hospital, supporters=())
    elsewhere = survey(_id("q"), department="nowhere")
    assert await refused(client, hospital, elsewhere, WAITED) == "unknown_department"
    inconsistent = survey(_id("q"), had_interaction=False)
    assert await refused(client, hospital, inconsistent) == "invalid_payload"


async def test_an_extra_field_is_refused_and_nothing_is_stored(
    client: PlatformClient, hospital: str
) -> None:
    await open_program(client, hospital)
    referral_id, supporter_id = await assigned_referral(client, hospital)
    body = interaction(referral_id, supporter_id).to_data() | {"notes": "Dr Roe cried"}
    ce_id = _id("c")
    ce = make_cloudevent(
        type_="RecordInteraction", source=f"/hospitals/{hospital}/tool", data=body, id_=ce_id
    )
    await client.send_raw(f"post.{hospital}.cmd.RecordInteraction", encode(ce), msg_id=ce_id)
    answer = await client.outcome(ce_id)
    assert answer["type"] == "CommandRejected"
    assert answer["data"]["reason_code"] == "unknown_field"
    assert "Dr Roe" not in str(answer)
    # The referral is untouched: its first interaction is still the first one.
    first = await expect(
        client, hospital, interaction(referral_id, supporter_id), "InteractionCompleted"
    )
    assert first["follow_up"] is False


async def test_the_http_intake(
    client: PlatformClient,
    hospital: str,
    http: Callable[..., httpx.AsyncClient],
    api_token: Callable[[str], str],
) -> None:
    await open_program(client, hospital)
    referral_id, supporter_id = await assigned_referral(client, hospital)
    async with http("records") as api:
        api.headers["Authorization"] = f"Bearer {api_token(hospital)}"
        # Records learns of the assignment from the stream: wait until it has.
        for _ in range(50):
            resp = await api.post(
                f"/hospitals/{hospital}/outreach",
                json=outreach(referral_id, supporter_id, "unreachable").to_data(),
            )
            if resp.status_code != 404:
                break
            await asyncio.sleep(0.1)
        assert resp.status_code == 202, resp.text
        assert resp.json() == {"status": "recorded", "event": "OutreachUnreachable"}

        body = interaction(referral_id, supporter_id).to_data()
        key = {"Idempotency-Key": _id("k")}
        resp = await api.post(f"/hospitals/{hospital}/interactions", json=body, headers=key)
        assert resp.status_code == 202 and resp.json()["event"] == "InteractionCompleted"
        resp = await api.post(f"/hospitals/{hospital}/interactions", json=body, headers=key)
        assert resp.status_code == 202 and resp.json() == {
            "status": "already_recorded",
            "event": None,
        }

        resp = await api.post(
            f"/hospitals/{hospital}/interactions", json=body | {"notes": "Dr Roe cried"}
        )
        assert resp.status_code == 422 and resp.json()["reason_code"] == "unknown_field"
        assert "Dr Roe" not in resp.text
        resp = await api.post(
            f"/hospitals/{hospital}/outreach",
            json=outreach(_id("r"), supporter_id, "accepted").to_data(),
        )
        assert resp.status_code == 404 and resp.json()["reason_code"] == "unknown_referral"
        resp = await api.post(
            f"/hospitals/{hospital}/outreach",
            json=outreach(referral_id, supporter_id, "accepted").to_data(),
        )
        assert resp.status_code == 409 and resp.json()["reason_code"] == "invalid_transition"
        resp = await api.post(f"/hospitals/{hospital}/surveys", content=b"[1, 2]")
        assert resp.status_code == 422 and resp.json()["reason_code"] == "invalid_payload"
        resp = await api.post(f"/hospitals/{hospital}/surveys", content=b"{not json")
        assert resp.status_code == 422 and resp.json()["reason_code"] == "invalid_payload"
        resp = await api.post(f"/hospitals/{hospital}/surveys", json=survey(_id("q")).to_data())
        assert resp.status_code == 202
        assert resp.json() == {"status": "recorded", "event": "SurveyResponseRecorded"}

        spec = (await api.get("/openapi.json")).json()
        for path in ("outreach", "interactions", "surveys"):
            operation = spec["paths"][f"/hospitals/{{hospital}}/{path}"]["post"]
            assert operation["requestBody"]["required"] is True
        metrics = (await api.get("/metrics")).text
        labels = {f'hospital="{hospital}"', 'outcome="unreachable"', 'decline_reason=""'}
        assert any(
            line.startswith("post_records_outreach_total{")
            and labels <= set(line[line.index("{") + 1 : line.index("}")].split(","))
            and line.endswith(" 1.0")
            for line in metrics.splitlines()
        )
        assert "post_records_interaction_minutes_bucket" in metrics
    # What HTTP records is published like anything else.
    await client.wait_for(hospital, "InteractionCompleted", of_referral(referral_id))
    await client.wait_for(hospital, "SurveyResponseRecorded")
