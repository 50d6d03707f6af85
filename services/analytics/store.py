"""The RE-AIM figures of any scope and period from the pre-aggregated read models (issue 26).

The projection's fact rows feed, through triggers (migrations/005_aggregates.sql), tables in
the shape of the queries: per scope and day, counts and sums; per scope and day or month,
histograms for the medians; per physician and day, the day before (distinct physicians as a
range count). A period is then a range sum over at most a few thousand rows whatever the
number of facts: the region's days (1,826 in five years), its months, and for the medians and
the distinct physicians the days of at most two partial months. `figures` turns the sums into
`reaim.compute`'s answer, key for key (tests/integration/test_analytics_aggregates.py checks it
on random histories, at every scope). A hospital's or a department's departments, supporters
and availability changes are read as they are (tens of rows); the region's are steps per day
(migrations/007_region_asof.sql): what holds at the period's end is a sum over days.

Nothing here holds a physician's identity but `supported_days`, which the referral trigger
rewrites when forgetting renames a physician's referrals: the same rows under the alias.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from fractions import Fraction
from typing import Any

import asyncpg

from services.analytics import reaim
from services.analytics.domain import Figures, Scope

# $1: the period's start (inclusive) or null; $2: its end (exclusive) or null (no fact at
# all); $3, $4: the scope's hospital and department (null: all). Each level has its own text,
# so every plan uses the scope's index.
_SCOPES = {
    "region": "($3::text IS NULL AND $4::text IS NULL)",
    "hospital": "({p}hospital = $3::text AND $4::text IS NULL)",
    "department": "({p}hospital = $3::text AND {p}department = $4::text)",
}
_HOSPITAL_ONLY = {
    "region": "($3::text IS NULL AND $4::text IS NULL)",
    "hospital": "({p}hospital = $3::text AND $4::text IS NULL)",
    "department": "({p}hospital = $3::text AND $4::text IS NOT NULL)",
}
_HOLDS = "($1::date IS NULL OR {c} >= $1::date) AND ($2::date IS NULL OR {c} < $2::date)"
_BEFORE_END = "({c} IS NOT NULL AND ($2::date IS NULL OR {c} < $2::date))"
# The aggregates' own scope key: '' for "all".
_KEY = "hospital = coalesce($3::text, '') AND department = coalesce($4::text, '')"


def _scoped(sql: str, level: str, prefix: str = "") -> str:
    return sql.replace("{scope}", _SCOPES[level].format(p=prefix)).replace(
        "{hospital_scope}", _HOSPITAL_ONLY[level].format(p=prefix)
    )


SPAN_SQL = f"""
SELECT least(
    (SELECT min(launched_on) FROM departments WHERE {{scope}}),
    (SELECT min(closed_on) FROM departments WHERE {{scope}}),
    (SELECT min(trained_on) FROM supporters WHERE {{scope}}),
    (SELECT min(retired_on) FROM supporters WHERE {{scope}}),
    (SELECT min(changed_on) FROM availability_changes WHERE {{scope}}),
    (SELECT min(day) FROM agg_interactions WHERE {_KEY}),
    (SELECT min(day) FROM agg_surveys WHERE {_KEY}),
    (SELECT min(day) FROM agg_referrals WHERE {_KEY} AND referrals > 0),
    ((SELECT min(at) FROM outreach WHERE {{scope}}) AT TIME ZONE 'UTC')::date
), greatest(
    (SELECT max(launched_on) FROM departments WHERE {{scope}}),
    (SELECT max(closed_on) FROM departments WHERE {{scope}}),
    (SELECT max(trained_on) FROM supporters WHERE {{scope}}),
    (SELECT max(retired_on) FROM supporters WHERE {{scope}}),
    (SELECT max(changed_on) FROM availability_changes WHERE {{scope}}),
    (SELECT max(day) FROM agg_interactions WHERE {_KEY}),
    (SELECT max(day) FROM agg_surveys WHERE {_KEY}),
    (SELECT max(day) FROM agg_referrals WHERE {_KEY} AND referrals > 0),
    ((SELECT max(at) FROM outreach WHERE {{scope}}) AT TIME ZONE 'UTC')::date
) WHERE $1::date IS NULL AND $2::date IS NULL
"""

DEPARTMENTS_SQL = f"""
SELECT count(*) FILTER (WHERE launched) AS launched,
    count(*) FILTER (WHERE launched AND NOT closed) AS open,
    coalesce(sum(physician_count) FILTER (WHERE launched AND NOT closed), 0) AS eligible,
    count(DISTINCT hospital) FILTER (WHERE launched) AS hospitals_adopted,
    min(launched_on) AS first_launch,
    array_agg(DISTINCT department) FILTER (WHERE launched) AS slugs,
    (SELECT coalesce(sum(physician_count), 0) FROM hospitals WHERE {{hospital_scope}})
        AS registered_physicians,
    count(*) FILTER (WHERE launched AND NOT EXISTS (
        SELECT 1 FROM referral_days r
        WHERE r.hospital = d.hospital AND r.department = d.department
            AND {_HOLDS.format(c="r.day")}
    )) AS without_referrals
