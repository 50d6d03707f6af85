"""Tracing: W3C trace context on every message the platform sends, OpenTelemetry spans of its
work. Off unless the standard ``OTEL_*`` variables ask for it (`configured`), and then nothing
is installed: `TRACER` stays None and the hot path's one check is ``tracing.TRACER is None``.

What is traced, each once, here: the handling of a message (kind CONSUMER, `handling`), an
append to the event store (`span`), the outbox's publish of an event (kind PRODUCER,
`producing`: the published envelope's ``traceparent``/``tracestate`` attributes and its NATS
headers carry that span's context, so the next service's handling is its child), the timers'
and the webhooks' work, the HTTP routes (FastAPI) and the database calls (asyncpg).

The rules (docs/decisions.md, "Tracing"):

- An event's handling is the child of its envelope's ``traceparent`` (the platform's own: the
  publish span of the service that sent it). The events it appends remember the handling span
  (``traceparent`` in their stored metadata), so a publish in a later batch still links them.
- A command is a hospital's text. Its handling is the child of the hospital's ``traceparent``
  only if the command is taken: until its fate is known, the spans of its handling are held
  back (`_Gate`); refused, malformed, waiting, a duplicate or failed, they are dropped and a
  root span of the platform's own stands for the handling, and its `CommandRejected` is
  appended under that span (`answering`): the sender's context is never kept, echoed or
  logged. No caller's ``traceparent`` HTTP header is taken (the global propagator extracts
  nothing: messages are propagated here, explicitly).
- A span's attributes are what the logs already bind (service, message type, hospital, outcome,
  reason code) and never a payload value, an error's text or a SQL parameter.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from pydantic_core import from_json

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider

# Set by `setup` when tracing is on; None (nothing installed, nothing done) otherwise.
TRACER: trace.Tracer | None = None
_PROVIDER: TracerProvider | None = None

# W3C Trace Context, version 00, exactly: lowercase hex, neither id all zeros. Anything else
# (a later version's extra fields included) is not a context the platform takes.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})\Z")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
# tracestate: list-members key=value, comma-separated (W3C: at most 32 members, 512 chars).
_TRACESTATE_MEMBER = re.compile(
    r"[a-z0-9][a-z0-9_\-*/@]{0,255}=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,256}"
)

MESSAGING_SYSTEM = "nats"
# What a handling span says of how the message ended (shared/dispatch.py's `Fate`s, named for
# a reader of traces).
OUTCOMES = {
    "ok": "handled",
    "duplicate": "duplicate",
    "rejected": "refused",
    "waiting": "waiting",
    "error": "error",
    "ignored": "ignored",
    "dead_letter": "dead_letter",
    "held": "held",
    "retrying": "retrying",
}


# -- on or off: the OTEL_* variables ------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def exporters(env: Mapping[str, str] | None = None) -> list[str]:
    """The span exporters the environment asks for ([] = tracing off): ``OTEL_TRACES_EXPORTER``
    (``otlp``, ``console``, ``none``; comma-separated), else ``otlp`` when an OTLP endpoint is
    given (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT``). ``OTEL_SDK_DISABLED=true``
    turns it all off; with none of these set, tracing is off."""
    env = os.environ if env is None else env
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return []
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        chosen = [n.strip() for n in named.split(",") if n.strip()]
        return [n for n in chosen if n != "none"] if "none" not in chosen else []
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return ["otlp"]
    return []


def configured(env: Mapping[str, str] | None = None) -> bool:
    return bool(exporters(env))


# The spans of a command's handling held back until it is taken (`handling`), else None.
_HELD: ContextVar[list[ReadableSpan] | None] = ContextVar("post_tracing_held", default=None)


class _Gate(SpanProcessor):
    """The one span processor of the provider: passes ended spans on to the exporting ones,
    except those of a command's handling not yet taken (`_HELD`), which `handling` forwards
    or drops once the command's fate is known."""

    def __init__(self) -> None:
        self.processors: list[SpanProcessor] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        for p in self.processors:
            p.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        scope = span.instrumentation_scope.name if span.instrumentation_scope else ""
        if scope.startswith(_HTTP_SCOPES):
            span = http_span_as_logged(span)
        held = _HELD.get()
        if held is not None:
            held.append(span)
            return
        self.forward(span)

    def forward(self, span: ReadableSpan) -> None:
        for p in self.processors:
            p.on_end(span)

    def shutdown(self) -> None:
        for p in self.processors:
            p.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self.processors)


