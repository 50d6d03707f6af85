"""The append-only event store of one service, on asyncpg, and its schema migrations.

Append-only, with one exception: forgetting a physician (CONTRACT.md 1.1) rewrites the stored
events that name them (`EventStore.forget_in_data`). This is the one module that writes the
``events`` table; nothing else may update or delete a stored event.

Each service owns a PostgreSQL schema; its connections set ``search_path`` to it, so the
shared tables (``events``, ``outbox``, ``processed``) and the service's own read models use
unqualified names.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from pydantic_core import from_json, to_json

from shared import tracing
from shared.contracts import Event, parse_event_json
from shared.partitions import partition_of
from shared.statistics import keep_no_statistics

CORE_MIGRATIONS = Path(__file__).parent / "migrations"


class MigrationChangedError(RuntimeError):
    """An applied migration's file is no longer what was applied: the service refuses to start
    (its schema is not what the file now says, and running on would hide that)."""

    def __init__(self, version: str, path: Path, recorded: str, found: str) -> None:
        super().__init__(
            f"migration {version} ({path}) was changed after it was applied: "
            f"sha256 {recorded[:12]} applied, {found[:12]} in the file now. Put the file back "
            "as it was and make the change in a new migration"
        )
        self.version = version
        self.path = path


def migration_checksum(path: Path) -> str:
    """The sha256 of a migration's text, line endings as LF (a checkout that writes CRLF does
    not change a migration)."""
    return hashlib.sha256(path.read_bytes().replace(b"\r\n", b"\n")).hexdigest()


class ConcurrencyError(Exception):
    """The stream moved past the expected version: someone else appended first."""

    def __init__(self, stream_id: str, expected: int, actual: int | None) -> None:
        super().__init__(
            f"stream {stream_id!r}: expected version {expected}, "
            f"found {actual if actual is not None else 'a newer one'}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class StoredEvent:
    """One stored event as read: its JSON documents come as the text PostgreSQL sends and are
    decoded on first use (`data`, `metadata`); `to_event` validates the text straight into the
    contract's model (one parse, not decode + encode + parse). Measured in bench `store`."""

    __slots__ = (
        "_data",
        "_metadata",
        "data_json",
        "event_id",
        "event_type",
        "metadata_json",
        "position",
        "recorded_at",
        "stream_id",
        "stream_version",
    )

    def __init__(
        self,
        position: int,
        stream_id: str,
        stream_version: int,
        event_id: str,
        event_type: str,
        data_json: str,
        metadata_json: str,
        recorded_at: datetime,
    ) -> None:
        self.position = position
        self.stream_id = stream_id
        self.stream_version = stream_version
        self.event_id = event_id
        self.event_type = event_type
        self.data_json = data_json
        self.metadata_json = metadata_json
        self.recorded_at = recorded_at
        self._data: dict[str, Any] | None = None
        self._metadata: dict[str, Any] | None = None

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = from_json(self.data_json)
        return self._data

    @property
    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            self._metadata = from_json(self.metadata_json)
        return self._metadata

    def to_event(self) -> Event:
        return parse_event_json(self.event_type, self.data_json)

    def __repr__(self) -> str:
        return f"StoredEvent({self.stream_id!r} v{self.stream_version} {self.event_type})"


@dataclass(frozen=True)
class NewEvent:
    event: Event
    metadata: dict[str, Any]
    event_id: str = ""


def _encode_json(value: Any) -> str:
    """JSON text of a document, compact. pydantic-core's encoder (already a dependency, in
    Rust) takes 0.4-0.8 us where the stdlib's took 1.9-2.7 us for a metadata and an event dict."""
    return to_json(value).decode()


RoundTrips = Callable[[], None]


async def _init_connection(
    conn: asyncpg.Connection, on_round_trip: RoundTrips | None = None
) -> None:
    for typ in ("jsonb", "json"):
        # pydantic-core's decoder parses a stored event in 1.7 us, the stdlib's in 4.2 us
        await conn.set_type_codec(typ, encoder=_encode_json, decoder=from_json, schema="pg_catalog")
    if on_round_trip is not None:
        # Every round trip counted (asyncpg's query logger: ~1 us a statement), so the cost of a
        # message in round trips is measured, not estimated (bench/e2e.py, issue 23).
        conn.add_query_logger(lambda _record: on_round_trip())


