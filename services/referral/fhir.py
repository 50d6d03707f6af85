"""Safety events from FHIR (CONTRACT.md 1.1): an R4 `AdverseEvent` -> `RequestReferral`s.

Pure: no I/O, no clock. Only the elements the contract names are read: `resourceType`, `id`,
`recordedDate` / `date`, `contributor`, the contained `PractitionerRole`s and `Procedure`s
they point at, `suspectEntity.instance` and `recorder`. The patient (`subject`), the
narrative (`text`), descriptions and notes are never looked at, so nothing of them can be
kept, answered or logged. A refusal names fields, never their values.

Each element is read through a small strict pydantic model (FHIR allows extensions and
elements we do not use, so unknown keys are ignored, not refused); an element that does not
fit its model counts as absent, so one malformed role skips that contributor, not the report.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import limits
from shared.contracts import ID_PATTERN, Rank, Rejected, RequestReferral, is_slug
from shared.contracts import parse_payload as parse_command

# A report names a handful of clinicians; a whole theatre team is a few dozen. Beyond this
# the report is refused (422, `too-costly`), so a huge list cannot flood the stream.
MAX_CONTRIBUTORS = 100
# An AdverseEvent with its narrative is a few kilobytes; this bounds what is read at all, and
# how deeply it may nest (shared/limits.py: FHIR).
MAX_BODY_BYTES = limits.FHIR.max_bytes
REASON_CODE_SYSTEM = "urn:post:reason-code"

DEPARTMENT_SYSTEM = "urn:post:department"
RANK_SYSTEM = "urn:post:rank"
REFERRAL_PREFIX = "ae-"
COMMAND_PREFIX = "ae-cmd-"

SkipReason = Literal[
    "not_a_contained_role", "no_practitioner", "no_department", "no_rank", "invalid_id"
]

_ID_RE = re.compile(ID_PATTERN)
# FHIR dateTime with a time, which then needs a zone (a date alone or a time without a zone
# is not a point in time).
_DATETIME_RE = re.compile(
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:"
    r"[0-5][0-9](\.[0-9]{1,9})?(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))$"
)
# A FHIR reference to a resource of a type: relative (`Practitioner/123`) or absolute
# (`https://fhir.example.org/r4/Practitioner/123`), optionally pinned to a version.
_REFERENCE_RE = re.compile(
    r"^(?:https?://[^\s/]+(?:/[^\s/]+)*/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[^/]+)"
    r"(?:/_history/[^/\s]+)?$"
)


# --- the elements read, as strict models ------------------------------------------------------


class _Element(BaseModel):
    # Extensions and elements we do not use are ignored (FHIR allows them); types are strict.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class Reference(_Element):
    reference: str | None = None


class Coding(_Element):
    system: str | None = None
    code: str | None = None


class CodeableConcept(_Element):
    coding: list[Coding] = Field(default_factory=list)


class SuspectEntity(_Element):
    instance: Reference | None = None


class AdverseEventBody(BaseModel):
    """What the route reads of an R4 AdverseEvent (for the OpenAPI spec): every other element
    is allowed and ignored, `subject`, `text` and any note included."""

    model_config = ConfigDict(extra="allow", title="AdverseEvent (FHIR R4)")

    resourceType: Literal["AdverseEvent"]
    id: str = Field(pattern=ID_PATTERN, description="Becomes `safety_event_id`.")
    recordedDate: str | None = Field(None, description="dateTime with a zone: `requested_at`.")
    date: str | None = Field(None, description="Used when there is no `recordedDate`.")
    contributor: list[Reference] = Field(
        max_length=MAX_CONTRIBUTORS,
        description='`{"reference": "#<contained PractitionerRole id>"}`',
    )
    contained: list[dict[str, Any]] = Field(
        default_factory=list, description="PractitionerRole (and Procedure) resources."
    )
    suspectEntity: list[SuspectEntity] = Field(
        default_factory=list, description="An instance referencing a Procedure: interventional."
    )
    recorder: Reference | None = Field(None, description="`Practitioner/<id>`: `referrer_id`.")


class ReferralSent(BaseModel):
    referral_id: str
    command_id: str


class Skipped(BaseModel):
    contributor: str | None = Field(description="The contributor's `reference` as sent.")
    reason: SkipReason


class AdverseEventAccepted(BaseModel):
    referrals: list[ReferralSent]
    skipped: list[Skipped]


class IssueDetails(BaseModel):
    """The platform's reason code, as FHIR codes an issue's details."""

    coding: list[Coding]


class Issue(BaseModel):
    severity: Literal["error"] = "error"
    code: str
    diagnostics: str
    expression: list[str]
    # The reason code (CommandRejected's) where one applies: payload_too_large, ..._deep.
    details: IssueDetails | None = None


class OperationOutcome(BaseModel):
    resourceType: Literal["OperationOutcome"] = "OperationOutcome"
    issue: list[Issue]


# --- the mapping --------------------------------------------------------------------------------


class Refused(Exception):
    """The AdverseEvent yields nothing: answered 422 (413 for a body too large)."""

    def __init__(self, issues: list[Issue], status: int = 422) -> None:
        super().__init__("; ".join(i.diagnostics for i in issues))
        self.issues = issues
        self.status = status

    def outcome(self) -> dict[str, Any]:
        return OperationOutcome(issue=self.issues).model_dump(exclude_none=True)  # FHIR: no null


def issue(field: str, code: str, diagnostics: str, reason_code: str | None = None) -> Issue:
    """An issue naming a field of the AdverseEvent (never its value), with the platform's
    reason code when one applies."""
    details = None
    if reason_code is not None:
        details = IssueDetails(coding=[Coding(system=REASON_CODE_SYSTEM, code=reason_code)])
    return Issue(
        code=code,
        diagnostics=f"{field}: {diagnostics}",
        expression=[f"AdverseEvent.{field}"],
        details=details,
    )


def limited(body: bytes) -> bytes:
    """`body` within FHIR's limits (shared/limits.py), else `Refused`: 413 too large, 422 too
    deep (the decoder would recurse once per level), before anything decodes it."""
    try:
        limits.check(body, limits.FHIR)
    except limits.LimitExceeded as exceeded:
        status = 413 if exceeded.reason_code == limits.PAYLOAD_TOO_LARGE else 422
        issues = [issue("resourceType", "too-costly", exceeded.detail, exceeded.reason_code)]
        raise Refused(issues, status) from None
    return body


@dataclass(frozen=True)
class Mapped:
    """What an AdverseEvent becomes: the referrals to request, and the contributors skipped."""

    referrals: list[tuple[str, RequestReferral]]  # (command id, command)
    skipped: list[Skipped]


def referral_id(adverse_event_id: str, physician_id: str) -> str:
    """`ae-` + the first 32 lowercase hex digits of SHA-256 of `<event id>/<physician_id>`."""
    return REFERRAL_PREFIX + _digest(f"{adverse_event_id}/{physician_id}")


def command_id(hospital: str, adverse_event_id: str, physician_id: str) -> str:
    """The same derivation with the hospital in front: `Nats-Msg-Id` dedupe spans the whole
    stream, and two hospitals may use the same ids for different things."""
    return COMMAND_PREFIX + _digest(f"{hospital}/{adverse_event_id}/{physician_id}")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


M = TypeVar("M", bound=BaseModel)


def _model(model: type[M], value: Any) -> M | None:
    """The element read through its model, or None when it does not fit (counts as absent)."""
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


def map_adverse_event(hospital: str, body: Any) -> Mapped:
    """The referrals an AdverseEvent asks for, or `Refused` naming the fields at fault."""
    if not isinstance(body, dict) or body.get("resourceType") != "AdverseEvent":
        raise Refused([issue("resourceType", "invalid", "the resource is not an AdverseEvent")])
    issues: list[Issue] = []
    event_id = body.get("id")
    if not isinstance(event_id, str) or not _ID_RE.match(event_id):
        why = "missing" if event_id is None else "not an id of 1 to 64 of A-Z a-z 0-9 _ -"
        issues.append(issue("id", "required" if event_id is None else "value", why))
    requested_at = _requested_at(body, issues)
    contributors = body.get("contributor")
    if not isinstance(contributors, list) or not contributors:
        issues.append(
            issue("contributor", "required", "no contributor names an involved physician")
        )
    elif len(contributors) > MAX_CONTRIBUTORS:
        issues.append(
            issue("contributor", "too-costly", f"more than {MAX_CONTRIBUTORS} contributors")
        )
    if issues:
        raise Refused(issues)
    assert isinstance(event_id, str) and requested_at is not None and isinstance(contributors, list)
    contained = _contained(body.get("contained"))
    common: dict[str, Any] = {
        "source": "safety_event",
        "event_nature": _event_nature(body.get("suspectEntity"), contained),
        "requested_at": requested_at,
        "safety_event_id": event_id,
    }
    referrer = _practitioner_id(_model(Reference, body.get("recorder")))
    if referrer is not None and _ID_RE.match(referrer):
        common["referrer_id"] = referrer
    referrals: dict[str, tuple[str, RequestReferral]] = {}
    skipped: list[Skipped] = []
    for contributor in contributors:
        sent = _as_sent(contributor)
        found = _involved(_model(Reference, contributor), contained)
        if isinstance(found, str):
            skipped.append(Skipped(contributor=sent, reason=found))
            continue
        physician_id, department, rank = found
        if physician_id in referrals:  # the same physician in two roles: referred once
            continue
        try:
            command = parse_command(
                RequestReferral,
                {
                    **common,
                    "referral_id": referral_id(event_id, physician_id),
                    "physician_id": physician_id,
                    "department": department,
                    "rank": rank,
                },
            )
        except Rejected:
            skipped.append(Skipped(contributor=sent, reason="invalid_id"))
            continue
        referrals[physician_id] = (command_id(hospital, event_id, physician_id), command)
    if not referrals:
        raise Refused(
            [issue("contributor", "business-rule", "no contributor yields a referral")]
            + [
                Issue(
                    code="business-rule",
                    diagnostics=f"contributor: skipped, {s.reason}",
                    expression=[f"AdverseEvent.contributor[{i}]"],
                )
                for i, s in enumerate(skipped)
            ]
        )
    return Mapped(list(referrals.values()), skipped)


def _as_sent(contributor: Any) -> str | None:
    """The contributor's `reference` as sent, when it is text that can be answered in UTF-8
    (JSON may carry a lone surrogate, which no answer can hold)."""
    sent = contributor.get("reference") if isinstance(contributor, dict) else None
    if not isinstance(sent, str):
        return None
    try:
        sent.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return sent


def _requested_at(body: dict[str, Any], issues: list[Issue]) -> str | None:
    """`recordedDate`, else `date`, as a UTC ISO time; an issue when unusable."""
    field = "recordedDate" if body.get("recordedDate") is not None else "date"
    value = body.get(field)
    if value is None:
        issues.append(
            Issue(
                code="required",
                diagnostics="recordedDate: missing, and date too",
                expression=["AdverseEvent.recordedDate", "AdverseEvent.date"],
            )
        )
        return None
    if isinstance(value, str) and _DATETIME_RE.match(value):
        try:
            return datetime.fromisoformat(value).astimezone(UTC).isoformat()
        except ValueError:  # a day the calendar does not have
            pass
    issues.append(issue(field, "value", "not a dateTime with a time zone"))
    return None


def _contained(value: Any) -> dict[str, dict[str, Any]]:
    """The contained resources by id (the first of an id wins)."""
    found: dict[str, dict[str, Any]] = {}
    for resource in value if isinstance(value, list) else ():
        if isinstance(resource, dict) and isinstance(resource.get("id"), str):
            found.setdefault(resource["id"], resource)
    return found


def _resolve(reference: Reference | None, contained: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The contained resource a `#<id>` reference points at ({} when it points at none)."""
    if reference is None or not reference.reference or not reference.reference.startswith("#"):
        return {}
    return contained.get(reference.reference[1:], {})