FROM (
    SELECT hospital, department, physician_count, launched_on,
        {_BEFORE_END.format(c="launched_on")} AS launched,
        {_BEFORE_END.format(c="closed_on")} AS closed
    FROM departments WHERE {{scope}}
) AS d
"""

SUPPORTERS_SQL = f"""
WITH latest AS (
    SELECT DISTINCT ON (hospital, supporter_id) hospital, supporter_id, available
    FROM availability_changes WHERE {_BEFORE_END.format(c="changed_on")} AND {{scope}}
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
    WHERE {{scope_s}}
)
SELECT count(*) FILTER (WHERE trained) AS trained,
    count(*) FILTER (WHERE trained AND {_HOLDS.format(c="trained_on")}) AS trained_in_period,
    count(*) FILTER (WHERE active) AS active,
    count(*) FILTER (WHERE active AND available) AS available
FROM judged
"""

_REFERRAL_COLUMNS = (
    "referrals",
    "source_self",
    "source_third_party",
    "source_safety_event",
    "with_record",
    "within_48h",
    "accepted",
    "declined",
    "without_supporter",
    *(f"reason_{r}" for r in (*reaim.DECLINE_REASONS, reaim.UNSPECIFIED)),
)
REFERRALS_SQL = f"""
SELECT {", ".join(f"coalesce(sum({c}), 0)::bigint AS {c}" for c in _REFERRAL_COLUMNS)}
FROM agg_referrals WHERE {_KEY} AND {_HOLDS.format(c="day")}
"""

SURVEYS_SQL = f"""
SELECT {
    ", ".join(
        f"coalesce(sum({c}), 0)::bigint AS {c}"
        for c in ("with_interaction", "helpful", "wellbeing", "comfort", "aware", "would_recommend")
    )
}
FROM agg_surveys WHERE {_KEY} AND {_HOLDS.format(c="day")}
"""

BY_DAY_SQL = f"""
SELECT day, n, escalated FROM agg_interactions WHERE {_KEY} AND {_HOLDS.format(c="day")}
"""
BY_DEPARTMENT_SQL = f"""
SELECT department, sum(n)::bigint FROM agg_interactions
WHERE hospital = coalesce($3::text, '') AND department <> ''
    AND ($4::text IS NULL OR department = $4::text) AND {_HOLDS.format(c="day")}
GROUP BY department
"""

# A histogram over the period: its whole months by month, the rest by day. $5, $6: the whole
# months [from, to) (null $5: from the beginning; null $6: none); $7..$10: the two partial
# stretches by day [a, b) (nulls: none).
_PIECES = """
    ((grain = 'm' AND $6::date IS NOT NULL AND ($5::date IS NULL OR day >= $5::date)
        AND day < $6::date)
    OR (grain = 'd' AND (($7::date IS NOT NULL AND day >= $7::date AND day < $8::date)
        OR ($9::date IS NOT NULL AND day >= $9::date AND day < $10::date))))
"""
HISTOGRAM_SQL = f"""
SELECT value, sum(n)::bigint FROM {{table}}
WHERE {_KEY} AND $1::date IS NOT DISTINCT FROM $1::date AND $2::date IS NOT DISTINCT FROM $2::date
    AND {_PIECES}