async def create_pool(
    database_url: str, schema: str, on_round_trip: RoundTrips | None = None, **kwargs: Any
) -> asyncpg.Pool:
    """A pool whose connections work in ``schema`` (created if missing); `on_round_trip` is
    called after each statement (a service's `post_db_round_trips_total`)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    except asyncpg.UniqueViolationError:
        pass  # another service process created it at the same moment
    finally:
        await conn.close()
    kwargs.setdefault("min_size", 1)
    kwargs.setdefault("max_size", 10)
    pool = await asyncpg.create_pool(
        database_url,
        init=functools.partial(_init_connection, on_round_trip=on_round_trip),
        server_settings={"search_path": schema, "application_name": f"post-{schema}"},
        **kwargs,
    )
    assert pool is not None
    return pool


async def connect(
    database_url: str,
    schema: str,
    application_name: str,
    on_round_trip: RoundTrips | None = None,
    **server_settings: str,
) -> asyncpg.Connection:
    """A connection of its own (not pooled) working in ``schema``: a partition's lease."""
    conn = await asyncpg.connect(
        database_url,
        server_settings={
            "search_path": schema,
            "application_name": application_name,
            **server_settings,
        },
    )
    await _init_connection(conn, on_round_trip)
    return conn


async def migrate(pool: asyncpg.Pool, schema: str, service_migrations: Path | None) -> list[str]:
    """Apply versioned SQL files once each, in order: the core ones, then the service's; then
    the rule that no column holding ids or text keeps planner statistics (shared/statistics).

    Each applied file's sha256 is kept in ``schema_migrations.checksum``; an applied file that
    changed since raises `MigrationChangedError` naming it, before anything is applied."""
    files = [("core", f) for f in sorted(CORE_MIGRATIONS.glob("*.sql"))]
    if service_migrations is not None and service_migrations.exists():
        files += [(schema, f) for f in sorted(service_migrations.glob("*.sql"))]
    applied: list[str] = []
    async with pool.acquire() as conn:
        # The schema every service may read and write, for what the services coordinate on
        # (shared/inbox.py `holds`); created under one lock for all services.
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('migrate:post_platform'))")
            await conn.execute("CREATE SCHEMA IF NOT EXISTS post_platform")
            # Services may run as roles of their own: each may use it (a warning, no error,
            # when this role does not own it and another already granted this).
            await conn.execute("GRANT USAGE, CREATE ON SCHEMA post_platform TO PUBLIC")
        # One migrator per schema at a time, even with several replicas starting together.
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", f"migrate:{schema}")
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now(),"
                " checksum text)"
            )
            # A database from before checksums: the column, then the files as they are now
            # stand for what was applied (there is no record of what was).
            await conn.execute(
                "ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text"
            )
            recorded = {
                r["version"]: r["checksum"]
                for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
            }
            checked = [
                (f"{kind}/{path.name}", path, migration_checksum(path)) for kind, path in files
            ]
            for version, path, checksum in checked:
                if recorded.get(version, checksum) not in (None, checksum):
                    raise MigrationChangedError(version, path, recorded[version], checksum)
            for version, path, checksum in checked:
                if version in recorded:
                    if recorded[version] is None:
                        await conn.execute(
                            "UPDATE schema_migrations SET checksum = $2 WHERE version = $1",
                            version,
                            checksum,
                        )
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                        version,
                        checksum,
                    )
                applied.append(version)
            # After every migration, so that no table (a new one included) keeps statistics
            # that sample ids or text: shared/statistics.py.
            await keep_no_statistics(conn, schema)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", f"migrate:{schema}")
    return applied


# The documents as text: asyncpg hands text over without a codec call.
_COLUMNS = (
    "position, stream_id, stream_version, event_id::text AS event_id,"
    " event_type, data::text, metadata::text, recorded_at"
)


def _stored(row: asyncpg.Record) -> StoredEvent:
    return StoredEvent(*row)  # _COLUMNS are StoredEvent's fields, in order


# Appends hold this lock shared, so they run side by side and their commits share a disk flush;
# `read_all` takes it exclusively for an instant to learn a position every append has passed.
_APPEND_LOCK = "hashtext(current_schema() || '.events')"

