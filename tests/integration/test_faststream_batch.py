"""Why the partition worker fetches with nats-py rather than through a FastStream subscriber.

FastStream 0.7's ordered batch subscriber (`PullSub(batch=True)`, the one that hands a handler
the fetched messages as one ordered list) collects until `batch_size` messages or `timeout`
have passed (its `_consume_pull`: "keep fetching" until the batch is full). On a caught-up
consumer a lone message therefore waits for the whole timeout: a command's answer would take
`timeout` seconds, or a short timeout turns every idle partition into a busy poll. The
partition worker asks for one message when it is caught up and for a batch when behind
(shared/consumer.py), and so answers at once. docs/decisions.md, "FastStream".

Real JetStream: a lone message published to an idle consumer is not handed to the FastStream
batch handler before its collection timeout (long, so a slow machine cannot make it pass), and
is handed over once that timeout ends.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub

from shared.runtime import NatsServer, free_port

pytestmark = pytest.mark.integration

COLLECT_SECONDS = 8.0


async def test_faststreams_ordered_batch_holds_a_lone_message_until_its_timeout(
    tmp_path: Path,
) -> None:
    # A bare JetStream server: the platform's own lets its user publish only post.> subjects.
    server = NatsServer(tmp_path / "nats", free_port(), free_port(), tenants=False).start()
    try:
        await _lone_message(server.url)
    finally:
        server.stop()


async def _lone_message(url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    stream = JStream(f"FSBATCH_{tag}", subjects=[f"fsbatch.{tag}.>"])
    broker = NatsBroker(url)
    handed: list[list[bytes]] = []
    arrived = asyncio.Event()

    @broker.subscriber(
        f"fsbatch.{tag}.>",
        stream=stream,
        durable=f"fsbatch-{tag}",
        pull_sub=PullSub(batch_size=100, timeout=COLLECT_SECONDS, batch=True),
        ack_policy=AckPolicy.ACK,
    )
    async def handle(bodies: list[bytes]) -> None:
        handed.append(bodies)
        arrived.set()

    await broker.start()
    try:
        await asyncio.sleep(0.5)  # the subscriber's first pull is waiting
        await broker.publish(b"a lone command", f"fsbatch.{tag}.x", stream=stream.name)
        # Stored at once, not handed over: the batch is still being collected.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(arrived.wait(), timeout=COLLECT_SECONDS / 4)
        assert handed == []
        await asyncio.wait_for(arrived.wait(), timeout=COLLECT_SECONDS * 3)
        assert handed == [[b"a lone command"]]
    finally:
        await broker.stop()
