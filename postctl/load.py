"""The load generator (`postctl load`): a known mix of commands from several hospitals.

It speaks only the contract, through NATS, as hospital systems do: CloudEvents commands
published with `shared.client.PlatformClient` (``Nats-Msg-Id`` = the command id), answers read
back from the ``POST`` stream. Three parts:

- **The mix** (pure, seeded): each hospital's roster, then an endless series of *flows* drawn
  with fixed weights (`FLOW_WEIGHTS`, `REFERRAL_FATES`): a referral and the records of its
  fate (accepted, declined, unreachable, an interaction without outreach, an outreach by the
  wrong supporter first, no record at all; a few in a department without supporters), a survey
  response, an identical repeat under a new id, or a command that must be refused
  (`unknown_field`, `unknown_department`). Every planned command knows the answer it must get.
- **The driver**: sends at most ``rate`` commands a second for ``duration`` seconds (or up to
  ``max_commands``). A referral's records wait for its `SupporterAssigned`, as a supporter waits
  to be told, and each step waits for the answer to the one before. Publishing is retried with
  the same CloudEvents id while NATS is away (harmless by contract). Answers come from an
  ephemeral consumer on the stream, recreated from the last sequence seen after any failure, so
  nothing published while the generator was disconnected is missed.
- **The checks**: every command ended in exactly one outcome event (its success event or a
  `CommandRejected`, the one expected), no event was stored twice, and the RE-AIM figures equal
  those computed here from the commands sent (`expected_reaim`), independently of the analytics
  service. Latency is from the first publish of a command to the time its outcome was stored.

The generator needs the platform's NATS user (it reads the stream). Hospitals it creates are
named ``load-{tag}-{n}``, fresh for every run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any, Literal

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.client import PlatformClient
from shared.contracts import (
    STREAM_NAME,
    Command,
    LaunchDepartment,
    Rank,
    RecordInteraction,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    SubmitSurveyResponse,
    cmd_subject,
    encode,
    make_cloudevent,
    new_id,
)
from shared.settings import Settings, nats_servers

# --- the mix (pure, seeded) -------------------------------------------------------------------

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


# --- the expected RE-AIM figures, from the commands sent (pure) -------------------------------


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


# --- small maths (pure) -----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between the closest ranks (as numpy's default)."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError("q must be within [0, 100]")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Pacer:
    """At most `rate` sends a second, in the order they ask: each takes the next free slot."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate
        self.next_slot: float | None = None

    def reserve(self, now: float) -> float:
        """Take the next slot; returns how long to wait for it."""
        slot = now if self.next_slot is None else max(now, self.next_slot)
        self.next_slot = slot + self.interval
        return slot - now

    async def wait(self) -> None:
        delay = self.reserve(time.monotonic())
        if delay > 0:
            await asyncio.sleep(delay)


# --- reading the answers from the stream ------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    event_id: str
    type: str
    reason: str | None
    stream_seq: int
    stored_at: datetime


