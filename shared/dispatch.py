"""The fate of one message, top to bottom: the platform's message bus.

`Dispatcher.dispatch(incoming, conn)` takes a message of the stream and the partition's
connection (in the batch's transaction) and returns what happened to it, an `Outcome`:

1. Not ours (another service's command): ``ignored``.
2. Not answerable (the subject's hospital is not a hospital id, not a CloudEvent, an event
   with a broken envelope): ``dead_letter`` with the reason; the consumer publishes it.
3. A command whose envelope or subject is wrong, or of a type nobody owns: ``rejected``, a
   `CommandRejected` appended (and so published).
4. Seen before (its id is in ``processed``): ``duplicate``; ``same_message`` when it is this
   very message redelivered (it may have been accepted, so it stays in the stream).
5. Its handler, in a savepoint:
   - done: ``ok``, its events appended with the message recorded in ``processed``;
   - `Rejected` (a command): rolled back, a `CommandRejected` instead: ``rejected``;
     for an event (a fact cannot be refused): logged, ``ignored``;
   - `NotYetKnown`: rolled back; the message is kept in ``waiting`` (``waiting``) until a
     fact of its hospital comes, or it is refused (a command) or dead-lettered (an event) when
     its wait is over: 10 minutes after it was stored, or as soon as the platform has settled
     (``settled``: nothing published before it, nor anything following from that, is pending).
6. Anything else propagates: a transient failure; the consumer retries the message with
   back-off and dead-letters it after ``max_deliver`` attempts (`answer_unprocessable`).

The HTTP intakes run a command through `execute`: the same handlers, at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from shared.clock import Clock
from shared.contracts import (
    COMMANDS,
    EVENTS,
    Command,
    CommandRejected,
    ReasonCode,
    Rejected,
    Unanswerable,
    is_hospital_id,
    new_id,
    parse_envelope,
    parse_payload,
)
from shared.eventstore import ConcurrencyError
from shared.observability import COMMANDS_REJECTED
from shared.partitions import partition_of
from shared.unit_of_work import (
    Handler,
    NotYetKnown,
    UnitOfWork,
    mark_processed,
    processed_savepoint,
)

log = structlog.get_logger()


@dataclass
class Incoming:
    """A message of the stream as the dispatcher sees it."""

    subject: str
    hospital: str
    kind: str  # "cmd" or "evt"
    type: str
    body: bytes
    stream_seq: int | None  # its sequence in POST
    attempt: int
    stored_at: datetime | None  # when POST stored it
    waited: bool = False  # taken from ``waiting``

    @property
    def label(self) -> str:
        """The type as a metric label: a subject's last token may be anything, labels not."""
        return self.type if self.type in COMMANDS or self.type in EVENTS else "unknown"


@dataclass(frozen=True)
class Outcome:
    label: str  # ok, duplicate, rejected, ignored, waiting, dead_letter (a metric label)
    dead_letter_reason: str = ""
    same_message: bool = False  # a duplicate that is this message delivered again

    @property
    def erases_command(self) -> bool:
        """A command the platform did not take is erased from the stream once answered: a
        refused one may carry names in the fields that got it refused, a copy adds nothing, a
        dead letter's copy is on the dead-letter subject."""
        if self.label == "duplicate":
            return not self.same_message
        return self.label in ("rejected", "dead_letter")


OK = Outcome("ok")
IGNORED = Outcome("ignored")
WAITING = Outcome("waiting")


def dead_letter(reason: str) -> Outcome:
    return Outcome("dead_letter", reason)


class _Refused(Exception):
    """Roll the handler's work back; the message ends as `outcome` (a command refused for
    `rejected` is answered with CommandRejected)."""

    def __init__(self, outcome: Outcome, rejected: Rejected | None = None) -> None:
        super().__init__(outcome.label)
        self.outcome = outcome
        self.rejected = rejected


class _Wait(Exception):
    """Roll the handler's work back and keep the message in ``waiting``."""


