"""The bad-input suite: hypothesis-generated malformed commands, over NATS and over HTTP.

For every command of the contract, payloads with wrong types, missing and extra fields, huge
strings, unicode and control characters, and bad timestamps; envelopes that are JSON but not
valid CloudEvents; bodies that are not CloudEvents at all; and subjects whose hospital or
type the envelope contradicts. What each test proves:

- every such command is answered clearly: a ``CommandRejected`` with the expected reason code
  (``invalid_payload``, or ``unknown_field`` for an extra field) over NATS, or a 422 with that
  ``reason_code`` over HTTP; a body that is not a CloudEvent at all (not JSON, no string id)
  goes to ``post.{hospital}.dlq.{Type}`` unchanged, exactly once, and is not answered;
- nothing is stored for them: the rows of every service's schema that name the hospital
  (read models and events other than ``CommandRejected``) are the same before and after,
  and the stream carries no other event for the hospital;
- no service crashes or stalls: afterwards each is alive, ``/readyz`` answers 200, its
  consumer has caught up, and a valid command to each owner still gets its success event.

Every test owns fresh hospitals, onboarded with a department, a supporter and an assigned
referral, so a mutation that slipped through validation would really change something. The
payloads are drawn by hypothesis (a fixed seed: the suite is repeatable) and sent as one
barrage per test; a failure names the offending payload.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import AwareDatetime, TypeAdapter, ValidationError

from shared import limits
from shared.client import CloudEventDict, PlatformClient
from shared.contracts import (
    COMMANDS,
    CloudEvent,
    LaunchDepartment,
    ReasonCode,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    cmd_subject,
    encode,
    make_cloudevent,
    parse_payload,
)
from shared.partitions import service_subjects
from shared.runtime import SERVICES, Platform

pytestmark = [pytest.mark.e2e, pytest.mark.badinput]

DEPARTMENT = "emergency-medicine"
SUPPORTER = "s-1"
REFERRAL = "r-1"
# Far beyond any clock a test may have moved: "in the future" whatever the services' time.
FAR_FUTURE_DAY = "2999-06-01"
FAR_FUTURE_TIME = "2999-06-01T09:00:00Z"

# A valid payload of every command for the onboarded hospital: the mutations start from it.
BASE: dict[str, dict[str, Any]] = {
    "RegisterHospital": {"name": "Test General", "physician_count": 40},
    "LaunchDepartment": {
        "department": DEPARTMENT,
        "physician_count": 40,
        "launched_on": "2024-01-01",
    },
    "CloseDepartment": {"department": DEPARTMENT, "closed_on": "2024-06-01"},
    "RegisterSupporter": {
        "supporter_id": "s-2",
        "department": DEPARTMENT,
        "rank": "senior",
        "interventional": True,
        "trained_on": "2024-01-15",
    },
    "RetireSupporter": {"supporter_id": SUPPORTER, "retired_on": "2024-06-01"},
    "RequestReferral": {
        "referral_id": "r-2",
        "physician_id": "p-2",
        "department": DEPARTMENT,
        "rank": "resident",
        "source": "third_party",
        "event_nature": "other",
        "requested_at": "2024-03-01T09:00:00Z",
        "referrer_id": "lead-1",
    },
    "ForgetPhysician": {"physician_id": "p-never-sent", "requested_on": "2024-06-01"},
    "RecordOutreach": {
        "referral_id": REFERRAL,
        "supporter_id": SUPPORTER,
        "outcome": "declined",
        "at": "2024-03-01T10:00:00Z",
        "decline_reason": "no_time",
    },
    "RecordInteraction": {
        "referral_id": REFERRAL,
        "supporter_id": SUPPORTER,
        "occurred_on": "2024-03-02",
        "minutes": 30,
        "escalated": False,
    },
    "SubmitSurveyResponse": {
        "response_id": "q-1",
        "department": DEPARTMENT,
        "submitted_on": "2024-03-05",
        "aware": True,
        "had_interaction": True,
        "helpful": 5,
        "wellbeing_improved": True,
        "comfort_improved": True,
        "would_recommend": True,
        "satisfaction": 4,
    },
    "SetMatchingPolicy": {"policy": "other_department", "department": DEPARTMENT},
    "SetSupporterAvailability": {
        "supporter_id": SUPPORTER,
        "available": False,
        "max_open_assignments": 3,
        "changed_on": "2024-06-01",
    },
}
# The HTTP intakes: command type -> (service, path under /hospitals/{hospital}/).
HTTP_ROUTES = {
    "RequestReferral": ("referral", "referrals"),
    "RecordOutreach": ("records", "outreach"),
    "RecordInteraction": ("records", "interactions"),
    "SubmitSurveyResponse": ("records", "surveys"),
}
DATE_FIELDS = {
    "launched_on",
    "closed_on",
    "trained_on",
    "retired_on",
    "occurred_on",
    "submitted_on",
    "changed_on",
    "requested_on",
}
TIME_FIELDS = {"requested_at", "at"}
FREE_TEXT_FIELDS = {"name"}  # a hospital's name: any printable text of 1..200 characters
SCHEMAS = list(SERVICES)

# --- the mutations ----------------------------------------------------------------------------

# Any JSON value, small.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _required(type_: str) -> list[str]:
    return [n for n, f in COMMANDS[type_].model_fields.items() if f.is_required()]


def _wrong_type_for(base_value: Any, required: bool) -> st.SearchStrategy[Any]:
    """A JSON value of another type than the field's (null only where the field needs one)."""
    others: list[st.SearchStrategy[Any]] = [
        st.lists(json_values, max_size=3),
        st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        st.floats(allow_nan=False, allow_infinity=False),
    ]
    if required:
        others.append(st.none())
    if isinstance(base_value, bool):
        others += [st.integers(), st.sampled_from(["true", "false", "1", "yes"])]
    elif isinstance(base_value, int):
        others += [st.booleans(), st.integers().map(str)]
    else:
        others += [st.booleans(), st.integers()]
    return st.one_of(others)