# One round trip: the shared lock (taken before any position is drawn), the version check, the
# events and their outbox rows. Nothing is inserted when the stream is not at the expected version.
APPEND_SQL = f"""
WITH locked AS (
    SELECT pg_advisory_xact_lock_shared({_APPEND_LOCK})
), cur AS (
    SELECT coalesce(max(stream_version), 0) AS version FROM events WHERE stream_id = $1
), ins AS (
    INSERT INTO events (stream_id, stream_version, event_id, event_type, data, metadata)
    SELECT $1, cur.version + u.n, coalesce(u.e, gen_random_uuid()), u.t, u.d::jsonb, u.m::jsonb
    FROM locked, cur,
        unnest($2::uuid[], $3::text[], $4::text[], $5::text[])
            WITH ORDINALITY AS u(e, t, d, m, n)
    WHERE cur.version = $6
    RETURNING position
), queued AS (
    INSERT INTO outbox (position, partition) SELECT position, $8 FROM ins WHERE $7
)
SELECT (SELECT version FROM cur) AS version, ARRAY(SELECT position FROM ins ORDER BY position)
"""


class EventStore:
    """Append with an expected version; read one stream; read everything after a position."""

    async def append(
        self,
        conn: asyncpg.Connection,
        stream_id: str,
        expected_version: int,
        events: Sequence[NewEvent],
        *,
        publish: bool = True,
    ) -> list[int]:
        """Append in the caller's transaction (alone, the one statement is atomic) and, with
        ``publish``, queue them in the outbox.

        Appends to different streams do not wait for each other. Of two appends to one stream at
        the same version, the second sees the new version, or waits on the first's
        (stream_id, stream_version) key and fails when the first commits.
        """
        if not events:
            return []
        if tracing.TRACER is not None:
            with tracing.span("append", post_events=len(events)):
                return await self._append(conn, stream_id, expected_version, events, publish)
        return await self._append(conn, stream_id, expected_version, events, publish)

    async def _append(
        self,
        conn: asyncpg.Connection,
        stream_id: str,
        expected_version: int,
        events: Sequence[NewEvent],
        publish: bool,
    ) -> list[int]:
        try:
            version, positions = await conn.fetchrow(
                APPEND_SQL,
                stream_id,
                # the ids the caller chose; PostgreSQL draws the others (uuid4 cost ~8 us each here)
                [e.event_id or None for e in events],
                [e.event.type_name for e in events],
                # JSON text made here, in one call each (no dict, no codec call per element)
                [e.event.model_dump_json() for e in events],
                [_encode_json(e.metadata) for e in events],
                expected_version,
                publish,
                partition_of(events[0].metadata["hospital"]) if publish else 0,
            )
        except asyncpg.UniqueViolationError as exc:
            if "event_id" in str(exc.constraint_name or ""):
                raise
            raise ConcurrencyError(stream_id, expected_version, None) from exc
        if version != expected_version:
            raise ConcurrencyError(stream_id, expected_version, version)
        return list(positions)

    async def read_stream(self, conn: asyncpg.Connection, stream_id: str) -> list[StoredEvent]:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM events WHERE stream_id = $1 ORDER BY stream_version",
            stream_id,
        )
        return [_stored(r) for r in rows]

    async def read_all(
        self, conn: asyncpg.Connection, after: int = 0, limit: int = 1000
    ) -> list[StoredEvent]:
        """Events after a position, in position order, and never one that commits later below
        it: only up to the horizon, the last position when no append was under way (appends
        draw positions in parallel, so they may commit out of order). Not for a transaction
        with an older snapshot (repeatable read) than this call."""
        await conn.execute(f"SELECT pg_advisory_lock({_APPEND_LOCK})")
        try:
            horizon = await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")
        finally:
            await conn.execute(f"SELECT pg_advisory_unlock({_APPEND_LOCK})")
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM events WHERE position > $1 AND position <= $2"
            " ORDER BY position LIMIT $3",
            after,
            horizon,
            limit,
        )
        return [_stored(r) for r in rows]

    async def forget_in_data(
        self,
        conn: asyncpg.Connection,
        *,
        event_type: str,
        hospital: str,
        key: str,
        ids: Sequence[str],
        field: str,
        old: str,
        changes: Mapping[str, Any],
    ) -> None:
        """The one rewrite of stored events, for forgetting: every `event_type` of `hospital`
        whose ``data[key]`` is one of `ids` and whose ``data[field]`` is `old` gets `changes`
        merged into its data, in the caller's transaction. Versions, positions and ids stay:
        a stream reads as before, with the forget's id in place of the physician's."""
        await conn.execute(
            """
            UPDATE events SET data = data || $6::jsonb
            WHERE event_type = $1 AND metadata->>'hospital' = $2
              AND data->>$3 = ANY($4::text[]) AND data->>$5 = $7
            """,
            event_type,
            hospital,
            key,
            list(ids),
            field,
            dict(changes),
            old,
        )
