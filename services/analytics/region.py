"""The region's RE-AIM figures, aggregated in PostgreSQL: Python never holds the region's facts.

A hospital's or a department's facts are few (a hospital over years: a few thousand rows), so
their figures are computed by `reaim.compute` from the rows (facts.py). The region's are
thousands of hospitals' worth: here a handful of aggregate queries, each scanning only the
facts of the period through its date index, return counts, sums, medians and per-day counts
(`Aggregates`), and `figures` turns them into the same answer as `reaim.compute` would give,
key for key (tests/integration/test_analytics_projection.py compares the two on random data).
The answer's memory is a few thousand numbers, whatever the number of facts.

A referral's first outcome and first decline are kept on its row by the projection (see
migrations/004), so the referral figures are one scan of the period's referrals. Physicians
are counted distinct at query time from `referrals.physician_id`: no aggregate holds a
physician's identity, so renaming a physician's referrals to an alias (forgetting) changes
no figure and needs nothing else updated.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from fractions import Fraction
from typing import Any

import asyncpg

from services.analytics import reaim
from services.analytics.domain import NO_SUPPORTER

# $1: the period's start (inclusive) or null; $2: its end (exclusive) or null (no fact at all).
_HOLDS = "($1::date IS NULL OR {c} >= $1::date) AND ($2::date IS NULL OR {c} < $2::date)"
_BEFORE_END = "({c} IS NOT NULL AND ($2::date IS NULL OR {c} < $2::date))"
# A moment counts on its UTC date: [start 00:00 UTC, end 00:00 UTC), sargable on the index.
_HOLDS_AT = (
    "($1::date IS NULL OR {c} >= $1::date::timestamp AT TIME ZONE 'UTC')"
    " AND ($2::date IS NULL OR {c} < $2::date::timestamp AT TIME ZONE 'UTC')"
)

SPAN_SQL = """
SELECT least(
    (SELECT min(launched_on) FROM departments), (SELECT min(closed_on) FROM departments),
    (SELECT min(trained_on) FROM supporters), (SELECT min(retired_on) FROM supporters),
    (SELECT min(changed_on) FROM availability_changes),
    (SELECT min(occurred_on) FROM interactions), (SELECT min(submitted_on) FROM surveys),
    ((SELECT min(requested_at) FROM referrals) AT TIME ZONE 'UTC')::date,
    ((SELECT min(at) FROM outreach) AT TIME ZONE 'UTC')::date
), greatest(
    (SELECT max(launched_on) FROM departments), (SELECT max(closed_on) FROM departments),
    (SELECT max(trained_on) FROM supporters), (SELECT max(retired_on) FROM supporters),
    (SELECT max(changed_on) FROM availability_changes),
    (SELECT max(occurred_on) FROM interactions), (SELECT max(submitted_on) FROM surveys),
    ((SELECT max(requested_at) FROM referrals) AT TIME ZONE 'UTC')::date,
    ((SELECT max(at) FROM outreach) AT TIME ZONE 'UTC')::date
)
"""

DEPARTMENTS_SQL = f"""
SELECT count(*) FILTER (WHERE launched) AS launched,
    count(*) FILTER (WHERE launched AND NOT closed) AS open,
    coalesce(sum(physician_count) FILTER (WHERE launched AND NOT closed), 0) AS eligible,
    count(DISTINCT hospital) FILTER (WHERE launched) AS hospitals_adopted,
    min(launched_on) AS first_launch,
    array_agg(DISTINCT department) FILTER (WHERE launched) AS slugs,
    (SELECT coalesce(sum(physician_count), 0) FROM hospitals) AS registered_physicians
