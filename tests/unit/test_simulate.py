"""The simulators' scenarios, checked from the data alone (no servers).

The POST replay must hold the paper's figures exactly as CONTRACT.md defines them; the region
must be repeatable for a seed and only send what the contract accepts.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from postctl import paper
from postctl.simulate import (
    STUDY_END,
    STUDY_START,
    ReferralPlan,
    Scenario,
    add_months,
    close_department,
    launch_department,
    post_2023_scenario,
    record_interaction,
    record_outreach,
    region_scenario,
    register_hospital,
    register_supporter,
    request_referral,
    retire_supporter,
    set_matching_policy,
    set_supporter_availability,
    submit_survey_response,
)
from shared.contracts import ID_PATTERN, Command, parse_payload

POST = post_2023_scenario()
ID = re.compile(ID_PATTERN)


# --- figures computed from a scenario, as CONTRACT.md defines them (region scope, no period) ---


def _start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def first_record(referral: ReferralPlan) -> tuple[datetime, str] | None:
    """The earliest record; an interaction counts as accepted at the start of its day."""
    records = [(o.at, o.outcome) for o in referral.outreach]
    records += [(_start(i.occurred_on), "accepted") for i in referral.interactions]
    return min(records) if records else None


def reaim(scenario: Scenario) -> dict[str, Any]:
    end = max(scenario.business_dates()) + timedelta(days=1)  # the period ends after the last fact
    first_launch = min(d.launched_on for d in scenario.departments)
    interactions = [(r, i) for r in scenario.referrals for i in r.interactions]
    months = (end.year - first_launch.year) * 12 + end.month - first_launch.month
    months += 1 if end.day > 1 else 0
    monthly = Counter((i.occurred_on.year, i.occurred_on.month) for _, i in interactions)
    counts = [
        monthly[(add_months(first_launch.replace(day=1), k).year,
                 add_months(first_launch.replace(day=1), k).month)]
        for k in range(months)
    ]  # fmt: skip
    minutes = [i.minutes for _, i in interactions]
    by_department = Counter(r.department for r, _ in interactions)
    for d in scenario.departments:
        by_department.setdefault(d.department, 0)
    years: list[int] = []
    while (start := add_months(first_launch, 12 * len(years))) < end:
        stop = add_months(first_launch, 12 * (len(years) + 1))
        years.append(sum(1 for _, i in interactions if start <= i.occurred_on < stop))
    launched = [d for d in scenario.departments if d.launched_on < end]
    open_departments = [d for d in launched if d.closed_on is None or d.closed_on >= end]
    eligible = sum(d.physician_count for d in open_departments)
    trained = [s for s in scenario.supporters if s.trained_on < end]
    active = [s for s in trained if s.retired_on is None or s.retired_on >= end]
    firsts = [f for r in scenario.referrals if (f := first_record(r)) is not None]
    accepted = sum(1 for _, outcome in firsts if outcome == "accepted")
    declined = sum(1 for _, outcome in firsts if outcome == "declined")
    with_interaction = [s for s in scenario.surveys if s.had_interaction]
    aware = [s for s in scenario.surveys if s.aware]
    referred = {(r.hospital, r.department) for r in scenario.referrals}

    def rate(n: int, d: int) -> float:
        return round(n / d, 4)

    return {
        "reach": {
            "supporters_trained": len(trained),
            "interactions": len(interactions),
            "interactions_by_department": dict(by_department),
            "eligible_physicians": eligible,
            "monthly": [{"interactions": c} for c in counts],
            "monthly_mean": round(statistics.mean(counts), 1),
            "monthly_median": float(statistics.median(counts)),
            "monthly_min": min(counts),
            "monthly_max": max(counts),
            "minutes_mean": round(statistics.mean(minutes), 1),
            "minutes_median": float(statistics.median(minutes)),
            "minutes_min": min(minutes),
            "minutes_max": max(minutes),
        },
        "effectiveness": {
            "respondents_with_interaction": len(with_interaction),
            "helpful_rate": rate(
                sum(1 for s in with_interaction if (s.helpful or 0) >= 4), len(with_interaction)
            ),
            "wellbeing_improved_rate": rate(
                sum(1 for s in with_interaction if s.wellbeing_improved), len(with_interaction)
            ),
            "comfort_improved_rate": rate(
                sum(1 for s in with_interaction if s.comfort_improved), len(with_interaction)
            ),
        },
        "adoption": {
            "hospitals_adopted": len({d.hospital for d in launched}),
            "departments_launched": len(launched),
            "physician_coverage": rate(
                eligible, sum(h.physician_count for h in scenario.hospitals)
            ),
            "outreach_acceptance_rate": rate(accepted, accepted + declined),
            "would_recommend_rate": rate(sum(1 for s in aware if s.would_recommend), len(aware)),
            "departments_without_referrals": sum(
                1 for d in launched if (d.hospital, d.department) not in referred
            ),
        },
        "maintenance": {
            "supporters_active": len(active),
            "supporter_retention_rate": rate(len(active), len(trained)),
            "departments_active_rate": rate(len(open_departments), len(launched)),
            "interactions_by_program_year": years,
            "monthly_rate_by_program_year": [round(c / 12, 1) for c in years],
        },
    }


def commands(scenario: Scenario) -> list[Command]:
    """Every command the driver would send (with a stand-in supporter for records)."""
    out: list[Command] = [register_hospital(h) for h in scenario.hospitals]
    out += [launch_department(d) for d in scenario.departments]
    out += [close_department(d) for d in scenario.departments if d.closed_on]
    out += [register_supporter(s) for s in scenario.supporters]
    out += [retire_supporter(s) for s in scenario.supporters if s.retired_on]
    for r in scenario.referrals:
        out.append(request_referral(r))
        out += [record_outreach(r, o, "sup-x") for o in r.outreach]
        out += [record_interaction(r, i, "sup-x") for i in r.interactions]
    out += [submit_survey_response(s) for s in scenario.surveys]
    out += [set_matching_policy(p) for p in scenario.policies]
    out += [set_supporter_availability(a) for a in scenario.availability]
    return out


# --- the POST study: every published figure, from the data ----------------------------------


def test_post_reach_interactions_by_department_and_year() -> None:
    figures = reaim(POST)
    reach = figures["reach"]
    assert reach["interactions"] == 306
    by_department = reach["interactions_by_department"]
    assert by_department["emergency-medicine"] == 213
    assert by_department["anesthesia"] + by_department["icu"] == 49
    assert by_department["hospitalists"] == 22
    others = dict(by_department)
    for k in ("emergency-medicine", "anesthesia", "icu", "hospitalists"):
        others.pop(k)
    assert sum(others.values()) == 22
    assert sorted(others.values()).count(0) == 3
    assert figures["maintenance"]["interactions_by_program_year"] == [73, 109, 124]
    assert figures["maintenance"]["monthly_rate_by_program_year"] == [6.1, 9.1, 10.3]


def test_post_monthly_counts_over_the_36_months() -> None:
    reach = reaim(POST)["reach"]
    assert len(reach["monthly"]) == 36
    assert reach["monthly_median"] == 8.0
    assert (reach["monthly_min"], reach["monthly_max"]) == (1, 27)
    assert reach["monthly_mean"] == 8.5


def test_post_interaction_lengths() -> None:
    minutes = [i.minutes for r in POST.referrals for i in r.interactions]
    assert sum(minutes) == 68 * 306  # a mean of exactly 68
    assert statistics.median(minutes) == 60
    assert (min(minutes), max(minutes)) == (10, 180)


def test_post_outreach_40_of_which_32_accepted_and_8_declined() -> None:
    outreach = [o for r in POST.referrals for o in r.outreach]
    assert len(outreach) == 40
    assert Counter(o.outcome for o in outreach) == {"accepted": 32, "declined": 8}
    assert all(o.decline_reason for o in outreach if o.outcome == "declined")
    # No referral starts with an interaction: an implied acceptance would move the rate off 0.8.
    assert all(r.outreach for r in POST.referrals)
    assert all(not r.interactions for r in POST.referrals if r.outreach[0].outcome == "declined")
    assert reaim(POST)["adoption"]["outreach_acceptance_rate"] == 0.8


def test_post_survey() -> None:
    surveys = POST.surveys
    assert len(surveys) == 75
    aware = [s for s in surveys if s.aware]
    had = [s for s in surveys if s.had_interaction]
    assert len(aware) == 66
    assert len(had) == 32 and all(s.aware for s in had)
    assert sum(1 for s in had if (s.helpful or 0) >= 4) == 31
    assert sum(1 for s in had if s.wellbeing_improved) == 27
    assert sum(1 for s in had if s.comfort_improved) == 24
    assert sum(1 for s in aware if s.would_recommend) == 55
    # Every aware respondent answers would_recommend, so no reading of the denominator differs.
    assert all(s.would_recommend is not None for s in aware)
    by_department = Counter(s.department for s in surveys)
    assert by_department == {
        "emergency-medicine": 31,
        "anesthesia": 20,
        "obgyn": 15,
        "icu": 5,
        "hospitalists": 4,
    }
    surveyed = sum(d.physician_count for d in POST.departments if d.department in by_department)
    assert surveyed == 255
    assert all(s.submitted_on.strftime("%Y-%m") == "2022-03" for s in surveys)


def test_post_roster_and_adoption() -> None:
    figures = reaim(POST)
    assert len(POST.hospitals) == 2
    assert sum(h.physician_count for h in POST.hospitals) == 883
    assert len(POST.departments) == 11
    assert figures["reach"]["eligible_physicians"] == 530
    assert figures["adoption"]["physician_coverage"] == 0.6002
    assert figures["adoption"]["hospitals_adopted"] == 2
    assert figures["adoption"]["departments_without_referrals"] == 3
    assert figures["reach"]["supporters_trained"] == 59
    assert figures["maintenance"]["supporters_active"] == 50
    assert figures["maintenance"]["supporter_retention_rate"] == 0.8475
    assert figures["maintenance"]["departments_active_rate"] == 1.0
    virtual = [s for s in POST.supporters if s.trained_on >= date(2020, 9, 1)]
    assert len(virtual) == 38  # the rest trained in person before the pandemic
    for hospital in POST.hospitals:
        departments = [d for d in POST.departments if d.hospital == hospital.hospital]
        assert sum(d.physician_count for d in departments) <= hospital.physician_count


def test_post_every_fact_lies_in_the_study() -> None:
    dates = POST.business_dates()
    assert min(dates) == STUDY_START == min(d.launched_on for d in POST.departments)
    # The last fact in May 2022: without a period the answer ends where the study ends.
    assert max(dates) < STUDY_END
    assert max(dates) >= date(2022, 5, 1)


def test_post_matches_every_figure_of_the_paper() -> None:
    rows = paper.compare(reaim(POST))
    assert [r.label for r in rows if not r.match] == []
    assert paper.all_match(rows)


@pytest.mark.parametrize("seed", [1, 7, 99])
def test_post_figures_do_not_depend_on_the_seed(seed: int) -> None:
    assert paper.all_match(paper.compare(reaim(post_2023_scenario(seed))))


def test_post_is_repeatable() -> None:
    assert post_2023_scenario() == POST
    assert post_2023_scenario(5) != POST  # the seed moves days and hours only


def test_post_referrals_are_plausible_and_matchable() -> None:
    launched = {(d.hospital, d.department): d.launched_on for d in POST.departments}
    for r in POST.referrals:
        assert r.requested_at.date() >= launched[(r.hospital, r.department)]
        first_outreach = r.outreach[0].at
        assert r.requested_at < first_outreach
        if r.interactions:
            assert _start(r.interactions[0].occurred_on) > first_outreach
            days = [i.occurred_on for i in r.interactions]
            assert days == sorted(days)
        supporters = [
            s
            for s in POST.supporters
            if (s.hospital, s.department) == (r.hospital, r.department)
            and s.trained_on <= r.requested_at.date()
        ]
        assert supporters, "matching needs a supporter in the department"
        assert all(s.rank.level >= r.rank.level for s in supporters)
        if r.event_nature == "interventional":
            assert all(s.interventional for s in supporters)
    hours = [(r.outreach[0].at - r.requested_at) / timedelta(hours=1) for r in POST.referrals]
    assert sum(1 for h in hours if h > 48) == 3


def test_post_ids_are_pseudonymous_and_unique_per_hospital() -> None:
    for hospital in POST.hospitals:
        h = hospital.hospital
        supporters = [s.supporter_id for s in POST.supporters if s.hospital == h]
        referrals = [r for r in POST.referrals if r.hospital == h]
        physicians = {r.physician_id for r in referrals}
        referrers = {r.referrer_id for r in referrals if r.referrer_id}
        responses = [s.response_id for s in POST.surveys if s.hospital == h]
        for ids in (supporters, [r.referral_id for r in referrals], responses):
            assert len(ids) == len(set(ids))
        assert not (physicians | referrers) & set(supporters)
        assert all(ID.match(i) for i in [*supporters, *physicians, *referrers, *responses])


def test_post_commands_are_valid_contract_payloads() -> None:
    sent = commands(POST)
    assert len(sent) == POST.command_count() == 2 + 11 + 59 + 9 + 40 + 40 + 306 + 75
    for command in sent:
        # What goes on the wire parses back strictly (no unknown field, JSON types).
        assert parse_payload(type(command), command.to_data()) == command


# --- the region ----------------------------------------------------------------------------


def test_region_is_deterministic_for_a_seed() -> None:
    assert region_scenario(4, 3, seed=11) == region_scenario(4, 3, seed=11)
    assert region_scenario(4, 3, seed=11) != region_scenario(4, 3, seed=12)


def test_region_stays_within_its_years_and_the_rules() -> None:
    start = date(2019, 6, 1)
    region = region_scenario(8, 3, seed=3, start=start)
    end = add_months(start, 36)
    dates = region.business_dates()
    assert min(dates) >= start and max(dates) < end
    departments = {(d.hospital, d.department): d for d in region.departments}
    for s in region.supporters:
        d = departments[(s.hospital, s.department)]
        assert d.launched_on <= s.trained_on
        assert s.retired_on is None or s.retired_on >= s.trained_on
    for r in region.referrals:
        d = departments[(r.hospital, r.department)]
        assert d.launched_on <= r.requested_at.date()
        assert d.closed_on is None or r.requested_at.date() < d.closed_on
        # Someone senior and interventional never retires: every referral can be matched.
        assert any(
            s.rank.value == "senior" and s.interventional and s.retired_on is None
            for s in region.supporters
            if (s.hospital, s.department) == (r.hospital, r.department)
        )
        outcomes = [o.outcome for o in r.outreach]
        assert "declined" not in outcomes[:-1]  # a declined referral records nothing more
        if outcomes and outcomes[-1] == "declined":
            assert not r.interactions and r.outreach[-1].decline_reason
    for v in region.surveys:
        if not v.had_interaction:
            assert (v.helpful, v.wellbeing_improved, v.comfort_improved) == (None, None, None)
        assert v.aware or not v.had_interaction


def test_region_has_the_situations_a_demo_shows() -> None:
    region = region_scenario(12, 4, seed=5)
    outcomes = Counter(o.outcome for r in region.referrals for o in r.outreach)
    assert outcomes["accepted"] > outcomes["declined"] > 0 and outcomes["unreachable"] > 0
    reasons = Counter(o.decline_reason for r in region.referrals for o in r.outreach)
    assert len([k for k in reasons if k]) >= 3
    assert any(not r.outreach and r.interactions for r in region.referrals)  # implied acceptance
    late = [
        r
        for r in region.referrals
        if r.outreach and r.outreach[0].at - r.requested_at > timedelta(hours=48)
    ]
    assert late
    assert any(s.retired_on for s in region.supporters)
    assert any(d.closed_on for d in region.departments)
    launches = sorted({d.launched_on for d in region.departments})
    assert launches[-1] - launches[0] > timedelta(days=365)  # departments launch over time
    assert region.surveys
    rates = reaim(region)["adoption"]["outreach_acceptance_rate"]
    assert 0.7 < rates < 0.95


def test_region_programs_set_policies_and_supporters_pause_or_cap() -> None:
    region = region_scenario(12, 4, seed=5)
    assert region.policies and {p.policy for p in region.policies} == {"same_then_other"}
    assert {a.available for a in region.availability} == {True, False}  # paused and capped
    supporters = {(s.hospital, s.supporter_id): s for s in region.supporters}
    for a in region.availability:
        s = supporters[(a.hospital, a.supporter_id)]
        assert s.trained_on <= a.changed_on < (s.retired_on or date.max)
        assert (a.max_open_assignments is None) == (not a.available)
    # The first supporter of a department, senior and interventional, never pauses.
    assert post_2023_scenario().availability == () == post_2023_scenario().policies
    assert region.command_count() == len(commands(region))


def test_region_commands_are_valid_contract_payloads() -> None:
    region = region_scenario(3, 2, seed=8)
    for command in commands(region):
        assert parse_payload(type(command), command.to_data()) == command


# --- the paper's table ---------------------------------------------------------------------


def test_compare_flags_a_wrong_or_missing_figure() -> None:
    figures = reaim(POST)
    figures["reach"]["interactions"] = 305
    del figures["maintenance"]["monthly_rate_by_program_year"]
    rows = {r.label: r for r in paper.compare(figures)}
    assert not rows["Interactions, June 2019 to May 2022"].match
    assert rows["Interactions, June 2019 to May 2022"].platform == 305
    missing = rows["Interactions per month in program year 1"]
    assert missing.platform is None and not missing.match
    assert rows["Peer supporters trained"].match
    assert not paper.all_match(list(rows.values()))


def test_format_table_shows_each_figure_and_the_verdict() -> None:
    rows = paper.compare(reaim(POST))
    table = paper.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["figure", "paper", "platform"]
    assert len(lines) == len(rows) + 3
    assert "32 of 40 (80%)" in table and "0.8" in table
    assert lines[-1] == f"{len(rows)} of {len(rows)} figures of the paper match."
    assert all(line.split("  ")[0] for line in lines[2:-1])
    assert all(" yes " in line and " NO " not in line for line in lines[2:-1])
