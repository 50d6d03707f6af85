# GENERATED from the platform's shared/contracts/base.py by clients/python/sync_contracts.py:
# do not edit. The platform's tests compare the JSON Schemas of both, field by field.
"""The contract's building blocks: the id patterns, its enums and literals, and the base models
`Message`, `Command` (from a hospital) and `Event` (a fact the platform emits)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

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


def is_slug(value: str) -> bool:
    """A hospital (tenant) or department id: CONTRACT.md's slug `[a-z0-9][a-z0-9-]{0,62}`."""
    return _HOSPITAL_RE.match(value) is not None


is_hospital_id = is_slug
