"""The RE-AIM answers over HTTP and the hospital list: every scope's figures from the
pre-aggregated read models (store.py), rendered by facts.py."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date
from typing import Any, Literal, TypeVar, cast

import asyncpg
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from services.analytics import answers, domain, store
from services.analytics.facts import (
    HospitalEntry,
    HospitalRanking,
    ReaimAnswer,
    answer_key,
    hospital_versions,
    read_snapshot,
    render,
    scope_version,
)
from shared.auth import (
    READ_RESPONSES,
    REGION_RESPONSES,
    require_hospital_reader,
    require_region_token,
)
from shared.contracts import ReasonCode, Rejected, is_hospital_id
from shared.http import HttpRejection, http_error, problem
from shared.service import service_of

router = APIRouter(tags=["analytics"])
T = TypeVar("T")

_ERROR = problem()
_RESPONSES: dict[int | str, dict[str, Any]] = {404: _ERROR, 422: _ERROR}
# The API tokens (shared/auth.py): a hospital's data to its token or a region token, the
# region's to a region token.
_HOSPITAL: dict[str, Any] = {
    "responses": {**READ_RESPONSES, **_RESPONSES},
    "dependencies": [Depends(require_hospital_reader)],
}
_REGION: dict[str, Any] = {
    "responses": {**REGION_RESPONSES, **_RESPONSES},
    "dependencies": [Depends(require_region_token)],
}
_FROM = Query(None, alias="from", description="ISO date, inclusive")
_TO = Query(None, alias="to", description="ISO date, exclusive")

# --- routes ---------------------------------------------------------------------------------


def _date(value: str | None, name: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise http_error(
            Rejected(ReasonCode.invalid_payload, f"{name}: not an ISO date (YYYY-MM-DD)")
        ) from None


def _period(period_from: str | None, period_to: str | None) -> tuple[date | None, date | None]:
    start, end = _date(period_from, "from"), _date(period_to, "to")
    if start is not None and end is not None and start >= end:
        raise http_error(Rejected(ReasonCode.invalid_payload, "from must be before to"))
    return start, end


async def _read(request: Request, read: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """`read` in one read-only snapshot of the service's database (facts.read_snapshot: asked
    again when it raced a rebuild's schema swap)."""
    return await read_snapshot(service_of(request).pool, read)


async def answer_body(
    conn: asyncpg.Connection,
    cache: answers.AnswerCache,
    scope: domain.Scope,
    start: date | None,
    end: date | None,
    version: int | None = None,
) -> bytes:
    """The scope's answer over [start, end) as served (JSON of ReaimAnswer), in the caller's
    snapshot: kept in `cache` at the scope's version (given, or read here), else computed and
    kept. The one way to an answer: GET /reaim... and GET /reaim-hospitals both ask it, so a
    hospital's figure in the ranking is the figure on its own page. 404 for an unknown
    hospital or department."""
    if version is None:
        version = await scope_version(conn, scope)
    key = answer_key(scope, start, end)
    body = cache.get(key, version)
    if body is None:
        await _known(conn, scope)
        period, figures = await store.compute(conn, scope, start, end)
        body = render(scope, period, figures)
        cache.put(key, version, body)
    return body


async def _answer(
    request: Request, scope: domain.Scope, period_from: str | None, period_to: str | None
) -> Response:
    start, end = _period(period_from, period_to)
    cache = answers.cache_for(service_of(request).name)
    body = await _read(request, lambda conn: answer_body(conn, cache, scope, start, end))
    return Response(body, media_type="application/json")


KNOWN_HOSPITAL_SQL = """
SELECT EXISTS (SELECT 1 FROM hospitals WHERE hospital = $1)
    OR EXISTS (SELECT 1 FROM departments WHERE hospital = $1)
"""
LAUNCHED_SQL = """
SELECT EXISTS (SELECT 1 FROM departments
    WHERE hospital = $1 AND department = $2 AND launched_on IS NOT NULL)
"""


