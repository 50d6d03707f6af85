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
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from enum import StrEnum
from pathlib import Path
from typing import Any

import asyncpg
import nats.errors
import structlog

from shared import tracing
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
    top_level_id,
)
from shared.eventstore import ConcurrencyError
from shared.inbox import Incoming, park, unpark, waited_once_more
from shared.observability import COMMANDS_REJECTED
from shared.unit_of_work import (
    Handler,
    NotYetKnown,
    UnitOfWork,
    mark_processed,
    processed_savepoint,
)

log = structlog.get_logger()


class Fate(StrEnum):
    """How a message ended (also its metric label)."""

    ok = "ok"
    duplicate = "duplicate"
    rejected = "rejected"  # answered with CommandRejected
    ignored = "ignored"  # another service's command; a fact refused by a handler
    waiting = "waiting"  # kept in ``waiting`` for another service's fact
    dead_letter = "dead_letter"
    error = "error"  # failed; the consumer decides: try again, or dead-letter and answer
    held = "held"  # kept behind its hospital's retried message
    retrying = "retrying"  # failed for a passing reason: its hospital's head, tried again


@dataclass(frozen=True)
class Outcome:
    label: Fate
    dead_letter_reason: str = ""
    same_message: bool = False  # a duplicate that is this message delivered again
    reason_code: str = ""  # a refused command's (CommandRejected's), for its trace span

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", Fate(self.label))

    @property
    def erases_command(self) -> bool:
        """A command the platform did not take is erased from the stream once answered: a
        refused one may carry names in the fields that got it refused, a copy adds nothing, a
        dead letter's copy is on the dead-letter subject."""
        if self.label is Fate.duplicate:
            return not self.same_message
        return self.label in (Fate.rejected, Fate.dead_letter)


OK = Outcome(Fate.ok)
IGNORED = Outcome(Fate.ignored)
WAITING = Outcome(Fate.waiting)
HELD = Outcome(Fate.held)
RETRYING = Outcome(Fate.retrying)

# What can fail and then pass: the database or NATS away, a lock or a serialization conflict,
# a concurrent writer. Anything else (a parse error, a validation error, a limit, a bug that
# this message triggers) fails the same way every time: it is answered or dead-lettered at
# once, never retried (issue 21: one deep array cost its partition six minutes).
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionError, TimeoutError, ...
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.TransactionRollbackError,  # serialization failure, deadlock
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash shutdown
    asyncpg.exceptions.InsufficientResourcesError,  # disk full, out of memory, connections
    asyncpg.exceptions.InFailedSQLTransactionError,  # the transaction broke on another error
    asyncpg.UniqueViolationError,  # a concurrent writer (an HTTP intake) was first
    ConcurrencyError,
    nats.errors.Error,
)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT)


def dead_letter(reason: str) -> Outcome:
    return Outcome(Fate.dead_letter, reason)


def refusal(rejected: Rejected) -> Outcome:
    return Outcome(Fate.rejected, reason_code=str(rejected.reason_code))


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


class InjectedFault(ConnectionError):
    """A passing failure the fault suite asks for (POST_TEST_FAULTS_FILE)."""


