"""A message that fails for a passing reason holds back its own hospital, never its partition.

Hospital A's messages fail in the referral service (the fault suite's switch,
POST_TEST_FAULTS_FILE, as if the database were away for A alone) while hospital B, hashed to
the same partition, keeps sending referrals. What must hold, with 3 instances of every service:

- B is served all along: every one of its referrals is created and assigned while A's
  messages are still failing, and its latency stays what it was (a generous ratio, printed);
- A's messages wait in their order: nothing of A is created while its first message fails;
  once the fault is gone, each is answered exactly once, in stream order;
- causal order across services holds: A's `RecordOutreach`, which records cannot answer
  before matching's `SupporterAssigned`, is not refused `unknown_referral` while referral
  holds A back (records sees the hold), but accepted once the referral exists;
- the referral instance holding the partition is killed (-9) mid-hold: the next holder
  carries on with what is held, from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from shared.client import PlatformClient
from shared.contracts import (
    LaunchDepartment,
    Rank,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
)
from shared.partitions import partition_of
from shared.runtime import Platform
from tests.fault.conftest import MakePlatform

pytestmark = pytest.mark.fault

DEPARTMENT = "emergency-medicine"
FAULT_SECONDS = 30.0


def _same_partition_pair() -> tuple[str, str]:
    first = f"h-a{uuid.uuid4().hex[:8]}"
    while True:
        other = f"h-b{uuid.uuid4().hex[:8]}"
        if partition_of(other) == partition_of(first):
            return first, other


async def _onboard(client: PlatformClient, hospital: str) -> None:
    for command in (
        RegisterHospital(name="Held General", physician_count=50),
        LaunchDepartment(department=DEPARTMENT, physician_count=50, launched_on=date(2024, 1, 1)),
        RegisterSupporter(
            supporter_id="s-1",
            department=DEPARTMENT,
            rank=Rank.senior,
            interventional=True,
            trained_on=date(2024, 1, 2),
        ),
    ):
        answer = await client.send_and_wait(hospital, command, timeout=60)
        assert answer["type"] != "CommandRejected", answer


def _referral(referral_id: str) -> RequestReferral:
    return RequestReferral(
        referral_id=referral_id,
        physician_id=f"p-{referral_id}",
        department=DEPARTMENT,
        rank=Rank.resident,
        source="third_party",
        event_nature="other",
        requested_at=datetime(2024, 3, 1, 9, 0, tzinfo=UTC),
        referrer_id="ref-1",
    )


async def _assigned_latencies(client: PlatformClient, hospital: str, n: int) -> list[float]:
    """n referrals at about 10/s; seconds from each publish to its SupporterAssigned."""

    async def one(i: int) -> float:
        referral_id = f"r-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        await client.send(hospital, _referral(referral_id))
        await client.wait_for(
            hospital,
            "SupporterAssigned",
            lambda e: e["data"]["referral_id"] == referral_id,
            timeout=60,
        )
        return time.monotonic() - started

    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0.1)
    return sorted(await asyncio.gather(*tasks))


def _p99(latencies: list[float]) -> float:
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]


def _holder(platform: Platform, service: str, partition: int) -> str:
    for key, process in platform.processes.items():
        if process.name != service or not process.alive():
            continue
        with urllib.request.urlopen(platform.url(key, "/readyz"), timeout=5) as resp:
            if partition in json.loads(resp.read())["partitions"]:
                return key
    raise AssertionError(f"nobody holds partition {partition} of {service}")


async def test_a_retried_message_holds_back_its_hospital_only(
    make_platform: MakePlatform, tmp_path: Path
) -> None:
    faults = tmp_path / "faults"
    platform = await asyncio.to_thread(
        make_platform, extra_env={"POST_TEST_FAULTS_FILE": str(faults)}
    )
    held, neighbour = _same_partition_pair()
    client = await PlatformClient.connect(platform.nats_url)
    try:
        await _onboard(client, held)
        await _onboard(client, neighbour)
        before = await _assigned_latencies(client, neighbour, 40)

        faults.write_text(f"referral:{held}\n")
        await asyncio.sleep(1.0)  # every referral instance has seen the switch
        first, second = "r-held-1", "r-held-2"
        first_id = await client.send(held, _referral(first))
        outreach_id = await client.send(
            held,
            RecordOutreach(
                referral_id=first,
                supporter_id="s-1",
                outcome="accepted",
                at=datetime(2024, 3, 1, 12, 0, tzinfo=UTC),
            ),
        )
        second_id = await client.send(held, _referral(second))

        during_started = time.monotonic()
        during = await _assigned_latencies(client, neighbour, 40)
        # The holder of the partition dies while A is held back; another takes over.
        victim = _holder(platform, "referral", partition_of(held))
        await asyncio.to_thread(platform.processes[victim].stop, signal.SIGKILL)
        assert time.monotonic() - during_started < FAULT_SECONDS, "the neighbour was too slow"
        # Nothing of A was answered while its first message fails, not even the outreach
        # that records could refuse for want of the referral.
        for command_id in (first_id, outreach_id, second_id):
            assert client.caused_by(command_id) == [], command_id
        await asyncio.sleep(max(0.0, FAULT_SECONDS - (time.monotonic() - during_started)))
        for command_id in (first_id, outreach_id, second_id):
            assert client.caused_by(command_id) == [], command_id

        faults.write_text("")
        await asyncio.to_thread(
            platform.start_service, "referral", platform.processes[victim].index
        )
        created_first = await client.outcome(first_id, timeout=120)
        created_second = await client.outcome(second_id, timeout=120)
        accepted = await client.outcome(outreach_id, timeout=120)
        assert created_first["type"] == "ReferralCreated"
        assert created_second["type"] == "ReferralCreated"
        assert accepted["type"] == "OutreachAccepted", accepted
        await asyncio.sleep(2.0)  # a second answer, were there one, would have come by now
        for command_id in (first_id, outreach_id, second_id):
            assert len(client.caused_by(command_id)) == 1, command_id
        created = [e["data"]["referral_id"] for e in client.of_type(held, "ReferralCreated")]
        assert created == [first, second]  # in the order they were sent

        p99_before, p99_during = _p99(before), _p99(during)
        print(f"neighbour p99 before {p99_before:.3f} s, during {p99_during:.3f} s")
        # Unchanged, within what a shared 2-core machine does to a p99.
        assert p99_during <= 3 * p99_before + 0.5
    finally:
        await client.close()