FROM (
    SELECT hospital, department, physician_count, launched_on,
        {_BEFORE_END.format(c="launched_on")} AS launched,
        {_BEFORE_END.format(c="closed_on")} AS closed
    FROM departments
) AS d
""".replace("$2::date", "$1::date")  # only the end: its one parameter

SUPPORTERS_SQL = f"""
WITH latest AS (
    SELECT DISTINCT ON (hospital, supporter_id) hospital, supporter_id, available
    FROM availability_changes WHERE {_BEFORE_END.format(c="changed_on")}
    ORDER BY hospital, supporter_id, changed_on DESC, coalesce(stream_seq, 0) DESC,
        available DESC
), judged AS (
    SELECT s.trained_on, {_BEFORE_END.format(c="s.trained_on")} AS trained,
        {_BEFORE_END.format(c="s.trained_on")}
        AND NOT {_BEFORE_END.format(c="s.retired_on")}
        AND NOT coalesce({_BEFORE_END.format(c="d.closed_on")}, false) AS active,
        coalesce(l.available, true) AS available
    FROM supporters s
    LEFT JOIN departments d ON d.hospital = s.hospital AND d.department = s.department
    LEFT JOIN latest l ON l.hospital = s.hospital AND l.supporter_id = s.supporter_id
)
SELECT count(*) FILTER (WHERE trained) AS trained,
    count(*) FILTER (WHERE trained AND {_HOLDS.format(c="trained_on")}) AS trained_in_period,
    count(*) FILTER (WHERE active) AS active,
    count(*) FILTER (WHERE active AND available) AS available
FROM judged
"""

_REASON_COUNTS = ",\n    ".join(
    f"count(*) FILTER (WHERE decline_at IS NOT NULL"
    f" AND coalesce(decline_reason, '{reaim.UNSPECIFIED}') = '{reason}') AS \"{reason}\""
    for reason in (*reaim.DECLINE_REASONS, reaim.UNSPECIFIED)
)
_SOURCE_COUNTS = ",\n    ".join(
    f"count(*) FILTER (WHERE source = '{source}') AS \"{source}\"" for source in reaim.SOURCES
)
REFERRALS_SQL = f"""
SELECT count(*) AS referrals,
    {_SOURCE_COUNTS},
    count(first_at) AS with_record,
    count(*) FILTER (WHERE first_at - requested_at <= interval '48 hours') AS within,
    count(*) FILTER (WHERE first_outcome = 'accepted') AS accepted,
    count(*) FILTER (WHERE first_outcome = 'declined') AS declined,
    count(*) FILTER (WHERE matching_outcome = '{NO_SUPPORTER}') AS without_supporter,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY
        (extract(epoch FROM greatest(first_at - requested_at, interval '0')) * 1000000)::float8
    ) AS delay_median_us,
    {_REASON_COUNTS}
FROM referrals WHERE requested_at IS NOT NULL AND {_HOLDS_AT.format(c="requested_at")}
"""

# Departments launched before the end with a referral requested in the period.
REFERRED_DEPARTMENTS_SQL = f"""
SELECT count(*) FROM departments d
JOIN (
    SELECT DISTINCT hospital, department FROM referrals
    WHERE requested_at IS NOT NULL AND {_HOLDS_AT.format(c="requested_at")}
) AS r ON r.hospital = d.hospital AND r.department = d.department
WHERE {_BEFORE_END.format(c="d.launched_on")}
"""

# Per day, per department and per minutes value: one scan of the period's interactions, hash
# aggregates only (the minutes' mean, extremes and median come from the last, a few hundred
# values).
INTERACTIONS_SQL = f"""
SELECT grouping(occurred_on, department, minutes) AS g, occurred_on, department, minutes,
    count(*) AS n, count(*) FILTER (WHERE escalated) AS escalated
FROM interactions WHERE {_HOLDS.format(c="occurred_on")}
GROUP BY GROUPING SETS ((occurred_on), (department), (minutes))
"""

# Until its ReferralCreated arrives, an interaction's referral stands for its physician.
PHYSICIANS_SQL = f"""
SELECT count(*) FROM (
    SELECT DISTINCT i.hospital, coalesce(r.physician_id, '#' || i.referral_id)
    FROM interactions i
    LEFT JOIN referrals r ON r.hospital = i.hospital AND r.referral_id = i.referral_id
    WHERE {_HOLDS.format(c="i.occurred_on")}
) AS supported
"""

SURVEYS_SQL = f"""
SELECT count(*) FILTER (WHERE had_interaction) AS with_interaction,
    count(*) FILTER (WHERE had_interaction AND helpful >= 4) AS helpful,
    count(*) FILTER (WHERE had_interaction AND wellbeing_improved) AS wellbeing,
    count(*) FILTER (WHERE had_interaction AND comfort_improved) AS comfort,
    count(*) FILTER (WHERE aware) AS aware,
    count(*) FILTER (WHERE aware AND would_recommend) AS would_recommend
