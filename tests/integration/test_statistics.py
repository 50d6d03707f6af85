"""No column holding ids or text keeps planner statistics (shared/statistics.py), on a real
PostgreSQL, as a role that is not a superuser (as in a deployment): ANALYZE samples no id
into ``pg_statistic``, and what it sampled before the rule is removed, both ways (with
``pg_clear_attribute_stats``, and without it, as before PostgreSQL 18)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.eventstore import create_pool, migrate
from shared.runtime import Platform
from shared.statistics import keep_no_statistics
from tests.scan import statistics_containing

pytestmark = pytest.mark.integration


@pytest.fixture
async def owner_url(platform: Platform) -> AsyncIterator[str]:
    """A login role that owns what it creates, nothing more (no superuser)."""
    role = f"svc_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(platform.db_url)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw' NOSUPERUSER")
        database = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'GRANT CREATE ON DATABASE "{database}" TO {role}')
        host = platform.db_url.split("@", 1)[1]
        yield f"postgresql://{role}:pw@{host}"
    finally:
        await admin.close()


async def _fill(conn: asyncpg.Connection, schema: str, marker: str) -> None:
    """Rows naming `marker` where the platform keeps ids: events (data and an expression
    index over it), waiting (a body), processed (a message id), a read model."""
    await conn.execute(
        f"CREATE TABLE {schema}.referrals (hospital text, referral_id text, physician_id text,"
        " minutes integer, PRIMARY KEY (hospital, referral_id))"
    )
    await conn.execute(
        f"CREATE INDEX ON {schema}.events ((data->>'referral_id'))"
        " WHERE event_type = 'ReferralCreated'"
    )
    for i in range(300):
        tag = f"{marker}-{i % 3}"
        await conn.execute(
            f"INSERT INTO {schema}.events (stream_id, stream_version, event_id, event_type,"
            " data, metadata) VALUES ($1, 0, gen_random_uuid(), 'ReferralCreated', $2, $3)",
            f"referral:h:{tag}-{i}",
            {"referral_id": tag, "physician_id": tag},  # the pool's codec: shared/eventstore
            {},
        )
        await conn.execute(
            f"INSERT INTO {schema}.waiting VALUES ($1, 0, 'h', $2, 'post.h.cmd.X', $3, now())",
            f"h:{tag}-{i}",
            i,
            tag.encode(),
        )
        await conn.execute(f"INSERT INTO {schema}.processed VALUES ($1, $2)", f"h:{tag}-{i}", i)
        await conn.execute(
            f"INSERT INTO {schema}.referrals VALUES ('h', $1, $2, $3)", f"{tag}-{i}", tag, i % 7
        )


@pytest.mark.parametrize("clear_function", [True, False], ids=["pg_clear", "alter_type"])
async def test_no_id_is_sampled_into_pg_statistic(
    platform: Platform, owner_url: str, clear_function: bool
) -> None:
    schema = f"stats_{uuid.uuid4().hex[:8]}"
    marker = f"mk{uuid.uuid4().hex[:10]}"
    pool = await create_pool(owner_url, schema)
    try:
        await migrate(pool, schema, None)  # the rule already applies to the core tables
        async with pool.acquire() as conn:
            await _fill(conn, schema, marker)  # a table and an index the rule has not seen
            await conn.execute(
                f"ANALYZE {schema}.events, {schema}.waiting, {schema}.processed, {schema}.referrals"
            )
        before = await statistics_containing(platform.db_url, marker, analyze=False)
        # The new table's ids and the new index were sampled; the core tables' were not.
        assert f"{schema}.referrals.physician_id" in before, before
        assert not [b for b in before if ".events." in b or ".waiting." in b], before
        assert any(b.startswith(f"{schema}.events_expr") for b in before), before

        async with pool.acquire() as conn:
            counts = await keep_no_statistics(conn, schema, clear_function=clear_function)
        assert counts["removed"] >= 2 and counts["left"] == 0, counts
        assert await statistics_containing(platform.db_url, marker, analyze=False) == []
        # And ANALYZE (autovacuum's, or anyone's) samples them no more.
        assert await statistics_containing(platform.db_url, marker) == []

        admin = await asyncpg.connect(platform.db_url)
        try:
            kept = await admin.fetch(
                "SELECT tablename, attname FROM pg_stats WHERE schemaname = $1", schema
            )
        finally:
            await admin.close()
        # Numbers and times keep their statistics: the planner's estimates for them stay.
        names = {(r["tablename"], r["attname"]) for r in kept}
        assert ("referrals", "minutes") in names and ("events", "position") in names, names
        assert not {n for n in names if n[1] in ("physician_id", "data", "body", "message_id")}
        # The data is untouched, the indexes too (re-created from their definitions).
        async with pool.acquire() as conn:
            assert await conn.fetchval(f"SELECT count(*) FROM {schema}.referrals") == 300
            found = await conn.fetchval(
                f"SELECT count(*) FROM {schema}.events WHERE data->>'referral_id' = $1"
                " AND event_type = 'ReferralCreated'",
                f"{marker}-1",
            )
            assert found == 100
            # Applied again: nothing left to do.
            assert await keep_no_statistics(conn, schema, clear_function=clear_function) == {
                "targets_set": 0,
                "removed": 0,
                "left": 0,
            }
    finally:
        await pool.close()
