"""The POST study (Tolins et al., PLoS ONE 2023) as a scenario: replayed, the RE-AIM read model
reproduces the published figures (see `postctl.paper`)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from postctl.simulate.scenario import (
    DepartmentPlan,
    HospitalPlan,
    InteractionPlan,
    OutreachPlan,
    ReferralPlan,
    Scenario,
    SupporterPlan,
    SurveyPlan,
    at_time,
    month_end,
    month_start,
    random_day,
    spread,
)
from shared.contracts import (
    DeclineReason,
    EventNature,
    Rank,
    Source,
)

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
