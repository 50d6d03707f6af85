"""The load generator's pure parts: the seeded mix, the expected RE-AIM figures computed from
the commands sent, percentiles, pacing, and the exactly-once count of answers."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from postctl.load import (
    FLOW_WEIGHTS,
    NOT_LAUNCHED,
    UNSTAFFED_DEPARTMENT,
    EventLog,
    LoadConfig,
    LoadRun,
    Mix,
    Pacer,
    Planned,
    RecordsStep,
    Sent,
    expected_reaim,
    figure_mismatches,
    percentile,
)
from shared.contracts import (
    COMMANDS,
    LaunchDepartment,
    Rank,
    RecordInteraction,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    Rejected,
    RequestReferral,
    SubmitSurveyResponse,
    parse_payload,
)

# --- the mix ----------------------------------------------------------------------------------


def _flows(mix: Mix, n: int) -> list[Any]:
    return [mix.next_flow() for _ in range(n)]


def test_the_same_seed_gives_the_same_mix() -> None:
    a, b = Mix(5, 3, "t"), Mix(5, 3, "t")
    assert a.setup() == b.setup()
    assert _flows(a, 300) == _flows(b, 300)
    assert _flows(Mix(6, 3, "t"), 50) != _flows(Mix(5, 3, "t"), 50)


def test_the_roster_comes_in_the_order_it_must_be_handled() -> None:
    setup = Mix(1, 2, "t").setup()
    for hospital in ("load-t-0", "load-t-1"):
        types = [p.command_type for p in setup if p.hospital == hospital]
        assert types[0] == "RegisterHospital"
        last_launch = max(i for i, t in enumerate(types) if t == "LaunchDepartment")
        first_supporter = types.index("RegisterSupporter")
        assert last_launch < first_supporter
    assert all(not p.rejected for p in setup)


def test_the_flows_follow_the_known_weights() -> None:
    mix = Mix(2, 3, "t")
    mix.setup()
    kinds = Counter(f.kind for f in _flows(mix, 6000))
    total = sum(FLOW_WEIGHTS.values())
    for kind, weight in FLOW_WEIGHTS.items():
        # A repeat needs an earlier command to repeat: the first few flows become surveys.
        assert abs(kinds[kind] / 6000 - weight / total) < 0.025, (kind, kinds)


def _build(flow: Any, supporter: str = "s0-0") -> list[Planned]:
    out = [flow.first]
    for step in flow.records:
        out.append(step.build(flow.hospital, flow.referral_id, supporter))
    return out


def test_every_planned_command_is_valid_except_those_meant_to_be_refused() -> None:
    mix = Mix(3, 3, "t")
    planned = mix.setup()
    for flow in _flows(mix, 2000):
        planned += _build(flow)
    reasons: Counter[str] = Counter()
    for p in planned:
        try:
            parse_payload(COMMANDS[p.command_type], p.data)
        except Rejected as rejected:
            assert p.reason == rejected.reason_code == "unknown_field", p
            reasons[rejected.reason_code] += 1
        else:
            assert p.reason != "unknown_field", p
    assert reasons["unknown_field"] > 0
    refused = Counter(p.reason for p in planned if p.rejected)
    assert set(refused) == {"unknown_field", "unknown_department", "not_assigned_supporter"}


def test_a_refused_referral_names_a_department_never_launched() -> None:
    mix = Mix(4, 2, "t")
    launched = {p.data["department"] for p in mix.setup() if p.command_type == "LaunchDepartment"}
    flows = [f for f in _flows(mix, 1000) if f.kind == "unknown_department"]
    assert flows
    for flow in flows:
        assert flow.first.data["department"] == NOT_LAUNCHED not in launched
        assert not flow.records and flow.first.reason == "unknown_department"


def test_records_come_after_their_referral_in_business_time_and_never_in_the_future() -> None:
    mix = Mix(7, 3, "t")
    mix.setup()
    today = datetime.now(UTC)
    for flow in _flows(mix, 2000):
        if flow.kind != "referral":
            continue
        requested = datetime.fromisoformat(flow.first.data["requested_at"])
        assert requested < today
        previous = requested
        for step in flow.records:
            when = step.at if step.kind == "outreach" else None
            if step.kind == "interaction":
                assert step.occurred_on is not None
                when = datetime.combine(step.occurred_on, datetime.min.time(), tzinfo=UTC)
                # A day later at least: no interaction's day starts before the record before it.
                assert when > previous
            assert when is not None and previous <= when < today
            previous = when
        if flow.department == UNSTAFFED_DEPARTMENT:
            assert not flow.records


def test_a_records_step_by_the_wrong_supporter_must_be_refused() -> None:
    at = datetime(2024, 3, 1, tzinfo=UTC)
    right = RecordsStep("outreach", at=at).build("h", "r1", "s1")
    wrong = RecordsStep("outreach", supporter="other", at=at).build("h", "r1", "s2")
    assert (right.expect, right.reason) == ("OutreachAccepted", None)
    assert (wrong.expect, wrong.reason) == ("CommandRejected", "not_assigned_supporter")
    declined = RecordsStep("outreach", outcome="declined", at=at, decline_reason="privacy")
    assert declined.build("h", "r1", "s1").expect == "OutreachDeclined"


def test_a_repeat_repeats_an_earlier_command_exactly_and_counts_for_nothing() -> None:
    mix = Mix(9, 1, "t")
    mix.setup()
    flows = _flows(mix, 500)
    repeats = [f for f in flows if f.kind == "repeat"]
    assert repeats
    originals = {json.dumps(f.first.data, sort_keys=True) for f in flows if f.kind != "repeat"}
    for flow in repeats:
        assert flow.first.repeat and not flow.first.counts
        assert json.dumps(flow.first.data, sort_keys=True) in originals


# --- the expected RE-AIM figures --------------------------------------------------------------

H = "h"
T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)


def ok(command: Any, expect: str = "x", **kw: Any) -> Planned:
    return Planned(H, command.type_name, command.to_data(), expect, **kw)


def _referral(n: int, physician: str, source: str, department: str = "em", **kw: Any) -> Planned:
    return ok(
        RequestReferral(
            referral_id=f"r{n}",
            physician_id=physician,
            department=department,
            rank=Rank.resident,
            source=source,  # type: ignore[arg-type]
            event_nature="other",
            requested_at=T0 + timedelta(days=n),
        ),
        **kw,
    )


def _outreach(n: int, outcome: str, hours: float, reason: str | None = None) -> Planned:
    return ok(
        RecordOutreach(
            referral_id=f"r{n}",
            supporter_id="s1",
            outcome=outcome,  # type: ignore[arg-type]
            at=T0 + timedelta(days=n, hours=hours),
            decline_reason=reason,  # type: ignore[arg-type]
        )
    )


def _interaction(n: int, day: int, minutes: int, escalated: bool = False) -> Planned:
    return ok(
        RecordInteraction(
            referral_id=f"r{n}",
            supporter_id="s1",
            occurred_on=(T0 + timedelta(days=n + day)).date(),
            minutes=minutes,
            escalated=escalated,
        )
    )


def _survey(n: int, aware: bool, had: bool, helpful: int | None, recommend: bool | None) -> Planned:
    return ok(
        SubmitSurveyResponse(
            response_id=f"q{n}",
            department="em",
            submitted_on=date(2024, 4, 1),
            aware=aware,
            had_interaction=had,
            helpful=helpful,
            wellbeing_improved=True if had else None,
            comfort_improved=(n % 2 == 0) if had else None,
            would_recommend=recommend,
        )
    )


def _history() -> list[Planned]:
    return [
        ok(RegisterHospital(name="H", physician_count=400)),
        ok(LaunchDepartment(department="em", physician_count=100, launched_on=date(2024, 1, 1))),
        ok(LaunchDepartment(department="icu", physician_count=50, launched_on=date(2024, 1, 2))),
        ok(LaunchDepartment(department="rad", physician_count=30, launched_on=date(2024, 1, 3))),
        ok(
            RegisterSupporter(
                supporter_id="s1",
                department="em",
                rank=Rank.senior,
                interventional=True,
                trained_on=date(2024, 1, 1),
            )
        ),
        ok(
            RegisterSupporter(
                supporter_id="s2",
                department="icu",
                rank=Rank.senior,
                interventional=True,
                trained_on=date(2024, 1, 1),
            )
        ),
        # r1: accepted after 10 h, two interactions (one escalated).
        _referral(1, "p1", "self"),
        _outreach(1, "accepted", 10),
        _interaction(1, 2, 30),
        _interaction(1, 5, 45, escalated=True),
        # r2: declined after 50 h (past the 48 hours), for privacy.
        _referral(2, "p2", "third_party"),
        _outreach(2, "declined", 50, "privacy"),
        # r3: unreachable first (not in the acceptance rate), no more.
        _referral(3, "p3", "third_party"),
        _outreach(3, "unreachable", 20),
        # r4: an interaction first: accepted at the start of that day; the same physician as r1.
        _referral(4, "p1", "safety_event"),
        _interaction(4, 1, 60),
        # r5: in a department without any supporter: NoSupporterAvailable; no record.
        _referral(5, "p5", "self", department="rad"),
        # Refused and repeated commands count for nothing.
        _referral(6, "p6", "self", expect="CommandRejected", reason="unknown_department"),
        _referral(1, "p1", "self", repeat=True),
        replace(
            _outreach(1, "declined", 1, "other"),
            expect="CommandRejected",
            reason="not_assigned_supporter",
        ),
        _survey(1, aware=True, had=True, helpful=5, recommend=True),
        _survey(2, aware=True, had=True, helpful=3, recommend=False),
        _survey(3, aware=True, had=False, helpful=None, recommend=True),
        _survey(4, aware=False, had=False, helpful=None, recommend=None),
    ]


def test_expected_figures_follow_the_contract_definitions() -> None:
    figures = expected_reaim(_history())[H]
    reach, effect = figures["reach"], figures["effectiveness"]
    adoption, impl = figures["adoption"], figures["implementation"]
    assert reach["supporters_trained"] == 2
    assert reach["referrals"] == 5
    assert reach["referrals_by_source"] == {"self": 2, "third_party": 2, "safety_event": 1}
    assert reach["interactions"] == 3
    assert reach["interactions_by_department"] == {"em": 3}
    assert reach["physicians_supported"] == 1  # p1, twice
    assert reach["eligible_physicians"] == 180
    assert reach["reach_rate"] == 0.0056  # 1/180 = 0.005555...
    assert (reach["minutes_min"], reach["minutes_max"]) == (30, 60)
    assert (reach["minutes_mean"], reach["minutes_median"]) == (45.0, 45.0)
    assert effect["respondents_with_interaction"] == 2
    assert effect["helpful_rate"] == 0.5
    assert effect["wellbeing_improved_rate"] == 1.0
    assert effect["comfort_improved_rate"] == 0.5  # q2 only
    assert effect["escalation_rate"] == 0.3333
    # First outcomes: r1 accepted, r2 declined, r3 unreachable (left out), r4 accepted.
    assert adoption["outreach_acceptance_rate"] == 0.6667
    assert adoption["would_recommend_rate"] == 0.6667  # 2 of the 3 aware
    assert adoption["departments_launched"] == 3
    assert adoption["departments_without_referrals"] == 1  # icu
    assert adoption["physician_coverage"] == 0.45  # 180 / 400
    # Delays: r1 10 h, r2 50 h, r3 20 h, r4 15 h (midnight of the next day from 09:00).
    assert impl["outreach_within_48h_rate"] == 0.75
    assert impl["hours_to_outreach_median"] == 17.5
    assert impl["referrals_without_supporter"] == 1
    assert impl["decline_reasons"] == {"privacy": 1}
    assert impl["physicians_per_active_supporter"] == 90.0
    assert figures["maintenance"]["supporters_active"] == 2


def test_rates_round_half_up_to_four_places() -> None:
    history = [
        ok(LaunchDepartment(department="em", physician_count=32, launched_on=date(2024, 1, 1))),
        _referral(1, "p1", "self"),
        _interaction(1, 1, 10),
    ]
    # 1/32 = 0.03125: half up gives 0.0313 where round-half-even would give 0.0312.
    assert expected_reaim(history)[H]["reach"]["reach_rate"] == 0.0313


def test_a_hospital_with_nothing_but_refusals_has_no_figures() -> None:
    refused = _referral(1, "p1", "self", expect="CommandRejected", reason="unknown_hospital")
    assert expected_reaim([refused]) == {}


def test_figure_mismatches_ignore_zero_counts_in_breakdowns() -> None:
    expected = {"reach": {"referrals": 3, "referrals_by_source": {"self": 3}}}
    same = {"reach": {"referrals": 3, "referrals_by_source": {"self": 3, "third_party": 0}}}
    assert figure_mismatches(expected, same) == []
    other = {"reach": {"referrals": 4, "referrals_by_source": {"self": 3}}}
    assert figure_mismatches(expected, other) == ["reach.referrals: expected 3, got 4"]
    assert figure_mismatches(expected, {}) == [
        "reach.referrals: expected 3, got '<missing>'",
        "reach.referrals_by_source: expected {'self': 3}, got '<missing>'",
    ]


# --- percentiles and pacing -------------------------------------------------------------------


def test_percentiles_interpolate_between_the_closest_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_the_pacer_spaces_sends_and_saves_no_burst_while_idle() -> None:
    pacer = Pacer(rate=10)
    assert pacer.reserve(100.0) == 0.0
    assert pacer.reserve(100.0) == pytest.approx(0.1)
    assert pacer.reserve(100.0) == pytest.approx(0.2)
    # Idle for a while: the next send goes at once, the one after waits its turn again.
    assert pacer.reserve(200.0) == 0.0
    assert pacer.reserve(200.0) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        Pacer(0)


# --- counting answers exactly once ------------------------------------------------------------


class _FakeNats:
    is_connected = True

    def jetstream(self) -> None:
        return None


def _msg(seq: int, event_id: str, type_: str, cause: str, **data: Any) -> SimpleNamespace:
    body = {"id": event_id, "type": type_, "causationid": cause, "data": data}
    return SimpleNamespace(
        subject=f"post.{H}.evt.{type_}",
        data=json.dumps(body).encode(),
        metadata=SimpleNamespace(
            sequence=SimpleNamespace(stream=seq),
            timestamp=T0 + timedelta(seconds=seq),
        ),
    )


def _run_with(answers: list[SimpleNamespace], sent: list[Planned]) -> LoadRun:
    run = LoadRun("nats://unused", LoadConfig(hospitals=1, tag="t"))
    run.log = EventLog(_FakeNats(), [H], start_seq=1)  # type: ignore[arg-type]
    for i, p in enumerate(sent):
        run.sent.append(Sent(p, f"c{i}", "subject", b"{}", T0, published=True))
    for msg in answers:
        run.log._take(msg)  # type: ignore[arg-type]
    return run


def test_an_answer_read_again_after_the_consumer_was_recreated_counts_once() -> None:
    planned = [Planned(H, "RequestReferral", {}, "ReferralCreated")]
    answer = _msg(5, "e1", "ReferralCreated", "c0")
    report = _run_with([answer, answer], planned).verify()
    assert report.ok and report.answered == 1 and report.stored_twice == 0
    assert report.latency_ms["p50"] == 5000.0


def test_a_second_answer_or_a_wrong_one_or_none_is_reported() -> None:
    planned = [
        Planned(H, "RequestReferral", {}, "ReferralCreated"),
        Planned(H, "RecordOutreach", {}, "CommandRejected", reason="not_assigned_supporter"),
        Planned(H, "SubmitSurveyResponse", {}, "SurveyResponseRecorded"),
        Planned(H, "RecordInteraction", {}, "InteractionCompleted"),
    ]
    answers = [
        _msg(1, "e1", "ReferralCreated", "c0"),
        _msg(2, "e2", "ReferralCreated", "c0"),  # doubled
        _msg(3, "e3", "CommandRejected", "c1", reason_code="invalid_transition"),  # wrong one
        _msg(4, "e4", "SurveyResponseRecorded", "c2"),
        _msg(9, "e4", "SurveyResponseRecorded", "c2"),  # the same event stored twice
    ]
    report = _run_with(answers, planned).verify()
    assert not report.ok
    assert len(report.doubled) == 1 and report.doubled[0].startswith("RequestReferral c0")
    assert len(report.unexpected) == 1 and "invalid_transition" in report.unexpected[0]
    assert report.missing == ["RecordInteraction c3"]
    assert report.stored_twice == 1
    assert report.rejected == 1


def test_the_assignment_of_a_referral_is_what_its_records_wait_for() -> None:
    run = _run_with(
        [
            _msg(1, "e1", "SupporterAssigned", "x", referral_id="r1", supporter_id="s1"),
            _msg(2, "e2", "NoSupporterAvailable", "y", referral_id="r2"),
        ],
        [],
    )
    assert run.log is not None
    assert run.log.assignment[(H, "r1")] == ("SupporterAssigned", "s1")
    assert run.log.assignment[(H, "r2")] == ("NoSupporterAvailable", None)
