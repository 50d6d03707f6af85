"""A synthetic region calibrated on the POST study's rates, for demos and load."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from postctl.simulate.post_2023 import POST_MINUTES
from postctl.simulate.scenario import (
    AvailabilityPlan,
    DepartmentPlan,
    HospitalPlan,
    InteractionPlan,
    OutreachPlan,
    PolicyPlan,
    ReferralPlan,
    Scenario,
    SupporterPlan,
    SurveyPlan,
    add_months,
    at_time,
    month_end,
    month_start,
    random_day,
)
from shared.contracts import (
    DeclineReason,
    Rank,
    Source,
)

REGION_START = date(2019, 6, 1)


@dataclass(frozen=True)
class DepartmentProfile:
    """Calibrated on POST: relative size, referrals per physician and month, procedures."""

    department: str
    share: float
    referral_rate: float
    interventional: bool


REGION_PROFILES: tuple[DepartmentProfile, ...] = (
    DepartmentProfile("emergency-medicine", 0.14, 0.030, True),
    DepartmentProfile("anesthesia", 0.13, 0.010, True),
    DepartmentProfile("icu", 0.04, 0.012, True),
    DepartmentProfile("hospitalists", 0.08, 0.008, False),
    DepartmentProfile("obgyn", 0.09, 0.005, True),
    DepartmentProfile("adult-family-medicine", 0.35, 0.0015, False),
    DepartmentProfile("head-neck-surgery", 0.05, 0.003, True),
    DepartmentProfile("pediatric-hospitalists", 0.04, 0.004, False),
    DepartmentProfile("pediatric-icu", 0.03, 0.004, True),
    DepartmentProfile("geriatrics", 0.03, 0.002, False),
    DepartmentProfile("maxillofacial-surgery", 0.02, 0.002, True),
)

# Rates measured in POST (and its survey), used to calibrate the region.
ACCEPTANCE = 0.80
NO_RECORDED_OUTREACH = 0.12  # the supporter recorded only the interaction
UNREACHABLE_FIRST = 0.06
LATE_OUTREACH = 0.12  # more than 48 h after the request
ESCALATION = 0.04
FOLLOW_UP = 0.55  # chance of one more interaction after each
DECLINE_WEIGHTS: dict[DeclineReason, int] = {
    "no_time": 36,
    "no_need": 16,
    "privacy": 12,
    "discomfort": 12,
    "medicolegal": 2,
    "other": 4,
}
RETIREMENT_PER_YEAR = 0.06
CLOSURE_CHANCE = 0.04
PAUSE_CHANCE = 0.08
SURVEY_RESPONSE = 0.294
SURVEY_AFTER_MONTHS = 18
RANK_WEIGHTS: dict[Rank, int] = {
    Rank.attending: 80,
    Rank.fellow: 8,
    Rank.resident: 7,
    Rank.senior: 5,
}
SOURCE_WEIGHTS: dict[Source, int] = {"third_party": 60, "self": 28, "safety_event": 12}


def region_hospital_id(seed: int, index: int) -> str:
    return f"region-{seed}-h{index + 1:03d}"


def region_scenario(
    hospitals: int, years: int, seed: int, start: date = REGION_START, first: int = 0
) -> Scenario:
    """A region of `hospitals` hospitals over `years` program years from `start`: departments
    launch over time and a few close, supporters retire, referrals are declined for stated
    reasons, some outreach is late, some interactions come with no recorded outreach.

    `first` > 0 plans hospitals `first` to `first + hospitals - 1` of a bigger region alone, with
    a random generator of their own (see `region_scenarios`)."""
    if hospitals < 1 or years < 1:
        raise ValueError("a region needs at least one hospital and one year")
    rng = random.Random(seed if first == 0 else f"{seed}/{first}")
    end = add_months(start, 12 * years)  # exclusive
    minutes_pool = [value for value, n in POST_MINUTES for _ in range(n)]
    plans = _RegionPlans()
    for index in range(first, first + hospitals):
        hospital = region_hospital_id(seed, index)
        physicians = rng.randint(300, 1500)
        plans.hospitals.append(HospitalPlan(hospital, f"Region hospital {index + 1}", physicians))
        if index % 3 == 1:
            # Some programs also take a peer from another department when nobody in the
            # referral's own is eligible (CONTRACT 1.1).
            plans.policies.append(PolicyPlan(hospital, "same_then_other"))
        # The first hospital starts the program; the others join over the first half.
        joined = start + timedelta(days=0 if index == 0 else rng.randint(0, 365 * years // 2))
        chosen = [
            p for p in REGION_PROFILES if p.department == "emergency-medicine" or rng.random() < 0.6
        ]
        weight = sum(p.share for p in chosen)
        for k, profile in enumerate(chosen):
            launched_on = joined if k == 0 else joined + timedelta(days=rng.randint(0, 730))
            if launched_on > end - timedelta(days=60):
                continue
            count = max(5, round(0.6 * physicians * profile.share / weight))
            _region_department(rng, plans, hospital, profile, count, launched_on, end, minutes_pool)
    return Scenario(
        name=f"region-{seed}",
        hospitals=tuple(plans.hospitals),
        departments=tuple(plans.departments),
        supporters=tuple(plans.supporters),
        referrals=tuple(sorted(plans.referrals, key=lambda r: r.requested_at)),
        surveys=tuple(plans.surveys),
        policies=tuple(plans.policies),
        availability=tuple(plans.availability),
    )


def region_scenarios(
    hospitals: int, years: int, seed: int, chunk: int = 100, start: date = REGION_START
) -> Iterator[Scenario]:
    """A national region (thousands of hospitals) as scenarios of `chunk` hospitals each, planned
    one at a time, so memory holds one chunk's plans whatever the region's size. Repeatable: the
    same arguments give the same region (chunks of another size give another one)."""
    for first in range(0, hospitals, chunk):
        yield region_scenario(min(chunk, hospitals - first), years, seed, start, first)


@dataclass
class _RegionPlans:
    hospitals: list[HospitalPlan] = field(default_factory=list)
    departments: list[DepartmentPlan] = field(default_factory=list)
    supporters: list[SupporterPlan] = field(default_factory=list)
    referrals: list[ReferralPlan] = field(default_factory=list)
    surveys: list[SurveyPlan] = field(default_factory=list)
    policies: list[PolicyPlan] = field(default_factory=list)
    availability: list[AvailabilityPlan] = field(default_factory=list)
    numbers: Counter[tuple[str, str]] = field(default_factory=Counter)

    def next_id(self, hospital: str, prefix: str) -> str:
        self.numbers[(hospital, prefix)] += 1
        return f"{prefix}-{self.numbers[(hospital, prefix)]:05d}"


def _weighted(rng: random.Random, weights: dict[Any, int]) -> Any:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _region_department(
    rng: random.Random,
    plans: _RegionPlans,
    hospital: str,
    profile: DepartmentProfile,
    physicians: int,
    launched_on: date,
    end: date,
    minutes_pool: Sequence[int],
) -> None:
    closed_on: date | None = None
    if rng.random() < CLOSURE_CHANCE:
        candidate = launched_on + timedelta(days=rng.randint(365, 900))
        closed_on = candidate if candidate < end - timedelta(days=1) else None
    active_until = closed_on or end  # exclusive
    plans.departments.append(
        DepartmentPlan(hospital, profile.department, physicians, launched_on, closed_on)
    )

    # Supporters: one per ten physicians; the first is senior and interventional so that every
    # referral can be matched. Most train at launch, the others later.
    for k in range(math.ceil(physicians / 10)):
        trained_on = launched_on
        if k >= 2 and rng.random() < 0.4:
            trained_on = random_day(rng, launched_on, active_until - timedelta(days=1))
        retired_on: date | None = None
        if k > 0:
            years_served = rng.expovariate(RETIREMENT_PER_YEAR)
            candidate = trained_on + timedelta(days=int(years_served * 365))
            retired_on = candidate if candidate < active_until else None
        supporter_id = plans.next_id(hospital, "sup")
        # The survey's main barrier is time (54.5%): some supporters pause, a few take at most
        # a handful of referrals at once. Never the first, who keeps every referral matchable.
        paused_from = retired_on or active_until
        if k > 0 and (paused_from - trained_on).days > 30 and rng.random() < PAUSE_CHANCE:
            paused = rng.random() < 0.5  # else capped, still available
            plans.availability.append(
                AvailabilityPlan(
                    hospital,
                    supporter_id,
                    available=not paused,
                    changed_on=random_day(rng, trained_on, paused_from - timedelta(days=1)),
                    max_open_assignments=None if paused else rng.randint(1, 5),
                )
            )
        plans.supporters.append(
            SupporterPlan(
                hospital=hospital,
                supporter_id=supporter_id,
                department=profile.department,
                rank=Rank.senior if k == 0 else rng.choice((Rank.attending, Rank.senior)),
                interventional=k == 0 or profile.interventional or rng.random() < 0.3,
                trained_on=trained_on,
                retired_on=retired_on,
            )
        )

    # Referrals month by month, more as the program becomes known (maintenance grows).
    prefix = REGION_PROFILES.index(profile)
    roster = [f"{prefix:02d}-{k:04d}" for k in range(physicians)]
    months = (active_until.year - launched_on.year) * 12 + active_until.month - launched_on.month
    for m in range(months + 1):
        first = month_start(launched_on, m)
        lo, hi = max(first, launched_on), min(month_end(first), active_until - timedelta(days=14))
        if lo > hi:
            continue
        ramp = min(1.3, 0.5 + m / 24)
        for _ in range(_poisson(rng, physicians * profile.referral_rate * ramp)):
            requested_at = at_time(random_day(rng, lo, hi), rng.randint(7, 21), rng.randint(0, 59))
            plans.referrals.append(
                _region_referral(
                    rng, plans, hospital, profile, rng.choice(roster), requested_at,
                    active_until, minutes_pool,
                )
            )  # fmt: skip

    # The department survey, once it has run for 18 months.
    surveyed_on = add_months(launched_on, SURVEY_AFTER_MONTHS)
    if surveyed_on + timedelta(days=14) < active_until:  # answers take up to two weeks
        for _ in range(sum(rng.random() < SURVEY_RESPONSE for _ in range(physicians))):
            plans.surveys.append(
                _region_survey(rng, plans, hospital, profile.department, surveyed_on)
            )


def _poisson(rng: random.Random, mean: float) -> int:
    # Knuth's method: the means here are small.
    limit, k, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


def _region_referral(
    rng: random.Random,
    plans: _RegionPlans,
    hospital: str,
    profile: DepartmentProfile,
    physician: str,
    requested_at: datetime,
    active_until: date,
    minutes_pool: Sequence[int],
) -> ReferralPlan:
    source: Source = _weighted(rng, SOURCE_WEIGHTS)
    referral_id = plans.next_id(hospital, "ref")
    last = at_time(active_until - timedelta(days=1), 23, 0)
    outreach: list[OutreachPlan] = []
    engaged_at: datetime
    if rng.random() < NO_RECORDED_OUTREACH:
        engaged_at = requested_at + timedelta(hours=rng.uniform(4, 120))
        accepted = True
    else:
        late = rng.random() < LATE_OUTREACH
        at = requested_at + timedelta(hours=rng.uniform(49, 120) if late else rng.uniform(1, 46))
        if rng.random() < UNREACHABLE_FIRST:
            outreach.append(OutreachPlan("unreachable", min(at, last)))
            at += timedelta(hours=rng.uniform(12, 72))
        accepted = rng.random() < ACCEPTANCE
        reason: DeclineReason | None = None if accepted else _weighted(rng, DECLINE_WEIGHTS)
        outreach.append(OutreachPlan("accepted" if accepted else "declined", min(at, last), reason))
        engaged_at = at + timedelta(hours=rng.uniform(12, 96))
    interactions: list[InteractionPlan] = []
    if accepted:
        day = engaged_at.date()
        while day < active_until:
            interactions.append(
                InteractionPlan(day, rng.choice(minutes_pool), rng.random() < ESCALATION)
            )
            if rng.random() > FOLLOW_UP:
                break
            day += timedelta(days=rng.randint(7, 60))
    return ReferralPlan(
        hospital=hospital,
        referral_id=referral_id,
        physician_id=f"phys-{physician}",
        department=profile.department,
        rank=_weighted(rng, RANK_WEIGHTS),
        source=source,
        event_nature="interventional" if profile.interventional and rng.random() < 0.3 else "other",
        requested_at=requested_at,
        referrer_id=None if source == "self" else plans.next_id(hospital, "clin"),
        outreach=tuple(outreach),
        interactions=tuple(interactions),
    )


def _region_survey(
    rng: random.Random, plans: _RegionPlans, hospital: str, department: str, surveyed_on: date
) -> SurveyPlan:
    submitted_on = surveyed_on + timedelta(days=rng.randint(0, 14))
    response_id = plans.next_id(hospital, "resp")
    if rng.random() >= 0.88:
        return SurveyPlan(hospital, response_id, department, submitted_on, False, False)
    had = rng.random() < 0.485
    return SurveyPlan(
        hospital=hospital,
        response_id=response_id,
        department=department,
        submitted_on=submitted_on,
        aware=True,
        had_interaction=had,
        helpful=(rng.choice((4, 5)) if rng.random() < 0.969 else rng.randint(1, 3))
        if had
        else None,
        wellbeing_improved=rng.random() < 0.844 if had else None,
        comfort_improved=rng.random() < 0.75 if had else None,
        would_recommend=rng.random() < 0.833,
        satisfaction=_weighted(rng, {5: 26, 4: 18, 3: 18, 2: 2}),
    )
