"""The spread across hospitals (GET /reaim-hospitals, issue 26): one figure of every hospital
over a period, sorted and paged. A few hospitals' events projected into a schema of their own
(real PostgreSQL), then the ranking asked directly and over HTTP (the analytics router in
process, a real region token): its order, ties and nulls, its pages, its periods, its refusals,
and every value against the hospital's own GET /reaim/{hospital} answer.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from services.analytics import answers, domain, projection, store, views
from services.analytics.facts import answer_key, hospital_versions, render, snapshot
from services.analytics.rebuild import MIGRATIONS
from shared.auth import TOKENS_FILE_VARIABLE, issue_region_token, issue_token
from shared.contracts import (
    DepartmentLaunched,
    Event,
    HospitalRegistered,
    OutreachAccepted,
    OutreachDeclined,
    Rank,
    ReferralCreated,
)
from shared.eventstore import create_pool, migrate
from shared.http import HttpRejection, install_error_handlers
from shared.runtime import Platform

pytestmark = pytest.mark.integration

DEPARTMENT = "emergency-medicine"
Y2024 = {"from": "2024-01-01", "to": "2025-01-01"}

# hospital -> [(requested on, first outcome or None)]: referrals and their outreach.
HISTORY: dict[str, list[tuple[date, str | None]]] = {
    "h-rank-a": [
        (date(2024, 2, 1), "accepted"),
        (date(2024, 3, 1), "accepted"),
        (date(2024, 4, 1), "declined"),
    ],
    "h-rank-b": [(date(2024, 5, 1), "accepted")],
    "h-rank-c": [(date(2024, 2, 1), None), (date(2024, 6, 1), None), (date(2024, 7, 1), None)],
    "h-rank-d": [(date(2025, 3, 1), "accepted"), *[(date(2025, 3, 2), None)] * 4],
    "h-rank-e": [(date(2024, 8, 1), "declined"), (date(2024, 9, 1), None)],
}


def _at(day: date, hour: int = 9) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def events() -> list[Event]:
    found: list[Event] = []
    for h, referrals in HISTORY.items():
        found.append(HospitalRegistered(hospital=h, name="General", physician_count=100))
        found.append(
            DepartmentLaunched(
                hospital=h, department=DEPARTMENT, physician_count=20,
                launched_on=date(2024, 1, 1),
            )
        )  # fmt: skip
        for k, (day, outcome) in enumerate(referrals):
            rid = f"r{k}"
            found.append(
                ReferralCreated(
                    hospital=h, referral_id=rid, physician_id=f"p{k}", department=DEPARTMENT,
                    rank=Rank.attending, source="self", event_nature="other",
                    requested_at=_at(day),
                )
            )  # fmt: skip
            common: dict[str, Any] = {
                "hospital": h, "referral_id": rid, "supporter_id": "s0", "at": _at(day, 12),
                "department": DEPARTMENT,
            }  # fmt: skip
            if outcome == "accepted":
                found.append(OutreachAccepted(**common))
            elif outcome == "declined":
                found.append(OutreachDeclined(**common, decline_reason="no_time"))
    return found


@dataclass
class Ranked:
    pool: asyncpg.Pool
    cache: answers.AnswerCache
    http: httpx.AsyncClient
    region: str
    hospital: str


@pytest.fixture(scope="module")
async def ranked(
    platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Ranked]:
    schema = f"analytics_rank_{uuid.uuid4().hex[:8]}"
    pool = await create_pool(platform.db_url, schema)
    tokens = Path(tmp_path_factory.mktemp("ranking-tokens")) / "api-tokens.json"
    mp = pytest.MonkeyPatch()
    mp.setenv(TOKENS_FILE_VARIABLE, str(tokens))  # the routes read it on every request
    try:
        await migrate(pool, schema, MIGRATIONS)
        async with pool.acquire() as conn, conn.transaction():
            for index, event in enumerate(events()):
                await projection.project(conn, event, index + 1, f"evt-{index}")
        # The analytics routes as the service mounts them, on this schema's pool.
        app = FastAPI()
        install_error_handlers(app)
        app.include_router(views.router)
        app.state.service = _Service(schema, pool)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield Ranked(
                pool,
                answers.cache_for(schema),
                http,
                issue_region_token("ranking", tokens),
                issue_token("h-rank-a", tokens),
            )
    finally:
        mp.undo()
        async with pool.acquire() as conn:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await pool.close()


@dataclass
class _Service:
    """What the analytics routes ask of their service: its name (the cache's) and its pool."""

    name: str
    pool: asyncpg.Pool


async def rank(r: Ranked, figure: str, **params: Any) -> dict[str, Any]:
    period = {"period_from": params.pop("from", None), "period_to": params.pop("to", None)}
    query = views.ranking_query(figure, **params, **period)
    async with r.pool.acquire() as conn, snapshot(conn):
        found = await views.ranking(conn, r.cache, query)
    return found.model_dump(mode="json", by_alias=True)


def listed(answer: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(e["hospital"], e["value"]) for e in answer["hospitals"]]


async def test_hospitals_are_sorted_by_the_figure_ties_by_id(ranked: Ranked) -> None:
    answer = await rank(ranked, "reach.referrals")
    assert (answer["figure"], answer["order"], answer["total"]) == ("reach.referrals", "desc", 5)
    assert (answer["offset"], answer["limit"], answer["from"], answer["to"]) == (0, 50, None, None)
    assert answer["figures"] == list(domain.RANKED)
    expected = [("h-rank-d", 5), ("h-rank-a", 3), ("h-rank-c", 3), ("h-rank-e", 2)]
    assert listed(answer) == [*expected, ("h-rank-b", 1)]
    ascending = await rank(ranked, "reach.referrals", order="asc")
    assert listed(ascending) == [
        ("h-rank-b", 1),
        ("h-rank-e", 2),
        ("h-rank-a", 3),
        ("h-rank-c", 3),
        ("h-rank-d", 5),
    ]


async def test_nulls_come_last_in_both_orders(ranked: Ranked) -> None:
    figure = "adoption.outreach_acceptance_rate"  # c had no outreach: no rate
    down = listed(await rank(ranked, figure))
    assert [h for h, _ in down] == ["h-rank-b", "h-rank-d", "h-rank-a", "h-rank-e", "h-rank-c"]
    assert down[-1] == ("h-rank-c", None) and down[0] == ("h-rank-b", 1.0)
    up = listed(await rank(ranked, figure, order="asc"))
    assert [h for h, _ in up] == ["h-rank-e", "h-rank-a", "h-rank-b", "h-rank-d", "h-rank-c"]
    # Within 2024, d (all of whose referrals came in 2025) has none either.
    in_2024 = listed(await rank(ranked, figure, order="asc", **Y2024))
    assert in_2024[-2:] == [("h-rank-c", None), ("h-rank-d", None)]


async def test_pages(ranked: Ranked) -> None:
    whole = listed(await rank(ranked, "reach.referrals"))
    pages = [await rank(ranked, "reach.referrals", limit=2, offset=k) for k in (0, 2, 4, 6)]
    assert [listed(p) for p in pages] == [whole[0:2], whole[2:4], whole[4:], []]
    assert {p["total"] for p in pages} == {5}
    assert [(p["offset"], p["limit"]) for p in pages] == [(0, 2), (2, 2), (4, 2), (6, 2)]


async def test_a_period_counts_only_its_own_days(ranked: Ranked) -> None:
    answer = await rank(ranked, "reach.referrals", **Y2024)
    assert (answer["from"], answer["to"]) == ("2024-01-01", "2025-01-01")
    assert listed(answer) == [
        ("h-rank-a", 3),
        ("h-rank-c", 3),
        ("h-rank-e", 2),
        ("h-rank-b", 1),
        ("h-rank-d", 0),
    ]
    only_2025 = listed(await rank(ranked, "reach.referrals", **{"from": "2025-01-01"}))
    assert only_2025[0] == ("h-rank-d", 5) and {v for _, v in only_2025[1:]} == {0}


async def test_every_value_is_the_hospitals_own_answer(ranked: Ranked) -> None:
    bearer = {"Authorization": f"Bearer {ranked.region}"}
    for period in ({}, Y2024, {"from": "2024-06-01"}, {"to": "2024-07-01"}):
        start = date.fromisoformat(period["from"]) if "from" in period else None
        end = date.fromisoformat(period["to"]) if "to" in period else None
        pages = {
            figure: {h: v for h, v in listed(await rank(ranked, figure, **period))}
            for figure in domain.RANKED
        }
        async with ranked.pool.acquire() as conn, snapshot(conn):
            versions = await hospital_versions(conn)
            for h in HISTORY:
                scope = domain.Scope(h)
                # The hospital's page, over HTTP, and the same answer computed afresh.
                got = await ranked.http.get(f"/reaim/{h}", params=period, headers=bearer)
                assert got.status_code == 200, got.text
                page = got.json()
                fresh = json.loads(render(scope, *await store.compute(conn, scope, start, end)))
                assert page == fresh
                for figure, values in pages.items():
                    part, key = figure.split(".")
                    assert values[h] == page[part][key], (h, figure, period)
                # The same cache: the ranking kept the answer the page was then served from.
                assert ranked.cache.get(answer_key(scope, start, end), versions[h]) is not None


async def test_over_http_for_a_region_token_only(ranked: Ranked) -> None:
    params = {"figure": "reach.referrals", "order": "asc", "limit": "2", **Y2024}
    got = await ranked.http.get(
        "/reaim-hospitals", params=params, headers={"Authorization": f"Bearer {ranked.region}"}
    )
    assert got.status_code == 200, got.text
    assert got.json() == await rank(ranked, "reach.referrals", order="asc", limit=2, **Y2024)
    refused = await ranked.http.get(
        "/reaim-hospitals", params=params, headers={"Authorization": f"Bearer {ranked.hospital}"}
    )
    assert (refused.status_code, refused.json()["reason_code"]) == (403, "forbidden")
    assert (await ranked.http.get("/reaim-hospitals", params=params)).status_code == 401


BAD = [
    ({"figure": "reach.no_such_figure"}, "figure"),
    ({"figure": "reach.referrals_by_source"}, "figure"),  # not a number
    ({"figure": "referrals"}, "figure"),  # without its object
    ({"figure": "reach.referrals", "limit": "0"}, "limit"),
    ({"figure": "reach.referrals", "limit": "501"}, "limit"),
    ({"figure": "reach.referrals", "limit": "many"}, "limit"),
    ({"figure": "reach.referrals", "offset": "-1"}, "offset"),
    ({"figure": "reach.referrals", "order": "up"}, "order"),
    ({"figure": "reach.referrals", "from": "2024-13-01"}, "from"),
    ({"figure": "reach.referrals", "to": "yesterday"}, "to"),
    ({"figure": "reach.referrals", "from": "2024-02-01", "to": "2024-01-01"}, "from"),
    ({}, "figure"),
]


@pytest.mark.parametrize(("params", "named"), BAD)
async def test_bad_input_is_a_422_with_its_reason(
    ranked: Ranked, params: dict[str, str], named: str
) -> None:
    got = await ranked.http.get(
        "/reaim-hospitals", params=params, headers={"Authorization": f"Bearer {ranked.region}"}
    )
    assert got.status_code == 422, got.text
    body = got.json()
    assert set(body) == {"reason_code", "detail"} and body["reason_code"] == "invalid_payload"
    assert named in body["detail"]
    for value in params.values():  # a refusal never echoes what was sent
        if not value.isdigit() and not any(value in figure for figure in domain.RANKED):
            assert value not in body["detail"], body


async def test_the_ranking_query_refuses_directly_too() -> None:
    for kwargs in (
        {"figure": "reach.nope"},
        {"figure": "reach.referrals", "limit": 0},
        {"figure": "reach.referrals", "limit": 501},
        {"figure": "reach.referrals", "order": "sideways"},
        {"figure": "reach.referrals", "period_from": "not-a-date"},
    ):
        with pytest.raises(HttpRejection) as refused:
            views.ranking_query(**kwargs)  # type: ignore[arg-type]
        assert (refused.value.status, refused.value.reason_code) == (422, "invalid_payload")
    assert views.ranking_query("reach.referrals", limit=500).limit == 500


async def test_a_new_fact_is_in_the_next_ranking(ranked: Ranked) -> None:
    # Last in the module: it adds a hospital. Kept rankings are kept at the region's version,
    # so the next one after any fact is read afresh.
    before = await rank(ranked, "reach.referrals", **Y2024)
    again = await rank(ranked, "reach.referrals", order="asc", **Y2024)
    assert listed(again)[-2:] == listed(before)[:2]  # a and c tie: by id in both orders
    more: list[Event] = [
        HospitalRegistered(hospital="h-rank-f", name="General", physician_count=100),
        *(
            ReferralCreated(
                hospital="h-rank-f", referral_id=f"r{k}", physician_id=f"p{k}",
                department=DEPARTMENT, rank=Rank.attending, source="self",
                event_nature="other", requested_at=_at(date(2024, 10, 1 + k)),
            )
            for k in range(4)
        ),
    ]  # fmt: skip
    async with ranked.pool.acquire() as conn, conn.transaction():
        for index, event in enumerate(more):
            await projection.project(conn, event, 1000 + index, f"evt-more-{index}")
    after = await rank(ranked, "reach.referrals", **Y2024)
    assert after["total"] == 6
    assert listed(after)[0] == ("h-rank-f", 4) and listed(after)[1:] == listed(before)
