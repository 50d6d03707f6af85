"""`processed_savepoint`: a message's savepoint and its `processed` row in one round trip, on a
real PostgreSQL (issue 15)."""

from __future__ import annotations

import asyncpg
import pytest

from shared.unit_of_work import processed_savepoint

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("key", ["h-1:0f8c2b9e-1d2a-4c1e-9a51-3f1e2d4c5b6a", "h-1:o'brien; --"])
async def test_a_message_is_recorded_once_and_its_work_rolls_back_with_it(
    pool: asyncpg.Pool, key: str
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("CREATE TABLE work (n int)")
        with pytest.raises(RuntimeError):
            async with processed_savepoint(conn, key, 7) as fresh:
                assert fresh
                await conn.execute("INSERT INTO work VALUES (1)")
                raise RuntimeError("the handler failed")
        # rolled back: neither the row nor the work is kept, and the transaction goes on
        assert await conn.fetchval("SELECT count(*) FROM processed") == 0
        assert await conn.fetchval("SELECT count(*) FROM work") == 0
        async with processed_savepoint(conn, key, 7) as fresh:
            assert fresh
            await conn.execute("INSERT INTO work VALUES (2)")
        async with processed_savepoint(conn, key, None) as fresh:
            assert not fresh  # handled before
        rows = await conn.fetch("SELECT message_id, stream_seq FROM processed")
        assert [(r["message_id"], r["stream_seq"]) for r in rows] == [(key, 7)]
        assert await conn.fetchval("SELECT sum(n) FROM work") == 2
