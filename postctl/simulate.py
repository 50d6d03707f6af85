"""Simulators that speak only the contract, through NATS, as hospital systems would.

Generation is split from driving. A pure, seeded generator produces a `Scenario` as data (the
hospitals, departments, supporters with their training and retirement dates, referrals with
their planned fate, surveys); the driver sends it with `shared.client.PlatformClient`: the roster
first, then each referral (waiting for matching to pick its supporter, whose id the records
commands must carry), then retirements, closings and surveys. Business times come from the
scenario, never from the wall clock, and every command's outcome is checked.

- `post_2023_scenario()` replays the POST study (Tolins et al., PLoS ONE 2023) so that the RE-AIM
  read model reproduces the published figures (see `postctl.paper`).
- `region_scenario(hospitals, years, seed)` is a synthetic region calibrated on those rates.
"""

from __future__ import annotations

import asyncio
import calendar
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any, Protocol

import structlog

from shared.client import PlatformClient
from shared.contracts import (
    CloseDepartment,
    Command,
    DeclineReason,
    EventNature,
    LaunchDepartment,
    Outcome,
    Rank,
    RecordInteraction,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    RetireSupporter,
    Source,
    SubmitSurveyResponse,
)

log = structlog.get_logger()

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
class Scenario:
    name: str
    hospitals: tuple[HospitalPlan, ...]
    departments: tuple[DepartmentPlan, ...]
    supporters: tuple[SupporterPlan, ...]
    referrals: tuple[ReferralPlan, ...]
    surveys: tuple[SurveyPlan, ...]

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


# --- the POST study, replayed -----------------------------------------------------------------

POST_SEED = 2023
STUDY_START = date(2019, 6, 1)  # the first launch: program year 1 starts here
STUDY_END = date(2022, 6, 1)  # exclusive: the study covers June 2019 to May 2022
HOSPITAL_A = "kp-hospital-a"
HOSPITAL_B = "kp-hospital-b"

# Interactions per month, June 2019 to May 2022: 73, 109 and 124 per program year, median 8,
# range 1 to 27 (a winter surge in December 2020), 306 in all.
POST_MONTHLY: tuple[int, ...] = (
    *(1, 3, 4, 5, 6, 6, 7, 7, 8, 8, 8, 10),
    *(6, 7, 8, 7, 8, 9, 27, 9, 7, 8, 6, 7),
    *(9, 10, 9, 11, 10, 12, 14, 10, 9, 11, 10, 9),
)

# 306 interaction lengths: min 10, max 180, median 60, mean exactly 68 (sum 20,808).
POST_MINUTES: tuple[tuple[int, int], ...] = (
    (10, 2),
    (15, 4),
    (20, 8),
    (30, 30),
    (40, 2),
    (45, 72),
    (50, 9),
    (58, 1),
    (60, 70),
    (90, 60),
    (105, 6),
    (120, 25),
    (150, 15),
    (180, 2),
)


@dataclass(frozen=True)
class PostDepartment:
    hospital: str
    department: str
    physicians: int
    launched_on: date
    interactions: int  # over the study
    accepted: int  # referrals with an accepted outreach, each with at least one interaction
    declined: int  # referrals declined at outreach
    trained: tuple[date, ...]  # one training date per supporter
    retired: tuple[date, ...] = ()  # retirements of its earliest-trained supporters
    interventional: bool = False
    surveyed: int = 0  # respondents to the March 2022 department survey


def _days(*pairs: tuple[date, int]) -> tuple[date, ...]:
    return tuple(day for day, n in pairs for _ in range(n))


