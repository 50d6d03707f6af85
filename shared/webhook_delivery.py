"""Delivering webhooks: each hospital's events POSTed to its endpoint, one at a time, in order.

A background of the referral service (services/referral/app.py). An instance delivers the
webhooks of the partitions it holds (shared/consumer.py `Ownership`), each partition under a
lease of its own: the PostgreSQL session advisory lock ("webhooks", partition) on a connection
of its own, idle-timed out like a partition's (`POST_LEASE_SECONDS`). The webhook's position
(the `POST` sequence of the last acknowledged event, shared/webhooks.py) is read and moved only
on that connection, and it is read again right before every attempt: an instance whose session
ended sends nothing more, and its successor starts from the last acknowledged event.

Events are read by position from `POST` (`get_msg(next_by_subj)`), each attempt anew: an event
erased meanwhile (forgetting) is not sent, and the redacted copy that replaces it, a later
message, is. Nothing of an event is kept outside the stream. docs/decisions.md, "Webhooks".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import asyncpg
import httpx
import structlog
from cryptography.exceptions import InvalidTag
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg
from nats.js.errors import NotFoundError
from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Gauge

from shared import tracing, webhooks
from shared.contracts import STREAM_NAME
from shared.eventstore import connect
from shared.partitions import lock_key, sleep_or_stop
from shared.settings import Settings

log = structlog.get_logger()

T = TypeVar("T")

LOCK = "webhooks"  # the first key of the (webhooks, partition) leases
POLL_SECONDS = 0.5  # a caught-up webhook looks for its next event this often
COUNT_SECONDS = 5.0
# A backing-off webhook looks this often whether it was registered anew (a fixed endpoint is
# tried at once) or removed.
RECHECK_SECONDS = 2.0

PENDING = Gauge(
    "post_webhook_events_pending",
    "Events of the hospital not yet acknowledged by its webhook endpoint; exported by the one"
    " instance that delivers them.",
    ["hospital"],
)
ATTEMPTS = Counter(
    "post_webhook_attempts_total",
    "Webhook requests, by outcome (acknowledged: a 2xx answer; failed: anything else).",
    ["outcome"],
)


class LostLease(Exception):
    """The lease's connection is gone: another instance may deliver now."""


def evt_filter(hospital: str) -> str:
    return f"post.{hospital}.evt.>"


async def next_event(js: JetStreamContext, hospital: str, position: int) -> RawStreamMsg | None:
    """The hospital's first event after `position` in `POST`, or None."""
    try:
        return await js.get_msg(
            STREAM_NAME, seq=position + 1, subject=evt_filter(hospital), next=True
        )
    except NotFoundError:
        return None