@st.composite
def wrong_type(draw: st.DrawFn, type_: str) -> dict[str, Any]:
    base = dict(BASE[type_])
    field = draw(st.sampled_from(sorted(base)))
    base[field] = draw(_wrong_type_for(base[field], field in _required(type_)))
    return base


@st.composite
def missing_fields(draw: st.DrawFn, type_: str) -> dict[str, Any]:
    gone = draw(st.sets(st.sampled_from(_required(type_)), min_size=1))
    return {k: v for k, v in BASE[type_].items() if k not in gone}


MARKER = "Dr Jane Marker"  # free text a careless integration might send


@st.composite
def extra_fields(draw: st.DrawFn, type_: str) -> dict[str, Any]:
    known = set(COMMANDS[type_].model_fields)
    names = st.one_of(
        st.sampled_from(["notes", "physician_name", "comment", "diagnosis", "email", "id"]),
        st.text(min_size=1, max_size=30),
    ).filter(lambda n: n not in known)
    extra = draw(st.dictionaries(names, json_values | st.just(MARKER), min_size=1, max_size=3))
    return {**BASE[type_], **extra}


def _string_fields(type_: str, free_text: bool = False) -> list[str]:
    return sorted(
        k
        for k, v in BASE[type_].items()
        if isinstance(v, str) and (free_text or k not in FREE_TEXT_FIELDS)
    )


@st.composite
def huge_strings(draw: st.DrawFn, type_: str) -> dict[str, Any]:
    # Every string field has a limit (ids 64, slugs 63, a name 200); the bodies stay < 1 MB.
    field = draw(st.sampled_from(_string_fields(type_, free_text=True)))
    unit = draw(st.sampled_from(["a", "Z9-", "é", "\u4e2d", "\U0001f600", " "]))
    size = draw(st.integers(min_value=257, max_value=60_000))
    return {**BASE[type_], field: draw(st.text(max_size=5)) + unit * size}


def _not_ascii(s: str) -> bool:
    return not s.isascii()


unicode_text = st.one_of(
    st.text(min_size=1, max_size=40).filter(_not_ascii),
    st.sampled_from(
        # Look-alikes of valid values: fullwidth letters and digits, a Unicode hyphen,
        # a zero-width space, a Roman numeral.
        [
            "\uff53-1",
            "\uff45\uff4d\uff45\uff52\uff47\uff45\uff4e\uff43\uff59",
            "s\u20101",
            "s-1\u200b",
            "r\u00e9f",
            "\u2160",
            "\uff12\uff10\uff12\uff14-01-01",
        ]
    ),
)
# Characters no field may hold: NUL and other controls, lone surrogates (UTF-16 halves).
control_text = st.builds(
    lambda a, c, b: a + c + b,
    st.text(alphabet="abc-1", max_size=5),
    st.sampled_from(["\x00", "\x01", "\x1b", "\n", "\x7f", "\x85", "\ud800", "\udfff"]),
    st.text(alphabet="abc-1", max_size=5),
)


@st.composite
def unicode_values(draw: st.DrawFn, type_: str) -> dict[str, Any]:
    """Non-ASCII text where only ASCII is valid, and control characters anywhere (the free
    text of a hospital's name included: a name with NUL or a lone surrogate is not a name)."""
    if _string_fields(type_) and draw(st.booleans()):
        field = draw(st.sampled_from(_string_fields(type_)))
        return {**BASE[type_], field: draw(unicode_text)}
    field = draw(st.sampled_from(_string_fields(type_, free_text=True)))
    return {**BASE[type_], field: draw(control_text)}