async def _known(conn: asyncpg.Connection, scope: domain.Scope) -> None:
    """A hospital seen (registered, or with a department), a department launched: else 404."""
    if scope.hospital is None:
        return
    if not await conn.fetchval(KNOWN_HOSPITAL_SQL, scope.hospital):
        raise HttpRejection(404, ReasonCode.unknown_hospital, "no such hospital")
    if scope.department is not None and not await conn.fetchval(
        LAUNCHED_SQL, scope.hospital, scope.department
    ):
        raise HttpRejection(404, ReasonCode.unknown_department, "no such department launched")


@router.get("/reaim", response_model=ReaimAnswer, **_REGION)
async def reaim_region(
    request: Request, period_from: str | None = _FROM, period_to: str | None = _TO
) -> Response:
    """The RE-AIM figures of the whole region (every hospital)."""
    return await _answer(request, domain.Scope(), period_from, period_to)


@router.get("/reaim/{hospital}", response_model=ReaimAnswer, **_HOSPITAL)
async def reaim_hospital(
    request: Request, hospital: str, period_from: str | None = _FROM, period_to: str | None = _TO
) -> Response:
    """The RE-AIM figures of one hospital."""
    return await _answer(request, domain.Scope(hospital), period_from, period_to)


@router.get("/reaim/{hospital}/{department}", response_model=ReaimAnswer, **_HOSPITAL)
async def reaim_department(
    request: Request,
    hospital: str,
    department: str,
    period_from: str | None = _FROM,
    period_to: str | None = _TO,
) -> Response:
    """The RE-AIM figures of one department of a hospital."""
    return await _answer(request, domain.Scope(hospital, department), period_from, period_to)


# --- the spread across hospitals (issue 26) --------------------------------------------------

ORDERS = ("desc", "asc")
MAX_LIMIT = 500
SEEN_SQL = "SELECT hospital FROM hospitals UNION SELECT hospital FROM departments ORDER BY 1"


@dataclass(frozen=True, slots=True)
class RankingQuery:
    figure: str  # "object.key", one of domain.RANKED
    order: Literal["desc", "asc"] = "desc"
    limit: int = 50
    offset: int = 0
    start: date | None = None
    end: date | None = None


def ranking_query(
    figure: str,
    order: str = "desc",
    limit: int = 50,
    offset: int = 0,
    period_from: str | None = None,
    period_to: str | None = None,
) -> RankingQuery:
    """The ranking asked for, or a 422 (invalid_payload) that names what is wrong, never the
    value sent."""

    def refuse(detail: str) -> HttpRejection:
        return http_error(Rejected(ReasonCode.invalid_payload, detail))

    if figure not in domain.RANKED:
        raise refuse(
            "figure: not one of the figures hospitals are ranked by ("
            + ", ".join(domain.RANKED)
            + ")"
        )
    if order not in ORDERS:
        raise refuse("order: desc or asc")
    if not 1 <= limit <= MAX_LIMIT:
        raise refuse(f"limit: from 1 to {MAX_LIMIT}")
    if offset < 0:
        raise refuse("offset: 0 or more")
    start, end = _period(period_from, period_to)
    return RankingQuery(figure, cast(Literal["desc", "asc"], order), limit, offset, start, end)


Spread = dict[str, list[tuple[str, int | float | None]]]  # figure -> [(hospital, value)]
# Every ranked figure of every hospital over a period, as read from their answers, kept at the
# region's version (the sum of the hospitals'): while it holds no hospital's facts changed, so
# another order, page or figure is a sort, not 6,000 answers read again. A few periods only.
_SPREADS: OrderedDict[tuple[answers.AnswerCache, date | None, date | None], tuple[int, Spread]]
_SPREADS = OrderedDict()
SPREADS_KEPT = 8


async def _spread(
    conn: asyncpg.Connection, cache: answers.AnswerCache, start: date | None, end: date | None
) -> Spread:
    version = await scope_version(conn, domain.Scope())
    kept = _SPREADS.get((cache, start, end))
    if kept is not None and kept[0] == version:
        _SPREADS.move_to_end((cache, start, end))
        return kept[1]
    versions = await hospital_versions(conn)
    spread: Spread = {figure: [] for figure in domain.RANKED}
    keys = [(figure, *figure.split(".")) for figure in domain.RANKED]
    for (hospital,) in await conn.fetch(SEEN_SQL):
        body = await answer_body(
            conn, cache, domain.Scope(hospital), start, end, versions.get(hospital, 0)
        )
        answer = json.loads(body)
        for figure, part, key in keys:
            spread[figure].append((hospital, answer[part][key]))
    _SPREADS[(cache, start, end)] = (version, spread)
    _SPREADS.move_to_end((cache, start, end))
    while len(_SPREADS) > SPREADS_KEPT:
        _SPREADS.popitem(last=False)
    return spread