_GATE = _Gate()

# The HTTP instrumentations' spans keep what the `http_access` log says of a request (its
# method, route template and status), not the path with its ids, the query, the caller's
# address or user agent: the rest of their attributes are dropped before export.
_HTTP_SCOPES = ("opentelemetry.instrumentation.asgi", "opentelemetry.instrumentation.fastapi")
HTTP_ATTRIBUTES = frozenset(
    {
        "http.method",
        "http.request.method",
        "http.route",
        "http.status_code",
        "http.response.status_code",
        "http.scheme",
        "url.scheme",
        "http.flavor",
        "network.protocol.version",
        "asgi.event.type",
        "error.type",
    }
)


def http_span_as_logged(span: ReadableSpan) -> ReadableSpan:
    """`span` with only the attributes of `HTTP_ATTRIBUTES`, no events (an exception's, with
    its message) and no status description."""
    attributes = {k: v for k, v in (span.attributes or {}).items() if k in HTTP_ATTRIBUTES}
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        links=span.links,
        kind=span.kind,
        status=Status(span.status.status_code),  # a description may quote an exception
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class _TakesNothing(TextMapPropagator):
    """The global propagator: an HTTP request's span starts a trace of the platform's own
    (extract: an empty context), and nothing is injected in what the platform sends by HTTP."""

    def extract(self, carrier: Any, context: Context | None = None, getter: Any = None) -> Context:
        return Context()

    def inject(self, carrier: Any, context: Context | None = None, setter: Any = None) -> None:
        return None

    @property
    def fields(self) -> set[str]:
        return set()


class _NoOrphanQueries(Sampler):
    """The sampler: a database call outside any traced work (a heartbeat, a gauge's count, a
    timer's poll) is not a trace of its own; everything else as ``OTEL_TRACES_SAMPLER`` says
    (parent-based, always on, by default)."""

    def __init__(self, delegate: Sampler) -> None:
        self.delegate = delegate

    def should_sample(
        self,
        parent_context: Any,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if (
            not parent.is_valid
            and attributes
            and ("db.system" in attributes or "db.system.name" in attributes)
        ):
            return SamplingResult(Decision.DROP)
        return self.delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"NoOrphanQueries{{{self.delegate.get_description()}}}"


def setup(service: str, env: Mapping[str, str] | None = None) -> bool:
    """Install the SDK's tracer provider for this process when the environment asks for it
    (once; a second call changes nothing); True when tracing is on. Off, nothing is installed:
    no provider, no exporter, no instrumentation."""
    global TRACER, _PROVIDER
    if TRACER is not None:
        return True
    env = os.environ if env is None else env
    names = exporters(env)
    if not names:
        return False
    from opentelemetry import propagate
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )
    from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

    resource = Resource.create(
        {"service.name": env.get("OTEL_SERVICE_NAME") or service, "post.service": service}
    )
    provider = TracerProvider(
        resource=resource,
        sampler=_NoOrphanQueries(_get_from_env_or_default()),
    )
    for name in names:
        exporter: SpanExporter
        if name == "otlp":
            # OTLP over HTTP/protobuf: endpoint, headers, timeout from OTEL_EXPORTER_OTLP_*.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        elif name == "console":
            exporter = ConsoleSpanExporter(service_name=service)
        else:
            raise SystemExit(f"{service}: OTEL_TRACES_EXPORTER {name!r}: otlp, console or none")
        _GATE.processors.append(BatchSpanProcessor(exporter))
    provider.add_span_processor(_GATE)
    trace.set_tracer_provider(provider)
    # Nothing is taken from, or put in, an HTTP request's headers by the instrumentations: a
    # caller's traceparent is a hospital's text (see the module's rules).
    propagate.set_global_textmap(_TakesNothing())
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    AsyncPGInstrumentor(capture_parameters=False).instrument(  # type: ignore[no-untyped-call]
        tracer_provider=provider
    )
    _PROVIDER = provider
    TRACER = provider.get_tracer("post.platform")
    return True


