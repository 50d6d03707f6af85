"""Read side: departments with their supporter ratio, and the roster with its open load and
availability. The SQL lives in store.py."""

from __future__ import annotations

from datetime import date
from typing import Literal

import asyncpg
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from services.matching import domain, store
from shared.auth import READ_RESPONSES, require_hospital_reader
from shared.contracts import Rank, ReasonCode, Rejected, is_hospital_id
from shared.http import http_error, problem
from shared.service import service_of

router = APIRouter(tags=["matching"])

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
    available: bool
    max_open_assignments: int | None


async def _known_hospital(pool: asyncpg.Pool, hospital: str) -> None:
    if not is_hospital_id(hospital):
        raise http_error(Rejected(ReasonCode.invalid_payload, "hospital: not a hospital id"))
    if not await store.hospital_known(pool, hospital):
        raise http_error(Rejected(ReasonCode.unknown_hospital, "hospital is not registered"))


@router.get(
    "/hospitals/{hospital}/departments",
    response_model=list[DepartmentView],
    responses={**READ_RESPONSES, 404: _ERROR, 422: _ERROR},
    dependencies=[Depends(require_hospital_reader)],  # its token or a region's: shared/auth.py
)
async def list_departments(hospital: str, request: Request) -> list[DepartmentView]:
    """The hospital's departments, with active supporters and the 1:10 supporter ratio."""
    pool = service_of(request).pool
    await _known_hospital(pool, hospital)
    rows = await store.departments_with_supporters(pool, hospital)
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
    responses={**READ_RESPONSES, 404: _ERROR, 422: _ERROR},
    dependencies=[Depends(require_hospital_reader)],  # its token or a region's: shared/auth.py
)
async def list_supporters(hospital: str, request: Request) -> list[SupporterView]:
    """The hospital's trained supporters, their status, availability and open assignments."""
    pool = service_of(request).pool
    await _known_hospital(pool, hospital)
    rows = await store.supporters_with_load(pool, hospital)
    return [
        SupporterView(
            supporter_id=row["supporter_id"],
            department=row["department"],
            rank=row["rank"],
            interventional=row["interventional"],
            status="active" if row["retired_on"] is None else "retired",
            open_assignments=row["open_assignments"],
            available=row["available"],
            max_open_assignments=row["max_open_assignments"],
        )
        for row in rows
    ]
