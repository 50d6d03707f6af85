"""A simulation as data: the scenario a generator produces, the contract commands built from it
(pure), and the date helpers the generators share."""

from __future__ import annotations

import calendar
import random
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from shared.contracts import (
    CloseDepartment,
    DeclineReason,
    EventNature,
    LaunchDepartment,
    MatchingPolicy,
    Outcome,
    Rank,
    RecordInteraction,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    RetireSupporter,
    SetMatchingPolicy,
    SetSupporterAvailability,
    Source,
    SubmitSurveyResponse,
)

# --- the scenario as data ---------------------------------------------------------------------


@dataclass(frozen=True)
class HospitalPlan:
    hospital: str
    name: str
    physician_count: int


@dataclass(frozen=True)
class DepartmentPlan:
    hospital: str
    department: str
    physician_count: int
    launched_on: date
    closed_on: date | None = None


@dataclass(frozen=True)
class SupporterPlan:
    hospital: str
    supporter_id: str
    department: str
    rank: Rank
    interventional: bool
    trained_on: date
    retired_on: date | None = None


@dataclass(frozen=True)
class OutreachPlan:
    outcome: Outcome
    at: datetime
    decline_reason: DeclineReason | None = None


@dataclass(frozen=True)
class InteractionPlan:
    occurred_on: date
    minutes: int
    escalated: bool = False


@dataclass(frozen=True)
class ReferralPlan:
    """A referral and its planned fate: outreach outcomes, then interactions, in order."""

    hospital: str
    referral_id: str
    physician_id: str
    department: str
    rank: Rank
    source: Source
    event_nature: EventNature
    requested_at: datetime
    referrer_id: str | None = None
    outreach: tuple[OutreachPlan, ...] = ()
    interactions: tuple[InteractionPlan, ...] = ()


@dataclass(frozen=True)
class SurveyPlan:
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
    satisfaction: int | None = None


@dataclass(frozen=True)
class PolicyPlan:
    """A program's choice of whom to match (CONTRACT 1.1): the hospital's, or a department's."""

    hospital: str
    policy: MatchingPolicy
    department: str | None = None


@dataclass(frozen=True)
class AvailabilityPlan:
    """A supporter paused (leave, a hard month) or capped, from `changed_on` (CONTRACT 1.1)."""

    hospital: str
    supporter_id: str
    available: bool
    changed_on: date
    max_open_assignments: int | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    hospitals: tuple[HospitalPlan, ...]
    departments: tuple[DepartmentPlan, ...]
    supporters: tuple[SupporterPlan, ...]
    referrals: tuple[ReferralPlan, ...]
    surveys: tuple[SurveyPlan, ...]
    policies: tuple[PolicyPlan, ...] = ()
    availability: tuple[AvailabilityPlan, ...] = ()

    def business_dates(self) -> list[date]:
        """Every business date the scenario's commands carry (for the RE-AIM period's end)."""
        dates: list[date] = []
        for d in self.departments:
            dates.append(d.launched_on)
            if d.closed_on is not None:
                dates.append(d.closed_on)
        for s in self.supporters:
            dates.append(s.trained_on)
            if s.retired_on is not None:
                dates.append(s.retired_on)
        for r in self.referrals:
            dates.append(r.requested_at.date())
            dates.extend(o.at.date() for o in r.outreach)
            dates.extend(i.occurred_on for i in r.interactions)
        dates.extend(s.submitted_on for s in self.surveys)
        dates.extend(a.changed_on for a in self.availability)
        return dates

    def command_count(self) -> int:
        return (
            len(self.hospitals)
            + len(self.departments)
            + sum(1 for d in self.departments if d.closed_on is not None)
            + len(self.supporters)
            + sum(1 for s in self.supporters if s.retired_on is not None)
            + sum(1 + len(r.outreach) + len(r.interactions) for r in self.referrals)
            + len(self.surveys)
            + len(self.policies)
            + len(self.availability)
        )


# --- contract commands built from the scenario (pure) -----------------------------------------


