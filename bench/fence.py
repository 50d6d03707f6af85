"""What the aggregates' fence (services/analytics/projection.py `FENCE_SQL`) costs and buys:
analytics fact batches of several partitions written at once, as instances catching up do.

The same events (a region of 40 hospitals over a year, split by partition over the workers,
batches of 100 in one transaction each, as the consumer does) projected with one worker and
with four, fenced; then four without the fence, where a deadlocked batch is rolled back and
written again, as the consumer retries it. Without the fence the run stops at a time budget:
it goes at the pace of PostgreSQL's deadlock detection (`deadlock_timeout`, 1 s).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from bench.common import Section, fmt_rate, fmt_ratio
from postctl.simulate.straight import events, national
from services.analytics import projection
from services.analytics.rebuild import MIGRATIONS
from shared.contracts import Event
from shared.eventstore import create_pool, migrate
from shared.partitions import partition_of
from shared.runtime import Platform

BATCH = 100
UNFENCED_BUDGET = 20.0  # seconds
# The statement as it was before the fence: the version bump alone.
_UNFENCED_CTE = (
    "WITH bumped AS (INSERT INTO scope_versions AS v (hospital, version) VALUES ($1, 1)"
    " ON CONFLICT (hospital) DO UPDATE SET version = v.version + 1) "
)


def _unfenced(sql: str) -> str:
    body = sql.strip()
    if body.startswith("WITH "):
        return _UNFENCED_CTE.rstrip() + ", " + body[5:]
    return _UNFENCED_CTE + body


async def _project(conn: asyncpg.Connection, event: Event, seq: int, fenced: bool) -> None:
    if fenced:
        await projection.project(conn, event, seq, f"e{seq}")
        return
    row = projection.row_of(event, seq, f"e{seq}")
    if row is not None:
        await conn.execute(_unfenced(row.sql), *row.args)


async def _round(
    pool: asyncpg.Pool, tables: list[str], parts: list[list[tuple[int, Event]]], fenced: bool
) -> dict[str, Any]:
    await pool.execute("TRUNCATE " + ", ".join(tables))
    deadlocks = written = 0
    deadline = time.perf_counter() + (3600.0 if fenced else UNFENCED_BUDGET)

    async def worker(part: list[tuple[int, Event]]) -> None:
        nonlocal deadlocks, written
        async with pool.acquire() as conn:
            for i in range(0, len(part), BATCH):
                if time.perf_counter() > deadline:
                    return
                chunk = part[i : i + BATCH]
                while True:
                    try:
                        async with conn.transaction():
                            for seq, event in chunk:
                                await _project(conn, event, seq, fenced)
                        break
                    except asyncpg.DeadlockDetectedError:
                        deadlocks += 1
                written += len(chunk)

    started = time.perf_counter()
    await asyncio.gather(*(worker(p) for p in parts))
    took = time.perf_counter() - started
    return {"events": written, "seconds": round(took, 2), "per_second": written / took,
            "deadlocks": deadlocks}  # fmt: skip


def _split(all_events: list[Event], workers: int) -> list[list[tuple[int, Event]]]:
    parts: list[list[tuple[int, Event]]] = [[] for _ in range(workers)]
    for seq, event in enumerate(all_events, 1):
        parts[partition_of(event.hospital) % workers].append((seq, event))
    return parts


async def run(platform: Platform, scale: float = 1.0) -> Section:
    section = Section("analytics: the aggregates' fence")
    fig = section.figures
    hospitals = max(8, int(40 * scale))
    all_events = [e for plan in national(hospitals, 1) for e in events(plan)]
    pool = await create_pool(platform.db_url, "bench_fence", max_size=6)
    try:
        await migrate(pool, "bench_fence", MIGRATIONS)
        tables = [r[0] for r in await pool.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'bench_fence'"
            " AND tablename <> 'schema_migrations'"
        )]  # fmt: skip
        fig["events"] = len(all_events)
        fig["one_fenced"] = await _round(pool, tables, _split(all_events, 1), True)
        fig["four_fenced"] = await _round(pool, tables, _split(all_events, 4), True)
        fig["four_unfenced"] = await _round(pool, tables, _split(all_events, 4), False)
    finally:
        await pool.close()
    one, four, bare = fig["one_fenced"], fig["four_fenced"], fig["four_unfenced"]
    fig["ratio_four_vs_one_fenced"] = four["per_second"] / one["per_second"]
    fig["ratio_fenced_vs_unfenced"] = four["per_second"] / bare["per_second"]
    section.row(f"{len(all_events):,} events, 1 partition writing", fmt_rate(one["per_second"]))
    section.row(
        "  4 partitions at once, fenced",
        f"{fmt_rate(four['per_second'])} ({fmt_ratio(fig['ratio_four_vs_one_fenced'])} of 1)",
        ">= 1.00x of 1",
        fig["ratio_four_vs_one_fenced"] >= 1.0,
    )
    section.row(
        "  4 partitions at once, unfenced",
        f"{fmt_rate(bare['per_second'])} ({bare['deadlocks']} deadlocks)",
    )
    return section
