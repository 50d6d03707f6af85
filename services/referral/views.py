"""The HTTP intake beside the NATS one, and the status of a referral (read side)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from services.referral import domain
from shared.auth import AUTH_RESPONSES, require_hospital_token
from shared.contracts import (
    HOSPITAL_PATTERN,
    ID_PATTERN,
    ReasonCode,
    ReferralCreated,
    Rejected,
    RequestReferral,
)
from shared.http import command_body, http_error, problem, read_command, service_of

router = APIRouter(tags=["referrals"])

HospitalPath = Annotated[str, Path(pattern=HOSPITAL_PATTERN, description="The hospital's slug.")]
ReferralPath = Annotated[str, Path(pattern=ID_PATTERN, description="The hospital's referral id.")]


class ReferralAccepted(BaseModel):
    referral_id: str
    status: str


class ReferralStatus(BaseModel):
    hospital: str
    referral_id: str
    department: str
    source: str
    status: str
    supporter_id: str | None
    interactions: int
    requested_at: str


_PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: problem(why)
    for code, why in (
        (404, "unknown_hospital"),
        (409, "conflicting_duplicate, already_referred"),
        (422, "invalid_payload, unknown_field, unknown_department"),
    )
}


@router.post(
    "/hospitals/{hospital}/referrals",
    status_code=202,
    response_model=ReferralAccepted,
    responses={**AUTH_RESPONSES, **_PROBLEMS},
    dependencies=[Depends(require_hospital_token)],  # a hospital's API token: shared/auth.py
    openapi_extra=command_body(RequestReferral),
)
async def request_referral(hospital: HospitalPath, request: Request) -> JSONResponse:
    """Refer a physician (the `RequestReferral` payload): 202 once the referral exists."""
    command = await read_command(request, RequestReferral)
    service = service_of(request)
    try:
        emitted = await service.execute(hospital, command)
    except Rejected as rejected:
        raise http_error(rejected) from None
    if any(isinstance(e, ReferralCreated) for e in emitted):
        status = domain.Status.requested.value
    else:
        # A repeat of an existing referral: answer with where it stands now.
        async with service.pool.acquire() as conn:
            found = await conn.fetchval(
                "SELECT status FROM referrals WHERE hospital = $1 AND referral_id = $2",
                hospital,
                command.referral_id,
            )
        status = found or domain.Status.requested.value
    return JSONResponse({"referral_id": command.referral_id, "status": status}, status_code=202)


@router.get(
    "/hospitals/{hospital}/referrals/{referral_id}",
    response_model=ReferralStatus,
    responses={404: problem("unknown_referral")},
)
async def referral_status(
    hospital: HospitalPath, referral_id: ReferralPath, request: Request
) -> dict[str, Any]:
    """Where a referral stands (pseudonymous ids only: no physician)."""
    async with service_of(request).pool.acquire() as conn:
        row = await conn.fetchrow(
            """
            SELECT hospital, referral_id, department, source, status, supporter_id, interactions,
                   requested_at
            FROM referrals WHERE hospital = $1 AND referral_id = $2
            """,
            hospital,
            referral_id,
        )
    if row is None:
        raise http_error(Rejected(ReasonCode.unknown_referral, "no such referral in this hospital"))
    answer = dict(row)
    answer["requested_at"] = row["requested_at"].isoformat().replace("+00:00", "Z")
    return answer
