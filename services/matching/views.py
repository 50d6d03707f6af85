"""Read side: departments with their supporter ratio, and the roster with its open load."""

from __future__ import annotations

import re
from datetime import date
from typing import Literal

import asyncpg
from fastapi import APIRouter, Request
from pydantic import BaseModel

from services.matching import domain
from shared.contracts import HOSPITAL_PATTERN, Rank, ReasonCode, Rejected
from shared.http import http_error, problem, service_of

router = APIRouter(tags=["matching"])

_HOSPITAL = re.compile(HOSPITAL_PATTERN)
_ERROR = problem()


class DepartmentView(BaseModel):
    department: str
    physician_count: int
    launched_on: date
    closed_on: date | None
    status: Literal["active", "closed"]
    active_supporters: int
    physicians_per_supporter: float | None
    meets_ratio: bool


class SupporterView(BaseModel):
    supporter_id: str
    department: str
    rank: Rank
    interventional: bool
    status: Literal["active", "retired"]
    open_assignments: int


async def _known_hospital(pool: asyncpg.Pool, hospital: str) -> None:
    if not _HOSPITAL.match(hospital):
        raise http_error(Rejected(ReasonCode.invalid_payload, "hospital: not a hospital id"))
    if await pool.fetchval("SELECT 1 FROM hospitals WHERE hospital = $1", hospital) is None:
        raise http_error(Rejected(ReasonCode.unknown_hospital, "hospital is not registered"))


@router.get(
    "/hospitals/{hospital}/departments",
    response_model=list[DepartmentView],
    responses={404: _ERROR, 422: _ERROR},
)
async def list_departments(hospital: str, request: Request) -> list[DepartmentView]:
    """The hospital's departments, with active supporters and the 1:10 supporter ratio."""
    pool = service_of(request).pool
    await _known_hospital(pool, hospital)
    rows = await pool.fetch(
        "SELECT d.department, d.physician_count, d.launched_on, d.closed_on,"
        " count(s.supporter_id) FILTER (WHERE s.retired_on IS NULL) AS active_supporters"
        " FROM departments d LEFT JOIN supporters s"
        " ON s.hospital = d.hospital AND s.department = d.department"
        " WHERE d.hospital = $1 GROUP BY d.hospital, d.department ORDER BY d.department",
        hospital,
    )
    views = []
    for row in rows:
        # A closed department's supporters are no longer active (CONTRACT.md, RE-AIM).
        active = row["active_supporters"] if row["closed_on"] is None else 0
        ratio = domain.physicians_per_supporter(row["physician_count"], active)
        views.append(
            DepartmentView(
                department=row["department"],
                physician_count=row["physician_count"],
                launched_on=row["launched_on"],
                closed_on=row["closed_on"],
                status="active" if row["closed_on"] is None else "closed",
                active_supporters=active,
                physicians_per_supporter=ratio,
                meets_ratio=domain.meets_ratio(ratio),
            )
        )
    return views


@router.get(
    "/hospitals/{hospital}/supporters",
    response_model=list[SupporterView],
    responses={404: _ERROR, 422: _ERROR},
)
async def list_supporters(hospital: str, request: Request) -> list[SupporterView]:
    """The hospital's trained supporters, their status and open assignments."""
    pool = service_of(request).pool
    await _known_hospital(pool, hospital)
    rows = await pool.fetch(
        "SELECT s.supporter_id, s.department, s.rank, s.interventional, s.retired_on,"
        " count(a.referral_id) AS open_assignments"
        " FROM supporters s LEFT JOIN assignments a ON a.hospital = s.hospital"
        " AND a.supporter_id = s.supporter_id AND a.status = 'open'"
        " WHERE s.hospital = $1 GROUP BY s.hospital, s.supporter_id"
        " ORDER BY s.department, s.supporter_id",
        hospital,
    )
    return [
        SupporterView(
            supporter_id=row["supporter_id"],
            department=row["department"],
            rank=row["rank"],
            interventional=row["interventional"],
            status="active" if row["retired_on"] is None else "retired",
            open_assignments=row["open_assignments"],
        )
        for row in rows
    ]
