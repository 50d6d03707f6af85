# GENERATED from the platform's shared/limits.py by clients/python/sync_contracts.py:
# do not edit. The platform's tests compare the JSON Schemas of both, field by field.
"""Limits on a body before it is decoded: its size and how deeply it nests.

The same for NATS and HTTP. Python's JSON decoder and pydantic recurse once per level of
nesting: a body of 10,000 ``[`` fails with ``RecursionError`` deep inside them (a crash, and
on the stream a message retried until it is dead-lettered, never answered). So a body is
measured first, by the functions below, which never recurse and take time linear in the
body's size: a tokenizer over the bytes that knows JSON strings (brackets inside them do not
count) and brackets, nothing else.

A refusal here is `LimitExceeded` with its reason code (``payload_too_large``,
``payload_too_deep``, values of `shared.contracts.ReasonCode`); its detail names the limit,
never anything of the body. `shared.contracts.top_level_id` finds the id to answer under
without decoding the body (it uses `top_level_string`).

The values (docs/hospital-integration.md, "Limits"): the largest valid command is well under
2 KiB (a `RequestReferral` with every optional field) and nests 2 levels in its envelope
(``{"data": {...}}``); the platform's largest event, a `PhysicianForgotten` naming every
referral of a physician, grows with that list; a FHIR `AdverseEvent` with its narrative,
contained resources and extensions is a few kilobytes and nests a dozen levels at most.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

# The two refusals of a body beyond its limits (values of `shared.errors.ReasonCode`).
LimitReason = Literal["payload_too_large", "payload_too_deep"]
PAYLOAD_TOO_LARGE: LimitReason = "payload_too_large"
PAYLOAD_TOO_DEEP: LimitReason = "payload_too_deep"


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_depth: int


# A command: its CloudEvent over NATS, its payload over HTTP.
COMMAND = Limits(max_bytes=64 * 1024, max_depth=16)
# An event of the platform (its own: a PhysicianForgotten lists a physician's referrals):
# anything NATS carries (its default max_payload, 1 MiB), nested no deeper than a command.
EVENT = Limits(max_bytes=1024 * 1024, max_depth=16)
# A FHIR R4 AdverseEvent (services/referral/fhir.py): FHIR nests deeper (contained resources,
# extensions within extensions) and carries narrative.
FHIR = Limits(max_bytes=1024 * 1024, max_depth=64)


class LimitExceeded(Exception):
    """A body beyond a limit: `reason_code` is ``payload_too_large`` or ``payload_too_deep``."""

    def __init__(self, reason_code: LimitReason, detail: str) -> None:
        super().__init__(f"{reason_code}: {detail}")
        self.reason_code = reason_code
        self.detail = detail


def too_large(limits: Limits) -> LimitExceeded:
    return LimitExceeded(PAYLOAD_TOO_LARGE, f"the body is larger than {limits.max_bytes} bytes")


# A JSON string (possessive: no backtracking, linear), or one structural character.
_STRING = rb'"(?:[^"\\]++|\\.)*+"'
_BRACKETS = re.compile(_STRING + rb"|[\[\]{}]")
_TOKENS = re.compile(_STRING + rb"|[\[\]{}:,]")
_OPEN = frozenset(b"[{")
_CLOSE = frozenset(b"]}")


def nesting_depth(body: bytes, stop_above: int | None = None) -> int:
    """How deeply `body` nests arrays and objects, as a JSON decoder would recurse into it
    (an unclosed bracket counts: the decoder recursed into it before it failed). Brackets in
    strings do not count. Stops counting once past `stop_above`.

    Exact for UTF-8 (no byte of a multi-byte UTF-8 character is ASCII); a decoder must then
    read the same bytes as UTF-8, which `check` requires."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(body):
        c = match.group()[0]
        if c in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_above is not None and deepest > stop_above:
                    break
        elif c in _CLOSE:
            depth -= 1
            if depth < 0:
                break  # not JSON; what came before is what a decoder would have read
    return deepest


def check(body: bytes, limits: Limits) -> None:
    """`LimitExceeded` when `body` is larger or nests deeper than `limits` allow."""
    if len(body) > limits.max_bytes:
        raise too_large(limits)
    # Fewer brackets than the limit cannot nest deeper (a valid command has 2): counted in C,
    # a microsecond, where the tokenizer takes tens.
    if body.count(b"[") + body.count(b"{") <= limits.max_depth:
        return
    if nesting_depth(body, stop_above=limits.max_depth) > limits.max_depth:
        raise LimitExceeded(
            PAYLOAD_TOO_DEEP, f"the body nests deeper than {limits.max_depth} levels"
        )


def top_level_string(body: bytes, name: str) -> str | None:
    """The string value of the top-level object's member `name` (the last one, as a JSON
    decoder keeps it), found without decoding the body: so even a body too large or too deep
    to decode can be answered under its id. None when the body is no object, the member is
    absent or not a string. Linear in the body's size, no recursion."""
    depth = 0
    key: bytes | None = None
    expect_key = after_colon = False
    found: bytes | None = None
    for match in _TOKENS.finditer(body):
        token = match.group()
        c = token[0]
        if c in _OPEN:
            if depth == 0 and c != ord("{"):
                return None
            if depth == 1:
                key, after_colon = None, False  # a container as a member's value
            depth += 1
            if depth == 1:
                expect_key = True
        elif c in _CLOSE:
            depth -= 1
            if depth <= 0:
                break
        elif depth != 1:
            continue
        elif c == ord(","):
            key, expect_key, after_colon = None, True, False
        elif c == ord(":"):
            after_colon = key is not None
        elif after_colon:  # a string as a member's value
            if key is not None and _decoded(key) == name:
                found = token
            key, after_colon = None, False
        elif expect_key:
            key, expect_key = token, False
    return None if found is None else _decoded(found)


def _decoded(token: bytes) -> str | None:
    """One JSON string token (flat: no recursion) as text; None when it is not valid."""
    try:
        value = json.loads(token.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) else None
