"""The HTTP intakes beside the NATS one (a referral; a FHIR AdverseEvent), and the status
of a referral (read side)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from services.referral import domain, fhir
from shared import limits
from shared.auth import (
    AUTH_RESPONSES,
    READ_RESPONSES,
    require_hospital_reader,
    require_hospital_token,
)
from shared.contracts import (
    HOSPITAL_PATTERN,
    ID_PATTERN,
    ReasonCode,
    ReferralCreated,
    Rejected,
    RequestReferral,
    cmd_subject,
    encode,
    make_cloudevent,
)
from shared.http import (
    DISCARD_MAX_BYTES,
    command_body,
    http_error,
    problem,
    read_command,
)
from shared.service import service_of

log = structlog.get_logger()
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
        (422, "invalid_payload, unknown_field, unknown_department, payload_too_deep"),
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
    responses={**READ_RESPONSES, 404: problem("unknown_referral")},
    dependencies=[Depends(require_hospital_reader)],  # its token or a region's: shared/auth.py
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


# --- safety events from FHIR (CONTRACT.md 1.1) ------------------------------------------------

FHIR_JSON = "application/fhir+json"


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` inlined, to sit in the OpenAPI spec as it is."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def _fhir_content(model: type[BaseModel], *types: str) -> dict[str, Any]:
    schema = _inline(model.model_json_schema())
    return {media: {"schema": schema} for media in types}


_OUTCOMES: dict[int | str, dict[str, Any]] = {
    status: {"description": why, "content": _fhir_content(fhir.OperationOutcome, FHIR_JSON)}
    for status, why in (
        (
            413,
            f"the body is larger than {fhir.MAX_BODY_BYTES} bytes (its issue's details: "
            "reason code payload_too_large)",
        ),
        (
            422,
            f"nested deeper than {limits.FHIR.max_depth} levels (reason code "
            "payload_too_deep, in the issue's details), not JSON, not an AdverseEvent, "
            "no usable `id` or date, more than "
            f"{fhir.MAX_CONTRIBUTORS} contributors, or no contributor yields a referral: "
            "the issues name the fields, never their values",
        ),
        (503, "the stream is not reachable: send the same AdverseEvent again"),
    )
}


def _outcome(refused: fhir.Refused) -> JSONResponse:
    return JSONResponse(refused.outcome(), status_code=refused.status, media_type=FHIR_JSON)


async def _read_body(request: Request) -> bytes:
    """The body, read no further than the limit."""
    too_large = fhir.Refused(
        [
            fhir.issue(
                "resourceType",
                "too-costly",
                f"more than {fhir.MAX_BODY_BYTES} bytes",
                ReasonCode.payload_too_large,
            )
        ],
        413,
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DISCARD_MAX_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= fhir.MAX_BODY_BYTES:
            chunks.append(chunk)
        elif size > DISCARD_MAX_BYTES:
            break
    if size > fhir.MAX_BODY_BYTES:
        # Read to its end and dropped (shared/http.py): the client gets the 413, not a reset.
        raise too_large
    return b"".join(chunks)


def _parse_json(body: bytes) -> Any:
    fhir.limited(body)  # not deeper than FHIR's limit: the decoder recurses once per level
    try:
        return json.loads(body.decode("utf-8"))  # UTF-8 only: the limit measured it as such
    except (ValueError, UnicodeDecodeError):
        raise fhir.Refused(
            [fhir.issue("resourceType", "structure", "the body is not JSON")]
        ) from None


@router.post(
    "/hospitals/{hospital}/fhir/AdverseEvent",
    status_code=202,
    response_model=fhir.AdverseEventAccepted,
    responses={**AUTH_RESPONSES, **_OUTCOMES},
    dependencies=[Depends(require_hospital_token)],  # a hospital's API token: shared/auth.py
    openapi_extra={
        "requestBody": {
            "content": _fhir_content(fhir.AdverseEventBody, FHIR_JSON, "application/json"),
            "required": True,
        }
    },
)
async def adverse_event(hospital: HospitalPath, request: Request) -> JSONResponse:
    """A safety event from the hospital's reporting system (FHIR R4 `AdverseEvent`): each
    contained `PractitionerRole` among its contributors becomes a `RequestReferral`, published
    to the stream and answered there like any other (`ReferralCreated` or `CommandRejected`).
    Only the ids the contract names are read: never `subject`, `text`, a description or a
    note. Sending the same AdverseEvent again is answered with the same ids and does nothing."""
    try:
        mapped = fhir.map_adverse_event(hospital, _parse_json(await _read_body(request)))
    except fhir.Refused as refused:
        log.info(
            "fhir_adverse_event_refused",
            hospital=hospital,
            status=refused.status,
            issues=[i.code for i in refused.issues][:10],
        )
        return _outcome(refused)
    js = service_of(request).js
    source = f"/hospitals/{hospital}/fhir/AdverseEvent"
    try:
        # One at a time, in the order of the contributors: the stream keeps that order.
        for command_id, command in mapped.referrals:
            ce = make_cloudevent(
                type_=command.type_name, source=source, data=command.to_data(), id_=command_id
            )
            await js.publish(
                cmd_subject(hospital, command.type_name),
                encode(ce),
                headers={"Nats-Msg-Id": command_id},
            )
    except Exception as exc:  # NATS away or slow: nothing to undo, a resend is harmless
        log.warning("fhir_adverse_event_unpublished", hospital=hospital, error=type(exc).__name__)
        return _outcome(
            fhir.Refused(
                [fhir.issue("contributor", "transient", "the stream is not reachable")], 503
            )
        )
    log.info(
        "fhir_adverse_event",
        hospital=hospital,
        referrals=len(mapped.referrals),
        skipped=len(mapped.skipped),
    )
    answer = fhir.AdverseEventAccepted(
        referrals=[
            fhir.ReferralSent(referral_id=command.referral_id, command_id=command_id)
            for command_id, command in mapped.referrals
        ],
        skipped=mapped.skipped,
    )
    return JSONResponse(answer.model_dump(), status_code=202)
