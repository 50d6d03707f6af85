"""The integration contract (../shared/CONTRACT.md, version 1) as pydantic v2 models.

Commands come from hospitals on ``post.{hospital}.cmd.{Type}``; events leave the platform on
``post.{hospital}.evt.{Type}``. Every body is a CloudEvents 1.0 event in structured JSON mode.
Payloads are strict: unknown fields are refused, never stored (free text is never kept).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from shared import limits
from shared.errors import ReasonCode, Rejected, Unanswerable

STREAM_NAME = "POST"
STREAM_SUBJECTS = ["post.>"]
SPECVERSION = "1.0"
DATACONTENTTYPE = "application/json"
CONTENT_TYPE = "application/cloudevents+json"

HOSPITAL_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

HospitalId = Annotated[str, StringConstraints(pattern=HOSPITAL_PATTERN)]
DepartmentId = Annotated[str, StringConstraints(pattern=HOSPITAL_PATTERN)]
PseudonymousId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
_HOSPITAL_RE = re.compile(HOSPITAL_PATTERN)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Rank(StrEnum):
    resident = "resident"
    fellow = "fellow"
    attending = "attending"
    senior = "senior"

    @property
    def level(self) -> int:
        return _RANK_ORDER[self]


_RANK_ORDER = {Rank.resident: 0, Rank.fellow: 1, Rank.attending: 2, Rank.senior: 3}

Source = Literal["self", "third_party", "safety_event"]
EventNature = Literal["interventional", "other"]
Outcome = Literal["accepted", "declined", "unreachable"]
DeclineReason = Literal["no_time", "no_need", "privacy", "discomfort", "medicolegal", "other"]
AssignmentReason = Literal["manual", "matched", "reassigned"]
MatchingPolicy = Literal["same_department", "other_department", "same_then_other"]
Score = Annotated[int, Field(ge=1, le=5)]


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


class Message(BaseModel):
    """Base of every payload: strict, no unknown fields, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    type_name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type_name = cls.__name__

    @field_validator("*", mode="after")
    @classmethod
    def _normalise_times(cls, value: Any) -> Any:
        return _utc(value) if isinstance(value, datetime) else value

    def to_data(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Command(Message):
    owner: ClassVar[str]

    @field_validator("*", mode="after")
    @classmethod
    def _no_control_characters(cls, value: Any) -> Any:
        # NUL cannot be stored in PostgreSQL, and no field of the contract needs a control.
        if isinstance(value, str) and _CONTROL.search(value):
            raise ValueError("control characters are not allowed")
        return value


class Event(Message):
    """A fact the platform emits. Every event names its hospital (the tenant)."""

    hospital: HospitalId


# --- commands -------------------------------------------------------------------------------


class RegisterHospital(Command):
    owner = "matching"
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    physician_count: Annotated[int, Field(ge=0, le=1_000_000)]


class LaunchDepartment(Command):
    owner = "matching"
    department: DepartmentId
    physician_count: Annotated[int, Field(ge=0, le=1_000_000)]
    launched_on: date


class CloseDepartment(Command):
    owner = "matching"
    department: DepartmentId
    closed_on: date


class RegisterSupporter(Command):
    owner = "matching"
    supporter_id: PseudonymousId
    department: DepartmentId
    rank: Rank
    interventional: bool
    trained_on: date


class RetireSupporter(Command):
    owner = "matching"
    supporter_id: PseudonymousId
    retired_on: date


class SetMatchingPolicy(Command):
    """Version 1.1: without `department` the hospital's policy, with one that department's."""

    owner = "matching"
    policy: MatchingPolicy
    department: DepartmentId | None = None


class SetSupporterAvailability(Command):
    """Version 1.1: pause or resume a supporter, and cap their open assignments."""

    owner = "matching"
    supporter_id: PseudonymousId
    available: bool
    max_open_assignments: Annotated[int, Field(ge=1, le=50)] | None = None
    changed_on: date


class RequestReferral(Command):
    owner = "referral"
    referral_id: PseudonymousId
    physician_id: PseudonymousId
    department: DepartmentId
    rank: Rank
    source: Source
    event_nature: EventNature
    requested_at: AwareDatetime
    referrer_id: PseudonymousId | None = None
    assign_to: PseudonymousId | None = None
    # Added (optional): the safety report's id, so one physician named twice in the same
    # safety event is referred once. Without it, (referrer_id, requested_at) identify it.
    safety_event_id: PseudonymousId | None = None


class ForgetPhysician(Command):
    """Version 1.1: forget a physician (and the same id as referrer) everywhere the platform
    keeps data; answered with `PhysicianForgotten`, which does not carry the id."""

    owner = "referral"
    physician_id: PseudonymousId
    requested_on: date


class RecordOutreach(Command):
    owner = "records"
    referral_id: PseudonymousId
    supporter_id: PseudonymousId
    outcome: Outcome
    at: AwareDatetime
    decline_reason: DeclineReason | None = None


class RecordInteraction(Command):
    owner = "records"
    referral_id: PseudonymousId
    supporter_id: PseudonymousId
    occurred_on: date
    minutes: Annotated[int, Field(ge=1, le=600)]
    escalated: bool | None = None


class SubmitSurveyResponse(Command):
    owner = "records"
    response_id: PseudonymousId
    department: DepartmentId
    submitted_on: date
    aware: bool
    had_interaction: bool
    helpful: Score | None = None
    wellbeing_improved: bool | None = None
    comfort_improved: bool | None = None
    would_recommend: bool | None = None
    satisfaction: Score | None = None


# --- events ---------------------------------------------------------------------------------


class HospitalRegistered(Event):
    name: str
    physician_count: int


class DepartmentLaunched(Event):
    department: DepartmentId
    physician_count: int
    launched_on: date


class DepartmentClosed(Event):
    department: DepartmentId
    closed_on: date


class SupporterTrained(Event):
    supporter_id: PseudonymousId
    department: DepartmentId
    rank: Rank
    interventional: bool
    trained_on: date


class SupporterRetired(Event):
    supporter_id: PseudonymousId
    retired_on: date
    department: DepartmentId  # added: the supporter's department


class MatchingPolicySet(Event):
    policy: MatchingPolicy
    department: DepartmentId | None = None


class SupporterAvailabilityChanged(Event):
    supporter_id: PseudonymousId
    available: bool
    max_open_assignments: int | None = None
    changed_on: date
    department: DepartmentId  # added: the supporter's department


class ReferralCreated(Event):
    referral_id: PseudonymousId
    physician_id: PseudonymousId
    department: DepartmentId
    rank: Rank
    source: Source
    event_nature: EventNature
    requested_at: AwareDatetime
    referrer_id: PseudonymousId | None = None
    assign_to: PseudonymousId | None = None
    safety_event_id: PseudonymousId | None = None


class SupporterAssigned(Event):
    referral_id: PseudonymousId
    supporter_id: PseudonymousId
    department: DepartmentId
    assigned_at: AwareDatetime
    due_at: AwareDatetime
    reason: AssignmentReason


class NoSupporterAvailable(Event):
    referral_id: PseudonymousId
    department: DepartmentId
    reason: str


class AssignmentOverdue(Event):
    referral_id: PseudonymousId
    supporter_id: PseudonymousId
    due_at: AwareDatetime


class _OutreachRecorded(Event):
    referral_id: PseudonymousId
    supporter_id: PseudonymousId
    outcome: Outcome
    at: AwareDatetime
    decline_reason: DeclineReason | None = None
    department: DepartmentId  # added: the referral's department


class OutreachAccepted(_OutreachRecorded):
    outcome: Literal["accepted"] = "accepted"


class OutreachDeclined(_OutreachRecorded):
    outcome: Literal["declined"] = "declined"


class OutreachUnreachable(_OutreachRecorded):
    outcome: Literal["unreachable"] = "unreachable"


class InteractionCompleted(Event):
    referral_id: PseudonymousId
    supporter_id: PseudonymousId
    occurred_on: date
    minutes: int
    escalated: bool = False  # normalised: absent means not escalated
    department: DepartmentId  # added: the referral's department
    follow_up: bool = False  # added: not the referral's first interaction
    implied_acceptance: bool = False  # added: no outreach was recorded before it


class SurveyResponseRecorded(Event):
    response_id: PseudonymousId
    department: DepartmentId
    submitted_on: date
    aware: bool
    had_interaction: bool
    helpful: Score | None = None
    wellbeing_improved: bool | None = None
    comfort_improved: bool | None = None
    would_recommend: bool | None = None
    satisfaction: Score | None = None


class PhysicianForgotten(Event):
    """Version 1.1: the answer to `ForgetPhysician` (or to a retention sweep). `forget_id` is
    new and opaque; it also stands in for the forgotten id in the physician's referrals, so each
    still counts as the same one physician. Added: the referrals that named the physician, so
    every service (and the hospital) can forget without ever being told the id again."""

    forget_id: PseudonymousId
    requested_on: date
    referral_ids: list[PseudonymousId] = Field(default_factory=list)  # as the physician
    referred_ids: list[PseudonymousId] = Field(default_factory=list)  # as the referrer


class CommandRejected(Event):
    command_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    command_type: str
    reason_code: ReasonCode
    detail: str


COMMANDS: dict[str, type[Command]] = {
    c.__name__: c
    for c in (
        RegisterHospital,
        LaunchDepartment,
        CloseDepartment,
        RegisterSupporter,
        RetireSupporter,
        RequestReferral,
        ForgetPhysician,
        RecordOutreach,
        RecordInteraction,
        SubmitSurveyResponse,
        SetMatchingPolicy,
        SetSupporterAvailability,
    )
}
EVENTS: dict[str, type[Event]] = {
    e.__name__: e
    for e in (
        HospitalRegistered,
        DepartmentLaunched,
        DepartmentClosed,
        SupporterTrained,
        SupporterRetired,
        ReferralCreated,
        SupporterAssigned,
        NoSupporterAvailable,
        AssignmentOverdue,
        OutreachAccepted,
        OutreachDeclined,
        OutreachUnreachable,
        InteractionCompleted,
        SurveyResponseRecorded,
        CommandRejected,
        MatchingPolicySet,
        PhysicianForgotten,
        SupporterAvailabilityChanged,
    )
}


def is_slug(value: str) -> bool:
    """A hospital (tenant) or department id: CONTRACT.md's slug `[a-z0-9][a-z0-9-]{0,62}`."""
    return _HOSPITAL_RE.match(value) is not None


is_hospital_id = is_slug


# --- subjects -------------------------------------------------------------------------------


def cmd_subject(hospital: str, command_type: str) -> str:
    return f"post.{hospital}.cmd.{command_type}"


def evt_subject(hospital: str, event_type: str) -> str:
    return f"post.{hospital}.evt.{event_type}"


def dlq_subject(hospital: str, message_type: str) -> str:
    return f"post.{hospital}.dlq.{message_type}"


def parse_subject(subject: str) -> tuple[str, str, str]:
    """``post.{hospital}.{kind}.{Type}`` -> (hospital, kind, Type); ValueError otherwise."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != "post" or parts[2] not in ("cmd", "evt", "dlq"):
        raise ValueError(f"not a POST subject: {subject[:120]!r}")
    return parts[1], parts[2], parts[3]


# --- the CloudEvents envelope ---------------------------------------------------------------


class CloudEvent(BaseModel):
    """CloudEvents 1.0, structured JSON mode: the spec's core attributes and the extensions
    the platform knows (correlationid, causationid; traceparent and tracestate of the
    distributed-tracing extension). Any other attribute is refused like an unknown payload
    field (`unknown_field`, counted, never named): an attribute the platform does not know
    is text it would otherwise carry unread."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    specversion: Literal["1.0"]
    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    source: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    type: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    time: AwareDatetime | None = None
    datacontenttype: Literal["application/json"] | None = None
    dataschema: str | None = None
    subject: str | None = None
    correlationid: str | None = None
    causationid: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    data: dict[str, Any]

    @property
    def hospital(self) -> str | None:
        return hospital_of_source(self.source)


def hospital_of_source(source: str) -> str | None:
    """``/hospitals/{hospital}/...`` -> hospital, or None when the source names none."""
    parts = source.split("/")
    if (
        len(parts) >= 3
        and parts[0] == ""
        and parts[1] == "hospitals"
        and _HOSPITAL_RE.match(parts[2])
    ):
        return parts[2]
    return None


def new_id() -> str:
    return str(uuid.uuid4())


def make_cloudevent(
    *,
    type_: str,
    source: str,
    data: dict[str, Any],
    id_: str | None = None,
    time: datetime | None = None,
    correlationid: str | None = None,
    causationid: str | None = None,
) -> dict[str, Any]:
    ce: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": id_ or new_id(),
        "source": source,
        "type": type_,
        "time": (time or datetime.now(UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": DATACONTENTTYPE,
        "data": data,
    }
    if correlationid is not None:
        ce["correlationid"] = correlationid
    if causationid is not None:
        ce["causationid"] = causationid
    return ce


def encode(ce: dict[str, Any]) -> bytes:
    return json.dumps(ce, separators=(",", ":")).encode()


def command_message(
    hospital: str, command: Command, *, id_: str | None = None, origin: str = "system"
) -> tuple[str, bytes, str]:
    """Build what a hospital system publishes: (subject, body, Nats-Msg-Id)."""
    ce = make_cloudevent(
        type_=command.type_name,
        source=f"/hospitals/{hospital}/{origin}",
        data=command.to_data(),
        id_=id_,
    )
    return cmd_subject(hospital, command.type_name), encode(ce), ce["id"]


# --- validation with reason codes -----------------------------------------------------------


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
