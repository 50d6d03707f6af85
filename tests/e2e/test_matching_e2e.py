"""Matching end to end: commands and events through NATS, the running services, the contract.

The matching clock is shared by the whole stack and only moves forward: a test that moves it
past 48 hours expires every assignment still open at that moment, so each test waits for the
assignments it checks before anything else moves the clock.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from services.matching import domain
from shared.client import CloudEventDict, PlatformClient
from shared.contracts import (
    Command,
    CommandRejected,
    LaunchDepartment,
    Rank,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    RetireSupporter,
    SetMatchingPolicy,
    SetSupporterAvailability,
    parse_event,
)
from shared.runtime import Platform

pytestmark = pytest.mark.e2e

DUE = 48 * 3600
TODAY = datetime.now(UTC).date()


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def expect(client: PlatformClient, hospital: str, command: Command, type_: str) -> Any:
    answer = await client.send_and_wait(hospital, command)
    assert answer["type"] == type_, answer["data"]
    return answer["data"]


async def open_department(
    client: PlatformClient,
    hospital: str,
    department: str,
    supporters: list[tuple[str, Rank, bool]],
    physician_count: int = 25,
) -> None:
    await expect(
        client,
        hospital,
        RegisterHospital(name="Test hospital", physician_count=400),
        "HospitalRegistered",
    )
    launch = LaunchDepartment(
        department=department, physician_count=physician_count, launched_on=date(2024, 1, 1)
    )
    await expect(client, hospital, launch, "DepartmentLaunched")
    for supporter_id, rank, interventional in supporters:
        await train(client, hospital, department, supporter_id, rank, interventional)


async def train(
    client: PlatformClient,
    hospital: str,
    department: str,
    supporter_id: str,
    rank: Rank = Rank.attending,
    interventional: bool = True,
) -> str:
    command = RegisterSupporter(
        supporter_id=supporter_id,
        department=department,
        rank=rank,
        interventional=interventional,
        trained_on=date(2024, 2, 1),
    )
    return await client.send(hospital, command)


def request(
    department: str, referral_id: str, physician_id: str = "p-1", rank: Rank = Rank.resident
) -> RequestReferral:
    return RequestReferral(
        referral_id=referral_id,
        physician_id=physician_id,
        department=department,
        rank=rank,
        source="safety_event",
        event_nature="other",
        requested_at=datetime.now(UTC) - timedelta(minutes=5),
        referrer_id="ref-1",
    )


def of_referral(referral_id: str, **data: Any) -> Callable[[CloudEventDict], bool]:
    def match(event: CloudEventDict) -> bool:
        d = event["data"]
        return d.get("referral_id") == referral_id and all(d.get(k) == v for k, v in data.items())

    return match


def at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_a_referral_with_supporters_is_assigned_within_a_second(
    client: PlatformClient, hospital: str
) -> None:
    await open_department(
        client, hospital, "emergency", [("s-a", Rank.senior, True), ("s-b", Rank.fellow, True)]
    )
    referral_id = _id("r")
    # The physician is also a trained supporter: never their own supporter.
    await client.wait_for(
        hospital, "SupporterTrained", lambda e: e["data"]["supporter_id"] == "s-b"
    )
    started = time.monotonic()
    await client.send(hospital, request("emergency", referral_id, physician_id="s-a"))
    assigned = await client.wait_for(
        hospital, "SupporterAssigned", of_referral(referral_id), timeout=10
    )
    elapsed = time.monotonic() - started
    data = assigned["data"]
    assert data["supporter_id"] == "s-b" and data["reason"] == "matched"
    assert at(data["due_at"]) - at(data["assigned_at"]) == timedelta(hours=48)
    assert elapsed < 1.0, f"assigned after {elapsed:.2f}s"


async def test_without_eligible_supporters_the_referral_waits_for_one(
    client: PlatformClient, hospital: str
) -> None:
    await open_department(client, hospital, "anesthesia", [("s-res", Rank.resident, True)])
    empty = _id("r")
    outranked = _id("r")
    await client.send(hospital, request("anesthesia", outranked, rank=Rank.attending))
    await client.wait_for(
        hospital, "NoSupporterAvailable", of_referral(outranked, reason="all_excluded_by_rank")
    )
    launch = LaunchDepartment(department="icu", physician_count=10, launched_on=date(2024, 1, 1))
    await expect(client, hospital, launch, "DepartmentLaunched")
    await client.send(hospital, request("icu", empty))
    await client.wait_for(
        hospital,
        "NoSupporterAvailable",
        of_referral(empty, reason="no_supporters_in_department"),
    )
    # A supporter trained later picks up the waiting referrals of their department.
    command_id = await train(client, hospital, "icu", "s-icu", Rank.resident)
    assigned = await client.wait_for(hospital, "SupporterAssigned", of_referral(empty))
    assert assigned["data"]["supporter_id"] == "s-icu"
    assert assigned["data"]["reason"] == "matched"
    assert assigned["causationid"] == command_id
    await train(client, hospital, "anesthesia", "s-senior", Rank.senior)
    assigned = await client.wait_for(hospital, "SupporterAssigned", of_referral(outranked))
    assert assigned["data"]["supporter_id"] == "s-senior"


async def test_an_unanswered_assignment_is_reassigned_after_48_hours(
    client: PlatformClient,
    hospital: str,
    advance_clock: Callable[[str, float], Awaitable[None]],
) -> None:
    await open_department(
        client, hospital, "surgery", [("s-1", Rank.senior, True), ("s-2", Rank.senior, True)]
    )
    await client.wait_for(
        hospital, "SupporterTrained", lambda e: e["data"]["supporter_id"] == "s-2"
    )
    unanswered, answered = _id("r"), _id("r")
    requested = await client.send(hospital, request("surgery", unanswered))
    first = await client.wait_for(hospital, "SupporterAssigned", of_referral(unanswered))
    await client.send(hospital, request("surgery", answered))
    other = await client.wait_for(hospital, "SupporterAssigned", of_referral(answered))
    # Outreach on the second one closes its assignment: it will not go overdue.
    outreach = RecordOutreach(
        referral_id=answered,
        supporter_id=other["data"]["supporter_id"],
        outcome="accepted",
        at=datetime.now(UTC),
    )
    await expect(client, hospital, outreach, "OutreachAccepted")
    await asyncio.sleep(0.5)  # matching consumes OutreachAccepted

    await advance_clock("matching", DUE + 5)
    overdue = await client.wait_for(hospital, "AssignmentOverdue", of_referral(unanswered))
    again = await client.wait_for(
        hospital, "SupporterAssigned", of_referral(unanswered, reason="reassigned")
    )
    assert overdue["data"]["supporter_id"] == first["data"]["supporter_id"]
    assert overdue["data"]["due_at"] == first["data"]["due_at"]
    assert again["data"]["supporter_id"] != first["data"]["supporter_id"]
    assert client.events.index(overdue) < client.events.index(again)
    # The timer's events stay in the referral's chain: the overdue follows from the assignment
    # it expires, the reassignment from the overdue.
    assert first["correlationid"] == overdue["correlationid"] == again["correlationid"]
    assert first["correlationid"] == requested
    assert overdue["causationid"] == first["id"]
    assert again["causationid"] == overdue["id"]
    await asyncio.sleep(1.0)  # a few timer ticks
    assert not [
        e for e in client.of_type(hospital, "AssignmentOverdue") if of_referral(answered)(e)
    ]


async def test_a_retiring_supporters_referrals_are_reassigned(
    client: PlatformClient, hospital: str
) -> None:
    await open_department(client, hospital, "pediatrics", [("s-x", Rank.senior, True)])
    referral_id = _id("r")
    await client.send(hospital, request("pediatrics", referral_id))
    await client.wait_for(
        hospital, "SupporterAssigned", of_referral(referral_id, supporter_id="s-x")
    )
    await train(client, hospital, "pediatrics", "s-y")
    await client.wait_for(
        hospital, "SupporterTrained", lambda e: e["data"]["supporter_id"] == "s-y"
    )
    retire = RetireSupporter(supporter_id="s-x", retired_on=TODAY)
    command_id = await client.send(hospital, retire)
    moved = await client.wait_for(
        hospital, "SupporterAssigned", of_referral(referral_id, reason="reassigned")
    )
    assert moved["data"]["supporter_id"] == "s-y" and moved["causationid"] == command_id
    retired = await client.wait_for(hospital, "SupporterRetired")
    assert retired["data"]["department"] == "pediatrics"


async def test_roster_refusals(client: PlatformClient, hospital: str) -> None:
    launch = LaunchDepartment(department="er", physician_count=5, launched_on=date(2024, 1, 1))
    refused = await expect(client, hospital, launch, "CommandRejected")
    assert refused["reason_code"] == "unknown_hospital"
    await open_department(client, hospital, "er", [])
    other = LaunchDepartment(department="er", physician_count=6, launched_on=date(2024, 1, 1))
    refused = await expect(client, hospital, other, "CommandRejected")
    assert refused["reason_code"] == "conflicting_duplicate"
    unknown = RetireSupporter(supporter_id="nobody", retired_on=TODAY)
    refused = await expect(client, hospital, unknown, "CommandRejected")
    assert refused["reason_code"] == "unknown_supporter"


async def test_departments_and_supporters_over_http(
    client: PlatformClient,
    hospital: str,
    http: Callable[..., httpx.AsyncClient],
    api_token: Callable[[str], str],
    region_token: Callable[[], str],
) -> None:
    await open_department(
        client, hospital, "medicine", [("s-m1", Rank.attending, False), ("s-m2", Rank.senior, True)]
    )
    await client.wait_for(
        hospital, "SupporterTrained", lambda e: e["data"]["supporter_id"] == "s-m2"
    )
    referral_id = _id("r")
    await client.send(hospital, request("medicine", referral_id))
    await client.wait_for(hospital, "SupporterAssigned", of_referral(referral_id))
    async with http("matching", api_token(hospital)) as api:  # the hospital reads its own
        departments = (await api.get(f"/hospitals/{hospital}/departments")).json()
        supporters = (await api.get(f"/hospitals/{hospital}/supporters")).json()
    async with http("matching", region_token()) as api:  # a region token reads any
        missing = await api.get("/hospitals/no-such-hospital/departments")
    assert departments == [
        {
            "department": "medicine",
            "physician_count": 25,
            "launched_on": "2024-01-01",
            "closed_on": None,
            "status": "active",
            "active_supporters": 2,
            "physicians_per_supporter": 12.5,
            "meets_ratio": False,
        }
    ]
    assert [(s["supporter_id"], s["status"], s["open_assignments"]) for s in supporters] == [
        ("s-m1", "active", 1),
        ("s-m2", "active", 0),
    ]
    assert missing.status_code == 404 and missing.json()["reason_code"] == "unknown_hospital"


async def test_replaying_the_events_rebuilds_the_roster_and_assignments(
    stack: Platform, client: PlatformClient, hospital: str
) -> None:
    await open_department(client, hospital, "replay", [("s-r", Rank.senior, True)])
    referral_id = _id("r")
    await client.send(hospital, request("replay", referral_id))
    await client.wait_for(hospital, "SupporterAssigned", of_referral(referral_id))
    policy = SetMatchingPolicy(policy="same_then_other", department="replay")
    await expect(client, hospital, policy, "MatchingPolicySet")
    capped = SetSupporterAvailability(
        supporter_id="s-r", available=True, max_open_assignments=3, changed_on=TODAY
    )
    await expect(client, hospital, capped, "SupporterAvailabilityChanged")

    conn = await asyncpg.connect(stack.db_url, server_settings={"search_path": "matching"})
    try:
        # One snapshot: events and tables are written by the same transactions.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            stored = await conn.fetch("SELECT event_type, data FROM events ORDER BY position")
            hospitals = await conn.fetch("SELECT * FROM hospitals")
            departments = await conn.fetch("SELECT * FROM departments")
            supporters = await conn.fetch("SELECT * FROM supporters")
            assignments = await conn.fetch("SELECT * FROM assignments")
            referrals = await conn.fetch("SELECT * FROM referrals")
            policies = await conn.fetch("SELECT * FROM policies")
    finally:
        await conn.close()
    events = [
        parse_event(r["event_type"], json.loads(r["data"]))
        for r in stored
        if r["event_type"] != CommandRejected.type_name
    ]
    roster = domain.roster_from(events)

    assert roster.hospitals == {
        r["hospital"]: domain.Hospital(r["hospital"], r["name"], r["physician_count"])
        for r in hospitals
    }
    assert roster.departments == {
        (r["hospital"], r["department"]): domain.Department(
            r["hospital"], r["department"], r["physician_count"], r["launched_on"], r["closed_on"]
        )
        for r in departments
    }
    assert roster.supporters == {
        (r["hospital"], r["supporter_id"]): domain.Supporter(
            r["hospital"],
            r["supporter_id"],
            r["department"],
            Rank(r["rank"]),
            r["interventional"],
            r["trained_on"],
            r["retired_on"],
            r["available"],
            r["max_open_assignments"],
        )
        for r in supporters
    }
    assert (hospital, "s-r") in roster.supporters
    assert roster.supporters[(hospital, "s-r")].max_open_assignments == 3
    assert roster.policies == {(r["hospital"], r["department"]): r["policy"] for r in policies}
    assert roster.policies[(hospital, "replay")] == "same_then_other"

    rows: dict[tuple[str, str], dict[str, str]] = {}
    for r in assignments:
        rows.setdefault((r["hospital"], r["referral_id"]), {})[r["supporter_id"]] = r["status"]
    assert set(roster.assignments) == {
        (r["hospital"], r["referral_id"]) for r in referrals if r["status"] != "new"
    }
    waiting = {(r["hospital"], r["referral_id"]): r["waiting_reason"] for r in referrals}
    for key, history in roster.assignments.items():
        statuses = rows.get(key, {})
        assert set(history.assigned) == set(statuses), key
        assert history.overdue == {s for s, status in statuses.items() if status == "overdue"}
        if history.current is not None:
            assert statuses[history.current] in ("open", "closed")
        if history.waiting_reason is not None and waiting[key] is not None:
            assert waiting[key] == history.waiting_reason
