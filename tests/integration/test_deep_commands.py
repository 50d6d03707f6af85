"""A command too deep or too large to decode is answered on its first attempt, by the
dispatcher itself, on a real PostgreSQL (issue 21): a `CommandRejected` under its top-level id
with ``payload_too_deep`` / ``payload_too_large``, never a RecursionError retried for minutes.
The dispatcher reads a refused command's id with `shared.contracts.top_level_id`, never by
decoding the body, so even 10,000 levels are answered."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from shared.clock import ControlledClock
from shared.contracts import cmd_subject, encode, make_cloudevent
from shared.dispatch import Dispatcher, Incoming
from shared.eventstore import create_pool, migrate
from shared.runtime import Platform

pytestmark = pytest.mark.integration

HOSPITAL = "h-deep"


@pytest.fixture
async def pool(platform: Platform) -> AsyncIterator[asyncpg.Pool]:
    schema = f"deep_{uuid.uuid4().hex[:8]}"
    p = await create_pool(platform.db_url, schema)
    await migrate(p, schema, None)
    yield p
    await p.close()


async def _never(message: Any, uow: Any) -> None:
    raise AssertionError("a command beyond the limits reached its handler")


def dispatcher() -> Dispatcher:
    return Dispatcher(
        "records",
        ControlledClock(),
        role="records",
        command_handlers={"RecordInteraction": _never},
        event_handlers={},
        answers_unknown_commands=False,
        not_yet_known_seconds=6,
    )


async def dispatch(pool: asyncpg.Pool, body: bytes) -> tuple[str, list[asyncpg.Record]]:
    incoming = Incoming(
        subject=cmd_subject(HOSPITAL, "RecordInteraction"),
        hospital=HOSPITAL,
        kind="cmd",
        type="RecordInteraction",
        body=body,
        stream_seq=1,
        attempt=1,
        stored_at=None,
    )
    async with pool.acquire() as conn, conn.transaction():
        outcome = await dispatcher().dispatch(incoming, conn)
        rows = await conn.fetch(
            "SELECT data->>'command_id' AS command_id, data->>'reason_code' AS reason_code"
            " FROM events WHERE event_type = 'CommandRejected'"
        )
    return outcome.label, rows


def envelope(data_json: bytes) -> tuple[str, bytes]:
    command_id = str(uuid.uuid4())
    ce = make_cloudevent(
        type_="RecordInteraction", source=f"/hospitals/{HOSPITAL}/x", data={}, id_=command_id
    )
    return command_id, encode(ce).replace(b'"data":{}', b'"data":' + data_json)


async def test_a_command_too_large_is_answered_at_once(pool: asyncpg.Pool) -> None:
    command_id, body = envelope(b'{"minutes": "' + b"x" * 70_000 + b'"}')
    label, rows = await dispatch(pool, body)
    assert label == "rejected"
    assert [(r["command_id"], r["reason_code"]) for r in rows] == [
        (command_id, "payload_too_large")
    ]


async def test_a_command_nested_a_little_too_deep_is_answered_at_once(pool: asyncpg.Pool) -> None:
    command_id, body = envelope(b"[" * 100 + b"]" * 100)
    label, rows = await dispatch(pool, body)
    assert label == "rejected"
    assert [(r["command_id"], r["reason_code"]) for r in rows] == [(command_id, "payload_too_deep")]


async def test_a_command_ten_thousand_levels_deep_is_answered_at_once(pool: asyncpg.Pool) -> None:
    command_id, body = envelope(b"[" * 10_000 + b"]" * 10_000)
    label, rows = await dispatch(pool, body)
    assert label == "rejected"
    assert [(r["command_id"], r["reason_code"]) for r in rows] == [(command_id, "payload_too_deep")]