def instrument_app(app: FastAPI) -> None:
    """The HTTP intake and reads of `app` traced (when tracing is on)."""
    if _PROVIDER is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=_PROVIDER, excluded_urls="/healthz,/readyz,/metrics"
    )


def shutdown() -> None:
    """Export what is buffered (at the process's end)."""
    if _PROVIDER is not None:
        _PROVIDER.shutdown()


# -- trace context, pure ------------------------------------------------------------------------


def parse_traceparent(value: object, tracestate: object = None) -> SpanContext | None:
    """The remote span context a ``traceparent`` names, or None when it is not one (W3C version
    00, exactly). `tracestate` is kept only when well-formed, else dropped."""
    if not isinstance(value, str) or len(value) != 55:
        return None
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    trace_id, span_id, flags = m.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return SpanContext(
        int(trace_id, 16),
        int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16) & TraceFlags.SAMPLED),
        trace_state=parse_tracestate(tracestate),
    )


def parse_tracestate(value: object) -> TraceState:
    if not isinstance(value, str) or not value or len(value) > 512:
        return TraceState()
    members = [m.strip() for m in value.split(",") if m.strip()]
    if len(members) > 32 or not all(_TRACESTATE_MEMBER.fullmatch(m) for m in members):
        return TraceState()
    return TraceState([tuple(m.split("=", 1)) for m in members])  # type: ignore[misc]


