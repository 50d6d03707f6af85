"""The unit of work: one handled message (or timer tick), its transaction and what it emits.

A handler gets a `UnitOfWork`: it loads streams, decides, appends. The events go to the event
store and the outbox in the unit's transaction; `processed` records the message in the same one
(`mark_processed`), so a redelivered message has no second effect.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from shared import tracing
from shared.clock import Clock
from shared.contracts import Event, new_id
from shared.errors import NotYetKnown as NotYetKnown  # re-exported: the domains raise it
from shared.eventstore import EventStore, NewEvent, StoredEvent

# The namespace of every event id the platform draws (`UnitOfWork.event_id`).
_EVENT_IDS = uuid.UUID("6f1d3c52-8a4e-4f0b-9c7e-2b5d1a9e4c30")

Handler = Callable[[Any, "UnitOfWork"], Awaitable[None]]


def events_and_version(stored: Sequence[StoredEvent]) -> tuple[list[Event], int]:
    """A stream as read: its events and the version an append must expect."""
    return [s.to_event() for s in stored], (stored[-1].stream_version if stored else 0)


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
        return events_and_version(stored)

    def caused_by(self, event_id: str, correlation_id: str) -> None:
        """For a timer's unit: the stored event its work follows from (an assignment gone
        overdue), so what it emits carries that chain's ids like any handled message's."""
        self.message_id, self.correlation_id = event_id, correlation_id or event_id

    async def append(
        self,
        stream_id: str,
        expected_version: int,
        events: Sequence[Event],
        *,
        chained: bool = False,
    ) -> None:
        """Append in this unit's transaction. Each event's `causationid` is the handled
        message; `chained`, each after the first is caused by the one before it instead (an
        AssignmentOverdue, then the reassignment it leads to)."""
        ids = [self.event_id(stream_id, expected_version + n) for n in range(1, len(events) + 1)]
        causes = [self.message_id, *ids[:-1]] if chained else [self.message_id] * len(events)
        # Traced: the span of this work (a message's handling, a timer's unit, an HTTP request),
        # for the outbox's publish to be its child, whenever and by whomever it is published.
        context = tracing.current_context() if tracing.TRACER is not None else None
        await self.store.append(
            self.conn,
            stream_id,
            expected_version,
            [
                NewEvent(
                    e,
                    {
                        "correlation_id": self.correlation_id,
                        "causation_id": cause,
                        "hospital": e.hospital,
                        "service": self.service,
                        **(context or {}),
                    },
                    event_id,
                )
                for e, event_id, cause in zip(events, ids, causes, strict=True)
            ],
        )
        self.emitted.extend(events)
        batch = _BATCHES.get(id(self.conn))
        if batch is not None:
            batch.appended = True

    def event_id(self, stream_id: str, version: int) -> str:
        """The id of the event this unit appends at `version` of `stream_id`: drawn from the
        handled message, not at random, so the same message handled again from the same state
        (a service catching up from the stream after a restore, docs/decisions.md "Backup and
        restore") decides the same event under the same id, a duplicate to every consumer, not
        a second fact. The message id is random (a sender's UUID), so nothing about the stream
        id can be computed back from it."""
        name = f"{self.service}\x00{self.message_id}\x00{stream_id}\x00{version}"
        return str(uuid.uuid5(_EVENT_IDS, name))

    async def repeat(self, event: Event) -> None:
        """Answer an identical repeat of a command (a new id, the same payload) with a copy of
        the fact it repeats: every command ends in one event, and the aggregate's own stream
        stays free of duplicates. Consumers dedupe creations by their domain key."""
        if not self.answer_repeats:
            return
        await self.append(f"repeat:{self.hospital}:{self.message_id}", 0, [event])

    async def append_or_repeat(
        self,
        stream_id: str,
        expected_version: int,
        events: Sequence[Event],
        history: Sequence[Event],
    ) -> None:
        """Record what a creating command decided: its events, or, when it decided none
        because it repeats what the stream already holds, a copy of the stream's first fact
        (the creation it repeats) as its answer."""
        if events:
            await self.append(stream_id, expected_version, events)
        elif history:
            await self.repeat(history[0])


async def mark_processed(conn: asyncpg.Connection, key: str, stream_seq: int | None) -> bool:
    """Record a message as handled; False when it was handled before."""
    row = await conn.fetchval(
        "INSERT INTO processed (message_id, stream_seq) VALUES ($1, $2)"
        " ON CONFLICT (message_id) DO NOTHING RETURNING 1",
        key,
        stream_seq,
    )
    return row is not None


# A key of only these characters (a hospital slug and a UUID, as every sender's id is) can be
# written as an SQL literal with nothing to escape; any other takes the parameterised path.
_LITERAL_KEY = re.compile(r"[A-Za-z0-9:._-]{1,200}\Z")
_SAVEPOINT = "post_message"


@dataclass
class Batch:
    """A partition's batch of messages in one transaction (shared/consumer.py), as its
    statements go: what can ride on the next statement instead of a round trip of its own."""

    # SQL the batch's first message statement carries before its own (the outbox rows the
    # relay published after the last batch: deleted in this transaction, no flush of their own)
    lead: str = ""
    lead_done: bool = False
    # the last message's savepoint, still open: the next message's statement releases it (the
    # commit releases the last one), one round trip less a message
    release_pending: str = ""
    messages: int = 0
    appended: bool = False  # something was appended: the relay has something to publish

    def savepoint(self) -> str:
        """A name for the next message's savepoint, never the open one's: when a statement
        fails before its own savepoint exists, rolling back to that name fails too (and the
        batch with it) instead of undoing the message before."""
        self.messages += 1
        return f"{_SAVEPOINT}_{self.messages % 2}"

    def take_lead(self) -> str:
        lead, self.lead, self.lead_done = self.lead, "", self.lead_done or bool(self.lead)
        return lead


# By the connection's id while its batch's transaction is open (pool proxies take no weak
# references; the entry goes when the transaction ends, so an id is never taken for another's).
_BATCHES: dict[int, Batch] = {}


@asynccontextmanager
async def batch_transaction(conn: asyncpg.Connection, lead: str = "") -> AsyncIterator[Batch]:
    """The transaction of a batch of messages on `conn`. Inside it, `processed_savepoint`
    leaves each message's savepoint for the next message's statement to release, and the
    first one carries `lead`."""
    batch = Batch(lead=lead)
    async with conn.transaction():
        _BATCHES[id(conn)] = batch
        try:
            yield batch
        finally:
            _BATCHES.pop(id(conn), None)


@asynccontextmanager
async def processed_savepoint(
    conn: asyncpg.Connection, key: str, stream_seq: int | None
) -> AsyncIterator[bool]:
    """A savepoint of one message's work, with the message recorded as processed in it: yields
    False when it was handled before. All of it is rolled back when the block raises.

    The savepoint and the `processed` row go in one round trip (a simple-protocol query of two
    statements; INSERT's status says whether a row went in), where `conn.transaction()` and
    `mark_processed` took two: one of the few per message (issue 15's profile). In a
    `batch_transaction` the same round trip first releases the savepoint of the message
    before (issue 23: one round trip a message less)."""
    batch = _BATCHES.get(id(conn))
    lead, name = "", _SAVEPOINT
    if batch is not None:
        lead, name = batch.take_lead(), batch.savepoint()
        if batch.release_pending:
            lead += f"RELEASE SAVEPOINT {batch.release_pending}; "
        batch.release_pending = ""
    if _LITERAL_KEY.match(key) and (stream_seq is None or type(stream_seq) is int):
        seq = "NULL" if stream_seq is None else str(stream_seq)
        try:
            status = await conn.execute(
                f"{lead}SAVEPOINT {name}; INSERT INTO processed (message_id, stream_seq)"
                f" VALUES ('{key}', {seq}) ON CONFLICT (message_id) DO NOTHING"
            )
        except BaseException:
            await _roll_back_quietly(conn, name)
            raise
        fresh = status == "INSERT 0 1"
    else:
        await conn.execute(f"{lead}SAVEPOINT {name}")
        try:
            fresh = await mark_processed(conn, key, stream_seq)
        except BaseException:
            await _roll_back_quietly(conn, name)
            raise
    try:
        yield fresh
    except BaseException:
        await conn.execute(f"ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}")
        raise
    if batch is not None and _BATCHES.get(id(conn)) is batch:
        batch.release_pending = name
    else:
        await conn.execute(f"RELEASE SAVEPOINT {name}")


async def _roll_back_quietly(conn: asyncpg.Connection, name: str) -> None:
    """After a failed first statement: undo the savepoint if it was made (the error raised
    is the one that matters)."""
    with suppress(Exception):  # the savepoint was never made, or the connection is gone
        await conn.execute(f"ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}")
