"""A hospital's durable consumer under faults (CONTRACT.md 1.2, "Durable delivery").

With 3 instances of every service, a hospital connected with its own key reads its events from
`hospital-<id>` while commands flow. Mid-way every instance of every service is killed with
SIGKILL and started again, and the hospital's own process goes away without acknowledging what
it had fetched, then comes back. Afterwards the hospital has received every event of its in
the stream, in stream order, at least once (duplicates only by CloudEvents id), and nothing
it acknowledged came again.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import nats
import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from shared import hospitals
from shared.client import HospitalKeys, PlatformClient
from shared.contracts import (
    STREAM_NAME,
    LaunchDepartment,
    Rank,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    evt_subject,
)
from shared.runtime import Platform
from tests.fault.conftest import MakePlatform

pytestmark = pytest.mark.fault

DEPARTMENT = "emergency-medicine"
REFERRALS = 30


def _referral(n: int) -> RequestReferral:
    return RequestReferral(
        referral_id=f"r-{n}",
        physician_id=f"p-{n}",
        department=DEPARTMENT,
        rank=Rank.resident,
        source="self",
        event_nature="other",
        requested_at=datetime(2024, 3, 1, 9, n % 60, tzinfo=UTC),
    )


class HospitalReader:
    """The hospital's system: bound to its consumer with its key, acknowledging what it keeps."""

    def __init__(self, url: str, hospital: str, seed: Path) -> None:
        self.url, self.hospital, self.seed = url, hospital, seed
        self.received: list[tuple[int, str]] = []  # (stream sequence, CloudEvents id)
        self.acked: set[int] = set()

    async def read_for(self, seconds: float, ack: bool = True) -> None:
        nc = await nats.connect(
            self.url, nkeys_seed=str(self.seed), inbox_prefix=f"_INBOX_{self.hospital}"
        )
        try:
            sub = await nc.jetstream().pull_subscribe_bind(
                hospitals.consumer_name(self.hospital), stream=STREAM_NAME
            )
            deadline = asyncio.get_running_loop().time() + seconds
            while asyncio.get_running_loop().time() < deadline:
                try:
                    msgs = await sub.fetch(50, timeout=1.0)
                except (NatsTimeoutError, TimeoutError):
                    continue
                for msg in msgs:
                    seq = msg.metadata.sequence.stream
                    assert seq not in self.acked, "an acknowledged event came again"
                    self.received.append((seq, json.loads(msg.data)["id"]))
                    if ack:
                        await msg.ack_sync()
                        self.acked.add(seq)
        finally:
            await nc.close()  # what was fetched and not acknowledged comes back after 30 s


async def _stream_events(url: str, hospital: str) -> list[tuple[int, str]]:
    """Every event of the hospital in POST, read as the platform (an ordered consumer)."""
    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().subscribe(
            evt_subject(hospital, ">"), ordered_consumer=True, stream=STREAM_NAME
        )
        found: list[tuple[int, str]] = []
        while True:
            try:
                msg = await sub.next_msg(timeout=2.0)
            except (NatsTimeoutError, TimeoutError):
                return found
            found.append((msg.metadata.sequence.stream, json.loads(msg.data)["id"]))
    finally:
        await nc.close()


async def _kill_every_instance_and_restart(platform: Platform) -> None:
    for process in list(platform.processes.values()):
        await asyncio.to_thread(process.stop, signal.SIGKILL)
    for process in list(platform.processes.values()):
        await asyncio.to_thread(platform.start_service, process.name, process.index)
    await asyncio.to_thread(platform.wait_ready)


async def test_a_hospital_consumer_loses_nothing_when_every_instance_and_the_hospital_die(
    make_platform: MakePlatform, tmp_path: Path
) -> None:
    platform = await asyncio.to_thread(make_platform)
    assert platform.nats is not None
    hospital = f"h-{uuid.uuid4().hex[:10]}"
    keys = HospitalKeys(platform.nats.tenants_file, tmp_path / "seeds")
    seed = await keys.seed(hospital)
    admin = await PlatformClient.connect(platform.nats_url)
    try:
        await hospitals.ensure_consumer(admin.js, hospital)
        for command in (
            RegisterHospital(name="Durable General", physician_count=40),
            LaunchDepartment(
                department=DEPARTMENT, physician_count=40, launched_on=date(2024, 1, 1)
            ),
            RegisterSupporter(
                supporter_id="s-1",
                department=DEPARTMENT,
                rank=Rank.senior,
                interventional=True,
                trained_on=date(2024, 1, 2),
            ),
        ):
            assert (await admin.send_and_wait(hospital, command, timeout=60))["type"] != (
                "CommandRejected"
            )
        reader = HospitalReader(platform.nats_url, hospital, seed)
        reading = asyncio.create_task(reader.read_for(8.0))
        for n in range(REFERRALS // 2):
            await admin.send(hospital, _referral(n))
            await asyncio.sleep(0.05)
        await reading
        # The hospital is down now. Every instance of every service dies mid-flow.
        later = [await admin.send(hospital, _referral(n)) for n in range(REFERRALS // 2, REFERRALS)]
        await _kill_every_instance_and_restart(platform)
        for command_id in later:
            await admin.outcome(command_id, timeout=120)
        for n in range(REFERRALS):
            await admin.wait_for(
                hospital,
                "SupporterAssigned",
                lambda e, n=n: e["data"]["referral_id"] == f"r-{n}",
                timeout=120,
            )
        # Back, it fetches a batch and dies before acknowledging it...
        await reader.read_for(3.0, ack=False)
        # ... and once back for good (past the 30 s ack wait), it gets everything.
        await reader.read_for(45.0)
        expected = await _stream_events(platform.nats_url, hospital)
    finally:
        await admin.close()
    assert len(expected) >= 3 + 2 * REFERRALS
    first_seen = list(dict.fromkeys(reader.received))
    assert sorted(set(first_seen)) == expected  # every event, none skipped, nothing else
    acked_order = [
        seq for seq, _ in dict.fromkeys(r for r in reader.received if r[0] in reader.acked)
    ]
    assert acked_order == sorted(acked_order)  # in stream order
    assert reader.acked == {seq for seq, _ in expected}
