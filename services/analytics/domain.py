"""The facts the RE-AIM figures are computed from (one dataclass per read-model row) and the
answer they make (one typed model). Pure.

Each fact is keyed by hospital and a domain id, because every id of CONTRACT.md is unique
within its hospital only. Fields are optional where the fact may be known only in part
(events of different subjects may arrive in any order; a row can exist before its creation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from pydantic import BaseModel, Field

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


# --- the answer: one typed model (reaim.compute and store.figures fill it; OpenAPI, the
# rendering and the gauges' names read it) ---------------------------------------------------

Rate = float | None


class MonthCount(BaseModel):
    month: str = Field(description="YYYY-MM")
    interactions: int


class Reach(BaseModel):
    """How many physicians the program reaches."""

    supporters_trained: int = Field(description="SupporterTrained in the period")
    referrals: int = Field(description="ReferralCreated in the period")
    referrals_by_source: dict[str, int]
    interactions: int = Field(description="InteractionCompleted in the period")
    interactions_by_department: dict[str, int] = Field(
        description="by department slug (summed over hospitals at region scope)"
    )
    physicians_supported: int = Field(description="distinct physicians with an interaction")
    eligible_physicians: int = Field(
        description="physician_count of departments launched and not closed before the end"
    )
    reach_rate: Rate = Field(description="physicians_supported / eligible_physicians")
    minutes_mean: float | None
    minutes_median: float | None
    minutes_min: int | None
    minutes_max: int | None
    monthly: list[MonthCount] = Field(
        description="every calendar month overlapping the period, zeros included"
    )
    monthly_mean: float | None
    monthly_median: float | None
    monthly_min: int | None
    monthly_max: int | None


class Effectiveness(BaseModel):
    """Whether it helps, from the department survey."""

    respondents_with_interaction: int
    helpful_rate: Rate = Field(description="helpful >= 4 among respondents with an interaction")
    wellbeing_improved_rate: Rate
    comfort_improved_rate: Rate
    escalation_rate: Rate = Field(description="escalated interactions / interactions")


class Adoption(BaseModel):
    """Who takes the program up."""

    hospitals_adopted: int
    departments_launched: int = Field(description="launched before the end, closed included")
    physician_coverage: Rate = Field(
        description="eligible physicians / physician_count of the registered hospitals in scope"
    )
    outreach_acceptance_rate: Rate = Field(
        description="first outcome accepted / first outcome accepted or declined"
    )
    would_recommend_rate: Rate = Field(description="among survey responses with aware")
    departments_without_referrals: int


class Implementation(BaseModel):
    """How faithfully it is run."""

    outreach_within_48h_rate: Rate = Field(
        description="first outreach or interaction at most 48 h after requested_at"
    )
    hours_to_outreach_median: float | None
    physicians_per_active_supporter: float | None = Field(description="goal <= 10")
    referrals_without_supporter: int = Field(
        description="latest matching outcome is NoSupporterAvailable"
    )
    supporters_available: int = Field(
        description="active supporters whose latest SupporterAvailabilityChanged with changed_on"
        " before the end says available (or who have none)"
    )
    decline_reasons: dict[str, int]


class Maintenance(BaseModel):
    """Whether it lasts."""

    supporters_active: int
    supporter_retention_rate: Rate
    departments_active_rate: Rate
    interactions_by_program_year: list[int] = Field(description="from program year 1")
    monthly_rate_by_program_year: list[float]


class Figures(BaseModel):
    """The five RE-AIM objects of one scope and period (CONTRACT.md's table)."""

    reach: Reach
    effectiveness: Effectiveness
    adoption: Adoption
    implementation: Implementation
    maintenance: Maintenance


_NUMBERS = (int, float, int | None, float | None)
OBJECTS = tuple(Figures.model_fields)


def numeric_keys() -> dict[str, str]:
    """Every numeric key of the answer (a count, a rate, a mean...) -> its RE-AIM object, in
    the model's order: read from the model, not from a computed answer."""
    keys: dict[str, str] = {}
    for name, part in Figures.model_fields.items():
        model = part.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for key, spec in model.model_fields.items():
            if spec.annotation in _NUMBERS:
                keys[key] = name
    return keys


# The figures a region watches per hospital (issue 26): one gauge each for every hospital;
# every other figure has gauges for the region and the hospitals with department gauges.
HEADLINE = (
    "referrals",
    "interactions",
    "physicians_supported",
    "eligible_physicians",
    "reach_rate",
    "outreach_acceptance_rate",
    "outreach_within_48h_rate",
    "physicians_per_active_supporter",
    "referrals_without_supporter",
    "supporters_active",
)
assert set(HEADLINE) <= set(numeric_keys()), "a headline figure the answer does not have"


# The figures GET /reaim-hospitals ranks the hospitals by (issue 26), as "object.key": the
# object read from the model, so a key moved or renamed fails here, at import.
RANKED_KEYS = (
    "referrals",
    "interactions",
    "physicians_supported",
    "eligible_physicians",
    "reach_rate",
    "minutes_median",
    "helpful_rate",
    "wellbeing_improved_rate",
    "escalation_rate",
    "departments_launched",
    "physician_coverage",
    "outreach_acceptance_rate",
    "would_recommend_rate",
    "outreach_within_48h_rate",
    "hours_to_outreach_median",
    "physicians_per_active_supporter",
    "referrals_without_supporter",
    "supporters_active",
    "supporter_retention_rate",
    "departments_active_rate",
)
RANKED = tuple(f"{numeric_keys()[key]}.{key}" for key in RANKED_KEYS)
