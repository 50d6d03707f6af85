"""The backbone against real nats-server and PostgreSQL processes: event store concurrency, the
outbox surviving a kill, idempotent consumption, poison messages, retries."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.api import DeliverPolicy

from shared.contracts import (
    HospitalRegistered,
    LaunchDepartment,
    ReasonCode,
    RegisterHospital,
    Rejected,
    command_message,
    encode,
    make_cloudevent,
)
from shared.eventstore import ConcurrencyError, EventStore, NewEvent, create_pool, migrate
from shared.outbox import OutboxRelay, report_backlog
from shared.partitions import partition_of
from shared.runtime import Platform
from shared.service import Service, ensure_stream
from shared.settings import Settings
from shared.unit_of_work import UnitOfWork

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _event(hospital: str, name: str = "General") -> HospitalRegistered:
    return HospitalRegistered(hospital=hospital, name=name, physician_count=10)


async def _stream_messages(url: str, subject: str, wait: float = 1.0) -> list[dict]:
    """Every message stored in the POST stream on a subject (an ephemeral consumer)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.subscribe(subject, ordered_consumer=True)
    found = []
    try:
        while True:
            msg = await sub.next_msg(timeout=wait)
            found.append(json.loads(msg.data))
    except (nats.errors.TimeoutError, TimeoutError):
        pass
    await nc.close()
    return found


async def test_two_writers_one_wins_the_other_gets_a_concurrency_error(pool: asyncpg.Pool) -> None:
    store = EventStore()
    meta = {"hospital": "h1"}
    async with pool.acquire() as a, pool.acquire() as b:
        ta, tb = a.transaction(), b.transaction()
        await ta.start()
        await tb.start()
        await store.append(a, "s-1", 0, [NewEvent(_event("h1"), meta)])
        # b waits for a's commit, then sees version 1 where it expected 0
        b_append = asyncio.create_task(
            store.append(b, "s-1", 0, [NewEvent(_event("h1", "B"), meta)])
        )
        await asyncio.sleep(0.1)
        await ta.commit()
        with pytest.raises(ConcurrencyError):
            await b_append
        await tb.rollback()
        events = await store.read_stream(a, "s-1")
    assert [e.data["name"] for e in events] == ["General"]
    assert events[0].stream_version == 1


async def test_read_stream_and_read_all_after_a_position(pool: asyncpg.Pool) -> None:
    store = EventStore()
    async with pool.acquire() as conn:
        await store.append(
            conn, "a", 0, [NewEvent(_event("h1", n), {"hospital": "h1"}) for n in "xy"]
        )
        await store.append(conn, "b", 0, [NewEvent(_event("h2", "z"), {"hospital": "h2"})])
        await store.append(conn, "a", 2, [NewEvent(_event("h1", "w"), {"hospital": "h1"})])
        with pytest.raises(ConcurrencyError):
            await store.append(conn, "a", 2, [NewEvent(_event("h1", "late"), {"hospital": "h1"})])
        a = await store.read_stream(conn, "a")
        everything = await store.read_all(conn, after=0)
        after_second = await store.read_all(conn, after=everything[1].position)
    assert [(e.stream_version, e.data["name"]) for e in a] == [(1, "x"), (2, "y"), (3, "w")]
    assert [e.data["name"] for e in everything] == ["x", "y", "z", "w"]
    assert [e.data["name"] for e in after_second] == ["z", "w"]
    assert a[0].to_event() == _event("h1", "x")


KILLED_WRITER = """
import asyncio, os, signal, sys
sys.path.insert(0, {root!r})
from shared.contracts import HospitalRegistered
from shared.eventstore import EventStore, NewEvent, create_pool
async def main():
    pool = await create_pool({url!r}, {schema!r})
    async with pool.acquire() as conn, conn.transaction():
        await EventStore().append(conn, "k-1", 0, [NewEvent(
            HospitalRegistered(hospital={hospital!r}, name="Killed", physician_count=1),
            {{"hospital": {hospital!r}, "correlation_id": "c1", "causation_id": "c1"}},
            event_id={event_id!r})])
    os.kill(os.getpid(), signal.SIGKILL)  # committed, never published
asyncio.run(main())
"""


