"""Consuming the POST stream: one durable pull consumer per service, handled in order.

Every message is handled in one PostgreSQL transaction that also records its id in
``processed``: a redelivered message has no second effect. Messages fetched together are
handled in order in one transaction, each in its own savepoint (one commit for the batch, and
still all or nothing per message); their acks go out after the commit. Outcomes:

- success: the handler's events are appended (and queued in the outbox); ack.
- ``Rejected`` (a command): nothing of the handler is kept; a ``CommandRejected`` is appended
  instead; ack. For an event (a fact), it is logged and skipped.
- ``NotYetKnown``: rolled back and redelivered with back-off until ``not_yet_known_seconds``
  after the message was stored, then rejected with its reason code.
- anything else (database away, a concurrent append): rolled back, redelivered with back-off;
  after ``max_deliver`` attempts it goes to the dead-letter subject (a command is also answered
  with ``CommandRejected`` ``internal_error``) and the consumer goes on.
- not a CloudEvent at all (not JSON, no id): dead-letter subject with the reason; ack.

A command message that was refused, a duplicate or dead-lettered is then erased from the
stream (``erase``): only accepted commands and the platform's events stay in it.

FastStream's JetStream subscribers bind one subject per consumer; a service needs one
*ordered* consumer over several subjects (a hospital's ``RegisterHospital`` must be handled
before its ``LaunchDepartment``), so this loop drives nats-py's pull consumer directly with
``filter_subjects``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg
import structlog
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from shared.clock import Clock
from shared.contracts import (
    COMMANDS,
    EVENTS,
    STREAM_NAME,
    cmd_subject,
    dlq_subject,
    evt_subject,
    parse_subject,
)
from shared.observability import (
    COMMANDS_ERASED,
    CONSUMER_ACK_PENDING,
    CONSUMER_PENDING,
    DEAD_LETTERS,
    HANDLER_SECONDS,
    MESSAGES_HANDLED,
)

if TYPE_CHECKING:
    from shared.service import Service

log = structlog.get_logger()

# How a command's handling ended for it to be erased from the stream once answered (see erase).
ERASED_OUTCOMES = frozenset({"rejected", "duplicate", "dead_letter"})


class Unprocessable(Exception):
    """Raised by ``Service.execute`` for HTTP: a message never got to its handler."""


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

    @property
    def label(self) -> str:
        """The type as a metric label: a subject's last token may be anything, labels not."""
        return self.type if self.type in COMMANDS or self.type in EVENTS else "unknown"


@dataclass
class Handled:
    """How one message of a batch ended, kept until the batch has committed."""

    outcome: str
    error: BaseException | None = None
    reason: str = ""  # why a dead letter
    seconds: float = 0.0


