"""The unit of work: one handled message (or timer tick), its transaction and what it emits.

A handler gets a `UnitOfWork`: it loads streams, decides, appends. The events go to the event
store and the outbox in the unit's transaction; `processed` records the message in the same one
(`mark_processed`), so a redelivered message has no second effect.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from shared.clock import Clock
from shared.contracts import Event, ReasonCode, new_id
from shared.eventstore import EventStore, NewEvent, StoredEvent


class NotYetKnown(Exception):
    """The command depends on a fact this service has not seen yet: try again later."""

    def __init__(self, detail: str, reason_code: ReasonCode = ReasonCode.unknown_referral) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason_code = reason_code


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
        if chained:
            ids = [str(uuid.uuid4()) for _ in events]
            causes = [self.message_id, *ids[:-1]]
        else:  # the store draws the ids
            ids, causes = [""] * len(events), [self.message_id] * len(events)
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
                    },
                    event_id,
                )
                for e, event_id, cause in zip(events, ids, causes, strict=True)
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
