"""The RE-AIM figures of CONTRACT.md, computed from facts by one pure function.

Business time only. A date stands for the start of that UTC day; a datetime counts on its
UTC date. The period is [from, to): without `from` it has no start, without `to` it ends
after the day of the scope's last fact. Arithmetic is exact (fractions) and rounded half up,
so an answer never depends on float noise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any, Final

from services.analytics import domain
from services.analytics.domain import (
    NO_SUPPORTER,
    Department,
    Facts,
    Figures,
    Interaction,
    Outreach,
    Referral,
    Scope,
    Supporter,
    SurveyResponse,
    start_of_day,
    utc_date,
)

SOURCES = ("self", "third_party", "safety_event")
DECLINE_REASONS = ("no_time", "no_need", "privacy", "discomfort", "medicolegal", "other")
UNSPECIFIED = "unspecified"  # a decline recorded without a reason
WITHIN = timedelta(hours=48)
MICROSECOND = timedelta(microseconds=1)
MICROSECONDS_PER_HOUR = 3_600_000_000

OBJECTS = domain.OBJECTS


# --- exact arithmetic -----------------------------------------------------------------------


def round_half_up(value: Fraction, places: int) -> float:
    exact = Decimal(value.numerator) / Decimal(value.denominator)
    return float(exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def rate(numerator: int, denominator: int) -> float | None:
    """A rate in [0, 1] to 4 places, or None on an empty denominator."""
    if denominator == 0:
        return None
    # Clamped: facts of closed departments could push a ratio past 1; a rate never does.
    return round_half_up(min(Fraction(numerator, denominator), Fraction(1)), 4)


def ratio(numerator: int, denominator: int, places: int = 1) -> float | None:
    return None if denominator == 0 else round_half_up(Fraction(numerator, denominator), places)


def mean(values: Sequence[int], places: int = 1) -> float | None:
    if not values:
        return None
    return round_half_up(Fraction(sum(values), len(values)), places)


def median(values: Sequence[int], places: int = 1, unit: int = 1) -> float | None:
    """The middle value (in units of `unit`); of an even count, the mean of the two middle."""
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return round_half_up(Fraction(ordered[middle], unit), places)
    return round_half_up(Fraction(ordered[middle - 1] + ordered[middle], 2 * unit), places)


def add_years(day: date, years: int) -> date:
    """The same calendar day `years` later; 29 February falls back to 28 February."""
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return day.replace(year=day.year + years, day=28)


def month_starts(first: date, last: date) -> list[date]:
    months: list[date] = []
    current = first.replace(day=1)
    while current <= last:
        months.append(current)
        current = (current + timedelta(days=32)).replace(day=1)
    return months


# --- the period ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    start: date | None  # inclusive; None: no start
    end: date | None  # exclusive; None only when the scope has no dated fact and no `to`

    def holds(self, day: date) -> bool:
        return (self.start is None or day >= self.start) and (self.end is None or day < self.end)

    def before_end(self, day: date | None) -> bool:
        """Happened before the period's end (a date is the start of its day)."""
        return day is not None and (self.end is None or day < self.end)


def period_of(facts: Facts, period_from: date | None, period_to: date | None) -> Period:
    """Without `to`, the period ends after the day of the scope's last business date."""
    return period_from_span(
        None if period_to is not None else facts.business_span(), period_from, period_to
    )


def period_from_span(
    span: tuple[date, date] | None, period_from: date | None, period_to: date | None
) -> Period:
    """The period, given the scope's first and last business dates (`span`)."""
    if period_to is not None:
        return Period(period_from, period_to)
    end = span[1] + timedelta(days=1) if span else None
    if end is not None and period_from is not None and end < period_from:
        end = period_from  # a `from` after the last fact: an empty period, not a reversed one
    return Period(period_from, end)


# --- first outcomes -------------------------------------------------------------------------


# An outreach or an interaction of a referral, ordered by business time: (at, kind, seq,
# index, outcome, decline_reason). At the same instant an outreach (kind 0) came before an
# interaction (kind 1); the index makes every record distinct so comparing stops there.
Record = tuple[datetime, int, int, int, str, str | None]
AT: Final = 0
OUTCOME: Final = 4
DECLINE_REASON: Final = 5


def _records(
    outreach: Iterable[Outreach], interactions: Iterable[Interaction]
) -> dict[tuple[str, str], list[Record]]:
    by_referral: dict[tuple[str, str], list[Record]] = {}
    starts: dict[date, datetime] = {}
    index = 0
    for o in outreach:
        index += 1
        record = (o.at, 0, o.stream_seq or 0, index, o.outcome, o.decline_reason)
        by_referral.setdefault((o.hospital, o.referral_id), []).append(record)
    for i in interactions:
        index += 1
        # An interaction implies acceptance, at the start of its day.
        start = starts.get(i.occurred_on) or starts.setdefault(
            i.occurred_on, start_of_day(i.occurred_on)
        )
        record = (start, 1, i.stream_seq or 0, index, "accepted", None)
        by_referral.setdefault((i.hospital, i.referral_id), []).append(record)
    return by_referral


