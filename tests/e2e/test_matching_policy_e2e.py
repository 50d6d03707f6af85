"""Matching policies and supporter availability (CONTRACT.md 1.1), end to end through NATS.

Each test owns a fresh hospital. None moves the shared clock: a pause hands its referrals over
at once, without waiting for the 48 hours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from shared.client import PlatformClient
from shared.contracts import (
    LaunchDepartment,
    Rank,
    RecordOutreach,
    RequestReferral,
    RetireSupporter,
    SetMatchingPolicy,
    SetSupporterAvailability,
)
from tests.e2e.test_matching_e2e import (
    TODAY,
    _id,
    expect,
    of_referral,
    open_department,
    request,
    train,
)

pytestmark = pytest.mark.e2e


async def two_departments(
    client: PlatformClient, hospital: str, here: list[str], there: list[str]
) -> None:
    """Departments `here` and `there`, each with senior interventional supporters."""
    await open_department(client, hospital, "here", [(s, Rank.senior, True) for s in here])
    launch = LaunchDepartment(department="there", physician_count=10, launched_on=TODAY)
    await expect(client, hospital, launch, "DepartmentLaunched")
    for supporter_id in there:
        await train(client, hospital, "there", supporter_id, Rank.senior)
    last = (here + there)[-1]
    await client.wait_for(hospital, "SupporterTrained", lambda e: e["data"]["supporter_id"] == last)


def availability(
    supporter_id: str, available: bool, cap: int | None = None
) -> SetSupporterAvailability:
    return SetSupporterAvailability(
        supporter_id=supporter_id, available=available, max_open_assignments=cap, changed_on=TODAY
    )


def requested(
    department: str, referral_id: str, minutes_ago: int, **kwargs: str
) -> RequestReferral:
    base = request(department, referral_id)
    at = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    return base.model_copy(update={"requested_at": at, **kwargs})


async def test_other_department_assigns_a_peer_from_elsewhere_and_a_department_overrides_it(
    client: PlatformClient, hospital: str
) -> None:
    await two_departments(client, hospital, ["s-here"], ["s-there"])
    answer = await expect(
        client, hospital, SetMatchingPolicy(policy="other_department"), "MatchingPolicySet"
    )
    assert answer == {"hospital": hospital, "policy": "other_department", "department": None}
    elsewhere = _id("r")
    await client.send(hospital, request("here", elsewhere))
    assigned = await client.wait_for(hospital, "SupporterAssigned", of_referral(elsewhere))
    assert assigned["data"]["supporter_id"] == "s-there"
    assert assigned["data"]["department"] == "here"  # the referral's department
    # The department's own policy overrides the hospital's.
    own = SetMatchingPolicy(policy="same_department", department="here")
    await expect(client, hospital, own, "MatchingPolicySet")
    inside = _id("r")
    await client.send(hospital, request("here", inside))
    assigned = await client.wait_for(hospital, "SupporterAssigned", of_referral(inside))
    assert assigned["data"]["supporter_id"] == "s-here"


async def test_same_then_other_looks_elsewhere_only_when_the_department_has_nobody(
    client: PlatformClient, hospital: str
) -> None:
    await two_departments(client, hospital, ["s-here"], ["s-there"])
    policy = SetMatchingPolicy(policy="same_then_other", department="here")
    await expect(client, hospital, policy, "MatchingPolicySet")
    first = _id("r")
    await client.send(hospital, request("here", first))
    assigned = await client.wait_for(hospital, "SupporterAssigned", of_referral(first))
    assert assigned["data"]["supporter_id"] == "s-here"
    # s-here now has one open and a cap of one: the department counts as having nobody.
    await expect(client, hospital, availability("s-here", True, 1), "SupporterAvailabilityChanged")
    second = _id("r")
    await client.send(hospital, request("here", second))
    assigned = await client.wait_for(hospital, "SupporterAssigned", of_referral(second))
    assert assigned["data"]["supporter_id"] == "s-there"


async def test_a_pause_reassigns_at_once_without_overdue_and_caps_hold(
    client: PlatformClient, hospital: str
) -> None:
    await open_department(
        client, hospital, "ward", [("s-1", Rank.senior, True), ("s-2", Rank.senior, True)]
    )
    await client.wait_for(
        hospital, "SupporterTrained", lambda e: e["data"]["supporter_id"] == "s-2"
    )
    referral_id = _id("r")
    await client.send(hospital, request("ward", referral_id))
    first = await client.wait_for(hospital, "SupporterAssigned", of_referral(referral_id))
    holder = first["data"]["supporter_id"]
    other = "s-2" if holder == "s-1" else "s-1"
    command_id = await client.send(hospital, availability(holder, False))
    moved = await client.wait_for(
        hospital, "SupporterAssigned", of_referral(referral_id, reason="reassigned")
    )
    assert moved["data"]["supporter_id"] == other and moved["causationid"] == command_id
    changed = await client.wait_for(
        hospital, "SupporterAvailabilityChanged", lambda e: e["causationid"] == command_id
    )
    assert changed["data"]["department"] == "ward" and changed["data"]["available"] is False
    assert not [e for e in client.of_type(hospital, "AssignmentOverdue")]
    # The paused supporter gets nothing; the other one, capped at one, is full: all_unavailable.
    await expect(client, hospital, availability(other, True, 1), "SupporterAvailabilityChanged")
    waiting = _id("r")
    await client.send(hospital, request("ward", waiting))
    nobody = await client.wait_for(hospital, "NoSupporterAvailable", of_referral(waiting))
    assert nobody["data"]["reason"] == "all_unavailable"


async def test_waiting_referrals_are_served_when_someone_becomes_eligible_in_request_order(
    client: PlatformClient, hospital: str
) -> None:
    await open_department(client, hospital, "clinic", [("s-only", Rank.senior, True)])
    await client.wait_for(hospital, "SupporterTrained")
    await expect(client, hospital, availability("s-only", True, 1), "SupporterAvailabilityChanged")
    held = _id("r")
    await client.send(hospital, requested("clinic", held, 60))
    await client.wait_for(hospital, "SupporterAssigned", of_referral(held))
    # Two more wait (s-only is at the cap); the later-sent one was requested earlier.
    late, early = _id("r"), _id("r")
    await client.send(hospital, requested("clinic", late, 10))
    await client.wait_for(hospital, "NoSupporterAvailable", of_referral(late))
    await client.send(hospital, requested("clinic", early, 20))
    nobody = await client.wait_for(hospital, "NoSupporterAvailable", of_referral(early))
    assert nobody["data"]["reason"] == "all_unavailable"
    # Outreach on the held one takes s-only below the cap: the earliest request is served.
    outreach = RecordOutreach(
        referral_id=held, supporter_id="s-only", outcome="accepted", at=datetime.now(UTC)
    )
    await expect(client, hospital, outreach, "OutreachAccepted")
    served = await client.wait_for(hospital, "SupporterAssigned", of_referral(early))
    assert served["data"]["supporter_id"] == "s-only"
    assert served["data"]["reason"] == "matched"
    await asyncio.sleep(0.5)
    assert not [e for e in client.of_type(hospital, "SupporterAssigned") if of_referral(late)(e)]
    # Lifting the cap serves the next one.
    await client.send(hospital, availability("s-only", True))
    served = await client.wait_for(hospital, "SupporterAssigned", of_referral(late))
    assert served["data"]["reason"] == "matched"


async def test_a_policy_change_serves_a_waiting_referral_and_assign_to_needs_eligibility(
    client: PlatformClient, hospital: str
) -> None:
    await two_departments(client, hospital, [], ["s-there", "s-paused"])
    await expect(client, hospital, availability("s-paused", False), "SupporterAvailabilityChanged")
    waiting = _id("r")
    await client.send(hospital, requested("here", waiting, 5, assign_to="s-paused"))
    nobody = await client.wait_for(hospital, "NoSupporterAvailable", of_referral(waiting))
    assert nobody["data"]["reason"] == "no_supporters_in_department"
    command_id = await client.send(hospital, SetMatchingPolicy(policy="other_department"))
    served = await client.wait_for(hospital, "SupporterAssigned", of_referral(waiting))
    # The lead's pick is paused: matched by the rules, not manual.
    assert served["data"]["supporter_id"] == "s-there"
    assert served["data"]["reason"] == "matched"
    assert served["causationid"] == command_id


async def test_policy_and_availability_refusals(client: PlatformClient, hospital: str) -> None:
    refused = await expect(
        client, hospital, SetMatchingPolicy(policy="other_department"), "CommandRejected"
    )
    assert refused["reason_code"] == "unknown_hospital"
    await open_department(client, hospital, "er", [("s-er", Rank.senior, True)])
    unknown = SetMatchingPolicy(policy="other_department", department="never-launched")
    refused = await expect(client, hospital, unknown, "CommandRejected")
    assert refused["reason_code"] == "unknown_department"
    refused = await expect(client, hospital, availability("nobody", False), "CommandRejected")
    assert refused["reason_code"] == "unknown_supporter"
    retire = RetireSupporter(supporter_id="s-er", retired_on=TODAY)
    await expect(client, hospital, retire, "SupporterRetired")
    refused = await expect(client, hospital, availability("s-er", True), "CommandRejected")
    assert refused["reason_code"] == "invalid_transition"


async def test_the_roster_shows_availability_over_http(
    client: PlatformClient,
    hospital: str,
    http: Callable[..., httpx.AsyncClient],
    api_token: Callable[[str], str],
) -> None:
    await open_department(client, hospital, "lab", [("s-lab", Rank.senior, True)])
    await client.wait_for(hospital, "SupporterTrained")
    await expect(client, hospital, availability("s-lab", True, 4), "SupporterAvailabilityChanged")
    async with http("matching", api_token(hospital)) as api:
        supporters = (await api.get(f"/hospitals/{hospital}/supporters")).json()
    assert [(s["supporter_id"], s["available"], s["max_open_assignments"]) for s in supporters] == [
        ("s-lab", True, 4)
    ]


async def test_re_aim_counts_the_supporters_available(
    client: PlatformClient,
    hospital: str,
    http: Callable[..., httpx.AsyncClient],
    api_token: Callable[[str], str],
) -> None:
    await open_department(
        client, hospital, "rehab", [("s-in", Rank.senior, True), ("s-away", Rank.senior, True)]
    )
    await client.wait_for(
        hospital, "SupporterTrained", lambda e: e["data"]["supporter_id"] == "s-away"
    )
    await expect(client, hospital, availability("s-away", False), "SupporterAvailabilityChanged")
    implementation: dict[str, object] = {}
    async with http("analytics", api_token(hospital)) as api:
        for _ in range(100):  # analytics reads the stream on its own
            answer = (await api.get(f"/reaim/{hospital}/rehab")).json()
            implementation = answer.get("implementation", {})
            if implementation.get("supporters_available") == 1:
                break
            await asyncio.sleep(0.1)
    assert implementation.get("supporters_available") == 1
    assert answer["maintenance"]["supporters_active"] == 2
    # changed_on is a business date of the scope: the period ends the day after it.
    assert answer["period"]["to"] == (TODAY + timedelta(days=1)).isoformat()