def stored_age_seconds(incoming: Incoming, clock: Clock) -> float:
    if incoming.stored_at is None:
        return 0.0
    stored = incoming.stored_at
    if stored.tzinfo is None:
        stored = stored.replace(tzinfo=UTC)
    return (clock.now() - stored).total_seconds()


class Dispatcher:
    def __init__(
        self,
        service: str,
        clock: Clock,
        *,
        role: str,
        command_handlers: Mapping[str, Handler],
        event_handlers: Mapping[str, Handler],
        answers_unknown_commands: bool,
        not_yet_known_seconds: float,
    ) -> None:
        self.service = service
        self.clock = clock
        self.command_handlers = dict(command_handlers)
        self.event_handlers = dict(event_handlers)
        # One service of the platform answers commands of a type nobody owns (a typo in a
        # hospital's integration): a CommandRejected, never silence.
        self.answers_unknown_commands = answers_unknown_commands
        self.not_yet_known_seconds = not_yet_known_seconds
        for t in self.command_handlers:
            if t not in COMMANDS or COMMANDS[t].owner != role:
                raise ValueError(f"{service} may not handle {t}: its owner is another service")
        for t in self.event_handlers:
            if t not in EVENTS:
                raise ValueError(f"unknown event type {t}")

    # -- a message of the stream -----------------------------------------------------------

    async def dispatch(
        self, incoming: Incoming, conn: asyncpg.Connection, *, settled: bool = False
    ) -> Outcome:
        """Decide the fate of one message, in `conn`'s transaction (each message in a
        savepoint of its own). `settled`: nothing it could wait for is pending any more."""
        owned = incoming.type in self.command_handlers
        unowned = incoming.type not in COMMANDS and self.answers_unknown_commands
        if incoming.kind == "cmd" and not (owned or unowned):
            return IGNORED  # another service's command: its owner answers it
        if not is_hospital_id(incoming.hospital):
            # No tenant can have this id (CONTRACT.md: hospital ids are slugs), so there is no
            # hospital to answer: a dead letter, at once (an answer could not even be built).
            return dead_letter("the subject's hospital is not a hospital id")
        try:
            ce = parse_envelope(incoming.body)
        except Unanswerable as exc:
            return dead_letter(str(exc))
        except Rejected as rejected:
            if incoming.kind != "cmd":
                return dead_letter(rejected.detail)
            raw_id = str(json.loads(incoming.body)["id"])
            return await self.reject(conn, incoming, raw_id, rejected)
        if incoming.kind == "cmd":
            mismatch = None
            if ce.type != incoming.type:
                # Not echoed: an envelope's attributes are the sender's text.
                mismatch = f"the type does not match the subject's {incoming.type}"
            elif ce.hospital != incoming.hospital:
                mismatch = "the source's hospital does not match the subject's hospital"
            elif incoming.type not in COMMANDS:
                mismatch = "no command of this type exists"
            if mismatch:
                refused = Rejected(ReasonCode.invalid_payload, mismatch)
                return await self.reject(conn, incoming, ce.id, refused)
        # A command starts its chain: a correlationid it carries is the sender's text, not logged.
        chain = ce.id if incoming.kind == "cmd" else (ce.correlationid or ce.id)
        structlog.contextvars.bind_contextvars(correlation_id=chain)
        return await self._handle(incoming, ce.id, chain, ce.data, conn, settled)

    async def _handle(
        self,
        incoming: Incoming,
        ce_id: str,
        chain: str,
        data: dict[str, Any],
        conn: asyncpg.Connection,
        settled: bool,
    ) -> Outcome:
        is_command = incoming.kind == "cmd"
        key = f"{incoming.hospital}:{ce_id}"
        try:
            async with processed_savepoint(conn, key, incoming.stream_seq) as fresh:
                uow = UnitOfWork(
                    self.service,
                    conn,
                    incoming.hospital,
                    self.clock,
                    message_id=ce_id,
                    correlation_id=chain,  # a command starts a chain; an event carries it on
                    stream_seq=incoming.stream_seq,
                    message_time=incoming.stored_at,
                )
                if not fresh:
                    return await self._duplicate(conn, key, incoming)
                try:
                    if is_command:
                        message: Any = parse_payload(COMMANDS[incoming.type], data)
                        await self.command_handlers[incoming.type](message, uow)
                    else:
                        message = parse_payload(EVENTS[incoming.type], data)
                        await self.event_handlers[incoming.type](message, uow)
                except Rejected as rejected:
                    if not is_command:
                        log.warning(
                            "event_refused", reason=rejected.reason_code, detail=rejected.detail
                        )
                        raise _Refused(IGNORED) from None
                    raise _Refused(Outcome("rejected"), rejected) from None
                except NotYetKnown as pending:
                    limit = self.not_yet_known_seconds
                    if not settled and stored_age_seconds(incoming, self.clock) < limit:
                        log.info("not_yet_known", detail=pending.detail, attempt=incoming.attempt)
                        raise _Wait() from None
                    if not is_command:
                        raise _Refused(dead_letter(f"not known: {pending.detail}")) from None
                    raise _Refused(
                        Outcome("rejected"), Rejected(pending.reason_code, pending.detail)
                    ) from None
                if is_command and not uow.emitted:
                    log.error("command_without_answer", command_type=incoming.type)
                if incoming.waited:
                    await _unpark(conn, key)
                return OK
        except _Wait:
            if not incoming.waited:
                kept = await _park(conn, key, incoming)
                if kept != incoming.stream_seq:  # a copy of a message already waiting
                    return Outcome("duplicate", same_message=False)
            else:
                await conn.execute(
                    "UPDATE waiting SET attempts = attempts + 1 WHERE message_id = $1", key
                )
            return WAITING
        except _Refused as refused:
            # Rolled back: nothing of the handler is kept. Recorded anew, with the answer.
            async with conn.transaction():
                if not await mark_processed(conn, key, incoming.stream_seq):
                    return await self._duplicate(conn, key, incoming)
                if incoming.waited:
                    await _unpark(conn, key)
                if refused.rejected is not None:
                    uow = UnitOfWork(
                        self.service, conn, incoming.hospital, self.clock, ce_id, chain
                    )
                    await self._append_rejection(uow, ce_id, incoming.type, refused.rejected)
            return refused.outcome

    async def _duplicate(self, conn: asyncpg.Connection, key: str, incoming: Incoming) -> Outcome:
        """Handled before: this very message again (redelivered after a crash or a takeover),
        or a copy sent later."""
        if incoming.waited:
            await _unpark(conn, key)
        seen = await conn.fetchval("SELECT stream_seq FROM processed WHERE message_id = $1", key)
        same = incoming.stream_seq is not None and seen == incoming.stream_seq
        return Outcome("duplicate", same_message=same)

    async def reject(
        self, conn: asyncpg.Connection, incoming: Incoming, command_id: str, rejected: Rejected
    ) -> Outcome:
        """Answer a command refused before its payload was read (bad envelope or subject), or
        one that failed every attempt."""
        command_id = command_id[:256]
        key = f"{incoming.hospital}:{command_id}"
        async with conn.transaction():
            if not await mark_processed(conn, key, incoming.stream_seq):
                return await self._duplicate(conn, key, incoming)
            uow = UnitOfWork(self.service, conn, incoming.hospital, self.clock, command_id)
            await self._append_rejection(uow, command_id, incoming.type, rejected)
        return Outcome("rejected")

    async def answer_unprocessable(
        self, conn: asyncpg.Connection, incoming: Incoming, reason: str
    ) -> None:
        """A command that failed every attempt still gets an answer."""
        try:
            command_id = str(json.loads(incoming.body)["id"])
        except Exception:
            return
        refused = Rejected(ReasonCode.internal_error, "could not be processed")
        await self.reject(conn, incoming, command_id, refused)
        log.error("command_unprocessable", reason=reason)

    async def _append_rejection(
        self, uow: UnitOfWork, command_id: str, command_type: str, rejected: Rejected
    ) -> None:
        label = command_type if command_type in COMMANDS else "unknown"
        COMMANDS_REJECTED.labels(self.service, label, rejected.reason_code).inc()
        log.info("command_rejected", reason_code=rejected.reason_code, detail=rejected.detail)
        event = CommandRejected(
            hospital=uow.hospital,
            command_id=command_id,
            command_type=command_type[:128],
            reason_code=rejected.reason_code,
            detail=rejected.detail,
        )
        await uow.append(f"rejected:{uow.hospital}:{command_id}", 0, [event])

    # -- a command over HTTP ---------------------------------------------------------------

    async def execute(
        self, pool: asyncpg.Pool, hospital: str, command: Command, command_id: str | None = None
    ) -> list[Any]:
        """Run a command through its handler now (the HTTP intake): returns the emitted events
        or raises ``Rejected``. Same handler, same transaction rules as the stream; a command
        that would wait is answered at once with its reason code."""
        handler = self.command_handlers.get(command.type_name)
        if handler is None:
            raise Rejected(ReasonCode.internal_error, f"{self.service} does not own this command")
        command_id = command_id or new_id()
        for attempt in range(1, 6):
            try:
                async with pool.acquire() as conn, conn.transaction():
                    uow = UnitOfWork(
                        self.service, conn, hospital, self.clock, command_id, answer_repeats=False
                    )
                    if not await mark_processed(conn, f"{hospital}:{command_id}", None):
                        return []
                    await handler(command, uow)
                return uow.emitted
            except ConcurrencyError:
                await asyncio.sleep(0.01 * attempt)
            except NotYetKnown as pending:
                COMMANDS_REJECTED.labels(self.service, command.type_name, pending.reason_code).inc()
                raise Rejected(pending.reason_code, pending.detail) from None
            except Rejected as rejected:
                COMMANDS_REJECTED.labels(
                    self.service, command.type_name, rejected.reason_code
                ).inc()
                raise
        raise Rejected(ReasonCode.internal_error, "too much contention, try again")


