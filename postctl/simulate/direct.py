"""A simulated national region written straight into analytics' read models (the bench's
`national` section, issue 26): no stream, no service, no JSON.

Each plan's events (`straight.events`: the same contract events, built with their pydantic
models) become their fact rows by the projection itself (`projection.row_of`), written as the
rebuild writes them (`rebuild.write_facts`), in bulk (`rebuild.bulk`: without the aggregate
triggers and secondary indexes, then every aggregate built by grouping). Chunks of hospitals
are planned and written by several processes at once: no two write a row of the same
hospital, so they never wait for each other, and PostgreSQL uses a core for each.

Through the stream the national region took over 40 minutes to set up here (about 20k
events/s written into the stream, then the rebuild); the queries measured over it do not
depend on how the rows got there.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from postctl.simulate import region_scenario
from postctl.simulate.region import REGION_START
from postctl.simulate.straight import SEED, events
from services.analytics import projection
from services.analytics.rebuild import MIGRATIONS, SCHEMA, bulk, write_facts
from shared.eventstore import create_pool, migrate

BATCH = 5000  # fact rows a transaction
STRIDE = 100_000_000  # stream sequences of one chunk: k * STRIDE + n, increasing per hospital


def write_chunk(db_url: str, schema: str, hospitals: int, years: int, chunk: int, k: int) -> int:
    """Plan chunk `k` (hospitals k*chunk...) and write its fact rows; returns its event count.
    Runs in a worker process."""
    return asyncio.run(_write_chunk(db_url, schema, hospitals, years, chunk, k))


async def _write_chunk(
    db_url: str, schema: str, hospitals: int, years: int, chunk: int, k: int
) -> int:
    first = k * chunk
    plan = region_scenario(min(chunk, hospitals - first), years, SEED, REGION_START, first)
    pool = await create_pool(db_url, schema, min_size=1, max_size=1)
    count = 0
    try:
        async with pool.acquire() as conn:
            rows: list[projection.Row] = []
            for count, event in enumerate(events(plan), start=1):
                row = projection.row_of(event, k * STRIDE + count, str(uuid.uuid4()))
                if row is not None:
                    rows.append(row)
                if len(rows) >= BATCH:
                    async with conn.transaction():
                        await write_facts(conn, rows)
                    rows.clear()
            async with conn.transaction():
                await write_facts(conn, rows)
    finally:
        await pool.close()
    return count


async def write_region(
    db_url: str,
    hospitals: int,
    years: int,
    *,
    schema: str = SCHEMA,
    chunk: int = 100,
    workers: int = 2,
    on_chunk: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The region of `hospitals` x `years` (postctl.simulate.region_scenarios' plans, chunk by
    chunk) into `schema`'s read models, which must hold no fact yet. `on_chunk` gets the
    events written so far after each chunk (progress)."""
    started = time.perf_counter()
    pool = await create_pool(db_url, schema, min_size=1, max_size=2)
    counts: dict[str, int] = {}
    written = 0
    try:
        await migrate(pool, schema, MIGRATIONS)
        async with pool.acquire() as conn:
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM hospitals)"):
                raise ValueError(f"the read models of {schema} are not empty")
        async with bulk(pool, schema, counts):
            loop = asyncio.get_running_loop()
            spawn = multiprocessing.get_context("spawn")  # no fork of a running event loop
            with ProcessPoolExecutor(workers, mp_context=spawn) as executor:
                chunks = [
                    loop.run_in_executor(
                        executor, write_chunk, db_url, schema, hospitals, years, chunk, k
                    )
                    for k in range((hospitals + chunk - 1) // chunk)
                ]
                for done in asyncio.as_completed(chunks):
                    written += await done
                    if on_chunk is not None:
                        on_chunk(written)
        async with pool.acquire() as conn:
            await conn.execute("ANALYZE")
    finally:
        await pool.close()
    seconds = time.perf_counter() - started
    return {
        "events": written,
        "seconds": round(seconds, 3),
        "per_second": round(written / seconds, 1) if seconds else 0.0,
        **counts,
    }
