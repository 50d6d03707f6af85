"""HTTP pieces every service's routes share: the refusal shape, reading a command from a
request body as strictly as from NATS, and the service behind a route."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from shared.contracts import Command, ReasonCode, Rejected, parse_payload

if TYPE_CHECKING:
    from shared.service import Service

HTTP_STATUS = {
    ReasonCode.invalid_payload: 422,
    ReasonCode.unknown_field: 422,
    ReasonCode.unknown_department: 422,
    ReasonCode.unknown_supporter: 422,
    ReasonCode.unknown_hospital: 404,
    ReasonCode.unknown_referral: 404,
    ReasonCode.conflicting_duplicate: 409,
    ReasonCode.already_referred: 409,
    ReasonCode.invalid_transition: 409,
    ReasonCode.not_assigned_supporter: 409,
    ReasonCode.internal_error: 500,
}


class HttpRejection(Exception):
    def __init__(self, status: int, reason_code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason_code = reason_code
        self.detail = detail


def http_error(rejected: Rejected) -> HttpRejection:
    """Raise this: ``raise http_error(r)``; answered as ``{"reason_code", "detail"}``."""
    return HttpRejection(
        HTTP_STATUS.get(rejected.reason_code, 422), rejected.reason_code, rejected.detail
    )


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal of a service's routes answers ``{"reason_code", "detail"}``."""

    @app.exception_handler(HttpRejection)
    async def _rejection(request: Request, exc: HttpRejection) -> JSONResponse:
        return JSONResponse(
            {"reason_code": exc.reason_code, "detail": exc.detail},
            status_code=exc.status,
            # A 401 names its scheme (WWW-Authenticate): see shared/auth.py.
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()[:5]
        ]
        return JSONResponse(
            {"reason_code": "invalid_payload", "detail": "; ".join(parts)[:500]},
            status_code=422,
        )


C = TypeVar("C", bound=Command)

# Every refusal over HTTP: {"reason_code", "detail"}, the reason codes of CommandRejected.
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"reason_code": {"type": "string"}, "detail": {"type": "string"}},
    "required": ["reason_code", "detail"],
}


def problem(description: str = "refused, with a reason code") -> dict[str, Any]:
    """An OpenAPI response entry for a refusal."""
    return {"description": description, "content": {"application/json": {"schema": PROBLEM_SCHEMA}}}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: problem() for status in statuses}


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def command_body(model: type[Command]) -> dict[str, Any]:
    """`openapi_extra` declaring the command's payload as the request body (the route reads
    the raw body itself, so that unknown fields are refused as `unknown_field`)."""
    return {
        "requestBody": {
            "content": {"application/json": {"schema": model.model_json_schema()}},
            "required": True,
        }
    }


async def read_command(request: Request, model: type[C]) -> C:
    """The JSON body as a command, validated strictly; refusals raise the HTTP answer."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise http_error(Rejected(ReasonCode.invalid_payload, "body is not JSON")) from None
    if not isinstance(body, dict):
        raise http_error(Rejected(ReasonCode.invalid_payload, "body is not a JSON object"))
    try:
        return parse_payload(model, body)
    except Rejected as rejected:
        raise http_error(rejected) from None