_aware = TypeAdapter(AwareDatetime)


def _invalid_time(value: str) -> bool:
    try:
        _aware.validate_json(json.dumps(value), strict=True)
    except ValidationError:
        return True
    return False


def _invalid_day(value: str) -> bool:
    try:
        parse_payload(COMMANDS["CloseDepartment"], {"department": "x", "closed_on": value})
    except Exception:
        return True
    return False


bad_times = st.one_of(
    st.sampled_from(
        [
            "2024-03-01T09:00:00",  # no zone
            "2024-03-01T09:00:00+25:00",
            "2024-02-30T09:00:00Z",
            "2024-03-01T24:01:00Z",
            "2024-03-01",
            "yesterday",
            "",
            "0000-01-01T00:00:00Z",
            FAR_FUTURE_TIME,
            "9999-12-31T23:59:59Z",
        ]
    ),
    st.text(max_size=30).filter(_invalid_time),
)
bad_days = st.one_of(
    st.sampled_from(
        [
            "2024-02-30",
            "2024-13-01",
            "2024-3-1",
            "2024-03-01T00:00:00Z",  # a time where a date is due
            "01/03/2024",
            "",
            "0000-01-01",
            FAR_FUTURE_DAY,
            "9999-12-31",
        ]
    ),
    st.text(max_size=20).filter(_invalid_day),
)


@st.composite
def bad_timestamps(draw: st.DrawFn, type_: str) -> dict[str, Any]:
    fields = sorted((DATE_FIELDS | TIME_FIELDS) & set(BASE[type_]))
    if not fields:  # no time: a date where a count or a policy is due instead
        field = "physician_count" if "physician_count" in BASE[type_] else "policy"
        return {**BASE[type_], field: draw(bad_days)}
    field = draw(st.sampled_from(fields))
    return {**BASE[type_], field: draw(bad_times if field in TIME_FIELDS else bad_days)}


MUTATIONS: dict[str, Callable[[str], st.SearchStrategy[dict[str, Any]]]] = {
    "wrong_type": wrong_type,
    "missing_fields": missing_fields,
    "extra_fields": extra_fields,
    "huge_strings": huge_strings,
    "unicode": unicode_values,
    "bad_timestamps": bad_timestamps,
}


def payload_cases(
    mutation: str, types: list[str], max_examples: int = 60
) -> list[tuple[str, dict[str, Any]]]:
    """(command type, payload) drawn by hypothesis for one mutation, every type its share."""
    each = max(8, max_examples // len(types))
    return [(t, p) for t in types for p in draw_cases(MUTATIONS[mutation](t), each)]


def draw_cases(strategy: st.SearchStrategy[Any], max_examples: int) -> list[Any]:
    """Hypothesis draws the cases; the test then sends them all at once (one barrage)."""
    cases: list[Any] = []

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,  # repeatable in CI
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(case: Any) -> None:
        cases.append(case)

    collect()
    return cases


# --- the tenants and what is stored for them --------------------------------------------------


def new_hospital() -> str:
    return f"bad-{uuid.uuid4().hex[:10]}"


async def onboard(client: PlatformClient, hospital: str) -> None:
    """A hospital with a department, a supporter and a referral assigned to that supporter."""
    for command in (
        RegisterHospital(name="Test General", physician_count=40),
        parse_payload(LaunchDepartment, BASE["LaunchDepartment"]),
        parse_payload(RegisterSupporter, {**BASE["RegisterSupporter"], "supporter_id": SUPPORTER}),
        parse_payload(RequestReferral, {**BASE["RequestReferral"], "referral_id": REFERRAL}),
    ):
        answer = await client.send_and_wait(hospital, command, timeout=30)
        assert answer["type"] != "CommandRejected", answer["data"]
    await client.wait_for(
        hospital,
        "SupporterAssigned",
        lambda e: e["data"]["referral_id"] == REFERRAL,
        timeout=30,
    )


def _subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject wildcards: `*` is one token, `>` the rest."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


async def settled(client: PlatformClient, stack: Platform, hospitals: Sequence[str]) -> None:
    """Every event of these hospitals seen so far has been handled by each service that
    consumes it (its id is in the service's ``processed``, written with its effects).

    Not "every consumer is idle": on the shared stack, other tests leave commands waiting
    for facts (retried for minutes), and those are not ours to wait for."""
    keys: dict[str, set[str]] = {}
    for name in SERVICES:
        filters = await service_subjects(client.js, name)
        keys[name] = {
            f"{e['_subject'].split('.')[1]}:{e['id']}"
            for e in client.events
            if e["_subject"].split(".")[1] in hospitals
            and any(_subject_matches(f, e["_subject"]) for f in filters)
        }
    conn = await asyncpg.connect(stack.db_url)
    try:
        for name, wanted in keys.items():
            for _ in range(1200):  # up to a minute: 2 noisy cores
                done = await conn.fetchval(
                    f'SELECT count(*) FROM "{name}".processed WHERE message_id = ANY($1::text[])',
                    list(wanted),
                )
                if done == len(wanted):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"the {name} service has not handled {hospitals} events")
    finally:
        await conn.close()