# 11 departments, 530 physicians (60% of 883), 59 supporters (21 trained in person from June
# 2019, 38 virtually from September 2020), 9 retired by May 2022. 8 departments had referrals.
POST_DEPARTMENTS: tuple[PostDepartment, ...] = (
    PostDepartment(
        HOSPITAL_A, "emergency-medicine", 75, date(2019, 6, 1), 213, 16, 3,
        _days((date(2019, 6, 1), 4), (date(2019, 6, 24), 3), (date(2020, 9, 14), 1),
              (date(2021, 3, 1), 1)),
        retired=(date(2020, 12, 18), date(2022, 4, 29)), interventional=True, surveyed=31,
    ),
    PostDepartment(
        HOSPITAL_B, "icu", 20, date(2019, 6, 1), 22, 3, 0,
        _days((date(2019, 6, 1), 1), (date(2020, 9, 14), 2), (date(2021, 6, 7), 1)),
        retired=(date(2022, 1, 31),), interventional=True, surveyed=5,
    ),
    PostDepartment(
        HOSPITAL_A, "anesthesia", 70, date(2019, 8, 5), 27, 4, 2,
        _days((date(2019, 8, 5), 4), (date(2019, 11, 4), 2), (date(2021, 1, 4), 1)),
        retired=(date(2021, 3, 31), date(2021, 10, 29)), interventional=True, surveyed=20,
    ),
    PostDepartment(
        HOSPITAL_A, "obgyn", 50, date(2019, 10, 7), 9, 2, 1,
        _days((date(2019, 10, 7), 3), (date(2020, 2, 3), 2)),
        retired=(date(2021, 6, 30),), interventional=True, surveyed=15,
    ),
    PostDepartment(
        HOSPITAL_B, "hospitalists", 40, date(2020, 1, 6), 22, 3, 1,
        _days((date(2020, 1, 6), 2), (date(2020, 9, 14), 3), (date(2021, 3, 1), 3),
              (date(2022, 1, 10), 2)),
        retired=(date(2022, 2, 25),), surveyed=4,
    ),
    PostDepartment(
        HOSPITAL_B, "adult-family-medicine", 185, date(2020, 10, 5), 7, 2, 1,
        _days((date(2020, 10, 5), 9), (date(2021, 6, 7), 5), (date(2022, 1, 10), 3)),
        retired=(date(2021, 9, 30), date(2022, 5, 27)),
    ),
    PostDepartment(
        HOSPITAL_A, "head-neck-surgery", 25, date(2021, 1, 4), 2, 1, 0,
        _days((date(2021, 1, 4), 1)), interventional=True,
    ),
    PostDepartment(
        HOSPITAL_B, "pediatric-hospitalists", 20, date(2021, 3, 1), 4, 1, 0,
        _days((date(2021, 3, 1), 2)),
    ),
    PostDepartment(
        HOSPITAL_A, "geriatrics", 20, date(2021, 6, 7), 0, 0, 0, _days((date(2021, 6, 7), 2))
    ),
    PostDepartment(
        HOSPITAL_B, "pediatric-icu", 15, date(2021, 8, 2), 0, 0, 0,
        _days((date(2021, 8, 2), 1)), interventional=True,
    ),
    PostDepartment(
        HOSPITAL_A, "maxillofacial-surgery", 10, date(2021, 11, 1), 0, 0, 0,
        _days((date(2021, 11, 1), 1)), interventional=True,
    ),
)  # fmt: skip

POST_HOSPITALS: tuple[HospitalPlan, ...] = (
    HospitalPlan(HOSPITAL_A, "KP Hospital A", 420),
    HospitalPlan(HOSPITAL_B, "KP Hospital B", 463),
)

# Sources of the 40 referrals: third-party referral is the program's hallmark.
POST_SOURCES: tuple[Source, ...] = ("third_party",) * 26 + ("self",) * 9 + ("safety_event",) * 5
POST_DECLINE_REASONS: tuple[DeclineReason, ...] = (
    *("no_time",) * 4,
    *("no_need",) * 2,
    "privacy",
    "discomfort",
)
POST_LATE_OUTREACH = 3  # accepted referrals reached more than 48 h after the request
POST_ESCALATED = 9  # interactions where the supporter helped towards EAP or mental health care
SURVEY_DAYS = (date(2022, 3, 7), date(2022, 3, 21))  # sent in March 2022, one reminder


