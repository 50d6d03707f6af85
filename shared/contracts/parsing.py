"""Bytes to models, with reason codes: the limits first (shared/limits.py), then the envelope,
then the payload, strictly. A refusal names positions and rules, never what the sender chose."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import ValidationError

from shared import limits
from shared.contracts.base import _CONTROL, Event, Message
from shared.contracts.commands import COMMANDS
from shared.contracts.envelope import CloudEvent
from shared.contracts.events import EVENTS
from shared.errors import ReasonCode, Rejected, Unanswerable

ENVELOPE_ATTRIBUTES = frozenset(CloudEvent.model_fields)
# Every name the contract gives a field, an attribute or an element: what a refusal may name.
_KNOWN_NAMES = frozenset(
    {n for m in (*COMMANDS.values(), *EVENTS.values()) for n in m.model_fields}
    | ENVELOPE_ATTRIBUTES
)


def _position(where: str, loc: tuple[Any, ...], known: frozenset[str] = _KNOWN_NAMES) -> str:
    """Where an error is, by the contract's names only: a name the sender chose (an unknown
    field, a dictionary's key) is never repeated, it reads ``?``; list items read ``[i]``."""
    name = where
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += "." + (part if part in known else "?")
    return name


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def describe_errors(
    errors: Sequence[Mapping[str, Any]], where: str = "data", known: frozenset[str] = frozenset()
) -> Rejected:
    """Validation errors (pydantic's dicts: ``type``, ``loc``, ``msg``) as one reason code and
    a detail that names positions and rules (``data has 1 unknown field``, ``data.minutes:
    Input should be less than or equal to 600``), never a name the sender chose and never a
    value it sent. `known`: names beyond the contract's that may be named (a route's)."""
    known = _KNOWN_NAMES | known
    unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:
        what = "attribute" if where == "envelope" else "field"
        return Rejected(
            ReasonCode.unknown_field, f"{where} has {_plural(len(unknown), 'unknown ' + what)}"
        )
    parts = [
        f"{_position(where, tuple(e.get('loc', ())), known)}: {e.get('msg', 'invalid')}"
        for e in errors[:5]
    ]
    return Rejected(ReasonCode.invalid_payload, "; ".join(parts)[:500])


def describe_validation_error(error: ValidationError, where: str = "data") -> Rejected:
    """A pydantic `ValidationError` as `describe_errors` words it."""
    return describe_errors(
        error.errors(include_input=False, include_url=False, include_context=False), where
    )


def usable_id(value: Any) -> bool:
    """An id the platform can store and answer under: 1 to 256 characters, no control
    character, no unpaired surrogate. A command without one cannot be answered."""
    if not isinstance(value, str) or not 1 <= len(value) <= 256 or _CONTROL.search(value):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def top_level_id(body: bytes) -> str | None:
    """The envelope's top-level ``id``, when usable, found without decoding the body (no
    recursion, linear time: `shared.limits.top_level_string`), so that even a command too
    large or too deep to decode is answered under its id. For a body `parse_envelope` decodes
    it is the id the decoder reads (the last ``id`` member, escapes decoded)."""
    value = limits.top_level_string(body, "id")
    return value if value is not None and usable_id(value) else None


def envelope_limits(body: bytes, kind: str | None = None) -> limits.Limits:
    """A command's limits, or an event's (the platform's own, larger: a PhysicianForgotten
    lists referrals) for `kind` ``"evt"``, or when no kind is given, for a body whose
    top-level ``type`` is an event type. A command claiming an event's type that way is
    still refused as a command (its type is not its subject's): the looser size only lets
    it be read."""
    if kind is None:
        if len(body) <= limits.COMMAND.max_bytes and limits.COMMAND.max_depth == (
            limits.EVENT.max_depth
        ):
            return limits.COMMAND  # the same answer either way: no need to look (fast path)
        kind = "evt" if limits.top_level_string(body, "type") in EVENTS else "cmd"
    return limits.EVENT if kind == "evt" else limits.COMMAND


def parse_envelope(body: bytes, kind: str | None = None) -> CloudEvent:
    """Bytes -> CloudEvent. First the limits (shared/limits.py): a body too large or too
    deep is `Rejected` (``payload_too_large``, ``payload_too_deep``) when it has an id to
    answer under, `Unanswerable` otherwise; it is never decoded. Then `Unanswerable` when
    there is nothing to answer to (not UTF-8 JSON, no usable id); `Rejected` for an envelope
    that is not a valid CloudEvent (an unknown attribute: ``unknown_field``, counted).
    `kind` (``"cmd"``, ``"evt"``: the subject's) picks the limits (`envelope_limits`)."""
    try:
        limits.check(body, envelope_limits(body, kind))
    except limits.LimitExceeded as exceeded:
        if top_level_id(body) is None:
            raise Unanswerable(f"{exceeded.detail}, and no usable id found") from None
        raise Rejected(ReasonCode(exceeded.reason_code), exceeded.detail) from None
    try:
        # UTF-8 only (RFC 8259, CloudEvents' JSON format): the limits measured these bytes.
        raw = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unanswerable(f"body is not JSON: {type(exc).__name__}") from None
    if not isinstance(raw, dict) or not usable_id(raw.get("id")):
        raise Unanswerable("body is not a CloudEvent: no usable id (1 to 256 characters)")
    try:
        return CloudEvent.model_validate(raw)
    except ValidationError as exc:
        raise describe_validation_error(exc, "envelope") from None


M = TypeVar("M", bound=Message)


def parse_payload(model: type[M], data: dict[str, Any]) -> M:
    """Validate a payload strictly, as JSON (ISO dates as strings, no coercion of types).
    `data` comes from a decoded body: within shared/limits.py's nesting limit."""
    try:
        return model.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as exc:
        raise describe_validation_error(exc) from None


def parse_event(event_type: str, data: dict[str, Any]) -> Event:
    return parse_payload(EVENTS[event_type], data)


def parse_event_json(event_type: str, data_json: str | bytes) -> Event:
    """An event's payload from its JSON text (as stored): the same rules, one parse."""
    try:
        return EVENTS[event_type].model_validate_json(data_json, strict=True)
    except ValidationError as exc:
        raise describe_validation_error(exc) from None
