"""The pure part of forgetting a physician: which of the stream's messages a forget job erases,
which it replaces with a redacted copy, and the copy (docs/decisions.md, "Forgetting a
physician"). The stores' half is in handlers.py (`forget`), the stream's in background.py
(`Scrubber`)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any

from shared import limits
from shared.contracts import cmd_subject, dlq_subject, evt_subject

FORGET_PREFIX = "forgotten-"


def new_forget_id() -> str:
    """Opaque, random: nothing about the physician can be computed from it."""
    return f"{FORGET_PREFIX}{uuid.uuid4().hex}"


class Action(Enum):
    keep = "keep"
    erase = "erase"
    redact = "redact"  # publish the redacted copy, then erase


@dataclass(frozen=True)
class Job:
    """A forget whose stream messages are not all erased yet (a `forget_jobs` row)."""

    forget_id: str
    hospital: str
    physician_id: str
    command_seq: int | None
    referral_ids: frozenset[str]
    referred_ids: frozenset[str]

    def subjects(self) -> list[str]:
        """Where the hospital's messages can name a physician."""
        found = [
            cmd_subject(self.hospital, "RequestReferral"),
            evt_subject(self.hospital, "ReferralCreated"),
            dlq_subject(self.hospital, ">"),
        ]
        if self.command_seq is not None:
            found.append(cmd_subject(self.hospital, "ForgetPhysician"))
        return found

    def decide(self, subject: str, seq: int, body: bytes) -> Action:
        """What to do with one message; pure. Only what is certainly the forgotten physician
        goes: a later referral of the same id is a new physician and stays."""
        kind, type_ = subject.split(".")[2:4]
        if kind == "dlq":  # as it came, maybe not even JSON: the id as a whole token
            return Action.erase if self._token().search(body) else Action.keep
        data = data_of(body)
        if type_ == "ForgetPhysician":
            ours = self.command_seq is not None and seq <= self.command_seq
            named = data.get("physician_id") == self.physician_id
            return Action.erase if ours and named else Action.keep
        if not self._of_the_forgotten(data):
            return Action.keep
        return Action.redact if kind == "evt" else Action.erase

    def redacted(self, body: bytes) -> bytes:
        """The `ReferralCreated` with the forget's id in place of the physician's."""
        ce = json.loads(body)
        data = ce["data"]
        if data.get("referral_id") in self.referral_ids and data.get("physician_id") == (
            self.physician_id
        ):
            data["physician_id"] = self.forget_id
            data["safety_event_id"] = None
        if data.get("referral_id") in self.referred_ids and data.get("referrer_id") == (
            self.physician_id
        ):
            data["referrer_id"] = self.forget_id
        return json.dumps(ce, separators=(",", ":")).encode()

    def _of_the_forgotten(self, data: dict[str, Any]) -> bool:
        referral, physician = data.get("referral_id"), self.physician_id
        return (referral in self.referral_ids and data.get("physician_id") == physician) or (
            referral in self.referred_ids and data.get("referrer_id") == physician
        )

    def _token(self) -> re.Pattern[bytes]:
        return re.compile(
            rb"(?<![A-Za-z0-9_-])" + re.escape(self.physician_id.encode()) + rb"(?![A-Za-z0-9_-])"
        )


def data_of(body: bytes) -> dict[str, Any]:
    """A message's CloudEvents `data`, or {} when it has none we can read."""
    try:
        # A command too deep to decode (refused, maybe not yet erased) names nobody we read.
        limits.check(body, limits.EVENT)
        data = json.loads(body).get("data")
    except (ValueError, AttributeError, limits.LimitExceeded):
        return {}
    return data if isinstance(data, dict) else {}


def names(data: dict[str, Any], physician_id: str) -> bool:
    """The payload names the physician (as physician or as referrer)."""
    return physician_id in (data.get("physician_id"), data.get("referrer_id"))
