"""The matching rules, on the pure domain: registry, roster, assignment and the 48-hour timer."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.matching import domain
from services.matching.domain import AssignmentHistory, Candidate, ReferralToAssign
from services.matching.domain.assignment import _why_not
from shared.contracts import (
    AssignmentOverdue,
    CloseDepartment,
    DepartmentClosed,
    DepartmentLaunched,
    Event,
    HospitalRegistered,
    LaunchDepartment,
    MatchingPolicy,
    MatchingPolicySet,
    NoSupporterAvailable,
    Rank,
    ReasonCode,
    RegisterHospital,
    RegisterSupporter,
    Rejected,
    RetireSupporter,
    SetMatchingPolicy,
    SetSupporterAvailability,
    SupporterAssigned,
    SupporterAvailabilityChanged,
    SupporterRetired,
    SupporterTrained,
)

H = "general"
NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
HOSPITAL = domain.Hospital(H, "General", 500)
ED = domain.Department(H, "emergency", 40, date(2024, 1, 1))


def reason_of(excinfo: pytest.ExceptionInfo[Rejected]) -> ReasonCode:
    return excinfo.value.reason_code


# --- registry ---------------------------------------------------------------------------------


def test_register_hospital_records_it() -> None:
    events = domain.register_hospital(None, H, RegisterHospital(name="General", physician_count=5))
    assert events == [HospitalRegistered(hospital=H, name="General", physician_count=5)]
    assert domain.hospital_from(events) == domain.Hospital(H, "General", 5)


def test_register_hospital_again_identical_is_idempotent() -> None:
    cmd = RegisterHospital(name="General", physician_count=500)
    assert domain.register_hospital(HOSPITAL, H, cmd) == []


def test_register_hospital_again_different_conflicts() -> None:
    cmd = RegisterHospital(name="General", physician_count=501)
    with pytest.raises(Rejected) as exc:
        domain.register_hospital(HOSPITAL, H, cmd)
    assert reason_of(exc) == ReasonCode.conflicting_duplicate


def launch(day: date = date(2024, 1, 1), count: int = 40) -> LaunchDepartment:
    return LaunchDepartment(department="emergency", physician_count=count, launched_on=day)


def test_launch_department_needs_a_registered_hospital() -> None:
    with pytest.raises(Rejected) as exc:
        domain.launch_department(None, None, H, launch(), NOW)
    assert reason_of(exc) == ReasonCode.unknown_hospital


def test_launch_department_records_it() -> None:
    events = domain.launch_department(HOSPITAL, None, H, launch(), NOW)
    assert events == [
        DepartmentLaunched(
            hospital=H, department="emergency", physician_count=40, launched_on=date(2024, 1, 1)
        )
    ]
    assert domain.department_from(events) == ED


def test_launch_department_again_identical_is_idempotent_and_different_conflicts() -> None:
    assert domain.launch_department(HOSPITAL, ED, H, launch(), NOW) == []
    with pytest.raises(Rejected) as exc:
        domain.launch_department(HOSPITAL, ED, H, launch(count=41), NOW)
    assert reason_of(exc) == ReasonCode.conflicting_duplicate


def test_a_closed_department_cannot_relaunch() -> None:
    closed = domain.Department(H, "emergency", 40, date(2024, 1, 1), date(2024, 3, 1))
    with pytest.raises(Rejected) as exc:
        domain.launch_department(HOSPITAL, closed, H, launch(), NOW)
    assert reason_of(exc) == ReasonCode.invalid_transition


def test_dates_more_than_a_day_ahead_are_refused() -> None:
    tomorrow = (NOW + timedelta(days=1)).date()
    assert domain.launch_department(HOSPITAL, None, H, launch(day=tomorrow), NOW)
    with pytest.raises(Rejected) as exc:
        domain.launch_department(HOSPITAL, None, H, launch(day=tomorrow + timedelta(days=1)), NOW)
    assert reason_of(exc) == ReasonCode.invalid_payload
    assert "2024" not in exc.value.detail  # the detail never echoes the value


def test_close_department() -> None:
    cmd = CloseDepartment(department="emergency", closed_on=date(2024, 5, 1))
    events = domain.close_department(ED, H, cmd, NOW)
    assert events == [DepartmentClosed(hospital=H, department="emergency", closed_on=cmd.closed_on)]
    closed = domain.department_from([*domain.launch_department(HOSPITAL, None, H, launch(), NOW)])
    assert closed is not None and closed.status == "active"
    folded = domain.department_from(
        [domain.launch_department(HOSPITAL, None, H, launch(), NOW)[0], events[0]]
    )
    assert folded is not None and folded.closed_on == date(2024, 5, 1)
    assert folded.status == "closed"


@pytest.mark.parametrize(
    ("current", "closed_on", "code"),
    [
        (None, date(2024, 5, 1), ReasonCode.unknown_department),
        (
            domain.Department(H, "emergency", 40, date(2024, 1, 1), date(2024, 2, 1)),
            date(2024, 5, 1),
            ReasonCode.invalid_transition,
        ),
        (ED, date(2023, 12, 31), ReasonCode.invalid_payload),
        (ED, date(2024, 6, 10), ReasonCode.invalid_payload),
    ],
)
def test_close_department_refusals(
    current: domain.Department | None, closed_on: date, code: ReasonCode
) -> None:
    with pytest.raises(Rejected) as exc:
        domain.close_department(
            current, H, CloseDepartment(department="emergency", closed_on=closed_on), NOW
        )
    assert reason_of(exc) == code


def test_closing_on_the_launch_day_is_allowed() -> None:
    cmd = CloseDepartment(department="emergency", closed_on=date(2024, 1, 1))
    assert domain.close_department(ED, H, cmd, NOW)


# --- roster -----------------------------------------------------------------------------------


def register(
    supporter_id: str = "s1",
    department: str = "emergency",
    rank: Rank = Rank.attending,
    interventional: bool = True,
    trained_on: date = date(2024, 2, 1),
) -> RegisterSupporter:
    return RegisterSupporter(
        supporter_id=supporter_id,
        department=department,
        rank=rank,
        interventional=interventional,
        trained_on=trained_on,
    )


def test_register_supporter_records_the_training() -> None:
    events = domain.register_supporter(HOSPITAL, ED, None, H, register(), NOW)
    assert events == [
        SupporterTrained(
            hospital=H,
            supporter_id="s1",
            department="emergency",
            rank=Rank.attending,
            interventional=True,
            trained_on=date(2024, 2, 1),
        )
    ]
    supporter = domain.supporter_from(events)
    assert supporter is not None and supporter.status == "active"


def test_register_supporter_needs_hospital_and_open_department() -> None:
    with pytest.raises(Rejected) as exc:
        domain.register_supporter(None, ED, None, H, register(), NOW)
    assert reason_of(exc) == ReasonCode.unknown_hospital
    with pytest.raises(Rejected) as exc:
        domain.register_supporter(HOSPITAL, None, None, H, register(), NOW)
    assert reason_of(exc) == ReasonCode.unknown_department
    closed = domain.Department(H, "emergency", 40, date(2024, 1, 1), date(2024, 3, 1))
    with pytest.raises(Rejected) as exc:
        domain.register_supporter(HOSPITAL, closed, None, H, register(), NOW)
    assert reason_of(exc) == ReasonCode.unknown_department


def test_register_supporter_again() -> None:
    current = domain.supporter_from(
        domain.register_supporter(HOSPITAL, ED, None, H, register(), NOW)
    )
    assert domain.register_supporter(HOSPITAL, ED, current, H, register(), NOW) == []
    with pytest.raises(Rejected) as exc:
        domain.register_supporter(HOSPITAL, ED, current, H, register(rank=Rank.senior), NOW)
    assert reason_of(exc) == ReasonCode.conflicting_duplicate


def test_register_supporter_trained_in_the_future_is_refused() -> None:
    with pytest.raises(Rejected) as exc:
        domain.register_supporter(HOSPITAL, ED, None, H, register(trained_on=date(2024, 6, 3)), NOW)
    assert reason_of(exc) == ReasonCode.invalid_payload


def trained(**kwargs: object) -> domain.Supporter:
    supporter = domain.supporter_from(
        domain.register_supporter(HOSPITAL, ED, None, H, register(**kwargs), NOW)  # type: ignore[arg-type]
    )
    assert supporter is not None
    return supporter


def test_retire_supporter_names_their_department() -> None:
    events = domain.retire_supporter(
        trained(), H, RetireSupporter(supporter_id="s1", retired_on=date(2024, 5, 1)), NOW
    )
    assert events == [
        SupporterRetired(
            hospital=H, supporter_id="s1", retired_on=date(2024, 5, 1), department="emergency"
        )
    ]


@pytest.mark.parametrize(
    ("retired", "retired_on", "code"),
    [
        (None, date(2024, 5, 1), ReasonCode.unknown_supporter),
        ("already", date(2024, 5, 1), ReasonCode.invalid_transition),
        ("active", date(2024, 1, 31), ReasonCode.invalid_payload),
        ("active", date(2024, 6, 5), ReasonCode.invalid_payload),
    ],
)
def test_retire_supporter_refusals(retired: str | None, retired_on: date, code: ReasonCode) -> None:
    current = None
    if retired == "active":
        current = trained()
    elif retired == "already":
        current = domain.Supporter(
            H, "s1", "emergency", Rank.attending, True, date(2024, 2, 1), date(2024, 3, 1)
        )
    with pytest.raises(Rejected) as exc:
        domain.retire_supporter(
            current, H, RetireSupporter(supporter_id="s1", retired_on=retired_on), NOW
        )
    assert reason_of(exc) == code


def test_roster_from_folds_every_stream_in_order() -> None:
    events = [
        HospitalRegistered(hospital=H, name="General", physician_count=500),
        DepartmentLaunched(
            hospital=H, department="emergency", physician_count=40, launched_on=date(2024, 1, 1)
        ),
        SupporterTrained(
            hospital=H,
            supporter_id="s1",
            department="emergency",
            rank=Rank.senior,
            interventional=False,
            trained_on=date(2024, 2, 1),
        ),
        SupporterRetired(
            hospital=H, supporter_id="s1", retired_on=date(2024, 4, 1), department="emergency"
        ),
        DepartmentClosed(hospital=H, department="emergency", closed_on=date(2024, 5, 1)),
        SupporterAssigned(
            hospital=H,
            referral_id="r1",
            supporter_id="s1",
            department="emergency",
            assigned_at=NOW,
            due_at=NOW + timedelta(hours=48),
            reason="matched",
        ),
    ]
    roster = domain.roster_from(events)
    assert roster.hospitals == {H: HOSPITAL}
    assert roster.departments[(H, "emergency")].closed_on == date(2024, 5, 1)
    assert roster.supporters[(H, "s1")].retired_on == date(2024, 4, 1)
    assert roster.assignments[(H, "r1")].current == "s1"


@pytest.mark.parametrize(
    ("physicians", "supporters", "ratio", "meets"),
    [(40, 4, 10.0, True), (41, 4, 10.3, False), (0, 0, None, False), (21, 2, 10.5, False)],
)
def test_physicians_per_supporter(
    physicians: int, supporters: int, ratio: float | None, meets: bool
) -> None:
    assert domain.physicians_per_supporter(physicians, supporters) == ratio
    assert domain.meets_ratio(ratio) is meets


def test_ratio_rounds_half_up() -> None:
    assert domain.physicians_per_supporter(1, 4) == 0.3  # 0.25 -> 0.3
    assert domain.physicians_per_supporter(201, 20) == 10.1  # 10.05 -> 10.1


# --- assignment -------------------------------------------------------------------------------


def referral(**kwargs: object) -> ReferralToAssign:
    values: dict[str, object] = {
        "hospital": H,
        "referral_id": "r1",
        "department": "emergency",
        "physician_id": "p1",
        "rank": Rank.resident,
        "event_nature": "other",
        "requested_at": NOW,
    }
    values.update(kwargs)
    return ReferralToAssign(**values)  # type: ignore[arg-type]


def cand(supporter_id: str, **kwargs: object) -> Candidate:
    values: dict[str, object] = {
        "supporter_id": supporter_id,
        "department": "emergency",
        "rank": Rank.attending,
        "interventional": True,
        "active": True,
        "open_assignments": 0,
    }
    values.update(kwargs)
    return Candidate(**values)  # type: ignore[arg-type]


def choose(r: ReferralToAssign, cs: list[Candidate], **kwargs: object) -> domain.Choice:
    kwargs.setdefault("department_open", True)
    return domain.choose_supporter(r, cs, **kwargs)  # type: ignore[arg-type]


def test_fewest_open_assignments_first() -> None:
    choice = choose(referral(), [cand("a", open_assignments=2), cand("b", open_assignments=1)])
    assert choice == domain.Choice("b", "matched")


def test_then_fewest_assignments_in_the_365_days_before_the_request() -> None:
    a = cand("a", assigned_requested_at=(NOW - timedelta(days=10), NOW - timedelta(days=20)))
    b = cand("b", assigned_requested_at=(NOW - timedelta(days=5),))
    assert choose(referral(), [a, b]).supporter_id == "b"


def test_the_window_is_365_days_up_to_the_request() -> None:
    # Old ones (more than 365 days before) and later ones (after the request) do not count.
    old = NOW - timedelta(days=365)
    later = NOW + timedelta(days=1)
    a = cand("a", assigned_requested_at=(old, later, later))
    b = cand("b", assigned_requested_at=(NOW - timedelta(days=364),))
    assert domain.recent_assignments(a, NOW) == 0
    assert domain.recent_assignments(b, NOW) == 1
    assert choose(referral(), [b, a]).supporter_id == "a"


def test_then_supporter_id() -> None:
    assert choose(referral(), [cand("b"), cand("a"), cand("c")]).supporter_id == "a"


def test_never_the_physician_or_the_referrer() -> None:
    r = referral(physician_id="a", referrer_id="b")
    assert choose(r, [cand("a"), cand("b"), cand("c", open_assignments=9)]).supporter_id == "c"


def test_rank_at_least_the_physicians() -> None:
    r = referral(rank=Rank.attending)
    cs = [cand("a", rank=Rank.fellow), cand("b", rank=Rank.senior, open_assignments=3)]
    assert choose(r, cs).supporter_id == "b"


def test_interventional_only_when_the_event_was() -> None:
    cs = [cand("a", interventional=False), cand("b", open_assignments=1)]
    assert choose(referral(event_nature="interventional"), cs).supporter_id == "b"
    assert choose(referral(event_nature="other"), cs).supporter_id == "a"


def test_other_departments_retired_and_closed_departments_are_out() -> None:
    cs = [cand("a", department="surgery"), cand("b", active=False)]
    assert choose(referral(), cs) == domain.Choice(None, domain.NO_SUPPORTERS_IN_DEPARTMENT)
    assert choose(referral(), [cand("c")], department_open=False).supporter_id is None


@pytest.mark.parametrize(
    ("r", "cs", "kwargs", "reason"),
    [
        (referral(), [], {}, "no_supporters_in_department"),
        (
            referral(physician_id="a", referrer_id="b"),
            [cand("a"), cand("b")],
            {},
            "all_excluded_as_physician_or_referrer",
        ),
        (referral(rank=Rank.senior), [cand("a")], {}, "all_excluded_by_rank"),
        (
            referral(event_nature="interventional"),
            [cand("a", interventional=False)],
            {},
            "all_excluded_by_interventional",
        ),
        (referral(), [cand("a")], {"tried": frozenset({"a"})}, "all_already_tried"),
    ],
)
def test_no_supporter_names_the_stage_that_emptied_the_set(
    r: ReferralToAssign, cs: list[Candidate], kwargs: dict[str, object], reason: str
) -> None:
    choice = choose(r, cs, **kwargs)
    assert choice.supporter_id is None and choice.reason == reason
    events = domain.outcome_events(r, choice, NOW)
    assert events == [
        NoSupporterAvailable(hospital=H, referral_id="r1", department="emergency", reason=reason)
    ]


def test_assign_to_eligible_is_honoured_as_manual() -> None:
    r = referral(assign_to="z")
    choice = choose(r, [cand("a"), cand("z", open_assignments=5)])
    assert choice == domain.Choice("z", "manual")


@pytest.mark.parametrize(
    ("z", "r_kwargs", "why"),
    [
        (None, {}, "not_on_roster"),
        (cand("z", department="surgery"), {}, "not_in_department"),
        (cand("z", active=False), {}, "retired"),
        (cand("z"), {"physician_id": "z"}, "is_physician"),
        (cand("z"), {"referrer_id": "z"}, "is_referrer"),
        (cand("z", rank=Rank.resident), {"rank": Rank.fellow}, "rank"),
        (cand("z", interventional=False), {"event_nature": "interventional"}, "interventional"),
    ],
)
def test_assign_to_not_eligible_falls_back_to_matching_with_the_reason(
    z: Candidate | None, r_kwargs: dict[str, object], why: str
) -> None:
    r = referral(assign_to="z", **r_kwargs)
    cs = [cand("a", rank=Rank.senior)] + ([z] if z else [])
    assert choose(r, cs) == domain.Choice("a", "matched", why)


def test_assign_to_does_not_apply_when_reassigning() -> None:
    r = referral(assign_to="z")
    choice = choose(r, [cand("a"), cand("z")], reassigning=True, tried=frozenset({"b"}))
    assert choice == domain.Choice("a", "reassigned")


def test_supporter_assigned_is_due_48_hours_after_assignment() -> None:
    choice = choose(referral(), [cand("a")])
    assert domain.outcome_events(referral(), choice, NOW) == [
        SupporterAssigned(
            hospital=H,
            referral_id="r1",
            supporter_id="a",
            department="emergency",
            assigned_at=NOW,
            due_at=NOW + timedelta(hours=48),
            reason="matched",
        )
    ]


def assigned(supporter_id: str, at: datetime = NOW) -> SupporterAssigned:
    return SupporterAssigned(
        hospital=H,
        referral_id="r1",
        supporter_id=supporter_id,
        department="emergency",
        assigned_at=at,
        due_at=at + timedelta(hours=48),
        reason="matched",
    )


def test_assignment_history_folds_the_stream() -> None:
    overdue = AssignmentOverdue(
        hospital=H, referral_id="r1", supporter_id="a", due_at=NOW + timedelta(hours=48)
    )
    waiting = NoSupporterAvailable(
        hospital=H, referral_id="r1", department="emergency", reason="all_already_tried"
    )
    history = domain.assignment_from([assigned("a"), overdue, waiting])
    assert history.tried == {"a"} and history.current is None
    assert history.waiting_reason == "all_already_tried" and history.decided
    assert not AssignmentHistory().decided


def test_a_new_referral_is_matched_and_a_waiting_one_after_overdue_is_reassigned() -> None:
    choice, events = domain.assign_referral(
        referral(), AssignmentHistory(), [cand("a")], department_open=True, now=NOW
    )
    assert choice.reason == "matched"
    assert isinstance(events[0], SupporterAssigned) and events[0].supporter_id == "a"
    history = AssignmentHistory(assigned=("a",), overdue=frozenset({"a"}))
    choice, _ = domain.assign_referral(
        referral(),
        history,
        [cand("a"), cand("b", open_assignments=3)],
        department_open=True,
        now=NOW,
    )
    assert choice == domain.Choice("b", "reassigned")


def test_overdue_records_it_then_reassigns_to_someone_else() -> None:
    history = domain.assignment_from([assigned("a")])
    later = NOW + timedelta(hours=48)
    choice, events = domain.expire_assignment(
        referral(),
        history,
        [cand("a"), cand("b", open_assignments=4)],
        department_open=True,
        now=later,
    )
    assert choice == domain.Choice("b", "reassigned")
    assert events[0] == AssignmentOverdue(
        hospital=H, referral_id="r1", supporter_id="a", due_at=NOW + timedelta(hours=48)
    )
    assert isinstance(events[1], SupporterAssigned)
    assert events[1].supporter_id == "b" and events[1].due_at == later + timedelta(hours=48)


def test_overdue_without_anyone_else_leaves_the_referral_waiting() -> None:
    history = domain.assignment_from([assigned("a")])
    _, events = domain.expire_assignment(
        referral(), history, [cand("a")], department_open=True, now=NOW + timedelta(hours=49)
    )
    assert [type(e) for e in events] == [AssignmentOverdue, NoSupporterAvailable]
    assert isinstance(events[1], NoSupporterAvailable)
    assert events[1].reason == "all_already_tried"


def test_not_yet_due_or_nothing_open_does_nothing() -> None:
    history = domain.assignment_from([assigned("a")])
    early = NOW + timedelta(hours=47, minutes=59)
    assert domain.expire_assignment(
        referral(), history, [cand("b")], department_open=True, now=early
    ) == (None, [])
    assert domain.expire_assignment(
        referral(), AssignmentHistory(), [cand("b")], department_open=True, now=NOW
    ) == (None, [])


def test_a_retired_supporters_referral_is_reassigned_without_overdue() -> None:
    history = domain.assignment_from([assigned("a")])
    choice, events = domain.rematch(
        referral(),
        history,
        [cand("a", active=False), cand("b")],
        leaving="a",
        department_open=True,
        now=NOW,
    )
    assert choice == domain.Choice("b", "reassigned")
    assert [type(e) for e in events] == [SupporterAssigned]
    # Someone else's referral is left alone.
    assert domain.rematch(
        referral(), history, [cand("b")], leaving="x", department_open=True, now=NOW
    ) == (None, [])


# --- properties over random rosters and referrals ---------------------------------------------

IDS = st.sampled_from([f"u{i}" for i in range(12)])
RANKS = st.sampled_from(list(Rank))


@st.composite
def candidates(draw: st.DrawFn) -> list[Candidate]:
    ids = draw(st.lists(IDS, unique=True, max_size=10))
    return [
        Candidate(
            supporter_id=i,
            department=draw(st.sampled_from(["emergency", "surgery"])),
            rank=draw(RANKS),
            interventional=draw(st.booleans()),
            active=draw(st.booleans()),
            open_assignments=draw(st.integers(0, 3)),
            assigned_requested_at=tuple(
                NOW - timedelta(days=d) for d in draw(st.lists(st.integers(-30, 800), max_size=4))
            ),
        )
        for i in ids
    ]


@st.composite
def referrals(draw: st.DrawFn) -> ReferralToAssign:
    return referral(
        physician_id=draw(IDS),
        referrer_id=draw(st.none() | IDS),
        rank=draw(RANKS),
        event_nature=draw(st.sampled_from(["interventional", "other"])),
        assign_to=draw(st.none() | IDS),
    )


TRIED = st.frozensets(IDS, max_size=4)


@settings(max_examples=300, deadline=None)
@given(referrals(), candidates(), TRIED, st.booleans(), st.booleans())
def test_the_rules_always_hold(
    r: ReferralToAssign,
    cs: list[Candidate],
    tried: frozenset[str],
    reassigning: bool,
    department_open: bool,
) -> None:
    choice = domain.choose_supporter(
        r, cs, department_open=department_open, tried=tried, reassigning=reassigning
    )
    if choice.supporter_id is None:
        assert choice.reason in {
            domain.NO_SUPPORTERS_IN_DEPARTMENT,
            domain.ALL_EXCLUDED_AS_PHYSICIAN_OR_REFERRER,
            domain.ALL_EXCLUDED_BY_RANK,
            domain.ALL_EXCLUDED_BY_INTERVENTIONAL,
            domain.ALL_ALREADY_TRIED,
        }
        # Nobody chosen means nobody was eligible.
        assert not [c for c in cs if _why_not(c, r, department_open, tried) is None]
        return
    chosen = next(c for c in cs if c.supporter_id == choice.supporter_id)
    assert chosen.supporter_id not in (r.physician_id, r.referrer_id)
    assert chosen.rank.level >= r.rank.level
    assert chosen.interventional or r.event_nature != "interventional"
    assert chosen.active and chosen.department == r.department and department_open
    assert chosen.supporter_id not in tried
    if choice.reason == "manual":
        assert chosen.supporter_id == r.assign_to and not reassigning
    else:
        assert choice.reason == ("reassigned" if reassigning else "matched")
        # The best by (open, recent, id) among the eligible.
        eligible = [c for c in cs if _why_not(c, r, department_open, tried) is None]

        def key(c: Candidate) -> tuple[int, int, str]:
            return (
                c.open_assignments,
                domain.recent_assignments(c, r.requested_at),
                c.supporter_id,
            )

        assert key(chosen) == min(key(c) for c in eligible)


@settings(max_examples=200, deadline=None)
@given(referrals(), candidates(), TRIED, st.randoms(use_true_random=False))
def test_deterministic_whatever_the_candidate_order(
    r: ReferralToAssign, cs: list[Candidate], tried: frozenset[str], rnd: random.Random
) -> None:
    first = domain.choose_supporter(r, cs, department_open=True, tried=tried)
    shuffled = list(cs)
    rnd.shuffle(shuffled)
    assert domain.choose_supporter(r, shuffled, department_open=True, tried=tried) == first
    assert domain.choose_supporter(r, cs, department_open=True, tried=tried) == first


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.integers(0, 60), st.randoms(use_true_random=False))
def test_load_spreads_evenly(k: int, n: int, rnd: random.Random) -> None:
    loads = {f"s{i}": 0 for i in range(k)}
    for j in range(n):
        cs = [cand(s, open_assignments=load) for s, load in loads.items()]
        rnd.shuffle(cs)
        choice = domain.choose_supporter(referral(referral_id=f"r{j}"), cs, department_open=True)
        assert choice.supporter_id is not None
        loads[choice.supporter_id] += 1
    assert max(loads.values()) - min(loads.values()) <= 1
    assert sum(loads.values()) == n


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 15), st.integers(1, 12))
def test_reassignment_never_returns_to_someone_who_had_the_referral(rounds: int, k: int) -> None:
    # Let it go overdue again and again: each new supporter never had the referral before.
    roster = [cand(f"u{i}") for i in range(k)]
    stream: list[Event] = []
    now = NOW
    for _ in range(rounds):
        history = domain.assignment_from(stream)
        if history.current is None:
            choice, events = domain.assign_referral(
                referral(), history, roster, department_open=True, now=now
            )
        else:
            now = now + timedelta(hours=48)
            expired, events = domain.expire_assignment(
                referral(), history, roster, department_open=True, now=now
            )
            assert expired is not None
            choice = expired
        if choice.supporter_id is not None:
            assert choice.supporter_id not in history.tried
        stream += events
    final = domain.assignment_from(stream)
    assert len(set(final.assigned)) == len(final.assigned) == min(rounds, k)


# --- version 1.1: matching policies -----------------------------------------------------------


def test_set_matching_policy_for_the_hospital_or_a_department() -> None:
    events = domain.set_matching_policy(
        HOSPITAL, None, H, SetMatchingPolicy(policy="other_department")
    )
    assert events == [MatchingPolicySet(hospital=H, policy="other_department")]
    cmd = SetMatchingPolicy(policy="same_then_other", department="emergency")
    assert domain.set_matching_policy(HOSPITAL, ED, H, cmd) == [
        MatchingPolicySet(hospital=H, policy="same_then_other", department="emergency")
    ]
    # A closed department may still have referrals waiting: its policy can be set.
    closed = domain.Department(H, "emergency", 40, date(2024, 1, 1), date(2024, 3, 1))
    assert domain.set_matching_policy(HOSPITAL, closed, H, cmd)


def test_set_matching_policy_refusals() -> None:
    with pytest.raises(Rejected) as exc:
        domain.set_matching_policy(None, None, H, SetMatchingPolicy(policy="other_department"))
    assert reason_of(exc) == ReasonCode.unknown_hospital
    cmd = SetMatchingPolicy(policy="other_department", department="never-launched")
    with pytest.raises(Rejected) as exc:
        domain.set_matching_policy(HOSPITAL, None, H, cmd)
    assert reason_of(exc) == ReasonCode.unknown_department


def test_the_policy_in_force_is_the_departments_else_the_hospitals_else_same_department() -> None:
    assert domain.policy_in_force({}, "emergency") == "same_department"
    hospital_wide = {domain.HOSPITAL_WIDE: "other_department"}
    assert domain.policy_in_force(hospital_wide, "emergency") == "other_department"
    both: dict[str, MatchingPolicy] = {**hospital_wide, "emergency": "same_then_other"}
    assert domain.policy_in_force(both, "emergency") == "same_then_other"
    assert domain.policy_in_force(both, "surgery") == "other_department"


def test_other_department_looks_only_in_the_hospitals_other_open_departments() -> None:
    cs = [
        cand("a"),
        cand("b", department="surgery", open_assignments=3),
        cand("c", department="icu", department_open=False),
    ]
    assert choose(referral(), cs, policy="other_department") == domain.Choice("b", "matched")
    # The referral's own department may even be closed: only the supporter's must be open.
    choice = choose(referral(), cs, policy="other_department", department_open=False)
    assert choice.supporter_id == "b"
    alone = choose(referral(), [cand("a")], policy="other_department")
    assert alone == domain.Choice(None, domain.NO_SUPPORTERS_IN_OTHER_DEPARTMENTS)


def test_same_then_other_goes_elsewhere_only_when_nobody_in_the_department_is_eligible() -> None:
    cs = [cand("a", open_assignments=5), cand("b", department="surgery")]
    assert choose(referral(), cs, policy="same_then_other").supporter_id == "a"
    full = [cand("a", open_assignments=2, max_open_assignments=2), cand("b", department="surgery")]
    assert choose(referral(), full, policy="same_then_other").supporter_id == "b"
    paused = [cand("a", available=False), cand("b", department="surgery")]
    assert choose(referral(), paused, policy="same_then_other").supporter_id == "b"
    assert choose(referral(), [], policy="same_then_other").reason == "no_supporters_in_hospital"


def test_all_unavailable_when_everyone_passing_the_other_rules_is_paused_or_full() -> None:
    cs = [cand("a", available=False), cand("b", open_assignments=1, max_open_assignments=1)]
    assert choose(referral(), cs) == domain.Choice(None, domain.ALL_UNAVAILABLE)
    # Someone failing another rule is not "unavailable": rank empties the set first.
    assert choose(referral(rank=Rank.senior), cs).reason == domain.ALL_EXCLUDED_BY_RANK
    # Below the cap is eligible; no cap is no cap.
    below = [cand("a", open_assignments=1, max_open_assignments=2)]
    assert choose(referral(), below).supporter_id == "a"


@pytest.mark.parametrize(
    ("z", "policy", "why"),
    [
        (cand("z", available=False), "same_department", "paused"),
        (cand("z", open_assignments=3, max_open_assignments=3), "same_department", "at_cap"),
        (cand("z"), "other_department", "in_referrals_department"),
        (cand("z", department="surgery"), "same_then_other", "department_has_eligible_supporters"),
        (
            cand("z", department="icu", department_open=False),
            "other_department",
            "department_closed",
        ),
    ],
)
def test_assign_to_is_honoured_only_when_eligible_under_the_policy(
    z: Candidate, policy: MatchingPolicy, why: str
) -> None:
    cs = [z, cand("a", open_assignments=4), cand("b", department="surgery", open_assignments=4)]
    choice = choose(referral(assign_to="z"), cs, policy=policy)
    assert choice.reason == "matched" and choice.manual_refused == why
    assert choice.supporter_id != "z"


def test_assign_to_another_department_is_honoured_when_the_policy_allows_it() -> None:
    cs = [cand("a"), cand("z", department="surgery", open_assignments=9)]
    choice = choose(referral(assign_to="z"), cs, policy="other_department")
    assert choice == domain.Choice("z", "manual")


# --- version 1.1: supporter availability ------------------------------------------------------


def availability(**kwargs: object) -> SetSupporterAvailability:
    values: dict[str, object] = {
        "supporter_id": "s1",
        "available": False,
        "changed_on": date(2024, 5, 1),
    }
    values.update(kwargs)
    return SetSupporterAvailability(**values)  # type: ignore[arg-type]


def test_set_supporter_availability_records_the_change_with_the_department() -> None:
    current = trained()
    events = domain.set_supporter_availability(current, H, availability(), NOW)
    assert events == [
        SupporterAvailabilityChanged(
            hospital=H,
            supporter_id="s1",
            available=False,
            changed_on=date(2024, 5, 1),
            department="emergency",
        )
    ]
    after = domain.supporter_from(
        [
            *trained_events(),
            *events,
            *domain.set_supporter_availability(
                current, H, availability(available=True, max_open_assignments=3), NOW
            ),
        ]
    )
    assert after is not None and after.available and after.max_open_assignments == 3
    # Each change replaces the one before: no cap given is no cap.
    last = domain.set_supporter_availability(current, H, availability(available=True), NOW)
    again = domain.supporter_from([*trained_events(), *events, *last])
    assert again is not None and again.max_open_assignments is None


@pytest.mark.parametrize(
    ("current", "cmd", "code"),
    [
        (None, availability(), ReasonCode.unknown_supporter),
        ("retired", availability(), ReasonCode.invalid_transition),
        ("active", availability(changed_on=date(2024, 1, 1)), ReasonCode.invalid_payload),
        ("active", availability(changed_on=date(2024, 6, 5)), ReasonCode.invalid_payload),
    ],
)
def test_set_supporter_availability_refusals(
    current: str | None, cmd: SetSupporterAvailability, code: ReasonCode
) -> None:
    state = None if current is None else trained()
    if current == "retired":
        state = replace(trained(), retired_on=date(2024, 4, 1))
    with pytest.raises(Rejected) as exc:
        domain.set_supporter_availability(state, H, cmd, NOW)
    assert reason_of(exc) == code


def trained_events() -> list[Event]:
    return [
        SupporterTrained(
            hospital=H,
            supporter_id="s1",
            department="emergency",
            rank=Rank.senior,
            interventional=False,
            trained_on=date(2024, 2, 1),
        )
    ]


def test_roster_from_folds_policies_and_availability() -> None:
    events = [
        *trained_events(),
        SupporterAvailabilityChanged(
            hospital=H,
            supporter_id="s1",
            available=False,
            max_open_assignments=2,
            changed_on=date(2024, 5, 1),
            department="emergency",
        ),
        MatchingPolicySet(hospital=H, policy="other_department"),
        MatchingPolicySet(hospital=H, policy="same_then_other", department="emergency"),
        MatchingPolicySet(hospital=H, policy="same_department"),
    ]
    roster = domain.roster_from(events)
    supporter = roster.supporters[(H, "s1")]
    assert not supporter.available and supporter.max_open_assignments == 2
    assert roster.policies == {
        (H, domain.HOSPITAL_WIDE): "same_department",
        (H, "emergency"): "same_then_other",
    }


def test_a_paused_supporters_referral_is_reassigned_without_overdue() -> None:
    history = domain.assignment_from([assigned("a")])
    choice, events = domain.rematch(
        referral(),
        history,
        [cand("a", available=False, open_assignments=1), cand("b")],
        leaving="a",
        department_open=True,
        now=NOW,
    )
    assert choice == domain.Choice("b", "reassigned")
    assert [type(e) for e in events] == [SupporterAssigned]


def test_a_waiting_referral_is_assigned_once_someone_is_eligible_and_records_nothing_before() -> (
    None
):
    waiting = domain.assignment_from(
        [NoSupporterAvailable(hospital=H, referral_id="r1", department="emergency", reason="x")]
    )
    still = domain.rematch(
        referral(),
        waiting,
        [cand("a", available=False)],
        leaving=None,
        department_open=True,
        now=NOW,
    )
    assert still == (None, [])
    choice, events = domain.rematch(
        referral(), waiting, [cand("a")], leaving=None, department_open=True, now=NOW
    )
    assert choice == domain.Choice("a", "matched")
    assert [type(e) for e in events] == [SupporterAssigned]
    # An assigned referral is not waiting: nothing to do.
    assert domain.rematch(
        referral(),
        domain.assignment_from(events),
        [cand("b")],
        leaving=None,
        department_open=True,
        now=NOW,
    ) == (None, [])


# --- properties of the policies, availability and caps ----------------------------------------

POLICIES: st.SearchStrategy[MatchingPolicy] = st.sampled_from(
    ["same_department", "other_department", "same_then_other"]
)


@st.composite
def rosters(draw: st.DrawFn) -> list[Candidate]:
    """Supporters of three departments (one maybe closed), some paused, some capped."""
    closed = draw(st.sampled_from([None, "surgery", "icu"]))
    ids = draw(st.lists(IDS, unique=True, max_size=10))
    result = []
    for i in ids:
        department = draw(st.sampled_from(["emergency", "surgery", "icu"]))
        result.append(
            Candidate(
                supporter_id=i,
                department=department,
                rank=draw(RANKS),
                interventional=draw(st.booleans()),
                active=draw(st.booleans()),
                open_assignments=draw(st.integers(0, 4)),
                department_open=department != closed,
                available=draw(st.booleans()),
                max_open_assignments=draw(st.none() | st.integers(1, 4)),
            )
        )
    return result


def _key(c: Candidate, r: ReferralToAssign) -> tuple[int, int, str]:
    return (c.open_assignments, domain.recent_assignments(c, r.requested_at), c.supporter_id)


@settings(max_examples=400, deadline=None)
@given(referrals(), rosters(), TRIED, st.booleans(), st.booleans(), POLICIES)
def test_the_policies_availability_and_caps_always_hold(
    r: ReferralToAssign,
    cs: list[Candidate],
    tried: frozenset[str],
    reassigning: bool,
    department_open: bool,
    policy: MatchingPolicy,
) -> None:
    choice = domain.choose_supporter(
        r, cs, department_open=department_open, tried=tried, reassigning=reassigning, policy=policy
    )
    pool = domain.eligible(r, cs, department_open=department_open, tried=tried, policy=policy)
    if choice.supporter_id is None:
        assert not pool
        # all_unavailable exactly when someone passes every other rule and all such are
        # paused or at their cap.
        passing_other_rules = [
            c
            for c in cs
            if _why_not(c, r, department_open, tried, policy) in (None, "paused", "at_cap")
        ]
        assert (choice.reason == domain.ALL_UNAVAILABLE) == bool(passing_other_rules)
        return
    chosen = next(c for c in cs if c.supporter_id == choice.supporter_id)
    # A paused supporter, or one at the cap, never receives one.
    assert chosen.available
    assert (
        chosen.max_open_assignments is None or chosen.open_assignments < chosen.max_open_assignments
    )
    assert chosen.active
    assert department_open if chosen.department == r.department else chosen.department_open
    if policy == "same_department":
        assert chosen.department == r.department and department_open
    if policy == "other_department":  # never in the referral's department
        assert chosen.department != r.department and chosen.department_open
    if policy == "same_then_other" and chosen.department != r.department:
        # Elsewhere only when nobody in the referral's department was eligible.
        assert not domain.eligible(
            r, cs, department_open=department_open, tried=tried, policy="same_department"
        )
    assert chosen.supporter_id not in tried | {r.physician_id, r.referrer_id}
    assert chosen.rank.level >= r.rank.level
    assert chosen.interventional or r.event_nature != "interventional"
    if choice.reason == "manual":
        assert chosen.supporter_id == r.assign_to and not reassigning
    else:
        assert key_is_best(chosen, pool, r)


def key_is_best(chosen: Candidate, pool: list[Candidate], r: ReferralToAssign) -> bool:
    return _key(chosen, r) == min(_key(c, r) for c in pool)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 30), POLICIES)
def test_nobody_ever_gets_more_than_their_cap(
    k: int, cap: int, n: int, policy: MatchingPolicy
) -> None:
    # Referrals keep coming and nobody reaches out: loads grow, and never past a cap.
    departments = ["emergency", "surgery"]
    loads = {f"s{i}": 0 for i in range(k)}
    for j in range(n):
        cs = [
            cand(s, department=departments[i % 2], open_assignments=load, max_open_assignments=cap)
            for i, (s, load) in enumerate(loads.items())
        ]
        choice = domain.choose_supporter(
            referral(referral_id=f"r{j}"), cs, department_open=True, policy=policy
        )
        if choice.supporter_id is None:
            assert choice.reason in (domain.ALL_UNAVAILABLE, *FIRST_RULES)
            continue
        loads[choice.supporter_id] += 1
    assert all(load <= cap for load in loads.values())


FIRST_RULES = (
    domain.NO_SUPPORTERS_IN_DEPARTMENT,
    domain.NO_SUPPORTERS_IN_OTHER_DEPARTMENTS,
    domain.NO_SUPPORTERS_IN_HOSPITAL,
)


@settings(max_examples=200, deadline=None)
@given(referrals(), rosters(), POLICIES, st.randoms(use_true_random=False))
def test_policy_choices_are_deterministic_whatever_the_order(
    r: ReferralToAssign, cs: list[Candidate], policy: MatchingPolicy, rnd: random.Random
) -> None:
    first = domain.choose_supporter(r, cs, department_open=True, policy=policy)
    shuffled = list(cs)
    rnd.shuffle(shuffled)
    assert domain.choose_supporter(r, shuffled, department_open=True, policy=policy) == first


@settings(max_examples=200, deadline=None)
@given(referrals(), rosters(), POLICIES)
def test_a_waiting_referral_never_records_a_second_no_supporter(
    r: ReferralToAssign, cs: list[Candidate], policy: MatchingPolicy
) -> None:
    waiting = domain.assignment_from(
        [NoSupporterAvailable(hospital=H, referral_id="r1", department="emergency", reason="x")]
    )
    choice, events = domain.rematch(
        r, waiting, cs, leaving=None, department_open=True, now=NOW, policy=policy
    )
    if choice is None:
        assert events == [] and not domain.eligible(r, cs, department_open=True, policy=policy)
    else:
        assert [type(e) for e in events] == [SupporterAssigned]
        assert choice.reason in ("manual", "matched")