def register_hospital(plan: HospitalPlan) -> RegisterHospital:
    return RegisterHospital(name=plan.name, physician_count=plan.physician_count)


def launch_department(plan: DepartmentPlan) -> LaunchDepartment:
    return LaunchDepartment(
        department=plan.department,
        physician_count=plan.physician_count,
        launched_on=plan.launched_on,
    )


def close_department(plan: DepartmentPlan) -> CloseDepartment:
    assert plan.closed_on is not None
    return CloseDepartment(department=plan.department, closed_on=plan.closed_on)


def register_supporter(plan: SupporterPlan) -> RegisterSupporter:
    return RegisterSupporter(
        supporter_id=plan.supporter_id,
        department=plan.department,
        rank=plan.rank,
        interventional=plan.interventional,
        trained_on=plan.trained_on,
    )


def retire_supporter(plan: SupporterPlan) -> RetireSupporter:
    assert plan.retired_on is not None
    return RetireSupporter(supporter_id=plan.supporter_id, retired_on=plan.retired_on)


def set_matching_policy(plan: PolicyPlan) -> SetMatchingPolicy:
    return SetMatchingPolicy(policy=plan.policy, department=plan.department)


def set_supporter_availability(plan: AvailabilityPlan) -> SetSupporterAvailability:
    return SetSupporterAvailability(
        supporter_id=plan.supporter_id,
        available=plan.available,
        max_open_assignments=plan.max_open_assignments,
        changed_on=plan.changed_on,
    )


def request_referral(plan: ReferralPlan) -> RequestReferral:
    return RequestReferral(
        referral_id=plan.referral_id,
        physician_id=plan.physician_id,
        department=plan.department,
        rank=plan.rank,
        source=plan.source,
        event_nature=plan.event_nature,
        requested_at=plan.requested_at,
        referrer_id=plan.referrer_id,
    )


def record_outreach(
    plan: ReferralPlan, outreach: OutreachPlan, supporter_id: str
) -> RecordOutreach:
    return RecordOutreach(
        referral_id=plan.referral_id,
        supporter_id=supporter_id,
        outcome=outreach.outcome,
        at=outreach.at,
        decline_reason=outreach.decline_reason,
    )


def record_interaction(
    plan: ReferralPlan, interaction: InteractionPlan, supporter_id: str
) -> RecordInteraction:
    return RecordInteraction(
        referral_id=plan.referral_id,
        supporter_id=supporter_id,
        occurred_on=interaction.occurred_on,
        minutes=interaction.minutes,
        # Absent means not escalated; sending only `True` keeps payloads minimal.
        escalated=True if interaction.escalated else None,
    )


def submit_survey_response(plan: SurveyPlan) -> SubmitSurveyResponse:
    return SubmitSurveyResponse(
        response_id=plan.response_id,
        department=plan.department,
        submitted_on=plan.submitted_on,
        aware=plan.aware,
        had_interaction=plan.had_interaction,
        helpful=plan.helpful,
        wellbeing_improved=plan.wellbeing_improved,
        comfort_improved=plan.comfort_improved,
        would_recommend=plan.would_recommend,
        satisfaction=plan.satisfaction,
    )


# --- helpers for generators -------------------------------------------------------------------


def add_months(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    last = calendar.monthrange(year, month + 1)[1]
    return date(year, month + 1, min(day.day, last))


def month_start(first: date, index: int) -> date:
    return add_months(first.replace(day=1), index)


def month_end(first_of_month: date) -> date:
    return first_of_month.replace(
        day=calendar.monthrange(first_of_month.year, first_of_month.month)[1]
    )


def at_time(day: date, hour: int, minute: int) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


def random_day(rng: random.Random, lo: date, hi: date) -> date:
    return lo + timedelta(days=rng.randint(0, (hi - lo).days))


def spread(total: int, slots: int) -> list[int]:
    """Positions in [0, slots) for `total` items, evenly spread (deterministic)."""
    return [int((i + 0.5) * slots / total) for i in range(total)]
