"""shared/tracing.py: the W3C trace context rules and whose context a span adopts, pure (an
in-memory exporter; no NATS, no PostgreSQL, nothing installed globally)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from shared import tracing

SENDER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SENDER = f"00-{SENDER_TRACE}-00f067aa0ba902b7-01"


def body(traceparent: str | None = SENDER, **more: object) -> bytes:
    ce: dict[str, object] = {"specversion": "1.0", "id": "c-1", "type": "T", "data": {}}
    if traceparent is not None:
        ce["traceparent"] = traceparent
    ce.update(more)
    return json.dumps(ce).encode()


# --- parsing, pure ------------------------------------------------------------------------


def test_a_w3c_traceparent_is_parsed() -> None:
    ctx = tracing.parse_traceparent(SENDER)
    assert ctx is not None
    assert f"{ctx.trace_id:032x}" == SENDER_TRACE
    assert f"{ctx.span_id:016x}" == "00f067aa0ba902b7"
    assert ctx.trace_flags.sampled and ctx.is_remote
    assert tracing.format_traceparent(ctx) == SENDER


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        "",
        SENDER.upper(),  # hex is lowercase
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{SENDER_TRACE}-{'0' * 16}-01",  # all-zero span id
        f"ff-{SENDER_TRACE}-00f067aa0ba902b7-01",  # a version the platform does not take
        f"01-{SENDER_TRACE}-00f067aa0ba902b7-01-extra",
        SENDER + " ",
        SENDER[:-1],
        "Dr. Jane Doe, ward 4",  # anything a sender may put in the attribute
    ],
)
def test_anything_else_is_no_context(value: object) -> None:
    assert tracing.parse_traceparent(value) is None


def test_tracestate_is_kept_only_when_well_formed() -> None:
    state = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    ctx = tracing.parse_traceparent(SENDER, state)
    assert ctx is not None and ctx.trace_state.to_header() == state
    for bad in ("Jane Doe", "a=b,,=c", "x" * 600, 7):
        ctx = tracing.parse_traceparent(SENDER, bad)
        assert ctx is not None and len(ctx.trace_state) == 0


def test_the_envelope_context_is_its_attributes() -> None:
    assert tracing.envelope_context(body()) == tracing.parse_traceparent(SENDER)
    assert tracing.envelope_context(body(None)) is None
    assert tracing.envelope_context(b"not json") is None
    assert tracing.envelope_context(b"[1]") is None
    with_state = tracing.envelope_context(body(tracestate="k=v"))
    assert with_state is not None and with_state.trace_state.to_header() == "k=v"
    without = tracing.envelope_context(body(tracestate="k=v"), state=False)
    assert without is not None and len(without.trace_state) == 0


def test_context_headers() -> None:
    ctx = tracing.parse_traceparent(SENDER, "k=v")
    assert ctx is not None
    assert tracing.context_headers(ctx) == {"traceparent": SENDER, "tracestate": "k=v"}
    assert tracing.context_headers(tracing.trace.INVALID_SPAN_CONTEXT) == {}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_SERVICE_NAME": "x"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, ["otlp"]),
    ],
)
def test_off_unless_the_otel_variables_ask(env: dict[str, str], expected: list[str]) -> None:
    assert tracing.exporters(env) == expected
    assert tracing.configured(env) is bool(expected)


def test_off_nothing_is_installed_and_nothing_is_done() -> None:
    assert not tracing.setup("test", {})
    assert tracing.TRACER is None
    assert tracing.current_context() == {}
    with tracing.span("x") as span, tracing.answering():
        assert not span.is_recording()


@pytest.mark.parametrize(
    ("kind", "outcome", "kept"),
    [
        ("evt", "ok", True),
        ("evt", "ignored", True),
        ("evt", "error", True),
        ("cmd", "ok", True),
        ("cmd", "rejected", False),
        ("cmd", "dead_letter", False),
        ("cmd", "waiting", False),
        ("cmd", "duplicate", False),
        ("cmd", "error", False),
    ],
)
def test_whose_context_a_handling_keeps(kind: str, outcome: str, kept: bool) -> None:
    assert tracing.keeps_sender(kind, outcome) is kept


# --- spans, with an in-memory exporter ------------------------------------------------------


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    gate = tracing._Gate()
    gate.processors.append(SimpleSpanProcessor(exporter))
    provider = TracerProvider()
    provider.add_span_processor(gate)
    monkeypatch.setattr(tracing, "_GATE", gate)
    monkeypatch.setattr(tracing, "TRACER", provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def handle(kind: str, outcome: str, raw: bytes = body(), *, answer: bool = False) -> None:
    with tracing.handling("referral", "post.h-1.cmd.T", kind, "T", "h-1", raw) as h:
        with tracing.span("append"):
            pass
        if answer:
            with tracing.answering(), tracing.span("append"):
                h.stored = tracing.current_context()  # type: ignore[attr-defined]
        h.finish(outcome, reason_code="unknown_department" if outcome == "rejected" else "")


def trace_ids(exporter: InMemorySpanExporter) -> set[str]:
    return {f"{s.context.trace_id:032x}" for s in exporter.get_finished_spans()}


def test_an_event_handling_is_the_child_of_its_envelope(spans: InMemorySpanExporter) -> None:
    handle("evt", "ok")
    process, append = sorted(spans.get_finished_spans(), key=lambda s: s.name, reverse=True)
    assert process.kind is SpanKind.CONSUMER
    assert process.parent is not None and f"{process.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert f"{process.context.trace_id:032x}" == SENDER_TRACE
    assert append.parent is not None and append.parent.span_id == process.context.span_id
    attrs = dict(process.attributes or {})
    assert attrs["messaging.system"] == "nats"
    assert attrs["messaging.destination.name"] == "post.h-1.cmd.T"
    assert attrs["post.hospital"] == "h-1" and attrs["post.outcome"] == "handled"


def test_a_taken_command_keeps_its_senders_context(spans: InMemorySpanExporter) -> None:
    handle("cmd", "ok")
    finished = spans.get_finished_spans()
    assert {s.name for s in finished} == {"process T", "append"}
    assert trace_ids(spans) == {SENDER_TRACE}


@pytest.mark.parametrize("outcome", ["rejected", "waiting", "duplicate", "dead_letter", "error"])
def test_a_command_not_taken_leaves_nothing_of_its_senders_context(
    spans: InMemorySpanExporter, outcome: str
) -> None:
    handle("cmd", outcome, answer=outcome == "rejected")
    finished = spans.get_finished_spans()
    assert SENDER_TRACE not in trace_ids(spans)
    assert not [link for s in finished for link in s.links]
    [process] = [s for s in finished if s.name == "process T"]
    assert process.parent is None  # a root of the platform's own
    assert process.kind is SpanKind.CONSUMER
    attrs = dict(process.attributes or {})
    assert attrs["post.outcome"] == tracing.OUTCOMES[outcome]
    if outcome == "rejected":
        assert attrs["post.reason_code"] == "unknown_department"
        # the answer's append is the refusal span's child, exported
        [append] = [s for s in finished if s.name == "append"]
        assert append.parent is not None and append.parent.span_id == process.context.span_id
    assert SENDER_TRACE not in repr([s.to_json() for s in finished])


def test_a_refused_commands_answer_remembers_the_platforms_span(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.handling("referral", "post.h-1.cmd.T", "cmd", "T", "h-1", body()) as h:
        with tracing.answering():
            stored = tracing.current_context()
        h.finish("rejected", reason_code="invalid_payload")
    assert stored and SENDER_TRACE not in stored["traceparent"]
    [process] = spans.get_finished_spans()
    assert tracing.format_traceparent(process.context) == stored["traceparent"]


def test_a_failure_says_its_class_never_its_text(spans: InMemorySpanExporter) -> None:
    with (
        pytest.raises(ValueError),
        tracing.handling("records", "post.h-1.evt.T", "evt", "T", "h-1", body()),
    ):
        raise ValueError("Dr. Jane Doe")
    [process] = spans.get_finished_spans()
    assert process.status.status_code is StatusCode.ERROR
    assert process.status.description == "ValueError"
    assert dict(process.attributes or {})["post.outcome"] == "error"
    assert not process.events  # no exception event, with its message
    assert "Jane" not in process.to_json()


def test_a_publish_is_the_child_of_the_work_that_appended(spans: InMemorySpanExporter) -> None:
    stored = {"traceparent": SENDER, "hospital": "h-1"}
    with tracing.producing("referral", "post.h-1.evt.E", "E", "h-1", stored) as context:
        pass
    [send] = spans.get_finished_spans()
    assert send.kind is SpanKind.PRODUCER
    assert send.parent is not None and f"{send.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert context == {"traceparent": tracing.format_traceparent(send.context)}
    # no remembered context (appended while tracing was off): a root
    with tracing.producing("referral", "post.h-1.evt.E", "E", "h-1", {}) as context:
        pass
    assert spans.get_finished_spans()[-1].parent is None


def test_an_http_span_keeps_what_the_access_log_says(spans: InMemorySpanExporter) -> None:
    """The HTTP instrumentations' spans lose the path with its ids, the query, the caller's
    address and user agent, exception events and status texts on their way out (`_Gate`)."""
    provider = TracerProvider()
    provider.add_span_processor(tracing._GATE)
    http = provider.get_tracer("opentelemetry.instrumentation.asgi")
    span = http.start_span(
        "GET /hospitals/{hospital}/referrals/{referral_id}",
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": "GET",
            "http.route": "/hospitals/{hospital}/referrals/{referral_id}",
            "url.path": "/hospitals/h-1/referrals/r-secret",
            "url.query": "physician=p-1",
            "client.address": "10.1.2.3",
            "user_agent.original": "St Mary's EHR",
            "http.response.status_code": 500,
        },
    )
    span.add_event("exception", {"exception.message": "Dr. Jane Doe"})
    span.set_status(StatusCode.ERROR, "ValueError: Dr. Jane Doe")
    span.end()
    [exported] = spans.get_finished_spans()
    assert dict(exported.attributes or {}) == {
        "http.request.method": "GET",
        "http.route": "/hospitals/{hospital}/referrals/{referral_id}",
        "http.response.status_code": 500,
    }
    assert not exported.events and exported.status.description is None
    assert exported.status.status_code is StatusCode.ERROR
    assert exported.kind is SpanKind.SERVER
    # the platform's own spans keep their attributes
    with tracing.span("append", post_events=2):
        pass
    assert dict(spans.get_finished_spans()[-1].attributes or {}) == {"post.events": 2}


def test_a_database_call_outside_traced_work_is_not_sampled() -> None:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision
    from opentelemetry.trace import NonRecordingSpan, set_span_in_context

    sampler = tracing._NoOrphanQueries(ALWAYS_ON)
    query = {"db.system": "postgresql"}
    orphan = sampler.should_sample(Context(), 1, "SELECT", SpanKind.CLIENT, query)
    assert orphan.decision is Decision.DROP
    parent = tracing.parse_traceparent(SENDER)
    assert parent is not None
    inside = set_span_in_context(NonRecordingSpan(parent))
    assert sampler.should_sample(inside, 1, "SELECT", SpanKind.CLIENT, query).decision is (
        Decision.RECORD_AND_SAMPLE
    )
    root = sampler.should_sample(Context(), 1, "process T", SpanKind.CONSUMER, {})
    assert root.decision is Decision.RECORD_AND_SAMPLE