def _post_monthly_matrix() -> dict[str, list[int]]:
    """Interactions per department and month: the smaller departments spread evenly after their
    launch month, emergency medicine takes the rest of each month's total."""
    months = len(POST_MONTHLY)
    matrix: dict[str, list[int]] = {}
    others = [0] * months
    lead = POST_DEPARTMENTS[0]
    for dept in POST_DEPARTMENTS[1:]:
        counts = [0] * months
        if dept.interactions:
            first = _month_index(dept.launched_on) + 1  # a month to get going
            for offset in spread(dept.interactions, months - first):
                month = first + offset
                # Keep at least one interaction of each month for emergency medicine.
                while others[month] + 1 > POST_MONTHLY[month] - 1:
                    month += 1
                counts[month] += 1
                others[month] += 1
        matrix[dept.department] = counts
    matrix[lead.department] = [
        total - other for total, other in zip(POST_MONTHLY, others, strict=True)
    ]
    return matrix


def _month_index(day: date) -> int:
    return (day.year - STUDY_START.year) * 12 + day.month - STUDY_START.month


def _post_minutes(rng: random.Random) -> list[int]:
    minutes = [value for value, n in POST_MINUTES for _ in range(n)]
    rng.shuffle(minutes)
    return minutes


def post_2023_scenario(seed: int = POST_SEED) -> Scenario:
    """The POST study as data. Aggregates are fixed by hand; `seed` only moves days and hours
    within them, so every seed reproduces the paper's figures."""
    rng = random.Random(seed)
    matrix = _post_monthly_matrix()
    departments = tuple(
        DepartmentPlan(d.hospital, d.department, d.physicians, d.launched_on)
        for d in POST_DEPARTMENTS
    )
    supporters = tuple(_post_supporters())

    sources = list(POST_SOURCES)
    rng.shuffle(sources)
    reasons = list(POST_DECLINE_REASONS)
    rng.shuffle(reasons)
    late = set(rng.sample(range(sum(d.accepted for d in POST_DEPARTMENTS)), POST_LATE_OUTREACH))

    # Interaction days per department, then the referrals that carry them.
    accepted: list[tuple[PostDepartment, list[list[date]]]] = []
    for dept in POST_DEPARTMENTS:
        if dept.accepted:
            days = _interaction_days(rng, dept, matrix[dept.department])
            accepted.append((dept, _split_among_referrals(rng, days, dept.accepted)))

    drafts: list[tuple[PostDepartment, datetime, tuple[OutreachPlan, ...], list[date]]] = []
    index = 0
    for dept, referral_days in accepted:
        for days in referral_days:
            first = days[0]
            at = at_time(first - timedelta(days=1), rng.randint(8, 19), rng.randint(0, 59))
            hours = rng.uniform(50, 80) if index in late else rng.uniform(1, 40)
            requested_at = at - timedelta(minutes=round(hours * 60))
            drafts.append((dept, requested_at, (OutreachPlan("accepted", at),), days))
            index += 1
    for dept in POST_DEPARTMENTS:
        for _ in range(dept.declined):
            day = random_day(rng, dept.launched_on + timedelta(days=7), date(2022, 5, 24))
            requested_at = at_time(day, rng.randint(8, 19), rng.randint(0, 59))
            at = requested_at + timedelta(minutes=round(rng.uniform(2, 44) * 60))
            declined: tuple[OutreachPlan, ...] = (OutreachPlan("declined", at, reasons.pop()),)
            drafts.append((dept, requested_at, declined, []))
    drafts.sort(key=lambda d: d[1])

    # Lengths and escalations are spread over the interactions in date order.
    minutes = _post_minutes(rng)
    total = sum(len(d[3]) for d in drafts)
    escalated = set(rng.sample(range(total), POST_ESCALATED))
    chronological = sorted(
        ((day, n, k) for n, d in enumerate(drafts) for k, day in enumerate(d[3])),
    )
    lengths: dict[tuple[int, int], InteractionPlan] = {}
    for i, (day, n, k) in enumerate(chronological):
        lengths[(n, k)] = InteractionPlan(day, minutes[i], i in escalated)

    numbers: Counter[str] = Counter()
    referrals: list[ReferralPlan] = []
    for n, (dept, requested_at, outreach, days) in enumerate(drafts):
        numbers[dept.hospital] += 1
        serial = numbers[dept.hospital]
        source = sources[n]
        nature: EventNature = "interventional" if dept.interventional and n % 3 == 0 else "other"
        referrals.append(
            ReferralPlan(
                hospital=dept.hospital,
                referral_id=f"ref-{serial:04d}",
                physician_id=f"phys-{serial:04d}",
                department=dept.department,
                rank=Rank.attending,  # POST served attending physicians
                source=source,
                event_nature=nature,
                requested_at=requested_at,
                referrer_id=None if source == "self" else f"clin-{serial:04d}",
                outreach=outreach,
                interactions=tuple(lengths[(n, k)] for k in range(len(days))),
            )
        )
    return Scenario(
        name="post-2023",
        hospitals=POST_HOSPITALS,
        departments=departments,
        supporters=supporters,
        referrals=tuple(referrals),
        surveys=tuple(_post_surveys(rng)),
    )


