"""Durable delivery to hospitals (CONTRACT.md 1.2, "Hospital connections"): one durable pull
consumer per onboarded hospital on the `POST` stream, and how far each one is behind.

The consumer `hospital-<hospital>` is filtered to `post.<hospital>.evt.>`, delivers from the
hospital's first event, wants explicit acks within 30 s and redelivers until acknowledged. It
has the stream's replicas (a cluster's R3 stream: R3 consumer, so it survives a node). Only the
platform creates, changes or deletes it (onboarding, `postctl hospital sync`, the embedded
platform's start); the hospital's key may only pull from it, ack and read its info
(shared/tenants.py). The services create nothing here: the referral service only reports
`post_hospital_events_pending`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import structlog
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError, ServiceUnavailableError
from prometheus_client import Gauge

from shared.contracts import STREAM_NAME, evt_subject

log = structlog.get_logger()
T = TypeVar("T")

CONSUMER_PREFIX = "hospital-"
ACK_WAIT_SECONDS = 30.0

HOSPITAL_EVENTS_PENDING = Gauge(
    "post_hospital_events_pending",
    "Events of a hospital its durable consumer has not had acknowledged yet (not delivered"
    " plus delivered and unacknowledged), by the holder of the hospital's partition.",
    ["hospital"],
)


def consumer_name(hospital: str) -> str:
    return f"{CONSUMER_PREFIX}{hospital}"


def consumer_config(hospital: str, ack_wait: float = ACK_WAIT_SECONDS) -> ConsumerConfig:
    """The contract's consumer. `ack_wait` other than 30 s: for the tests of redelivery only."""
    return ConsumerConfig(
        durable_name=consumer_name(hospital),
        name=consumer_name(hospital),
        description=f"durable delivery of hospital {hospital}'s events (CONTRACT.md 1.2)",
        filter_subject=evt_subject(hospital, ">"),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=-1,
    )


async def ensure_consumer(
    js: JetStreamContext, hospital: str, ack_wait: float = ACK_WAIT_SECONDS
) -> bool:
    """The hospital's consumer exists with the contract's config; True if it was created (or
    its config put right), False if it was there already. Idempotent: a consumer that exists
    keeps its position (what the hospital acknowledged)."""
    return await _retrying(lambda: _ensure_consumer(js, hospital, ack_wait))


async def _retrying(fn: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """The JetStream API of an account answers no one for a moment while nats-server reloads
    its accounts (every onboarding does), and late while a cluster elects: wait that out."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await fn()
        except (ServiceUnavailableError, NoRespondersError, NatsTimeoutError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _ensure_consumer(js: JetStreamContext, hospital: str, ack_wait: float) -> bool:
    wanted = consumer_config(hospital, ack_wait)
    try:
        info = await js.consumer_info(STREAM_NAME, consumer_name(hospital))
    except NotFoundError:
        await js.add_consumer(STREAM_NAME, wanted)
        log.info("hospital_consumer_created", hospital=hospital)
        return True
    have = info.config
    if (have.filter_subject, have.ack_wait, have.max_deliver) == (
        wanted.filter_subject,
        wanted.ack_wait,
        wanted.max_deliver,
    ):
        return False
    # A create with the same name updates what may change (ack wait, max deliver); the position
    # stays.
    await js.add_consumer(STREAM_NAME, wanted)
    log.info("hospital_consumer_updated", hospital=hospital)
    return True


async def delete_consumer(js: JetStreamContext, hospital: str) -> bool:
    return await _retrying(lambda: _delete_consumer(js, hospital))


async def _delete_consumer(js: JetStreamContext, hospital: str) -> bool:
    try:
        await js.delete_consumer(STREAM_NAME, consumer_name(hospital))
    except NotFoundError:
        return False
    log.info("hospital_consumer_deleted", hospital=hospital)
    return True


async def sync_consumers(js: JetStreamContext, hospitals: Iterable[str]) -> list[str]:
    """Ensure the consumer of each hospital (onboarded before an upgrade, or while NATS was
    down); returns those created."""
    return [h for h in sorted(hospitals) if await ensure_consumer(js, h)]


async def pending(js: JetStreamContext) -> dict[str, int]:
    """Hospital -> its events not yet acknowledged (num_pending + num_ack_pending), for every
    hospital consumer on the stream (a revoked hospital's included: its consumer stays)."""
    found: dict[str, int] = {}
    seen = 0
    while True:  # the API answers a page (256) at a time
        page = await _retrying(lambda at=seen: js.consumers_info(STREAM_NAME, offset=at))  # type: ignore[misc]
        for info in page:
            if info.name.startswith(CONSUMER_PREFIX):
                found[info.name[len(CONSUMER_PREFIX) :]] = (info.num_pending or 0) + (
                    info.num_ack_pending or 0
                )
        seen += len(page)
        if not page or len(page) < 256:
            return found


class PendingGauge:
    """`post_hospital_events_pending`, for the hospitals whose partition this instance holds:
    summed over instances each hospital counts once, and a hospital that moved leaves this
    instance's /metrics. It remembers what it exported (to remove it)."""

    def __init__(self, js: JetStreamContext, owns: Callable[[str], bool]) -> None:
        self.js = js
        self.owns = owns
        self._exported: set[str] = set()

    async def refresh(self) -> None:
        exported = set()
        for hospital, count in (await pending(self.js)).items():
            if self.owns(hospital):
                HOSPITAL_EVENTS_PENDING.labels(hospital).set(count)
                exported.add(hospital)
        for hospital in self._exported - exported:
            HOSPITAL_EVENTS_PENDING.remove(hospital)
        self._exported = exported

    async def run(self, interval: float = 5.0) -> None:
        """A background task of the referral service (services/referral/app.py)."""
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away for a moment: next time
                log.debug("hospital_pending_unavailable", error=repr(exc))
            await asyncio.sleep(interval)
