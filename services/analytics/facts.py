"""The fact rows of a scope, read in one snapshot, and the RE-AIM answer as served: its schema
(also the OpenAPI of the routes in views.py) and its rendering. No FastAPI: the gauge refresh
renders answers too."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from datetime import date
from typing import Any, Literal

import asyncpg
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

Rate = float | None


class MonthCount(BaseModel):
    month: str = Field(description="YYYY-MM")
    interactions: int


class Reach(BaseModel):
    """How many physicians the program reaches."""

    supporters_trained: int = Field(description="SupporterTrained in the period")
    referrals: int = Field(description="ReferralCreated in the period")
    referrals_by_source: dict[str, int]
    interactions: int = Field(description="InteractionCompleted in the period")
    interactions_by_department: dict[str, int] = Field(
        description="by department slug (summed over hospitals at region scope)"
    )
    physicians_supported: int = Field(description="distinct physicians with an interaction")
    eligible_physicians: int = Field(
        description="physician_count of departments launched and not closed before the end"
    )
    reach_rate: Rate = Field(description="physicians_supported / eligible_physicians")
    minutes_mean: float | None
    minutes_median: float | None
    minutes_min: int | None
    minutes_max: int | None
    monthly: list[MonthCount] = Field(
        description="every calendar month overlapping the period, zeros included"
    )
    monthly_mean: float | None
    monthly_median: float | None
    monthly_min: int | None
    monthly_max: int | None


class Effectiveness(BaseModel):
    """Whether it helps, from the department survey."""

    respondents_with_interaction: int
    helpful_rate: Rate = Field(description="helpful >= 4 among respondents with an interaction")
    wellbeing_improved_rate: Rate
    comfort_improved_rate: Rate
    escalation_rate: Rate = Field(description="escalated interactions / interactions")


class Adoption(BaseModel):
    """Who takes the program up."""

    hospitals_adopted: int
    departments_launched: int = Field(description="launched before the end, closed included")
    physician_coverage: Rate = Field(
        description="eligible physicians / physician_count of the registered hospitals in scope"
    )
    outreach_acceptance_rate: Rate = Field(
        description="first outcome accepted / first outcome accepted or declined"
    )
    would_recommend_rate: Rate = Field(description="among survey responses with aware")
    departments_without_referrals: int


class Implementation(BaseModel):
    """How faithfully it is run."""

    outreach_within_48h_rate: Rate = Field(
        description="first outreach or interaction at most 48 h after requested_at"
    )
    hours_to_outreach_median: float | None
    physicians_per_active_supporter: float | None = Field(description="goal <= 10")
    referrals_without_supporter: int = Field(
        description="latest matching outcome is NoSupporterAvailable"
    )
    supporters_available: int = Field(
        description="active supporters whose latest SupporterAvailabilityChanged with changed_on"
        " before the end says available (or who have none)"
    )
    decline_reasons: dict[str, int]


class Maintenance(BaseModel):
    """Whether it lasts."""

    supporters_active: int
    supporter_retention_rate: Rate
    departments_active_rate: Rate
    interactions_by_program_year: list[int] = Field(description="from program year 1")
    monthly_rate_by_program_year: list[float]


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


class ReaimAnswer(BaseModel):
    scope: ScopeView
    period: PeriodView
    reach: Reach
    effectiveness: Effectiveness
    adoption: Adoption
    implementation: Implementation
    maintenance: Maintenance


class DepartmentEntry(BaseModel):
    department: str
    physician_count: int
    launched_on: date | None
    closed_on: date | None


class HospitalEntry(BaseModel):
    hospital: str
    physician_count: int | None
    departments: list[DepartmentEntry]


# --- rendering ------------------------------------------------------------------------------


def render(scope: domain.Scope, period: reaim.Period, figures: dict[str, Any]) -> bytes:
    """The answer as served: JSON of `ReaimAnswer` (its aliases: `from`)."""
    answer = {
        "scope": scope.as_dict(),
        "period": {"from": period.start, "to": period.end},
        **figures,
    }
    return ReaimAnswer.model_validate(answer).model_dump_json(by_alias=True).encode()


def answer_key(scope: domain.Scope, start: date | None, end: date | None) -> answers.Key:
    return (scope.hospital, scope.department, start, end)