class InjectedFaults:
    """The fault suite's switch: while a hospital is a line of the file (`<hospital>`, or
    `<service>:<hospital>` for one service), its messages fail in this service as if the
    database were away. Never set outside tests."""

    def __init__(self, path: Path, service: str) -> None:
        self.path = path
        self.service = service
        self._stamp: tuple[int, int] | None = None
        self._hospitals: frozenset[str] = frozenset()

    @classmethod
    def from_file(cls, path: str, service: str) -> InjectedFaults | None:
        return cls(Path(path), service) if path else None

    def failing(self, hospital: str) -> bool:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        if (st.st_mtime_ns, st.st_size) != self._stamp:
            self._stamp = (st.st_mtime_ns, st.st_size)
            mine = f"{self.service}:"
            self._hospitals = frozenset(
                line.removeprefix(mine)
                for line in self.path.read_text().split()
                if ":" not in line or line.startswith(mine)
            )
        return hospital in self._hospitals


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
        faults: InjectedFaults | None = None,
    ) -> None:
        self.service = service
        self.clock = clock
        self.command_handlers = dict(command_handlers)
        self.event_handlers = dict(event_handlers)
        # One service of the platform answers commands of a type nobody owns (a typo in a
        # hospital's integration): a CommandRejected, never silence.
        self.answers_unknown_commands = answers_unknown_commands
        self.not_yet_known_seconds = not_yet_known_seconds
        self.faults = faults
        for t in self.command_handlers:
            if t not in COMMANDS or COMMANDS[t].owner != role:
                raise ValueError(f"{service} may not handle {t}: its owner is another service")
        for t in self.event_handlers:
            if t not in EVENTS:
                raise ValueError(f"unknown event type {t}")

    # -- a message of the stream -----------------------------------------------------------

    def ignores(self, incoming: Incoming) -> bool:
        """Another service's command: its owner answers it."""
        owned = incoming.type in self.command_handlers
        unowned = incoming.type not in COMMANDS and self.answers_unknown_commands
        return incoming.kind == "cmd" and not (owned or unowned)

    async def dispatch(
        self, incoming: Incoming, conn: asyncpg.Connection, *, settled: bool = False
    ) -> Outcome:
        """Decide the fate of one message, in `conn`'s transaction (each message in a
        savepoint of its own). `settled`: nothing it could wait for is pending any more."""
        if self.ignores(incoming):
            return IGNORED
        if not is_hospital_id(incoming.hospital):
            # No tenant can have this id (CONTRACT.md: hospital ids are slugs), so there is no
            # hospital to answer: a dead letter, at once (an answer could not even be built).
            return dead_letter("the subject's hospital is not a hospital id")
        try:
            ce = parse_envelope(incoming.body, incoming.kind)
        except Unanswerable as exc:
            return dead_letter(str(exc))
        except Rejected as rejected:
            if incoming.kind != "cmd":
                return dead_letter(rejected.detail)
            raw_id = top_level_id(incoming.body)
            if raw_id is None:
                return dead_letter(rejected.detail)
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
                if self.faults is not None and self.faults.failing(incoming.hospital):
                    raise InjectedFault(f"{self.service}: injected for the fault suite")
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
                    raise _Refused(refusal(rejected), rejected) from None
                except NotYetKnown as pending:
                    limit = self.not_yet_known_seconds
                    if not settled and stored_age_seconds(incoming, self.clock) < limit:
                        log.info("not_yet_known", detail=pending.detail, attempt=incoming.attempt)
                        raise _Wait() from None
                    if not is_command:
                        raise _Refused(dead_letter(f"not known: {pending.detail}")) from None
                    refused = Rejected(pending.reason_code, pending.detail)
                    raise _Refused(refusal(refused), refused) from None
                if is_command and not uow.emitted:
                    log.error("command_without_answer", command_type=incoming.type)
                if incoming.waited:
                    await unpark(conn, key)
                return OK
        except _Wait:
            if not incoming.waited:
                kept = await park(conn, key, incoming)
                if kept != incoming.stream_seq:  # a copy of a message already waiting
                    return Outcome(Fate.duplicate, same_message=False)
            else:
                await waited_once_more(conn, key)
            return WAITING
        except _Refused as refused:
            # Rolled back: nothing of the handler is kept. Recorded anew, with the answer.
            async with conn.transaction():
                if not await mark_processed(conn, key, incoming.stream_seq):
                    return await self._duplicate(conn, key, incoming)
                if incoming.waited:
                    await unpark(conn, key)
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
            await unpark(conn, key)
        seen = await conn.fetchval("SELECT stream_seq FROM processed WHERE message_id = $1", key)
        same = incoming.stream_seq is not None and seen == incoming.stream_seq
        return Outcome(Fate.duplicate, same_message=same)

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
        return refusal(rejected)

    async def answer_unprocessable(
        self, conn: asyncpg.Connection, incoming: Incoming, reason: str
    ) -> None:
        """A command that failed every attempt still gets an answer."""
        command_id = top_level_id(incoming.body)
        if command_id is None:
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
        with tracing.answering():  # under the platform's own trace, never the sender's
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