GROUP BY value HAVING sum(n) > 0
"""

# One middle value of the hours-to-outreach median, exact in microseconds: the `$6`-th
# smallest (from 0) of the referrals of the scope and period whose delay is in hour `$5`.
_HOUR = (
    "(floor(extract(epoch FROM greatest(first_at - requested_at, interval '0')) / 3600)::integer)"
)
_HOLDS_AT = (
    "($1::date IS NULL OR requested_at >= $1::date::timestamp AT TIME ZONE 'UTC')"
    " AND ($2::date IS NULL OR requested_at < $2::date::timestamp AT TIME ZONE 'UTC')"
)
DELAY_SQL = f"""
SELECT (extract(epoch FROM greatest(first_at - requested_at, interval '0')) * 1000000)::bigint
FROM referrals
WHERE first_at IS NOT NULL AND requested_at IS NOT NULL AND {_HOUR} = $5::integer
    AND {_HOLDS_AT} AND {{scope}}
ORDER BY 1 LIMIT 1 OFFSET $6::integer
"""

# Distinct physicians: rows with F <= day < T whose previous day is before F.
_FIRST_IN = "(prev = '-infinity'::date OR ($1::date IS NOT NULL AND prev < $1::date))"
SUPPORTED_SQL = f"""
SELECT count(*) FROM supported_days
WHERE hospital = $3::text AND department = coalesce($4::text, '')
    AND {_HOLDS.format(c="day")} AND {_FIRST_IN}
"""
SUPPORTED_REGION_SQL = f"""
SELECT (
    SELECT coalesce(sum(n), 0) FROM supported_grid
    WHERE $6::date IS NOT NULL AND ($5::date IS NULL OR month >= $5::date) AND month < $6::date
        AND {_FIRST_IN}
) + (
    SELECT count(*) FROM supported_days
    WHERE department = '' AND {_FIRST_IN}
        AND (($7::date IS NOT NULL AND day >= $7::date AND day < $8::date)
            OR ($9::date IS NOT NULL AND day >= $9::date AND day < $10::date))
) WHERE $3::text IS NULL AND $4::text IS NULL AND $2::date IS NOT DISTINCT FROM $2::date
"""

# The region's department and supporter figures (migrations/007_region_asof.sql): what is
# true at the period's end is the sum of the steps dated before it; departments referred in
# the period are counted as physicians are (first-and-next), by whole months in the grid and
# the days of the partial months, plus the few referral days that came before their
# department's launch. Bounded by days and months, not by the region's departments and
# supporters. Arguments as the histograms' ($5..$10: `pieces`).
_ASOF = "($2::date IS NULL OR day < $2::date)"
REGION_ASOF_SQL = f"""
SELECT coalesce(sum(launched), 0)::bigint AS launched, coalesce(sum(open), 0)::bigint AS open,
    coalesce(sum(eligible), 0)::bigint AS eligible,
    coalesce(sum(adopted), 0)::bigint AS hospitals_adopted,
    (SELECT min(first_launch) FROM region_slugs) AS first_launch,
    (SELECT array_agg(department) FROM region_slugs
     WHERE first_launch IS NOT NULL AND ($2::date IS NULL OR first_launch < $2::date)) AS slugs,
    (SELECT coalesce(sum(physician_count), 0) FROM hospitals) AS registered_physicians,
    coalesce(sum(launched), 0)::bigint - (
        SELECT coalesce(sum(n), 0) FROM referred_grid
        WHERE $6::date IS NOT NULL AND ($5::date IS NULL OR month >= $5::date)
            AND month < $6::date AND {_FIRST_IN}
    ) - (
        SELECT count(*) FROM referral_days
        WHERE eff = day AND {_FIRST_IN}
            AND (($7::date IS NOT NULL AND day >= $7::date AND day < $8::date)
                OR ($9::date IS NOT NULL AND day >= $9::date AND day < $10::date))
    ) - (
        SELECT count(*) FROM referral_days
        WHERE eff <> day AND {_FIRST_IN} AND ($1::date IS NULL OR day >= $1::date)
            AND ($2::date IS NULL OR eff < $2::date)
    ) AS without_referrals,
    coalesce(sum(trained), 0)::bigint AS trained,
    coalesce(sum(trained) FILTER (WHERE $1::date IS NULL OR day >= $1::date), 0)::bigint
        AS trained_in_period,
    coalesce(sum(active), 0)::bigint AS active,
    coalesce(sum(available), 0)::bigint AS available
