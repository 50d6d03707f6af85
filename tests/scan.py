"""What the platform keeps, read whole, for the tests that look for what it must not keep:
every message of the ``POST`` stream, every row of every table, every log file."""

from __future__ import annotations

from pathlib import Path

import asyncpg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.client import PlatformClient
from shared.contracts import STREAM_NAME
from shared.runtime import SERVICES, Platform


async def stream_messages(client: PlatformClient) -> list[tuple[int, str, bytes]]:
    """Every message of the POST stream from its first: (sequence, subject, body), no acks."""
    js = client.js
    sub = await js.pull_subscribe(
        "post.>",
        stream=STREAM_NAME,
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30
        ),
    )
    found: list[tuple[int, str, bytes]] = []
    try:
        pending = 1
        while pending:  # erased messages leave gaps in the sequence: count what is left
            try:
                msgs = await sub.fetch(1000, timeout=5)
            except NatsTimeoutError:
                break  # what was pending was erased while it read (checked below)
            for m in msgs:
                found.append((m.metadata.sequence.stream, m.subject, m.data))
                pending = m.metadata.num_pending
    finally:
        await sub.unsubscribe()
    # Erasures while it read only lower the count; what came after the last message it read
    # it may have missed by design.
    state = (await js.stream_info(STREAM_NAME)).state
    seen = found[-1][0] if found else 0
    assert len(found) + max(0, state.last_seq - seen) >= state.messages, "the scan missed some"
    return found


def log_files(stack: Platform) -> list[Path]:
    """The services' logs, nats-server's and PostgreSQL's."""
    files = sorted((stack.data_dir / "logs").glob("*.log"))
    assert {f.stem for f in files} >= set(SERVICES), files
    files += [
        stack.data_dir / "nats" / "nats-server.log",
        stack.data_dir / "postgres" / "postgres.log",
    ]
    return [f for f in files if f.exists()]


async def rows_containing(db_url: str, needle: str) -> list[str]:
    """`schema.table: row` for every row of every table of every schema (the event stores,
    the read tables, the outboxes, the waiting messages) whose text holds `needle`, as text
    or inside a bytea (as hex)."""
    hexed = needle.encode().hex()
    conn = await asyncpg.connect(db_url)
    try:
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_type = 'BASE TABLE'"
            " AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        assert tables, "no table to scan"
        found = []
        for t in tables:
            name = f'"{t["table_schema"]}"."{t["table_name"]}"'
            rows = await conn.fetch(
                f"SELECT r::text AS row FROM {name} r"
                " WHERE strpos(r::text, $1) > 0 OR strpos(r::text, $2) > 0",
                needle,
                hexed,
            )
            found += [f"{name}: {r['row'][:300]}" for r in rows]
        return found
    finally:
        await conn.close()


async def forget_jobs_left(db_url: str, hospital: str | None = None) -> int:
    """Forget jobs not finished yet (of `hospital`, or of all): while one is, the referral
    service still keeps its id and the stream may still name it."""
    conn = await asyncpg.connect(db_url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM referral.forget_jobs WHERE $1::text IS NULL OR hospital = $1",
                hospital,
            )
        )
    finally:
        await conn.close()


async def statistics_containing(db_url: str, needle: str, *, analyze: bool = True) -> list[str]:
    """`relation.column` for every column whose planner statistics (``pg_statistic``: the
    values ANALYZE sampled, most common ones and histogram bounds) hold `needle`, as text or
    inside a bytea (as hex), in every schema but PostgreSQL's own. With `analyze`, every
    table is analyzed first: what ANALYZE (autovacuum's, whenever it comes) would keep.
    Needs a superuser (``pg_statistic`` is theirs; the tests' role is one)."""
    hexed = needle.encode().hex()
    conn = await asyncpg.connect(db_url)
    try:
        if analyze:
            tables = await conn.fetch(
                "SELECT table_schema, table_name FROM information_schema.tables"
                " WHERE table_type = 'BASE TABLE'"
                " AND table_schema NOT IN ('pg_catalog', 'information_schema')"
            )
            for t in tables:
                await conn.execute(f'ANALYZE "{t["table_schema"]}"."{t["table_name"]}"')
        slots = " OR ".join(
            f"strpos(coalesce(s.stavalues{i}::text, ''), $1) > 0"
            f" OR strpos(coalesce(s.stavalues{i}::text, ''), $2) > 0"
            for i in range(1, 6)
        )
        rows = await conn.fetch(
            "SELECT n.nspname || '.' || c.relname || '.' || coalesce(a.attname, s.staattnum::text)"
            " AS name FROM pg_statistic s JOIN pg_class c ON c.oid = s.starelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_attribute a ON a.attrelid = s.starelid AND a.attnum = s.staattnum"
            " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
            f" AND ({slots})",
            needle,
            hexed,
        )
        return sorted({r["name"] for r in rows})
    finally:
        await conn.close()