class EventLog:
    """Every event of the run's hospitals, read from the stream in order, and waiters on them.

    An ephemeral pull consumer from the last sequence seen: after any failure (NATS away, the
    node holding the consumer lost) a new one continues where the last one stopped.
    """

    def __init__(self, nc: NATS, hospitals: Sequence[str], start_seq: int) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = [f"post.{h}.evt.>" for h in hospitals]
        self.last_seq = start_seq - 1
        self.by_cause: dict[str, dict[str, Answer]] = defaultdict(dict)
        self.copies: Counter[str] = Counter()  # event id -> times stored
        self.assignment: dict[tuple[str, str], tuple[str, str | None]] = {}
        self.recreated = 0
        self._waiters: dict[Any, asyncio.Event] = {}
        self._idle = asyncio.Event()
        self._idle_since = 0.0

    def _wake(self, key: Any) -> None:
        waiter = self._waiters.pop(key, None)
        if waiter is not None:
            waiter.set()

    async def wait(self, key: Any, done: Callable[[], bool], timeout: float) -> bool:
        """Until done() holds (checked after each new event for `key`); False on timeout."""
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            waiter = self._waiters.setdefault(key, asyncio.Event())
            try:
                await asyncio.wait_for(waiter.wait(), remaining)
            except TimeoutError:
                return False
        return True

    def _take(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        if seq <= self.last_seq:
            return  # seen before the consumer was recreated
        self.last_seq = seq
        try:
            ce = json.loads(msg.data)
            event_id, type_ = str(ce["id"]), str(ce["type"])
        except (ValueError, KeyError, TypeError):
            return
        self.copies[event_id] += 1
        data = ce.get("data") if isinstance(ce.get("data"), dict) else {}
        hospital = msg.subject.split(".")[1]
        cause = ce.get("causationid")
        if cause:
            reason = data.get("reason_code") if type_ == "CommandRejected" else None
            stored = meta.timestamp if meta.timestamp is not None else datetime.now(UTC)
            self.by_cause[cause].setdefault(
                event_id, Answer(event_id, type_, reason, seq, stored.astimezone(UTC))
            )
            self._wake(("cause", cause))
        if type_ in ("SupporterAssigned", "NoSupporterAvailable"):
            key = (hospital, str(data.get("referral_id")))
            supporter = data.get("supporter_id") if type_ == "SupporterAssigned" else None
            self.assignment[key] = (type_, supporter)
            self._wake(("match", *key))

    async def run(self) -> None:
        while True:
            name = new_id().replace("-", "")
            try:
                config = ConsumerConfig(
                    name=name,
                    filter_subjects=self.subjects,
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=self.last_seq + 1,
                    ack_policy=AckPolicy.NONE,
                    inactive_threshold=30.0,
                    num_replicas=1,
                    mem_storage=True,
                )
                await self.js.add_consumer(STREAM_NAME, config, timeout=5)
                sub = await self.js.pull_subscribe_bind(name, stream=STREAM_NAME)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)
                continue
            try:
                await self._read(sub, name)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.recreated += 1
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _read(self, sub: Any, name: str) -> None:
        idle = 0
        while True:
            started = time.monotonic()
            connected = self.nc.is_connected
            try:
                msgs = await sub.fetch(500, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                msgs = []
            for msg in msgs:
                self._take(msg)
            if msgs:
                idle = 0
                continue
            if connected and self.nc.is_connected:  # empty because there was nothing to read
                self._idle_since = started
                self._idle.set()
            idle += 1
            if idle % 3 == 0:
                # An empty fetch may also mean a consumer lost with its node: ask after it.
                info = await self.js.consumer_info(STREAM_NAME, name, timeout=3)
                if info.num_pending:
                    raise RuntimeError("the consumer has messages but delivers none")

    async def sync(self, timeout: float = 60.0) -> None:
        """Until an empty fetch that began after this call: everything stored before is read."""
        asked = time.monotonic()
        deadline = asked + timeout
        while self._idle_since <= asked:
            if time.monotonic() > deadline:
                raise TimeoutError("the event log did not catch up with the stream")
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(deadline - time.monotonic(), 0.01))


# --- the driver -------------------------------------------------------------------------------


@dataclass
class LoadConfig:
    rate: float = 50.0  # commands a second, at most
    duration: float = 60.0  # seconds during which new flows start
    hospitals: int = 3
    seed: int = 1
    max_commands: int | None = None  # stop starting flows once this many commands are planned
    outcome_timeout: float = 120.0  # the longest wait for any one answer
    republish: bool = False  # publish each command twice: a new Nats-Msg-Id, the same id
    settle: float = 1.0  # quiet seconds before the final count (a late second answer shows)
    # How long the command owners may take to have nothing pending at the end: longer than
    # the consumers' ack_wait (60 s), so a message redelivered after a crash is counted too.
    settle_timeout: float = 120.0
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])