async def stored_for(stack: Platform, hospitals: list[str]) -> dict[str, int]:
    """What every service keeps for these hospitals: rows of each table that names a hospital,
    and events by type (CommandRejected aside, the one answer a refusal leaves)."""
    conn = await asyncpg.connect(stack.db_url)
    try:
        counts: dict[str, int] = {}
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.columns"
            " WHERE column_name = 'hospital' AND table_schema = ANY($1::text[])",
            SCHEMAS,
        )
        for schema, table in tables:
            counts[f"{schema}.{table}"] = await conn.fetchval(
                f'SELECT count(*) FROM "{schema}"."{table}" WHERE hospital = ANY($1::text[])',
                hospitals,
            )
        for schema in SCHEMAS:
            rows = await conn.fetch(
                f'SELECT event_type, count(*) AS n FROM "{schema}".events'
                " WHERE (metadata->>'hospital' = ANY($1::text[])"
                "        OR data->>'hospital' = ANY($1::text[]))"
                "   AND event_type <> 'CommandRejected' GROUP BY event_type",
                hospitals,
            )
            counts.update({f"{schema}.events.{r['event_type']}": r["n"] for r in rows})
        return counts
    finally:
        await conn.close()


@dataclass
class Tenant:
    """The hospital under fire, and what it held before."""

    hospital: str
    before: dict[str, int]
    events_seen: int


@pytest.fixture
async def tenant(client: PlatformClient, stack: Platform) -> Tenant:
    hospital = new_hospital()
    await onboard(client, hospital)
    await settled(client, stack, [hospital])
    return Tenant(hospital, await stored_for(stack, [hospital]), len(client.events))


def new_events(client: PlatformClient, tenant: Tenant, hospital: str) -> list[CloudEventDict]:
    prefix = f"post.{hospital}.evt."
    return [e for e in client.events[tenant.events_seen :] if e["_subject"].startswith(prefix)]


async def still_healthy_and_nothing_stored(
    client: PlatformClient, stack: Platform, tenant: Tenant, others: Sequence[str] = ()
) -> None:
    """No crash, no stall, nothing kept; then a valid command to each owner is answered."""
    for name in SERVICES:
        assert stack.processes[name].alive(), f"the {name} service died"
    await settled(client, stack, [tenant.hospital, *others])
    assert await stored_for(stack, [tenant.hospital]) == tenant.before
    surprises = [
        (e["type"], e["data"])
        for e in new_events(client, tenant, tenant.hospital)
        if e["type"] != "CommandRejected"
    ]
    assert not surprises, f"stored or emitted for a refused command: {str(surprises)[:2000]}"
    for other in others:
        assert not any((await stored_for(stack, [other])).values()), f"{other} got something"
        kept = [e["type"] for e in new_events(client, tenant, other)]
        assert set(kept) <= {"CommandRejected"}, (other, kept)
    async with httpx.AsyncClient() as web:
        for name in SERVICES:
            port = stack.service_ports[name]
            ready = await web.get(f"http://127.0.0.1:{port}/readyz")
            assert ready.status_code == 200, (name, ready.text)
    # Each owner still answers a valid command (generous timeouts: 2 cores, noisy).
    valid = {
        "RegisterSupporter": {**BASE["RegisterSupporter"], "supporter_id": "s-after"},
        "RequestReferral": {**BASE["RequestReferral"], "referral_id": "r-after"},
        "SubmitSurveyResponse": {**BASE["SubmitSurveyResponse"], "response_id": "q-after"},
    }
    for type_, data in valid.items():
        answer = await client.send_and_wait(
            tenant.hospital, parse_payload(COMMANDS[type_], data), timeout=30
        )
        assert answer["type"] != "CommandRejected", answer["data"]
    await settled(client, stack, [tenant.hospital])


# --- sending ----------------------------------------------------------------------------------


