"""Webhook delivery against real nats-server and PostgreSQL, to a real HTTP endpoint on
127.0.0.1 (tests/webhook_receiver.py): order, signatures, retries, the lease, forgetting.

Each test has its own schema and lease name, so the delivery of a running stack never meets it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js import JetStreamContext

import services.referral
from shared import webhook_delivery, webhooks
from shared.contracts import STREAM_NAME
from shared.eventstore import create_pool, migrate
from shared.partitions import partition_of
from shared.runtime import Platform
from shared.service import ensure_stream
from shared.settings import Settings
from shared.webhook_delivery import PENDING, WebhookPartition
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.integration

KEY = base64.b64decode(base64.b64encode(b"k" * 32))


@dataclass
class Setup:
    js: JetStreamContext
    pool: asyncpg.Pool
    settings: Settings
    schema: str
    lease: str
    hospital: str

    async def publish(
        self, type_: str = "ReferralCreated", hospital: str | None = None
    ) -> tuple[str, bytes, int]:
        """(id, body, seq) of a new event of the hospital."""
        event_id = uuid.uuid4().hex
        body = json.dumps(
            {"specversion": "1.0", "id": event_id, "type": type_, "data": {"n": event_id[:6]}}
        ).encode()
        ack = await self.js.publish(f"post.{hospital or self.hospital}.evt.{type_}", body)
        return event_id, body, ack.seq

    async def register(self, url: str) -> str:
        info = await self.js.stream_info(STREAM_NAME)
        async with self.pool.acquire() as conn:
            secret, _ = await webhooks.register(
                conn, KEY, self.hospital, url, int(info.state.last_seq or 0)
            )
        return secret

    def worker(self, instance: str = "a") -> WebhookPartition:
        return WebhookPartition(
            partition_of(self.hospital),
            self.js,
            self.settings,
            instance,
            KEY,
            schema=self.schema,
            lock=self.lease,
        )

    async def row(self) -> asyncpg.Record:
        async with self.pool.acquire() as conn:
            return await conn.fetchrow("SELECT * FROM webhooks WHERE hospital = $1", self.hospital)


@pytest.fixture
async def setup(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Setup]:
    # An endpoint gets 1 s here, not 10: the timeout tests would wait 10 s an attempt.
    monkeypatch.setattr(webhooks, "ATTEMPT_TIMEOUT", 1.0)
    monkeypatch.setenv("POST_DATABASE_URL", platform.db_url)
    monkeypatch.setenv("POST_LEASE_SECONDS", "3")
    nc = await nats.connect(platform.nats_url)
    js = nc.jetstream()
    await ensure_stream(js)
    schema = f"whtest_{uuid.uuid4().hex[:8]}"
    pool = await create_pool(platform.db_url, schema)
    await migrate(pool, schema, Path(services.referral.__file__).parent / "migrations")
    yield Setup(js, pool, Settings(), schema, f"webhooks-{schema}", f"wh-{uuid.uuid4().hex[:8]}")
    await pool.close()
    await nc.close()


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.1)


async def run(worker: WebhookPartition) -> asyncio.Task[None]:
    task = asyncio.create_task(worker.run())
    await until(lambda: worker.held or task.done(), 10)
    return task


async def halt(worker: WebhookPartition, task: asyncio.Task[None]) -> None:
    worker.stop.set()
    await asyncio.wait_for(task, 15)


async def test_the_events_after_registration_come_in_stream_order_as_published_and_signed(
    setup: Setup,
) -> None:
    receiver = Receiver().start()
    try:
        before = [await setup.publish() for _ in range(2)]
        secret = await setup.register(receiver.url)
        sent = []
        for i in range(6):
            sent.append(await setup.publish("SupporterAssigned" if i % 2 else "ReferralCreated"))
            await setup.publish(hospital=f"{setup.hospital}-other")  # another hospital's
        worker = setup.worker()
        task = await run(worker)
        await until(lambda: len(receiver.acknowledged_ids()) == len(sent))
        await halt(worker, task)
        assert receiver.acknowledged_ids() == [i for i, _, _ in sent]
        assert [r.body for r in receiver.snapshot()] == [b for _, b, _ in sent]
        assert not {i for i, _, _ in before} & set(receiver.acknowledged_ids())
        receiver.verify_all(secret)
        row = await setup.row()
        assert row["position"] == sent[-1][2] and row["failures"] == 0
    finally:
        receiver.stop()


async def test_failures_are_retried_with_the_same_event_until_one_is_acknowledged(
    setup: Setup,
) -> None:
    # 503, 500, no answer within the timeout, then 200 for everything.
    answers = {0: 503, 1: 500, 2: 0}
    receiver = Receiver(answer=lambda n: answers.get(n, 200), pause=3.0).start()
    refused = Receiver().start()
    refused_url = refused.url
    refused.stop()  # nobody listens there any more: the connection is refused
    try:
        await setup.register(refused_url)
        sent = [await setup.publish() for _ in range(4)]
        worker = setup.worker()
        task = await run(worker)
        for _ in range(100):
            row = await setup.row()
            if row["failures"] >= 2:
                break
            await asyncio.sleep(0.1)
        assert row["last_error"] == "ConnectError" and row["position"] < sent[0][2]
        secret = await setup.register(receiver.url)  # a new URL: it goes on where it was
        await until(lambda: len(receiver.acknowledged_ids()) == len(sent), 60)
        await halt(worker, task)
        got = receiver.snapshot()
        assert [r.status for r in got[:4]] == [503, 500, 0, 200]
        assert {r.headers["webhook-id"] for r in got[:4]} == {sent[0][0]}
        assert receiver.acknowledged_ids() == [i for i, _, _ in sent]
        receiver.verify_all(secret)
        row = await setup.row()
        assert row["failures"] == 0 and row["last_error"] == "timeout"
        assert row["position"] == sent[-1][2]
        async with setup.pool.acquire() as conn:
            shown = await webhooks.status_rows(conn)
        mine = next(r for r in shown if r["hospital"] == setup.hospital)
        assert mine["endpoint"] == receiver.url.removesuffix("/post/events")
        assert secret not in json.dumps(mine) and "secret_sealed" not in mine
    finally:
        receiver.stop()


async def test_one_instance_delivers_at_a_time_and_its_successor_goes_on_from_the_last_ack(
    setup: Setup,
) -> None:
    receiver = Receiver().start()
    try:
        await setup.register(receiver.url)
        first, second = setup.worker("first"), setup.worker("second")
        task = await run(first)
        assert await asyncio.wait_for(second.run(), 10) is None and not second.held
        sent = [await setup.publish() for _ in range(3)]
        await until(lambda: len(receiver.acknowledged_ids()) == 3)
        async with setup.pool.acquire() as conn:  # the first instance's session ends
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'webhooks:first'"
            )
        await asyncio.wait_for(task, 15)
        assert not first.held
        sent += [await setup.publish() for _ in range(3)]
        task = await run(second)
        assert second.held
        await until(lambda: len(set(receiver.acknowledged_ids())) == 6)
        await halt(second, task)
        ids = list(dict.fromkeys(receiver.acknowledged_ids()))  # duplicates allowed, order not
        assert ids == [i for i, _, _ in sent]
    finally:
        receiver.stop()


async def test_an_erased_event_is_not_sent_and_its_redacted_copy_is(setup: Setup) -> None:
    receiver = Receiver().start()
    try:
        await setup.register(receiver.url)
        first, (erased_id, erased_body, erased_seq), last = [
            await setup.publish() for _ in range(3)
        ]
        await setup.js.delete_msg(STREAM_NAME, erased_seq)  # as a forget job does
        copy = json.dumps({"specversion": "1.0", "id": erased_id, "type": "ReferralCreated"})
        await setup.js.publish(f"post.{setup.hospital}.evt.ReferralCreated", copy.encode())
        worker = setup.worker()
        task = await run(worker)
        await until(lambda: len(receiver.acknowledged_ids()) == 3)
        await halt(worker, task)
        assert receiver.acknowledged_ids() == [first[0], last[0], erased_id]
        bodies = [r.body for r in receiver.snapshot()]
        assert erased_body not in bodies and copy.encode() in bodies
    finally:
        receiver.stop()


async def test_off_ends_delivery_and_the_pending_gauge_counts_what_waits(setup: Setup) -> None:
    failing = True
    receiver = Receiver(answer=lambda n: 503 if failing else 200).start()
    try:
        await setup.register(receiver.url)
        for _ in range(3):
            await setup.publish()
        worker = setup.worker()
        task = await run(worker)

        def pending() -> float | None:
            for metric in PENDING.collect():
                for sample in metric.samples:
                    if sample.labels.get("hospital") == setup.hospital:
                        return sample.value
            return None

        await until(lambda: pending() == 3)
        failing = False
        await until(lambda: len(receiver.acknowledged_ids()) == 3)
        await until(lambda: pending() == 0)
        async with setup.pool.acquire() as conn:
            assert await webhooks.unregister(conn, setup.hospital)
        await until(lambda: pending() is None)  # nobody exports a removed webhook
        await setup.publish()
        await asyncio.sleep(2 * webhook_delivery.POLL_SECONDS + 1)
        await halt(worker, task)
        assert len(receiver.acknowledged_ids()) == 3
    finally:
        receiver.stop()


async def test_registering_again_ends_a_long_back_off_at_once(setup: Setup) -> None:
    receiver = Receiver().start()
    refused = Receiver().start()
    refused_url = refused.url
    refused.stop()
    try:
        await setup.register(refused_url)
        sent = await setup.publish()
        worker = setup.worker()
        task = await run(worker)
        for _ in range(100):
            if (await setup.row())["failures"] >= 1:
                break
            await asyncio.sleep(0.1)
        async with setup.pool.acquire() as conn:  # as after an hour of failures
            await conn.execute(
                "UPDATE webhooks SET failures = 20 WHERE hospital = $1", setup.hospital
            )
        for _ in range(100):
            if (await setup.row())["failures"] >= 21:
                break
            await asyncio.sleep(0.1)
        assert webhooks.retry_delay(21) > 200  # the next attempt would be minutes away
        await setup.register(receiver.url)
        # Well under the back-off: the new endpoint is tried within a recheck.
        await until(lambda: receiver.acknowledged_ids() == [sent[0]], 30)
        await halt(worker, task)
    finally:
        receiver.stop()
