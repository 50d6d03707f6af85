"""The pre-aggregated read models (services/analytics/store.py, migrations/005) against the
direct computation (reaim.compute over every fact row), on random histories: random events
of two hospitals, delivered in a random order with copies, forgetting included; every key of
every RE-AIM object, for random periods, at every scope (the region, each hospital, each
department). Real PostgreSQL, one schema for the test, emptied between examples.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.analytics import projection, reaim, store
from services.analytics.domain import Scope
from services.analytics.facts import load_facts
from services.analytics.rebuild import MIGRATIONS
from shared.contracts import (
    DepartmentClosed,
    DepartmentLaunched,
    Event,
    HospitalRegistered,
    InteractionCompleted,
    NoSupporterAvailable,
    OutreachAccepted,
    OutreachDeclined,
    OutreachUnreachable,
    PhysicianForgotten,
    Rank,
    ReferralCreated,
    SupporterAssigned,
    SupporterAvailabilityChanged,
    SupporterRetired,
    SupporterTrained,
    SurveyResponseRecorded,
)
from shared.eventstore import create_pool, migrate
from shared.runtime import Platform
from tests.integration.aggregates import aggregate_rows

pytestmark = pytest.mark.integration

HOSPITALS = ("h-agg-a", "h-agg-b")
DEPARTMENTS = ("emergency-medicine", "icu")
START = date(2021, 11, 20)  # business dates over about 14 months, across month and year ends
DAYS = 420
REASONS = (None, "no_time", "no_need", "privacy", "other")


def _day(offset: int) -> date:
    return START + timedelta(days=offset)


def _at(offset: int, minute: int) -> datetime:
    return datetime(START.year, START.month, START.day, tzinfo=UTC) + timedelta(
        days=offset, minutes=minute
    )


@st.composite
def histories(draw: st.DrawFn) -> list[Event]:
    """One random region: registrations, launches and closings, supporters, referrals with
    matching outcomes, outreach, interactions (some before their referral is known), surveys,
    availability changes and forgetting."""
    days = st.integers(0, DAYS)
    minutes = st.integers(0, 60 * 24 * 3)  # up to three days after the day's start
    events: list[Event] = []
    for h in HOSPITALS:
        events.append(
            HospitalRegistered(
                hospital=h, name="General", physician_count=draw(st.integers(50, 300))
            )
        )
        for d in DEPARTMENTS:
            if draw(st.booleans()) or d == DEPARTMENTS[0]:
                launched = draw(st.integers(0, 120))
                events.append(
                    DepartmentLaunched(
                        hospital=h,
                        department=d,
                        physician_count=draw(st.integers(5, 60)),
                        launched_on=_day(launched),
                    )
                )
                if draw(st.integers(0, 4)) == 0:
                    events.append(
                        DepartmentClosed(hospital=h, department=d, closed_on=_day(draw(days)))
                    )
        for k in range(draw(st.integers(0, 3))):
            d = draw(st.sampled_from(DEPARTMENTS))
            sid = f"s{k}"
            events.append(
                SupporterTrained(
                    hospital=h, supporter_id=sid, department=d, rank=Rank.attending,
                    interventional=True, trained_on=_day(draw(days)),
                )
            )  # fmt: skip
            if draw(st.booleans()):
                events.append(
                    SupporterRetired(
                        hospital=h, supporter_id=sid, department=d, retired_on=_day(draw(days))
                    )
                )
            for _ in range(draw(st.integers(0, 2))):
                events.append(
                    SupporterAvailabilityChanged(
                        hospital=h, supporter_id=sid, department=d, available=draw(st.booleans()),
                        changed_on=_day(draw(days)),
                    )
                )  # fmt: skip
        physicians = [f"p{k}" for k in range(draw(st.integers(1, 4)))]
        for k in range(draw(st.integers(0, 9))):
            rid, d = f"r{k}", draw(st.sampled_from(DEPARTMENTS))
            requested = draw(days)
            if draw(st.integers(0, 5)):  # else: never created, its records stand alone
                events.append(
                    ReferralCreated(
                        hospital=h, referral_id=rid, physician_id=draw(st.sampled_from(physicians)),
                        department=d, rank=Rank.attending,
                        source=draw(st.sampled_from(reaim.SOURCES)), event_nature="other",
                        requested_at=_at(requested, draw(st.integers(0, 24 * 60 - 1))),
                    )
                )  # fmt: skip
            if draw(st.booleans()):
                events.append(
                    SupporterAssigned(
                        hospital=h, referral_id=rid, supporter_id="s0", department=d,
                        reason="matched", assigned_at=_at(requested, 0),
                        due_at=_at(requested + 2, 0),
                    )
                )  # fmt: skip
            if draw(st.integers(0, 3)) == 0:
                events.append(
                    NoSupporterAvailable(
                        hospital=h, referral_id=rid, department=d, reason="none_eligible"
                    )
                )
            for _ in range(draw(st.integers(0, 2))):
                outcome = draw(st.sampled_from(("accepted", "declined", "unreachable")))
                at = _at(requested, draw(minutes))
                common: dict[str, Any] = {
                    "hospital": h, "referral_id": rid, "supporter_id": "s0", "at": at,
                    "department": d,
                }  # fmt: skip
                if outcome == "accepted":
                    events.append(OutreachAccepted(**common))
                elif outcome == "declined":
                    reason = draw(st.sampled_from(REASONS))
                    events.append(OutreachDeclined(**common, decline_reason=reason))
                else:
                    events.append(OutreachUnreachable(**common))
            for _ in range(draw(st.integers(0, 3))):
                events.append(
                    InteractionCompleted(
                        hospital=h, referral_id=rid, supporter_id="s0",
                        occurred_on=_day(min(DAYS, requested + draw(st.integers(-1, 40)))),
                        minutes=draw(st.integers(1, 600)), escalated=draw(st.booleans()),
                        department=d,
                    )
                )  # fmt: skip
        for k in range(draw(st.integers(0, 4))):
            had = draw(st.booleans())
            events.append(
                SurveyResponseRecorded(
                    hospital=h, response_id=f"q{k}", department=draw(st.sampled_from(DEPARTMENTS)),
                    submitted_on=_day(draw(days)), aware=draw(st.booleans()), had_interaction=had,
                    helpful=draw(st.none() | st.integers(1, 5)) if had else None,
                    wellbeing_improved=draw(st.none() | st.booleans()) if had else None,
                    comfort_improved=draw(st.none() | st.booleans()) if had else None,
                    would_recommend=draw(st.none() | st.booleans()),
                )
            )  # fmt: skip
        if draw(st.booleans()):
            forgotten = draw(st.sampled_from(physicians))
            mine = [
                e.referral_id
                for e in events
                if isinstance(e, ReferralCreated)
                and e.hospital == h
                and e.physician_id == forgotten
            ]
            events.append(
                PhysicianForgotten(
                    hospital=h, forget_id=f"forgot-{forgotten}", requested_on=_day(DAYS),
                    referral_ids=mine,
                )
            )  # fmt: skip
    return events


def _periods() -> st.SearchStrategy[list[tuple[date | None, date | None]]]:
    bound = st.none() | st.integers(-40, DAYS + 40).map(_day)

    def ordered(pair: tuple[date | None, date | None]) -> tuple[date | None, date | None]:
        a, b = pair
        if a is not None and b is not None and a >= b:
            return (b, a + timedelta(days=1)) if a != b else (a, a + timedelta(days=1))
        return pair

    return st.lists(st.tuples(bound, bound).map(ordered), min_size=1, max_size=4)


@pytest.fixture(scope="module")
async def aggregate_pool(platform: Platform) -> AsyncIterator[asyncpg.Pool]:
    schema = f"analytics_agg_{uuid.uuid4().hex[:8]}"
    pool = await create_pool(platform.db_url, schema)
    try:
        await migrate(pool, schema, MIGRATIONS)
        yield pool
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await pool.close()


_EMPTIED = (*projection.FACT_TABLES, "scope_versions", *projection.AGGREGATE_TABLES)


async def check_history(
    pool: asyncpg.Pool,
    events: list[Event],
    order: list[int],
    periods: list[tuple[date | None, date | None]],
) -> None:
    async with pool.acquire() as conn:
        await conn.execute("TRUNCATE " + ", ".join(_EMPTIED))
        async with conn.transaction():
            # `order` holds indexes into events: a random delivery order, copies included
            # (a copy is the same event id: the fact's upsert keeps one).
            for index in order:
                await projection.project(conn, events[index], index + 1, f"evt-{index}")
        await compare_answers(conn, periods)
        # The rebuild's way to the same tables: grouping the facts at once (agg_build).
        kept = await aggregate_rows(conn)
        await conn.execute("SELECT agg_build()")
        assert await aggregate_rows(conn) == kept


async def compare_answers(
    conn: asyncpg.Connection, periods: list[tuple[date | None, date | None]]
) -> None:
    """Every key of every RE-AIM object, aggregated and direct, at every scope and period."""
    facts = await load_facts(conn, Scope())
    scopes = [Scope()]
    for h in HOSPITALS:
        scopes.append(Scope(h))
        scopes += [Scope(h, d.department) for d in facts.departments if d.hospital == h]
    for scope in scopes:
        for start, end in [(None, None), *periods]:
            expected = reaim.compute(
                facts, scope=scope, period_from=start, period_to=end
            ).model_dump()
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                period, answer = await store.compute(conn, scope, start, end)
            got = answer.model_dump()
            assert period == reaim.period_of(facts.within(scope), start, end)
            for name in reaim.OBJECTS:
                assert got[name] == expected[name], (scope, start, end, name)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_aggregated_answers_equal_the_direct_computation(
    aggregate_pool: asyncpg.Pool, data: st.DataObject
) -> None:
    events = data.draw(histories())
    order = data.draw(st.permutations(range(len(events))))
    copies = data.draw(st.lists(st.sampled_from(range(len(events))), max_size=5))
    periods = data.draw(_periods())
    await check_history(aggregate_pool, events, [*order, *copies], periods)


async def test_two_partitions_writing_region_rows_in_opposite_orders_take_turns(
    aggregate_pool: asyncpg.Pool,
) -> None:
    """Two instances' batches (two hospitals, two partitions) each write interactions of two
    days, in opposite orders: both update the region's row of each day (the triggers). Without
    the aggregates' fence (projection.FENCE_SQL) the second to ask waits for the first's row
    and the first for its: PostgreSQL kills one (a deadlock) and its hospital is held back.
    With it, the second batch waits at its first fact until the first commits."""
    day1, day2 = _day(1), _day(2)
    async with aggregate_pool.acquire() as conn:
        await conn.execute("TRUNCATE " + ", ".join(_EMPTIED))

    async def batch(hospital: str, days: tuple[date, date], started: asyncio.Event) -> None:
        async with aggregate_pool.acquire() as conn, conn.transaction():
            for k, day in enumerate(days):
                event = InteractionCompleted(
                    hospital=hospital, referral_id=f"r{k}", supporter_id="s0",
                    occurred_on=day, minutes=30, escalated=False, department=DEPARTMENTS[0],
                )  # fmt: skip
                await projection.project(conn, event, None, f"{hospital}-{k}")
                started.set()
                await asyncio.sleep(0.5)  # the other batch writes meanwhile

    first_started, second_started = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(batch(HOSPITALS[0], (day1, day2), first_started))
    await first_started.wait()
    second = asyncio.create_task(batch(HOSPITALS[1], (day2, day1), second_started))
    await asyncio.gather(first, second)  # a deadlock raises here
    async with aggregate_pool.acquire() as conn:
        by_day = dict(
            await conn.fetch(
                "SELECT day, n FROM agg_interactions WHERE hospital = '' AND department = ''"
            )
        )
    assert by_day == {day1: 2, day2: 2}


def test_a_period_is_its_whole_months_and_two_stretches_of_days() -> None:
    p = reaim.Period
    assert store.pieces(p(None, None)) == (None,) * 6
    jan15, feb1, mar1, mar10 = (
        date(2024, 1, 15),
        date(2024, 2, 1),
        date(2024, 3, 1),
        date(2024, 3, 10),
    )
    assert store.pieces(p(jan15, mar10)) == (feb1, mar1, jan15, feb1, mar1, mar10)
    assert store.pieces(p(None, mar10)) == (None, mar1, None, None, mar1, mar10)
    assert store.pieces(p(feb1, mar1)) == (feb1, mar1, None, None, None, None)
    assert store.pieces(p(jan15, date(2024, 1, 20))) == (
        None, None, jan15, date(2024, 1, 20), None, None,
    )  # fmt: skip
    assert store.pieces(p(jan15, date(2024, 2, 3))) == (
        None, None, jan15, feb1, feb1, date(2024, 2, 3),
    )  # fmt: skip


@pytest.mark.parametrize("upgrade", ["005", "007"])
@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_a_database_projected_before_the_aggregates_is_backfilled_by_their_migration(
    platform: Platform, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, upgrade: str
) -> None:
    """An upgrade: read models projected under the migrations before `upgrade` (001-004, or
    001-006), then the new ones applied (as a service of the new version does when it starts)
    fill the aggregates from the rows there, and they answer as the direct computation does."""
    events = data.draw(histories())
    periods = data.draw(_periods())
    before = tmp_path_factory.mktemp("before-aggregates")
    for path in sorted(MIGRATIONS.glob("*.sql")):
        if path.name < upgrade:
            shutil.copy(path, before / path.name)
    schema = f"analytics_up_{uuid.uuid4().hex[:8]}"
    pool = await create_pool(platform.db_url, schema)
    try:
        await migrate(pool, schema, Path(before))
        async with pool.acquire() as conn:
            assert not await conn.fetchval("SELECT to_regclass('region_asof') IS NOT NULL")
            async with conn.transaction():
                for index, event in enumerate(events):
                    await projection.project(conn, event, index + 1, f"evt-{index}")
        applied = await migrate(pool, schema, MIGRATIONS)
        assert applied == [  # only the new ones: an upgrade
            f"{schema}/{path.name}"
            for path in sorted(MIGRATIONS.glob("*.sql"))
            if path.name >= upgrade
        ]
        async with pool.acquire() as conn:
            await compare_answers(conn, periods)
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await pool.close()
