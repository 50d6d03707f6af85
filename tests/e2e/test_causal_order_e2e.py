"""Causal order across services (CONTRACT.md 1.1, "Order, and more than one instance"): a
command is never refused for want of a fact that follows from an earlier command of the same
hospital. Onboarding sent in one burst goes through as if each command had waited for its
answer, and so does an outreach sent right after its referral (it waits for the assignment).
Only the contract; the whole stack runs (see tests/conftest.py)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime, timedelta

import pytest

from shared.client import PlatformClient
from shared.contracts import (
    Command,
    LaunchDepartment,
    Rank,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    SubmitSurveyResponse,
)

pytestmark = pytest.mark.e2e

DEPARTMENT = "emergency-medicine"


def burst(referral_id: str, supporter_id: str) -> list[tuple[Command, str]]:
    """Each command of a hospital's first day, in order, with the success event it must get."""
    now = datetime.now(UTC)
    return [
        (RegisterHospital(name="Burst hospital", physician_count=200), "HospitalRegistered"),
        (
            LaunchDepartment(
                department=DEPARTMENT, physician_count=30, launched_on=date(2024, 1, 1)
            ),
            "DepartmentLaunched",
        ),
        (
            RegisterSupporter(
                supporter_id=supporter_id,
                department=DEPARTMENT,
                rank=Rank.senior,
                interventional=True,
                trained_on=date(2024, 2, 1),
            ),
            "SupporterTrained",
        ),
        (
            RequestReferral(
                referral_id=referral_id,
                physician_id=f"p-{uuid.uuid4().hex[:8]}",
                department=DEPARTMENT,
                rank=Rank.resident,
                source="self",
                event_nature="other",
                requested_at=now - timedelta(hours=1),
            ),
            "ReferralCreated",
        ),
        (
            RecordOutreach(
                referral_id=referral_id,
                supporter_id=supporter_id,
                outcome="accepted",
                at=now - timedelta(minutes=30),
            ),
            "OutreachAccepted",
        ),
        (
            SubmitSurveyResponse(
                response_id=f"q-{uuid.uuid4().hex[:8]}",
                department=DEPARTMENT,
                submitted_on=now.date(),
                aware=True,
                had_interaction=False,
            ),
            "SurveyResponseRecorded",
        ),
    ]


async def send_burst(client: PlatformClient, hospital: str) -> list[tuple[str, str]]:
    """Publish every command at once, in order, waiting for no answer; (command id, expected)."""
    commands = burst(f"r-{uuid.uuid4().hex[:8]}", "s-1")
    return [(await client.send(hospital, command), expected) for command, expected in commands]


async def test_onboarding_sent_in_one_burst_goes_through_as_if_each_had_waited(
    client: PlatformClient, hospital: str
) -> None:
    sent = await send_burst(client, hospital)
    for command_id, expected in sent:
        # Generous: the stack waits 6 s for a missing fact before it refuses.
        answer = await client.outcome(command_id, timeout=30)
        assert answer["type"] == expected, answer["data"]
    assert client.of_type(hospital, "CommandRejected") == []
    [assigned] = client.of_type(hospital, "SupporterAssigned")
    assert assigned["data"]["supporter_id"] == "s-1"


async def test_bursts_of_several_hospitals_at_once_all_go_through(
    client: PlatformClient,
) -> None:
    hospitals = [f"h-{uuid.uuid4().hex[:10]}" for _ in range(3)]
    sent = await asyncio.gather(*(send_burst(client, h) for h in hospitals))
    for hospital, commands in zip(hospitals, sent, strict=True):
        for command_id, expected in commands:
            answer = await client.outcome(command_id, timeout=30)
            assert answer["type"] == expected, (hospital, answer["data"])
        assert client.of_type(hospital, "CommandRejected") == []
