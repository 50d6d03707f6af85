"""The messages a partition keeps off the stream, in its `waiting` table, and why.

Two kinds of row, both written on the partition's lease connection in the batch's
transaction (so they are fenced like everything else of the partition):

- **waiting**: a message that needs another service's fact not seen yet (`NotYetKnown`). It is
  tried again after every message of its hospital and refused once nothing it could wait for
  is pending (shared/dispatch.py). Later messages of its hospital go on past it.
- **held back**: a message that failed for a passing reason (the database, NATS) becomes its
  hospital's *head*, tried again at `retry_at` with back-off; every later message of that
  hospital is kept behind it (`held`), in stream order, until the head is done. The
  partition's other hospitals go on (issue 21: one hospital's failure delays nobody else).
  While a hospital is held back in any service, `post_platform.holds` says so, and no service
  refuses that hospital's waiting commands for want of a fact (it may be the held one's).

A head or held row is keyed `{hospital}@{stream sequence}` (it may not even parse); a waiting
row `{hospital}:{CloudEvents id}`, as in `processed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from shared.contracts import COMMANDS, EVENTS
from shared.partitions import partition_of

_COLUMNS = "message_id, hospital, stream_seq, subject, body, stored_at, attempts, failures"


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
    waited: bool = False  # taken from ``waiting`` (it waited for a fact)
    parked_key: str | None = None  # its row in ``waiting``, when it came from there

    @property
    def label(self) -> str:
        """The type as a metric label: a subject's last token may be anything, labels not."""
        return self.type if self.type in COMMANDS or self.type in EVENTS else "unknown"


def head_key(incoming: Incoming) -> str:
    return f"{incoming.hospital}@{incoming.stream_seq}"


def _incoming(row: asyncpg.Record, *, waited: bool) -> Incoming:
    subject = row["subject"]
    tokens = subject.split(".")
    return Incoming(
        subject=subject,
        hospital=row["hospital"],
        kind=tokens[2],
        type=tokens[3],
        body=bytes(row["body"]),
        stream_seq=row["stream_seq"],
        # a waiting row counts its waits; a head its failures (the retry's number)
        attempt=(row["attempts"] if waited else row["failures"]) + 1,
        stored_at=row["stored_at"],
        waited=waited,
        parked_key=row["message_id"],
    )


# -- waiting for a fact ----------------------------------------------------------------------


_INSERT = (
    "INSERT INTO waiting (message_id, partition, hospital, stream_seq, subject, body, stored_at,"
    " attempts, held, retry_at, failures) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
)


def _row(
    key: str,
    incoming: Incoming,
    *,
    attempts: int = 0,
    held: bool = False,
    retry_at: datetime | None = None,
    failures: int = 0,
) -> tuple[object, ...]:
    return (
        key,
        partition_of(incoming.hospital),
        incoming.hospital,
        incoming.stream_seq,
        incoming.subject,
        incoming.body,
        incoming.stored_at or datetime.now(UTC),
        attempts,
        held,
        retry_at,
        failures,
    )


async def park(conn: asyncpg.Connection, key: str, incoming: Incoming) -> int | None:
    """Keep a message in ``waiting``; returns the stream sequence of the one kept under its id
    (another when this is a copy of a message already waiting)."""
    return await conn.fetchval(
        f"WITH kept AS ({_INSERT} ON CONFLICT (message_id) DO NOTHING RETURNING stream_seq)"
        " SELECT stream_seq FROM kept"
        " UNION ALL SELECT stream_seq FROM waiting WHERE message_id = $1 LIMIT 1",
        *_row(key, incoming, attempts=incoming.attempt),
    )


async def unpark(conn: asyncpg.Connection, key: str) -> None:
    await conn.execute("DELETE FROM waiting WHERE message_id = $1", key)


async def waited_once_more(conn: asyncpg.Connection, key: str) -> None:
    await conn.execute("UPDATE waiting SET attempts = attempts + 1 WHERE message_id = $1", key)