FROM surveys WHERE {_HOLDS.format(c="submitted_on")}
"""


@dataclass
class Aggregates:
    """What the region's figures are made of: counts, sums, extremes, medians and per-day
    counts of one period. Its size does not depend on the number of facts."""

    departments: dict[str, Any] = field(default_factory=dict)
    supporters: dict[str, Any] = field(default_factory=dict)
    referrals: dict[str, Any] = field(default_factory=dict)
    referred_departments: int = 0
    by_day: dict[date, tuple[int, int]] = field(default_factory=dict)  # (count, escalated)
    by_department: dict[str, int] = field(default_factory=dict)
    by_minutes: dict[int, int] = field(default_factory=dict)
    physicians_supported: int = 0
    surveys: dict[str, Any] = field(default_factory=dict)


async def span(conn: asyncpg.Connection) -> tuple[date, date] | None:
    """The region's first and last business dates (as `Facts.business_span`)."""
    first, last = await conn.fetchrow(SPAN_SQL)
    return None if first is None else (first, last)


async def aggregates(conn: asyncpg.Connection, period: reaim.Period) -> Aggregates:
    """The region's aggregates over `period`, in the caller's snapshot."""
    args = (period.start, period.end)
    agg = Aggregates()
    agg.departments = dict(await conn.fetchrow(DEPARTMENTS_SQL, *args[1:]))
    agg.supporters = dict(await conn.fetchrow(SUPPORTERS_SQL, *args))
    agg.referrals = dict(await conn.fetchrow(REFERRALS_SQL, *args))
    agg.referred_departments = int(await conn.fetchval(REFERRED_DEPARTMENTS_SQL, *args))
    for row in await conn.fetch(INTERACTIONS_SQL, *args):
        if row["g"] == 3:  # per day (department and minutes aggregated)
            agg.by_day[row["occurred_on"]] = (row["n"], row["escalated"])
        elif row["g"] == 5:  # per department
            agg.by_department[row["department"]] = row["n"]
        else:  # per minutes value
            agg.by_minutes[row["minutes"]] = row["n"]
    agg.physicians_supported = int(await conn.fetchval(PHYSICIANS_SQL, *args))
    agg.surveys = dict(await conn.fetchrow(SURVEYS_SQL, *args))
    return agg


