"""The analytics projection against real nats-server and PostgreSQL: contract events published
to the POST stream are consumed (a copy delivered twice counts once), the HTTP answers give the
hand-computed figures, the gauges follow, and a rebuild from the stream gives the same answers.

The service runs in-process under its own name (its own schema and durable consumer), so it
never disturbs a platform the end-to-end tests may be running beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import pytest
from nats.js.api import DeliverPolicy
from prometheus_client import REGISTRY

from services.analytics import answers, gauges, handlers, projection, reaim, views
from services.analytics.domain import Scope
from services.analytics.facts import load_facts
from services.analytics.rebuild import MIGRATIONS, rebuild
from shared.auth import TOKENS_FILE_VARIABLE, issue_region_token
from shared.contracts import (
    AssignmentOverdue,
    DepartmentClosed,
    DepartmentLaunched,
    Event,
    HospitalRegistered,
    InteractionCompleted,
    NoSupporterAvailable,
    OutreachAccepted,
    OutreachDeclined,
    OutreachUnreachable,
    Rank,
    ReferralCreated,
    SupporterAssigned,
    SupporterRetired,
    SupporterTrained,
    SurveyResponseRecorded,
    encode,
    evt_subject,
    make_cloudevent,
    new_id,
)
from shared.eventstore import create_pool, migrate
from shared.partitions import work_stream
from shared.runtime import Platform
from shared.service import Service, ensure_stream
from shared.settings import Settings
from shared.unit_of_work import mark_processed
from tests.integration.aggregates import aggregate_rows

# Every index of a schema with its definition (the schema's name left out), and every trigger
# with whether it fires: what a rebuild must leave as the migrations made it.
INDEXES_SQL = """
SELECT tablename, indexname, replace(indexdef, schemaname || '.', '') AS definition
FROM pg_indexes WHERE schemaname = $1
UNION ALL
SELECT c.relname, t.tgname, t.tgenabled::text FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND NOT t.tgisinternal
ORDER BY 1, 2
"""

pytestmark = pytest.mark.integration

ATTENDING = Rank.attending


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def day(text: str) -> date:
    return date.fromisoformat(text)


def program(h: str) -> list[Event]:
    """One hospital's history, in the order the platform would publish it."""
    em, icu = "emergency-medicine", "icu"
    assigned = {"assigned_at": at("2024-01-01T00:00"), "due_at": at("2024-01-03T00:00")}
    return [
        HospitalRegistered(hospital=h, name="General", physician_count=200),
        DepartmentLaunched(
            hospital=h, department=em, physician_count=80, launched_on=day("2020-01-01")
        ),
        DepartmentLaunched(
            hospital=h, department=icu, physician_count=40, launched_on=day("2020-02-01")
        ),
        SupporterTrained(
            hospital=h,
            supporter_id="s1",
            department=em,
            rank=ATTENDING,
            interventional=True,
            trained_on=day("2020-01-05"),
        ),
        SupporterTrained(
            hospital=h,
            supporter_id="s2",
            department=em,
            rank=ATTENDING,
            interventional=True,
            trained_on=day("2020-01-05"),
        ),
        SupporterTrained(
            hospital=h,
            supporter_id="s3",
            department=icu,
            rank=ATTENDING,
            interventional=True,
            trained_on=day("2020-02-05"),
        ),
        ReferralCreated(
            hospital=h,
            referral_id="r1",
            physician_id="p1",
            department=em,
            rank=ATTENDING,
            source="third_party",
            event_nature="other",
            requested_at=at("2020-03-01T10:00"),
        ),
        SupporterAssigned(
            hospital=h,
            referral_id="r1",
            supporter_id="s1",
            department=em,
            reason="matched",
            **assigned,
        ),
        ReferralCreated(
            hospital=h,
            referral_id="r2",
            physician_id="p2",
            department=em,
            rank=ATTENDING,
            source="self",
            event_nature="other",
            requested_at=at("2020-03-02T10:00"),
        ),
        SupporterAssigned(
            hospital=h,
            referral_id="r2",
            supporter_id="s2",
            department=em,
            reason="matched",
            **assigned,
        ),
        AssignmentOverdue(
            hospital=h, referral_id="r2", supporter_id="s2", due_at=at("2024-01-03T00:00")
        ),
        SupporterAssigned(
            hospital=h,
            referral_id="r2",
            supporter_id="s1",
            department=em,
            reason="reassigned",
            **assigned,
        ),
        ReferralCreated(
            hospital=h,
            referral_id="r3",
            physician_id="p3",
            department=icu,
            rank=ATTENDING,
            source="safety_event",
            event_nature="other",
            requested_at=at("2020-03-03T10:00"),
        ),
        SupporterAssigned(
            hospital=h,
            referral_id="r3",
            supporter_id="s3",
            department=icu,
            reason="matched",
            **assigned,
        ),
        OutreachAccepted(
            hospital=h,
            referral_id="r1",
            supporter_id="s1",
            at=at("2020-03-02T09:00"),
            department=em,
        ),
        InteractionCompleted(
            hospital=h,
            referral_id="r1",
            supporter_id="s1",
            occurred_on=day("2020-03-03"),
            minutes=60,
            department=em,
        ),
        OutreachUnreachable(
            hospital=h,
            referral_id="r3",
            supporter_id="s3",
            at=at("2020-03-04T10:00"),
            department=icu,
        ),
        OutreachDeclined(
            hospital=h,
            referral_id="r2",
            supporter_id="s1",
            at=at("2020-03-05T10:00"),
            decline_reason="no_time",
            department=em,
        ),
        InteractionCompleted(
            hospital=h,
            referral_id="r3",
            supporter_id="s3",
            occurred_on=day("2020-03-06"),
            minutes=45,
            department=icu,
        ),
        InteractionCompleted(
            hospital=h,
            referral_id="r1",
            supporter_id="s1",
            occurred_on=day("2020-03-20"),
            minutes=30,
            escalated=True,
            department=em,
            follow_up=True,
        ),
        ReferralCreated(
            hospital=h,
            referral_id="r4",
            physician_id="p1",
            department=em,
            rank=ATTENDING,
            source="third_party",
            event_nature="other",
            requested_at=at("2020-04-01T10:00"),
        ),
        SupporterAssigned(
            hospital=h,
            referral_id="r4",
            supporter_id="s1",
            department=em,
            reason="matched",
            **assigned,
        ),
        AssignmentOverdue(
            hospital=h, referral_id="r4", supporter_id="s1", due_at=at("2024-01-03T00:00")
        ),
        NoSupporterAvailable(
            hospital=h, referral_id="r4", department=em, reason="all_already_tried"
        ),
        SupporterRetired(
            hospital=h, supporter_id="s2", retired_on=day("2020-05-01"), department=em
        ),
        SurveyResponseRecorded(
            hospital=h,
            response_id="q1",
            department=em,
            submitted_on=day("2020-06-01"),
            aware=True,
            had_interaction=True,
            helpful=5,
            wellbeing_improved=True,
            comfort_improved=False,
            would_recommend=True,
        ),
        SurveyResponseRecorded(
            hospital=h,
            response_id="q2",
            department=em,
            submitted_on=day("2020-06-01"),
            aware=True,
            had_interaction=False,
            would_recommend=False,
        ),
        DepartmentClosed(hospital=h, department=icu, closed_on=day("2020-06-30")),
    ]


