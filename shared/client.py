"""A hospital system's view of the platform: publish commands, watch events. Only the contract.

Used by the simulators, the load generator and the end-to-end tests, exactly as a hospital's
integration would do it: CloudEvents on ``post.{hospital}.cmd.{Type}`` with ``Nats-Msg-Id``
set to the command id, and the answers on ``post.{hospital}.evt.>``.
`wait_consumed` waits until a service's durable consumer has read the stream so far.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared.contracts import Command, command_message, evt_subject
from shared.partitions import service_lag
from shared.settings import nats_servers, nats_tls

CloudEventDict = dict[str, Any]

ALL_EVENTS = evt_subject("*", ">")  # every hospital's events


class PlatformClient:
    def __init__(self, nc: NATS, subject: str = ALL_EVENTS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subject = subject
        self.events: list[CloudEventDict] = []
        self._by_cause: dict[str, list[CloudEventDict]] = defaultdict(list)
        self._changed = asyncio.Condition()

    @classmethod
    async def connect(cls, url: str, subject: str = ALL_EVENTS, **options: Any) -> PlatformClient:
        options.setdefault("tls", nats_tls())  # a deployment's CA ($POST_NATS_CA_FILE)
        nc = await nats.connect(nats_servers(url), name="post-client", **options)
        client = cls(nc, subject)
        await nc.subscribe(subject, cb=client._on_event, pending_msgs_limit=1_000_000)
        await nc.flush()
        return client

    async def _on_event(self, msg: Msg) -> None:
        try:
            ce = json.loads(msg.data)
        except ValueError:
            return
        ce["_subject"] = msg.subject
        self.events.append(ce)
        if ce.get("causationid"):
            self._by_cause[ce["causationid"]].append(ce)
        async with self._changed:
            self._changed.notify_all()

    async def send(
        self, hospital: str, command: Command, id_: str | None = None, origin: str = "system"
    ) -> str:
        """Publish a command to JetStream (waits for the stream's ack); returns its id."""
        subject, body, msg_id = command_message(hospital, command, id_=id_, origin=origin)
        await self.js.publish(subject, body, headers={"Nats-Msg-Id": msg_id})
        return msg_id

    async def send_raw(self, subject: str, body: bytes, msg_id: str | None = None) -> None:
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        await self.js.publish(subject, body, headers=headers)

    async def wait(
        self, predicate: Callable[[CloudEventDict], bool], timeout: float = 10.0
    ) -> CloudEventDict:
        """The first event seen (before or after this call) that matches."""

        def find() -> CloudEventDict | None:
            return next((e for e in self.events if predicate(e)), None)

        async def wait_found() -> CloudEventDict:
            async with self._changed:
                while (found := find()) is None:
                    await self._changed.wait()
                return found

        return await asyncio.wait_for(wait_found(), timeout)

    async def outcome(self, command_id: str, timeout: float = 10.0) -> CloudEventDict:
        """The event that answers a command: its success event or its CommandRejected."""

        async def wait_found() -> CloudEventDict:
            async with self._changed:
                while not self._by_cause.get(command_id):
                    await self._changed.wait()
                return self._by_cause[command_id][0]

        return await asyncio.wait_for(wait_found(), timeout)

    def caused_by(self, message_id: str) -> list[CloudEventDict]:
        return list(self._by_cause.get(message_id, []))

    async def wait_for(
        self,
        hospital: str,
        event_type: str,
        predicate: Callable[[CloudEventDict], bool] | None = None,
        timeout: float = 10.0,
    ) -> CloudEventDict:
        subject = evt_subject(hospital, event_type)
        return await self.wait(
            lambda e: e["_subject"] == subject and (predicate is None or predicate(e)), timeout
        )

    def of_type(self, hospital: str, event_type: str) -> list[CloudEventDict]:
        subject = evt_subject(hospital, event_type)
        return [e for e in self.events if e["_subject"] == subject]

    async def send_and_wait(
        self, hospital: str, command: Command, id_: str | None = None, timeout: float = 10.0
    ) -> CloudEventDict:
        command_id = await self.send(hospital, command, id_=id_)
        return await self.outcome(command_id, timeout)

    async def close(self) -> None:
        await self.nc.drain()


async def wait_consumed(nats_url: str, service: str, timeout: float = 120.0) -> None:
    """Until a service (every instance of it) has handled everything in the stream so far."""
    nc = await nats.connect(nats_servers(nats_url), tls=nats_tls())
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Twice, a moment apart: a work stream's source lag is what its sourcing consumer
            # last saw, so it reads 0 for the moment between a publish and its delivery.
            if await service_lag(js, service) == (0, 0):
                await asyncio.sleep(0.3)
                if await service_lag(js, service) == (0, 0):
                    return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"the {service} service has not caught up after {timeout:.0f} s")
    finally:
        await nc.close()