def format_traceparent(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def context_headers(ctx: SpanContext) -> dict[str, str]:
    """``traceparent`` (and ``tracestate`` when there is one) of `ctx`: CloudEvents attributes
    and NATS headers alike."""
    if not ctx.is_valid:
        return {}
    out = {"traceparent": format_traceparent(ctx)}
    state = ctx.trace_state.to_header() if ctx.trace_state else ""
    if state:
        out["tracestate"] = state
    return out


def envelope_context(body: bytes, state: bool = True) -> SpanContext | None:
    """The span context of a CloudEvent's ``traceparent`` (and, with `state`, ``tracestate``)
    attributes; None when it has none, or not a valid one."""
    try:
        ce = from_json(body)
    except ValueError:
        return None
    if not isinstance(ce, dict):
        return None
    return parse_traceparent(ce.get("traceparent"), ce.get("tracestate") if state else None)


def keeps_sender(kind: str, outcome: str) -> bool:
    """Whether a handling stays the child of the context its message came with: an event's
    always (the platform's own publish); a command's (a hospital's text) only once the command
    is taken, never when it was refused, malformed, waiting, a duplicate or failed."""
    return kind == "evt" or outcome == "ok"


def current_context() -> dict[str, str]:
    """The context of the span in progress, for what it appends to remember ({} when none)."""
    if TRACER is None:
        return {}
    return context_headers(trace.get_current_span().get_span_context())


# -- spans --------------------------------------------------------------------------------------


class Handling:
    """One message's handling span while it lasts (`handling`); `finish` says how it ended."""

    def __init__(self, span: Any, name: str, attributes: dict[str, Any], gated: bool) -> None:
        self.span = span
        self.name = name
        self.attributes = attributes
        self.gated = gated  # the span is a command's sender's child: kept only if taken
        self.start_time: int = getattr(span, "start_time", None) or time.time_ns()
        self.answer: Span | None = None  # a refused command's span of the platform's own
        self.outcome = "error"
        self.reason_code = ""
        self.error: BaseException | None = None

    def finish(
        self, outcome: str, *, reason_code: str = "", error: BaseException | None = None
    ) -> None:
        self.outcome, self.reason_code, self.error = outcome, reason_code, error

    def _answer_span(self) -> Span:
        """The span that stands for a command not taken: a root of the platform's own, begun
        when the handling began, with the handling's attributes (no trace of the sender's)."""
        if self.answer is None:
            assert TRACER is not None
            self.answer = TRACER.start_span(
                self.name,
                context=Context(),
                kind=SpanKind.CONSUMER,
                attributes=self.attributes,
                start_time=self.start_time,
                record_exception=False,
                set_status_on_exception=False,
            )
        return self.answer


def _describe(span: Span, handling: Handling) -> None:
    span.set_attribute("post.outcome", OUTCOMES.get(handling.outcome, handling.outcome))
    if handling.reason_code:
        span.set_attribute("post.reason_code", handling.reason_code)
    if handling.error is not None:
        span.set_attribute("error.type", type(handling.error).__name__)
        span.set_status(Status(StatusCode.ERROR, type(handling.error).__name__))


_HANDLING: ContextVar[Handling | None] = ContextVar("post_tracing_handling", default=None)


@contextmanager
def handling(
    service: str, subject: str, kind: str, type_: str, hospital: str, body: bytes
) -> Iterator[Handling]:
    """The span of one message's handling (kind CONSUMER), current while it lasts.

    An event's is the child of its envelope's context. A command's is the child of the
    sender's ``traceparent`` only if the command is taken (`finish` with ``ok``): until then
    every span of its handling is held back (`_Gate`); not taken (refused, waiting, a duplicate,
    failed), they are dropped and one span of the platform's own, a root, stands for the
    handling instead, as does the trace of its answer (`answering`)."""
    assert TRACER is not None
    parent = envelope_context(body, state=kind == "evt")
    gated = kind == "cmd" and parent is not None
    ctx = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
    name = f"process {type_}"
    attributes: dict[str, Any] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "process",
        "messaging.destination.name": subject,
        "post.service": service,
        "post.message.kind": kind,
        "post.message.type": type_,
        "post.hospital": hospital,
    }
    held: list[ReadableSpan] = []
    held_token = _HELD.set(held) if gated else None
    current: Handling | None = None
    try:
        with TRACER.start_as_current_span(
            name,
            context=ctx,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            current = Handling(span, name, attributes, gated)
            token = _HANDLING.set(current)
            try:
                yield current
            except BaseException as exc:
                current.finish("error", error=exc)
                raise
            finally:
                _HANDLING.reset(token)
                if not gated or keeps_sender(kind, current.outcome):
                    _describe(span, current)
    finally:
        if held_token is not None:
            _HELD.reset(held_token)
            if current is not None and keeps_sender(kind, current.outcome) and not current.answer:
                for ended in held:
                    _GATE.forward(ended)
            elif current is not None:
                answer = current._answer_span()
                _describe(answer, current)
                answer.end()


@contextmanager
def answering() -> Iterator[None]:
    """Around the answer to a command not taken (its `CommandRejected`): when the command came
    with a sender's context, the answer is appended under the platform's own span, never the
    sender's trace (a no-op otherwise, and when tracing is off)."""
    current = _HANDLING.get() if TRACER is not None else None
    if current is None or not current.gated:
        yield
        return
    token = _HELD.set(None)
    try:
        with trace.use_span(current._answer_span(), end_on_exit=False):
            yield
    finally:
        _HELD.reset(token)


@contextmanager
def producing(
    service: str, subject: str, type_: str, hospital: str, stored: Mapping[str, Any]
) -> Iterator[dict[str, str]]:
    """The span of one event's publish (kind PRODUCER), the child of the work that appended it
    (`stored`: the ``traceparent``/``tracestate`` its metadata remembers); yields that span's
    context, for the envelope and the NATS headers."""
    assert TRACER is not None
    parent = parse_traceparent(stored.get("traceparent"), stored.get("tracestate"))
    ctx = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
    with TRACER.start_as_current_span(
        f"send {type_}",
        context=ctx,
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "send",
            "messaging.destination.name": subject,
            "post.service": service,
            "post.message.kind": "evt",
            "post.message.type": type_,
            "post.hospital": hospital,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield context_headers(span.get_span_context())
        except BaseException as exc:
            _failed(span, exc)
            raise


@contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: SpanContext | None = None,
    links: list[Link] | None = None,
    **attributes: str | int,
) -> Iterator[Span]:
    """A span of the platform's own work (an append, a timer's unit, a webhook's attempt), the
    child of the current span or of `parent`; a no-op when tracing is off."""
    if TRACER is None:
        yield trace.INVALID_SPAN
        return
    ctx = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
    with TRACER.start_as_current_span(
        name,
        context=ctx,
        kind=kind,
        links=links,
        attributes={k.replace("_", "."): v for k, v in attributes.items()},
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as exc:
            _failed(current, exc)
            raise


def _failed(span: Span, exc: BaseException) -> None:
    """An error's class on its span, never its text (it may quote what a message carried)."""
    span.set_attribute("error.type", type(exc).__name__)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