def _referenced(reference: Reference | None) -> tuple[str, str] | None:
    """(resource type, id) of a literal reference to a resource on a server."""
    if reference is None or reference.reference is None:
        return None
    match = _REFERENCE_RE.match(reference.reference)
    return (match["type"], match["id"]) if match else None


def _practitioner_id(reference: Reference | None) -> str | None:
    found = _referenced(reference)
    return found[1] if found and found[0] == "Practitioner" else None


def _event_nature(value: Any, contained: dict[str, dict[str, Any]]) -> str:
    for entity in value if isinstance(value, list) else ():
        suspect = _model(SuspectEntity, entity)
        instance = suspect.instance if suspect else None
        target = _referenced(instance)
        if (target and target[0] == "Procedure") or (
            _resolve(instance, contained).get("resourceType") == "Procedure"
        ):
            return "interventional"
    return "other"


def _code(concepts: Any, system: str) -> str | None:
    """The code of the first coding of that system among a list of CodeableConcepts."""
    for value in concepts if isinstance(concepts, list) else ():
        concept = _model(CodeableConcept, value)
        for coding in concept.coding if concept else ():
            if coding.system == system and coding.code is not None:
                return coding.code
    return None


def _involved(
    reference: Reference | None, contained: dict[str, dict[str, Any]]
) -> tuple[str, str, str] | SkipReason:
    """(physician_id, department, rank) of a contributor, or why it is skipped."""
    role = _resolve(reference, contained)
    if role.get("resourceType") != "PractitionerRole":
        return "not_a_contained_role"
    physician_id = _practitioner_id(_model(Reference, role.get("practitioner")))
    if physician_id is None:
        return "no_practitioner"
    department = _code(role.get("specialty"), DEPARTMENT_SYSTEM)
    if department is None:
        return "no_department"
    rank = _code(role.get("code"), RANK_SYSTEM)
    if rank not in _RANKS:
        # A code of the rank system that is not one of the four ranks is no rank either.
        return "no_rank"
    if not _ID_RE.match(physician_id) or not is_slug(department):
        return "invalid_id"
    return physician_id, department, rank


_RANKS = frozenset(r.value for r in Rank)
