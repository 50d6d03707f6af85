"""The fact rows of a scope, read in one snapshot, and the RE-AIM answer as served: its schema
(also the OpenAPI of the routes in views.py) and its rendering. No FastAPI: the gauge refresh
renders answers too."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any, Literal, TypeVar

import asyncpg
import structlog
from pydantic import BaseModel, ConfigDict, Field

from services.analytics import answers, domain, reaim

# --- loading facts --------------------------------------------------------------------------

_TABLES: dict[str, type[Any]] = {
    "hospitals": domain.Hospital,
    "departments": domain.Department,
    "supporters": domain.Supporter,
    "referrals": domain.Referral,
    "outreach": domain.Outreach,
    "interactions": domain.Interaction,
    "surveys": domain.SurveyResponse,
    "availability_changes": domain.AvailabilityChange,
}
_SELECT = {
    table: "SELECT " + ", ".join(f.name for f in dataclasses.fields(cls)) + f" FROM {table}"
    for table, cls in _TABLES.items()
}


def snapshot(conn: asyncpg.Connection) -> Any:
    """A read-only transaction whose queries all see one snapshot: versions and facts agree."""
    return conn.transaction(isolation="repeatable_read", readonly=True)


T = TypeVar("T")
log = structlog.get_logger()

# What a read that raced a rebuild's schema swap (rebuild.py) may meet:
# - plans cached for the old tables, tables dropped under it ("could not open relation",
#   XX000);
# - a deadlock: the swap locks every table in turn while the read holds one it has read and
#   waits for one the swap already holds; PostgreSQL breaks it by aborting either side.
SWAPPED = (
    asyncpg.exceptions.InvalidCachedStatementError,
    asyncpg.exceptions.UndefinedTableError,
    asyncpg.exceptions.InternalServerError,
    asyncpg.exceptions.TransactionRollbackError,  # deadlock_detected, serialization_failure
)
SWAP_RETRIES = 5


async def read_snapshot(
    pool: asyncpg.Pool, read: Callable[[asyncpg.Connection], Awaitable[T]]
) -> T:
    """`read` in one read-only snapshot of the pool's database, asked again (a few times, a
    little later each time) when it raced a rebuild's schema swap. The read has written
    nothing, so asking again is always safe; the next attempt waits behind the swap's locks
    and finds the new tables in place."""
    for attempt in range(1, SWAP_RETRIES + 1):
        try:
            async with pool.acquire() as conn, snapshot(conn):
                return await read(conn)
        except SWAPPED as exc:
            if attempt == SWAP_RETRIES:
                raise
            log.info("analytics_read_retried", error=type(exc).__name__, attempt=attempt)
            await asyncio.sleep(0.02 * attempt)
    raise AssertionError("unreachable")


async def scope_version(conn: asyncpg.Connection, scope: domain.Scope) -> int:
    """The version of the scope's facts (answers.py): its hospital's, or the region's sum."""
    if scope.hospital is None:
        return int(await conn.fetchval("SELECT coalesce(sum(version), 0) FROM scope_versions"))
    found = await conn.fetchval(
        "SELECT version FROM scope_versions WHERE hospital = $1", scope.hospital
    )
    return int(found or 0)


async def hospital_versions(conn: asyncpg.Connection) -> dict[str, int]:
    return {r[0]: r[1] for r in await conn.fetch("SELECT hospital, version FROM scope_versions")}


async def load_facts(
    conn: asyncpg.Connection, scope: domain.Scope, hospitals: list[str] | None = None
) -> domain.Facts:
    """The scope's fact rows (or those of `hospitals`: a few at a time, never the region's),
    one indexed query per table, from one consistent snapshot (the caller's, when it has
    opened one)."""
    if not conn.is_in_transaction():
        async with snapshot(conn):
            return await load_facts(conn, scope, hospitals)
    rows: dict[str, list[Any]] = {}
    for table, cls in _TABLES.items():
        sql, args = _SELECT[table], list[Any]()
        if hospitals is not None:
            sql, args = sql + " WHERE hospital = ANY($1::text[])", [hospitals]
        elif scope.hospital is not None:
            sql, args = sql + " WHERE hospital = $1", [scope.hospital]
            if scope.department is not None and table != "hospitals":
                sql, args = sql + " AND department = $2", [scope.hospital, scope.department]
        rows[table] = [cls(*record) for record in await conn.fetch(sql, *args)]
    return domain.Facts(**rows)


def facts_by_hospital(facts: domain.Facts) -> dict[str, domain.Facts]:
    """Region facts split per hospital (for the gauges: one load, many scopes)."""
    parts: dict[str, dict[str, list[Any]]] = defaultdict(lambda: {t: [] for t in _TABLES})
    for table in _TABLES:
        for fact in getattr(facts, table):
            parts[fact.hospital][table].append(fact)
    return {hospital: domain.Facts(**tables) for hospital, tables in parts.items()}


# --- answer schema (OpenAPI) ----------------------------------------------------------------


class ScopeView(BaseModel):
    level: Literal["region", "hospital", "department"]
    hospital: str | None = None
    department: str | None = None


class PeriodView(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: date | None = Field(alias="from", description="inclusive; null: no start")
    to: date | None = Field(
        description="exclusive; without `to` in the request, the day after the scope's last fact"
    )


class ReaimAnswer(domain.Figures):
    """The five RE-AIM objects of one scope and period, as served."""

    scope: ScopeView
    period: PeriodView


class DepartmentEntry(BaseModel):
    department: str
    physician_count: int
    launched_on: date | None
    closed_on: date | None


class HospitalEntry(BaseModel):
    hospital: str
    physician_count: int | None
    departments: list[DepartmentEntry]


class HospitalValue(BaseModel):
    hospital: str
    value: int | float | None = Field(description="as GET /reaim/{hospital} answers it")


class HospitalRanking(BaseModel):
    """One figure of every hospital over one period, sorted: the spread across hospitals."""

    model_config = ConfigDict(populate_by_name=True)

    figure: str = Field(description="`object.key` of the RE-AIM answer")
    figures: list[str] = Field(description="every figure the hospitals can be ranked by")
    order: Literal["desc", "asc"] = Field(description="by value, nulls last; ties by hospital")
    from_: date | None = Field(alias="from", description="as asked: inclusive; null: none")
    to: date | None = Field(description="as asked: exclusive; null: each hospital's last fact")
    total: int = Field(description="hospitals seen (as GET /hospitals lists them)")
    offset: int
    limit: int
    hospitals: list[HospitalValue] = Field(description="this page of the ranking")


# --- rendering ------------------------------------------------------------------------------


def render(scope: domain.Scope, period: reaim.Period, figures: domain.Figures) -> bytes:
    """The answer as served: JSON of `ReaimAnswer` (its aliases: `from`)."""
    answer = ReaimAnswer(
        scope=ScopeView.model_validate(scope.as_dict()),
        period=PeriodView.model_validate({"from": period.start, "to": period.end}),
        **{name: getattr(figures, name) for name in domain.Figures.model_fields},
    )
    return answer.model_dump_json(by_alias=True).encode()


def answer_key(scope: domain.Scope, start: date | None, end: date | None) -> answers.Key:
    return (scope.hospital, scope.department, start, end)
