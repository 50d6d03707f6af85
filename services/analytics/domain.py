"""The facts the RE-AIM figures are computed from: one dataclass per read-model row. Pure.

Each fact is keyed by hospital and a domain id, because every id of CONTRACT.md is unique
within its hospital only. Fields are optional where the fact may be known only in part
(events of different subjects may arrive in any order; a row can exist before its creation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

# The latest matching outcome of a referral (SupporterAssigned / NoSupporterAvailable).
ASSIGNED = "assigned"
NO_SUPPORTER = "no_supporter"


@dataclass(frozen=True, slots=True)
class Hospital:
    hospital: str
    physician_count: int


@dataclass(frozen=True, slots=True)
class Department:
    hospital: str
    department: str
    physician_count: int = 0
    launched_on: date | None = None
    closed_on: date | None = None


@dataclass(frozen=True, slots=True)
class Supporter:
    hospital: str
    supporter_id: str
    department: str | None = None
    trained_on: date | None = None
    retired_on: date | None = None


@dataclass(frozen=True, slots=True)
class AvailabilityChange:
    """A SupporterAvailabilityChanged: one row per event, the latest by `changed_on` (then
    stream sequence) before a period's end says whether the supporter is available."""

    hospital: str
    supporter_id: str
    department: str
    changed_on: date
    available: bool
    stream_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Referral:
    hospital: str
    referral_id: str
    department: str | None = None
    physician_id: str | None = None
    source: str | None = None
    requested_at: datetime | None = None
    matching_outcome: str | None = None  # ASSIGNED, NO_SUPPORTER or None


@dataclass(frozen=True, slots=True)
class Outreach:
    hospital: str
    referral_id: str
    department: str
    outcome: str  # accepted / declined / unreachable
    at: datetime
    decline_reason: str | None = None
    stream_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Interaction:
    hospital: str
    referral_id: str
    department: str
    occurred_on: date
    minutes: int
    escalated: bool = False
    stream_seq: int | None = None


@dataclass(frozen=True, slots=True)
class SurveyResponse:
    hospital: str
    response_id: str
    department: str
    submitted_on: date
    aware: bool
    had_interaction: bool
    helpful: int | None = None
    wellbeing_improved: bool | None = None
    comfort_improved: bool | None = None
    would_recommend: bool | None = None


@dataclass(frozen=True, slots=True)
class Scope:
    """The whole region (no hospital), one hospital, or one department of a hospital."""

    hospital: str | None = None
    department: str | None = None

    def __post_init__(self) -> None:
        if self.department is not None and self.hospital is None:
            raise ValueError("a department scope needs its hospital")

    @property
    def level(self) -> str:
        if self.hospital is None:
            return "region"
        return "hospital" if self.department is None else "department"

    def as_dict(self) -> dict[str, str | None]:
        answer: dict[str, str | None] = {"level": self.level}
        if self.hospital is not None:
            answer["hospital"] = self.hospital
        if self.department is not None:
            answer["department"] = self.department
        return answer

    def holds(self, hospital: str, department: str | None = None) -> bool:
        """Whether a fact of this hospital (and department, when it has one) is in scope."""
        if self.hospital is not None and hospital != self.hospital:
            return False
        return self.department is None or department == self.department


@dataclass(frozen=True)
class Facts:
    hospitals: Sequence[Hospital] = field(default_factory=tuple)
    departments: Sequence[Department] = field(default_factory=tuple)
    supporters: Sequence[Supporter] = field(default_factory=tuple)
    referrals: Sequence[Referral] = field(default_factory=tuple)
    outreach: Sequence[Outreach] = field(default_factory=tuple)
    interactions: Sequence[Interaction] = field(default_factory=tuple)
    surveys: Sequence[SurveyResponse] = field(default_factory=tuple)
    availability_changes: Sequence[AvailabilityChange] = field(default_factory=tuple)

    def within(self, scope: Scope) -> Facts:
        """The facts of one scope; hospital rows stay at department scope (the coverage base)."""
        if scope.hospital is None:
            return self
        return Facts(
            hospitals=[h for h in self.hospitals if h.hospital == scope.hospital],
            departments=[d for d in self.departments if scope.holds(d.hospital, d.department)],
            supporters=[s for s in self.supporters if scope.holds(s.hospital, s.department)],
            referrals=[r for r in self.referrals if scope.holds(r.hospital, r.department)],
            outreach=[o for o in self.outreach if scope.holds(o.hospital, o.department)],
            interactions=[i for i in self.interactions if scope.holds(i.hospital, i.department)],
            surveys=[s for s in self.surveys if scope.holds(s.hospital, s.department)],
            availability_changes=[
                c for c in self.availability_changes if scope.holds(c.hospital, c.department)
            ],
        )

    def business_span(self) -> tuple[date, date] | None:
        """The first and last business dates of the commands behind these facts (never a
        processing time), or None without any."""
        days = [
            *(x for d in self.departments for x in (d.launched_on, d.closed_on) if x is not None),
            *(x for s in self.supporters for x in (s.trained_on, s.retired_on) if x is not None),
            *(c.changed_on for c in self.availability_changes),
        ]
        for dated in (self.interactions, self.surveys):
            attr = "occurred_on" if dated is self.interactions else "submitted_on"
            if dated:
                days += [min(getattr(f, attr) for f in dated), max(getattr(f, attr) for f in dated)]
        moments = [r.requested_at for r in self.referrals if r.requested_at is not None]
        moments += [o.at for o in self.outreach]
        if moments:  # aware datetimes compare across zones: convert only the extremes
            days += [utc_date(min(moments)), utc_date(max(moments))]
        return (min(days), max(days)) if days else None


def utc_date(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def start_of_day(day: date) -> datetime:
    """A date stands for the start of that day, UTC, wherever a time is needed."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
