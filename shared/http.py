"""HTTP pieces every service's routes share: the refusal shape, reading a command from a
request body as strictly as from NATS, and the service behind a route."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request

from shared.contracts import Command, ReasonCode, Rejected, parse_payload
from shared.service import Service, http_error

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
