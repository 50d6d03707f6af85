"""`processed_savepoint`: a message's savepoint and its `processed` row in one round trip, on a
real PostgreSQL (issue 15)."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

from shared.unit_of_work import batch_transaction, processed_savepoint

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


async def test_in_a_batch_each_message_costs_one_statement_and_a_failed_one_keeps_the_others(
    pool: asyncpg.Pool,
) -> None:
    """In a batch's transaction a message's statement also releases the savepoint of the one
    before (issue 23), and a message that fails rolls back its own work only."""
    statements: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("CREATE TABLE work (n int)")
        conn.add_query_logger(lambda record: statements.append(record.query))
        async with batch_transaction(conn) as batch:
            for n, key in enumerate(["h-1:a", "h-1:b", "h-1:c"]):
                with contextlib.suppress(RuntimeError):
                    async with processed_savepoint(conn, key, n) as fresh:
                        assert fresh
                        await conn.execute("INSERT INTO work VALUES ($1)", n)
                        if key == "h-1:b":
                            raise RuntimeError("the handler failed")
            assert not batch.appended
        await asyncio.sleep(0)  # the query logger's callbacks run on the loop
        bare_releases = [q for q in statements if q.startswith("RELEASE") and ";" not in q]
        assert bare_releases == [], "a savepoint is released by the next message's statement"
        assert sum("INSERT INTO processed" in q for q in statements) == 3
        assert len(statements) == 9  # BEGIN, 3 x (processed, work), b's rollback, COMMIT
        assert await conn.fetchval("SELECT array_agg(n ORDER BY n) FROM work") == [0, 2]
        rows = await conn.fetch("SELECT message_id FROM processed ORDER BY message_id")
        assert [r["message_id"] for r in rows] == ["h-1:a", "h-1:c"]


async def test_in_a_batch_a_message_met_by_a_broken_transaction_never_undoes_the_one_before(
    pool: asyncpg.Pool,
) -> None:
    """The message before left its savepoint open; the next one finds the transaction broken
    (a statement failed outside any savepoint). Rolling back to the open savepoint would undo
    the message before and mend the transaction, so the batch would commit without that
    message's work: the transaction must stay broken, and the batch fail as a whole."""
    async with pool.acquire() as conn:
        await conn.execute("CREATE TABLE work (n int)")
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            async with batch_transaction(conn):
                async with processed_savepoint(conn, "h-1:a", 1):
                    await conn.execute("INSERT INTO work VALUES (1)")
                with contextlib.suppress(asyncpg.DivisionByZeroError):
                    await conn.execute("SELECT 1 / 0")  # outside any message's savepoint
                with pytest.raises(asyncpg.InFailedSQLTransactionError):
                    async with processed_savepoint(conn, "h-1:b", 2):
                        pass
                await conn.execute("SELECT 1")  # still broken: the batch cannot commit
        assert await conn.fetchval("SELECT count(*) FROM work") == 0
        assert await conn.fetchval("SELECT count(*) FROM processed") == 0
