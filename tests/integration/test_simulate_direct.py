"""The bench's national region written straight into analytics' read models
(postctl.simulate.direct): by several processes, in bulk, it gives the read models the live
projection gives for the same events, fact for fact and aggregate for aggregate (issue 26)."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from postctl.simulate import direct, region_scenario
from postctl.simulate.region import REGION_START
from postctl.simulate.straight import SEED, events
from services.analytics import projection, store
from services.analytics.domain import Scope
from services.analytics.rebuild import MIGRATIONS
from shared.eventstore import create_pool, migrate
from shared.runtime import Platform
from tests.integration.aggregates import aggregate_rows

pytestmark = pytest.mark.integration

HOSPITALS, YEARS, CHUNK = 4, 1, 2

# The facts without their event ids (drawn anew for each write).
FACTS = {
    "hospitals": "*",
    "departments": "*",
    "supporters": "*",
    "referrals": "hospital, referral_id, department, physician_id, source, requested_at,"
    " matching_outcome, matching_seq, first_at, first_kind, first_seq, first_outcome,"
    " decline_at, decline_seq, decline_reason",
    "outreach": "hospital, referral_id, department, outcome, at, decline_reason, stream_seq",
    "interactions": "hospital, referral_id, department, occurred_on, minutes, escalated,"
    " stream_seq",
    "surveys": "*",
    "availability_changes": "hospital, supporter_id, department, changed_on, available, stream_seq",
}


async def read_models(conn: asyncpg.Connection) -> dict[str, list[tuple[object, ...]]]:
    found = await aggregate_rows(conn)
    for table, columns in FACTS.items():
        rows = await conn.fetch(f"SELECT {columns} FROM {table}")
        found[table] = sorted(tuple(r.values()) for r in rows)
    return found


async def test_the_direct_region_equals_the_live_projection_of_its_events(
    platform: Platform,
) -> None:
    bulk_schema = f"analytics_direct_{uuid.uuid4().hex[:8]}"
    live_schema = f"analytics_live_{uuid.uuid4().hex[:8]}"
    progress: list[int] = []
    summary = await direct.write_region(
        platform.db_url, HOSPITALS, YEARS, schema=bulk_schema, chunk=CHUNK, on_chunk=progress.append
    )
    live = await create_pool(platform.db_url, live_schema)
    bulk = await create_pool(platform.db_url, bulk_schema)
    try:
        # The same events one by one, as the live handler writes them (triggers on).
        await migrate(live, live_schema, MIGRATIONS)
        count = 0
        async with live.acquire() as conn, conn.transaction():
            for k in range(HOSPITALS // CHUNK):
                plan = region_scenario(CHUNK, YEARS, SEED, REGION_START, k * CHUNK)
                for n, event in enumerate(events(plan), start=1):
                    await projection.project(conn, event, k * direct.STRIDE + n, f"e-{k}-{n}")
                    count += 1
        assert summary["events"] == count and len(progress) == HOSPITALS // CHUNK
        assert progress[-1] == count
        async with live.acquire() as a, bulk.acquire() as b:
            expected, got = await read_models(a), await read_models(b)
            assert expected["interactions"] and expected["supported_days"]
            assert got == expected
            # and the answers read from them (the region's, one hospital's)
            hospital = expected["hospitals"][0][0]
            assert isinstance(hospital, str)
            for scope in (Scope(), Scope(hospital)):
                async with a.transaction(isolation="repeatable_read", readonly=True):
                    want = await store.compute(a, scope, None, None)
                async with b.transaction(isolation="repeatable_read", readonly=True):
                    assert await store.compute(b, scope, None, None) == want
    finally:
        for pool, schema in ((live, live_schema), (bulk, bulk_schema)):
            async with pool.acquire() as conn:
                await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await pool.close()


async def test_the_direct_region_refuses_read_models_that_hold_facts(platform: Platform) -> None:
    schema = f"analytics_direct_{uuid.uuid4().hex[:8]}"
    await direct.write_region(platform.db_url, 1, YEARS, schema=schema, chunk=1, workers=1)
    try:
        with pytest.raises(ValueError, match="not empty"):
            await direct.write_region(platform.db_url, 1, YEARS, schema=schema, workers=1)
    finally:
        pool = await create_pool(platform.db_url, schema)
        async with pool.acquire() as conn:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await pool.close()