FROM region_asof WHERE {_ASOF} AND $3::text IS NULL AND $4::text IS NULL
"""
_DEPARTMENT_KEYS = (
    "launched",
    "open",
    "eligible",
    "hospitals_adopted",
    "first_launch",
    "slugs",
    "registered_physicians",
    "without_referrals",
)
_SUPPORTER_KEYS = ("trained", "trained_in_period", "active", "available")

Pieces = tuple[date | None, date | None, date | None, date | None, date | None, date | None]


def _next_month(day: date) -> date:
    return (day.replace(day=1) + timedelta(days=32)).replace(day=1)


def pieces(period: reaim.Period) -> Pieces:
    """The period as whole months [m0, m1) (m0 None: from the beginning) and at most two
    stretches of days [a, b), [c, d) around them. Pure."""
    start, end = period.start, period.end
    if end is None:
        return (None, None, None, None, None, None)
    last = end.replace(day=1)  # the month of the end: by day from its first
    first = None if start is None else (start if start.day == 1 else _next_month(start))
    if first is not None and first > last:  # within one month (or two partial ones)
        assert start is not None
        if start.replace(day=1) == last:
            return (None, None, start, end, None, None)
        return (None, None, start, last, last, end)
    head = (start, first) if start is not None and start != first else (None, None)
    tail = (last, end) if last != end else (None, None)
    months = (first, last) if first is None or first < last else (None, None)
    return (*months, *head, *tail)


def level_of(scope: Scope) -> str:
    return scope.level


@dataclass
class Aggregates:
    """What a scope's figures are made of over one period: counts, sums and histograms. Its
    size does not depend on the number of facts."""

    departments: dict[str, Any] = field(default_factory=dict)
    supporters: dict[str, Any] = field(default_factory=dict)
    referrals: dict[str, Any] = field(default_factory=dict)
    by_day: dict[date, tuple[int, int]] = field(default_factory=dict)  # (count, escalated)
    by_department: dict[str, int] = field(default_factory=dict)
    by_minutes: dict[int, int] = field(default_factory=dict)
    delay_median_us: Fraction | None = None
    physicians_supported: int = 0
    surveys: dict[str, Any] = field(default_factory=dict)


_TEXTS: dict[tuple[str, str], str] = {}


def _sql(name: str, sql: str, level: str) -> str:
    found = _TEXTS.get((name, level))
    if found is None:
        text = _scoped(sql, level).replace("{scope_s}", _SCOPES[level].format(p="s."))
        found = _TEXTS[(name, level)] = text
    return found


async def span(conn: asyncpg.Connection, scope: Scope) -> tuple[date, date] | None:
    """The scope's first and last business dates (as `Facts.business_span`)."""
    sql = _sql("span", SPAN_SQL, scope.level)
    first, last = await conn.fetchrow(sql, None, None, scope.hospital, scope.department)
    return None if first is None else (first, last)