async def test_outbox_survives_a_kill_between_commit_and_publish(platform: Platform) -> None:
    schema = f"itest_{uuid.uuid4().hex[:8]}"
    hospital = f"h-{uuid.uuid4().hex[:8]}"
    event_id = str(uuid.uuid4())
    pool = await create_pool(platform.db_url, schema)
    await migrate(pool, schema, None)
    script = KILLED_WRITER.format(
        root=str(ROOT), url=platform.db_url, schema=schema, hospital=hospital, event_id=event_id
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()

    nc = await nats.connect(platform.nats_url)
    js = nc.jetstream()
    await ensure_stream(js)
    relay = OutboxRelay("itest", js)
    partition = partition_of(hospital)
    assert await report_backlog("itest", pool) == 1
    async with pool.acquire() as conn:
        assert await relay.publish_pending(conn, partition) == 1
        # published: its row goes with the relay's next statement, never published twice
        assert await report_backlog("itest", pool) == 1
        assert await relay.publish_pending(conn, partition) == 0
        assert await report_backlog("itest", pool) == 0
        # a relay that crashed after publishing but before deleting: the next one (a new
        # holder of the partition) publishes the batch again
        await conn.execute(
            "INSERT INTO outbox (position, partition) SELECT position, $1 FROM events", partition
        )
        assert await OutboxRelay("itest", js).publish_pending(conn, partition) == 1
    assert await report_backlog("itest", pool) == 1
    await nc.close()
    await pool.close()

    received = await _stream_messages(platform.nats_url, f"post.{hospital}.evt.>")
    assert [m["id"] for m in received] == [event_id]
    assert received[0]["type"] == "HospitalRegistered"
    assert received[0]["correlationid"] == "c1"
    assert received[0]["source"] == f"/hospitals/{hospital}/itest"


class _Calls:
    def __init__(self) -> None:
        self.handled: dict[str, list[str]] = {}
        self.fail_first: dict[str, int] = {}  # hospital -> failures still to come
        self.broken: set[str] = set()  # hospitals whose handler always fails


async def _start_test_service(platform: Platform, calls: _Calls) -> Service:
    async def register_hospital(cmd: RegisterHospital, uow: UnitOfWork) -> None:
        if calls.fail_first.get(uow.hospital, 0) > 0:
            calls.fail_first[uow.hospital] -= 1
            raise ConnectionResetError("database hiccup")  # passing: must be retried
        if uow.hospital in calls.broken:
            raise RuntimeError("a bug this message triggers")  # fails the same way every time
        if cmd.name == "refuse me":
            raise Rejected(ReasonCode.conflicting_duplicate, "refused on purpose")
        calls.handled.setdefault(uow.hospital, []).append(cmd.name)
        await uow.append(
            f"hospital:{uow.hospital}",
            0,
            [
                HospitalRegistered(
                    hospital=uow.hospital, name=cmd.name, physician_count=cmd.physician_count
                )
            ],
        )

    name = f"itest_{uuid.uuid4().hex[:8]}"
    os.environ.pop("POST_TEST_CLOCK", None)
    settings = Settings(nats_url=platform.nats_url, database_url=platform.db_url, max_deliver=5)
    service = Service(
        name,
        command_handlers={"RegisterHospital": register_hospital},
        role="matching",  # a stand-in for the owner of RegisterHospital
        settings=settings,
        deliver_policy=DeliverPolicy.NEW,  # not the other tests' history
    )
    await service.start()
    return service


async def _settle(check, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


async def test_consumer_redelivery_poison_rejection_and_retry(platform: Platform) -> None:
    from shared.client import PlatformClient

    calls = _Calls()
    service = await _start_test_service(platform, calls)
    client = await PlatformClient.connect(platform.nats_url)
    hospital = f"h-{uuid.uuid4().hex[:8]}"

    async def answer(command_id: str, h: str = hospital) -> dict:
        # The real matching service may run too (the e2e stack): take this service's answer.
        source = f"/hospitals/{h}/{service.name}"
        return await client.wait(
            lambda e: e.get("causationid") == command_id and e["source"] == source
        )

    try:
        # the same command twice, even past JetStream's dedupe (other Nats-Msg-Id): one effect
        subject, body, cmd_id = command_message(
            hospital, RegisterHospital(name="Once", physician_count=5)
        )
        await client.send_raw(subject, body, msg_id="first")
        await client.send_raw(subject, body, msg_id="second")
        created = await answer(cmd_id)
        assert created["type"] == "HospitalRegistered"
        assert created["correlationid"] == cmd_id and created["causationid"] == cmd_id

        # poison: not JSON, JSON without id -> dead-letter subject; the consumer goes on
        dlq = await client.nc.subscribe(f"post.{hospital}.dlq.>")
        await client.send_raw(subject, b"\xff not json")
        await client.send_raw(subject, b'{"no": "id"}')
        bad = make_cloudevent(
            type_="RegisterHospital",
            source=f"/hospitals/{hospital}/x",
            data={"name": "N", "physician_count": 1, "notes": "free text"},
        )
        await client.send_raw(subject, encode(bad))
        rejected = await answer(bad["id"])
        assert rejected["type"] == "CommandRejected"
        assert rejected["data"]["reason_code"] == "unknown_field"
        assert rejected["data"]["command_id"] == bad["id"]
        assert "free text" not in json.dumps(rejected)
        dead = []  # the stack's own matching service may dead-letter them too: take ours
        while len(dead) < 2:
            msg = await dlq.next_msg(timeout=5)
            if msg.headers and msg.headers.get("Post-Service") == service.name:
                dead.append(msg)
        assert {m.headers["Post-Dead-Letter-Reason"].split(":")[0] for m in dead} == {
            "body is not JSON",
            "body is not a CloudEvent",
        }

        # a source naming another hospital than the subject is refused
        other = make_cloudevent(
            type_="RegisterHospital",
            source="/hospitals/someone-else/x",
            data={"name": "N", "physician_count": 1},
        )
        await client.send_raw(subject, encode(other))
        assert (await answer(other["id"]))["data"]["reason_code"] == "invalid_payload"

        # a handler's Rejected keeps nothing and answers CommandRejected
        _, body, refused_id = command_message(
            hospital, RegisterHospital(name="refuse me", physician_count=1)
        )
        await client.send_raw(subject, body)
        refused = await answer(refused_id)
        assert refused["data"]["reason_code"] == "conflicting_duplicate"

        # a transient failure is retried with back-off and then succeeds
        h2 = f"h-{uuid.uuid4().hex[:8]}"
        calls.fail_first[h2] = 2
        retried = await answer(
            await client.send(h2, RegisterHospital(name="Retried", physician_count=2)), h2
        )
        assert retried["type"] == "HospitalRegistered"
        assert calls.handled[hospital] == ["Once"]
        assert calls.handled[h2] == ["Retried"]

        # a failure no retry changes is answered (and dead-lettered) on its first attempt
        h3 = f"h-{uuid.uuid4().hex[:8]}"
        calls.broken.add(h3)
        failed = await answer(
            await client.send(h3, RegisterHospital(name="Broken", physician_count=2)), h3
        )
        assert failed["type"] == "CommandRejected"
        assert failed["data"]["reason_code"] == "internal_error"
        assert h3 not in calls.handled

        # a command for another owner's type is not this service's business
        assert "LaunchDepartment" not in service.dispatcher.command_handlers
        assert LaunchDepartment(department="er", physician_count=1, launched_on=date(2024, 1, 1))

        async with service.pool.acquire() as conn:
            stored = await conn.fetchval(
                "SELECT count(*) FROM events WHERE event_type = 'HospitalRegistered'"
                " AND data->>'hospital' = ANY($1::text[])",
                [hospital, h2],
            )
        assert stored == 2
    finally:
        await client.close()
        await service.stop()


async def test_a_command_waiting_for_a_fact_is_rejected_when_the_wait_expires(
    platform: Platform,
) -> None:
    from shared.client import PlatformClient
    from shared.contracts import RecordOutreach
    from shared.unit_of_work import NotYetKnown

    attempts: list[int] = []

    async def record_outreach(cmd: RecordOutreach, uow: UnitOfWork) -> None:
        attempts.append(1)
        raise NotYetKnown("no SupporterAssigned for this referral yet")

    name = f"itest_{uuid.uuid4().hex[:8]}"
    settings = Settings(
        nats_url=platform.nats_url, database_url=platform.db_url, not_yet_known_seconds=1.5
    )
    service = Service(
        name,
        command_handlers={"RecordOutreach": record_outreach},
        role="records",
        settings=settings,
        deliver_policy=DeliverPolicy.NEW,
    )
    await service.start()
    client = await PlatformClient.connect(platform.nats_url)
    hospital = f"h-{uuid.uuid4().hex[:8]}"
    try:
        command_id = await client.send(
            hospital,
            RecordOutreach(
                referral_id="r-1",
                supporter_id="s-1",
                outcome="accepted",
                at=datetime.now(UTC),
            ),
        )
        source = f"/hospitals/{hospital}/{name}"
        answer = await client.wait(
            lambda e: e.get("causationid") == command_id and e["source"] == source, timeout=20
        )
        assert answer["type"] == "CommandRejected"
        assert answer["data"]["reason_code"] == "unknown_referral"
        assert len(attempts) >= 2  # retried with back-off before giving up
    finally:
        await client.close()
        await service.stop()