async def publish_all(
    client: PlatformClient, messages: list[tuple[str, bytes, str | None]]
) -> None:
    gate = asyncio.Semaphore(32)

    async def one(subject: str, body: bytes, msg_id: str | None) -> None:
        async with gate:
            await client.send_raw(subject, body, msg_id=msg_id)

    await asyncio.gather(*(one(*m) for m in messages))


async def answers(
    client: PlatformClient, ids: list[str], timeout: float = 90.0
) -> dict[str, CloudEventDict]:
    """The answer to each command id (its CommandRejected); fails naming the unanswered."""

    async def one(command_id: str) -> tuple[str, CloudEventDict | None]:
        try:
            return command_id, await client.outcome(command_id, timeout=timeout)
        except TimeoutError:
            return command_id, None

    got = dict(await asyncio.gather(*(one(i) for i in ids)))
    missing = [i for i, a in got.items() if a is None]
    assert not missing, f"{len(missing)} of {len(ids)} commands got no answer: {missing[:5]}"
    return {i: a for i, a in got.items() if a is not None}


def expected_reason(mutation: str, body: bytes = b"") -> str:
    """A body beyond the command size limit is refused for that before it is read."""
    if len(body) > limits.COMMAND.max_bytes:
        return ReasonCode.payload_too_large
    return ReasonCode.unknown_field if mutation == "extra_fields" else ReasonCode.invalid_payload


def _show(payload: Any) -> str:
    return repr(payload)[:300]


def check_rejections(
    hospital: str,
    cases: list[tuple[str, str, Any]],
    got: dict[str, CloudEventDict],
    reason: Callable[[Any], str],
) -> None:
    """Each case (id, type, payload) was refused on its hospital, with its reason code."""
    wrong = []
    for command_id, type_, payload in cases:
        answer = got[command_id]
        data = answer["data"]
        ok = (
            answer["type"] == "CommandRejected"
            and answer["_subject"] == f"post.{hospital}.evt.CommandRejected"
            and data["command_type"] == type_
            and data["reason_code"] == reason(payload)
            and data["reason_code"] in ReasonCode.__members__.values()
            and data["command_id"] == command_id
        )
        if not ok:
            wrong.append(f"{type_} {_show(payload)} -> {answer['type']} {str(data)[:300]}")
    assert not wrong, f"{len(wrong)} of {len(cases)} not refused as expected:\n" + "\n".join(
        wrong[:10]
    )


# --- over NATS --------------------------------------------------------------------------------


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
async def test_bad_payloads_over_nats_are_refused_and_leave_nothing(
    mutation: str, client: PlatformClient, stack: Platform, tenant: Tenant
) -> None:
    h = tenant.hospital
    drawn = payload_cases(mutation, sorted(COMMANDS))
    cases: list[tuple[str, str, Any]] = []
    messages = []
    for type_, payload in drawn:
        command_id = str(uuid.uuid4())
        ce = make_cloudevent(
            type_=type_, source=f"/hospitals/{h}/badinput", data=payload, id_=command_id
        )
        body = encode(ce)
        cases.append((command_id, type_, (payload, expected_reason(mutation, body))))
        messages.append((cmd_subject(h, type_), body, command_id))
    await publish_all(client, messages)
    got = await answers(client, [c[0] for c in cases])
    check_rejections(h, cases, got, lambda case: case[1])
    await still_healthy_and_nothing_stored(client, stack, tenant)


def _valid_envelope(h: str, type_: str, command_id: str) -> dict[str, Any]:
    return make_cloudevent(
        type_=type_, source=f"/hospitals/{h}/badinput", data=BASE[type_], id_=command_id
    )


ENVELOPE_ATTRIBUTES = ["specversion", "source", "type", "data"]


def _invalid_envelope_time(value: str) -> bool:
    # The envelope is read leniently (a future time or a Unix time string is a time there).
    try:
        CloudEvent.model_validate({**_valid_envelope("x", "CloseDepartment", "i"), "time": value})
    except ValidationError:
        return True
    return False


