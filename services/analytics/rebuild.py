"""`postctl analytics rebuild`: new read models from the whole POST stream, blue/green.

The old read models keep answering while the new ones are built (as Marten's blue/green
rebuild does):

1. **Build** a schema of its own (``<schema>_rebuild``, created by the same migrations): every
   event message up to the stream's last sequence at start, read with a bounded ephemeral
   consumer and written as the live handler writes it (``projection.row_of``), in batched
   transactions, each message recorded in ``processed``; then catch up with what came
   meanwhile, the same way, until the tail is short. The aggregate triggers and the secondary
   indexes are off for this bulk (``bulk()``: they cost statements and index entries per fact
   row); then the indexes are made again and, in one transaction, every table the triggers
   keep is built from the facts by grouping (``agg_build()``) and the triggers enabled.
2. **Catch up** again with what came while that ran, with the triggers on.
3. **Swap**, in one transaction: lock every table of the live schema (the live consumer's next
   write waits), replay the last few messages, carry over what is not a read model (waiting
   messages, instances, versions raised above every old one so no kept answer is served
   again), rename the live schema away and the new one into its place, drop the old one.
   A live write that waited fails on the dropped table and is retried into the new schema; a
   query that waited is planned again against it. A deadlock with a live transaction (the
   swap locks many tables) rolls the swap back and it is tried again; the built schema stays.
   A read that was the deadlock's victim is asked again (facts.read_snapshot).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nats
import structlog
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.analytics import projection
from shared.contracts import (
    STREAM_NAME,
    Rejected,
    Unanswerable,
    evt_subject,
    parse_envelope,
    parse_event,
    parse_subject,
)
from shared.eventstore import create_pool, migrate
from shared.settings import Settings

log = structlog.get_logger()

SCHEMA = "analytics"
MIGRATIONS = Path(__file__).parent / "migrations"
BATCH = 1000
IDLE_SECONDS = 2.0
DEADLOCK_RETRIES = 5
IN_FLIGHT_BATCHES = 4  # batches the server may send ahead of the database


@dataclass
class Message:
    """One stream message, read: its `processed` key, sequence and (when it has one) fact."""

    key: str
    seq: int
    event_type: str
    row: projection.Row | None


def read_message(msg: Msg) -> Message | None:
    """None for a message the live consumer would not record either (not a CloudEvent)."""
    try:
        hospital, _, event_type = parse_subject(msg.subject)
        ce = parse_envelope(msg.data)
    except (ValueError, Unanswerable, Rejected):
        return None
    seq = msg.metadata.sequence.stream
    row = None
    if event_type in projection.PROJECTIONS:
        try:
            row = projection.row_of(parse_event(event_type, ce.data), seq, ce.id)
        except Rejected as refused:  # live, the same event is logged and skipped
            log.warning("event_refused", reason=refused.reason_code, detail=refused.detail)
    return Message(f"{hospital}:{ce.id}", seq, event_type, row)


async def apply_batch(conn: asyncpg.Connection, batch: list[Message]) -> int:
    """Record the batch in `processed` and write the facts of the messages new to it."""
    # A copy counts once (the first); stream order kept for the statements below.
    firsts = sorted({m.key: m for m in reversed(batch)}.values(), key=lambda m: m.seq)
    new = {
        r["message_id"]
        for r in await conn.fetch(
            "INSERT INTO processed (message_id, stream_seq)"
            " SELECT * FROM unnest($1::text[], $2::bigint[])"
            " ON CONFLICT (message_id) DO NOTHING RETURNING message_id",
            [m.key for m in firsts],
            [m.seq for m in firsts],
        )
    }
    rows = [m.row for m in firsts if m.key in new and m.row is not None]
    await write_facts(conn, rows)
    return len(rows)


async def write_facts(conn: asyncpg.Connection, rows: list[projection.Row]) -> None:
    """Write fact rows as the live handler would (each hospital's version bumped once), in the
    caller's transaction: one `executemany` per statement."""
    by_sql: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in rows:
        by_sql[row.sql].append(row.args)
    # Upserts are order-independent across statements; within one, executemany keeps order.
    hospitals: set[str] = set()
    for sql, args in by_sql.items():
        await conn.executemany(sql, args)
        hospitals.update(a[0] for a in args)
    if hospitals:  # once per hospital and batch, not per row as live
        await conn.execute(projection.BUMP_SQL, sorted(hospitals))


async def _apply_with_retry(pool: asyncpg.Pool, batch: list[Message]) -> int:
    for attempt in range(1, DEADLOCK_RETRIES + 1):
        try:
            async with pool.acquire() as conn, conn.transaction():
                return await apply_batch(conn, batch)
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
            # A live handler touched the same rows; it has finished by now.
            if attempt == DEADLOCK_RETRIES:
                raise
            await asyncio.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


async def rebuild(
    settings: Settings | None = None,
    *,
    schema: str = SCHEMA,
    batch_size: int = BATCH,
    idle_seconds: float = IDLE_SECONDS,
    counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Build new read models of `schema` from the stream and swap them in; returns counts and
    the speed. `counts`, when given, is kept up to date as it goes (postctl's progress)."""
    settings = settings or Settings()
    started = time.perf_counter()
    shadow = f"{schema}{SHADOW_SUFFIX}"
    live = await create_pool(
        settings.database_url.get_secret_value(), schema, min_size=1, max_size=1
    )
    nc = await nats.connect(
        settings.nats_servers, name="post-analytics-rebuild", tls=settings.nats_tls()
    )
    counts = counts if counts is not None else {}
    counts.update(
        messages=0, events_applied=0, skipped=0, swap_attempts=0, index_ms=0, aggregate_ms=0
    )
    try:
        await migrate(live, schema, MIGRATIONS)
        async with live.acquire() as lock:
            # One rebuild of a schema at a time.
            await lock.execute("SELECT pg_advisory_lock(hashtext($1))", f"rebuild:{schema}")
            try:
                js = nc.jetstream()
                last_seq = await _build(
                    js, lock, settings, schema, shadow, batch_size, idle_seconds, counts
                )
                rows = {
                    table: await lock.fetchval(f"SELECT count(*) FROM {table}")
                    for table in projection.FACT_TABLES
                }
            finally:
                await lock.execute("SELECT pg_advisory_unlock(hashtext($1))", f"rebuild:{schema}")
    finally:
        await nc.close()
        await live.close()
    seconds = time.perf_counter() - started
    return {
        **counts,
        "last_seq": last_seq,
        "rows": rows,
        "seconds": round(seconds, 3),
        "events_per_second": round(counts["messages"] / seconds, 1) if seconds else None,
    }


SHADOW_SUFFIX = "_rebuild"
CATCH_UP_ROUNDS = 5
SHORT_TAIL = 1000  # messages: what the swap may replay while the live schema waits
SWAP_ATTEMPTS = 30


async def _build(
    js: Any,
    conn: asyncpg.Connection,
    settings: Settings,
    schema: str,
    shadow: str,
    batch_size: int,
    idle_seconds: float,
    counts: dict[str, int],
) -> int:
    """Build `shadow`, catch it up, swap it in for `schema` on `conn` (the connection holding
    the rebuild's lock); returns the last sequence read."""
    await _drop_schema(conn, shadow)  # a killed rebuild's
    try:
        pool = await create_pool(
            settings.database_url.get_secret_value(), shadow, min_size=1, max_size=2
        )
        try:
            await migrate(pool, shadow, MIGRATIONS)
            replay = (js, pool, batch_size, idle_seconds, counts)
            async with bulk(pool, shadow, counts):
                done = await _catch_up(*replay, 0)
            done = await _catch_up(*replay, done)  # what came while the aggregates were built
            for attempt in range(1, SWAP_ATTEMPTS + 1):
                counts["swap_attempts"] = attempt
                try:
                    return await _swap(js, pool, conn, schema, shadow, done, batch_size, counts)
                except (asyncpg.DeadlockDetectedError, asyncpg.LockNotAvailableError):
                    log.warning("rebuild_swap_retried", attempt=attempt)
                    await asyncio.sleep(0.2 * attempt)
            raise RuntimeError("the rebuilt read models could not be swapped in")
        finally:
            await pool.close()
    except BaseException:
        # A half-built copy must not outlive the rebuild: it may name a physician forgotten
        # since it read the stream.
        await _drop_schema(conn, shadow)
        raise


async def _catch_up(
    js: Any,
    pool: asyncpg.Pool,
    batch_size: int,
    idle_seconds: float,
    counts: dict[str, int],
    done: int,
) -> int:
    """Replay what the stream holds after `done`, again while more came meanwhile, until the
    tail is short (the swap replays it); returns the last sequence replayed."""
    for _ in range(CATCH_UP_ROUNDS):
        last_seq = (await js.stream_info(STREAM_NAME)).state.last_seq
        if last_seq > done:
            await _replay(js, pool, last_seq, batch_size, idle_seconds, counts, done + 1)
        caught_up, done = last_seq - done <= SHORT_TAIL, last_seq
        if caught_up:
            break
    return done


@asynccontextmanager
async def bulk(pool: asyncpg.Pool, schema: str, counts: dict[str, int]) -> AsyncIterator[None]:
    """Fact rows written in bulk into `schema`, which nobody reads yet (the rebuild's, or the
    bench's national region).

    While the body runs: no aggregate trigger, and no secondary index on the fact tables (an
    index entry per row, and every outreach and interaction rewrites its referral's row with
    each of the referrals' five indexes; the constraints' indexes stay, the upserts'
    ON CONFLICT needs them). Then the indexes are made again (one sort each); and in one
    transaction every aggregate is built from the facts by grouping (`agg_build()`,
    migrations/006) into tables without their keys and indexes, which are made again after
    it, and the triggers are enabled. Counts `index_ms` and `aggregate_ms`. Nothing of this
    after a failure: the caller drops the schema."""
    async with pool.acquire() as conn, conn.transaction():
        await _triggers(conn, enabled=False)
        indexes = await _drop_indexes(conn, schema, projection.FACT_TABLES, keys=False)
    yield
    started = time.perf_counter()
    async with pool.acquire() as conn:
        for definition in indexes:
            await conn.execute(definition)
    counts["index_ms"] = round((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    async with pool.acquire() as conn, conn.transaction():
        keys = await _drop_indexes(conn, schema, projection.AGGREGATE_TABLES, keys=True)
        await conn.execute("SELECT agg_build()")
        for definition in keys:
            await conn.execute(definition)
        await _triggers(conn, enabled=True)
    counts["aggregate_ms"] = round((time.perf_counter() - started) * 1000)


async def _triggers(conn: asyncpg.Connection, *, enabled: bool) -> None:
    """The aggregate triggers on or off (USER: not the constraints'): the fact tables', and
    the aggregate tables' own (a referral day keeps the one before it)."""
    action = "ENABLE" if enabled else "DISABLE"
    for table in (*projection.FACT_TABLES, *projection.AGGREGATE_TABLES):
        await conn.execute(f'ALTER TABLE "{table}" {action} TRIGGER USER')


_INDEXES_SQL = """
SELECT t.relname AS tab, c.relname AS name, pg_get_indexdef(c.oid) AS definition,
    k.conname AS constraint_name, pg_get_constraintdef(k.oid) AS constraint_definition
FROM pg_index x
JOIN pg_class c ON c.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
LEFT JOIN pg_constraint k ON k.conindid = c.oid AND k.conrelid = t.oid
WHERE n.nspname = $1 AND t.relname = ANY($2::text[])
ORDER BY t.relname, c.relname
"""


async def _drop_indexes(
    conn: asyncpg.Connection, schema: str, tables: tuple[str, ...], *, keys: bool
) -> list[str]:
    """Drop the indexes of `tables` (with `keys`, their primary keys too); returns the
    statements that make them again, as the migrations made them."""
    again: list[str] = []
    for row in await conn.fetch(_INDEXES_SQL, schema, list(tables)):
        table = f'"{schema}"."{row["tab"]}"'
        if row["constraint_name"] is None:
            await conn.execute(f'DROP INDEX "{schema}"."{row["name"]}"')
            again.append(row["definition"])
        elif keys:
            name = row["constraint_name"]
            await conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
            again.append(
                f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {row["constraint_definition"]}'
            )
    return again


async def _drop_schema(conn: asyncpg.Connection, name: str) -> None:
    await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def _swap(
    js: Any,
    pool: asyncpg.Pool,
    conn: asyncpg.Connection,
    schema: str,
    shadow: str,
    done: int,
    batch_size: int,
    counts: dict[str, int],
) -> int:
    async with conn.transaction():
        # Queries queue behind a waiting lock: wait briefly, and try again later instead.
        await conn.execute("SET LOCAL lock_timeout = '2s'")
        tables = [
            r["tablename"]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY tablename",
                schema,
            )
        ]
        names = ", ".join(f'"{schema}"."{t}"' for t in tables)
        await conn.execute(f"LOCK TABLE {names} IN ACCESS EXCLUSIVE MODE")
        last_seq = (await js.stream_info(STREAM_NAME)).state.last_seq
        if last_seq > done:  # committed live before the lock: in the new schema too
            await _replay(js, pool, last_seq, batch_size, 0.5, counts, done + 1)
        for table in CARRIED_OVER:
            await conn.execute(
                f'INSERT INTO "{shadow}"."{table}" SELECT * FROM "{schema}"."{table}"'
                " ON CONFLICT DO NOTHING"
            )
        await conn.execute(
            f"SELECT setval(pg_get_serial_sequence('\"{shadow}\".events', 'position'),"
            f' (SELECT max(position) FROM "{shadow}".events)) WHERE EXISTS'
            f' (SELECT 1 FROM "{shadow}".events)'
        )
        # Versions only grow: an answer kept at an old version is never served again.
        await conn.execute(
            f'INSERT INTO "{shadow}".scope_versions AS v (hospital, version)'
            f' SELECT hospital, version + 1 FROM "{schema}".scope_versions'
            " ON CONFLICT (hospital) DO UPDATE SET version = v.version + EXCLUDED.version"
        )
        retired = f"{schema}_retired"
        await _drop_schema(conn, retired)
        await conn.execute(f'ALTER SCHEMA "{schema}" RENAME TO "{retired}"')
        await conn.execute(f'ALTER SCHEMA "{shadow}" RENAME TO "{schema}"')
        await conn.execute(f'DROP SCHEMA "{retired}" CASCADE')
    log.info("rebuild_swapped", schema=schema, last_seq=last_seq)
    return int(last_seq)


# Not read models: what the live service keeps in its schema besides them.
CARRIED_OVER = ("waiting", "instances", "events", "outbox")


async def _replay(
    js: Any,
    pool: asyncpg.Pool,
    last_seq: int,
    batch_size: int,
    idle_seconds: float,
    counts: dict[str, int],
    first_seq: int = 1,
) -> None:
    """Read every event message with a sequence up to `last_seq`, in order, in batches.

    A push consumer that acknowledges each batch once it is written (AckPolicy.ALL) and may
    have at most a few batches unacknowledged: the server waits for the database, memory stays
    bounded, and nothing is dropped. (An unbounded push consumer overran the client on a
    million events: nats-py dropped messages as a slow consumer and the rebuild ended early.)
    The end is the stream's last sequence at start, or the last event before it.
    """
    batch: list[Message] = []
    done = asyncio.Event()
    failures: list[BaseException] = []
    writing: asyncio.Task[None] | None = None

    async def write(full: list[Message], ack: Msg) -> None:
        if full:
            applied = await _apply_with_retry(pool, full)
            counts["events_applied"] += applied
            counts["skipped"] += len(full) - applied
        await ack.ack()  # AckPolicy.ALL: this message and every one before it

    async def flush(ack: Msg) -> None:
        # The batch is written while the next one is read and parsed: the database's time and
        # the Python's overlap. One write at a time, in order (a copy counts once: the first).
        nonlocal writing
        if writing is not None:
            await writing
        writing = asyncio.create_task(write(batch.copy(), ack))
        writing.add_done_callback(failed)
        batch.clear()

    def failed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]
            done.set()

    async def written() -> None:
        if writing is not None:
            await writing

    async def on_message(msg: Msg) -> None:
        if done.is_set():
            return
        try:
            meta = msg.metadata
            if meta.sequence.stream > last_seq:  # the live consumer handles what came after
                await flush(msg)
                await written()
                done.set()
                return
            counts["messages"] += 1
            message = read_message(msg)
            if message is None:
                counts["skipped"] += 1
            else:
                batch.append(message)
            last = meta.sequence.stream == last_seq or meta.num_pending == 0
            if last or len(batch) >= batch_size:
                await flush(msg)
            if last:
                await written()
                done.set()
        except Exception as exc:  # raised below, once the subscription is gone
            failures.append(exc)
            done.set()

    sub = await js.subscribe(
        evt_subject("*", ">"),
        stream=STREAM_NAME,
        cb=on_message,
        manual_ack=True,
        config=ConsumerConfig(
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.ALL if first_seq <= 1 else DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=None if first_seq <= 1 else first_seq,
            max_ack_pending=batch_size * IN_FLIGHT_BATCHES,
            ack_wait=120,
            inactive_threshold=60,
        ),
    )
    try:
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), timeout=idle_seconds)
            except TimeoutError:
                # A stream with no event at all up to last_seq never calls back: ask the server.
                info = await sub.consumer_info()
                if not info.num_pending and not info.num_ack_pending and not batch:
                    break
    finally:
        await sub.unsubscribe()
        if writing is not None and not writing.done():
            writing.cancel()
    if failures:
        raise failures[0]
