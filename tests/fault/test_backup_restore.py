"""Losing all of PostgreSQL, and coming back whole from the last backup and the stream.

Three instances of every service under the load generator's mix. A backup (`shared.backup`,
what `postctl backup` runs) is taken mid-load; after it a physician is forgotten and the
load goes on; then PostgreSQL is lost: stopped, its data directory wiped. The backup's
PostgreSQL is restored onto a new, empty server, the services' work streams replay from the
backup's position, and the services start again. Then:

- every command published before the loss (and after) has exactly one answer, the planned one,
  and no event is stored twice or under two ids (`LoadRun.verify`);
- every RE-AIM figure equals the independent computation (`postctl.load.expected_reaim`), and
  the forgetting hospital's figures are as they were;
- the forget done after the backup holds again: no table and no message of the stream names
  the physician, and it was answered once.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from postctl.load import LoadRun
from shared.backup import Backup, BackupError, backup, restore
from shared.client import PlatformClient
from shared.contracts import (
    STREAM_NAME,
    ForgetPhysician,
    LaunchDepartment,
    Rank,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
)
from shared.runtime import Platform
from shared.settings import Settings
from tests.fault.conftest import MakePlatform
from tests.fault.test_faults import FAULT_AT, _assert_nothing_lost, _config, _figures
from tests.fault.test_forgetting_faults import (
    DEPARTMENT,
    HOSPITAL,
    _answers,
    _answers_once,
    _naming,
)
from tests.scan import forget_jobs_left, rows_containing

pytestmark = pytest.mark.fault


REFERRALS = 3


async def _history(client: PlatformClient, physician: str) -> None:
    """The forgetting hospital: its roster, and REFERRALS referrals of `physician`, assigned."""
    roster = [
        RegisterHospital(name="Forget", physician_count=40),
        LaunchDepartment(department=DEPARTMENT, physician_count=40, launched_on=date(2024, 1, 1)),
        RegisterSupporter(
            supporter_id="s0",
            department=DEPARTMENT,
            rank=Rank.senior,
            interventional=True,
            trained_on=date(2024, 1, 2),
        ),
    ]
    for command in roster:
        assert (await client.send_and_wait(HOSPITAL, command, timeout=60))["type"] != (
            "CommandRejected"
        )
    for n in range(REFERRALS):
        request = RequestReferral(
            referral_id=f"r{n}",
            physician_id=physician,
            department=DEPARTMENT,
            rank=Rank.resident,
            source="self",
            event_nature="other",
            requested_at=datetime(2024, 2, 1 + n, 9, tzinfo=UTC),
        )
        answer = await client.send_and_wait(HOSPITAL, request, timeout=60)
        assert answer["type"] == "ReferralCreated", answer["data"]
        await client.wait_for(
            HOSPITAL, "SupporterAssigned", lambda e, n=n: e["data"]["referral_id"] == f"r{n}", 60
        )


def _settings(platform: Platform) -> Settings:
    return Settings(
        nats_url=platform.nats_url,
        pg_port=platform.pg_port,
        data_dir=platform.data_dir,
    )


async def _until(check, what: str, tries: int = 300) -> None:  # type: ignore[no-untyped-def]
    for _ in range(tries):
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not reached: {what}")


def _lose_postgres_and_stop_services(platform: Platform) -> None:
    """The services stopped (kill -9: they were failing without their database anyway), and
    PostgreSQL gone with its data."""
    for process in platform.processes.values():
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()
    postgres = platform.postgres
    assert postgres is not None
    postgres.stop(signal.SIGQUIT)
    shutil.rmtree(postgres.data_dir / "pgdata")


async def test_all_of_postgresql_lost_is_restored_from_the_backup_and_the_stream(
    make_platform: MakePlatform, tmp_path: Path
) -> None:
    platform = await asyncio.to_thread(make_platform)
    settings = _settings(platform)
    client = await PlatformClient.connect(platform.nats_url)
    physician = "doc-restored-forget-4242"
    try:
        await _history(client, physician)
        before = await _answers(platform)

        async with LoadRun(platform.nats_url, _config()) as run:
            load = asyncio.create_task(run.run())
            await run.wait_sent(FAULT_AT)
            made = await backup(settings, tmp_path / "backup")
            assert Backup.read(made.path).manifest["replay_from"] >= 1

            # After the backup: a forget, done and erased from the stream.
            answer = await client.send_and_wait(
                HOSPITAL,
                ForgetPhysician(physician_id=physician, requested_on=date(2025, 1, 1)),
                timeout=60,
            )
            assert answer["type"] == "PhysicianForgotten"
            await _until(lambda: _none_left(platform, client, physician), "the forget done")

            await run.wait_sent(FAULT_AT + 60)  # more commands after the backup
            sent_before_loss = len(run.sent)
            await asyncio.to_thread(_lose_postgres_and_stop_services, platform)
            assert platform.postgres is not None
            await asyncio.to_thread(platform.postgres.start)  # a new, empty server
            done = await restore(settings, made.path, stream=False)
            assert done["postgres"] == "restored"
            platform.start_services()
            await asyncio.to_thread(platform.wait_ready, 90.0)

            report = await load
            assert report.commands > sent_before_loss  # the load went on through the loss
            await _figures(run, report, platform, platform.nats_url)
        print(report.format())
        _assert_nothing_lost(report, platform)

        assert await _answers(platform) == before  # the forgetting hospital's figures
        await _until(lambda: _none_left(platform, client, physician), "the forget held again")
        assert len(_answers_once(client)) == 1

        # Never over live data: a database with the platform's schemas, a NATS with POST.
        with pytest.raises(BackupError, match="already holds the platform's schemas"):
            await restore(settings, made.path, stream=False)
        with pytest.raises(BackupError, match=f"the stream {STREAM_NAME} exists"):
            await restore(settings, made.path, postgres=False)
    finally:
        await client.close()


async def _none_left(platform: Platform, client: PlatformClient, physician: str) -> bool:
    return (
        await forget_jobs_left(platform.db_url) == 0
        and not await rows_containing(platform.db_url, physician)
        and not await _naming(client, physician)
    )