class StreamConsumer:
    """The durable consumer of one service and the handling of each message."""

    def __init__(self, service: Service, js: JetStreamContext) -> None:
        self.service = service
        self.js = js
        self.name = service.name
        # The service that answers unknown command types sees every command (and lets the
        # ones other services own pass: see Service.process).
        commands = (
            [cmd_subject("*", "*")]
            if service.answers_unknown_commands
            else [cmd_subject("*", t) for t in service.command_handlers]
        )
        self.subjects = commands + [evt_subject("*", t) for t in service.event_handlers]
        self._conn: asyncpg.Connection | None = None

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
        except NotFoundError:
            await self.js.add_consumer(STREAM_NAME, config)
            return
        if info.num_ack_pending:
            # A process died holding messages: they would come back only after ack_wait,
            # behind newer ones. Resume from the first unacknowledged one instead, in order;
            # whatever was handled after it is skipped by `processed`. (One consumer process
            # per service, as ordering requires.)
            resume = (info.ack_floor.stream_seq if info.ack_floor else 0) + 1
            log.warning("consumer_resumed", from_stream_seq=resume, unacked=info.num_ack_pending)
            await self.js.delete_consumer(STREAM_NAME, self.name)
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = resume
            await self.js.add_consumer(STREAM_NAME, config)
        elif sorted(info.config.filter_subjects or []) != sorted(self.subjects):
            await self.js.add_consumer(STREAM_NAME, config)  # a new handler: widen the filter

    async def run(self, stop: asyncio.Event) -> None:
        await self.ensure()
        sub = await self.js.pull_subscribe_bind(durable=self.name, stream=STREAM_NAME)
        try:
            await self._consume(sub, stop)
        finally:
            await self._release()

    async def _consume(self, sub: JetStreamContext.PullSubscription, stop: asyncio.Event) -> None:
        backlog = True
        while not stop.is_set():
            try:
                # nats-py's fetch of n, once one message came, waits for all n until the pull
                # expires: caught up, ask for one (it comes the moment it is stored); behind,
                # for a batch (what is waiting comes at once).
                msgs = await sub.fetch(self.service.settings.fetch_batch if backlog else 1, 1.0)
            except (NatsTimeoutError, TimeoutError):
                backlog = False
                continue
            last = msgs[-1].metadata if msgs else None
            backlog = bool(last and last.num_pending)
            await self.handle_batch(msgs)

    async def report_lag(self) -> None:
        info = await self.js.consumer_info(STREAM_NAME, self.name)
        CONSUMER_PENDING.labels(self.name).set(info.num_pending or 0)
        CONSUMER_ACK_PENDING.labels(self.name).set(info.num_ack_pending or 0)

    async def handle(self, msg: Msg) -> None:
        await self.handle_batch([msg])

    async def handle_batch(self, msgs: Sequence[Msg]) -> None:
        """Handle fetched messages in order. Several share one transaction (one commit, one disk
        flush), each in its own savepoint: one that fails or must wait leaves nothing, the
        others stand. Acks go out only once the batch has committed."""
        items = [(msg, self._incoming(msg)) for msg in msgs]
        done: list[Handled] = []
        try:
            conn = await self._connection()
            if len(msgs) == 1:
                done.append(await self._process(items[0][1], conn))
            else:
                async with conn.transaction():
                    for _, incoming in items:
                        done.append(await self._process(incoming, conn))
        except Exception as exc:  # the commit or the connection failed: nothing of it stands
            done = [Handled("error", exc) for _ in items]
            await self._release()  # a connection PostgreSQL dropped is never used again
        if len(msgs) > 1:
            self.service.wake_relay()
        for (msg, incoming), handled in zip(items, done, strict=True):
            await self._settle(msg, incoming, handled)

    async def _connection(self) -> asyncpg.Connection:
        """The consumer's own connection, kept from batch to batch (a pooled one is reset on
        every release: one more round trip per message); replaced once it has failed."""
        if self._conn is not None:
            try:
                broken = self._conn.is_closed()
            except asyncpg.InterfaceError:  # detached from the pool when the server went away
                broken = True
            if broken:
                await self._release()
        if self._conn is None:
            self._conn = await self.service.pool.acquire()
        return self._conn

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await self.service.pool.release(conn)
            except Exception as exc:  # already broken or detached: the pool replaces it
                log.debug("connection_release_failed", error=repr(exc)[:200])

    def _incoming(self, msg: Msg) -> Incoming | None:
        try:
            hospital, kind, type_ = parse_subject(msg.subject)
        except ValueError:
            return None
        meta = msg.metadata
        return Incoming(
            subject=msg.subject,
            hospital=hospital,
            kind=kind,
            type=type_,
            body=msg.data,
            stream_seq=meta.sequence.stream if meta else None,
            attempt=meta.num_delivered if meta else 1,
            stored_at=meta.timestamp if meta else None,
        )

    async def _process(self, incoming: Incoming | None, conn: asyncpg.Connection | None) -> Handled:
        if incoming is None:
            return Handled("ignored")
        started = time.perf_counter()
        structlog.contextvars.bind_contextvars(event_type=incoming.type, hospital=incoming.hospital)
        try:
            outcome = await self.service.process(incoming, conn)
            reason = self.service.last_unanswerable if outcome == "dead_letter" else ""
            return Handled(outcome, None, reason, time.perf_counter() - started)
        except Exception as exc:  # transient: retry with back-off, then dead-letter
            return Handled("error", exc, "", time.perf_counter() - started)
        finally:
            structlog.contextvars.unbind_contextvars("event_type", "hospital", "correlation_id")

    async def _settle(self, msg: Msg, incoming: Incoming | None, handled: Handled) -> None:
        if incoming is None:  # not a POST subject
            await msg.ack()
            return
        outcome, exc = handled.outcome, handled.error
        structlog.contextvars.bind_contextvars(event_type=incoming.type, hospital=incoming.hospital)
        try:
            if exc is not None:
                if incoming.attempt >= self.service.settings.max_deliver:
                    reason = f"failed {incoming.attempt} times: {exc!r}"[:500]
                    await self.dead_letter(incoming, reason)
                    if incoming.kind == "cmd":
                        try:
                            await self.service.answer_unprocessable(incoming, repr(exc)[:200])
                        except Exception as failed:  # dead-lettered already: go on, never loop
                            log.error("answer_failed", error=repr(failed)[:200])
                    outcome = "dead_letter"
                    await msg.ack()
                else:
                    log.warning("handler_failed", error=repr(exc), attempt=incoming.attempt)
                    await msg.nak(delay=backoff_seconds(incoming.attempt))
            elif outcome == "retry":
                await msg.nak(delay=backoff_seconds(incoming.attempt))
            else:
                if outcome == "dead_letter":
                    await self.dead_letter(incoming, handled.reason)
                await msg.ack()
            # A duplicate on a redelivery is this very message, handled before a crash: it
            # may have been accepted, so it stays.
            redelivered = outcome == "duplicate" and incoming.attempt > 1
            if incoming.kind == "cmd" and outcome in ERASED_OUTCOMES and not redelivered:
                await self.erase(incoming)
        finally:
            MESSAGES_HANDLED.labels(self.name, incoming.label, outcome).inc()
            HANDLER_SECONDS.labels(self.name, incoming.label).observe(handled.seconds)
            structlog.contextvars.unbind_contextvars("event_type", "hospital")

    async def erase(self, incoming: Incoming) -> None:
        """Erase an answered command the platform did not take from the stream (JetStream
        overwrites it): a refused one may carry names or notes in the fields that got it
        refused, a duplicate adds nothing, a dead letter's copy is on the dead-letter subject.
        Its answer and its id in `processed` stay, so a copy sent later is still answered once.
        Accepted commands stay as sent (only validated fields were read from them)."""
        if incoming.stream_seq is None:
            return
        try:
            await self.js.delete_msg(STREAM_NAME, incoming.stream_seq)
            COMMANDS_ERASED.labels(self.name, incoming.label).inc()
        except NotFoundError:
            pass  # erased already, by a process that died before its ack
        except Exception as exc:  # the answer stands; the message stays until retention ends
            log.warning("command_not_erased", error=repr(exc)[:200], seq=incoming.stream_seq)

    async def dead_letter(self, incoming: Incoming, reason: str) -> None:
        DEAD_LETTERS.labels(self.name, incoming.label).inc()
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
