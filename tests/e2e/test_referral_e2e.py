"""The referral intake end to end, as a hospital system sees it: commands on NATS, answers on
NATS, status over HTTP. Only the contract; the whole stack runs (see tests/conftest.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from shared.client import CloudEventDict, PlatformClient
from shared.contracts import (
    CloseDepartment,
    LaunchDepartment,
    Rank,
    RecordInteraction,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    encode,
    make_cloudevent,
    parse_payload,
)

pytestmark = pytest.mark.e2e

DEPARTMENT = "emergency-medicine"
Http = Callable[..., httpx.AsyncClient]


def now() -> datetime:
    return datetime.now(UTC)


def referral_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "referral_id": f"r-{uuid.uuid4().hex[:12]}",
        "physician_id": f"p-{uuid.uuid4().hex[:8]}",
        "department": DEPARTMENT,
        "rank": "attending",
        "source": "self",
        "event_nature": "other",
        "requested_at": (now() - timedelta(minutes=1)).isoformat(),
    }
    data.update(changes)
    return data


def referral(**changes: Any) -> RequestReferral:
    return parse_payload(RequestReferral, referral_data(**changes))


async def onboard(client: PlatformClient, hospital: str, *departments: str) -> None:
    """What a hospital does before it refers: register, launch its departments."""
    answer = await client.send_and_wait(
        hospital, RegisterHospital(name="Test hospital", physician_count=500)
    )
    assert answer["type"] == "HospitalRegistered", answer
    for department in departments or (DEPARTMENT,):
        answer = await client.send_and_wait(
            hospital,
            LaunchDepartment(
                department=department,
                physician_count=100,
                launched_on=now().date() - timedelta(days=60),
            ),
        )
        assert answer["type"] == "DepartmentLaunched", answer


async def send_raw(client: PlatformClient, hospital: str, data: dict[str, Any], **ce: Any) -> str:
    """Publish a RequestReferral as raw CloudEvents JSON (payloads the models would refuse)."""
    event = make_cloudevent(
        type_="RequestReferral",
        source=ce.pop("source", f"/hospitals/{hospital}/system"),
        data=data,
        **ce,
    )
    await client.send_raw(f"post.{hospital}.cmd.RequestReferral", encode(event), event["id"])
    return str(event["id"])


# A refusal of another service's fact waits for it (stack: 6 s, then ~6.2 s to the answer).
WAITED = 30.0


async def barrier(client: PlatformClient, hospital: str) -> None:
    """Wait until the referral service has handled everything sent before this (of an
    onboarded hospital: a refusal on the command alone comes at once, in stream order)."""
    future = (now() + timedelta(days=3650)).isoformat()
    answer = await client.send_and_wait(hospital, referral(requested_at=future))
    assert answer["data"]["reason_code"] == "invalid_payload"


def created(client: PlatformClient, hospital: str, referral_id: str) -> list[CloudEventDict]:
    return [
        e
        for e in client.of_type(hospital, "ReferralCreated")
        if e["data"]["referral_id"] == referral_id
    ]


@pytest.fixture
def reader(http: Http, region_token: Callable[[], str]) -> Http:
    """`http` with a region token: reads any hospital's referrals."""
    token = region_token()
    return lambda service: http(service, token)


async def status_of(http: Http, hospital: str, referral_id: str) -> httpx.Response:
    async with http("referral") as web:
        return await web.get(f"/hospitals/{hospital}/referrals/{referral_id}")