async def _median_delay(
    conn: asyncpg.Connection, scope: Scope, args: tuple[Any, ...], hours: dict[int, int]
) -> Fraction | None:
    total = sum(hours.values())
    if not total:
        return None
    sql = _sql("delay", DELAY_SQL, scope.level)
    found: list[int] = []
    for rank in sorted({(total - 1) // 2, total // 2}):
        seen = 0
        for hour in sorted(hours):
            if rank < seen + hours[hour]:
                found.append(int(await conn.fetchval(sql, *args[:4], hour, rank - seen)))
                break
            seen += hours[hour]
    if len(found) == 1 and total % 2 == 0:
        found *= 2
    return Fraction(sum(found), len(found))


async def aggregates(conn: asyncpg.Connection, scope: Scope, period: reaim.Period) -> Aggregates:
    """The scope's aggregates over `period`, in the caller's snapshot."""
    level = scope.level
    args = (period.start, period.end, scope.hospital, scope.department)
    split = pieces(period)
    agg = Aggregates()
    if scope.hospital is None:
        asof = await conn.fetchrow(REGION_ASOF_SQL, *args, *split)
        agg.departments = {k: asof[k] for k in _DEPARTMENT_KEYS}
        agg.supporters = {k: asof[k] for k in _SUPPORTER_KEYS}
    else:
        departments = _sql("departments", DEPARTMENTS_SQL, level)
        agg.departments = dict(await conn.fetchrow(departments, *args))
        agg.supporters = dict(await conn.fetchrow(_sql("supporters", SUPPORTERS_SQL, level), *args))
    agg.referrals = dict(await conn.fetchrow(REFERRALS_SQL, *args))
    agg.surveys = dict(await conn.fetchrow(SURVEYS_SQL, *args))
    for row in await conn.fetch(BY_DAY_SQL, *args):
        agg.by_day[row["day"]] = (row["n"], row["escalated"])
    agg.by_department = {r[0]: r[1] for r in await conn.fetch(BY_DEPARTMENT_SQL, *args)}
    minutes = HISTOGRAM_SQL.replace("{table}", "agg_minutes")
    agg.by_minutes = {r[0]: r[1] for r in await conn.fetch(minutes, *args, *split)}
    delays = HISTOGRAM_SQL.replace("{table}", "agg_delays")
    hours = {r[0]: r[1] for r in await conn.fetch(delays, *args, *split)}
    agg.delay_median_us = await _median_delay(conn, scope, args, hours)
    if scope.hospital is None:
        agg.physicians_supported = int(await conn.fetchval(SUPPORTED_REGION_SQL, *args, *split))
    else:
        agg.physicians_supported = int(await conn.fetchval(SUPPORTED_SQL, *args))
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
    return reaim.round_half_up(Fraction(sum(found), len(found)), 1)


def figures(agg: Aggregates, period: reaim.Period, span: tuple[date, date] | None) -> Figures:
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
            for m in reaim.month_starts(first, period.end - timedelta(days=1))
        ]
    counts = [m["interactions"] for m in monthly]

    by_department = Counter(dict.fromkeys(d["slugs"] or [], 0))
    by_department.update(agg.by_department)
    by_source = {source: r[f"source_{source}"] for source in reaim.SOURCES}
    supported = agg.physicians_supported

    by_year: list[int] = []
    first_launch = d["first_launch"]
    if first_launch is not None and period.end is not None:
        k = 0
        while (start := reaim.add_years(first_launch, k)) < period.end:
            stop = reaim.add_years(first_launch, k + 1)
            by_year.append(sum(n for day, (n, _) in agg.by_day.items() if start <= day < stop))
            k += 1

    delay = agg.delay_median_us
    return Figures.model_validate(
        {
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
                    else reaim.round_half_up(
                        Fraction(sum(m * n for m, n in minutes.items()), interactions), 1
                    )
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
                "outreach_acceptance_rate": reaim.rate(
                    r["accepted"], r["accepted"] + r["declined"]
                ),
                "would_recommend_rate": reaim.rate(v["would_recommend"], v["aware"]),
                "departments_without_referrals": d["without_referrals"],
            },
            "implementation": {
                "outreach_within_48h_rate": reaim.rate(r["within_48h"], r["with_record"]),
                "hours_to_outreach_median": (
                    None
                    if delay is None
                    else reaim.round_half_up(delay / reaim.MICROSECONDS_PER_HOUR, 1)
                ),
                "physicians_per_active_supporter": reaim.ratio(eligible, s["active"]),
                "referrals_without_supporter": r["without_supporter"],
                "supporters_available": s["available"],
                "decline_reasons": {
                    reason: r[f"reason_{reason}"]
                    for reason in (*reaim.DECLINE_REASONS, reaim.UNSPECIFIED)
                },
            },
            "maintenance": {
                "supporters_active": s["active"],
                "supporter_retention_rate": reaim.rate(s["active"], s["trained"]),
                "departments_active_rate": reaim.rate(open_, launched),
                "interactions_by_program_year": by_year,
                "monthly_rate_by_program_year": [
                    reaim.round_half_up(Fraction(c, 12), 1) for c in by_year
                ],
            },
        }
    )


async def compute(
    conn: asyncpg.Connection, scope: Scope, period_from: date | None, period_to: date | None
) -> tuple[reaim.Period, Figures]:
    """The scope's period and figures, in the caller's snapshot."""
    # Without `to` the period ends after the last fact; without `from` the monthly list
    # starts at the first launch, or the first fact lacking one.
    found = await span(conn, scope) if period_to is None or period_from is None else None
    period = reaim.period_from_span(found, period_from, period_to)
    return period, figures(await aggregates(conn, scope, period), period, found)