def _post_supporters() -> Iterable[SupporterPlan]:
    numbers: Counter[str] = Counter()
    for dept in POST_DEPARTMENTS:
        retired = list(dept.retired) + [None] * (len(dept.trained) - len(dept.retired))
        for k, (trained_on, retired_on) in enumerate(zip(dept.trained, retired, strict=True)):
            numbers[dept.hospital] += 1
            yield SupporterPlan(
                hospital=dept.hospital,
                supporter_id=f"sup-{numbers[dept.hospital]:03d}",
                department=dept.department,
                rank=Rank.senior if k % 2 == 0 else Rank.attending,
                interventional=dept.interventional,
                trained_on=trained_on,
                retired_on=retired_on,
            )


def _interaction_days(rng: random.Random, dept: PostDepartment, counts: list[int]) -> list[date]:
    """The days of a department's interactions: a week after launch at the earliest."""
    earliest = dept.launched_on + timedelta(days=7)
    days: list[date] = []
    for index, count in enumerate(counts):
        if not count:
            continue
        first = month_start(STUDY_START, index)
        lo, hi = max(first, earliest), month_end(first)
        if lo > hi:
            raise ValueError(f"{dept.department}: interactions before it could have started")
        days.extend(random_day(rng, lo, hi) for _ in range(count))
    return sorted(days)


def _split_among_referrals(
    rng: random.Random, days: list[date], referrals: int
) -> list[list[date]]:
    """Give each referral its first interaction at an evenly spread start; each later day is a
    follow-up of one of the latest referrals already under way (support goes on for a while)."""
    starts = set(spread(referrals, len(days))) if referrals else set()
    if 0 not in starts:
        starts = {0, *sorted(starts)[1:]}
    carried: list[list[date]] = []
    for i, day in enumerate(days):
        if i in starts:
            carried.append([day])
            continue
        recent = carried[-4:]
        free = [c for c in recent if c[-1] < day] or recent
        rng.choice(free).append(day)
    return carried


