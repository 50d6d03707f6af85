"""The 48-hour timer's two reads look at the hospitals of the partitions an instance holds
only, so that what every instance does each second does not grow with the instances (issue
23), and each hospital is still swept and counted by the one holding it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from services.matching import store
from shared.eventstore import create_pool, migrate
from shared.partitions import PARTITIONS, partition_of
from shared.runtime import Platform

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "matching" / "migrations"


async def _matching_pool(platform: Platform) -> asyncpg.Pool:
    schema = f"itest_{uuid.uuid4().hex[:8]}"
    pool = await create_pool(platform.db_url, schema)
    await migrate(pool, schema, MIGRATIONS)
    return pool


def _hospitals_in_two_partitions() -> tuple[str, str]:
    first = "timer-h-0"
    other = next(
        f"timer-h-{n}"
        for n in range(1, 1000)
        if partition_of(f"timer-h-{n}") != partition_of(first)
    )
    return first, other


async def test_the_timer_reads_the_hospitals_of_the_partitions_held_only(
    platform: Platform,
) -> None:
    pool = await _matching_pool(platform)
    a, b = _hospitals_in_two_partitions()
    past = datetime.now(UTC) - timedelta(hours=49)
    for hospital in (a, b):
        await pool.execute(
            "INSERT INTO departments (hospital, department, physician_count, launched_on)"
            " VALUES ($1, 'em', 10, '2024-01-01')",
            hospital,
        )
        await pool.execute(
            "INSERT INTO assignments (hospital, referral_id, supporter_id, department,"
            " requested_at, assigned_at, due_at, reason) VALUES ($1, 'r1', 's1', 'em', $2, $2,"
            " $3, 'matched')",
            hospital,
            past,
            past + timedelta(hours=48),
        )
    now = datetime.now(UTC)
    try:
        due = await store.due_assignments(pool, now, 100, [partition_of(a)])
        assert [r["hospital"] for r in due] == [a]
        counted = await store.open_by_department(pool, [partition_of(b)])
        assert [(r["hospital"], r["open"]) for r in counted] == [(b, 1)]
        # an instance holding nothing reads nothing; without partitions (None), everything
        assert await store.due_assignments(pool, now, 100, []) == []
        everything = await store.due_assignments(pool, now, 100, None)
        assert sorted(r["hospital"] for r in everything) == sorted([a, b])
        assert len(await store.open_by_department(pool, list(range(PARTITIONS)))) == 2
    finally:
        await pool.close()