def median_of_counts(counts: dict[int, int]) -> float | None:
    """`reaim.median` of the values `counts` holds (value -> how many times). Pure."""
    total = sum(counts.values())
    if not total:
        return None
    wanted = {(total - 1) // 2, total // 2}  # the middle one, or the two middle ones
    found: list[int] = []
    seen = 0
    for value in sorted(counts):
        found += [value] * sum(1 for k in wanted if seen <= k < seen + counts[value])
        seen += counts[value]
    return reaim._round(Fraction(sum(found), len(found)), 1)


def _half_units(value: float | None, unit: int) -> float | None:
    """A median PostgreSQL interpolated (exact: integers below 2**53, halves) in `unit`s, to
    1 place, as `reaim.median`."""
    if value is None:
        return None
    return reaim._round(Fraction(value) / unit, 1)


def figures(
    agg: Aggregates, period: reaim.Period, span: tuple[date, date] | None
) -> dict[str, Any]:
    """The five RE-AIM objects from the aggregates: `reaim.compute`'s answer. Pure."""
    d, s, r, v = agg.departments, agg.supporters, agg.referrals, agg.surveys
    launched, open_, eligible = d["launched"], d["open"], d["eligible"]
    interactions = sum(n for n, _ in agg.by_day.values())
    escalated = sum(e for _, e in agg.by_day.values())
    minutes = agg.by_minutes

    # Every calendar month overlapping the period (from the first launch without `from`).
    monthly: list[dict[str, Any]] = []
    first = period.start
    if first is None:
        first = d["first_launch"] or (span[0] if span else None)
    if period.end is not None and first is not None and first < period.end:
        by_month: Counter[tuple[int, int]] = Counter()
        for day, (n, _) in agg.by_day.items():
            by_month[(day.year, day.month)] += n
        monthly = [
            {"month": m.strftime("%Y-%m"), "interactions": by_month[(m.year, m.month)]}
            for m in reaim._month_starts(first, period.end - timedelta(days=1))
        ]
    counts = [m["interactions"] for m in monthly]

    by_department = Counter(dict.fromkeys(d["slugs"] or [], 0))
    by_department.update(agg.by_department)
    by_source = {source: r[source] for source in reaim.SOURCES}
    supported = agg.physicians_supported

    by_year: list[int] = []
    first_launch = d["first_launch"]
    if first_launch is not None and period.end is not None:
        k = 0
        while (start := reaim.add_years(first_launch, k)) < period.end:
            stop = reaim.add_years(first_launch, k + 1)
            by_year.append(sum(n for day, (n, _) in agg.by_day.items() if start <= day < stop))
            k += 1

    return {
        "reach": {
            "supporters_trained": s["trained_in_period"],
            "referrals": r["referrals"],
            "referrals_by_source": by_source,
            "interactions": interactions,
            "interactions_by_department": dict(sorted(by_department.items())),
            "physicians_supported": supported,
            "eligible_physicians": eligible,
            "reach_rate": reaim.rate(supported, eligible),
            "minutes_mean": (
                None
                if not interactions
                else reaim._round(Fraction(sum(m * n for m, n in minutes.items()), interactions), 1)
            ),
            "minutes_median": median_of_counts(minutes),
            "minutes_min": min(minutes, default=None),
            "minutes_max": max(minutes, default=None),
            "monthly": monthly,
            "monthly_mean": reaim.mean(counts),
            "monthly_median": reaim.median(counts),
            "monthly_min": min(counts, default=None),
            "monthly_max": max(counts, default=None),
        },
        "effectiveness": {
            "respondents_with_interaction": v["with_interaction"],
            "helpful_rate": reaim.rate(v["helpful"], v["with_interaction"]),
            "wellbeing_improved_rate": reaim.rate(v["wellbeing"], v["with_interaction"]),
            "comfort_improved_rate": reaim.rate(v["comfort"], v["with_interaction"]),
            "escalation_rate": reaim.rate(escalated, interactions),
        },
        "adoption": {
            "hospitals_adopted": d["hospitals_adopted"],
            "departments_launched": launched,
            "physician_coverage": reaim.rate(eligible, d["registered_physicians"]),
            "outreach_acceptance_rate": reaim.rate(r["accepted"], r["accepted"] + r["declined"]),
            "would_recommend_rate": reaim.rate(v["would_recommend"], v["aware"]),
            "departments_without_referrals": launched - agg.referred_departments,
        },
        "implementation": {
            "outreach_within_48h_rate": reaim.rate(r["within"], r["with_record"]),
            "hours_to_outreach_median": _half_units(
                r["delay_median_us"], reaim.MICROSECONDS_PER_HOUR
            ),
            "physicians_per_active_supporter": reaim.ratio(eligible, s["active"]),
            "referrals_without_supporter": r["without_supporter"],
            "supporters_available": s["available"],
            "decline_reasons": {
                reason: r[reason] for reason in (*reaim.DECLINE_REASONS, reaim.UNSPECIFIED)
            },
        },
        "maintenance": {
            "supporters_active": s["active"],
            "supporter_retention_rate": reaim.rate(s["active"], s["trained"]),
            "departments_active_rate": reaim.rate(open_, launched),
            "interactions_by_program_year": by_year,
            "monthly_rate_by_program_year": [reaim._round(Fraction(c, 12), 1) for c in by_year],
        },
    }


async def compute(
    conn: asyncpg.Connection, period_from: date | None, period_to: date | None
) -> tuple[reaim.Period, dict[str, Any]]:
    """The region's period and figures, in the caller's snapshot."""
    # Without `to` the period ends after the last fact; without `from` the monthly list
    # starts at the first launch, or the first fact lacking one.
    found = await span(conn) if period_to is None or period_from is None else None
    period = reaim.period_from_span(found, period_from, period_to)
    return period, figures(await aggregates(conn, period), period, found)