# --- the figures -----------------------------------------------------------------------------


def compute(
    facts: Facts, *, scope: Scope, period_from: date | None, period_to: date | None
) -> Figures:
    """The five RE-AIM objects of one scope and period, every key of CONTRACT.md's table."""
    facts = facts.within(scope)
    period = period_of(facts, period_from, period_to)

    launched = [d for d in facts.departments if period.before_end(d.launched_on)]
    open_departments = [d for d in launched if not period.before_end(d.closed_on)]
    closed_before_end = {
        (d.hospital, d.department) for d in facts.departments if period.before_end(d.closed_on)
    }
    eligible = sum(d.physician_count for d in open_departments)

    trained = [s for s in facts.supporters if period.before_end(s.trained_on)]
    active = [
        s
        for s in trained
        if not period.before_end(s.retired_on)
        and (s.hospital, s.department) not in closed_before_end
    ]

    referrals = [
        r
        for r in facts.referrals
        if r.requested_at is not None and period.holds(utc_date(r.requested_at))
    ]
    interactions = [i for i in facts.interactions if period.holds(i.occurred_on)]
    surveys = [s for s in facts.surveys if period.holds(s.submitted_on)]
    records = _records(facts.outreach, facts.interactions)

    first_launch = min((d.launched_on for d in facts.departments if d.launched_on), default=None)

    return Figures.model_validate(
        {
            "reach": _reach(facts, period, interactions, referrals, trained, launched, eligible),
            "effectiveness": _effectiveness(surveys, interactions),
            "adoption": _adoption(facts, launched, eligible, referrals, records, surveys),
            "implementation": _implementation(
                referrals, records, eligible, len(active), _available(active, facts, period)
            ),
            "maintenance": _maintenance(
                period, interactions, trained, active, launched, open_departments, first_launch
            ),
        }
    )


def _reach(
    facts: Facts,
    period: Period,
    interactions: list[Interaction],
    referrals: list[Referral],
    trained: list[Supporter],
    launched: list[Department],
    eligible: int,
) -> dict[str, Any]:
    physician_of = {(r.hospital, r.referral_id): r.physician_id for r in facts.referrals}
    supported = set()
    for i in interactions:
        physician = physician_of.get((i.hospital, i.referral_id))
        # Until its ReferralCreated arrives, an interaction's referral stands for its physician.
        supported.add((i.hospital, physician) if physician else (i.hospital, "#" + i.referral_id))

    by_department: Counter[str] = Counter({d.department: 0 for d in launched})
    by_department.update(i.department for i in interactions)
    by_source: Counter[str] = Counter({s: 0 for s in SOURCES})
    by_source.update(r.source for r in referrals if r.source)

    minutes = [i.minutes for i in interactions]
    monthly = _monthly(facts, period, interactions)
    counts = [m["interactions"] for m in monthly]
    return {
        "supporters_trained": sum(
            1 for s in trained if s.trained_on is not None and period.holds(s.trained_on)
        ),
        "referrals": len(referrals),
        "referrals_by_source": dict(by_source),
        "interactions": len(interactions),
        "interactions_by_department": dict(sorted(by_department.items())),
        "physicians_supported": len(supported),
        "eligible_physicians": eligible,
        "reach_rate": rate(len(supported), eligible),
        "minutes_mean": mean(minutes),
        "minutes_median": median(minutes),
        "minutes_min": min(minutes, default=None),
        "minutes_max": max(minutes, default=None),
        "monthly": monthly,
        "monthly_mean": mean(counts),
        "monthly_median": median(counts),
        "monthly_min": min(counts, default=None),
        "monthly_max": max(counts, default=None),
    }


def _monthly(facts: Facts, period: Period, interactions: list[Interaction]) -> list[dict[str, Any]]:
    """Every calendar month overlapping the period, zeros included."""
    if period.end is None:
        return []
    first = period.start
    if first is None:
        launches = [d.launched_on for d in facts.departments if d.launched_on is not None]
        span = facts.business_span()
        # Without `from` the list starts at the scope's first launch (or first fact, lacking one).
        first = min(launches) if launches else (span[0] if span else None)
    if first is None or first >= period.end:
        return []
    counts = Counter((i.occurred_on.year, i.occurred_on.month) for i in interactions)
    return [
        {"month": month.strftime("%Y-%m"), "interactions": counts[(month.year, month.month)]}
        for month in month_starts(first, period.end - timedelta(days=1))
    ]


