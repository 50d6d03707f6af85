"""Tracing end to end (issue 25): the platform as real processes, exporting over OTLP/HTTP to a
receiver this test runs; one referral driven through the contract as a hospital would, with the
W3C trace context of its own spans on its commands.

What must hold: the spans of all four services are in the hospital's one trace, each handling
the child of the publish that sent its message; and a refused command's traceparent (refused
by a rule, or for a bad envelope) is nowhere: no span is in its trace, names it as parent or
links it, and its `CommandRejected` carries the platform's own trace."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from postctl import webhooks as webhook_cli
from shared import tracing
from shared.client import HospitalKeys, PlatformClient
from shared.contracts import encode, make_cloudevent
from shared.runtime import Platform
from shared.settings import Settings
from tests.conftest import dedicated_platform, region_token_for
from tests.e2e.test_records_e2e import DEPARTMENT, _id, open_program, outreach, referral
from tests.otlp_receiver import OtlpReceiver, Span
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e

SERVICES = {"referral", "matching", "records", "analytics"}


def traceparent(trace_id: str) -> tuple[str, str]:
    """A hospital's span in `trace_id`: (its traceparent, its span id)."""
    span_id = secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", span_id


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def traced(receiver: OtlpReceiver) -> Iterator[Platform]:
    with dedicated_platform(
        "post-trace-",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.url,
        OTEL_BSP_SCHEDULE_DELAY="100",  # ms: spans leave at once, not every 5 s
        POST_NOT_YET_KNOWN_SECONDS="6",
    ) as plat:
        yield plat


def one(spans: list[Span], **where: str) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in where.items())]
    assert len(found) == 1, (where, [(s.service, s.name, s.kind) for s in found])
    return found[0]


async def eventually(
    receiver: OtlpReceiver, done: Callable[[list[Span]], bool], timeout: float = 30.0
) -> list[Span]:
    deadline = time.monotonic() + timeout
    while True:
        spans = receiver.snapshot()
        if done(spans):
            return spans
        if time.monotonic() > deadline:
            names = sorted({(s.service, s.name) for s in spans})
            raise AssertionError(f"spans not all exported: {names}")
        await asyncio.sleep(0.2)