@dataclass
class Sent:
    planned: Planned
    id: str
    subject: str
    body: bytes
    sent_at: datetime
    published: bool = False


@dataclass
class LoadReport:
    hospitals: list[str]
    commands: int
    answered: int
    rejected: int
    by_type: dict[str, int]
    missing: list[str]
    doubled: list[str]
    unexpected: list[str]
    stored_twice: int
    unpublished: int
    publish_retries: int
    stalled_flows: int
    elapsed: float
    latency_ms: dict[str, float | None]
    figures_checked: bool = False
    figure_mismatches: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (
            self.missing
            or self.doubled
            or self.unexpected
            or self.stored_twice
            or self.unpublished
            or self.stalled_flows
            or any(self.figure_mismatches.values())
        )

    @property
    def throughput(self) -> float:
        return self.commands / self.elapsed if self.elapsed > 0 else 0.0

    def problems(self) -> list[str]:
        out = [f"no outcome: {i}" for i in self.missing[:20]]
        out += [f"more than one outcome: {i}" for i in self.doubled[:20]]
        out += self.unexpected[:20]
        if self.stored_twice:
            out.append(f"{self.stored_twice} event(s) stored more than once")
        if self.unpublished:
            out.append(f"{self.unpublished} command(s) never published")
        if self.stalled_flows:
            out.append(f"{self.stalled_flows} flow(s) stalled waiting for an answer")
        for hospital, mismatches in self.figure_mismatches.items():
            out += [f"{hospital}: {m}" for m in mismatches]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "hospitals": self.hospitals,
            "commands": self.commands,
            "answered": self.answered,
            "rejected_as_planned": self.rejected,
            "elapsed_s": round(self.elapsed, 2),
            "throughput_per_s": round(self.throughput, 1),
            "latency_ms": self.latency_ms,
            "publish_retries": self.publish_retries,
            "errors": {
                "missing": len(self.missing),
                "doubled": len(self.doubled),
                "unexpected": len(self.unexpected),
                "stored_twice": self.stored_twice,
                "unpublished": self.unpublished,
                "stalled_flows": self.stalled_flows,
            },
            "figures_checked": self.figures_checked,
            "by_type": self.by_type,
            "problems": self.problems(),
        }

    def format(self) -> str:
        lat = self.latency_ms
        lines = [
            f"hospitals    {', '.join(self.hospitals)}",
            f"commands     {self.commands} in {self.elapsed:.1f} s"
            f" ({self.throughput:.1f}/s), {self.rejected} refused as planned",
            "latency ms   "
            + "  ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in lat.items()),
            f"retries      {self.publish_retries} publish retries",
            f"outcomes     {self.answered} of {self.commands} commands answered exactly once",
        ]
        if self.figures_checked:
            same = not any(self.figure_mismatches.values())
            verdict = "as computed from the commands sent" if same else "DIFFERENT from the sent"
            lines.append(f"RE-AIM       {verdict}")
        lines.append("nothing lost, nothing doubled." if self.ok else "PROBLEMS:")
        lines += [f"  {p}" for p in self.problems()]
        return "\n".join(lines)


async def _publish_retrying(
    client: PlatformClient, subject: str, body: bytes, msg_id: str, deadline: float
) -> int:
    """Publish until the stream acknowledges; returns the retries. The same CloudEvents id
    each time: a copy that got through before is harmless."""
    retries, delay = 0, 0.1
    while True:
        try:
            # The client's JetStream context, with a shorter wait than its default 5 s.
            await client.js.publish(subject, body, timeout=2.0, headers={"Nats-Msg-Id": msg_id})
            return retries
        except asyncio.CancelledError:
            raise
        except Exception:
            if time.monotonic() + delay > deadline:
                raise
            retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


