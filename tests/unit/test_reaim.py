"""Every rule of CONTRACT.md's RE-AIM read model, on hand-made facts (no servers)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from services.analytics.domain import (
    ASSIGNED,
    NO_SUPPORTER,
    AvailabilityChange,
    Department,
    Facts,
    Figures,
    Hospital,
    Interaction,
    Outreach,
    Referral,
    Scope,
    Supporter,
    SurveyResponse,
)
from services.analytics.reaim import add_years, compute, median, numeric_figures, rate

REGION = Scope()
A = "hosp-a"
B = "hosp-b"


def d(text: str) -> date:
    return date.fromisoformat(text)


def t(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def figures(
    facts: Facts,
    scope: Scope = REGION,
    period_from: str | None = None,
    period_to: str | None = None,
) -> dict[str, Any]:
    return compute(
        facts,
        scope=scope,
        period_from=d(period_from) if period_from else None,
        period_to=d(period_to) if period_to else None,
    ).model_dump()


def referral(
    rid: str,
    requested_at: str,
    *,
    hospital: str = A,
    department: str = "em",
    physician: str | None = None,
    source: str = "third_party",
    matching: str | None = ASSIGNED,
) -> Referral:
    return Referral(
        hospital, rid, department, physician or f"p-{rid}", source, t(requested_at), matching
    )


def outreach(
    rid: str,
    at: str,
    outcome: str = "accepted",
    *,
    hospital: str = A,
    department: str = "em",
    reason: str | None = None,
    seq: int = 0,
) -> Outreach:
    return Outreach(hospital, rid, department, outcome, t(at), reason, seq)


def interaction(
    rid: str,
    on: str,
    minutes: int = 60,
    *,
    hospital: str = A,
    department: str = "em",
    escalated: bool = False,
    seq: int = 0,
) -> Interaction:
    return Interaction(hospital, rid, department, d(on), minutes, escalated, seq)


def survey(
    rid: str,
    on: str,
    *,
    aware: bool = True,
    had_interaction: bool = False,
    helpful: int | None = None,
    wellbeing: bool | None = None,
    comfort: bool | None = None,
    recommend: bool | None = None,
    hospital: str = A,
    department: str = "em",
) -> SurveyResponse:
    return SurveyResponse(
        hospital,
        rid,
        department,
        d(on),
        aware,
        had_interaction,
        helpful,
        wellbeing,
        comfort,
        recommend,
    )


def launch(
    department: str,
    on: str,
    physicians: int,
    *,
    hospital: str = A,
    closed: str | None = None,
) -> Department:
    return Department(hospital, department, physicians, d(on), d(closed) if closed else None)


def supporter(
    sid: str,
    trained: str,
    *,
    retired: str | None = None,
    hospital: str = A,
    department: str = "em",
) -> Supporter:
    return Supporter(hospital, sid, department, d(trained), d(retired) if retired else None)


# The keys of the contract's table, object by object.
CONTRACT_KEYS = {
    "reach": {
        "supporters_trained",
        "referrals",
        "referrals_by_source",
        "interactions",
        "interactions_by_department",
        "physicians_supported",
        "eligible_physicians",
        "reach_rate",
        "minutes_mean",
        "minutes_median",
        "minutes_min",
        "minutes_max",
        "monthly",
        "monthly_mean",
        "monthly_median",
        "monthly_min",
        "monthly_max",
    },
    "effectiveness": {
        "respondents_with_interaction",
        "helpful_rate",
        "wellbeing_improved_rate",
        "comfort_improved_rate",
        "escalation_rate",
    },
    "adoption": {
        "hospitals_adopted",
        "departments_launched",
        "physician_coverage",
        "outreach_acceptance_rate",
        "would_recommend_rate",
        "departments_without_referrals",
    },
    "implementation": {
        "outreach_within_48h_rate",
        "hours_to_outreach_median",
        "physicians_per_active_supporter",
        "referrals_without_supporter",
        "supporters_available",
        "decline_reasons",
    },
    "maintenance": {
        "supporters_active",
        "supporter_retention_rate",
        "departments_active_rate",
        "interactions_by_program_year",
        "monthly_rate_by_program_year",
    },
}

# --- shape, emptiness, arithmetic -----------------------------------------------------------


def test_every_key_of_the_contract_table_is_answered() -> None:
    answer = figures(Facts())
    assert set(answer) == set(CONTRACT_KEYS)
    for name, keys in CONTRACT_KEYS.items():
        assert keys <= set(answer[name]), name


def test_no_facts_gives_zero_counts_null_rates_and_empty_lists() -> None:
    answer = figures(Facts())
    reach, eff, adopt, impl, maint = (answer[k] for k in CONTRACT_KEYS)
    assert reach["interactions"] == reach["referrals"] == reach["supporters_trained"] == 0
    assert reach["physicians_supported"] == reach["eligible_physicians"] == 0
    assert reach["reach_rate"] is None
    assert reach["minutes_mean"] is reach["minutes_median"] is reach["minutes_min"] is None
    assert reach["minutes_max"] is None
    assert reach["monthly"] == []
    assert reach["monthly_mean"] is reach["monthly_median"] is reach["monthly_max"] is None
    assert all(v == 0 for v in reach["referrals_by_source"].values())
    assert eff["respondents_with_interaction"] == 0
    assert eff["helpful_rate"] is eff["escalation_rate"] is None
    assert adopt["hospitals_adopted"] == adopt["departments_launched"] == 0
    assert adopt["physician_coverage"] is adopt["outreach_acceptance_rate"] is None
    assert adopt["would_recommend_rate"] is None
    assert adopt["departments_without_referrals"] == 0
    assert impl["outreach_within_48h_rate"] is impl["hours_to_outreach_median"] is None
    assert impl["physicians_per_active_supporter"] is None
    assert impl["referrals_without_supporter"] == 0
    assert all(v == 0 for v in impl["decline_reasons"].values())
    assert maint["supporters_active"] == 0
    assert maint["supporter_retention_rate"] is maint["departments_active_rate"] is None
    assert maint["interactions_by_program_year"] == maint["monthly_rate_by_program_year"] == []


def test_a_period_without_facts_counts_nothing_but_lists_its_months_with_zeros() -> None:
    facts = Facts(
        hospitals=[Hospital(A, 100)],
        departments=[launch("em", "2019-06-01", 40)],
        supporters=[supporter("s1", "2019-06-01")],
        referrals=[referral("r1", "2019-07-01T10:00")],
        interactions=[interaction("r1", "2019-07-02")],
    )
    answer = figures(facts, period_from="2021-01-01", period_to="2021-03-01")
    assert answer["reach"]["interactions"] == 0
    assert answer["reach"]["referrals"] == 0
    assert answer["reach"]["physicians_supported"] == 0
    assert answer["reach"]["minutes_mean"] is None
    assert answer["reach"]["monthly"] == [
        {"month": "2021-01", "interactions": 0},
        {"month": "2021-02", "interactions": 0},
    ]
    assert answer["reach"]["monthly_median"] == 0.0
    assert answer["adoption"]["outreach_acceptance_rate"] is None
    assert answer["implementation"]["outreach_within_48h_rate"] is None
    # Cumulative figures still see what happened before the period.
    assert answer["reach"]["eligible_physicians"] == 40
    assert answer["maintenance"]["supporters_active"] == 1
    assert answer["adoption"]["departments_without_referrals"] == 1
    assert answer["maintenance"]["interactions_by_program_year"] == [0, 0]


def test_rates_round_half_up_to_four_places_and_never_pass_one() -> None:
    assert rate(1, 3) == 0.3333
    assert rate(2, 3) == 0.6667
    assert rate(1, 8) == 0.125
    assert rate(5, 100_000) == 0.0001  # 0.00005 rounds up, not to even
    assert rate(0, 7) == 0.0
    assert rate(3, 0) is None
    assert rate(12, 10) == 1.0


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values() -> None:
    assert median([10, 60, 180]) == 60.0
    assert median([180, 10, 60, 90]) == 75.0
    assert median([1, 2]) == 1.5
    assert median([]) is None


def test_program_years_from_29_february_fall_back_to_28_february() -> None:
    assert add_years(d("2020-02-29"), 1) == d("2021-02-28")
    assert add_years(d("2020-02-29"), 4) == d("2024-02-29")
    assert add_years(d("2019-06-01"), 3) == d("2022-06-01")


# --- the period -----------------------------------------------------------------------------


def test_from_is_inclusive_and_to_exclusive() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        interactions=[
            interaction("r1", "2020-01-31"),
            interaction("r2", "2020-02-01"),
            interaction("r3", "2020-02-29"),
            interaction("r4", "2020-03-01"),
        ],
    )
    answer = figures(facts, period_from="2020-02-01", period_to="2020-03-01")
    assert answer["reach"]["interactions"] == 2
    assert [m["month"] for m in answer["reach"]["monthly"]] == ["2020-02"]


def test_without_to_the_period_ends_after_the_day_of_the_last_business_date_of_any_kind() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-15", 10)],
        interactions=[interaction("r1", "2020-02-10")],
        # The survey is the scope's last fact: the months run to its month.
        surveys=[survey("q1", "2020-04-30")],
    )
    answer = figures(facts)
    assert [m["month"] for m in answer["reach"]["monthly"]] == [
        "2020-01",
        "2020-02",
        "2020-03",
        "2020-04",
    ]
    # A department closed on that last day is closed before the period's end.
    closed = Facts(departments=[launch("em", "2020-01-15", 10, closed="2020-03-03")])
    assert figures(closed)["reach"]["eligible_physicians"] == 0
    assert figures(closed)["maintenance"]["departments_active_rate"] == 0.0


def test_a_from_after_the_last_fact_is_an_empty_period_not_a_reversed_one() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-15", 10)],
        interactions=[interaction("r1", "2020-02-10")],
    )
    answer = figures(facts, period_from="2030-01-01")
    assert answer["reach"]["interactions"] == 0
    assert answer["reach"]["monthly"] == []
    assert answer["reach"]["reach_rate"] is None or answer["reach"]["reach_rate"] == 0


def test_a_retirement_is_a_business_date_too() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        supporters=[supporter("s1", "2020-01-01", retired="2020-05-20")],
    )
    answer = figures(facts)
    assert answer["reach"]["monthly"][-1]["month"] == "2020-05"
    assert answer["maintenance"]["supporters_active"] == 0  # retired before the end (05-21)


def test_a_time_counts_on_its_utc_date() -> None:
    pacific = timezone(timedelta(hours=-8))
    late_evening = datetime(2020, 1, 31, 20, 0, tzinfo=pacific)  # 2020-02-01 04:00 UTC
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        referrals=[Referral(A, "r1", "em", "p1", "self", late_evening, ASSIGNED)],
    )
    assert (
        figures(facts, period_from="2020-02-01", period_to="2020-03-01")["reach"]["referrals"] == 1
    )
    assert (
        figures(facts, period_from="2020-01-01", period_to="2020-02-01")["reach"]["referrals"] == 0
    )


# --- reach ----------------------------------------------------------------------------------


def test_reach_counts_training_referrals_by_source_and_interactions_by_department() -> None:
    facts = Facts(
        hospitals=[Hospital(A, 200)],
        departments=[
            launch("em", "2020-01-01", 50),
            launch("icu", "2020-01-01", 30),
            launch("geri", "2020-01-01", 20),
        ],
        supporters=[
            supporter("s1", "2019-12-01"),  # before the period
            supporter("s2", "2020-01-10"),
            supporter("s3", "2020-02-10", department="icu"),
        ],
        referrals=[
            referral("r1", "2020-01-02T09:00", source="self"),
            referral("r2", "2020-01-03T09:00", source="third_party"),
            referral("r3", "2020-01-04T09:00", source="safety_event", department="icu"),
            referral("r4", "2020-01-05T09:00", source="safety_event"),
        ],
        interactions=[
            interaction("r1", "2020-01-02"),
            interaction("r2", "2020-01-04"),
            interaction("r3", "2020-01-05", department="icu"),
        ],
    )
    reach = figures(facts, period_from="2020-01-01")["reach"]
    assert reach["supporters_trained"] == 2
    assert reach["referrals"] == 4
    assert reach["referrals_by_source"] == {"self": 1, "third_party": 1, "safety_event": 2}
    assert reach["interactions"] == 3
    assert reach["interactions_by_department"] == {"em": 2, "geri": 0, "icu": 1}


def test_physicians_supported_are_distinct_physicians_and_ids_are_per_hospital() -> None:
    facts = Facts(
        hospitals=[Hospital(A, 100), Hospital(B, 100)],
        departments=[launch("em", "2020-01-01", 30), launch("em", "2020-01-01", 20, hospital=B)],
        referrals=[
            referral("r1", "2020-01-02T09:00", physician="doc-1"),
            referral("r2", "2020-03-02T09:00", physician="doc-1"),  # the same physician again
            referral("r3", "2020-01-02T09:00", physician="doc-2"),  # referred, never met
            referral("r1", "2020-01-02T09:00", physician="doc-1", hospital=B),  # another doc-1
        ],
        interactions=[
            interaction("r1", "2020-01-03"),
            interaction("r1", "2020-01-10"),  # a follow-up
            interaction("r2", "2020-03-03"),
            interaction("r1", "2020-01-04", hospital=B),
        ],
    )
    reach = figures(facts)["reach"]
    assert reach["interactions"] == 4
    assert reach["physicians_supported"] == 2
    assert reach["eligible_physicians"] == 50
    assert reach["reach_rate"] == 0.04
    assert figures(facts, Scope(A))["reach"]["physicians_supported"] == 1


def test_an_interaction_whose_referral_is_not_known_yet_still_reaches_a_physician() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        interactions=[interaction("r9", "2020-01-03"), interaction("r9", "2020-01-04")],
    )
    assert figures(facts)["reach"]["physicians_supported"] == 1


def test_eligible_physicians_count_departments_launched_and_not_closed_before_the_end() -> None:
    facts = Facts(
        hospitals=[Hospital(A, 1000)],
        departments=[
            launch("em", "2020-01-01", 100),
            launch("icu", "2020-01-01", 50, closed="2020-05-31"),  # closed before the end
            launch("ane", "2020-01-01", 40, closed="2020-06-01"),  # closed on the end: counts
            launch("obgyn", "2020-06-01", 30),  # launched on the end: not yet
            launch("peds", "2020-05-31", 20),
        ],
    )
    answer = figures(facts, period_from="2020-05-01", period_to="2020-06-01")
    assert answer["reach"]["eligible_physicians"] == 160
    assert answer["adoption"]["departments_launched"] == 4
    assert answer["adoption"]["physician_coverage"] == 0.16
    assert answer["maintenance"]["departments_active_rate"] == 0.75


def test_minutes_statistics_over_the_interactions_of_the_period() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        interactions=[
            interaction("r1", "2020-01-02", 10),
            interaction("r2", "2020-01-03", 60),
            interaction("r3", "2020-01-04", 45),
            interaction("r4", "2020-01-05", 180),
            interaction("r5", "2019-12-31", 600),  # before the period
        ],
    )
    reach = figures(facts, period_from="2020-01-01")["reach"]
    assert reach["minutes_mean"] == 73.8  # 295 / 4 = 73.75, half up
    assert reach["minutes_median"] == 52.5
    assert reach["minutes_min"] == 10
    assert reach["minutes_max"] == 180


def test_monthly_runs_from_the_first_launch_with_zero_months_and_its_statistics() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-20", 10), launch("icu", "2020-03-05", 10)],
        interactions=[
            interaction("r1", "2020-01-25"),
            interaction("r2", "2020-03-01"),
            interaction("r3", "2020-03-10"),
            interaction("r4", "2020-03-11"),
            interaction("r5", "2020-04-30"),
        ],
    )
    reach = figures(facts)["reach"]
    assert reach["monthly"] == [
        {"month": "2020-01", "interactions": 1},
        {"month": "2020-02", "interactions": 0},
        {"month": "2020-03", "interactions": 3},
        {"month": "2020-04", "interactions": 1},
    ]
    assert reach["monthly_mean"] == 1.3  # 5 / 4 = 1.25, half up
    assert reach["monthly_median"] == 1.0
    assert reach["monthly_min"] == 0
    assert reach["monthly_max"] == 3


def test_monthly_with_from_starts_at_its_month_and_covers_every_overlapping_month() -> None:
    facts = Facts(
        departments=[launch("em", "2019-01-01", 10)],
        interactions=[interaction("r1", "2020-02-14"), interaction("r2", "2020-02-16")],
    )
    answer = figures(facts, period_from="2020-01-15", period_to="2020-03-02")
    assert answer["reach"]["monthly"] == [
        {"month": "2020-01", "interactions": 0},
        {"month": "2020-02", "interactions": 2},
        {"month": "2020-03", "interactions": 0},
    ]


# --- effectiveness --------------------------------------------------------------------------


def test_survey_figures_among_respondents_with_an_interaction() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        surveys=[
            survey(
                "q1", "2022-03-01", had_interaction=True, helpful=5, wellbeing=True, comfort=True
            ),
            survey(
                "q2", "2022-03-01", had_interaction=True, helpful=4, wellbeing=True, comfort=False
            ),
            survey("q3", "2022-03-02", had_interaction=True, helpful=3, wellbeing=False),
            survey("q4", "2022-03-02", had_interaction=True),  # answered none of them
            survey("q5", "2022-03-02", had_interaction=False),
            survey("q6", "2021-03-02", had_interaction=True, helpful=5),  # outside the period
        ],
    )
    eff = figures(facts, period_from="2022-01-01")["effectiveness"]
    assert eff["respondents_with_interaction"] == 4
    assert eff["helpful_rate"] == 0.5
    assert eff["wellbeing_improved_rate"] == 0.5
    assert eff["comfort_improved_rate"] == 0.25


def test_escalation_rate_over_interactions() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        interactions=[
            interaction("r1", "2020-01-02", escalated=True),
            interaction("r1", "2020-01-09"),
            interaction("r2", "2020-01-03"),
        ],
    )
    assert figures(facts)["effectiveness"]["escalation_rate"] == 0.3333


# --- adoption -------------------------------------------------------------------------------


def test_hospitals_and_departments_adopted_are_cumulative_and_include_closed_ones() -> None:
    facts = Facts(
        hospitals=[Hospital(A, 100), Hospital(B, 300), Hospital("hosp-c", 100)],
        departments=[
            launch("em", "2019-01-01", 10, closed="2019-06-01"),
            launch("icu", "2020-06-01", 10, hospital=B),
            launch("em", "2021-01-01", 10, hospital="hosp-c"),  # after the period
        ],
    )
    adopt = figures(facts, period_from="2020-06-01", period_to="2020-07-01")["adoption"]
    assert adopt["hospitals_adopted"] == 2
    assert adopt["departments_launched"] == 2
    assert adopt["physician_coverage"] == 0.02  # 10 open of 500 registered


def test_physician_coverage_at_department_scope_is_of_its_hospital() -> None:
    facts = Facts(
        hospitals=[Hospital(A, 400), Hospital(B, 600)],
        departments=[launch("em", "2020-01-01", 100), launch("icu", "2020-01-01", 50)],
    )
    assert figures(facts, Scope(A, "em"))["adoption"]["physician_coverage"] == 0.25
    assert figures(facts, Scope(A))["adoption"]["physician_coverage"] == 0.375
    assert figures(facts)["adoption"]["physician_coverage"] == 0.15
    assert figures(facts, Scope(A, "em"))["adoption"]["hospitals_adopted"] == 1


def test_acceptance_uses_each_referrals_first_outcome() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        referrals=[
            referral("r1", "2020-02-01T10:00"),
            referral("r2", "2020-02-01T10:00"),
            referral("r3", "2020-02-01T10:00"),
            referral("r4", "2020-02-01T10:00"),
            referral("r5", "2020-02-01T10:00"),
            referral("r6", "2020-02-01T10:00"),
        ],
        outreach=[
            outreach("r1", "2020-02-02T10:00", "accepted"),
            outreach("r2", "2020-02-02T10:00", "declined", reason="no_time"),
            # unreachable first, then accepted: the first outcome is unreachable
            outreach("r3", "2020-02-02T10:00", "unreachable", seq=5),
            outreach("r3", "2020-02-04T10:00", "accepted", seq=9),
            outreach("r4", "2020-02-02T10:00", "unreachable"),
        ],
        # r5 met without a recorded outreach: accepted; r6 has no record at all.
        interactions=[interaction("r5", "2020-02-03"), interaction("r1", "2020-02-05")],
    )
    adopt = figures(facts)["adoption"]
    assert adopt["outreach_acceptance_rate"] == 0.6667  # r1, r5 accepted / r1, r2, r5


def test_an_interaction_before_any_outreach_makes_the_referral_accepted() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        referrals=[referral("r1", "2020-02-01T10:00")],
        outreach=[outreach("r1", "2020-02-05T10:00", "declined")],
        interactions=[interaction("r1", "2020-02-03")],
    )
    assert figures(facts)["adoption"]["outreach_acceptance_rate"] == 1.0


def test_referral_figures_count_referrals_requested_in_the_period_whatever_the_outcome_date() -> (
    None
):
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        referrals=[
            referral("r1", "2020-01-31T20:00"),  # in the period, outcome after it
            referral("r2", "2019-12-31T20:00"),  # before the period, outcome inside it
        ],
        outreach=[
            outreach("r1", "2020-02-03T10:00", "declined", reason="privacy"),
            outreach("r2", "2020-01-02T10:00", "accepted"),
        ],
    )
    answer = figures(facts, period_from="2020-01-01", period_to="2020-02-01")
    assert answer["adoption"]["outreach_acceptance_rate"] == 0.0
    assert answer["implementation"]["outreach_within_48h_rate"] == 0.0
    assert answer["implementation"]["decline_reasons"]["privacy"] == 1


def test_would_recommend_among_aware_respondents() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        surveys=[
            survey("q1", "2022-03-01", recommend=True),
            survey("q2", "2022-03-01", recommend=False),
            survey("q3", "2022-03-01"),  # aware, did not say
            survey("q4", "2022-03-01", aware=False, recommend=True),
        ],
    )
    assert figures(facts)["adoption"]["would_recommend_rate"] == 0.3333


def test_departments_without_referrals_include_closed_departments() -> None:
    facts = Facts(
        departments=[
            launch("em", "2020-01-01", 10),
            launch("icu", "2020-01-01", 10, closed="2020-03-01"),
            launch("ane", "2020-01-01", 10),
            launch("em", "2020-01-01", 10, hospital=B),
            launch("peds", "2021-01-01", 10),  # after the period
        ],
        referrals=[
            referral("r1", "2020-02-01T10:00"),
            referral("r2", "2019-02-01T10:00", department="ane"),  # before the period
        ],
    )
    adopt = figures(facts, period_from="2020-01-01", period_to="2020-12-01")["adoption"]
    assert adopt["departments_without_referrals"] == 3  # icu, ane, and B's em


# --- implementation -------------------------------------------------------------------------


def test_outreach_within_48_hours_uses_the_first_outreach_or_interaction_of_any_outcome() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        referrals=[
            referral("r1", "2020-02-01T10:00"),
            referral("r2", "2020-02-01T10:00"),
            referral("r3", "2020-02-01T10:00"),
            referral("r4", "2020-02-01T10:00"),
            referral("r5", "2020-02-01T10:00"),  # no record: not in the denominator
        ],
        outreach=[
            outreach("r1", "2020-02-03T10:00", "unreachable"),  # exactly 48 h
            outreach("r1", "2020-02-03T12:00", "accepted"),
            outreach("r2", "2020-02-03T10:00:01", "accepted"),  # a second late
        ],
        interactions=[
            interaction("r3", "2020-02-03"),  # start of day: 38 h
            interaction("r4", "2020-02-04"),  # 62 h
        ],
    )
    impl = figures(facts)["implementation"]
    assert impl["outreach_within_48h_rate"] == 0.5
    assert impl["hours_to_outreach_median"] == 48.0  # of 38, 48, 48.0003, 62


def test_a_same_day_interaction_takes_no_time_not_negative_time() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        referrals=[referral("r1", "2020-02-01T15:00")],
        interactions=[interaction("r1", "2020-02-01")],
    )
    impl = figures(facts)["implementation"]
    assert impl["hours_to_outreach_median"] == 0.0
    assert impl["outreach_within_48h_rate"] == 1.0


def test_physicians_per_active_supporter_to_one_place() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 100)],
        supporters=[supporter("s1", "2020-01-01"), supporter("s2", "2020-01-01")]
        + [supporter(f"s{n}", "2020-01-01") for n in range(3, 8)],
    )
    assert figures(facts)["implementation"]["physicians_per_active_supporter"] == 14.3
    lonely = Facts(departments=[launch("em", "2020-01-01", 100)])
    assert figures(lonely)["implementation"]["physicians_per_active_supporter"] is None


def test_referrals_without_supporter_by_latest_matching_outcome() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        referrals=[
            referral("r1", "2020-02-01T10:00", matching=NO_SUPPORTER),
            referral("r2", "2020-02-01T10:00", matching=ASSIGNED),
            referral("r3", "2020-02-01T10:00", matching=None),
            referral("r4", "2019-02-01T10:00", matching=NO_SUPPORTER),  # before the period
        ],
    )
    impl = figures(facts, period_from="2020-01-01")["implementation"]
    assert impl["referrals_without_supporter"] == 1


def test_decline_reasons_count_declined_referrals_by_reason() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        referrals=[referral(f"r{n}", "2020-02-01T10:00") for n in range(1, 5)],
        outreach=[
            outreach("r1", "2020-02-02T10:00", "declined", reason="no_time"),
            outreach("r2", "2020-02-02T10:00", "declined", reason="no_time"),
            outreach("r3", "2020-02-02T10:00", "declined", reason="medicolegal"),
            outreach("r4", "2020-02-02T10:00", "declined"),
        ],
    )
    reasons = figures(facts)["implementation"]["decline_reasons"]
    assert reasons["no_time"] == 2
    assert reasons["medicolegal"] == 1
    assert reasons["unspecified"] == 1
    assert reasons["privacy"] == 0


# --- maintenance ----------------------------------------------------------------------------


def test_active_supporters_exclude_the_retired_and_those_of_closed_departments() -> None:
    facts = Facts(
        departments=[
            launch("em", "2019-01-01", 60),
            launch("icu", "2019-01-01", 20, closed="2020-03-01"),
        ],
        supporters=[
            supporter("s1", "2019-02-01"),
            supporter("s2", "2019-02-01", retired="2020-01-15"),  # retired before the end
            supporter("s3", "2019-02-01", retired="2020-06-01"),  # retires on the end: active
            supporter("s4", "2019-02-01", department="icu"),  # department closed
            supporter("s5", "2020-06-01"),  # trained on the end: not yet
        ],
    )
    answer = figures(facts, period_from="2020-01-01", period_to="2020-06-01")
    assert answer["maintenance"]["supporters_active"] == 2
    assert answer["maintenance"]["supporter_retention_rate"] == 0.5
    assert answer["implementation"]["physicians_per_active_supporter"] == 30.0
    assert answer["maintenance"]["departments_active_rate"] == 0.5
    assert answer["reach"]["supporters_trained"] == 0


def test_program_years_from_the_first_launch() -> None:
    facts = Facts(
        departments=[launch("em", "2019-06-01", 10), launch("icu", "2020-09-01", 10)],
        interactions=[
            interaction("r0", "2019-05-31"),  # before the first launch: no program year
            interaction("r1", "2019-06-01"),
            interaction("r2", "2020-05-31"),
            interaction("r3", "2020-06-01"),
            interaction("r4", "2021-06-01"),
            interaction("r5", "2022-05-31"),
        ],
    )
    maint = figures(facts)["maintenance"]
    assert maint["interactions_by_program_year"] == [2, 1, 2]
    assert maint["monthly_rate_by_program_year"] == [0.2, 0.1, 0.2]


def test_a_period_cutting_a_program_year_counts_only_its_interactions() -> None:
    facts = Facts(
        departments=[launch("em", "2019-06-01", 10)],
        interactions=[interaction(f"r{n}", "2020-03-01") for n in range(10)]
        + [interaction(f"s{n}", "2020-07-01") for n in range(7)]
        + [interaction(f"t{n}", "2020-08-01") for n in range(50)],
    )
    maint = figures(facts, period_from="2020-02-01", period_to="2020-08-01")["maintenance"]
    # Years 1 (from 2019-06-01) and 2 (from 2020-06-01) start before the end; year 1 is cut.
    assert maint["interactions_by_program_year"] == [10, 7]
    assert maint["monthly_rate_by_program_year"] == [0.8, 0.6]  # 10/12, 7/12


def test_program_years_are_counted_from_the_scopes_own_first_launch() -> None:
    facts = Facts(
        departments=[launch("em", "2019-06-01", 10), launch("icu", "2020-01-01", 10)],
        interactions=[
            interaction("r1", "2020-02-01", department="icu"),
            interaction("r2", "2020-12-31", department="icu"),
            interaction("r3", "2021-01-01", department="icu"),
        ],
    )
    assert figures(facts, Scope(A, "icu"))["maintenance"]["interactions_by_program_year"] == [2, 1]
    assert figures(facts, Scope(A))["maintenance"]["interactions_by_program_year"] == [1, 2]


def test_follow_up_interactions_count_as_interactions_but_not_as_new_outcomes() -> None:
    facts = Facts(
        departments=[launch("em", "2020-01-01", 10)],
        referrals=[referral("r1", "2020-02-01T10:00")],
        outreach=[outreach("r1", "2020-02-01T12:00", "accepted")],
        interactions=[interaction("r1", "2020-02-02", 30), interaction("r1", "2020-02-20", 90)],
    )
    answer = figures(facts)
    assert answer["reach"]["interactions"] == 2
    assert answer["reach"]["physicians_supported"] == 1
    assert answer["reach"]["minutes_mean"] == 60.0
    assert answer["adoption"]["outreach_acceptance_rate"] == 1.0
    assert answer["implementation"]["hours_to_outreach_median"] == 2.0


# --- scopes ---------------------------------------------------------------------------------


def _two_hospitals() -> Facts:
    return Facts(
        hospitals=[Hospital(A, 500), Hospital(B, 383)],
        departments=[
            launch("em", "2019-06-01", 100),
            launch("icu", "2019-09-01", 40),
            launch("em", "2020-01-01", 90, hospital=B),
        ],
        supporters=[
            supporter("s1", "2019-06-01"),
            supporter("s2", "2019-09-01", department="icu"),
            supporter("s1", "2020-01-01", hospital=B),  # the same id in another hospital
        ],
        referrals=[
            referral("r1", "2019-07-01T10:00"),
            referral("r2", "2019-10-01T10:00", department="icu"),
            referral("r1", "2020-02-01T10:00", hospital=B, matching=NO_SUPPORTER),
        ],
        outreach=[
            outreach("r1", "2019-07-02T10:00", "accepted"),
            outreach("r2", "2019-10-02T10:00", "declined", department="icu", reason="no_need"),
        ],
        interactions=[
            interaction("r1", "2019-07-03", 30),
            interaction("r1", "2019-08-03", 90),
        ],
        surveys=[survey("q1", "2020-03-01", recommend=True, hospital=B)],
    )


def test_region_scope_sums_the_hospitals() -> None:
    facts = _two_hospitals()
    region = figures(facts)
    a = figures(facts, Scope(A))
    b = figures(facts, Scope(B))
    for key in ("referrals", "interactions", "eligible_physicians", "physicians_supported"):
        assert region["reach"][key] == a["reach"][key] + b["reach"][key], key
    assert region["reach"]["eligible_physicians"] == 230
    assert region["adoption"]["hospitals_adopted"] == 2
    assert region["adoption"]["departments_launched"] == 3
    assert region["adoption"]["physician_coverage"] == rate(230, 883)
    assert region["maintenance"]["supporters_active"] == 3
    assert region["implementation"]["referrals_without_supporter"] == 1
    assert region["adoption"]["outreach_acceptance_rate"] == 0.5
    # the hospital's own period ends after its own last fact
    assert a["reach"]["monthly"][-1]["month"] == "2019-10"
    assert region["reach"]["monthly"][-1]["month"] == "2020-03"


def test_department_scope_sees_only_that_department() -> None:
    facts = _two_hospitals()
    icu = figures(facts, Scope(A, "icu"))
    assert icu["reach"]["referrals"] == 1
    assert icu["reach"]["interactions"] == 0
    assert icu["reach"]["eligible_physicians"] == 40
    assert icu["maintenance"]["supporters_active"] == 1
    assert icu["adoption"]["outreach_acceptance_rate"] == 0.0
    assert icu["implementation"]["decline_reasons"]["no_need"] == 1
    assert icu["adoption"]["physician_coverage"] == 0.08
    assert icu["reach"]["monthly"][0]["month"] == "2019-09"
    em = figures(facts, Scope(A, "em"))
    assert em["reach"]["interactions"] == 2
    assert em["adoption"]["departments_without_referrals"] == 0


def test_numeric_figures_flatten_the_numbers_and_keep_nulls() -> None:
    flat = numeric_figures(Figures.model_validate(figures(_two_hospitals())))
    assert flat["interactions"] == 2
    assert flat["reach_rate"] == rate(1, 230)
    assert flat["would_recommend_rate"] == 1.0
    assert "monthly" not in flat and "referrals_by_source" not in flat
    assert flat["helpful_rate"] is None


@pytest.mark.parametrize("scope", [REGION, Scope(A), Scope(A, "em"), Scope(B, "em")])
def test_answers_are_json_plain(scope: Scope) -> None:
    import json

    answer = figures(_two_hospitals(), scope)
    assert json.loads(json.dumps(answer)) == answer


# --- the projection's rows and the gauges (pure parts) --------------------------------------


def test_every_contract_event_but_rejections_has_a_projection() -> None:
    from services.analytics.projection import PROJECTIONS
    from shared.contracts import EVENTS

    assert set(PROJECTIONS) == set(EVENTS) - {"CommandRejected"}


def test_matching_outcomes_carry_their_stream_sequence_and_overdue_writes_nothing() -> None:
    from services.analytics import projection
    from shared.contracts import AssignmentOverdue, NoSupporterAvailable

    none = NoSupporterAvailable(hospital=A, referral_id="r1", department="em", reason="x")
    row = projection.row_of(none, 42, "evt-1")
    assert row is not None
    assert row.sql == projection.MATCHING_SQL
    assert row.args == (A, "r1", "em", NO_SUPPORTER, 42)
    overdue = AssignmentOverdue(
        hospital=A, referral_id="r1", supporter_id="s1", due_at=t("2020-01-01")
    )
    assert projection.row_of(overdue, 43, "evt-2") is None


def test_interactions_are_keyed_by_their_event_id_so_two_alike_both_count() -> None:
    from services.analytics import projection
    from shared.contracts import InteractionCompleted

    event = InteractionCompleted(
        hospital=A, referral_id="r1", supporter_id="s1", occurred_on=d("2020-01-02"), minutes=30,
        department="em",
    )  # fmt: skip
    first, second = projection.row_of(event, 1, "evt-1"), projection.row_of(event, 2, "evt-2")
    assert first is not None and second is not None
    assert first.args[1] == "evt-1" and second.args[1] == "evt-2"
    assert first.args[6] is False  # escalated, normalised


def test_gauge_snapshot_covers_region_hospitals_and_launched_departments_without_nulls() -> None:
    from services.analytics.gauges import snapshot_of

    snapshot = snapshot_of(_two_hospitals())
    interactions = dict(snapshot["interactions"])
    assert interactions == {
        ("", ""): 2.0,
        (A, ""): 2.0,
        (A, "em"): 2.0,
        (A, "icu"): 0.0,
        (B, ""): 0.0,
        (B, "em"): 0.0,
    }
    # B has no interaction: its reach_rate is 0, the helpful_rate of everyone is null.
    assert (B, "") in {labels for labels, _ in snapshot["reach_rate"]}
    assert snapshot["helpful_rate"] == []
    reasons = dict(snapshot["decline_reasons"])
    assert reasons[(A, "icu", "no_need")] == 1.0
    years = dict(snapshot["interactions_by_program_year"])
    assert years[("", "", "1")] == 2.0


# --- version 1.1: supporters_available --------------------------------------------------------


def change(
    sid: str, on: str, available: bool, seq: int = 0, *, department: str = "em"
) -> AvailabilityChange:
    return AvailabilityChange(A, sid, department, d(on), available, seq)


def _roster(*changes: AvailabilityChange) -> Facts:
    return Facts(
        hospitals=[Hospital(A, 100)],
        departments=[launch("em", "2020-01-01", 40), launch("icu", "2020-01-01", 10)],
        supporters=[
            supporter("s1", "2020-01-10"),
            supporter("s2", "2020-01-10"),
            supporter("s3", "2020-01-10", department="icu"),
            supporter("s4", "2020-01-10", retired="2020-03-01"),
        ],
        availability_changes=list(changes),
    )


def available(facts: Facts, scope: Scope = REGION, **period: str) -> int:
    return int(figures(facts, scope, **period)["implementation"]["supporters_available"])


def test_supporters_without_a_change_are_available_and_only_active_ones_count() -> None:
    facts = _roster()
    assert available(facts) == 3  # s4 retired
    assert figures(facts)["maintenance"]["supporters_active"] == 3


def test_the_latest_change_before_the_periods_end_decides() -> None:
    facts = _roster(
        change("s1", "2020-02-01", False, 1),
        change("s1", "2020-04-01", True, 2),
        change("s3", "2020-02-15", False, 3, department="icu"),
    )
    # A change (or retirement) on the end day is not before the end.
    assert available(facts, period_to="2020-02-01") == 4
    assert available(facts, period_to="2020-03-01") == 2  # s1 and s3 paused, s4 not yet retired
    assert available(facts, period_to="2020-04-02") == 2  # s1 back, s4 retired
    assert available(facts) == 2
    # Per department: the change counts where the supporter is.
    assert available(facts, Scope(A, "icu")) == 0
    assert available(facts, Scope(A, "em")) == 2


def test_latest_is_by_changed_on_then_stream_order_whatever_the_row_order() -> None:
    later_in_stream_but_earlier_date = [
        change("s1", "2020-03-01", False, 5),
        change("s1", "2020-02-01", True, 9),
    ]
    assert available(_roster(*later_in_stream_but_earlier_date)) == 2
    same_day = [change("s1", "2020-02-01", False, 7), change("s1", "2020-02-01", True, 6)]
    assert available(_roster(*same_day)) == 2
    assert available(_roster(*reversed(same_day))) == 2


def test_a_retired_or_closed_departments_supporter_is_not_available() -> None:
    facts = _roster(change("s4", "2020-02-01", True, 1))
    assert available(facts) == 3
    closed = Facts(
        hospitals=[Hospital(A, 100)],
        departments=[launch("em", "2020-01-01", 40, closed="2020-06-01")],
        supporters=[supporter("s1", "2020-01-10")],
    )
    assert available(closed, period_to="2020-05-01") == 1
    assert available(closed) == 0


def test_changed_on_is_a_business_date_of_the_scope() -> None:
    facts = _roster(change("s1", "2021-05-05", False, 1))
    answer = figures(facts)
    assert answer["implementation"]["supporters_available"] == 2
    # Without `to` the period ends after the last business date: the change's day.
    assert answer["reach"]["monthly"][-1]["month"] == "2021-05"


def test_availability_changes_are_kept_by_event_and_a_policy_writes_nothing() -> None:
    from services.analytics import projection
    from shared.contracts import MatchingPolicySet, SupporterAvailabilityChanged

    event = SupporterAvailabilityChanged(
        hospital=A, supporter_id="s1", available=False, max_open_assignments=2,
        changed_on=d("2020-02-01"), department="em",
    )  # fmt: skip
    row = projection.row_of(event, 7, "evt-7")
    assert row is not None and row.sql == projection.AVAILABILITY_SQL
    assert row.args == (A, "evt-7", "s1", "em", d("2020-02-01"), False, 7)
    policy = MatchingPolicySet(hospital=A, policy="other_department")
    assert projection.row_of(policy, 8, "evt-8") is None


def test_the_gauge_of_supporters_available() -> None:
    from services.analytics.gauges import snapshot_of

    snapshot = snapshot_of(_roster(change("s3", "2020-02-01", False, 1, department="icu")))
    assert dict(snapshot["supporters_available"]) == {
        ("", ""): 2.0,
        (A, ""): 2.0,
        (A, "em"): 2.0,
        (A, "icu"): 0.0,
    }


# --- issue 15: the region's figures from aggregates (store.py) ------------------------------


def test_the_median_of_counted_values_is_the_median_of_the_values() -> None:
    import random
    from collections import Counter

    from services.analytics import reaim
    from services.analytics.store import median_of_counts

    rng = random.Random(15)
    assert median_of_counts({}) is None
    for _ in range(300):
        values = [rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
        assert median_of_counts(dict(Counter(values))) == reaim.median(values), values


def test_a_region_period_from_its_span_is_the_period_of_its_facts() -> None:
    from services.analytics import reaim

    facts = _two_hospitals()
    span = facts.business_span()
    for start, end in [(None, None), (d("2020-01-01"), None), (None, d("2020-02-01"))]:
        assert reaim.period_from_span(span, start, end) == reaim.period_of(facts, start, end)
    assert reaim.period_from_span(None, None, None) == reaim.Period(None, None)
    late = d("2031-01-01")
    assert reaim.period_from_span(span, late, None) == reaim.Period(late, late)
