"""The bad-input suite at scale (issue 21): 10,000 generated bad inputs per run, over NATS
and HTTP, seeded and repeatable (``POST_BADINPUT_SEED``, ``POST_BADINPUT_COUNT``).

The inputs: bodies nested up to 10,000 levels deep (arrays, objects, in the payload, in a
field, in an envelope attribute), bodies beyond the size limit, a marker (a made-up name,
unique to the run) in field names, in envelope attribute names and values, where an id is
due, and in the ids of valid envelopes that reference things the platform does not know
(they wait for a fact, in ``waiting``, before they are refused); copies of commands already
sent; bodies that are not CloudEvents at all. What it proves:

- every answerable command gets exactly one answer, a `CommandRejected` with its reason code,
  within a bound; every body that is not a CloudEvent exactly one dead letter;
- HTTP never answers 5xx: each input gets its 413 or 422 (or 404) with its reason code;
- the marker is nowhere afterwards: no message of the ``POST`` stream, no row of any table,
  no planner statistics (``pg_statistic``, analyzed while the waiting commands held the
  marker, and again after), no log line of the services, nats-server or PostgreSQL, no HTTP
  answer;
- nothing is stored for the tenants, every service is alive and ready, and a valid command is
  answered about as fast afterwards as before (the ratio of medians, a generous bound).

Over NATS and HTTP alike every depth up to 10,000 is sent: the dispatcher answers under
`shared.contracts.top_level_id`, never decoding the body.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import string
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest

from shared import limits
from shared.client import PlatformClient
from shared.contracts import (
    COMMANDS,
    ReasonCode,
    SubmitSurveyResponse,
    cmd_subject,
    encode,
    make_cloudevent,
    parse_payload,
)
from shared.runtime import SERVICES, Platform
from tests.badinput.test_bad_input import (
    BASE,
    HTTP_ROUTES,
    new_hospital,
    onboard,
    settled,
    stored_for,
)
from tests.scan import log_files, rows_containing, statistics_containing, stream_messages

pytestmark = [pytest.mark.e2e, pytest.mark.badinput]

SEED = int(os.environ.get("POST_BADINPUT_SEED", "21"))
COUNT = int(os.environ.get("POST_BADINPUT_COUNT", "10000"))
NATS_SHARE = 0.4  # of COUNT; the rest over HTTP
NATS_MAX_DEPTH = 10_000  # far past Python's recursion limit
HTTP_MAX_DEPTH = 10_000
ANSWER_BOUND_SECONDS = 150.0  # the last answer: the waiting ones wait 6 s (tests/conftest.py)
SLOWER_AT_MOST = 8.0  # a valid command after the barrage, against before (medians)
FHIR_PATH = "fhir/AdverseEvent"
SENT_AT = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
DEEP = "\u0000deep\u0000"  # where a deep value goes (Generator.dumps)
NOT_YET_KNOWN = {
    ReasonCode.unknown_referral,
    ReasonCode.unknown_supporter,
    ReasonCode.unknown_department,
    ReasonCode.not_assigned_supporter,
}
ID_FIELDS = {
    "referral_id",
    "physician_id",
    "supporter_id",
    "response_id",
    "referrer_id",
    "department",
}


@dataclass
class Case:
    """One input: where it goes, and what must come of it."""

    kind: str
    subject: str = ""  # NATS
    route: tuple[str, str] = ("", "")  # HTTP: (service, path under /hospitals/{h}/)
    body: bytes = b""
    command_id: str | None = None  # answerable over NATS
    msg_id: str | None = None
    reasons: set[str] = field(default_factory=set)  # acceptable reason codes
    status: int | None = None  # HTTP: the status due (None: any 4xx with a reason code)
    dead_letter: bool = False


# --- generation ---------------------------------------------------------------------------------


class Generator:
    def __init__(self, rng: random.Random, tag: str, hospitals: list[str]) -> None:
        self.rng = rng
        self.tag = tag
        self.hospitals = hospitals

    def marker(self) -> str:
        """Free text naming someone, the run's tag in it: never a valid id or slug."""
        return self.rng.choice(["Dr Jane ", "note: ", "Jane.Doe@", "x "]) + self.tag

    def id_marker(self) -> str:
        """The tag as a valid pseudonymous id (and slug): it passes validation."""
        return f"mk{self.tag}{self.rng.randint(0, 10**6)}"

    def deep(self, depth: int, marker: bool = True) -> bytes:
        """A JSON value nested `depth` levels: arrays and objects, mixed (as text: building
        it as Python values and dumping them would recurse)."""
        opens = self.rng.choices(["[", '{"a":', '{"id":', '{"data":'], k=depth)
        closes = "".join("]" if o == "[" else "}" for o in reversed(opens))
        leaf = json.dumps(self.marker()) if marker and self.rng.random() < 0.5 else "1"
        return ("".join(opens) + leaf + closes).encode()

    def text(self, size: int) -> str:
        alphabet = string.ascii_letters + string.digits + " é\u4e2d"
        chunk = "".join(self.rng.choice(alphabet) for _ in range(256))
        return (chunk * (size // 256 + 1))[:size] + self.tag

    def hex(self) -> str:
        return f"{self.rng.getrandbits(48):012x}"

    def envelope(self, h: str, type_: str, data: Any) -> dict[str, Any]:
        # The ids are the hospital's (processed as "{hospital}:{id}"): each run's are new.
        command_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        return make_cloudevent(
            type_=type_,
            source=f"/hospitals/{h}/badinput",
            data=data,
            id_=command_id,
            time=SENT_AT,
        )

    def dumps(self, value: Any, deep: bytes = b"") -> bytes:
        """`value` as JSON, with `deep` where it holds `DEEP`."""
        return json.dumps(value).encode().replace(json.dumps(DEEP).encode(), deep, 1)

    # -- over NATS --

    def nats_case(self) -> Case:
        rng = self.rng
        h = rng.choice(self.hospitals)
        type_ = rng.choice(sorted(COMMANDS))
        data: Any = dict(BASE[type_])
        ce = self.envelope(h, type_, data)
        reasons: set[str] = {ReasonCode.invalid_payload}
        kind = rng.choices(
            [
                "deep_data",
                "deep_field",
                "deep_attribute",
                "too_large",
                "marker_field",
                "marker_attribute_name",
                "marker_attribute_value",
                "marker_in_envelope",
                "marker_value",
                "unknown_things",
                "not_a_cloudevent",
                "deep_without_id",
            ],
            weights=[10, 10, 6, 3, 12, 8, 8, 8, 10, 12, 4, 3],
        )[0]
        depth = rng.randint(limits.COMMAND.max_depth + 1, NATS_MAX_DEPTH)
        deep = self.deep(depth)
        if kind == "deep_data":
            ce["data"] = DEEP
            reasons = {ReasonCode.payload_too_deep}
        elif kind == "deep_field":
            data[rng.choice(sorted(data))] = DEEP
            reasons = {ReasonCode.payload_too_deep}
        elif kind == "deep_attribute":
            ce[rng.choice(["subject", "comment", "correlationid"])] = DEEP
            reasons = {ReasonCode.payload_too_deep}
        elif kind == "too_large":
            data[rng.choice(sorted(data))] = self.text(rng.randint(66_000, 120_000))
            reasons = {ReasonCode.payload_too_large}
        elif kind == "marker_field":
            for _ in range(rng.randint(1, 3)):
                data[self.marker() + rng.choice(["", "_name", " (patient)"])] = rng.choice(
                    [self.marker(), 1, [self.marker()], {"x": self.marker()}]
                )
            reasons = {ReasonCode.unknown_field}
        elif kind == "marker_attribute_name":
            ce[self.marker()] = rng.choice(["x", self.marker(), 7])
            reasons = {ReasonCode.unknown_field}
        elif kind == "marker_attribute_value":
            ce[rng.choice(["comment", "physician", "note", "partitionkey"])] = self.marker()
            reasons = {ReasonCode.unknown_field}
        elif kind == "marker_in_envelope":
            attribute = rng.choice(["source", "type", "time", "specversion", "datacontenttype"])
            ce[attribute] = self.marker()
            if rng.random() < 0.5:  # and in the attributes a command may carry, too
                ce[rng.choice(["subject", "dataschema", "traceparent"])] = self.marker()
        elif kind == "marker_value":  # where an id is due, or a number (a name may be text)
            fields = sorted(ID_FIELDS & set(data)) or sorted(set(data) - {"name"})
            data[rng.choice(fields)] = self.marker()
        elif kind == "unknown_things":
            return self._unknown_things(h)
        elif kind == "not_a_cloudevent":
            body = rng.choice(
                [
                    b"",
                    b"{",
                    b"null",
                    b"[]",
                    json.dumps({"specversion": "1.0", "data": {}}).encode(),
                    bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))),
                ]
            )
            return Case(kind, cmd_subject(h, type_), body=body, dead_letter=True)
        else:  # deep_without_id: its dead letter is kept as it came, so no marker in it
            body = self.deep(depth, marker=False)
            return Case(kind, cmd_subject(h, type_), body=body, dead_letter=True)
        return Case(
            kind,
            cmd_subject(h, type_),
            body=self.dumps(ce, deep),
            command_id=ce["id"],
            msg_id=ce["id"],
            reasons=reasons,
        )

    def _unknown_things(self, h: str) -> Case:
        """A valid command whose ids (the marker) name nothing the platform knows: it waits
        for the fact (kept in ``waiting``), then is refused."""
        rng = self.rng
        type_ = rng.choice(
            ["RecordOutreach", "RecordInteraction", "RequestReferral", "RegisterSupporter"]
        )
        data = dict(BASE[type_])
        if type_ in ("RecordOutreach", "RecordInteraction"):
            data["referral_id"] = self.id_marker()
        else:
            data["department"] = self.id_marker()
            if type_ == "RequestReferral":
                data["referral_id"] = f"r-{self.hex()}"
            else:
                data["supporter_id"] = f"s-{self.hex()}"
        parse_payload(COMMANDS[type_], data)  # valid: only what it names is unknown
        ce = self.envelope(h, type_, data)
        return Case(
            "unknown_things",
            cmd_subject(h, type_),
            body=encode(ce),
            command_id=ce["id"],
            msg_id=ce["id"],
            reasons=set(NOT_YET_KNOWN),
        )

    # -- over HTTP --

    def http_case(self) -> Case:
        rng = self.rng
        route = rng.choice([*sorted(HTTP_ROUTES.values()), ("referral", FHIR_PATH)])
        if route[1] == FHIR_PATH:
            return self._fhir_case(route)
        type_ = next(t for t, r in HTTP_ROUTES.items() if r == route)
        data: Any = dict(BASE[type_])
        kind = rng.choices(
            [
                "deep",
                "deep_field",
                "too_large",
                "marker_field",
                "marker_value",
                "unknown_things",
                "not_json",
                "utf16",
            ],
            weights=[16, 10, 3, 14, 12, 10, 6, 4],
        )[0]
        depth = HTTP_MAX_DEPTH
        if rng.random() < 0.7:
            depth = rng.randint(limits.COMMAND.max_depth + 1, 2000)
        if kind == "deep":
            return Case(
                kind,
                route=route,
                body=self.deep(depth),
                reasons={ReasonCode.payload_too_deep},
                status=422,
            )
        if kind == "deep_field":
            data[rng.choice(sorted(data))] = DEEP
            return Case(
                kind,
                route=route,
                body=self.dumps(data, self.deep(depth)),
                reasons={ReasonCode.payload_too_deep},
                status=422,
            )
        if kind == "too_large":
            data[rng.choice(sorted(data))] = self.text(rng.randint(66_000, 120_000))
            return Case(
                kind,
                route=route,
                body=self.dumps(data),
                reasons={ReasonCode.payload_too_large},
                status=413,
            )
        if kind == "marker_field":
            data[self.marker()] = rng.choice([self.marker(), [1], {"a": self.marker()}])
            return Case(
                kind,
                route=route,
                body=self.dumps(data),
                reasons={ReasonCode.unknown_field},
                status=422,
            )
        if kind == "marker_value":
            fields = sorted(ID_FIELDS & set(data))
            data[rng.choice(fields)] = self.marker()
            return Case(
                kind,
                route=route,
                body=self.dumps(data),
                reasons={ReasonCode.invalid_payload},
                status=422,
            )
        if kind == "unknown_things":
            if "referral_id" in data and type_ != "RequestReferral":
                data["referral_id"] = self.id_marker()
            else:
                data["department"] = self.id_marker()
                if type_ == "RequestReferral":
                    data["referral_id"] = f"r-{self.hex()}"
                if type_ == "SubmitSurveyResponse":
                    data["response_id"] = f"q-{self.hex()}"
            return Case(kind, route=route, body=self.dumps(data), reasons=set(NOT_YET_KNOWN))
        if kind == "not_json":
            body = (self.marker() + " was upset").encode()
            return Case(
                kind, route=route, body=body, reasons={ReasonCode.invalid_payload}, status=422
            )
        return Case(
            kind,
            route=route,
            body=json.dumps({**data, "referral_id": self.marker()}).encode("utf-16"),
            reasons={ReasonCode.invalid_payload},
            status=422,
        )

    def _fhir_case(self, route: tuple[str, str]) -> Case:
        rng = self.rng
        kind = rng.choices(["fhir_deep", "fhir_not_json", "fhir_too_large"], [20, 6, 0.3])[0]
        report: dict[str, Any]
        reason: str
        if kind == "fhir_deep":
            depth = rng.choice([HTTP_MAX_DEPTH, rng.randint(limits.FHIR.max_depth + 1, 3000)])
            report = {"resourceType": "AdverseEvent", "id": "ae-1", "text": DEEP}
            body = self.dumps(report, self.deep(depth))
            status, reason = 422, ReasonCode.payload_too_deep
        elif kind == "fhir_not_json":
            body, status, reason = (self.marker() + " fell").encode(), 422, ""
        else:
            report = {"resourceType": "AdverseEvent", "text": {"div": "x" * limits.FHIR.max_bytes}}
            body, status, reason = self.dumps(report), 413, ReasonCode.payload_too_large
        return Case(kind, route=route, body=body, reasons={reason}, status=status)


