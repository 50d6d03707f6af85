"""Reading a load run's answers back from the ``POST`` stream, in order, with waiters on them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.contracts import (
    STREAM_NAME,
    evt_subject,
    new_id,
)


@dataclass(frozen=True)
class Answer:
    event_id: str
    type: str
    reason: str | None
    stream_seq: int
    stored_at: datetime


class EventLog:
    """Every event of the run's hospitals, read from the stream in order, and waiters on them.

    An ephemeral pull consumer from the last sequence seen: after any failure (NATS away, the
    node holding the consumer lost) a new one continues where the last one stopped.
    """

    def __init__(self, nc: NATS, hospitals: Sequence[str], start_seq: int) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = [evt_subject(h, ">") for h in hospitals]
        self.last_seq = start_seq - 1
        self.by_cause: dict[str, dict[str, Answer]] = defaultdict(dict)
        self.copies: Counter[str] = Counter()  # event id -> times stored
        self.assignment: dict[tuple[str, str], tuple[str, str | None]] = {}
        self.recreated = 0
        self._waiters: dict[Any, asyncio.Event] = {}
        self._idle = asyncio.Event()
        self._idle_since = 0.0

    def _wake(self, key: Any) -> None:
        waiter = self._waiters.pop(key, None)
        if waiter is not None:
            waiter.set()

    async def wait(self, key: Any, done: Callable[[], bool], timeout: float) -> bool:
        """Until done() holds (checked after each new event for `key`); False on timeout."""
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            waiter = self._waiters.setdefault(key, asyncio.Event())
            try:
                await asyncio.wait_for(waiter.wait(), remaining)
            except TimeoutError:
                return False
        return True

    def _take(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        if seq <= self.last_seq:
            return  # seen before the consumer was recreated
        self.last_seq = seq
        try:
            ce = json.loads(msg.data)
            event_id, type_ = str(ce["id"]), str(ce["type"])
        except (ValueError, KeyError, TypeError):
            return
        self.copies[event_id] += 1
        data = ce.get("data") if isinstance(ce.get("data"), dict) else {}
        hospital = msg.subject.split(".")[1]
        cause = ce.get("causationid")
        if cause:
            reason = data.get("reason_code") if type_ == "CommandRejected" else None
            stored = meta.timestamp if meta.timestamp is not None else datetime.now(UTC)
            self.by_cause[cause].setdefault(
                event_id, Answer(event_id, type_, reason, seq, stored.astimezone(UTC))
            )
            self._wake(("cause", cause))
        if type_ in ("SupporterAssigned", "NoSupporterAvailable"):
            key = (hospital, str(data.get("referral_id")))
            supporter = data.get("supporter_id") if type_ == "SupporterAssigned" else None
            self.assignment[key] = (type_, supporter)
            self._wake(("match", *key))

    async def run(self) -> None:
        while True:
            name = new_id().replace("-", "")
            try:
                config = ConsumerConfig(
                    name=name,
                    filter_subjects=self.subjects,
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=self.last_seq + 1,
                    ack_policy=AckPolicy.NONE,
                    inactive_threshold=30.0,
                    num_replicas=1,
                    mem_storage=True,
                )
                await self.js.add_consumer(STREAM_NAME, config, timeout=5)
                sub = await self.js.pull_subscribe_bind(name, stream=STREAM_NAME)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)
                continue
            try:
                await self._read(sub, name)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.recreated += 1
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _read(self, sub: Any, name: str) -> None:
        idle = 0
        while True:
            started = time.monotonic()
            connected = self.nc.is_connected
            try:
                msgs = await sub.fetch(500, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                msgs = []
            for msg in msgs:
                self._take(msg)
            if msgs:
                idle = 0
                continue
            if connected and self.nc.is_connected:  # empty because there was nothing to read
                self._idle_since = started
                self._idle.set()
            idle += 1
            if idle % 3 == 0:
                # An empty fetch may also mean a consumer lost with its node: ask after it.
                info = await self.js.consumer_info(STREAM_NAME, name, timeout=3)
                if info.num_pending:
                    raise RuntimeError("the consumer has messages but delivers none")

    async def sync(self, timeout: float = 60.0) -> None:
        """Until an empty fetch that began after this call: everything stored before is read."""
        asked = time.monotonic()
        deadline = asked + timeout
        while self._idle_since <= asked:
            if time.monotonic() > deadline:
                raise TimeoutError("the event log did not catch up with the stream")
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(deadline - time.monotonic(), 0.01))
