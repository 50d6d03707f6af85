"""A RE-AIM read that deadlocks with a rebuild's swap is asked again, not answered with a 500
(services/analytics/facts.py read_snapshot).

The swap (rebuild.py) locks every table of the live schema in turn. A read in its snapshot
that has read one table and waits for another the swap already holds closes a cycle, and
PostgreSQL aborts one side. CI met it once: `GET /reaim/{hospital}` answered 500 during
`tests/e2e/test_rebuild_e2e.py`. Here the cycle is made on purpose, on real PostgreSQL.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from services.analytics.facts import read_snapshot
from shared.runtime import Platform

pytestmark = pytest.mark.integration


async def _waiting_for_a_lock(admin: asyncpg.Connection, pid: int) -> None:
    for _ in range(500):
        if await admin.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the read never waited for the swap's lock")


async def test_a_read_that_deadlocks_with_the_swap_is_asked_again(
    pool: asyncpg.Pool, platform: Platform
) -> None:
    await pool.execute(
        "CREATE TABLE a_first (n int); CREATE TABLE z_last (n int);"
        " INSERT INTO a_first VALUES (1); INSERT INTO z_last VALUES (2)"
    )
    schema = await pool.fetchval("SELECT current_schema()")
    swap = await asyncpg.connect(platform.db_url)
    admin = await asyncpg.connect(platform.db_url)
    attempts: list[int] = []
    read_has_z = asyncio.Event()

    async def read(conn: asyncpg.Connection) -> int:
        attempts.append(await conn.fetchval("SELECT pg_backend_pid()"))
        z = await conn.fetchval("SELECT n FROM z_last")  # holds z_last from here on
        read_has_z.set()
        a = await conn.fetchval("SELECT n FROM a_first")  # the swap holds it: waits
        return int(a) + int(z)

    try:
        # The swap side waits long before it looks for a deadlock: the read's side finds it.
        await swap.execute("SET deadlock_timeout = '20s'")
        swap_tx = swap.transaction()
        await swap_tx.start()
        await swap.execute(f'LOCK TABLE "{schema}".a_first IN ACCESS EXCLUSIVE MODE')
        reading = asyncio.create_task(read_snapshot(pool, read))
        await read_has_z.wait()
        await _waiting_for_a_lock(admin, attempts[0])
        # The swap's next table is the one the read holds: the cycle closes, PostgreSQL aborts
        # the read (after its deadlock_timeout, 1 s), the read asks again and waits behind the
        # swap, which now holds both.
        await swap.execute(f'LOCK TABLE "{schema}".z_last IN ACCESS EXCLUSIVE MODE')
        await swap.execute(f'UPDATE "{schema}".a_first SET n = 10')
        await swap_tx.commit()
        assert await asyncio.wait_for(reading, 30) in (3, 12)
        assert len(attempts) == 2, attempts  # the first was the deadlock's victim
    finally:
        await swap.close()
        await admin.close()
