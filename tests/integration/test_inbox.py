"""`shared/inbox.py` on a real PostgreSQL: a hospital held back behind its retried message, and
the messages that wait for a fact (issue 21)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import nats
import pytest

from shared import inbox
from shared.client import wait_consumed
from shared.inbox import Incoming
from shared.partitions import ensure_work_stream, partition_of, work_stream
from shared.runtime import Platform
from shared.service import ensure_stream

pytestmark = pytest.mark.integration

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def message(hospital: str, seq: int, type_: str = "RecordOutreach") -> Incoming:
    return Incoming(
        subject=f"post.{hospital}.cmd.{type_}",
        hospital=hospital,
        kind="cmd",
        type=type_,
        body=f'{{"id": "m-{seq}"}}'.encode(),
        stream_seq=seq,
        attempt=1,
        stored_at=NOW,
    )


async def test_a_head_and_the_messages_held_behind_it_come_back_in_stream_order(
    pool: asyncpg.Pool,
) -> None:
    hospital, other = f"h-{uuid.uuid4().hex[:8]}", f"h-{uuid.uuid4().hex[:8]}"
    partition = partition_of(hospital)
    service = f"svc-{uuid.uuid4().hex[:6]}"
    async with pool.acquire() as conn, conn.transaction():
        await inbox.hold_head(conn, service, message(hospital, 10), 1, NOW + timedelta(seconds=1))
        for seq in (14, 12, 13):
            assert await inbox.hold(conn, message(hospital, seq))
        assert not await inbox.hold(conn, message(hospital, 12))  # delivered again: kept once
        # a message waiting for a fact is another kind of row: not held, not a head
        await inbox.park(conn, f"{other}:w-1", message(other, 11))

        assert await inbox.held_back(conn, partition) == {hospital}
        assert hospital in await inbox.held_back_anywhere(conn, partition)
        assert await inbox.due_heads(conn, partition, NOW) == []
        assert await inbox.due_heads(conn, partition, NOW + timedelta(seconds=1)) == [hospital]
        waiting = await inbox.waiting_messages(conn, partition_of(other), [other])
        assert [m.stream_seq for m in waiting] == [11]
        assert await inbox.waiting_messages(conn, partition, [hospital]) == []

        queue = await inbox.take_queue(conn, hospital)
        assert [m.stream_seq for m in queue] == [10, 12, 13, 14]
        assert [m.attempt for m in queue] == [2, 1, 1, 1]  # the head's next try is its second
        assert not any(m.waited for m in queue)  # handled as if they came from the stream now
        assert await inbox.held_back(conn, partition) == set()
        await inbox.release(conn, service, hospital)
        assert hospital not in await inbox.held_back_anywhere(conn, partition)
        # the waiting row of the other hospital is untouched
        assert await conn.fetchval("SELECT count(*) FROM waiting") == 1


async def test_a_head_that_fails_again_is_kept_with_its_count(pool: asyncpg.Pool) -> None:
    hospital = f"h-{uuid.uuid4().hex[:8]}"
    service = f"svc-{uuid.uuid4().hex[:6]}"
    async with pool.acquire() as conn, conn.transaction():
        head = message(hospital, 20)
        await inbox.hold_head(conn, service, head, 1, NOW)
        [taken] = await inbox.take_queue(conn, hospital)
        await inbox.hold_head(conn, service, taken, taken.attempt, NOW + timedelta(seconds=2))
        [again] = await inbox.take_queue(conn, hospital)
        assert (again.stream_seq, again.attempt, again.body) == (20, 3, head.body)


async def test_a_service_holding_a_hospital_back_has_not_caught_up(
    pool: asyncpg.Pool, platform: Platform
) -> None:
    """`wait_consumed` with the database: a parked message is acknowledged in NATS (the
    service's work stream is empty) but not handled; until its hospital is released the
    service has not caught up."""
    service = f"svc-{uuid.uuid4().hex[:6]}"
    hospital = f"h-{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(platform.nats_url)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        await ensure_work_stream(js, service, [f"post.*.cmd.{service}Thing"], 1)
        await wait_consumed(platform.nats_url, service, timeout=5)  # nothing in the stream
        async with pool.acquire() as conn:
            await inbox.hold_head(conn, service, message(hospital, 7), 1, NOW)
            with pytest.raises(TimeoutError):
                await wait_consumed(platform.nats_url, service, timeout=2, db_url=platform.db_url)
            await wait_consumed(platform.nats_url, service, timeout=5)  # NATS alone: caught up
            await inbox.take_queue(conn, hospital)
            await inbox.release(conn, service, hospital)
        await wait_consumed(platform.nats_url, service, timeout=5, db_url=platform.db_url)
    finally:
        await js.delete_stream(work_stream(service))
        await nc.close()
