# GENERATED from the platform's shared/errors.py by clients/python/sync_contracts.py:
# do not edit. The platform's tests compare the JSON Schemas of both, field by field.
"""The exceptions a domain raises, and the reason codes they carry; no dependencies.

A domain module (pure rules, `services/*/domain`) may import this and `shared.contracts`, and
nothing that reaches a database or NATS: import-linter checks it (pyproject.toml). The message
path turns each into its fate (shared/dispatch.py): `Rejected` into a `CommandRejected`,
`NotYetKnown` into a wait in `waiting`, `Unanswerable` into a dead letter.
`shared.contracts` and `shared.unit_of_work` re-export them under their old names.
"""

from __future__ import annotations

from enum import StrEnum


class ReasonCode(StrEnum):
    """`CommandRejected.reason_code`. The first nine are the contract's; the rest are added."""

    invalid_payload = "invalid_payload"
    unknown_field = "unknown_field"
    unknown_hospital = "unknown_hospital"
    unknown_department = "unknown_department"
    unknown_referral = "unknown_referral"
    unknown_supporter = "unknown_supporter"
    not_assigned_supporter = "not_assigned_supporter"
    conflicting_duplicate = "conflicting_duplicate"
    invalid_transition = "invalid_transition"
    # Added by the platform (CONTRACT.md allows additions):
    already_referred = "already_referred"  # same physician, same safety event, still open
    internal_error = "internal_error"  # failed every retry; also sent to the dead-letter subject
    payload_too_large = "payload_too_large"  # the body is beyond shared/limits.py's size
    payload_too_deep = "payload_too_deep"  # it nests deeper than shared/limits.py allows


class Rejected(Exception):
    """A command refused for a stated reason: becomes a `CommandRejected` event (or HTTP 4xx)."""

    def __init__(self, reason_code: ReasonCode, detail: str) -> None:
        super().__init__(f"{reason_code}: {detail}")
        self.reason_code = reason_code
        self.detail = detail


class Unanswerable(Exception):
    """A message that is not a CloudEvents command at all: it goes to the dead-letter subject."""


class NotYetKnown(Exception):
    """The command depends on a fact this service has not seen yet: try again later."""

    def __init__(self, detail: str, reason_code: ReasonCode = ReasonCode.unknown_referral) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason_code = reason_code