class LoadRun:
    """One run of the load generator. ``async with LoadRun(url, config) as run``:
    ``await run.run()`` sends the mix and returns the checked report; tests may act meanwhile
    (``await run.wait_sent(n)``) and afterwards (``republish_all``, ``verify``)."""

    def __init__(self, nats_url: str, config: LoadConfig, **nats_options: Any) -> None:
        self.nats_url = nats_url
        self.config = config
        self.nats_options = nats_options
        self.mix = Mix(config.seed, config.hospitals, config.tag)
        self.hospitals = [r.hospital for r in self.mix.rosters]
        self.sent: list[Sent] = []
        self.publish_retries = 0
        self.stalled_flows = 0
        self.started = 0.0
        self.finished = 0.0
        self._give_up_at: float | None = None  # once no flow starts: the last answer's deadline
        self._sent_changed = asyncio.Event()
        self.nc: NATS | None = None
        self.client: PlatformClient | None = None
        self.log: EventLog | None = None
        self._log_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoadRun:
        self.nc = await nats.connect(
            nats_servers(self.nats_url),
            name="post-load",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            **self.nats_options,
        )
        self.client = PlatformClient(self.nc)
        info = await self.client.js.stream_info(STREAM_NAME)
        self.log = EventLog(self.nc, self.hospitals, (info.state.last_seq or 0) + 1)
        self._log_task = asyncio.create_task(self.log.run(), name="load:events")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._log_task is not None:
            self._log_task.cancel()
            await asyncio.gather(self._log_task, return_exceptions=True)
        if self.nc is not None:
            await self.nc.close()

    # -- sending -----------------------------------------------------------------------------

    async def wait_sent(self, n: int) -> None:
        """Until at least n commands have been published (for a fault mid-load)."""
        while sum(1 for s in self.sent if s.published) < n:
            self._sent_changed.clear()
            await self._sent_changed.wait()

    async def _send(self, p: Planned, pacer: Pacer) -> Sent:
        assert self.client is not None
        await pacer.wait()
        ce = make_cloudevent(
            type_=p.command_type, source=f"/hospitals/{p.hospital}/load", data=p.data
        )
        subject = cmd_subject(p.hospital, p.command_type)
        sent = Sent(p, ce["id"], subject, encode(ce), datetime.now(UTC))
        self.sent.append(sent)
        deadline = time.monotonic() + self.config.outcome_timeout
        try:
            self.publish_retries += await _publish_retrying(
                self.client, sent.subject, sent.body, sent.id, deadline
            )
            if self.config.republish:
                self.publish_retries += await _publish_retrying(
                    self.client, sent.subject, sent.body, f"{sent.id}:again", deadline
                )
        except Exception:
            return sent  # never acknowledged: counted as unpublished
        sent.published = True
        self._sent_changed.set()
        return sent

    def _timeout(self) -> float:
        """A wait's limit: `outcome_timeout`, and no later than the run's own deadline."""
        if self._give_up_at is None:
            return self.config.outcome_timeout
        return max(0.0, min(self.config.outcome_timeout, self._give_up_at - time.monotonic()))

    async def _answered(self, sent: Sent) -> bool:
        assert self.log is not None
        log = self.log
        return await log.wait(
            ("cause", sent.id), lambda: bool(log.by_cause.get(sent.id)), self._timeout()
        )

    async def _follow(self, flow: Flow, sent: Sent, pacer: Pacer) -> None:
        """The rest of a flow whose first command was sent: its answer, then its records."""
        assert self.log is not None
        log = self.log
        if not sent.published or not await self._answered(sent):
            self.stalled_flows += bool(flow.records)
            return
        if flow.referral_id is None or not flow.records:
            return
        key = (flow.hospital, flow.referral_id)
        if not await log.wait(("match", *key), lambda: key in log.assignment, self._timeout()):
            self.stalled_flows += 1
            return
        outcome, assigned = log.assignment[key]
        if outcome != "SupporterAssigned" or assigned is None:
            self.stalled_flows += 1  # the mix staffs these departments: a supporter was due
            return
        roster = next(r for r in self.mix.rosters if r.hospital == flow.hospital)
        assert flow.department is not None
        for step in flow.records:
            supporter = (
                assigned
                if step.supporter == "assigned"
                else other_supporter(roster, flow.department, assigned)
            )
            sent = await self._send(step.build(flow.hospital, flow.referral_id, supporter), pacer)
            if not sent.published or not await self._answered(sent):
                self.stalled_flows += 1
                return

    async def run(self) -> LoadReport:
        """Setup, the mix at the configured rate, then the settled, checked report."""
        assert self.log is not None
        config = self.config
        pacer = Pacer(config.rate)
        self.started = time.monotonic()
        setup = [await self._send(p, pacer) for p in self.mix.setup()]
        # The roster must be known everywhere before the first referral names it.
        await asyncio.gather(*(self._answered(s) for s in setup))
        flows: list[asyncio.Task[None]] = []
        planned_commands = len(setup)
        stop_at = self.started + config.duration
        while time.monotonic() < stop_at and (
            config.max_commands is None or planned_commands < config.max_commands
        ):
            flow = self.mix.next_flow()
            planned_commands += flow.planned_commands
            # One slot at a time: follow-ups waiting for a slot go between two new flows.
            sent = await self._send(flow.first, pacer)
            flows.append(asyncio.create_task(self._follow(flow, sent, pacer)))
        self._give_up_at = time.monotonic() + config.outcome_timeout
        await asyncio.gather(*flows)
        self.finished = time.monotonic()
        # Answers already missing: the platform is stuck, and waiting longer tells nothing.
        unanswered = any(not self.log.by_cause.get(s.id) for s in self.sent)
        await self.settle(timeout=10.0 if unanswered else config.settle_timeout)
        return self.verify()

    async def _owners_busy(self) -> bool:
        """Whether a durable consumer that takes commands still has messages to handle. Only
        a command's owner can answer it, so a service that reads events alone (analytics) may
        lag without delaying the count."""
        assert self.client is not None
        try:
            infos = await self.client.js.consumers_info(STREAM_NAME)
        except Exception:
            return True
        for info in infos:
            subjects = info.config.filter_subjects or [info.config.filter_subject or ""]
            takes_commands = any(".cmd." in s for s in subjects)
            pending = info.num_pending or info.num_ack_pending
            if info.config.durable_name and takes_commands and pending:
                return True
        return False

    async def settle(self, timeout: float | None = None) -> None:
        """Until the command owners' consumers have nothing pending, a quiet moment, and the
        event log has read everything: a late second answer would show now."""
        assert self.log is not None
        deadline = time.monotonic() + (self.config.settle_timeout if timeout is None else timeout)
        for _ in range(2):
            while time.monotonic() < deadline and await self._owners_busy():
                await asyncio.sleep(0.2)
            await asyncio.sleep(self.config.settle)
        await self.log.sync(timeout=max(deadline - time.monotonic(), 5.0))

    async def republish_all(self) -> None:
        """Every command again, long after the first time: a new Nats-Msg-Id, the same id."""
        assert self.client is not None
        deadline = time.monotonic() + self.config.outcome_timeout
        for n, s in enumerate(self.sent):
            self.publish_retries += await _publish_retrying(
                self.client, s.subject, s.body, f"{s.id}:later", deadline
            )
            if n % 200 == 199:
                await asyncio.sleep(0)

    def verify(self) -> LoadReport:
        """Every command answered exactly once, as planned; nothing stored twice."""
        assert self.log is not None
        log = self.log
        missing, doubled, unexpected, latencies = [], [], [], []
        by_type: Counter[str] = Counter()
        rejected = 0
        for s in self.sent:
            by_type[s.planned.command_type] += 1
            answers = list(log.by_cause.get(s.id, {}).values())
            if not answers:
                missing.append(f"{s.planned.command_type} {s.id}")
                continue
            if len(answers) > 1:
                doubled.append(f"{s.planned.command_type} {s.id}: {[a.type for a in answers]}")
            first = min(answers, key=lambda a: a.stream_seq)
            want = (s.planned.expect, s.planned.reason)
            if (first.type, first.reason) != want:
                unexpected.append(
                    f"{s.planned.command_type} {s.id}: expected {want}, got"
                    f" {(first.type, first.reason)}"
                )
            rejected += first.type == "CommandRejected"
            latencies.append((first.stored_at - s.sent_at).total_seconds() * 1000)
        end = self.finished or time.monotonic()
        return LoadReport(
            hospitals=self.hospitals,
            commands=len(self.sent),
            answered=len(self.sent) - len(missing) - len(doubled),
            rejected=rejected,
            by_type=dict(sorted(by_type.items())),
            missing=missing,
            doubled=doubled,
            unexpected=unexpected,
            stored_twice=sum(1 for c in log.copies.values() if c > 1),
            unpublished=sum(1 for s in self.sent if not s.published),
            publish_retries=self.publish_retries,
            stalled_flows=self.stalled_flows,
            elapsed=end - self.started,
            latency_ms={
                "p50": _ms(percentile(latencies, 50)),
                "p90": _ms(percentile(latencies, 90)),
                "p99": _ms(percentile(latencies, 99)),
                "max": _ms(max(latencies, default=None)),
            },
        )

    def expected(self) -> dict[str, dict[str, dict[str, Any]]]:
        return expected_reaim(s.planned for s in self.sent if s.published)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# --- RE-AIM figures from the analytics service ------------------------------------------------


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