def _effectiveness(
    surveys: list[SurveyResponse], interactions: list[Interaction]
) -> dict[str, Any]:
    with_interaction = [s for s in surveys if s.had_interaction]
    n = len(with_interaction)
    return {
        "respondents_with_interaction": n,
        "helpful_rate": rate(
            sum(1 for s in with_interaction if s.helpful is not None and s.helpful >= 4), n
        ),
        "wellbeing_improved_rate": rate(
            sum(1 for s in with_interaction if s.wellbeing_improved is True), n
        ),
        "comfort_improved_rate": rate(
            sum(1 for s in with_interaction if s.comfort_improved is True), n
        ),
        "escalation_rate": rate(sum(1 for i in interactions if i.escalated), len(interactions)),
    }


def _adoption(
    facts: Facts,
    launched: list[Department],
    eligible: int,
    referrals: list[Referral],
    records: dict[tuple[str, str], list[Record]],
    surveys: list[SurveyResponse],
) -> dict[str, Any]:
    keys = [(r.hospital, r.referral_id) for r in referrals]
    firsts = [min(records[key]) for key in keys if key in records]
    accepted = sum(1 for f in firsts if f[OUTCOME] == "accepted")
    declined = sum(1 for f in firsts if f[OUTCOME] == "declined")
    aware = [s for s in surveys if s.aware]
    referred = {(r.hospital, r.department) for r in referrals}
    return {
        "hospitals_adopted": len({d.hospital for d in launched}),
        "departments_launched": len(launched),
        "physician_coverage": rate(eligible, sum(h.physician_count for h in facts.hospitals)),
        "outreach_acceptance_rate": rate(accepted, accepted + declined),
        "would_recommend_rate": rate(
            sum(1 for s in aware if s.would_recommend is True), len(aware)
        ),
        "departments_without_referrals": sum(
            1 for d in launched if (d.hospital, d.department) not in referred
        ),
    }


def _available(active: list[Supporter], facts: Facts, period: Period) -> int:
    """Active supporters whose latest availability change dated before the period's end says
    available, or who have none. Latest: by changed_on, then stream sequence (and available
    first on a full tie, so the order of the rows never matters)."""
    latest: dict[tuple[str, str], tuple[date, int, bool]] = {}
    for c in facts.availability_changes:
        if period.before_end(c.changed_on):
            key, mark = (c.hospital, c.supporter_id), (c.changed_on, c.stream_seq or 0, c.available)
            latest[key] = max(latest.get(key, mark), mark)
    return sum(
        1 for s in active if latest.get((s.hospital, s.supporter_id), (date.min, 0, True))[2]
    )


def _implementation(
    referrals: list[Referral],
    records: dict[tuple[str, str], list[Record]],
    eligible: int,
    active: int,
    available: int,
) -> dict[str, Any]:
    delays: list[int] = []  # microseconds
    within = 0
    reasons: Counter[str] = Counter({r: 0 for r in (*DECLINE_REASONS, UNSPECIFIED)})
    for r in referrals:
        mine = records.get((r.hospital, r.referral_id))
        if not mine:
            continue
        assert r.requested_at is not None  # referrals of the period all have one
        # A same-day interaction starts "at midnight", before the request: it took no time.
        delay = max(min(mine)[AT] - r.requested_at, timedelta(0))
        within += delay <= WITHIN
        delays.append(delay // MICROSECOND)
        declines = [x for x in mine if x[OUTCOME] == "declined"]
        if declines:
            reasons[min(declines)[DECLINE_REASON] or UNSPECIFIED] += 1
    return {
        "outreach_within_48h_rate": rate(within, len(delays)),
        "hours_to_outreach_median": median(delays, unit=MICROSECONDS_PER_HOUR),
        "physicians_per_active_supporter": ratio(eligible, active),
        "referrals_without_supporter": sum(
            1 for r in referrals if r.matching_outcome == NO_SUPPORTER
        ),
        "supporters_available": available,
        "decline_reasons": dict(reasons),
    }


def _maintenance(
    period: Period,
    interactions: list[Interaction],
    trained: list[Supporter],
    active: list[Supporter],
    launched: list[Department],
    open_departments: list[Department],
    first_launch: date | None,
) -> dict[str, Any]:
    by_year: list[int] = []
    if first_launch is not None and period.end is not None:
        starts: list[date] = []
        while (start := add_years(first_launch, len(starts))) < period.end:
            starts.append(start)
        # Interactions before the first launch belong to no program year.
        for k, start in enumerate(starts):
            stop = add_years(first_launch, k + 1)
            by_year.append(sum(1 for i in interactions if start <= i.occurred_on < stop))
    return {
        "supporters_active": len(active),
        "supporter_retention_rate": rate(len(active), len(trained)),
        "departments_active_rate": rate(len(open_departments), len(launched)),
        "interactions_by_program_year": by_year,
        "monthly_rate_by_program_year": [round_half_up(Fraction(c, 12), 1) for c in by_year],
    }


def numeric_figures(figures: Figures) -> dict[str, float | None]:
    """The numeric keys of an answer (for gauges): `key` -> value, null kept as None."""
    return {
        key: getattr(getattr(figures, name), key) for key, name in domain.numeric_keys().items()
    }