@st.composite
def broken_envelopes(draw: st.DrawFn) -> tuple[str, Callable[[dict[str, Any]], None]]:
    """A change that makes a CloudEvent with a good id invalid (applied to a valid one)."""
    kind = draw(
        st.sampled_from(
            ["drop", "specversion", "source", "type", "time", "contenttype", "data", "ids"]
        )
    )
    if kind == "drop":
        gone = draw(st.sets(st.sampled_from(ENVELOPE_ATTRIBUTES), min_size=1))

        def drop(ce: dict[str, Any]) -> None:
            for k in gone:
                del ce[k]

        return kind, drop
    if kind == "specversion":
        v = draw(json_values.filter(lambda x: x != "1.0"))
        return kind, lambda ce: ce.update(specversion=v)
    if kind in ("source", "type"):
        limit = 512 if kind == "source" else 128
        v = draw(
            st.one_of(
                st.just(""),
                st.integers(),
                st.lists(st.text(max_size=3), max_size=2),
                st.integers(limit + 1, limit + 5000).map(lambda n: "x" * n),
            )
        )
        return kind, lambda ce: ce.update({kind: v})
    if kind == "time":
        v = draw(st.one_of(bad_times.filter(_invalid_envelope_time), st.lists(st.integers())))
        return kind, lambda ce: ce.update(time=v)
    if kind == "contenttype":
        v = draw(st.sampled_from(["text/plain", "application/xml", "", "APPLICATION/JSON"]))
        return kind, lambda ce: ce.update(datacontenttype=v)
    if kind == "data":
        v = draw(st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(json_values)))
        return kind, lambda ce: ce.update(data=v)
    name = draw(st.sampled_from(["correlationid", "causationid", "subject"]))
    v = draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.booleans()))
    return kind, lambda ce: ce.update({name: v})


async def test_broken_cloudevents_envelopes_are_refused(
    client: PlatformClient, stack: Platform, tenant: Tenant
) -> None:
    h = tenant.hospital
    drawn = draw_cases(st.tuples(st.sampled_from(sorted(COMMANDS)), broken_envelopes()), 60)
    cases, messages = [], []
    for type_, (kind, breaks) in drawn:
        ce = _valid_envelope(h, type_, str(uuid.uuid4()))
        breaks(ce)
        cases.append((ce["id"], type_, kind))
        messages.append((cmd_subject(h, type_), json.dumps(ce).encode(), ce["id"]))
    await publish_all(client, messages)
    got = await answers(client, [c[0] for c in cases])
    check_rejections(h, cases, got, lambda _: ReasonCode.invalid_payload)
    await still_healthy_and_nothing_stored(client, stack, tenant)


async def test_a_subject_that_the_envelope_contradicts_is_refused(
    client: PlatformClient, stack: Platform, tenant: Tenant
) -> None:
    """The subject's hospital is the tenant: a source naming another hospital (or none), or
    a type that is not the subject's, is refused on the subject's hospital, nowhere else."""
    h, other = tenant.hospital, new_hospital()
    sources = st.sampled_from(
        [
            f"/hospitals/{other}/badinput",
            f"/hospitals/{other}",
            "/hospitals/",
            f"hospitals/{h}/badinput",
            f"/Hospitals/{h}/x",
            f"/hospitals/{h.upper()}/x",
            "/elsewhere",
            "urn:post:x",
        ]
    )
    contradictions = st.one_of(
        st.tuples(st.just("source"), sources),
        st.tuples(
            st.just("type"),
            st.one_of(st.sampled_from(sorted(COMMANDS)), st.text(min_size=1, max_size=40)),
        ),
    )
    drawn = draw_cases(st.tuples(st.sampled_from(sorted(COMMANDS)), contradictions), 50)
    cases, messages = [], []
    for type_, (attribute, value) in drawn:
        if attribute == "type" and value == type_:
            continue
        command_id = str(uuid.uuid4())
        ce = _valid_envelope(h, type_, command_id)
        ce[attribute] = value
        cases.append((command_id, type_, (attribute, value)))
        messages.append((cmd_subject(h, type_), encode(ce), command_id))
    await publish_all(client, messages)
    got = await answers(client, [c[0] for c in cases])
    check_rejections(h, cases, got, lambda _: ReasonCode.invalid_payload)
    assert not new_events(client, tenant, other), "the source's hospital was answered"
    await still_healthy_and_nothing_stored(client, stack, tenant, others=[other])