def generate(tag: str, hospitals: list[str]) -> tuple[list[Case], list[Case]]:
    """The run's inputs: the same for the same seed (the tag, the hospitals and the command
    ids aside, which each run draws afresh)."""
    rng = random.Random(SEED)
    gen = Generator(rng, tag, hospitals)
    over_nats = round(COUNT * NATS_SHARE)
    nats = [gen.nats_case() for _ in range(over_nats)]
    # Copies of answerable commands, sent again without Nats-Msg-Id (so JetStream keeps
    # them): the platform must not answer twice.
    copies = [
        Case("copy", c.subject, body=c.body, command_id=None, msg_id=None)
        for c in rng.sample([c for c in nats if c.command_id], k=over_nats // 20)
    ]
    http = [gen.http_case() for _ in range(COUNT - over_nats)]
    return nats + copies, http


# --- the run ------------------------------------------------------------------------------------


async def valid_command_seconds(client: PlatformClient, hospital: str, n: int = 7) -> float:
    """The median time a valid command takes to be answered (one at a time)."""
    took = []
    for _ in range(n):
        data = {**BASE["SubmitSurveyResponse"], "response_id": f"q-{uuid.uuid4().hex[:12]}"}
        start = time.perf_counter()
        answer = await client.send_and_wait(
            hospital, parse_payload(SubmitSurveyResponse, data), timeout=60
        )
        took.append(time.perf_counter() - start)
        assert answer["type"] == "SurveyResponseRecorded", answer["data"]
    return statistics.median(took)


async def publish(client: PlatformClient, cases: list[Case]) -> None:
    gate = asyncio.Semaphore(64)

    async def one(case: Case) -> None:
        async with gate:
            await client.send_raw(case.subject, case.body, msg_id=case.msg_id)

    await asyncio.gather(*(one(c) for c in cases))


async def analyze_while_waiting(db_url: str, hospitals: list[str]) -> int:
    """ANALYZE every table while commands naming the marker wait (as autovacuum may at any
    moment): returns how many waited then, so the statistics scan is not vacuous."""
    conn = await asyncpg.connect(db_url)
    try:
        for _ in range(600):
            waiting = 0
            for schema in SERVICES:
                waiting += await conn.fetchval(
                    f'SELECT count(*) FROM "{schema}".waiting WHERE hospital = ANY($1::text[])',
                    hospitals,
                )
            if waiting:
                break
            await asyncio.sleep(0.05)
        for schema in SERVICES:  # what holds them now (the scan at the end analyzes all)
            await conn.execute(f'ANALYZE "{schema}".waiting')
        return waiting
    finally:
        await conn.close()


async def answers_by_command(
    client: PlatformClient, ids: list[str], bound: float
) -> dict[str, list[dict[str, Any]]]:
    """Each command's answers, once every one has one (or the bound is over)."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if all(client.caused_by(i) for i in ids):
            break
        await asyncio.sleep(0.5)
    return {i: client.caused_by(i) for i in ids}


async def post_all(
    stack: Platform, hospital: str, token: str, cases: list[Case]
) -> list[httpx.Response]:
    gate = asyncio.Semaphore(16)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def one(web: httpx.AsyncClient, case: Case) -> httpx.Response:
        service, path = case.route
        url = f"http://127.0.0.1:{stack.service_ports[service]}/hospitals/{hospital}/{path}"
        async with gate:
            return await web.post(url, content=case.body, headers=headers)

    # Idle connections are dropped well before the server's keep-alive ends (no reset race).
    keepalive = httpx.Limits(keepalive_expiry=1.0)
    async with httpx.AsyncClient(timeout=120, limits=keepalive) as web:
        return await asyncio.gather(*(one(web, c) for c in cases))


def http_reason(resp: httpx.Response) -> str:
    body = resp.json()
    if body.get("resourceType") == "OperationOutcome":
        codes = [
            c.get("code", "") for i in body["issue"] for c in i.get("details", {}).get("coding", [])
        ]
        return codes[0] if codes else ""
    return str(body.get("reason_code", ""))


async def test_ten_thousand_bad_inputs_cost_one_answer_each_and_leave_nothing(
    client: PlatformClient, stack: Platform, api_token: Callable[[str], str]
) -> None:
    tag = uuid.uuid4().hex[:12]
    hospitals = [new_hospital(), new_hospital()]
    for h in hospitals:
        await onboard(client, h)
    fast_before = await valid_command_seconds(client, hospitals[0])
    await settled(client, stack, hospitals)
    before = await stored_for(stack, hospitals)
    events_before = len(client.events)
    nats, http = generate(tag, hospitals)
    assert len(nats) + len(http) >= COUNT
    kinds = Counter(c.kind for c in [*nats, *http])
    assert len(kinds) >= 15, kinds

    dead: list[tuple[str, bytes]] = []

    async def on_dead_letter(msg: Any) -> None:
        dead.append((msg.subject, msg.data))

    subs = [await client.nc.subscribe(f"post.{h}.dlq.>", cb=on_dead_letter) for h in hospitals]
    try:
        await client.nc.flush()
        # The waiting ones first, so that ANALYZE finds them waiting.
        nats.sort(key=lambda c: c.kind != "unknown_things")
        started = time.monotonic()
        analyzing = asyncio.create_task(analyze_while_waiting(stack.db_url, hospitals))
        await publish(client, nats)
        waited = await analyzing
        responses = await post_all(stack, hospitals[1], api_token(hospitals[1]), http)
        answerable = [c for c in nats if c.command_id]
        got = await answers_by_command(
            client, [c.command_id for c in answerable if c.command_id], ANSWER_BOUND_SECONDS
        )
        answered_in = time.monotonic() - started
        expected_dead = [c for c in nats if c.dead_letter]
        for _ in range(600):
            if len(dead) >= len(expected_dead):
                break
            await asyncio.sleep(0.1)
    finally:
        for sub in subs:
            await sub.unsubscribe()

    problems: list[str] = []
    # Over NATS: exactly one answer each, the reason code due.
    for case in answerable:
        assert case.command_id is not None
        these = got[case.command_id]
        if len(these) != 1:
            problems.append(f"{case.kind}: {len(these)} answers to {case.command_id}")
            continue
        answer = these[0]
        if answer["type"] != "CommandRejected" or answer["data"]["reason_code"] not in (
            case.reasons
        ):
            problems.append(f"{case.kind}: {answer['type']} {str(answer['data'])[:200]}")
    assert sorted(dead) == sorted(
        (c.subject.replace(".cmd.", ".dlq."), c.body) for c in expected_dead
    )
    # Over HTTP: never 5xx, the status and reason code due, nothing sent repeated.
    for case, resp in zip(http, responses, strict=True):
        if resp.status_code >= 500 or (case.status is not None and resp.status_code != case.status):
            problems.append(f"{case.kind} {case.route}: {resp.status_code} {resp.text[:200]}")
        elif not 400 <= resp.status_code < 500:
            problems.append(f"{case.kind} {case.route}: accepted {resp.text[:200]}")
        elif case.reasons != {""} and http_reason(resp) not in case.reasons:
            problems.append(f"{case.kind} {case.route}: {resp.text[:200]}")
        if tag in resp.text:
            problems.append(f"{case.kind} {case.route}: echoes the marker: {resp.text[:200]}")
    assert not problems, f"{len(problems)} inputs went wrong:\n" + "\n".join(problems[:20])
    assert answered_in < ANSWER_BOUND_SECONDS
    assert waited > 0, "no command waited while ANALYZE ran: the statistics check proves nothing"

    # Nothing kept: the tenants' state, the stream, every table, the statistics, the logs.
    await settled(client, stack, hospitals)
    assert await stored_for(stack, hospitals) == before
    emitted = Counter(
        e["type"] for e in client.events[events_before:] if e["_subject"].split(".")[1] in hospitals
    )
    assert set(emitted) <= {"CommandRejected"}, emitted
    # The copies came after their originals: still one answer each.
    twice = [
        c.kind for c in answerable if c.command_id and len(client.caused_by(c.command_id)) != 1
    ]
    assert not twice, Counter(twice)
    for _ in range(40):  # a refused command is erased just after its answer is committed
        leaks = [
            f"stream #{seq} {subject}: {body[:200]!r}"
            for seq, subject, body in await stream_messages(client)
            if tag.encode() in body or tag in subject
        ]
        if not leaks:
            break
        await asyncio.sleep(0.5)
    leaks += await rows_containing(stack.db_url, tag)
    leaks += [
        f"pg_statistic: {s}" for s in await statistics_containing(stack.db_url, tag, analyze=False)
    ]
    leaks += [f"pg_statistic: {s}" for s in await statistics_containing(stack.db_url, tag)]
    for path in log_files(stack):
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if tag.encode() in line:
                leaks.append(f"{path.name}:{number}: {line[:300]!r}")
    assert not leaks, "the marker was kept:\n" + "\n".join(leaks[:20])

    # Healthy, and as fast as before.
    async with httpx.AsyncClient(timeout=30) as web:
        for name in SERVICES:
            assert stack.processes[name].alive(), f"the {name} service died"
            ready = await web.get(f"http://127.0.0.1:{stack.service_ports[name]}/readyz")
            assert ready.status_code == 200, (name, ready.text)
    fast_after = await valid_command_seconds(client, hospitals[0])
    assert fast_after <= SLOWER_AT_MOST * fast_before, (fast_before, fast_after)


def test_the_inputs_are_the_same_for_the_same_seed() -> None:
    """Repeatable: the same seed (and marker, and hospitals) draws the same inputs."""

    def drawn() -> list[tuple[str, str, tuple[str, str], bytes]]:
        nats, http = generate("0123456789ab", ["bad-a", "bad-b"])
        return [(c.kind, c.subject, c.route, c.body) for c in [*nats, *http]]

    first, second = drawn(), drawn()
    assert len(first) >= COUNT and first == second
