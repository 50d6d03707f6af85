"""Forgetting under faults: kill -9 of every referral instance in the middle of a forget.

The stores are forgotten in the transaction that answers `ForgetPhysician`; what the `POST`
stream holds is erased after, by a job kept in the referral service's table. Killed in the
middle of the erasing, the job is found and finished when the service comes back: never half
the stream forgotten for good, no referral lost (each keeps exactly one redacted creation),
no answer doubled, every figure as it was. Killed before its commit, the command is simply
handled again.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

from shared.client import PlatformClient, wait_consumed
from shared.contracts import (
    ForgetPhysician,
    LaunchDepartment,
    Rank,
    RecordInteraction,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
)
from shared.runtime import SERVICES, Platform
from tests.conftest import region_token_for
from tests.fault.conftest import MakePlatform
from tests.scan import forget_jobs_left, rows_containing, stream_messages

pytestmark = pytest.mark.fault

HOSPITAL = "forgetting"
DEPARTMENT = "em"
REFERRALS = 8  # each leaves a command and an event naming the physician: 16 erasures + 1


async def _answer(client: PlatformClient, command: Any, type_: str) -> Any:
    answer = await client.send_and_wait(HOSPITAL, command, timeout=60)
    assert answer["type"] == type_, answer["data"]
    return answer["data"]


async def _history(client: PlatformClient, physician: str) -> None:
    await _answer(client, RegisterHospital(name="Forget", physician_count=40), "HospitalRegistered")
    launch = LaunchDepartment(
        department=DEPARTMENT, physician_count=40, launched_on=date(2024, 1, 1)
    )
    await _answer(client, launch, "DepartmentLaunched")
    for n in range(2):
        train = RegisterSupporter(
            supporter_id=f"s{n}",
            department=DEPARTMENT,
            rank=Rank.senior,
            interventional=True,
            trained_on=date(2024, 1, 2),
        )
        await _answer(client, train, "SupporterTrained")
    for n in range(REFERRALS):
        day = datetime(2024, 2, 1 + n, 9, tzinfo=UTC)
        request = RequestReferral(
            referral_id=f"r{n}",
            physician_id=physician,
            department=DEPARTMENT,
            rank=Rank.resident,
            source="self",
            event_nature="other",
            requested_at=day,
        )
        await _answer(client, request, "ReferralCreated")
        assigned = await client.wait_for(
            HOSPITAL, "SupporterAssigned", lambda e, n=n: e["data"]["referral_id"] == f"r{n}", 60
        )
        supporter = assigned["data"]["supporter_id"]
        outreach = RecordOutreach(
            referral_id=f"r{n}",
            supporter_id=supporter,
            outcome="accepted",
            at=day + timedelta(hours=3),
        )
        await _answer(client, outreach, "OutreachAccepted")
        interaction = RecordInteraction(
            referral_id=f"r{n}", supporter_id=supporter, occurred_on=day.date(), minutes=30
        )
        await _answer(client, interaction, "InteractionCompleted")


async def _naming(client: PlatformClient, physician: str) -> list[tuple[int, str]]:
    return [
        (seq, subject)
        for seq, subject, body in await stream_messages(client)
        if physician.encode() in body
    ]


async def _answers(platform: Platform) -> list[Any]:
    for service in SERVICES:
        await wait_consumed(platform.nats_url, service, db_url=platform.db_url)
    base = f"http://127.0.0.1:{platform.service_ports['analytics']}"
    headers = {"Authorization": f"Bearer {region_token_for(platform)}"}
    async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as web:
        return [
            (await web.get(path)).json()
            for path in (f"/reaim/{HOSPITAL}", f"/reaim/{HOSPITAL}/{DEPARTMENT}")
        ]


def _answers_once(client: PlatformClient) -> set[str]:
    """The distinct PhysicianForgotten seen. A plain NATS subscriber also sees an event that a
    restarted relay publishes again (JetStream stores it once: same Nats-Msg-Id)."""
    return {e["id"] for e in client.of_type(HOSPITAL, "PhysicianForgotten")}


def _kill_referral(platform: Platform) -> None:
    for index in range(platform.instances):
        process = platform.processes[platform.key("referral", index)]
        assert process.proc is not None
        process.proc.kill()
        process.proc.wait()


async def _restart_referral(platform: Platform) -> None:
    for index in range(platform.instances):
        platform.start_service("referral", index)
    await asyncio.to_thread(platform.wait_ready, 90.0)


async def test_kill_9_of_the_referral_service_mid_forgetting(make_platform: MakePlatform) -> None:
    platform = await asyncio.to_thread(make_platform, extra_env={"POST_FORGET_ERASE_DELAY": "0.5"})
    client = await PlatformClient.connect(platform.nats_url)
    physician, other = "doc-forget-me-4711", "doc-forget-me-too-0815"
    try:
        await _history(client, physician)
        before = await _answers(platform)
        assert len(await _naming(client, physician)) == 2 * REFERRALS

        # 1. Killed while the job erases the stream (0.5 s per message: about 8 s of work).
        forget = await client.send(
            HOSPITAL, ForgetPhysician(physician_id=physician, requested_on=date(2025, 1, 1))
        )
        answer = await client.outcome(forget, timeout=60)
        assert answer["type"] == "PhysicianForgotten"
        assert sorted(answer["data"]["referral_ids"]) == [f"r{n}" for n in range(REFERRALS)]
        for _ in range(200):
            left = len(await _naming(client, physician))
            if left < 2 * REFERRALS:
                break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(_kill_referral, platform)
        half = await _naming(client, physician)
        assert 0 < len(half) < 2 * REFERRALS + 1, half  # killed in the middle of the job
        assert await forget_jobs_left(platform.db_url) == 1, "the job is kept until it is done"

        await _restart_referral(platform)
        for _ in range(300):
            if await forget_jobs_left(platform.db_url) == 0:
                break
            await asyncio.sleep(0.2)
        assert await forget_jobs_left(platform.db_url) == 0, (
            "the job was not finished after the restart"
        )
        assert await _naming(client, physician) == []
        assert await rows_containing(platform.db_url, physician) == []
        # Nothing lost, nothing doubled: one (redacted) creation per referral, one answer.
        creations: dict[str, int] = {}
        for _, subject, body in await stream_messages(client):
            if subject == f"post.{HOSPITAL}.evt.ReferralCreated":
                data = json.loads(body)["data"]
                creations[data["referral_id"]] = creations.get(data["referral_id"], 0) + 1
                assert data["physician_id"] == answer["data"]["forget_id"]
        assert creations == {f"r{n}": 1 for n in range(REFERRALS)}
        assert len(_answers_once(client)) == 1
        assert await _answers(platform) == before

        # 2. Killed as the command comes in: answered once after the restart, all forgotten.
        await _answer(
            client,
            RequestReferral(
                referral_id="r-other",
                physician_id=other,
                department=DEPARTMENT,
                rank=Rank.resident,
                source="self",
                event_nature="other",
                requested_at=datetime(2024, 6, 1, 9, tzinfo=UTC),
            ),
            "ReferralCreated",
        )
        forget = await client.send(
            HOSPITAL, ForgetPhysician(physician_id=other, requested_on=date(2025, 1, 2))
        )
        await asyncio.to_thread(_kill_referral, platform)
        await _restart_referral(platform)
        answer = await client.outcome(forget, timeout=120)
        assert answer["type"] == "PhysicianForgotten"
        assert answer["data"]["referral_ids"] == ["r-other"]
        for _ in range(300):
            if await forget_jobs_left(platform.db_url) == 0 and not await _naming(client, other):
                break
            await asyncio.sleep(0.2)
        assert await _naming(client, other) == []
        assert await rows_containing(platform.db_url, other) == []
        await asyncio.sleep(2)  # a second answer would come now
        assert len(_answers_once(client)) == 2
        stored = [
            seq
            for seq, subject, _ in await stream_messages(client)
            if subject == f"post.{HOSPITAL}.evt.PhysicianForgotten"
        ]
        assert len(stored) == 2, stored
    finally:
        await client.close()