async def publish(js: Any, event: Event, event_id: str | None = None) -> str:
    """As an outbox relay would; no Nats-Msg-Id, so a second copy is stored and delivered."""
    ce = make_cloudevent(
        type_=event.type_name,
        source=f"/hospitals/{event.hospital}/test",
        data=event.to_data(),
        id_=event_id or new_id(),
    )
    await js.publish(evt_subject(event.hospital, event.type_name), encode(ce))
    return str(ce["id"])


@pytest.fixture
async def analytics(platform: Platform) -> AsyncIterator[Service]:
    """The analytics service under a throw-away name: its own schema and durable consumer."""
    name = f"analytics_it_{uuid.uuid4().hex[:8]}"
    settings = Settings(nats_url=platform.nats_url, database_url=platform.db_url)
    service = Service(
        name,
        event_handlers={t: handlers.project_event for t in handlers.PROJECTIONS},
        migrations=MIGRATIONS,
        routers=[views.router],
        settings=settings,
        deliver_policy=DeliverPolicy.NEW,  # not the other tests' history
    )
    await service.start()
    gauges.export()  # as the service's gauge refresh does when it starts
    yield service
    try:
        await service.js.delete_stream(work_stream(name))
    finally:
        await service.stop()
        conn = await asyncpg.connect(platform.db_url)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.close()


