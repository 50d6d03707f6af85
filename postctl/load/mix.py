"""The load generator's mix (pure, seeded): each hospital's roster, then an endless series of
*flows* drawn with fixed weights (`FLOW_WEIGHTS`, `REFERRAL_FATES`). Every planned command knows
the answer it must get."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from shared.contracts import (
    Command,
    LaunchDepartment,
    Rank,
    RecordInteraction,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    SubmitSurveyResponse,
)

FLOW_WEIGHTS = {
    "referral": 60,
    "survey": 22,
    "repeat": 6,  # an identical repeat of an earlier referral or survey, under a new id
    "unknown_field": 6,
    "unknown_department": 6,
}
REFERRAL_FATES = {
    "accepted": 35,  # outreach accepted, then 1-3 interactions
    "declined": 15,
    "unreachable": 10,
    "interaction_only": 15,  # an interaction without outreach: implied acceptance
    "wrong_supporter": 10,  # an outreach by a supporter not assigned (refused), then accepted
    "no_record": 15,
}
UNSTAFFED_SHARE = 0.05  # referrals to the department without supporters: NoSupporterAvailable
SOURCE_WEIGHTS = {"self": 30, "third_party": 50, "safety_event": 20}
DECLINE_REASONS = ("no_time", "no_need", "privacy", "discomfort", "medicolegal", "other")
STAFFED_DEPARTMENTS = ("emergency-medicine", "anesthesia", "surgery")
UNSTAFFED_DEPARTMENT = "radiology"
NOT_LAUNCHED = "not-launched"
SUPPORTERS_PER_DEPARTMENT = 4
PHYSICIANS_PER_HOSPITAL = 300  # referrals draw from this pool: some physicians come back
EPOCH = datetime(2024, 1, 15, tzinfo=UTC)  # business time: the past, whatever today is
REFERRAL_SPAN_MINUTES = 300 * 24 * 60

Supporter = Literal["assigned", "other"]


@dataclass(frozen=True)
class Planned:
    """One command of the plan and the answer it must get."""

    hospital: str
    command_type: str
    data: dict[str, Any]  # the payload as sent (JSON values)
    expect: str  # the outcome event's type
    reason: str | None = None  # its reason_code, for a CommandRejected
    repeat: bool = False  # an identical repeat under a new id: answered, no new fact

    @property
    def rejected(self) -> bool:
        return self.expect == "CommandRejected"

    @property
    def counts(self) -> bool:
        """A new fact for the RE-AIM figures."""
        return not self.rejected and not self.repeat


def planned(hospital: str, command: Command, expect: str, **kw: Any) -> Planned:
    return Planned(hospital, command.type_name, command.to_data(), expect, **kw)


@dataclass(frozen=True)
class RecordsStep:
    """A records command of a referral; its supporter is known only once one is assigned."""

    kind: Literal["outreach", "interaction"]
    supporter: Supporter = "assigned"
    outcome: Literal["accepted", "declined", "unreachable"] = "accepted"
    at: datetime | None = None
    decline_reason: str | None = None
    occurred_on: date | None = None
    minutes: int = 0
    escalated: bool = False

    def build(self, hospital: str, referral_id: str, supporter_id: str) -> Planned:
        if self.kind == "outreach":
            assert self.at is not None
            command: Command = RecordOutreach(
                referral_id=referral_id,
                supporter_id=supporter_id,
                outcome=self.outcome,
                at=self.at,
                decline_reason=self.decline_reason,  # type: ignore[arg-type]
            )
            expect = f"Outreach{self.outcome.capitalize()}"
        else:
            assert self.occurred_on is not None
            command = RecordInteraction(
                referral_id=referral_id,
                supporter_id=supporter_id,
                occurred_on=self.occurred_on,
                minutes=self.minutes,
                escalated=self.escalated,
            )
            expect = "InteractionCompleted"
        if self.supporter == "other":
            return planned(hospital, command, "CommandRejected", reason="not_assigned_supporter")
        return planned(hospital, command, expect)


@dataclass(frozen=True)
class Flow:
    """What one hospital system does in one go: a command, and for a referral, what follows."""

    kind: str
    hospital: str
    first: Planned
    referral_id: str | None = None  # set when an assignment (or its absence) is awaited
    department: str | None = None
    records: tuple[RecordsStep, ...] = ()

    @property
    def planned_commands(self) -> int:
        return 1 + len(self.records)


@dataclass
class HospitalRoster:
    hospital: str
    physician_count: int
    departments: dict[str, int]  # department -> physician_count
    supporters: dict[str, list[str]]  # department -> supporter ids, sorted
    seniors: dict[str, list[str]]  # senior interventional supporters: always eligible
    referrals: int = 0
    surveys: int = 0
    done: list[Planned] = field(default_factory=list)  # what a repeat may repeat


def other_supporter(roster: HospitalRoster, department: str, assigned: str) -> str:
    """A supporter of the department who is not the assigned one (deterministic)."""
    return next(s for s in roster.supporters[department] if s != assigned)


def _pick(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


class Mix:
    """The seeded mix: `setup()` once, then `next_flow()` as often as wanted."""

    def __init__(self, seed: int, hospitals: int, tag: str) -> None:
        if hospitals < 1:
            raise ValueError("at least one hospital")
        self.rng = random.Random(seed)
        self.tag = tag
        self.rosters = [self._roster(i) for i in range(hospitals)]

    def _roster(self, i: int) -> HospitalRoster:
        rng = self.rng
        departments = {
            d: rng.randint(30, 150) for d in (*STAFFED_DEPARTMENTS, UNSTAFFED_DEPARTMENT)
        }
        supporters: dict[str, list[str]] = {}
        seniors: dict[str, list[str]] = {}
        for k, department in enumerate(STAFFED_DEPARTMENTS):
            ids = [f"s{k}-{n}" for n in range(SUPPORTERS_PER_DEPARTMENT)]
            supporters[department] = ids
            seniors[department] = ids[:2]
        supporters[UNSTAFFED_DEPARTMENT] = []
        return HospitalRoster(
            hospital=f"load-{self.tag}-{i}",
            physician_count=sum(departments.values()) + rng.randint(0, 400),
            departments=departments,
            supporters=supporters,
            seniors=seniors,
        )

    def setup(self) -> list[Planned]:
        """Each hospital's registration, departments and supporters, in the order they must go."""
        out: list[Planned] = []
        for n, r in enumerate(self.rosters):
            h = r.hospital
            out.append(
                planned(
                    h,
                    RegisterHospital(
                        name=f"Load test hospital {n}", physician_count=r.physician_count
                    ),
                    "HospitalRegistered",
                )
            )
            for k, (department, count) in enumerate(r.departments.items()):
                launch = LaunchDepartment(
                    department=department,
                    physician_count=count,
                    launched_on=date(2024, 1, 2) + timedelta(days=k),
                )
                out.append(planned(h, launch, "DepartmentLaunched"))
            for department, ids in r.supporters.items():
                for supporter_id in ids:
                    senior = supporter_id in r.seniors[department]
                    register = RegisterSupporter(
                        supporter_id=supporter_id,
                        department=department,
                        rank=Rank.senior if senior else self.rng.choice(list(Rank)),
                        interventional=True if senior else self.rng.random() < 0.5,
                        trained_on=date(2023, 12, 1) + timedelta(days=self.rng.randint(0, 30)),
                    )
                    out.append(planned(h, register, "SupporterTrained"))
        return out

    def next_flow(self) -> Flow:
        roster = self.rng.choice(self.rosters)
        kind = _pick(self.rng, FLOW_WEIGHTS)
        if kind == "repeat" and not roster.done:
            kind = "survey"
        if kind == "referral":
            return self._referral(roster)
        if kind == "survey":
            return self._survey(roster)
        if kind == "repeat":
            original = self.rng.choice(roster.done)
            return Flow(kind, roster.hospital, replace(original, repeat=True))
        if kind == "unknown_field":
            flow = self._survey(roster, remember=False)
            data = {**flow.first.data, "extra": 1}  # a field the contract does not have
            first = replace(flow.first, data=data, expect="CommandRejected", reason="unknown_field")
            return Flow(kind, roster.hospital, first)
        assert kind == "unknown_department"
        flow = self._referral(roster, department=NOT_LAUNCHED)
        first = replace(flow.first, expect="CommandRejected", reason="unknown_department")
        return Flow(kind, roster.hospital, first)

    def _referral(self, roster: HospitalRoster, department: str | None = None) -> Flow:
        rng = self.rng
        roster.referrals += 1
        referral_id = f"r{roster.referrals:06d}"
        if department is None:
            staffed = rng.random() >= UNSTAFFED_SHARE
            department = rng.choice(STAFFED_DEPARTMENTS) if staffed else UNSTAFFED_DEPARTMENT
        source = _pick(rng, SOURCE_WEIGHTS)
        requested_at = EPOCH + timedelta(minutes=rng.randrange(REFERRAL_SPAN_MINUTES))
        seniors = roster.seniors.get(department, [])
        command = RequestReferral(
            referral_id=referral_id,
            physician_id=f"p{rng.randrange(PHYSICIANS_PER_HOSPITAL):04d}",
            department=department,
            rank=rng.choice(list(Rank)),
            source=source,  # type: ignore[arg-type]
            event_nature=rng.choice(["interventional", "other"]),  # type: ignore[arg-type]
            requested_at=requested_at,
            referrer_id=None if source == "self" else f"x{rng.randrange(1000):04d}",
            safety_event_id=f"e{referral_id}" if source == "safety_event" else None,
            assign_to=rng.choice(seniors) if seniors and rng.random() < 0.2 else None,
        )
        first = planned(roster.hospital, command, "ReferralCreated")
        if department == NOT_LAUNCHED:
            return Flow("referral", roster.hospital, first)
        roster.done.append(first)
        records: tuple[RecordsStep, ...] = ()
        if department != UNSTAFFED_DEPARTMENT:
            records = self._fate(requested_at)
        return Flow("referral", roster.hospital, first, referral_id, department, records)

    def _fate(self, requested_at: datetime) -> tuple[RecordsStep, ...]:
        rng = self.rng
        fate = _pick(rng, REFERRAL_FATES)
        # Whole minutes, from 30 minutes to 80 hours: some outreach misses the 48 hours.
        at = requested_at + timedelta(minutes=rng.randint(30, 80 * 60))

        def interactions(after: date, count: int) -> list[RecordsStep]:
            steps, day = [], after
            for _ in range(count):
                # At least a day later: a record's business time never precedes the one before.
                day += timedelta(days=rng.randint(1, 10))
                steps.append(
                    RecordsStep(
                        "interaction",
                        occurred_on=day,
                        minutes=rng.randint(5, 120),
                        escalated=rng.random() < 0.1,
                    )
                )
            return steps

        if fate == "accepted":
            return (RecordsStep("outreach", at=at), *interactions(at.date(), rng.randint(1, 3)))
        if fate == "declined":
            reason = rng.choice(DECLINE_REASONS)
            return (RecordsStep("outreach", outcome="declined", at=at, decline_reason=reason),)
        if fate == "unreachable":
            return (RecordsStep("outreach", outcome="unreachable", at=at),)
        if fate == "interaction_only":
            return tuple(interactions(requested_at.date(), rng.randint(1, 2)))
        if fate == "wrong_supporter":
            return (
                RecordsStep("outreach", supporter="other", at=at),
                RecordsStep("outreach", at=at),
                *interactions(at.date(), 1),
            )
        return ()

    def _survey(self, roster: HospitalRoster, remember: bool = True) -> Flow:
        rng = self.rng
        roster.surveys += 1
        aware = rng.random() < 0.8
        had = aware and rng.random() < 0.5
        command = SubmitSurveyResponse(
            response_id=f"q{roster.surveys:06d}",
            department=rng.choice(list(roster.departments)),
            submitted_on=date(2024, 3, 1) + timedelta(days=rng.randrange(270)),
            aware=aware,
            had_interaction=had,
            helpful=rng.randint(1, 5) if had else None,
            wellbeing_improved=rng.random() < 0.6 if had else None,
            comfort_improved=rng.random() < 0.7 if had else None,
            would_recommend=rng.random() < 0.85 if aware else None,
            satisfaction=rng.randint(1, 5) if rng.random() < 0.5 else None,
        )
        first = planned(roster.hospital, command, "SurveyResponseRecorded")
        if remember:
            roster.done.append(first)
        return Flow("survey", roster.hospital, first)
