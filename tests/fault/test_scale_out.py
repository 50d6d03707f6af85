"""Several instances of every service, under load, while instances come and go.

The checks are those of test_faults.py: every command ends in exactly the one outcome its plan
expects, no event is stored twice, and RE-AIM equals the independent computation.

- Two instances answering a burst as one would (the corruption the single-consumer releases
  showed: stalled flows, `unknown_department` for valid commands, missing supporters).
- A rolling restart: every instance stopped and started again, one after the other.
- A frozen instance (SIGSTOP past its lease, then SIGCONT): its partitions move to the others
  while it sleeps, and once awake it must not commit a single write (the fence is its own
  PostgreSQL session, which the lease ended).
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from datetime import UTC, date, datetime

import pytest

from postctl.load import LoadRun
from shared.client import PlatformClient
from shared.contracts import (
    Command,
    LaunchDepartment,
    Rank,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
)
from shared.partitions import PARTITIONS
from shared.runtime import SERVICES, Platform
from tests.fault.conftest import MakePlatform
from tests.fault.test_faults import _assert_nothing_lost, _config, _figures, _load_under_fault

pytestmark = pytest.mark.fault

LEASE_SECONDS = 3.0  # tests/fault/conftest.py


def _readyz(platform: Platform, key: str) -> dict:
    with urllib.request.urlopen(platform.url(key, "/readyz"), timeout=5) as resp:
        return json.loads(resp.read())


def _held(platform: Platform, service: str) -> dict[str, list[int]]:
    return {
        key: _readyz(platform, key)["partitions"]
        for key, p in platform.processes.items()
        if p.name == service and p.alive()
    }


async def _all_partitions_held(platform: Platform, timeout: float = 60.0) -> None:
    """Every partition of every service held by exactly one live instance, and every live
    instance holding its share (at least partitions // instances)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        ok = True
        for service in SERVICES:
            held = await asyncio.to_thread(_held, platform, service)
            partitions = sorted(p for ps in held.values() for p in ps)
            ok = ok and partitions == list(range(PARTITIONS))
            ok = ok and all(len(ps) >= PARTITIONS // len(held) for ps in held.values())
        if ok:
            return
        assert asyncio.get_running_loop().time() < deadline, "partitions not all held"
        await asyncio.sleep(0.5)


async def test_two_instances_of_each_service_answer_a_burst_as_one_would(
    make_platform: MakePlatform,
) -> None:
    platform = await asyncio.to_thread(make_platform, instances=2)
    await _all_partitions_held(platform)  # the work is shared: each instance holds its share
    config = _config(rate=100.0, hospitals=5, max_commands=500)
    async with LoadRun(platform.nats_url, config) as run:
        report = await run.run()
        await _figures(run, report, platform, platform.nats_url)
    print(report.format())
    _assert_nothing_lost(report, platform)


async def test_a_rolling_restart_of_every_instance_loses_and_doubles_nothing(
    fault_platform: Platform,
) -> None:
    async def rolling_restart(run: LoadRun) -> None:
        for key, process in list(fault_platform.processes.items()):
            process.stop()  # SIGTERM: it hands its partitions over, then exits
            fault_platform.start_service(process.name, process.index)
            await asyncio.to_thread(fault_platform.wait_ready, 90.0)
            print(f"restarted {key}")

    report = await _load_under_fault(fault_platform, rolling_restart)
    _assert_nothing_lost(report, fault_platform)
    await _all_partitions_held(fault_platform)


async def test_a_frozen_instance_wakes_after_losing_its_partitions_and_writes_nothing(
    fault_platform: Platform,
) -> None:
    frozen = {s: fault_platform.processes[Platform.key(s, 1)] for s in SERVICES}
    await _all_partitions_held(fault_platform)
    before = {s: _readyz(fault_platform, Platform.key(s, 1))["partitions"] for s in SERVICES}
    assert all(before.values()), f"the instances to freeze hold nothing: {before}"

    async def freeze(run: LoadRun) -> None:
        for process in frozen.values():
            assert process.proc is not None
            process.proc.send_signal(signal.SIGSTOP)
        try:
            # Past its lease: PostgreSQL ends its sessions, the others take its partitions
            # and go on with the load while it sleeps.
            await asyncio.sleep(LEASE_SECONDS + 5)
            for service in SERVICES:
                live = await asyncio.to_thread(_held_except, fault_platform, service)
                taken = sorted(p for ps in live.values() for p in ps)
                assert set(before[service]) <= set(taken), (service, before[service], live)
        finally:
            for process in frozen.values():
                assert process.proc is not None
                process.proc.send_signal(signal.SIGCONT)

    report = await _load_under_fault(fault_platform, freeze)
    # Nothing doubled: had a woken instance committed what another had already handled, an
    # outcome or an event would be there twice.
    _assert_nothing_lost(report, fault_platform)
    await _all_partitions_held(fault_platform)
    for service, process in frozen.items():
        log = process.log_path.read_text()
        assert "partition_lost" in log or "partition_released" in log, service


def _held_except(platform: Platform, service: str) -> dict[str, list[int]]:
    """What the instances other than the frozen one (index 1) hold."""
    return {
        key: _readyz(platform, key)["partitions"]
        for key, p in platform.processes.items()
        if p.name == service and p.index != 1
    }


async def test_a_burst_onboarding_goes_through_and_a_never_launched_department_is_refused_soon(
    fault_platform: Platform,
) -> None:
    """CONTRACT 1.1, "Order": the onboarding burst of a stock client (sent without waiting) is
    answered as if each command had waited; a referral for a department never launched is
    refused `unknown_department` once nothing is pending, long before the 10-minute bound
    (this platform keeps the default POST_NOT_YET_KNOWN_SECONDS of 600)."""
    hospital = "burst-onboarding"
    launched = date(2024, 1, 1)
    requested = datetime(2024, 3, 1, 9, tzinfo=UTC)
    burst: list[Command] = [
        RegisterHospital(name="Burst", physician_count=80),
        LaunchDepartment(department="em", physician_count=40, launched_on=launched),
        RegisterSupporter(
            supporter_id="s1",
            department="em",
            rank=Rank.senior,
            interventional=True,
            trained_on=launched,
        ),
        RequestReferral(
            referral_id="r1",
            physician_id="p1",
            department="em",
            rank=Rank.resident,
            source="self",
            event_nature="other",
            requested_at=requested,
        ),
        RequestReferral(
            referral_id="r2",
            physician_id="p2",
            department="never-launched",
            rank=Rank.resident,
            source="self",
            event_nature="other",
            requested_at=requested,
        ),
    ]
    client = await PlatformClient.connect(fault_platform.nats_url)
    try:
        ids = [await client.send(hospital, command) for command in burst]
        answers = [await client.outcome(i, timeout=120) for i in ids]
        assert [a["type"] for a in answers] == [
            "HospitalRegistered",
            "DepartmentLaunched",
            "SupporterTrained",
            "ReferralCreated",
            "CommandRejected",
        ]
        assert answers[-1]["data"]["reason_code"] == "unknown_department"
        await client.wait_for(hospital, "SupporterAssigned", timeout=60)
    finally:
        await client.close()