def usable_id(value: Any) -> bool:
    """An id the platform can keep and answer under: 1 to 256 characters, no control
    character, no unpaired surrogate. Without one, a message cannot be answered."""
    if not isinstance(value, str) or not 1 <= len(value) <= 256:
        return False
    if any(c < " " or c == "\x7f" for c in value):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_cloudevent_like(body: bytes) -> bool:
    """JSON with a usable id: answerable (a CommandRejected), not a dead letter."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and usable_id(raw.get("id"))


unusable_ids = st.one_of(
    # Too long to keep or answer (random, so PostgreSQL cannot compress it into an index).
    st.binary(min_size=129, max_size=8000).map(lambda b: b.hex()),
    control_text,
    st.sampled_from(["\x00", "a\x00", "\ud800", "\udfff-x", "x\r\ny", "\t"]),
)


def _cloudevent_with_id(command_id: Any) -> bytes:
    ce = make_cloudevent(
        type_="RegisterHospital", source="/hospitals/x/y", data=BASE["RegisterHospital"]
    )
    return json.dumps({**ce, "id": command_id}).encode()


not_cloudevents = st.one_of(
    st.binary(max_size=2000),
    st.sampled_from([b"", b"{", b"\xff\xfe", b"null", b"[]", b"{}", b'"id"', b"\x00" * 64]),
    json_values.map(lambda v: json.dumps(v).encode()),
    # CloudEvents but for their id: none usable (absent, not a string, empty, too long,
    # control characters, unpaired surrogates).
    st.one_of(st.sampled_from([None, 7, "", ["x"], {"id": "x"}, True]), unusable_ids).map(
        _cloudevent_with_id
    ),
    st.just(json.dumps({"specversion": "1.0", "source": "/hospitals/x/y", "data": {}}).encode()),
).filter(lambda b: not _is_cloudevent_like(b))


async def test_bodies_that_are_not_cloudevents_go_to_the_dead_letter_subject(
    client: PlatformClient, stack: Platform, tenant: Tenant
) -> None:
    h = tenant.hospital
    drawn = draw_cases(st.tuples(st.sampled_from(sorted(COMMANDS)), not_cloudevents), 60)
    dead: list[tuple[str, bytes, str]] = []
    arrived = asyncio.Event()

    async def on_dead_letter(msg: Any) -> None:
        dead.append((msg.subject, msg.data, (msg.headers or {}).get("Post-Original-Subject", "")))
        if len(dead) >= len(drawn):
            arrived.set()

    sub = await client.nc.subscribe(f"post.{h}.dlq.>", cb=on_dead_letter)
    try:
        await client.nc.flush()
        await publish_all(client, [(cmd_subject(h, t), body, None) for t, body in drawn])
        await asyncio.wait_for(arrived.wait(), timeout=90)
        assert not new_events(client, tenant, h), "a body that is not a CloudEvent got an answer"
        # Its owners answer commands sent after: every dead letter has gone out by then.
        await still_healthy_and_nothing_stored(client, stack, tenant)
    finally:
        await sub.unsubscribe()
    expected = sorted((f"post.{h}.dlq.{t}", body, cmd_subject(h, t)) for t, body in drawn)
    assert sorted(dead) == expected  # each exactly once, unchanged, with where it came from


async def test_a_subject_whose_hospital_is_no_hospital_id_is_dead_lettered_at_once(
    client: PlatformClient, stack: Platform, tenant: Tenant
) -> None:
    """`post.{hospital}` must name a slug: a good command under any other token names no
    tenant there could be to answer. It is dead-lettered at once (not retried for minutes,
    not answered) and its owner goes on."""
    tokens = ["Bad_Hosp", "UPPER", "-dash-first", "x" * 64]
    dead: list[tuple[str, str]] = []
    arrived = asyncio.Event()

    async def on_dead_letter(msg: Any) -> None:
        dead.append((msg.subject, (msg.headers or {}).get("Post-Dead-Letter-Reason", "")))
        if len(dead) >= len(tokens):
            arrived.set()

    subs = [await client.nc.subscribe(f"post.{t}.dlq.>", cb=on_dead_letter) for t in tokens]
    try:
        await client.nc.flush()
        messages = []
        for token in tokens:
            ce = make_cloudevent(
                type_="RegisterHospital",
                source=f"/hospitals/{token}/x",
                data=BASE["RegisterHospital"],
            )
            messages.append((cmd_subject(token, "RegisterHospital"), encode(ce), str(ce["id"])))
        await publish_all(client, messages)
        await asyncio.wait_for(arrived.wait(), timeout=30)  # retried, it would take minutes
        await still_healthy_and_nothing_stored(client, stack, tenant)
    finally:
        for sub in subs:
            await sub.unsubscribe()
    assert sorted(subject for subject, _ in dead) == sorted(
        f"post.{t}.dlq.RegisterHospital" for t in tokens
    )
    assert all("not a hospital id" in reason for _, reason in dead)


async def test_a_command_of_a_type_nobody_owns_is_refused_not_ignored(
    client: PlatformClient, stack: Platform, tenant: Tenant
) -> None:
    """A typo in an integration (`RecordOutReach`) or a command the contract does not have: a
    `CommandRejected`, invalid_payload, from the front door, never silence; the commands the
    services own are still answered once each, by their owners."""
    h = tenant.hospital
    types = ["RecordOutReach", "DeleteReferral", "requestreferral"]
    messages = []
    for type_ in types:
        ce = make_cloudevent(type_=type_, source=f"/hospitals/{h}/x", data=BASE["RecordOutreach"])
        messages.append((cmd_subject(h, type_), encode(ce), str(ce["id"])))
    await publish_all(client, messages)
    got = await answers(client, [m[2] for m in messages])
    for (_, _, command_id), type_ in zip(messages, types, strict=True):
        answer = got[command_id]
        assert answer["type"] == "CommandRejected"
        assert answer["data"]["reason_code"] == "invalid_payload"
        assert answer["data"]["command_type"] == type_
        assert answer["correlationid"] == command_id
    await still_healthy_and_nothing_stored(client, stack, tenant)


async def test_a_new_hospitals_name_with_control_characters_is_refused(
    client: PlatformClient, stack: Platform, tenant: Tenant
) -> None:
    """The one free-text field (a hospital's name) on hospitals not registered yet: a name
    with NUL, another control character or an unpaired surrogate is refused, not stored."""
    names = draw_cases(control_text, 40)
    cases, messages = [], []
    for name in names:
        h, command_id = new_hospital(), str(uuid.uuid4())
        payload = {**BASE["RegisterHospital"], "name": name}
        ce = make_cloudevent(
            type_="RegisterHospital", source=f"/hospitals/{h}/x", data=payload, id_=command_id
        )
        cases.append((h, command_id, payload))
        messages.append((cmd_subject(h, "RegisterHospital"), encode(ce), command_id))
    await publish_all(client, messages)
    got = await answers(client, [c[1] for c in cases])
    for h, command_id, payload in cases:
        check_rejections(
            h, [(command_id, "RegisterHospital", payload)], got, lambda _: "invalid_payload"
        )
    await still_healthy_and_nothing_stored(client, stack, tenant, others=[h for h, _, _ in cases])


# --- over HTTP --------------------------------------------------------------------------------


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
async def test_bad_payloads_over_http_are_refused_and_leave_nothing(
    mutation: str,
    client: PlatformClient,
    stack: Platform,
    tenant: Tenant,
    api_token: Callable[[str], str],
) -> None:
    h = tenant.hospital
    drawn = payload_cases(mutation, sorted(HTTP_ROUTES), max_examples=50)
    token = api_token(h)
    gate = asyncio.Semaphore(8)

    async def post(web: httpx.AsyncClient, type_: str, payload: Any) -> httpx.Response:
        service, path = HTTP_ROUTES[type_]
        port = stack.service_ports[service]
        async with gate:
            return await web.post(
                f"http://127.0.0.1:{port}/hospitals/{h}/{path}",
                content=json.dumps(payload).encode(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )

    def expected(payload: Any) -> tuple[int, str]:
        reason = expected_reason(mutation, json.dumps(payload).encode())
        return (413 if reason == ReasonCode.payload_too_large else 422), reason

    async with httpx.AsyncClient(timeout=60) as web:
        responses = await asyncio.gather(*(post(web, t, p) for t, p in drawn))
    wrong = [
        f"{t} {_show(p)} -> {r.status_code} {r.text[:300]}"
        for (t, p), r in zip(drawn, responses, strict=True)
        if (r.status_code, r.json().get("reason_code")) != expected(p)
    ]
    assert not wrong, f"{len(wrong)} of {len(drawn)} not refused as expected:\n" + "\n".join(
        wrong[:10]
    )
    await still_healthy_and_nothing_stored(client, stack, tenant)


async def test_http_bodies_that_are_not_json_objects_are_refused(
    client: PlatformClient, stack: Platform, tenant: Tenant, api_token: Callable[[str], str]
) -> None:
    h = tenant.hospital
    bodies = st.one_of(
        st.binary(max_size=2000),
        json_values.map(lambda v: json.dumps(v).encode()),
    ).filter(lambda b: not _is_json_object(b))
    drawn = draw_cases(st.tuples(st.sampled_from(sorted(HTTP_ROUTES)), bodies), 50)
    headers = {"Authorization": f"Bearer {api_token(h)}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=60) as web:
        wrong = []
        for type_, body in drawn:
            service, path = HTTP_ROUTES[type_]
            url = f"http://127.0.0.1:{stack.service_ports[service]}/hospitals/{h}/{path}"
            resp = await web.post(url, content=body, headers=headers)
            if resp.status_code != 422 or resp.json().get("reason_code") != "invalid_payload":
                wrong.append(f"{type_} {body[:100]!r} -> {resp.status_code} {resp.text[:200]}")
    assert not wrong, "\n".join(wrong[:10])
    await still_healthy_and_nothing_stored(client, stack, tenant)


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def test_the_base_payloads_are_valid() -> None:
    """The mutations start from valid payloads, so what they change is what gets refused."""
    for type_, data in BASE.items():
        parse_payload(COMMANDS[type_], data)
    assert set(BASE) == set(COMMANDS)