async def eventually_status(
    http: Http,
    hospital: str,
    referral_id: str,
    status: str,
    interactions: int = 0,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """The referral's status once the other services' facts have reached the referral service."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await status_of(http, hospital, referral_id)
        if answer.status_code == 200:
            body: dict[str, Any] = answer.json()
            if body["status"] == status and body["interactions"] >= interactions:
                return body
        if time.monotonic() > deadline:
            raise AssertionError(f"status is not {status}: {answer.status_code} {answer.text}")
        await asyncio.sleep(0.1)


# --- a valid referral -----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["self", "third_party", "safety_event"])
async def test_a_valid_referral_becomes_referral_created_with_correlation_and_causation(
    client: PlatformClient, hospital: str, reader: Http, source: str
) -> None:
    await onboard(client, hospital)
    cmd = referral(source=source, referrer_id="ref-1" if source != "self" else None)
    command_id = await client.send(hospital, cmd)
    answer = await client.outcome(command_id)
    assert answer["type"] == "ReferralCreated"
    assert answer["_subject"] == f"post.{hospital}.evt.ReferralCreated"
    assert answer["correlationid"] == command_id
    assert answer["causationid"] == command_id
    assert answer["specversion"] == "1.0"
    assert answer["source"].startswith(f"/hospitals/{hospital}/")
    expected = {**cmd.to_data(), "hospital": hospital}
    assert {k: answer["data"].get(k) for k in expected} == expected

    status = await status_of(reader, hospital, cmd.referral_id)
    assert status.status_code == 200
    body = status.json()
    assert body["hospital"] == hospital
    assert body["referral_id"] == cmd.referral_id
    assert body["department"] == DEPARTMENT
    assert body["source"] == source
    assert body["interactions"] == 0
    assert "physician_id" not in body
    assert cmd.physician_id not in status.text


# --- bad input: the right CommandRejected, nothing stored -------------------------------------


BAD_PAYLOADS: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("unknown field", lambda: {**referral_data(), "note": "free text"}, "unknown_field"),
    ("bad rank", lambda: referral_data(rank="boss"), "invalid_payload"),
    ("bad source", lambda: referral_data(source="rumour"), "invalid_payload"),
    ("bad event nature", lambda: referral_data(event_nature="sad"), "invalid_payload"),
    ("wrong type", lambda: referral_data(rank=3), "invalid_payload"),
    ("not a time", lambda: referral_data(requested_at="yesterday"), "invalid_payload"),
    ("naive time", lambda: referral_data(requested_at="2025-01-01T10:00:00"), "invalid_payload"),
    ("bad id", lambda: referral_data(physician_id="Dr. Jane Doe"), "invalid_payload"),
    (
        "missing field",
        lambda: {k: v for k, v in referral_data().items() if k != "physician_id"},
        "invalid_payload",
    ),
    (
        "future",
        lambda: referral_data(requested_at=(now() + timedelta(hours=2)).isoformat()),
        "invalid_payload",
    ),
    ("unknown department", lambda: referral_data(department="cardiology"), "unknown_department"),
    ("closed department", lambda: referral_data(department="closed-ward"), "unknown_department"),
]


async def test_each_kind_of_bad_input_is_rejected_and_nothing_is_stored(
    client: PlatformClient, hospital: str, reader: Http
) -> None:
    await onboard(client, hospital, DEPARTMENT, "closed-ward")
    closing = await client.send_and_wait(
        hospital,
        CloseDepartment(department="closed-ward", closed_on=now().date() - timedelta(days=1)),
    )
    assert closing["type"] == "DepartmentClosed", closing

    sent = [
        (why, data, await send_raw(client, hospital, data), code)
        for why, make, code in BAD_PAYLOADS
        for data in [make()]
    ]
    for why, data, command_id, code in sent:
        answer = await client.outcome(command_id, timeout=WAITED)  # cardiology waits
        assert answer["type"] == "CommandRejected", why
        assert answer["_subject"] == f"post.{hospital}.evt.CommandRejected"
        assert answer["data"]["command_id"] == command_id
        assert answer["data"]["command_type"] == "RequestReferral"
        assert answer["data"]["reason_code"] == code, (why, answer["data"])
        assert answer["correlationid"] == command_id
        # Rejection details never echo what was sent.
        assert "free text" not in answer["data"]["detail"]
        assert "Jane" not in answer["data"]["detail"]
        if "referral_id" in data and isinstance(data["referral_id"], str):
            assert created(client, hospital, data["referral_id"]) == []
            assert (await status_of(reader, hospital, data["referral_id"])).status_code == 404
    [closed_id] = [command_id for why, _, command_id, _ in sent if why == "closed department"]
    assert "closed" in (await client.outcome(closed_id))["data"]["detail"]


async def test_an_unregistered_hospital_is_rejected(
    client: PlatformClient, hospital: str, reader: Http
) -> None:
    cmd = referral()
    # Refused once it is clear no registration is on its way (CONTRACT.md 1.1).
    answer = await client.outcome(await client.send(hospital, cmd), timeout=WAITED)
    assert answer["type"] == "CommandRejected"
    assert answer["data"]["reason_code"] == "unknown_hospital"
    assert (await status_of(reader, hospital, cmd.referral_id)).status_code == 404


async def test_a_source_naming_another_hospital_than_the_subject_is_rejected(
    client: PlatformClient, hospital: str, reader: Http
) -> None:
    await onboard(client, hospital)
    data = referral_data()
    command_id = await send_raw(client, hospital, data, source="/hospitals/someone-else/system")
    answer = await client.outcome(command_id)
    assert answer["data"]["reason_code"] == "invalid_payload"
    assert answer["_subject"] == f"post.{hospital}.evt.CommandRejected"
    assert (await status_of(reader, hospital, data["referral_id"])).status_code == 404


async def test_a_referral_id_reused_with_another_payload_is_a_conflicting_duplicate(
    client: PlatformClient, hospital: str, reader: Http
) -> None:
    await onboard(client, hospital)
    first = referral(rank="resident")
    assert (await client.send_and_wait(hospital, first))["type"] == "ReferralCreated"
    other = referral(referral_id=first.referral_id, rank="senior")
    answer = await client.send_and_wait(hospital, other)
    assert answer["data"]["reason_code"] == "conflicting_duplicate"
    assert len(created(client, hospital, first.referral_id)) == 1
    assert (await status_of(reader, hospital, first.referral_id)).status_code == 200


async def test_one_physician_is_referred_once_per_open_safety_event(
    client: PlatformClient, hospital: str, reader: Http
) -> None:
    await onboard(client, hospital)
    report = {"source": "safety_event", "referrer_id": "safety-office", "safety_event_id": "se-1"}
    first = referral(**report)
    assert (await client.send_and_wait(hospital, first))["type"] == "ReferralCreated"
    again = referral(**report, physician_id=first.physician_id)
    answer = await client.send_and_wait(hospital, again)
    assert answer["data"]["reason_code"] == "already_referred"
    assert first.referral_id in answer["data"]["detail"]
    assert (await status_of(reader, hospital, again.referral_id)).status_code == 404
    # Another clinician named in the same report is referred.
    colleague = referral(**report)
    assert (await client.send_and_wait(hospital, colleague))["type"] == "ReferralCreated"


# --- the same command twice -----------------------------------------------------------------


async def test_the_same_command_twice_creates_one_referral(
    client: PlatformClient, hospital: str
) -> None:
    await onboard(client, hospital)
    cmd = referral()
    command_id = await client.send(hospital, cmd)
    await client.send(hospital, cmd, id_=command_id)
    # Past JetStream's duplicate window (no Nats-Msg-Id): the service's own record dedupes.
    subject = f"post.{hospital}.cmd.RequestReferral"
    body = encode(
        make_cloudevent(
            type_="RequestReferral",
            source=f"/hospitals/{hospital}/system",
            data=cmd.to_data(),
            id_=command_id,
        )
    )
    await client.send_raw(subject, body)
    # A new command with the same payload: the referral already exists; the command is
    # answered with the fact it repeats, and nothing new is created.
    again_id = await client.send(hospital, cmd)
    await barrier(client, hospital)
    first = client.caused_by(command_id)
    assert len(first) == 1
    again = client.caused_by(again_id)
    assert [e["type"] for e in again] == ["ReferralCreated"]
    assert again[0]["data"] == first[0]["data"]
    assert again[0]["correlationid"] == again_id
    assert len(created(client, hospital, cmd.referral_id)) == 2  # one answer per command


# --- HTTP intake ----------------------------------------------------------------------------


async def test_the_http_intake_creates_the_same_referral_as_nats(
    client: PlatformClient,
    hospital: str,
    http: Http,
    reader: Http,
    api_token: Callable[[str], str],
) -> None:
    await onboard(client, hospital)
    data = referral_data(source="third_party", referrer_id="lead-1")
    async with http("referral") as web:
        web.headers["Authorization"] = f"Bearer {api_token(hospital)}"
        answer = await web.post(f"/hospitals/{hospital}/referrals", json=data)
        assert answer.status_code == 202, answer.text
        assert answer.json() == {"referral_id": data["referral_id"], "status": "requested"}
        repeat = await web.post(f"/hospitals/{hospital}/referrals", json=data)
        assert repeat.status_code == 202
        assert repeat.json()["referral_id"] == data["referral_id"]
        conflict = await web.post(
            f"/hospitals/{hospital}/referrals", json={**data, "rank": "fellow"}
        )
        assert conflict.status_code == 409
        assert conflict.json()["reason_code"] == "conflicting_duplicate"
        unknown = await web.post(
            f"/hospitals/{hospital}/referrals", json={**data, "referral_id": "x-1", "why": "sad"}
        )
        assert unknown.status_code == 422
        assert unknown.json()["reason_code"] == "unknown_field"
        assert "sad" not in unknown.text
        not_json = await web.post(f"/hospitals/{hospital}/referrals", content=b"{oops")
        assert not_json.json()["reason_code"] == "invalid_payload"
        # The token is checked first, and it is not valid for that (bad) hospital.
        bad_slug = await web.post("/hospitals/Not_A_Slug/referrals", json=data)
        assert bad_slug.status_code == 403
        assert bad_slug.json()["reason_code"] == "forbidden"
        spec = (await web.get("/openapi.json")).json()
        assert "/hospitals/{hospital}/referrals" in spec["paths"]
    event = await client.wait(
        lambda e: (
            e["_subject"] == f"post.{hospital}.evt.ReferralCreated"
            and e["data"]["referral_id"] == data["referral_id"]
        )
    )
    assert event["correlationid"] == event["causationid"]
    await asyncio.sleep(0.3)
    assert len(created(client, hospital, data["referral_id"])) == 1
    assert (await status_of(reader, hospital, "x-1")).status_code == 404


# --- the referral follows its life ----------------------------------------------------------


async def test_the_status_follows_assignment_outreach_and_interactions(
    client: PlatformClient, hospital: str, reader: Http
) -> None:
    await onboard(client, hospital)
    trained = await client.send_and_wait(
        hospital,
        RegisterSupporter(
            supporter_id="sup-1",
            department=DEPARTMENT,
            rank=Rank.senior,
            interventional=True,
            trained_on=now().date() - timedelta(days=30),
        ),
    )
    assert trained["type"] == "SupporterTrained", trained
    cmd = referral(rank="resident")
    assert (await client.send_and_wait(hospital, cmd))["type"] == "ReferralCreated"
    assigned = await eventually_status(reader, hospital, cmd.referral_id, "assigned")
    assert assigned["supporter_id"] == "sup-1"

    outreach = RecordOutreach(
        referral_id=cmd.referral_id, supporter_id="sup-1", outcome="accepted", at=now()
    )
    assert (await client.send_and_wait(hospital, outreach))["type"] == "OutreachAccepted"
    await eventually_status(reader, hospital, cmd.referral_id, "accepted")

    for _ in range(2):
        talk = RecordInteraction(
            referral_id=cmd.referral_id,
            supporter_id="sup-1",
            occurred_on=now().date(),
            minutes=30,
        )
        assert (await client.send_and_wait(hospital, talk))["type"] == "InteractionCompleted"
    body = await eventually_status(reader, hospital, cmd.referral_id, "in_support", interactions=2)
    assert body["interactions"] == 2
    assert body["supporter_id"] == "sup-1"


async def test_a_referral_without_an_eligible_supporter_waits(
    client: PlatformClient, hospital: str, reader: Http
) -> None:
    await onboard(client, hospital)
    cmd = referral()
    assert (await client.send_and_wait(hospital, cmd))["type"] == "ReferralCreated"
    body = await eventually_status(reader, hospital, cmd.referral_id, "waiting_for_supporter")
    assert body["supporter_id"] is None


# --- a burst --------------------------------------------------------------------------------


async def test_a_burst_of_1000_referrals_from_three_hospitals_comes_through_exactly_once(
    client: PlatformClient,
) -> None:
    started = time.monotonic()
    hospitals = [f"h-burst-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    await asyncio.gather(*(onboard(client, h) for h in hospitals))
    commands = [(hospitals[i % 3], referral(referral_id=f"b-{i:04d}")) for i in range(1000)]
    ids = await asyncio.gather(*(client.send(h, cmd) for h, cmd in commands))
    # Repeats in the same burst: the same ids again, and the same payloads under new ids.
    await asyncio.gather(
        *(client.send(h, cmd, id_=ids[i]) for i, (h, cmd) in enumerate(commands[:100]))
    )
    repeat_ids = await asyncio.gather(*(client.send(h, cmd) for h, cmd in commands[100:200]))

    def count() -> int:
        return sum(len(client.of_type(h, "ReferralCreated")) for h in hospitals)

    while count() < 1100 and time.monotonic() - started < 55:
        await asyncio.sleep(0.2)
    await asyncio.gather(*(barrier(client, h) for h in hospitals))
    events = [e for h in hospitals for e in client.of_type(h, "ReferralCreated")]
    # One answer per command: 1,000 creations, and 100 repeats answered with a copy.
    assert len(events) == 1100
    assert sorted(e["causationid"] for e in events) == sorted(ids + repeat_ids)
    first = {e["causationid"]: e for e in events if e["causationid"] in set(ids)}
    assert {(e["data"]["hospital"], e["data"]["referral_id"]) for e in first.values()} == {
        (h, cmd.referral_id) for h, cmd in commands
    }
    assert time.monotonic() - started < 60
