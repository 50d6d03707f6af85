"""The transactional outbox relay: committed events -> JetStream, each exactly once downstream.

Events are queued in ``outbox`` in the transaction that appends them. The relay publishes a
batch pipelined (all publishes in flight, then all acks awaited), with ``Nats-Msg-Id`` = the
event id, and only then deletes the rows. A crash before the delete republishes the batch:
JetStream drops the copies inside its duplicate window, and consumers drop any later copy by
the CloudEvents id they record in ``processed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg
import structlog
from nats.js import JetStreamContext

from shared.contracts import encode, evt_subject, make_cloudevent
from shared.observability import OUTBOX_BACKLOG, OUTBOX_PUBLISH_SECONDS, OUTBOX_PUBLISHED

log = structlog.get_logger()

PENDING_SQL = """
SELECT o.position, e.event_id::text AS event_id, e.event_type, e.data, e.metadata, e.recorded_at
FROM outbox o JOIN events e USING (position)
WHERE o.position > $2
ORDER BY o.position
LIMIT $1
"""
DELETE_SQL = "DELETE FROM outbox WHERE position = ANY($1::bigint[])"
# The rows of the batch JetStream has acknowledged go as the next batch is read: one round trip.
DELETE_AND_NEXT_SQL = f"""
WITH published AS (DELETE FROM outbox WHERE position = ANY($3::bigint[]))
{PENDING_SQL}"""


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


# The backlog gauge costs a count: taken now and then, not on every wake-up.
BACKLOG_EVERY_SECONDS = 5.0


class OutboxRelay:
    def __init__(
        self, service: str, pool: asyncpg.Pool, js: JetStreamContext, batch_size: int = 500
    ) -> None:
        self.service = service
        self.pool = pool
        self.js = js
        self.batch_size = batch_size
        self.wakeup = asyncio.Event()

    async def publish_pending(self, conn: asyncpg.Connection | None = None) -> int:
        """Publish what is pending, batch after batch; returns how many were published.

        While JetStream acknowledges one batch, the next is read (a position past it) and the
        one before is deleted: the database and the publishing overlap. A row goes only once
        JetStream has acknowledged it. One committed late below a published position waits for
        the next call (appends commit out of position order); its own stream's order holds,
        since an append to a stream follows the commit of the one before.
        """
        if conn is None:
            async with self.pool.acquire() as pooled:
                return await self.publish_pending(pooled)
        total = 0
        rows = await conn.fetch(PENDING_SQL, self.batch_size, 0)
        acked: list[int] = []
        while rows:
            started = time.perf_counter()
            # Sent in order, acknowledged together: pipelining is ~10x one-at-a-time.
            acks = asyncio.gather(*(self._publish(row) for row in rows))
            following: list[asyncpg.Record] = []
            try:
                if len(rows) == self.batch_size:
                    following = await conn.fetch(
                        DELETE_AND_NEXT_SQL, self.batch_size, rows[-1]["position"], acked
                    )
                elif acked:
                    await conn.execute(DELETE_SQL, acked)
            finally:
                await acks  # never leave publishes behind, even when the database failed
            acked = [r["position"] for r in rows]
            OUTBOX_PUBLISH_SECONDS.labels(self.service).observe(time.perf_counter() - started)
            OUTBOX_PUBLISHED.labels(self.service).inc(len(rows))
            total += len(rows)
            rows = following
        if acked:
            await conn.execute(DELETE_SQL, acked)
        return total

    async def _publish(self, row: asyncpg.Record) -> None:
        subject, ce = cloudevent_of(row, self.service)
        await self.js.publish(subject, encode(ce), headers={"Nats-Msg-Id": ce["id"]})

    async def backlog(self, conn: asyncpg.Connection | None = None) -> int:
        if conn is None:
            async with self.pool.acquire() as pooled:
                return await self.backlog(pooled)
        n = int(await conn.fetchval("SELECT count(*) FROM outbox"))
        OUTBOX_BACKLOG.labels(self.service).set(n)
        return n

    async def run(self, poll_seconds: float = 1.0) -> None:
        """Publish forever. Only one relay per service holds the lock, so order is kept even
        with several replicas; the others wait to take over."""
        while True:
            try:
                async with self.pool.acquire() as lock_conn:
                    got = await lock_conn.fetchval(
                        "SELECT pg_try_advisory_lock(hashtext(current_schema() || '.relay'))"
                    )
                    if not got:
                        await asyncio.sleep(poll_seconds)
                        continue
                    try:
                        await self._loop(lock_conn, poll_seconds)
                    finally:
                        await lock_conn.execute(
                            "SELECT pg_advisory_unlock(hashtext(current_schema() || '.relay'))"
                        )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS or PostgreSQL away: back off and try again
                log.warning("outbox_relay_failed", error=repr(exc))
                await asyncio.sleep(poll_seconds)

    async def _loop(self, conn: asyncpg.Connection, poll_seconds: float) -> None:
        """On the connection that holds the lock: no pool round trips for each wake-up."""
        reported = 0.0
        while True:
            self.wakeup.clear()
            await self.publish_pending(conn)
            if time.monotonic() - reported > BACKLOG_EVERY_SECONDS:
                await self.backlog(conn)
                reported = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout=poll_seconds)
