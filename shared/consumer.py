"""Consuming the POST stream: one durable pull consumer per service, handled in order.

Every message is handled in one PostgreSQL transaction that also records its id in
``processed``: a redelivered message has no second effect. Outcomes:

- success: the handler's events are appended (and queued in the outbox); ack.
- ``Rejected`` (a command): nothing of the handler is kept; a ``CommandRejected`` is appended
  instead; ack. For an event (a fact), it is logged and skipped.
- ``NotYetKnown``: rolled back and redelivered with back-off until ``not_yet_known_seconds``
  after the message was stored, then rejected with its reason code.
- anything else (database away, a concurrent append): rolled back, redelivered with back-off;
  after ``max_deliver`` attempts it goes to the dead-letter subject (a command is also answered
  with ``CommandRejected`` ``internal_error``) and the consumer goes on.
- not a CloudEvent at all (not JSON, no id): dead-letter subject with the reason; ack.

FastStream's JetStream subscribers bind one subject per consumer; a service needs one
*ordered* consumer over several subjects (a hospital's ``RegisterHospital`` must be handled
before its ``LaunchDepartment``), so this loop drives nats-py's pull consumer directly with
``filter_subjects``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from shared.clock import Clock
from shared.contracts import (
    COMMANDS,
    EVENTS,
    STREAM_NAME,
    CommandRejected,
    Event,
    Message,
    ReasonCode,
    Rejected,
    Unanswerable,
    cmd_subject,
    dlq_subject,
    evt_subject,
    new_id,
    parse_envelope,
    parse_payload,
    parse_subject,
)
from shared.eventstore import EventStore, NewEvent
from shared.observability import (
    COMMANDS_REJECTED,
    CONSUMER_ACK_PENDING,
    CONSUMER_PENDING,
    DEAD_LETTERS,
    HANDLER_SECONDS,
    MESSAGES_HANDLED,
)

if TYPE_CHECKING:
    from shared.service import Service

log = structlog.get_logger()

Handler = Callable[[Any, "UnitOfWork"], Awaitable[None]]


class NotYetKnown(Exception):
    """The command depends on a fact this service has not seen yet: try again later."""

    def __init__(self, detail: str, reason_code: ReasonCode = ReasonCode.unknown_referral) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason_code = reason_code


class Unprocessable(Exception):
    """Raised by ``Service.execute`` for HTTP: a message never got to its handler."""


@dataclass
class UnitOfWork:
    """One handled message (or timer tick): a transaction, its tenant and the events it emits."""

    service: str
    conn: asyncpg.Connection
    hospital: str
    clock: Clock
    message_id: str = field(default_factory=new_id)
    correlation_id: str = ""
    stream_seq: int | None = None
    message_time: datetime | None = None  # when JetStream stored the incoming message
    answer_repeats: bool = True  # HTTP answers a repeat in its response, not with an event
    store: EventStore = field(default_factory=EventStore)
    emitted: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.correlation_id:
            self.correlation_id = self.message_id

    def now(self) -> datetime:
        return self.clock.now()

    async def load(self, stream_id: str) -> tuple[list[Event], int]:
        stored = await self.store.read_stream(self.conn, stream_id)
        return [s.to_event() for s in stored], (stored[-1].stream_version if stored else 0)

    async def append(self, stream_id: str, expected_version: int, events: Sequence[Event]) -> None:
        meta = {"correlation_id": self.correlation_id, "causation_id": self.message_id}
        await self.store.append(
            self.conn,
            stream_id,
            expected_version,
            [
                NewEvent(e, {**meta, "hospital": e.hospital, "service": self.service})
                for e in events
            ],
        )
        self.emitted.extend(events)

    async def repeat(self, event: Event) -> None:
        """Answer an identical repeat of a command (a new id, the same payload) with a copy of
        the fact it repeats: every command ends in one event, and the aggregate's own stream
        stays free of duplicates. Consumers dedupe creations by their domain key."""
        if not self.answer_repeats:
            return
        await self.append(f"repeat:{self.hospital}:{self.message_id}", 0, [event])


async def mark_processed(conn: asyncpg.Connection, key: str, stream_seq: int | None) -> bool:
    """Record a message as handled; False when it was handled before."""
    row = await conn.fetchval(
        "INSERT INTO processed (message_id, stream_seq) VALUES ($1, $2)"
        " ON CONFLICT (message_id) DO NOTHING RETURNING 1",
        key,
        stream_seq,
    )
    return row is not None


def backoff_seconds(attempt: int) -> float:
    return float(min(0.2 * 2 ** max(attempt - 1, 0), 30.0))


@dataclass
class Incoming:
    subject: str
    hospital: str
    kind: str
    type: str
    body: bytes
    stream_seq: int | None
    attempt: int
    stored_at: datetime | None


class StreamConsumer:
    """The durable consumer of one service and the handling of each message."""

    def __init__(self, service: Service, js: JetStreamContext) -> None:
        self.service = service
        self.js = js
        self.name = service.name
        self.subjects = [cmd_subject("*", t) for t in service.command_handlers] + [
            evt_subject("*", t) for t in service.event_handlers
        ]

    async def ensure(self) -> None:
        config = ConsumerConfig(
            durable_name=self.name,
            filter_subjects=self.subjects,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=self.service.deliver_policy,
            ack_wait=60,
            max_deliver=-1,  # the limit is ours: see handle()
            max_ack_pending=10_000,
        )
        try:
            info = await self.js.consumer_info(STREAM_NAME, self.name)
            if sorted(info.config.filter_subjects or []) != sorted(self.subjects):
                await self.js.add_consumer(STREAM_NAME, config)  # a new handler: widen the filter
        except NotFoundError:
            await self.js.add_consumer(STREAM_NAME, config)

    async def run(self, stop: asyncio.Event) -> None:
        await self.ensure()
        sub = await self.js.pull_subscribe_bind(durable=self.name, stream=STREAM_NAME)
        while not stop.is_set():
            try:
                msgs = await sub.fetch(self.service.settings.fetch_batch, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                continue
            for msg in msgs:  # in order: aggregates and projections need it
                await self.handle(msg)

    async def report_lag(self) -> None:
        info = await self.js.consumer_info(STREAM_NAME, self.name)
        CONSUMER_PENDING.labels(self.name).set(info.num_pending or 0)
        CONSUMER_ACK_PENDING.labels(self.name).set(info.num_ack_pending or 0)

    async def handle(self, msg: Msg) -> None:
        meta = msg.metadata
        try:
            hospital, kind, type_ = parse_subject(msg.subject)
        except ValueError:
            await msg.ack()
            return
        incoming = Incoming(
            subject=msg.subject,
            hospital=hospital,
            kind=kind,
            type=type_,
            body=msg.data,
            stream_seq=meta.sequence.stream if meta else None,
            attempt=meta.num_delivered if meta else 1,
            stored_at=meta.timestamp if meta else None,
        )
        started = time.perf_counter()
        outcome = "error"
        structlog.contextvars.bind_contextvars(event_type=type_, hospital=hospital)
        try:
            outcome = await self.service.process(incoming)
        except Exception as exc:  # transient: retry with back-off, then dead-letter
            if incoming.attempt >= self.service.settings.max_deliver:
                await self.dead_letter(incoming, f"failed {incoming.attempt} times: {exc!r}"[:500])
                if kind == "cmd":
                    await self.service.answer_unprocessable(incoming, repr(exc)[:200])
                outcome = "dead_letter"
                await msg.ack()
            else:
                log.warning("handler_failed", error=repr(exc), attempt=incoming.attempt)
                await msg.nak(delay=backoff_seconds(incoming.attempt))
        else:
            if outcome == "retry":
                await msg.nak(delay=backoff_seconds(incoming.attempt))
            else:
                if outcome == "dead_letter":
                    await self.dead_letter(incoming, self.service.last_unanswerable)
                await msg.ack()
        finally:
            MESSAGES_HANDLED.labels(self.name, type_, outcome).inc()
            HANDLER_SECONDS.labels(self.name, type_).observe(time.perf_counter() - started)
            structlog.contextvars.unbind_contextvars("event_type", "hospital", "correlation_id")

    async def dead_letter(self, incoming: Incoming, reason: str) -> None:
        DEAD_LETTERS.labels(self.name, incoming.type).inc()
        log.error("dead_letter", reason=reason, subject=incoming.subject)
        await self.js.publish(
            dlq_subject(incoming.hospital, incoming.type),
            incoming.body,
            headers={
                "Post-Dead-Letter-Reason": reason[:500],
                "Post-Original-Subject": incoming.subject,
                "Post-Service": self.name,
            },
        )


def stored_age_seconds(incoming: Incoming, clock: Clock) -> float:
    if incoming.stored_at is None:
        return 0.0
    stored = incoming.stored_at
    if stored.tzinfo is None:
        stored = stored.replace(tzinfo=UTC)
    return (clock.now() - stored).total_seconds()


__all__ = [
    "COMMANDS",
    "COMMANDS_REJECTED",
    "EVENTS",
    "CommandRejected",
    "Handler",
    "Incoming",
    "Message",
    "NotYetKnown",
    "Rejected",
    "StreamConsumer",
    "Unanswerable",
    "UnitOfWork",
    "mark_processed",
    "parse_envelope",
    "parse_payload",
    "stored_age_seconds",
]
