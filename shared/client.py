"""A hospital system's view of the platform: publish commands, watch events. Only the contract.

Used by the simulators, the load generator and the end-to-end tests, exactly as a hospital's
integration would do it: CloudEvents on ``post.{hospital}.cmd.{Type}`` with ``Nats-Msg-Id``
set to the command id, and the answers on ``post.{hospital}.evt.>``.

Two modes. Anonymous (the platform's tools on the embedded default: simulators, load): one
connection, every hospital's events live. With `HospitalKeys` (the end-to-end tests): each
hospital's commands go out on a connection opened with that hospital's own NKey (onboarded on
first use, as `postctl hospital onboard` does it), and its events come in on that connection
from its durable consumer `hospital-<hospital>` (pulled, acknowledged, deduplicated by the
CloudEvents id), exactly as CONTRACT.md 1.2 tells a hospital to do it.
`wait_consumed` waits until a service has handled the stream so far (given the database, also
until it holds no hospital back).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import hospitals as delivery
from shared import inbox
from shared.contracts import STREAM_NAME, Command, command_message, evt_subject, is_hospital_id
from shared.partitions import service_lag
from shared.settings import nats_servers, nats_tls

CloudEventDict = dict[str, Any]

ALL_EVENTS = evt_subject("*", ">")  # every hospital's events


@dataclass
class HospitalKeys:
    """Each hospital's key on an embedded platform: onboarded on first use through the code of
    `postctl hospital onboard` (the tenants file of the platform's nats-server, which reloads),
    its seed kept in `seeds`."""

    tenants_file: Path
    seeds: Path
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def seed(self, hospital: str) -> Path:
        from shared import tenants

        path = self.seeds / f"{hospital}.nk"
        async with self._lock:  # one rewrite of the tenants file at a time
            if hospital not in tenants.read_tenants_file(self.tenants_file) or not path.exists():
                tenants.onboard_hospital(self.tenants_file, hospital, path)
                if not await asyncio.to_thread(tenants.reload_embedded, self.tenants_file):
                    raise RuntimeError("the embedded nats-server did not reload its tenants")
        return path


@dataclass
class _Hospital:
    nc: NATS
    js: JetStreamContext
    puller: asyncio.Task[None]


class PlatformClient:
    def __init__(
        self, nc: NATS, subject: str = ALL_EVENTS, keys: HospitalKeys | None = None
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subject = subject
        self.keys = keys
        self.events: list[CloudEventDict] = []
        self._by_cause: dict[str, list[CloudEventDict]] = defaultdict(list)
        self._seen: set[str] = set()
        self._changed = asyncio.Condition()
        self._hospitals: dict[str, _Hospital] = {}
        self._closing = asyncio.Event()
        self._opening: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._url = ""

    @classmethod
    async def connect(
        cls,
        url: str,
        subject: str = ALL_EVENTS,
        keys: HospitalKeys | None = None,
        **options: Any,
    ) -> PlatformClient:
        """Anonymous: `subject` live. With `keys`: each hospital on its own key (see above)."""
        options.setdefault("tls", nats_tls())  # a deployment's CA ($POST_NATS_CA_FILE)
        nc = await nats.connect(nats_servers(url), name="post-client", **options)
        client = cls(nc, subject, keys)
        client._url = url
        if keys is None:
            await nc.subscribe(subject, cb=client._on_event, pending_msgs_limit=1_000_000)
            await nc.flush()
        return client

    async def as_hospital(self, hospital: str) -> JetStreamContext:
        """The JetStream context of the hospital's own connection (its key), opened on first
        use, its events pulled from its durable consumer from then on."""
        assert self.keys is not None
        if (found := self._hospitals.get(hospital)) is not None:
            return found.js
        async with self._opening[hospital]:
            if (found := self._hospitals.get(hospital)) is not None:
                return found.js
            seed = await self.keys.seed(hospital)
            await delivery.ensure_consumer(self.js, hospital)  # the platform's part of onboarding
            nc = await nats.connect(
                nats_servers(self._url),
                name=f"hospital-{hospital}",
                nkeys_seed=str(seed),
                inbox_prefix=f"_INBOX_{hospital}",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.2,
                tls=nats_tls(),
            )
            js = nc.jetstream()
            sub = await js.pull_subscribe_bind(delivery.consumer_name(hospital), stream=STREAM_NAME)
            puller = asyncio.create_task(self._pull(sub), name=f"pull:{hospital}")
            self._hospitals[hospital] = _Hospital(nc, js, puller)
            return js

    async def _pull(self, sub: JetStreamContext.PullSubscription) -> None:
        backlog = True
        # Until the client closes, not only until cancelled: a cancellation can be lost in a
        # fetch (nats-py turns one met on a closed connection into ConnectionClosedError,
        # which the loop took for a passing failure). A CI run hung at the end of the test
        # session in `close`, with this loop still polling.
        while not self._closing.is_set():
            try:
                # As shared/consumer.py: a fetch of n waits for all n once one came, so caught
                # up ask for one (it comes the moment it is stored), behind for a batch.
                msgs = await sub.fetch(100 if backlog else 1, timeout=1)
            except (nats.errors.TimeoutError, TimeoutError):
                backlog = False
                continue
            except asyncio.CancelledError:
                raise
            except nats.errors.ConnectionClosedError:
                return  # closed for good (a reconnect is not a close): nothing more comes
            except Exception:  # reconnecting, or the server reloading its config: again
                await asyncio.sleep(0.2)
                continue
            last = msgs[-1].metadata if msgs else None
            backlog = bool(last and last.num_pending)
            for msg in msgs:
                await self._on_event(msg)
                await msg.ack()

    async def _js_for(self, subject: str) -> JetStreamContext:
        """The connection a command subject goes out on: its hospital's own, with keys."""
        parts = subject.split(".")
        if self.keys is None or len(parts) < 3 or parts[0] != "post":
            return self.js
        if not is_hospital_id(parts[1]) or parts[2] != "cmd":
            return self.js  # no hospital could publish it: the tests of bad subjects
        return await self.as_hospital(parts[1])

    async def _on_event(self, msg: Msg) -> None:
        try:
            ce = json.loads(msg.data)
        except ValueError:
            return
        if self.keys is not None and isinstance(ce, dict) and isinstance(ce.get("id"), str):
            # At least once from a durable consumer: the CloudEvents id tells a repeat.
            if ce["id"] in self._seen:
                return
            self._seen.add(ce["id"])
        ce["_subject"] = msg.subject
        self.events.append(ce)
        if ce.get("causationid"):
            self._by_cause[ce["causationid"]].append(ce)
        async with self._changed:
            self._changed.notify_all()

    async def send(
        self,
        hospital: str,
        command: Command,
        id_: str | None = None,
        origin: str = "system",
        traceparent: str | None = None,
    ) -> str:
        """Publish a command to JetStream (waits for the stream's ack); returns its id. With
        `traceparent`, the W3C trace context goes in the envelope and the NATS headers."""
        subject, body, msg_id = command_message(
            hospital, command, id_=id_, origin=origin, traceparent=traceparent
        )
        js = await self._js_for(subject)
        headers = {"Nats-Msg-Id": msg_id}
        if traceparent is not None:
            headers["traceparent"] = traceparent
        await _publish(js, subject, body, headers)
        return msg_id

    async def send_raw(self, subject: str, body: bytes, msg_id: str | None = None) -> None:
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        js = await self._js_for(subject)
        await _publish(js, subject, body, headers)

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
        if self.keys is not None:
            await self.as_hospital(hospital)  # its events come in on its own connection
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
        self._closing.set()
        for hospital in self._hospitals.values():
            hospital.puller.cancel()
            await asyncio.gather(hospital.puller, return_exceptions=True)
            await hospital.nc.close()
        self._hospitals.clear()
        await self.nc.drain()


async def wait_consumed(
    nats_url: str, service: str, timeout: float = 120.0, db_url: str | None = None
) -> None:
    """Until a service (every instance of it) has handled everything in the stream so far.
    With `db_url` (the platform's database), also until it holds no hospital back: a message
    that failed for a passing reason (a deadlock, the database away) is parked with the rest
    of its hospital's messages (shared/consumer.py), acknowledged in NATS, not handled yet."""
    nc = await nats.connect(nats_servers(nats_url), tls=nats_tls())
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Twice, a moment apart: a work stream's source lag is what its sourcing consumer
            # last saw, so it reads 0 for the moment between a publish and its delivery.
            if await _caught_up(js, service, db_url):
                await asyncio.sleep(0.3)
                if await _caught_up(js, service, db_url):
                    return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"the {service} service has not caught up after {timeout:.0f} s")
    finally:
        await nc.close()


async def _caught_up(js: JetStreamContext, service: str, db_url: str | None) -> bool:
    if await service_lag(js, service) != (0, 0):
        return False
    if db_url is None:
        return True
    conn = await asyncpg.connect(db_url)
    try:
        return not await inbox.holds(conn, service)
    finally:
        await conn.close()


PUBLISH_ATTEMPTS = 3


async def _publish(
    js: JetStreamContext, subject: str, body: bytes, headers: dict[str, str] | None
) -> None:
    """Publish and wait for the stream's ack; with a `Nats-Msg-Id`, asked again when no ack
    came (the connection dropped and reconnected meanwhile: a CI run met it while a new
    hospital's key was being added). The same id is stored once (JetStream's deduplication,
    and the platform handles a command id once), so asking again never doubles it. Without
    an id nothing is repeated: that could store the message twice."""
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        try:
            await js.publish(subject, body, headers=headers)
            return
        except nats.errors.TimeoutError:
            if not headers or "Nats-Msg-Id" not in headers or attempt == PUBLISH_ATTEMPTS:
                raise
