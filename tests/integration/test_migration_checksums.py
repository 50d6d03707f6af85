"""Migrations keep a checksum (issue 25): an applied migration whose file changed stops the
migrator, and a service, before anything is applied, naming the file. Real PostgreSQL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

import services.records
from shared.eventstore import (
    CORE_MIGRATIONS,
    MigrationChangedError,
    create_pool,
    migrate,
    migration_checksum,
)
from shared.runtime import Platform, free_port

pytestmark = pytest.mark.integration


async def _recorded(pool: asyncpg.Pool) -> dict[str, str | None]:
    rows = await pool.fetch("SELECT version, checksum FROM schema_migrations")
    return {r["version"]: r["checksum"] for r in rows}


async def test_an_applied_migration_that_changed_is_refused_by_name(
    platform: Platform, tmp_path: Path
) -> None:
    schema = f"mig_{uuid.uuid4().hex[:8]}"
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    first = migrations / "001_first.sql"
    first.write_text("CREATE TABLE first (id int PRIMARY KEY);\n")
    pool = await create_pool(platform.db_url, schema)
    try:
        applied = await migrate(pool, schema, migrations)
        assert f"{schema}/001_first.sql" in applied
        recorded = await _recorded(pool)
        assert recorded[f"{schema}/001_first.sql"] == migration_checksum(first)
        for core in CORE_MIGRATIONS.glob("*.sql"):
            assert recorded[f"core/{core.name}"] == migration_checksum(core)
        # The same files again: nothing to do, nothing refused; CRLF line endings are the same
        # file (a checkout on another system).
        first.write_bytes(first.read_bytes().replace(b"\n", b"\r\n"))
        assert await migrate(pool, schema, migrations) == []

        # An edit of the applied file, and a new migration beside it: refused, naming the file,
        # and the new one is not applied either.
        first.write_text("CREATE TABLE first (id int PRIMARY KEY, extra text);\n")
        (migrations / "002_second.sql").write_text("CREATE TABLE second (id int);\n")
        named = re.escape(f"{schema}/001_first.sql")
        with pytest.raises(MigrationChangedError, match=named) as refused:
            await migrate(pool, schema, migrations)
        assert str(first) in str(refused.value)
        assert f"{schema}/002_second.sql" not in await _recorded(pool)
        assert await pool.fetchval("SELECT to_regclass('second')") is None

        # Put back as it was: the new one applies.
        first.write_text("CREATE TABLE first (id int PRIMARY KEY);\n")
        assert await migrate(pool, schema, migrations) == [f"{schema}/002_second.sql"]
    finally:
        await pool.close()


async def test_a_database_from_before_checksums_is_migrated_forward(
    platform: Platform, tmp_path: Path
) -> None:
    schema = f"mig_{uuid.uuid4().hex[:8]}"
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "001_first.sql").write_text("CREATE TABLE first (id int);\n")
    pool = await create_pool(platform.db_url, schema)
    try:
        # The table as the migrator before checksums made it: version and applied_at only.
        await pool.execute(
            "CREATE TABLE schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await migrate(pool, schema, migrations)
        await pool.execute("ALTER TABLE schema_migrations DROP COLUMN checksum")
        before = await pool.fetchval("SELECT count(*) FROM schema_migrations")

        assert await migrate(pool, schema, migrations) == []  # nothing applied twice
        recorded = await _recorded(pool)
        assert len(recorded) == before
        assert recorded[f"{schema}/001_first.sql"] == migration_checksum(
            migrations / "001_first.sql"
        )
        assert None not in recorded.values()
        # From now on an edit is seen.
        (migrations / "001_first.sql").write_text("CREATE TABLE first (id bigint);\n")
        with pytest.raises(MigrationChangedError, match=r"001_first\.sql"):
            await migrate(pool, schema, migrations)
    finally:
        await pool.close()


async def test_a_service_refuses_to_start_naming_the_changed_migration(
    platform: Platform, tmp_path: Path
) -> None:
    """The records service on a database of its own, whose record of an applied migration
    differs from the file it ships (as when the file was edited after it was applied)."""
    database = f"mig_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(platform.db_url)
    try:
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
    url = platform.db_url.rsplit("/", 1)[0] + f"/{database}"
    pool = await create_pool(url, "records")
    try:
        await migrate(pool, "records", Path(services.records.__file__).parent / "migrations")
        await pool.execute(
            "UPDATE schema_migrations SET checksum = repeat('0', 64)"
            " WHERE version = 'records/001_records.sql'"
        )
    finally:
        await pool.close()

    env = {
        **os.environ,
        **platform.env(),
        "POST_DATABASE_URL": url,
        "POST_DATA_DIR": str(tmp_path),
        "POST_RECORDS_PORT": str(free_port()),
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.records"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    said = done.stdout + done.stderr
    assert "records/001_records.sql" in said, said[-3000:]
    assert "was changed after it was applied" in said, said[-3000:]
    assert "migration_changed" in said, said[-3000:]  # the structured log line too