async def count_after(js: JetStreamContext, hospital: str, position: int) -> int:
    """The hospital's events after `position`: a consumer that is created, read and deleted."""
    info = await js.add_consumer(
        STREAM_NAME,
        ConsumerConfig(
            filter_subject=evt_filter(hospital),
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=position + 1,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    with contextlib.suppress(Exception):  # it goes after inactive_threshold anyway
        await js.delete_consumer(STREAM_NAME, info.name)
    return int(info.num_pending or 0)


def webhook_id(msg: RawStreamMsg) -> str:
    """The CloudEvents id of the event (the platform's events always have one)."""
    try:
        return str(json.loads(msg.data or b"")["id"])
    except (ValueError, KeyError, TypeError):
        return (msg.headers or {}).get("Nats-Msg-Id") or f"post-{msg.seq}"


async def attempt(
    client: httpx.AsyncClient, url: str, secret: str, msg: RawStreamMsg
) -> str | None:
    """POST one event; None when a 2xx acknowledged it, else what went wrong: `http_<status>`,
    `timeout` (no answer within 10 s) or the error's class. Never a body."""
    body = msg.data or b""
    headers = webhooks.signed_headers(secret, webhook_id(msg), int(time.time()), body)
    request = client.build_request("POST", url, content=body, headers=headers)
    try:
        async with asyncio.timeout(webhooks.ATTEMPT_TIMEOUT):
            response = await client.send(request, stream=True)  # the answer's body is not read
            await response.aclose()
    except TimeoutError:
        return "timeout"
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return None if 200 <= response.status_code < 300 else f"http_{response.status_code}"


class WebhookPartition:
    """The webhooks of one partition while this instance holds their lease."""

    def __init__(
        self,
        partition: int,
        js: JetStreamContext,
        settings: Settings,
        instance: str,
        key: bytes,
        *,
        schema: str = webhooks.SCHEMA,
        lock: str = LOCK,
    ) -> None:
        """`schema`, `lock`: where the table is and what the lease is called (a test's own)."""
        self.partition = partition
        self.schema = schema
        self.lease_name = lock
        self.js = js
        self.settings = settings
        self.instance = instance
        self.key = key
        self.stop = asyncio.Event()
        self.held = False
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._caught_up: set[str] = set()

    async def _db(self, query: Callable[..., Awaitable[T]], *args: Any) -> T:
        """One statement on the lease's connection (one user at a time)."""
        async with self._lock:
            conn = self._conn
            if conn is None or conn.is_closed():
                raise LostLease(f"webhooks of partition {self.partition}: the lease is gone")
            try:
                return await query(conn, *args)
            except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError) as exc:
                raise LostLease(repr(exc)) from exc

    async def run(self) -> None:
        lease_ms = str(int(self.settings.lease_seconds * 1000))
        conn = await connect(
            self.settings.database_url.get_secret_value(),
            self.schema,
            application_name=f"webhooks:{self.instance}",
            idle_session_timeout=lease_ms,
            idle_in_transaction_session_timeout=lease_ms,
        )
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            locked = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", lock_key(self.lease_name), self.partition
            )
            if not locked:
                return
            self._conn, self.held = conn, True
            log.info("webhooks_taken", partition=self.partition)
            async with httpx.AsyncClient(
                follow_redirects=False, timeout=webhooks.ATTEMPT_TIMEOUT
            ) as client:
                counted = 0.0
                while not self.stop.is_set():
                    # Also what keeps the lease's session from idling out while this runs.
                    hospitals = set(await self._db(webhooks.of_partition, self.partition))
                    for hospital in list(tasks):
                        if hospital not in hospitals or tasks[hospital].done():
                            tasks.pop(hospital).cancel()
                            self._forget(hospital)
                    for hospital in hospitals - tasks.keys():
                        tasks[hospital] = asyncio.create_task(self._deliver(client, hospital))
                    if time.monotonic() - counted > COUNT_SECONDS:
                        counted = time.monotonic()
                        await self._count(hospitals)
                    await sleep_or_stop(self.stop, POLL_SECONDS)
        except LostLease as exc:
            log.warning("webhooks_lost", partition=self.partition, error=str(exc)[:200])
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            for hospital in tasks:
                self._forget(hospital)
            if self.held:
                log.info("webhooks_released", partition=self.partition)
            self.held, self._conn = False, None
            try:
                await asyncio.wait_for(conn.close(), timeout=2)  # the session ends: the lock goes
            except Exception:
                conn.terminate()

    def _forget(self, hospital: str) -> None:
        self._caught_up.discard(hospital)
        with contextlib.suppress(KeyError):
            PENDING.remove(hospital)

    async def _count(self, hospitals: set[str]) -> None:
        for hospital in hospitals:
            if hospital in self._caught_up:
                PENDING.labels(hospital).set(0)
                continue
            hook = await self._db(webhooks.load, hospital)
            if hook is not None:
                with contextlib.suppress(Exception):  # the next round counts again
                    PENDING.labels(hospital).set(
                        await count_after(self.js, hospital, hook.position)
                    )

    async def _deliver(self, client: httpx.AsyncClient, hospital: str) -> None:
        try:
            while not self.stop.is_set():
                hook = await self._db(webhooks.load, hospital)
                read_at = time.monotonic()
                if hook is None:
                    return  # removed (`--off`)
                msg = await next_event(self.js, hospital, hook.position)
                if msg is None:
                    self._caught_up.add(hospital)
                    await sleep_or_stop(self.stop, POLL_SECONDS)
                    continue
                self._caught_up.discard(hospital)
                # The position read is trusted for half a lease: a longer pause since (a frozen
                # process, whose session may have ended meanwhile) means reading it again.
                if time.monotonic() - read_at > self.settings.lease_seconds / 2:
                    continue
                error = await self._attempt(client, hospital, hook, msg)
                if error is None:
                    ATTEMPTS.labels("acknowledged").inc()
                    await self._db(webhooks.acknowledged, hook, msg.seq)
                    continue
                ATTEMPTS.labels("failed").inc()
                failures = await self._db(webhooks.failed, hook, error)
                delay = webhooks.retry_delay(failures)
                log.warning(
                    "webhook_failed",
                    hospital=hospital,
                    error=error,
                    failures=failures,
                    retry_in=round(delay, 1),
                )
                await self._back_off(hospital, hook, delay)
        except LostLease as exc:
            log.warning("webhooks_lost", partition=self.partition, error=str(exc)[:200])
            self.stop.set()
        except Exception as exc:  # NATS away for a moment: the partition's loop starts it again
            log.warning("webhook_delivery_failed", error=type(exc).__name__)
            await asyncio.sleep(1.0)

    async def _attempt(
        self, client: httpx.AsyncClient, hospital: str, hook: webhooks.Webhook, msg: RawStreamMsg
    ) -> str | None:
        """One attempt; traced, a span (kind CLIENT) that is the child of the event's publish
        (its envelope's traceparent), with what the log says: the hospital and the outcome."""
        parent = tracing.envelope_context(msg.data or b"") if tracing.TRACER is not None else None
        with tracing.span(
            "webhook deliver", kind=SpanKind.CLIENT, parent=parent, post_hospital=hospital
        ) as span:
            try:
                error = await attempt(
                    client, hook.url, webhooks.unseal(self.key, hospital, hook.sealed), msg
                )
            except InvalidTag:  # sealed under another POST_WEBHOOK_KEY
                error = "secret_unreadable"
            span.set_attribute("post.outcome", "acknowledged" if error is None else "failed")
            if error is not None:
                span.set_attribute("error.type", error)
            return error

    async def _back_off(self, hospital: str, hook: webhooks.Webhook, delay: float) -> None:
        """Wait `delay` before the next attempt, or less when the webhook was registered anew
        (another URL or secret) or removed."""
        until = time.monotonic() + delay
        while (left := until - time.monotonic()) > 0:
            if await sleep_or_stop(self.stop, min(left, RECHECK_SECONDS)):
                return
            now = await self._db(webhooks.load, hospital)
            if now is None or now.sealed != hook.sealed:
                return


async def delivery(
    js: JetStreamContext,
    settings: Settings,
    held: Callable[[], Iterable[int]],
    instance: Callable[[], str],
) -> None:
    """The background: a `WebhookPartition` for each partition this instance holds (`held`,
    asked every second; `instance`: this instance's name, the lease holder's)."""
    key = webhooks.sealing_key(settings.data_dir)
    workers: dict[int, tuple[WebhookPartition, asyncio.Task[None]]] = {}
    try:
        while True:
            holding = set(held())
            name = instance()
            for p, (worker, task) in list(workers.items()):
                if task.done():
                    del workers[p]
                elif p not in holding:
                    worker.stop.set()  # its task ends within a poll; the new holder waits for it
            for p in holding - workers.keys():
                worker = WebhookPartition(p, js, settings, name, key)
                workers[p] = (worker, asyncio.create_task(_supervised(worker)))
            await asyncio.sleep(1.0)
    finally:
        for worker, _ in workers.values():
            worker.stop.set()
        tasks = [t for _, t in workers.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _supervised(worker: WebhookPartition) -> None:
    try:
        await worker.run()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("webhooks_lost", partition=worker.partition, error=repr(exc)[:200])