def _post_surveys(rng: random.Random) -> Iterable[SurveyPlan]:
    """75 respondents in the 5 longest-running departments: 66 aware, 32 with an interaction
    (31 found it helpful, 27 better well-being, 24 more comfortable), 55 of 66 would recommend."""
    profiles: list[dict[str, Any]] = []
    # Aware respondents by overall satisfaction (n=64 answered): 26 very satisfied, 18
    # satisfied, 18 neutral, 2 negative, 2 no answer. 30 of the satisfied had an interaction.
    aware: list[tuple[int | None, bool, bool]] = []  # (satisfaction, had_interaction, recommend)
    aware += [(5, k < 20, True) for k in range(26)]
    aware += [(4, k < 10, True) for k in range(18)]
    aware += [(3, k < 2, k < 11) for k in range(18)]
    aware += [(2, False, False) for _ in range(2)]
    aware += [(None, False, False) for _ in range(2)]
    interacted = 0
    for satisfaction, had, recommend in aware:
        profile: dict[str, Any] = {
            "aware": True,
            "had_interaction": had,
            "would_recommend": recommend,
            "satisfaction": satisfaction,
        }
        if had:
            # In satisfaction order: the neutral ones come last and hold the weaker answers.
            profile["helpful"] = 5 if interacted < 22 else (4 if interacted < 31 else 3)
            profile["wellbeing_improved"] = interacted < 27
            profile["comfort_improved"] = interacted < 24
            interacted += 1
        profiles.append(profile)
    profiles += [{"aware": False, "had_interaction": False} for _ in range(9)]
    rng.shuffle(profiles)

    surveyed = [d for d in POST_DEPARTMENTS if d.surveyed]
    slots = [d for d in surveyed for _ in range(d.surveyed)]
    numbers: Counter[str] = Counter()
    for dept, profile in zip(slots, profiles, strict=True):
        numbers[dept.hospital] += 1
        yield SurveyPlan(
            hospital=dept.hospital,
            response_id=f"resp-{numbers[dept.hospital]:03d}",
            department=dept.department,
            submitted_on=random_day(rng, *SURVEY_DAYS),
            **profile,
        )


# --- a synthetic region -----------------------------------------------------------------------

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


def region_scenario(hospitals: int, years: int, seed: int, start: date = REGION_START) -> Scenario:
    """A region of `hospitals` hospitals over `years` program years from `start`: departments
    launch over time and a few close, supporters retire, referrals are declined for stated
    reasons, some outreach is late, some interactions come with no recorded outreach."""
    if hospitals < 1 or years < 1:
        raise ValueError("a region needs at least one hospital and one year")
    rng = random.Random(seed)
    end = add_months(start, 12 * years)  # exclusive
    minutes_pool = [value for value, n in POST_MINUTES for _ in range(n)]
    plans = _RegionPlans()
    for index in range(hospitals):
        hospital = region_hospital_id(seed, index)
        physicians = rng.randint(300, 1500)
        plans.hospitals.append(HospitalPlan(hospital, f"Region hospital {index + 1}", physicians))
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
    )