async def check_figures(
    run: LoadRun,
    report: LoadReport,
    analytics_url: str,
    wait_caught_up: Callable[[], Awaitable[None]] | None = None,
) -> LoadReport:
    """Compare GET /reaim/{hospital} with the figures computed from the commands sent (once
    analytics has caught up; at once when answers are missing: it may never catch up then)."""
    if wait_caught_up is not None and not report.missing:
        await wait_caught_up()
    for hospital, expected in run.expected().items():
        try:
            actual = await asyncio.to_thread(_get_json, f"{analytics_url}/reaim/{hospital}")
        except (OSError, ValueError) as exc:
            report.figure_mismatches[hospital] = [f"GET /reaim/{hospital} failed: {exc!r}"]
            continue
        report.figure_mismatches[hospital] = figure_mismatches(expected, actual)
    report.figures_checked = True
    return report


async def run_load(
    nats_url: str, config: LoadConfig, analytics_url: str | None = None
) -> LoadReport:
    async with LoadRun(nats_url, config) as run:
        report = await run.run()
        if analytics_url:
            from postctl.cli import wait_consumed

            await check_figures(
                run, report, analytics_url, lambda: wait_consumed(nats_url, "analytics")
            )
        return report


# --- postctl load -----------------------------------------------------------------------------


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "load",
        help="soak: a known mix of commands at a bounded rate, then check nothing was lost",
    )
    p.add_argument("--rate", type=float, required=True, help="commands a second, at most")
    p.add_argument("--duration", type=float, required=True, help="seconds of new flows")
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--analytics",
        default=None,
        help="the analytics service's URL (default: from POST_ANALYTICS_PORT); 'none' to skip"
        " the RE-AIM check",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_load)


def cmd_load(args: argparse.Namespace) -> None:
    settings = Settings()
    analytics = args.analytics or f"http://127.0.0.1:{settings.http_port('analytics')}"
    config = LoadConfig(
        rate=args.rate, duration=args.duration, hospitals=args.hospitals, seed=args.seed
    )
    report = asyncio.run(
        run_load(settings.nats_url, config, None if analytics == "none" else analytics)
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format(), flush=True)
    sys.exit(0 if report.ok else 1)
