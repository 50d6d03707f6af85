"""The transactional outbox relay: committed events -> JetStream, each exactly once downstream.

Events are queued in ``outbox`` in the transaction that appends them, with their hospital's
partition. The instance that owns a partition publishes its rows (shared/consumer.py), on the
connection that holds the partition: one publisher per partition, so a hospital's events leave
in the order they were appended. A batch goes pipelined (all publishes in flight, then all acks
awaited), with ``Nats-Msg-Id`` = the event id, and only then are the rows deleted. A crash
before the delete republishes the batch: JetStream drops the copies inside its duplicate window,
and consumers drop any later copy by the CloudEvents id they record in ``processed``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import structlog
from nats.js import JetStreamContext

from shared import tracing
from shared.contracts import encode, evt_subject, make_cloudevent
from shared.observability import OUTBOX_BACKLOG, OUTBOX_PUBLISH_SECONDS, OUTBOX_PUBLISHED

log = structlog.get_logger()

# The rows JetStream has acknowledged go as the next batch is read: one round trip. The
# statement's snapshot still sees them, so the read leaves them out. By (partition, position):
# the outbox's one index (migration 003). Deleting nothing writes nothing (no flush).
DELETE_AND_NEXT_SQL = """
WITH published AS (DELETE FROM outbox WHERE partition = $3 AND position = ANY($4::bigint[]))
SELECT o.position, e.event_id::text AS event_id, e.event_type, e.data, e.metadata, e.recorded_at
FROM outbox o JOIN events e USING (position)
WHERE o.partition = $3 AND o.position > $2 AND o.position <> ALL($4::bigint[])
ORDER BY o.position
LIMIT $1
"""
DELETE_SQL = "DELETE FROM outbox WHERE partition = $2 AND position = ANY($1::bigint[])"


def cloudevent_of(row: asyncpg.Record | dict[str, Any], service: str) -> tuple[str, dict[str, Any]]:
    """A stored event as the CloudEvent it is published as, with its subject."""
    meta = row["metadata"]
    hospital = meta["hospital"]
    ce = make_cloudevent(
        type_=row["event_type"],
        source=f"/hospitals/{hospital}/{service}",
        data=row["data"],
        id_=row["event_id"],
        time=row["recorded_at"],
        correlationid=meta.get("correlation_id"),
        causationid=meta.get("causation_id"),
    )
    return evt_subject(hospital, row["event_type"]), ce


class OutboxRelay:
    """One partition's publisher (its worker's, on the lease connection)."""

    def __init__(self, service: str, js: JetStreamContext, batch_size: int = 500) -> None:
        self.service = service
        self.js = js
        self.batch_size = batch_size
        # Published, not yet deleted: deleted by the next read, or in the partition's next
        # batch transaction (`take_published`), never in a transaction of their own.
        self.published: list[int] = []

    def take_published(self, partition: int) -> tuple[str, list[int]]:
        """The DELETE of the rows published and not yet deleted, as a statement to run in the
        caller's transaction (positions are integers: a literal array, nothing to escape), and
        those positions, to give back with `keep_published` if that transaction fails."""
        taken, self.published = self.published, []
        if not taken:
            return "", []
        array = ",".join(str(int(p)) for p in taken)
        sql = (
            f"DELETE FROM outbox WHERE partition = {int(partition)}"
            f" AND position = ANY('{{{array}}}'::bigint[]); "
        )
        return sql, taken

    def keep_published(self, positions: list[int]) -> None:
        self.published = sorted({*positions, *self.published})

    async def delete_published(self, conn: asyncpg.Connection, partition: int) -> None:
        """Delete what was published now (a partition handed back cleanly)."""
        if self.published:
            await conn.execute(DELETE_SQL, self.published, partition)
            self.published = []

    async def publish_pending(self, conn: asyncpg.Connection, partition: int) -> int:
        """Publish what is pending in `partition`, batch after batch; returns how many were.

        While JetStream acknowledges one batch, the next is read (a position past it) and the
        one before is deleted: the database and the publishing overlap. A row goes only once
        JetStream has acknowledged it. One committed late below a published position waits for
        the next call (appends commit out of position order); its own stream's order holds,
        since an append to a stream follows the commit of the one before.
        """
        total = 0
        acked, self.published = self.published, []
        try:
            rows = await conn.fetch(DELETE_AND_NEXT_SQL, self.batch_size, 0, partition, acked)
        except BaseException:
            self.keep_published(acked)
            raise
        acked = []
        while rows:
            started = time.perf_counter()
            # Sent in order, acknowledged together: pipelining is ~10x one-at-a-time.
            acks = asyncio.gather(*(self._publish(row) for row in rows))
            following: list[asyncpg.Record] = []
            try:
                if len(rows) == self.batch_size:
                    following = await conn.fetch(
                        DELETE_AND_NEXT_SQL, self.batch_size, rows[-1]["position"], partition, acked
                    )
                elif acked:
                    await conn.execute(DELETE_SQL, acked, partition)
            finally:
                await acks  # never leave publishes behind, even when the database failed
            acked = [r["position"] for r in rows]
            OUTBOX_PUBLISH_SECONDS.labels(self.service).observe(time.perf_counter() - started)
            OUTBOX_PUBLISHED.labels(self.service).inc(len(rows))
            total += len(rows)
            rows = following
        self.keep_published(acked)  # deleted by the next read or the next batch's transaction
        return total

    async def _publish(self, row: asyncpg.Record) -> None:
        subject, ce = cloudevent_of(row, self.service)
        if tracing.TRACER is None:
            await self.js.publish(subject, encode(ce), headers={"Nats-Msg-Id": ce["id"]})
            return
        # The publish span, the child of the work that appended the event (its metadata
        # remembers it); the envelope and the NATS headers carry the span's context.
        meta = row["metadata"]
        with tracing.producing(
            self.service, subject, row["event_type"], meta["hospital"], meta
        ) as context:
            ce.update(context)
            await self.js.publish(subject, encode(ce), headers={"Nats-Msg-Id": ce["id"], **context})


async def report_backlog(service: str, pool: asyncpg.Pool) -> int:
    """The outbox backlog gauge (a count: taken now and then, not on every publish)."""
    n = int(await pool.fetchval("SELECT count(*) FROM outbox"))
    OUTBOX_BACKLOG.labels(service).set(n)
    return n
