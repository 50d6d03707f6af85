"""HTTP pieces every service's routes share: the refusal shape, reading a command from a
request body as strictly as from NATS, and the service behind a route."""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import limits
from shared.contracts import Command, ReasonCode, Rejected, describe_errors, parse_payload

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
    ReasonCode.payload_too_large: 413,
    ReasonCode.payload_too_deep: 422,
}


# An HTTP refusal's `reason_code`: the contract's, or one of the token rules' (shared/auth.py).
AuthReason = Literal["unauthenticated", "forbidden"]


class HttpRejection(Exception):
    def __init__(self, status: int, reason_code: ReasonCode | AuthReason, detail: str) -> None:
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
    """Every refusal of a service's routes answers ``{"reason_code", "detail"}``, and names
    no name and no value the sender chose (FastAPI's own 422 echoes both); every body is
    within shared/limits.py's limits before anything decodes it (`BodyLimits`)."""
    app.add_middleware(BodyLimits)

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
        errors = list(exc.errors())
        where = "request"
        if errors and all(e.get("loc", ("",))[0] == "body" for e in errors):
            where = "body"
        trimmed = [
            {**e, "loc": tuple(e.get("loc", ()))[1:] if where == "body" else e.get("loc", ())}
            for e in errors
        ]
        rejected = describe_errors(trimmed, where, declared_names(request.app))
        return JSONResponse(
            {"reason_code": rejected.reason_code, "detail": rejected.detail}, status_code=422
        )


def declared_names(app: FastAPI) -> frozenset[str]:
    """Every name the app declares (its parameters, its schemas' properties, the places
    FastAPI names: query, path, header): a refusal may name these, never another."""
    names: frozenset[str] | None = getattr(app.state, "declared_names", None)
    if names is None:
        found = {"query", "path", "header", "cookie", "body"}

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if isinstance(node.get("properties"), dict):
                    found.update(node["properties"])
                if node.get("in") and isinstance(node.get("name"), str):
                    found.add(node["name"])
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(app.openapi())
        names = frozenset(found)
        app.state.declared_names = names
    return names


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BodyLimits:
    """ASGI middleware: a request body beyond shared/limits.py's command limits is answered
    413 (``payload_too_large``) or 422 (``payload_too_deep``), and one that is not UTF-8 422
    (``invalid_payload``), before FastAPI or a route decodes it (so never a 500 from a
    decoder's recursion). The body is read no further than the limit. FHIR routes (a path
    with ``/fhir/``) read and limit their bodies themselves, with FHIR's limits and answers
    (services/referral/views.py)."""

    def __init__(self, app: ASGIApp, limits_: limits.Limits = limits.COMMAND) -> None:
        self.app = app
        self.limits = limits_

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in _BODY_METHODS
            or "/fhir/" in scope["path"]
        ):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_limited(scope, receive, self.limits.max_bytes)
            limits.check(body, self.limits)
            if body:
                body.decode("utf-8")
        except limits.LimitExceeded as exceeded:
            refused = Rejected(ReasonCode(exceeded.reason_code), exceeded.detail)
            await _answer(http_error(refused), scope, receive, send)
            return
        except UnicodeDecodeError:
            refused = Rejected(ReasonCode.invalid_payload, "body is not UTF-8")
            await _answer(http_error(refused), scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then a disconnect, when it comes

        await self.app(scope, replay, send)


# A body refused for its size is still read to its end (and dropped) up to this much, so the
# client reads its 413 on a clean connection instead of a reset while it is still sending.
DISCARD_MAX_BYTES = 16 * 1024 * 1024


async def read_limited(scope: Scope, receive: Receive, max_bytes: int) -> bytes:
    """The request's body, kept no further than `max_bytes`: `LimitExceeded` beyond it. A
    body over the limit is read on and dropped (at most DISCARD_MAX_BYTES) before the refusal,
    so the answer reaches the client; a declared Content-Length past that is refused unread."""
    exceeded = limits.too_large(limits.Limits(max_bytes, 0))
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and value.isdigit() and int(value) > DISCARD_MAX_BYTES:
            raise exceeded
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= max_bytes:
            chunks.append(chunk)
        if not message.get("more_body", False) or size > DISCARD_MAX_BYTES:
            break
    if size > max_bytes:
        chunks.clear()
        raise exceeded
    return b"".join(chunks)


async def _answer(rejection: HttpRejection, scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse(
        {"reason_code": rejection.reason_code, "detail": rejection.detail},
        status_code=rejection.status,
    )
    await response(scope, receive, send)


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


def command_body(model: type[Command]) -> dict[str, Any]:
    """`openapi_extra` declaring the command's payload as the request body (the route reads
    the raw body itself, so that unknown fields are refused as `unknown_field`)."""
    return {
        "requestBody": {
            "description": LIMITS_DESCRIPTION,
            "content": {"application/json": {"schema": model.model_json_schema()}},
            "required": True,
        },
        "responses": {"413": problem("payload_too_large: " + LIMITS_DESCRIPTION)},
    }


LIMITS_DESCRIPTION = (
    f"UTF-8 JSON, at most {limits.COMMAND.max_bytes} bytes (else 413, payload_too_large) and"
    f" nested at most {limits.COMMAND.max_depth} levels deep (else 422, payload_too_deep)."
    " A refusal names positions and rules, never a name or a value that was sent."
)


async def read_command(request: Request, model: type[C]) -> C:
    """The JSON body as a command, validated strictly; refusals raise the HTTP answer. The
    body is within the command limits already (`BodyLimits`) and decoded as UTF-8 only (the
    limits measured it as such; `json.loads` on bytes would also take UTF-16 and UTF-32)."""
    try:
        body = json.loads((await request.body()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise http_error(Rejected(ReasonCode.invalid_payload, "body is not JSON")) from None
    if not isinstance(body, dict):
        raise http_error(Rejected(ReasonCode.invalid_payload, "body is not a JSON object"))
    try:
        return parse_payload(model, body)
    except Rejected as rejected:
        raise http_error(rejected) from None