async def ranking(
    conn: asyncpg.Connection, cache: answers.AnswerCache, query: RankingQuery
) -> HospitalRanking:
    """Every hospital seen, by one figure of its answer over the period (answer_body's, cache
    and all), sorted by value (nulls last either way, ties by hospital id); one page of it.
    In the caller's snapshot."""
    values = list((await _spread(conn, cache, query.start, query.end))[query.figure])
    sign = -1 if query.order == "desc" else 1
    values.sort(key=lambda hv: (hv[1] is None, sign * (hv[1] or 0), hv[0]))
    page = values[query.offset : query.offset + query.limit]
    return HospitalRanking.model_validate(
        {
            "figure": query.figure,
            "figures": list(domain.RANKED),
            "order": query.order,
            "from": query.start,
            "to": query.end,
            "total": len(values),
            "offset": query.offset,
            "limit": query.limit,
            "hospitals": [{"hospital": h, "value": v} for h, v in page],
        }
    )


@router.get("/reaim-hospitals", response_model=HospitalRanking, **_REGION)
async def reaim_hospitals(
    request: Request,
    figure: str = Query(
        description="the figure, as `object.key` of the RE-AIM answer",
        json_schema_extra={"enum": list(domain.RANKED)},
    ),
    order: str = Query("desc", json_schema_extra={"enum": list(ORDERS)}),
    limit: int = Query(50, json_schema_extra={"minimum": 1, "maximum": MAX_LIMIT}),
    offset: int = Query(0, json_schema_extra={"minimum": 0}),
    period_from: str | None = _FROM,
    period_to: str | None = _TO,
) -> HospitalRanking:
    """One RE-AIM figure of every hospital over a period, sorted and paged: the spread across
    the region's hospitals. Each value is the one GET /reaim/{hospital} answers for the same
    period."""
    query = ranking_query(figure, order, limit, offset, period_from, period_to)
    cache = answers.cache_for(service_of(request).name)
    return await _read(request, lambda conn: ranking(conn, cache, query))


@router.get("/hospitals", response_model=list[HospitalEntry], **_REGION)
async def hospitals(request: Request) -> list[dict[str, Any]]:
    """Every hospital seen, with its departments (for dashboard pickers)."""
    return await _hospital_entries(request, None)


@router.get("/hospitals/{hospital}", response_model=HospitalEntry, **_HOSPITAL)
async def hospital_entry(request: Request, hospital: str) -> dict[str, Any]:
    """One hospital with its departments (the dashboard's pickers for a hospital's token)."""
    found = await _hospital_entries(request, hospital) if is_hospital_id(hospital) else []
    if not found:
        raise HttpRejection(404, ReasonCode.unknown_hospital, "no such hospital")
    return found[0]


async def _hospital_entries(request: Request, hospital: str | None) -> list[dict[str, Any]]:
    async def read(conn: asyncpg.Connection) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
        registered = await conn.fetch(
            "SELECT hospital, physician_count FROM hospitals"
            " WHERE $1::text IS NULL OR hospital = $1",
            hospital,
        )
        departments = await conn.fetch(
            "SELECT hospital, department, physician_count, launched_on, closed_on"
            " FROM departments WHERE $1::text IS NULL OR hospital = $1"
            " ORDER BY hospital, department",
            hospital,
        )
        return registered, departments

    registered, departments = await _read(request, read)
    entries: dict[str, dict[str, Any]] = {
        r["hospital"]: {**dict(r), "departments": []} for r in registered
    }
    for d in departments:
        entry = entries.setdefault(
            d["hospital"],
            {"hospital": d["hospital"], "physician_count": None, "departments": []},
        )
        entry["departments"].append({k: v for k, v in dict(d).items() if k != "hospital"})
    return [entries[h] for h in sorted(entries)]