# -- waiting messages ----------------------------------------------------------------------


async def _park(conn: asyncpg.Connection, key: str, incoming: Incoming) -> int | None:
    """Keep a message in ``waiting``; returns the stream sequence of the one kept under its id
    (another when this is a copy of a message already waiting)."""
    return await conn.fetchval(
        "WITH kept AS (INSERT INTO waiting (message_id, partition, hospital, stream_seq, subject,"
        " body, stored_at, attempts) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (message_id) DO NOTHING RETURNING stream_seq)"
        " SELECT stream_seq FROM kept"
        " UNION ALL SELECT stream_seq FROM waiting WHERE message_id = $1 LIMIT 1",
        key,
        partition_of(incoming.hospital),
        incoming.hospital,
        incoming.stream_seq,
        incoming.subject,
        incoming.body,
        incoming.stored_at or datetime.now(UTC),
        incoming.attempt,
    )


async def _unpark(conn: asyncpg.Connection, key: str) -> None:
    await conn.execute("DELETE FROM waiting WHERE message_id = $1", key)


async def waiting_messages(
    conn: asyncpg.Connection, partition: int, hospitals: list[str] | None = None
) -> list[Incoming]:
    """The messages of `partition` (of `hospitals`, when given) that wait, in stream order."""
    rows = await conn.fetch(
        "SELECT hospital, stream_seq, subject, body, stored_at, attempts FROM waiting"
        " WHERE partition = $1 AND ($2::text[] IS NULL OR hospital = ANY($2::text[]))"
        " ORDER BY stream_seq NULLS LAST, message_id",
        partition,
        hospitals,
    )
    return [
        Incoming(
            subject=r["subject"],
            hospital=r["hospital"],
            kind=r["subject"].split(".")[2],
            type=r["subject"].split(".")[3],
            body=bytes(r["body"]),
            stream_seq=r["stream_seq"],
            attempt=r["attempts"] + 1,
            stored_at=r["stored_at"],
            waited=True,
        )
        for r in rows
    ]