@dataclass
class _RegionPlans:
    hospitals: list[HospitalPlan] = field(default_factory=list)
    departments: list[DepartmentPlan] = field(default_factory=list)
    supporters: list[SupporterPlan] = field(default_factory=list)
    referrals: list[ReferralPlan] = field(default_factory=list)
    surveys: list[SurveyPlan] = field(default_factory=list)
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
        plans.supporters.append(
            SupporterPlan(
                hospital=hospital,
                supporter_id=plans.next_id(hospital, "sup"),
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


# --- the driver -------------------------------------------------------------------------------


class SimulationError(RuntimeError):
    """A command was refused or went unanswered: the simulation stops."""


class Platform(Protocol):
    """What the driver needs of `shared.client.PlatformClient`."""

    async def send(self, hospital: str, command: Command, id_: str | None = None) -> str: ...

    async def outcome(self, command_id: str, timeout: float = ...) -> dict[str, Any]: ...

    async def wait_for(
        self,
        hospital: str,
        event_type: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float,
    ) -> dict[str, Any]: ...


# Command ids derive from the scenario, so sending a scenario twice is processed once.
_ID_NAMESPACE = uuid.UUID("5b0c3c1e-6f1a-4d0e-9a57-70a2d1f0c2a3")


class Driver:
    """Sends a scenario through the platform with bounded concurrency, checking every outcome."""

    def __init__(
        self, client: Platform, scenario: Scenario, concurrency: int = 20, timeout: float = 120.0
    ) -> None:
        self.client = client
        self.scenario = scenario
        self.concurrency = concurrency
        self.timeout = timeout
        self.namespace = uuid.uuid5(_ID_NAMESPACE, scenario.name)
        self.sent: Counter[str] = Counter()
        self.without_supporter = 0

    def command_id(self, hospital: str, command: Command, key: str) -> str:
        return str(uuid.uuid5(self.namespace, f"{hospital}/{command.type_name}/{key}"))

    async def send(
        self, hospital: str, command: Command, key: str
    ) -> Callable[[], Awaitable[None]]:
        """Publish one command; returns the check of its outcome, to await when convenient."""
        command_id = self.command_id(hospital, command, key)
        await self.client.send(hospital, command, id_=command_id)
        self.sent[command.type_name] += 1

        async def check() -> None:
            await self.answer(hospital, command, command_id, key)

        return check

    async def answer(
        self, hospital: str, command: Command, command_id: str, key: str
    ) -> dict[str, Any]:
        """The success event of a command; a refusal or silence stops the simulation."""
        what = f"{command.type_name} {key!r} of {hospital} (command {command_id})"
        try:
            outcome = await self.client.outcome(command_id, timeout=self.timeout)
        except TimeoutError:
            raise SimulationError(
                f"{what}: no outcome within {self.timeout:.0f} s (are the services running?"
                " was this scenario already sent to this platform?)"
            ) from None
        if outcome.get("type") == "CommandRejected":
            data = outcome.get("data", {})
            raise SimulationError(
                f"{what} was rejected: {data.get('reason_code')}: {data.get('detail')}"
            )
        return outcome

    async def send_all(self, items: Iterable[tuple[str, Command, str]]) -> None:
        """Pipeline a batch: publish in order, then await every outcome."""
        checks = [await self.send(hospital, command, key) for hospital, command, key in items]
        await _gather_bounded(checks, self.concurrency * 10)

    async def drive(self) -> dict[str, Any]:
        started = time.perf_counter()
        s = self.scenario
        log.info("simulation_started", scenario=s.name, commands=s.command_count())
        # The roster in dependency order: each batch is known before the next needs it.
        await self.send_all((h.hospital, register_hospital(h), h.hospital) for h in s.hospitals)
        await self.send_all((d.hospital, launch_department(d), d.department) for d in s.departments)
        await self.send_all(
            (p.hospital, register_supporter(p), p.supporter_id) for p in s.supporters
        )
        await _gather_bounded([partial(self.referral, r) for r in s.referrals], self.concurrency)
        # Retirements and closings come after the referrals they would otherwise turn away.
        await self.send_all(
            (p.hospital, retire_supporter(p), p.supporter_id)
            for p in sorted(s.supporters, key=lambda p: p.retired_on or date.max)
            if p.retired_on is not None
        )
        await self.send_all(
            (d.hospital, close_department(d), d.department)
            for d in s.departments
            if d.closed_on is not None
        )
        await self.send_all(
            (v.hospital, submit_survey_response(v), v.response_id) for v in s.surveys
        )
        elapsed = time.perf_counter() - started
        summary = {
            "scenario": s.name,
            "hospitals": len(s.hospitals),
            "departments": len(s.departments),
            "supporters": len(s.supporters),
            "referrals": len(s.referrals),
            "commands": sum(self.sent.values()),
            "by_type": dict(sorted(self.sent.items())),
            "referrals_without_supporter": self.without_supporter,
            "elapsed_seconds": round(elapsed, 1),
        }
        log.info("simulation_finished", **summary)
        return summary

    async def referral(self, plan: ReferralPlan) -> None:
        """Request, wait for matching's choice, then record the planned fate in order."""
        hospital, referral_id = plan.hospital, plan.referral_id
        command = request_referral(plan)
        command_id = self.command_id(hospital, command, referral_id)
        await self.client.send(hospital, command, id_=command_id)
        self.sent[command.type_name] += 1
        created = await self.answer(hospital, command, command_id, referral_id)
        supporter_id = await self.assignment(plan, created)
        if supporter_id is None:
            self.without_supporter += 1
            return
        for k, outreach in enumerate(plan.outreach):
            check = await self.send(
                hospital, record_outreach(plan, outreach, supporter_id), f"{referral_id}/o{k}"
            )
            await check()
        if not plan.interactions:
            return
        # The first record settles acceptance; the follow-ups can then be pipelined.
        first, *rest = plan.interactions
        check = await self.send(
            hospital, record_interaction(plan, first, supporter_id), f"{referral_id}/i0"
        )
        await check()
        checks = [
            await self.send(
                hospital, record_interaction(plan, i, supporter_id), f"{referral_id}/i{k}"
            )
            for k, i in enumerate(rest, start=1)
        ]
        await asyncio.gather(*(c() for c in checks))

    async def assignment(self, plan: ReferralPlan, created: dict[str, Any]) -> str | None:
        """The supporter matching assigned, or None when it found nobody eligible."""
        answers = ("SupporterAssigned", "NoSupporterAvailable")
        try:
            # Matching answers `ReferralCreated` with one of them, caused by that event.
            event = await self.client.outcome(str(created["id"]), timeout=self.timeout)
            if event.get("type") not in answers:
                event = await self._assignment_by_referral(plan)
        except TimeoutError:
            raise SimulationError(
                f"referral {plan.referral_id!r} of {plan.hospital}: matching answered nothing"
                f" within {self.timeout:.0f} s"
            ) from None
        if event.get("type") == "NoSupporterAvailable":
            log.warning("no_supporter_available", department=plan.department)
            return None
        return str(event["data"]["supporter_id"])

    async def _assignment_by_referral(self, plan: ReferralPlan) -> dict[str, Any]:
        # Slower: scans every event seen, for when another consumer answered first.
        def about(event: dict[str, Any]) -> bool:
            return bool(event.get("data", {}).get("referral_id") == plan.referral_id)

        waits = [
            asyncio.ensure_future(
                self.client.wait_for(plan.hospital, kind, about, timeout=self.timeout)
            )
            for kind in ("SupporterAssigned", "NoSupporterAvailable")
        ]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return next(iter(done)).result()


async def _gather_bounded(jobs: Sequence[Callable[[], Awaitable[None]]], limit: int) -> None:
    """Run the jobs with at most `limit` at once; the first failure stops the rest."""
    semaphore = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        async with semaphore:
            await job()

    tasks = [asyncio.ensure_future(run(job)) for job in jobs]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def simulate(client: Platform, scenario: Scenario, concurrency: int = 20) -> dict[str, Any]:
    return await Driver(client, scenario, concurrency).drive()


async def simulate_post_2023(client: Platform) -> dict[str, Any]:
    return await simulate(client, post_2023_scenario())


async def simulate_region(
    client: Platform, hospitals: int, years: int, seed: int
) -> dict[str, Any]:
    today = datetime.now(UTC).date()
    # Business dates may not lie in the future: a long region starts early enough to end today.
    start = min(REGION_START, add_months(today, -12 * years) - timedelta(days=1))
    return await simulate(client, region_scenario(hospitals, years, seed, start))


async def _with_client(
    nats_url: str, run: Callable[[Platform], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    client = await PlatformClient.connect(nats_url)
    try:
        return await run(client)
    finally:
        await client.close()


async def run_post_2023(nats_url: str) -> dict[str, Any]:
    """`postctl simulate post-2023`: replay the POST study; returns what was sent."""
    return await _with_client(nats_url, simulate_post_2023)


async def run_region(nats_url: str, hospitals: int, years: int, seed: int) -> dict[str, Any]:
    """`postctl simulate region`: a synthetic region; returns what was sent."""
    return await _with_client(
        nats_url, lambda client: simulate_region(client, hospitals, years, seed)
    )
