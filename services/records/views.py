"""HTTP intake for supporters' tools: the same commands as on NATS, answered at once."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Request

from shared.auth import AUTH_RESPONSES, require_hospital_token
from shared.contracts import (
    Command,
    ReasonCode,
    RecordInteraction,
    RecordOutreach,
    Rejected,
    SubmitSurveyResponse,
    is_hospital_id,
)
from shared.http import command_body, http_error, problem, read_command
from shared.service import service_of

router = APIRouter(tags=["records"])

# A client's retry of the same request carries the same key and is recorded once.
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,256}$")
_ERROR = problem()
_ACCEPTED = {
    "description": "recorded; `event` is the event emitted, or null when it was recorded before",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "status": {"type": "string", "enum": ["recorded", "already_recorded"]},
                    "event": {"type": ["string", "null"]},
                },
                "required": ["status", "event"],
            }
        }
    },
}


def _openapi(model: type[Command]) -> dict[str, Any]:
    return {
        **command_body(model),
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "the command id: a request repeated with the same key counts once",
                "schema": {"type": "string", "minLength": 1, "maxLength": 256},
            }
        ],
        "responses": {
            **command_body(model)["responses"],
            "202": _ACCEPTED,
            "404": _ERROR,
            "409": _ERROR,
            "422": _ERROR,
        },
    }


async def _intake(hospital: str, model: type[Command], request: Request) -> dict[str, Any]:
    if not is_hospital_id(hospital):
        raise http_error(Rejected(ReasonCode.invalid_payload, "hospital: not a hospital id"))
    command = await read_command(request, model)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise http_error(
            Rejected(ReasonCode.invalid_payload, "Idempotency-Key: 1 to 256 printable")
        )
    try:
        events = await service_of(request).execute(hospital, command, command_id=key)
    except Rejected as rejected:
        raise http_error(rejected) from None
    if not events:
        return {"status": "already_recorded", "event": None}
    return {"status": "recorded", "event": events[0].type_name}


@router.post(
    "/hospitals/{hospital}/outreach",
    status_code=202,
    responses=AUTH_RESPONSES,
    dependencies=[Depends(require_hospital_token)],  # a hospital's API token: shared/auth.py
    summary="Record an outreach outcome (RecordOutreach)",
    openapi_extra=_openapi(RecordOutreach),
)
async def record_outreach(hospital: str, request: Request) -> dict[str, Any]:
    return await _intake(hospital, RecordOutreach, request)


@router.post(
    "/hospitals/{hospital}/interactions",
    status_code=202,
    responses=AUTH_RESPONSES,
    dependencies=[Depends(require_hospital_token)],  # a hospital's API token: shared/auth.py
    summary="Record a completed, de-identified interaction (RecordInteraction)",
    openapi_extra=_openapi(RecordInteraction),
)
async def record_interaction(hospital: str, request: Request) -> dict[str, Any]:
    return await _intake(hospital, RecordInteraction, request)


@router.post(
    "/hospitals/{hospital}/surveys",
    status_code=202,
    responses=AUTH_RESPONSES,
    dependencies=[Depends(require_hospital_token)],  # a hospital's API token: shared/auth.py
    summary="Submit an anonymous survey response (SubmitSurveyResponse)",
    openapi_extra=_openapi(SubmitSurveyResponse),
)
async def submit_survey_response(hospital: str, request: Request) -> dict[str, Any]:
    return await _intake(hospital, SubmitSurveyResponse, request)