async def test_one_referral_is_one_trace_across_the_four_services(
    traced: Platform, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    assert traced.nats is not None
    keys = HospitalKeys(traced.nats.tenants_file, tmp_path / "seeds")
    client = await PlatformClient.connect(traced.nats_url, keys=keys)
    hospital = f"h-{secrets.token_hex(5)}"
    hook = Receiver().start()  # the hospital's webhook: its deliveries are traced too
    settings = Settings(
        nats_url=traced.nats_url, database_url=traced.db_url, data_dir=traced.data_dir
    )
    try:
        await webhook_cli.register(settings, hospital, hook.url)
        await open_program(client, hospital)
        trace_id = secrets.token_hex(16)

        # RequestReferral, in the hospital's trace: referral -> matching -> records, analytics
        referral_id = _id("r")
        request, request_span = traceparent(trace_id)
        command = referral(referral_id)
        await client.send(hospital, command, traceparent=request)
        created = await client.wait_for(
            hospital, "ReferralCreated", lambda e: e["data"]["referral_id"] == referral_id
        )
        assigned = await client.wait_for(
            hospital, "SupporterAssigned", lambda e: e["data"]["referral_id"] == referral_id
        )
        # What the hospital receives carries the trace on (the platform's publish spans).
        assert created["traceparent"].split("-")[1] == trace_id
        assert assigned["traceparent"].split("-")[1] == trace_id

        # RecordOutreach, the same trace: records -> referral, analytics
        record, record_span = traceparent(trace_id)
        taken = outreach(referral_id, assigned["data"]["supporter_id"], "accepted")
        answer = await client.outcome(await client.send(hospital, taken, traceparent=record))
        assert answer["type"] == "OutreachAccepted", answer["data"]
        assert answer["traceparent"].split("-")[1] == trace_id

        # Refused by a rule (a department the hospital never launched): waits, then refused.
        refused_trace = secrets.token_hex(16)
        refused_tp, _ = traceparent(refused_trace)
        bad = referral(_id("r")).model_copy(update={"department": "cardiology"})
        refused = await client.outcome(
            await client.send(hospital, bad, traceparent=refused_tp), timeout=30
        )
        assert refused["type"] == "CommandRejected"
        assert refused["data"]["reason_code"] == "unknown_department"
        assert refused_trace not in refused.get("traceparent", "")

        # Refused for its envelope (an attribute the platform does not know).
        bad_envelope_trace = secrets.token_hex(16)
        bad_tp, _ = traceparent(bad_envelope_trace)
        ce = make_cloudevent(
            type_="RequestReferral",
            source=f"/hospitals/{hospital}/system",
            data=referral(_id("r")).to_data(),
            traceparent=bad_tp,
        )
        ce["comment"] = "free text"
        await client.send_raw(f"post.{hospital}.cmd.RequestReferral", encode(ce), ce["id"])
        rejected = await client.outcome(ce["id"])
        assert rejected["data"]["reason_code"] == "unknown_field"
        assert bad_envelope_trace not in rejected.get("traceparent", "")

        # An HTTP read, with a caller's traceparent header: traced, the header not taken.
        header_trace = secrets.token_hex(16)
        header_tp, _ = traceparent(header_trace)
        token = region_token_for(traced, "tracing")
        async with httpx.AsyncClient(base_url=traced.url("referral")) as web:
            read = await web.get(
                f"/hospitals/{hospital}/referrals/{referral_id}",
                headers={"Authorization": f"Bearer {token}", "traceparent": header_tp},
            )
        assert read.status_code == 200
    finally:
        await client.close()
        hook.stop()

    def complete(spans: list[Span]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        names = {(s.service, s.name) for s in mine}
        refusal = any(s.attributes.get("post.reason_code") == "unknown_department" for s in spans)
        unknown_field = any(s.attributes.get("post.reason_code") == "unknown_field" for s in spans)
        server = any(s.service == "referral" and s.kind == "SERVER" for s in spans)
        delivered = any(s.name == "webhook deliver" and s.trace_id == trace_id for s in spans)
        return (
            delivered
            and {
                ("referral", "process RequestReferral"),
                ("referral", "send ReferralCreated"),
                ("matching", "process ReferralCreated"),
                ("matching", "send SupporterAssigned"),
                ("records", "process SupporterAssigned"),
                ("analytics", "process ReferralCreated"),
                ("analytics", "process SupporterAssigned"),
                ("records", "process RecordOutreach"),
                ("records", "send OutreachAccepted"),
                ("referral", "process OutreachAccepted"),
                ("analytics", "process OutreachAccepted"),
            }
            <= names
            and refusal
            and unknown_field
            and server
        )

    spans = await eventually(receiver, complete)
    mine = [s for s in spans if s.trace_id == trace_id]
    assert {s.service for s in mine} >= SERVICES

    # The parent links, hop by hop.
    intake = one(mine, service="referral", name="process RequestReferral")
    assert intake.kind == "CONSUMER" and intake.parent_id == request_span
    assert intake.attributes["messaging.system"] == "nats"
    assert intake.attributes["messaging.destination.name"] == (
        f"post.{hospital}.cmd.RequestReferral"
    )
    assert intake.attributes["post.message.type"] == "RequestReferral"
    assert intake.attributes["post.hospital"] == hospital
    assert intake.attributes["post.outcome"] == "handled"
    append = [s for s in mine if s.name == "append" and s.parent_id == intake.span_id]
    assert append, "the event-store append is the handling's child"
    assert [s for s in mine if s.parent_id == intake.span_id and "db.system" in s.attributes] or [
        s for s in mine if s.parent_id == append[0].span_id
    ], "the database calls are traced"

    published = one(mine, service="referral", name="send ReferralCreated")
    assert published.kind == "PRODUCER" and published.parent_id == intake.span_id
    matched = one(mine, service="matching", name="process ReferralCreated")
    assert matched.kind == "CONSUMER" and matched.parent_id == published.span_id
    counted = one(mine, service="analytics", name="process ReferralCreated")
    assert counted.parent_id == published.span_id
    sent = one(mine, service="matching", name="send SupporterAssigned")
    assert sent.parent_id == matched.span_id
    assert one(mine, service="records", name="process SupporterAssigned").parent_id == (
        sent.span_id
    )
    assert one(mine, service="analytics", name="process SupporterAssigned").parent_id == (
        sent.span_id
    )
    outreach_span = one(mine, service="records", name="process RecordOutreach")
    assert outreach_span.parent_id == record_span
    accepted = one(mine, service="records", name="send OutreachAccepted")
    assert accepted.parent_id == outreach_span.span_id
    assert one(mine, service="referral", name="process OutreachAccepted").parent_id == (
        accepted.span_id
    )

    # The webhook's delivery of ReferralCreated is the child of its publish.
    deliveries = [s for s in mine if s.name == "webhook deliver"]
    assert published.span_id in {s.parent_id for s in deliveries}
    assert all(s.kind == "CLIENT" and s.service == "referral" for s in deliveries)
    assert {s.attributes["post.outcome"] for s in deliveries} == {"acknowledged"}
    assert hook.url not in repr(spans)

    # A refused command's traceparent is not adopted, linked, or anywhere at all.
    for foreign in (refused_trace, bad_envelope_trace, header_trace):
        assert not [s for s in spans if s.trace_id == foreign]
        assert not [s for s in spans for link in s.links if link[0] == foreign]
        assert foreign not in repr(spans)
    for code in ("unknown_department", "unknown_field"):
        [refusal] = [s for s in spans if s.attributes.get("post.reason_code") == code]
        assert refusal.name == "process RequestReferral" and refusal.service == "referral"
        assert refusal.parent_id == "" and refusal.kind == "CONSUMER"  # the platform's own root
        assert refusal.attributes["post.outcome"] == "refused"
    server = [s for s in spans if s.service == "referral" and s.kind == "SERVER"]
    assert server and all(s.parent_id == "" for s in server)
    # An HTTP span says what the access log says: the route's template, not its ids.
    [read_span] = [s for s in server if "{referral_id}" in s.attributes.get("http.route", "")]
    assert set(read_span.attributes) <= tracing.HTTP_ATTRIBUTES
    http_spans = [s for s in spans if s.kind == "SERVER" or s.name.startswith("GET ")]
    assert referral_id not in repr(http_spans)

    # No payload value in any span: the physician's id, the refused envelope's text.
    assert command.physician_id not in repr(spans)
    assert "free text" not in repr(spans)
    assert DEPARTMENT not in repr(
        [s.attributes for s in spans if "db.statement" not in s.attributes]
    )