async def waiting_messages(
    conn: asyncpg.Connection, partition: int, hospitals: list[str] | None = None
) -> list[Incoming]:
    """The messages of `partition` (of `hospitals`, when given) that wait for a fact, in
    stream order (held-back ones are not among them: they go with their head)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM waiting WHERE partition = $1"
        " AND NOT held AND retry_at IS NULL"
        " AND ($2::text[] IS NULL OR hospital = ANY($2::text[]))"
        " ORDER BY stream_seq NULLS LAST, message_id",
        partition,
        hospitals,
    )
    return [_incoming(r, waited=True) for r in rows]


# -- held back by a passing failure ----------------------------------------------------------


async def hold_head(
    conn: asyncpg.Connection, service: str, incoming: Incoming, failures: int, retry_at: datetime
) -> None:
    """`incoming` failed for a passing reason: it holds back its hospital until `retry_at`."""
    await conn.execute(
        f"{_INSERT} ON CONFLICT (message_id) DO UPDATE SET held = false, retry_at = $10,"
        " failures = $11",
        *_row(head_key(incoming), incoming, retry_at=retry_at, failures=failures),
    )
    await conn.execute(
        "INSERT INTO post_platform.holds (service, hospital, partition) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING",
        service,
        incoming.hospital,
        partition_of(incoming.hospital),
    )


async def hold(conn: asyncpg.Connection, incoming: Incoming) -> bool:
    """Keep a message behind its hospital's head; False when it is kept already (delivered
    again)."""
    kept = await conn.fetchval(
        f"{_INSERT} ON CONFLICT (message_id) DO NOTHING RETURNING 1",
        *_row(head_key(incoming), incoming, held=True),
    )
    return kept is not None


async def held_back(conn: asyncpg.Connection, partition: int) -> set[str]:
    """The hospitals of `partition` this service holds back."""
    rows = await conn.fetch(
        "SELECT DISTINCT hospital FROM waiting WHERE partition = $1"
        " AND (held OR retry_at IS NOT NULL)",
        partition,
    )
    return {r["hospital"] for r in rows}


async def holds(conn: asyncpg.Connection, service: str) -> int:
    """How many hospitals `service` holds back, over every partition (an operator's, a test's
    question: is it done with what it acknowledged?)."""
    return int(
        await conn.fetchval("SELECT count(*) FROM post_platform.holds WHERE service = $1", service)
    )


async def held_back_anywhere(conn: asyncpg.Connection, partition: int) -> set[str]:
    """The hospitals of `partition` that some service holds back."""
    rows = await conn.fetch(
        "SELECT hospital FROM post_platform.holds WHERE partition = $1", partition
    )
    return {r["hospital"] for r in rows}


async def due_heads(conn: asyncpg.Connection, partition: int, now: datetime) -> list[str]:
    """The hospitals whose head is due for its next try."""
    rows = await conn.fetch(
        "SELECT hospital FROM waiting WHERE partition = $1 AND retry_at <= $2 ORDER BY retry_at",
        partition,
        now,
    )
    return [r["hospital"] for r in rows]


async def take_queue(conn: asyncpg.Connection, hospital: str) -> list[Incoming]:
    """A held-back hospital's head and the messages behind it, in stream order, taken out of
    ``waiting`` (in the caller's transaction): each is then handled as if it came from the
    stream now, and whatever is left is put back with `hold` / `hold_head`."""
    rows = await conn.fetch(
        f"DELETE FROM waiting WHERE hospital = $1 AND (held OR retry_at IS NOT NULL)"
        f" RETURNING {_COLUMNS}, retry_at IS NOT NULL AS head",
        hospital,
    )
    rows = sorted(rows, key=lambda r: (not r["head"], r["stream_seq"] or 0))
    return [_incoming(r, waited=False) for r in rows]


async def release(conn: asyncpg.Connection, service: str, hospital: str) -> None:
    """The hospital is no longer held back by this service."""
    await conn.execute(
        "DELETE FROM post_platform.holds WHERE service = $1 AND hospital = $2", service, hospital
    )


def retry_time(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)
