"""The RE-AIM figures the commands sent imply (pure), computed here independently of the
analytics service, and their comparison with what analytics answers."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

from postctl.load.mix import Planned


def _half_up(value: Fraction, places: int) -> float:
    exact = Decimal(value.numerator) / Decimal(value.denominator)
    return float(exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def _rate(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else _half_up(Fraction(numerator, denominator), 4)


def _median(values: Sequence[int], unit: int = 1) -> float | None:
    if not values:
        return None
    s, mid = sorted(values), len(values) // 2
    middle = Fraction(s[mid]) if len(s) % 2 else Fraction(s[mid - 1] + s[mid], 2)
    return _half_up(middle / unit, 1)


def _start_of_day(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def expected_reaim(commands: Iterable[Planned]) -> dict[str, dict[str, dict[str, Any]]]:
    """hospital -> the RE-AIM figures its commands imply (the keys this mix exercises).

    The whole history, no period. Only commands that must succeed and are not repeats count.
    Exactly as CONTRACT.md defines them; a department without any supporter is where referrals
    find none (the mix's other departments always have an eligible senior supporter).
    """
    by_hospital: dict[str, list[Planned]] = defaultdict(list)
    for p in commands:
        if p.counts:
            by_hospital[p.hospital].append(p)
    return {h: _figures(ps) for h, ps in by_hospital.items()}


def _figures(commands: list[Planned]) -> dict[str, dict[str, Any]]:
    of: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in commands:
        of[p.command_type].append(p.data)
    hospital_physicians = sum(d["physician_count"] for d in of["RegisterHospital"])
    departments = {d["department"]: d["physician_count"] for d in of["LaunchDepartment"]}
    staffed = {d["department"] for d in of["RegisterSupporter"]}
    supporters = len(of["RegisterSupporter"])
    eligible = sum(departments.values())
    referrals = {d["referral_id"]: d for d in of["RequestReferral"]}
    # Every record of a referral: (business time, outcome, decline reason).
    records: dict[str, list[tuple[datetime, str, str | None]]] = defaultdict(list)
    for d in of["RecordOutreach"]:
        records[d["referral_id"]].append((_parse_time(d["at"]), d["outcome"], d["decline_reason"]))
    interactions = of["RecordInteraction"]
    for d in interactions:
        day = _start_of_day(date.fromisoformat(d["occurred_on"]))
        records[d["referral_id"]].append((day, "accepted", None))

    firsts = {r: min(rs) for r, rs in records.items() if r in referrals}
    accepted = sum(1 for f in firsts.values() if f[1] == "accepted")
    declined = sum(1 for f in firsts.values() if f[1] == "declined")
    delays = []
    for r, first in firsts.items():
        delay = first[0] - _parse_time(referrals[r]["requested_at"])
        delays.append(max(delay, timedelta(0)) // timedelta(microseconds=1))
    decline_reasons = Counter(
        min(x for x in records[r] if x[1] == "declined")[2] or "unspecified"
        for r in firsts
        if any(x[1] == "declined" for x in records[r])
    )
    minutes = [d["minutes"] for d in interactions]
    supported = {referrals[d["referral_id"]]["physician_id"] for d in interactions}
    surveys = of["SubmitSurveyResponse"]
    with_interaction = [s for s in surveys if s["had_interaction"]]
    aware = [s for s in surveys if s["aware"]]
    referred = {d["department"] for d in referrals.values()}
    n_with = len(with_interaction)
    return {
        "reach": {
            "supporters_trained": supporters,
            "referrals": len(referrals),
            "referrals_by_source": dict(Counter(d["source"] for d in referrals.values())),
            "interactions": len(interactions),
            "interactions_by_department": dict(
                Counter(referrals[d["referral_id"]]["department"] for d in interactions)
            ),
            "physicians_supported": len(supported),
            "eligible_physicians": eligible,
            "reach_rate": _rate(len(supported), eligible),
            "minutes_mean": _half_up(Fraction(sum(minutes), len(minutes)), 1) if minutes else None,
            "minutes_median": _median(minutes),
            "minutes_min": min(minutes, default=None),
            "minutes_max": max(minutes, default=None),
        },
        "effectiveness": {
            "respondents_with_interaction": n_with,
            "helpful_rate": _rate(sum(1 for s in with_interaction if s["helpful"] >= 4), n_with),
            "wellbeing_improved_rate": _rate(
                sum(1 for s in with_interaction if s["wellbeing_improved"]), n_with
            ),
            "comfort_improved_rate": _rate(
                sum(1 for s in with_interaction if s["comfort_improved"]), n_with
            ),
            "escalation_rate": _rate(sum(1 for d in interactions if d["escalated"]), len(minutes)),
        },
        "adoption": {
            "hospitals_adopted": 1 if departments else 0,
            "departments_launched": len(departments),
            "physician_coverage": _rate(min(eligible, hospital_physicians), hospital_physicians),
            "outreach_acceptance_rate": _rate(accepted, accepted + declined),
            "would_recommend_rate": _rate(
                sum(1 for s in aware if s["would_recommend"]), len(aware)
            ),
            "departments_without_referrals": sum(1 for d in departments if d not in referred),
        },
        "implementation": {
            "outreach_within_48h_rate": _rate(
                sum(1 for d in delays if d <= 48 * 3_600_000_000), len(delays)
            ),
            "hours_to_outreach_median": _median(delays, unit=3_600_000_000),
            "physicians_per_active_supporter": (
                _half_up(Fraction(eligible, supporters), 1) if supporters else None
            ),
            "referrals_without_supporter": sum(
                1 for d in referrals.values() if d["department"] not in staffed
            ),
            "decline_reasons": dict(decline_reasons),
        },
        "maintenance": {
            "supporters_active": supporters,
            "supporter_retention_rate": _rate(supporters, supporters),
            "departments_active_rate": _rate(len(departments), len(departments)),
        },
    }


def figure_mismatches(expected: dict[str, dict[str, Any]], actual: dict[str, Any]) -> list[str]:
    """`object.key: expected != actual` for each differing figure; breakdowns without zeros."""

    def norm(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if v}
        return value

    out = []
    for obj, figures in expected.items():
        for key, want in figures.items():
            got = actual.get(obj, {}).get(key, "<missing>")
            if norm(want) != norm(got):
                out.append(f"{obj}.{key}: expected {norm(want)!r}, got {norm(got)!r}")
    return out
