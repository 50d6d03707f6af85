"""Fixtures of the integration tests (the servers come from tests/conftest.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.eventstore import create_pool, migrate
from shared.runtime import Platform


@pytest.fixture
async def pool(platform: Platform) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a schema of its own, with the shared tables (events, outbox, processed,
    waiting) migrated: what every service starts from."""
    schema = f"itest_{uuid.uuid4().hex[:8]}"
    p = await create_pool(platform.db_url, schema)
    await migrate(p, schema, None)
    yield p
    await p.close()
