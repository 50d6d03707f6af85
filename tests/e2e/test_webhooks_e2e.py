"""Webhooks end to end, through the running stack's referral service, to a real endpoint.

A hospital registers a webhook whose endpoint fails at first, so its events wait. Its history
names a physician, who is then forgotten; when the endpoint recovers, it receives every event of
the hospital that the stream holds, in stream order and signed, the redacted copy of the
referral included, and not one request ever carried the forgotten id.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import nats
import pytest

from postctl import webhooks as webhook_cli
from shared.client import PlatformClient
from shared.runtime import Platform
from shared.settings import Settings
from shared.webhook_delivery import next_event
from tests.e2e.test_forgetting_e2e import referred_then_forgotten
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e


async def _stream_ids(stack: Platform, hospital: str) -> list[str]:
    nc = await nats.connect(stack.nats_url)
    try:
        js, ids, seq = nc.jetstream(), [], 0
        while (msg := await next_event(js, hospital, seq)) is not None:
            ids.append(json.loads(msg.data)["id"])
            seq = msg.seq
        return ids
    finally:
        await nc.close()


async def test_a_webhook_gets_the_hospitals_events_in_order_and_never_a_forgotten_id(
    stack: Platform, client: PlatformClient, hospital: str
) -> None:
    failing = True
    receiver = Receiver(answer=lambda n: 503 if failing else 200).start()
    settings = Settings(nats_url=stack.nats_url, database_url=stack.db_url, data_dir=stack.data_dir)
    secret, new = await webhook_cli.register(settings, hospital, receiver.url)
    assert new
    physician = f"phys-{uuid.uuid4().hex}"
    try:
        forgotten = await referred_then_forgotten(client, stack, hospital, physician, "Hook")
        for _ in range(300):  # the endpoint has been tried (a referral instance just started
            if receiver.snapshot():  # may take its partitions' webhooks a moment later)
                break
            await asyncio.sleep(0.1)
        assert receiver.snapshot() and not receiver.acknowledged_ids()  # failing all along

        expected = await _stream_ids(stack, hospital)  # the forget job has erased and copied
        assert forgotten["id"] in expected
        failing = False
        for _ in range(600):
            if len(set(receiver.acknowledged_ids())) >= len(expected):
                break
            await asyncio.sleep(0.2)
        assert list(dict.fromkeys(receiver.acknowledged_ids())) == expected
        receiver.verify_all(secret)
        types = [r.event["type"] for r in receiver.snapshot() if r.status == 200]
        assert "ReferralCreated" in types  # the redacted copy
        assert not [r for r in receiver.snapshot() if physician.encode() in r.body]
    finally:
        await webhook_cli.unregister(settings, hospital)
        receiver.stop()