async def settle(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "the projection did not catch up"
        await asyncio.sleep(0.1)


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def region_reader(
    analytics: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> httpx.AsyncClient:
    """An in-process client of the analytics app with a region token (in a tokens file of
    this test's own: the app reads $POST_API_TOKENS_FILE at each request)."""
    path = tmp_path / "api-tokens.json"
    monkeypatch.setenv(TOKENS_FILE_VARIABLE, str(path))
    token = issue_region_token("tests", path)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=analytics.http),
        base_url="http://t",
        headers={"Authorization": f"Bearer {token}"},
    )


async def test_projection_http_gauges_and_rebuild(
    platform: Platform, analytics: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = f"h-{uuid.uuid4().hex[:10]}"
    events = program(h)
    nc = await nats.connect(platform.nats_url)
    js = nc.jetstream()
    await ensure_stream(js)
    ids = [await publish(js, e) for e in events]
    # The first interaction delivered a second time (same CloudEvents id): counted once.
    first_interaction = next(
        i for i, e in enumerate(events) if e.type_name == "InteractionCompleted"
    )
    await publish(js, events[first_interaction], ids[first_interaction])
    await nc.close()

    api = region_reader(analytics, tmp_path, monkeypatch)

    async def caught_up() -> bool:
        async with analytics.pool.acquire() as conn:
            seen = await conn.fetchval(
                "SELECT count(*) FROM processed WHERE message_id = ANY($1::text[])",
                [f"{h}:{i}" for i in ids],
            )
        return bool(seen == len(events))

    await settle(caught_up)
    resp = await api.get(f"/reaim/{h}")
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    reach, eff, adopt, impl, maint = (
        answer[k] for k in ("reach", "effectiveness", "adoption", "implementation", "maintenance")
    )
    assert answer["scope"] == {"level": "hospital", "hospital": h, "department": None}
    assert answer["period"] == {"from": None, "to": "2020-07-01"}  # after the icu closing
    assert reach["interactions"] == 3
    assert reach["referrals"] == 4
    assert reach["referrals_by_source"] == {"self": 1, "third_party": 2, "safety_event": 1}
    assert reach["physicians_supported"] == 2
    assert reach["eligible_physicians"] == 80
    assert reach["reach_rate"] == 0.025
    assert reach["supporters_trained"] == 3
    assert reach["minutes_mean"] == 45.0 and reach["minutes_median"] == 45.0
    assert (reach["minutes_min"], reach["minutes_max"]) == (30, 60)
    assert [m["interactions"] for m in reach["monthly"]] == [0, 0, 3, 0, 0, 0]
    assert reach["monthly"][0]["month"] == "2020-01"
    assert reach["interactions_by_department"] == {"emergency-medicine": 2, "icu": 1}
    assert eff == {
        "respondents_with_interaction": 1,
        "helpful_rate": 1.0,
        "wellbeing_improved_rate": 1.0,
        "comfort_improved_rate": 0.0,
        "escalation_rate": 0.3333,
    }
    assert adopt == {
        "hospitals_adopted": 1,
        "departments_launched": 2,
        "physician_coverage": 0.4,
        "outreach_acceptance_rate": 0.5,
        "would_recommend_rate": 0.5,
        "departments_without_referrals": 0,
    }
    assert impl["outreach_within_48h_rate"] == 0.6667
    assert impl["hours_to_outreach_median"] == 24.0
    assert impl["physicians_per_active_supporter"] == 80.0
    assert impl["referrals_without_supporter"] == 1
    assert impl["decline_reasons"]["no_time"] == 1
    assert maint == {
        "supporters_active": 1,
        "supporter_retention_rate": 0.3333,
        "departments_active_rate": 0.5,
        "interactions_by_program_year": [3],
        "monthly_rate_by_program_year": [0.3],
    }

    icu = (await api.get(f"/reaim/{h}/icu")).json()
    assert icu["reach"]["interactions"] == 1
    assert icu["reach"]["reach_rate"] is None  # closed: no eligible physician left
    assert icu["adoption"]["outreach_acceptance_rate"] is None  # unreachable first
    period = (
        await api.get(f"/reaim/{h}", params={"from": "2020-03-02", "to": "2020-03-04"})
    ).json()
    assert period["period"] == {"from": "2020-03-02", "to": "2020-03-04"}
    assert period["reach"]["referrals"] == 2
    assert period["reach"]["interactions"] == 1

    # Refusals: reason codes, never the input echoed back.
    for params in ({"from": "2020-13-01"}, {"from": "2020-03-04", "to": "2020-03-04"}):
        refused = await api.get(f"/reaim/{h}", params=params)
        assert refused.status_code == 422
        assert refused.json()["reason_code"] == "invalid_payload"
        assert "2020" not in refused.json()["detail"]
    missing = await api.get("/reaim/no-such-hospital")
    assert (missing.status_code, missing.json()["reason_code"]) == (404, "unknown_hospital")
    missing = await api.get(f"/reaim/{h}/cardiology")
    assert (missing.status_code, missing.json()["reason_code"]) == (404, "unknown_department")
    listed = {e["hospital"]: e for e in (await api.get("/hospitals")).json()}
    assert [d["department"] for d in listed[h]["departments"]] == ["emergency-medicine", "icu"]
    assert (await api.get("/openapi.json")).json()["paths"]["/reaim/{hospital}"]

    await gauges.refresh_gauges_once(analytics.pool)
    assert gauge("post_reaim_interactions", hospital=h, department="") == 3.0
    assert gauge("post_reaim_reach_rate", hospital=h, department="") == 0.025
    assert gauge("post_reaim_interactions", hospital=h, department="icu") == 1.0
    assert gauge("post_reaim_reach_rate", hospital=h, department="icu") is None  # null: no sample
    assert gauge("post_reaim_decline_reasons", hospital=h, department="", reason="no_time") == 1.0
    assert gauge("post_reaim_interactions", hospital="", department="") is not None  # the region

    before = {
        path: (await api.get(path)).json()
        for path in (f"/reaim/{h}", f"/reaim/{h}/icu", f"/reaim/{h}/emergency-medicine")
    }
    async with analytics.pool.acquire() as conn:
        projected = await aggregate_rows(conn, h)
        indexes = await conn.fetch(INDEXES_SQL, analytics.name)
    assert any(r["definition"] == "O" for r in indexes)  # the triggers, firing
    settings = Settings(nats_url=platform.nats_url, database_url=platform.db_url)
    summary = await rebuild(settings, schema=analytics.name, idle_seconds=1.0)
    assert summary["messages"] >= len(events) + 1
    assert summary["events_applied"] >= len(events) - 2  # AssignmentOverdue writes nothing
    after = {path: (await api.get(path)).json() for path in before}
    assert after == before
    # The rebuild writes its bulk without the triggers and indexes, then builds the
    # aggregates by grouping and creates the indexes again: the same tables as projected.
    async with analytics.pool.acquire() as conn:
        assert projected["agg_interactions"] and projected["supported_days"]
        assert await aggregate_rows(conn, h) == projected
        assert await conn.fetch(INDEXES_SQL, analytics.name) == indexes
    await api.aclose()


async def test_a_kept_answer_never_outlives_the_next_fact_of_its_hospital(
    platform: Platform, analytics: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers are kept in memory under their hospital's version: a repeat is a lookup, and
    the next fact of the hospital (or of any hospital, for the region) makes it computed anew."""
    h, other = f"h-{uuid.uuid4().hex[:10]}", f"h-{uuid.uuid4().hex[:10]}"
    nc = await nats.connect(platform.nats_url)
    js = nc.jetstream()
    await ensure_stream(js)
    ids = [await publish(js, e) for e in [*program(h), *program(other)]]
    api = region_reader(analytics, tmp_path, monkeypatch)

    async def processed(count: int) -> bool:
        async with analytics.pool.acquire() as conn:
            return bool(await conn.fetchval("SELECT count(*) FROM processed") >= count)

    def lookups(result: str) -> float:
        return gauge("post_analytics_answer_lookups_total", result=result) or 0.0

    try:
        await settle(lambda: processed(len(ids)))
        first = (await api.get(f"/reaim/{h}")).json()
        region = (await api.get("/reaim")).json()
        hits = lookups("hit")
        assert (await api.get(f"/reaim/{h}")).json() == first
        assert lookups("hit") == hits + 1  # served as kept

        # The gauge refresh keeps every all-time answer it computed: a department never asked.
        fresh = answers.AnswerCache()
        await gauges.refresh_gauges_once(analytics.pool, fresh)
        assert len(fresh) == 1 + 2 + 4  # the region, two hospitals, their launched departments
        cache = answers.cache_for(analytics.name)
        await gauges.refresh_gauges_once(analytics.pool, cache)
        hits = lookups("hit")
        icu = (await api.get(f"/reaim/{h}/icu")).json()
        assert lookups("hit") == hits + 1
        assert icu["reach"]["interactions"] == 1

        # A new fact of the hospital: the kept answers of it and of the region give way.
        late = InteractionCompleted(
            hospital=h,
            referral_id="r1",
            supporter_id="s1",
            department="emergency-medicine",
            occurred_on=day("2020-03-20"),
            minutes=15,
            follow_up=True,
        )
        await publish(js, late)
        await settle(lambda: processed(len(ids) + 1))
        now = (await api.get(f"/reaim/{h}")).json()
        assert now["reach"]["interactions"] == first["reach"]["interactions"] + 1
        assert now["reach"]["minutes_min"] == 15
        now_region = (await api.get("/reaim")).json()
        assert now_region["reach"]["interactions"] == region["reach"]["interactions"] + 1
        # The other hospital's kept answer still stands.
        hits = lookups("hit")
        await api.get(f"/reaim/{other}")
        await api.get(f"/reaim/{other}")
        assert lookups("hit") >= hits + 1
    finally:
        await nc.close()
        await api.aclose()


async def test_arrival_order_and_redelivery_do_not_change_the_facts(platform: Platform) -> None:
    """Upserts are order-independent: the same events applied shuffled (each message id once,
    with its stream sequence) give the same facts as in stream order, a copy included."""
    h = "h-order"
    events = program(h)
    messages = [(f"{h}:{new_id()}", seq, e) for seq, e in enumerate(events, start=1)]
    answers = []
    for order in ("stream", "shuffled"):
        schema = f"analytics_order_{uuid.uuid4().hex[:8]}"
        pool = await create_pool(platform.db_url, schema)
        await migrate(pool, schema, MIGRATIONS)
        delivered = [*messages, messages[7]]  # one message delivered twice
        if order == "shuffled":
            random.Random(6).shuffle(delivered)
        for key, seq, event in delivered:
            async with pool.acquire() as conn, conn.transaction():
                if await mark_processed(conn, key, seq):
                    await projection.project(conn, event, seq, key.split(":", 1)[1])
        async with pool.acquire() as conn:
            facts = await load_facts(conn, Scope(h))
            outcome = await conn.fetchval(
                "SELECT matching_outcome FROM referrals WHERE referral_id = 'r4'"
            )
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await pool.close()
        assert outcome == "no_supporter"  # the latest by stream sequence, whatever came first
        answers.append(
            reaim.compute(facts, scope=Scope(h), period_from=None, period_to=None).model_dump()
        )
    assert answers[0] == answers[1]
    assert answers[0]["reach"]["interactions"] == 3


# --- the region, aggregated in PostgreSQL (region.py), against reaim.compute ----------------


def _region_events(seed: int) -> list[Event]:
    """A small simulated region (postctl.simulate.straight) with what it lacks added: availability
    changes, referrals nobody could take, a physician referred twice, outreach before its
    referral is known, same-day records."""
    from postctl.simulate import region_scenario
    from postctl.simulate import straight as bench_region
    from shared.contracts import SupporterAvailabilityChanged

    plan = region_scenario(3, 2, seed)
    events = list(bench_region.events(plan))
    departments = {s.supporter_id: s.department for s in plan.supporters}
    for a in plan.availability:
        events.append(
            SupporterAvailabilityChanged(
                hospital=a.hospital,
                supporter_id=a.supporter_id,
                available=a.available,
                changed_on=a.changed_on,
                department=departments[a.supporter_id],
            )
        )
    rng = random.Random(seed)
    referrals = [e for e in events if isinstance(e, ReferralCreated)]
    for r in rng.sample(referrals, 5):
        events.append(
            NoSupporterAvailable(
                hospital=r.hospital, referral_id=r.referral_id, department=r.department,
                reason="none_eligible",
            )
        )  # fmt: skip
    h = referrals[0].hospital
    em = referrals[0].department
    again = referrals[0].model_copy(
        update={"referral_id": "again", "requested_at": at("2020-09-01T23:30")}
    )
    events += [
        again,
        OutreachDeclined(
            hospital=h, referral_id="again", supporter_id="s", at=at("2020-09-02T10:00"),
            decline_reason=None, department=em,
        ),
        InteractionCompleted(
            hospital=h, referral_id="again", supporter_id="s", occurred_on=day("2020-09-02"),
            minutes=41, department=em,
        ),
        OutreachAccepted(
            hospital=h, referral_id="unknown", supporter_id="s", at=at("2020-10-02T10:00"),
            department=em,
        ),
        InteractionCompleted(
            hospital=h, referral_id="unknown", supporter_id="s", occurred_on=day("2020-10-03"),
            minutes=17, department=em,
        ),
    ]  # fmt: skip
    return events


async def test_the_regions_figures_from_postgresql_equal_reaim_compute(platform: Platform) -> None:
    """Every key of every RE-AIM object, for the region, as aggregated in PostgreSQL and as the
    pure computation gives it from every fact, over many periods; the events applied in a
    shuffled order (first outcomes are minima, whatever came first)."""
    from services.analytics import store

    events = _region_events(4)
    delivered = list(enumerate(events, start=1))
    random.Random(8).shuffle(delivered)
    schema = f"analytics_region_{uuid.uuid4().hex[:8]}"
    pool = await create_pool(platform.db_url, schema)
    try:
        await migrate(pool, schema, MIGRATIONS)
        async with pool.acquire() as conn, conn.transaction():
            for seq, event in delivered:
                await projection.project(conn, event, seq, f"evt-{seq}")
        rng = random.Random(3)
        periods: list[tuple[date | None, date | None]] = [
            (None, None),
            (day("2020-01-01"), None),
            (None, day("2020-07-15")),
            (day("2030-01-01"), None),
            (None, day("2019-01-01")),
        ]
        for _ in range(12):
            start = day("2019-05-01").toordinal() + rng.randint(0, 900)
            length = rng.choice([1, 7, 31, 95, 400, 900])
            periods.append((date.fromordinal(start), date.fromordinal(start + length)))
        async with pool.acquire() as conn:
            facts = await load_facts(conn, Scope())
            assert len(facts.interactions) > 100
            whole = reaim.compute(
                facts, scope=Scope(), period_from=None, period_to=None
            ).model_dump()
            # The data reaches every kind of figure the comparison is meant to check.
            assert whole["implementation"]["referrals_without_supporter"] >= 1
            assert whole["implementation"]["decline_reasons"]["unspecified"] >= 1
            assert sum(whole["implementation"]["decline_reasons"].values()) >= 3
            assert whole["implementation"]["supporters_available"] > 0
            assert whole["implementation"]["hours_to_outreach_median"] is not None
            assert whole["reach"]["physicians_supported"] < len(
                {(r.hospital, r.referral_id) for r in facts.referrals}
            )
            for start, end in periods:
                expected = reaim.compute(
                    facts, scope=Scope(), period_from=start, period_to=end
                ).model_dump()
                period, answer = await store.compute(conn, Scope(), start, end)
                got = answer.model_dump()
                assert period == reaim.period_of(facts, start, end), (start, end)
                for name in reaim.OBJECTS:
                    assert got[name] == expected[name], (start, end, name)
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await pool.close()


async def test_a_gauge_refresh_exports_what_its_instance_holds_into_its_own_collector(
    platform: Platform, analytics: Service
) -> None:
    """GaugeRefresh is given what it uses (app.py): the pool, a cache, which hospitals its
    instance exports and which partitions it holds. It fills the collector it is given with the
    hospitals it exports only, and waits while its instance holds no partition."""
    h, other = f"h-{uuid.uuid4().hex[:10]}", f"h-{uuid.uuid4().hex[:10]}"
    nc = await nats.connect(platform.nats_url)
    js = nc.jetstream()
    await ensure_stream(js)
    ids = [await publish(js, e) for e in [*program(h), *program(other)]]

    async def processed() -> bool:
        async with analytics.pool.acquire() as conn:
            return bool(await conn.fetchval("SELECT count(*) FROM processed") >= len(ids))

    held: list[int] = []
    collector = gauges.ReaimCollector()
    refresh = gauges.GaugeRefresh(
        analytics.pool, answers.AnswerCache(), lambda x: x == h, lambda: held, collector
    )
    task = asyncio.create_task(refresh.run())
    try:
        await settle(processed)
        await asyncio.sleep(1.5)
        assert collector.scopes == {}  # no partition held yet: nothing computed
        held.append(0)
        await settle(lambda: _filled(collector, h))
        assert set(collector.scopes) == {h}  # neither the other hospital nor the region
        text = "\n".join(
            f"{m.name} {s.labels} {s.value}" for m in collector.collect() for s in m.samples
        )
        assert other not in text
        assert f"'hospital': '{h}'" in text
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await nc.close()


async def _filled(collector: gauges.ReaimCollector, hospital: str) -> bool:
    return bool(collector.scopes.get(hospital))
