"""`Service`: the composition root of one service process.

It owns the PostgreSQL pool (with the service's schema and migrations), the NATS connection,
the durable consumer, the outbox relay, background timers and the HTTP app (FastAPI:
``/healthz``, ``/readyz``, ``/metrics``, the service's own routes and its OpenAPI spec).
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import nats
import structlog
import uvicorn
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from shared.clock import Clock, ControlledClock, SystemClock
from shared.consumer import Incoming, StreamConsumer, Unprocessable, stored_age_seconds
from shared.contracts import (
    COMMANDS,
    EVENTS,
    HOSPITAL_PATTERN,
    STREAM_NAME,
    STREAM_SUBJECTS,
    Command,
    CommandRejected,
    ReasonCode,
    Rejected,
    Unanswerable,
    new_id,
    parse_envelope,
    parse_payload,
)
from shared.eventstore import ConcurrencyError, create_pool, migrate
from shared.http import install_error_handlers
from shared.observability import COMMANDS_REJECTED, SERVICE_UP, configure_logging
from shared.outbox import OutboxRelay
from shared.settings import Settings
from shared.unit_of_work import Handler, NotYetKnown, UnitOfWork, mark_processed

log = structlog.get_logger()

_HOSPITAL = re.compile(HOSPITAL_PATTERN)

Background = Callable[["Service"], Awaitable[None]]


class _Retry(Exception):
    """Internal: roll the transaction back and have the message redelivered later."""


class _Refused(Exception):
    """Internal: roll the handler's work back; the message ends as `outcome`, a command refused
    for `rejected` is answered with CommandRejected."""

    def __init__(self, outcome: str, rejected: Rejected | None = None) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.rejected = rejected


class ClockAdvance(BaseModel):
    seconds: float


# --- the stream -------------------------------------------------------------------------------


async def ensure_stream(js: JetStreamContext, replicas: int = 1, timeout: float = 60.0) -> None:
    """The one `POST` stream of CONTRACT.md: subjects post.>, file storage.

    A cluster that has just started is still electing its JetStream meta leader and then
    the stream's leader: its API answers late (a request timeout) or with 503 until then.
    Both are waited out, up to ``timeout``, so the services of a starting region come up in
    any order; anything else (bad credentials, a conflicting stream config) fails at once.
    """
    config = StreamConfig(
        name=STREAM_NAME,
        subjects=STREAM_SUBJECTS,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=120.0,
    )
    deadline = asyncio.get_running_loop().time() + timeout
    waited_for = "the JetStream API"
    while asyncio.get_running_loop().time() < deadline:
        try:
            try:
                info = await js.stream_info(STREAM_NAME)
            except NotFoundError:
                try:
                    info = await js.add_stream(config)
                except BadRequestError:  # another process created it first
                    info = await js.stream_info(STREAM_NAME)
            # In a cluster a new stream elects its leader first: until then a publish finds
            # no one.
            if info.cluster is None or info.cluster.leader:
                return
            waited_for = f"a leader of stream {STREAM_NAME}"
        except (NatsTimeoutError, NoRespondersError, ServiceUnavailableError):
            waited_for = "the JetStream API"
        log.info("stream.waiting", waiting_for=waited_for)
        await asyncio.sleep(0.25)
    raise TimeoutError(f"no answer from {waited_for} after {timeout:.0f} s")


# --- the service ------------------------------------------------------------------------------


class Service:
    def __init__(
        self,
        name: str,
        *,
        command_handlers: Mapping[str, Handler] | None = None,
        event_handlers: Mapping[str, Handler] | None = None,
        migrations: Path | None = None,
        routers: Sequence[APIRouter] = (),
        background: Sequence[Background] = (),
        description: str = "",
        settings: Settings | None = None,
        clock: Clock | None = None,
        deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
        answers_unknown_commands: bool = False,
    ) -> None:
        self.name = name
        # One service of the platform answers commands of a type nobody owns (a typo in a
        # hospital's integration): a CommandRejected, never silence.
        self.answers_unknown_commands = answers_unknown_commands
        # A new durable consumer reads the stream from its first message (ALL), so a new
        # service or a rebuilt one sees the whole history; tests of a throw-away consumer
        # may start at NEW.
        self.deliver_policy = deliver_policy
        self._own_process = False  # run by main(): the process is this service alone
        self.command_handlers = dict(command_handlers or {})
        self.event_handlers = dict(event_handlers or {})
        for t in self.command_handlers:
            assert t in COMMANDS, f"unknown command type {t}"
        for t in self.event_handlers:
            assert t in EVENTS, f"unknown event type {t}"
        self.migrations = migrations
        self.background = list(background)
        self.settings = settings or Settings()
        self.clock: Clock = clock or (
            ControlledClock() if self.settings.test_clock else SystemClock()
        )
        self.pool: asyncpg.Pool = None  # type: ignore[assignment]
        self.nc: NATS | None = None
        self.js: JetStreamContext = None  # type: ignore[assignment]
        self.relay: OutboxRelay | None = None
        self.consumer: StreamConsumer | None = None
        self.last_unanswerable = ""
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.consuming = False
        self.http = self._make_http(routers, description)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open_database(self) -> None:
        if self.pool is None:
            self.pool = await create_pool(self.settings.database_url, self.name)
            await migrate(self.pool, self.name, self.migrations)

    async def start(self) -> None:
        await self.open_database()
        self.nc = await nats.connect(
            self.settings.nats_servers,
            name=f"post-{self.name}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )
        self.js = self.nc.jetstream()
        await ensure_stream(self.js, self.settings.stream_replicas)
        self.relay = OutboxRelay(self.name, self.pool, self.js)
        self._stop.clear()
        self._spawn("outbox", self.relay.run)
        if self.command_handlers or self.event_handlers:
            self.consumer = StreamConsumer(self, self.js)
            await (
                self.consumer.ensure()
            )  # exists when start() returns: nothing published after is missed
            self._spawn("consumer", self._consume)
            self._spawn("lag", self._report_lag)
        for fn in self.background:
            self._spawn(fn.__name__, lambda fn=fn: fn(self))  # type: ignore[misc]
        SERVICE_UP.labels(self.name).set(1)
        log.info("service_started", nats=self.settings.nats_hosts)

    async def stop(self) -> None:
        self._stop.set()
        SERVICE_UP.labels(self.name).set(0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.nc is not None:
            # Every publish was already acknowledged, so a plain close loses nothing (a drain
            # waits on the bound pull subscription).
            await self.nc.close()
            self.nc = None
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), timeout=5)
            except Exception as exc:
                log.warning("database_close_slow", error=repr(exc))
                self.pool.terminate()
            self.pool = None  # type: ignore[assignment]
        log.info("service_stopped")

    def _spawn(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        async def supervised() -> None:
            delay = 0.2
            while not self._stop.is_set():
                try:
                    await fn()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.error("task_failed", task=name, error=repr(exc))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

        self._tasks.append(asyncio.create_task(supervised(), name=f"{self.name}:{name}"))

    async def _consume(self) -> None:
        assert self.consumer is not None
        self.consuming = True
        try:
            await self.consumer.run(self._stop)
        finally:
            self.consuming = False

    async def _report_lag(self) -> None:
        assert self.consumer is not None
        while not self._stop.is_set():
            try:
                await self.consumer.report_lag()
            except Exception as exc:
                log.debug("lag_unavailable", error=repr(exc))
            await asyncio.sleep(5)

    def main(self) -> None:
        """The process entrypoint: ``python -m services.<name>``."""
        configure_logging(self.name, self.settings.log_level)
        self._own_process = True
        uvicorn.run(
            self.http,
            host=self.settings.http_host,
            port=self.settings.http_port(self.name),
            log_config=None,
            log_level="warning",
            access_log=False,
        )

    # -- handling ----------------------------------------------------------------------------

    def wake_relay(self) -> None:
        """Events were committed: the relay publishes them now, not at its next poll."""
        if self.relay is not None:
            self.relay.wakeup.set()

    _wake_relay = wake_relay

    @asynccontextmanager
    async def unit_of_work(
        self, hospital: str, *, correlation_id: str = "", causation_id: str = ""
    ) -> AsyncIterator[UnitOfWork]:
        """A transaction outside any message (timers): events appended are published after."""
        async with self.pool.acquire() as conn, conn.transaction():
            yield UnitOfWork(
                self.name,
                conn,
                hospital,
                self.clock,
                message_id=causation_id or new_id(),
                correlation_id=correlation_id,
            )
        self._wake_relay()

    async def process(self, incoming: Incoming, conn: asyncpg.Connection | None = None) -> str:
        """Handle one message from the stream; returns how it ended (a metric label). With
        `conn` (the consumer's), on it: in a transaction of its own, or as one savepoint of the
        batch's transaction when `conn` is in one."""
        owned = incoming.type in self.command_handlers
        unowned = incoming.type not in COMMANDS and self.answers_unknown_commands
        if incoming.kind == "cmd" and not (owned or unowned):
            return "ignored"  # another service's command: its owner answers it
        if not _HOSPITAL.match(incoming.hospital):
            # No tenant can have this id (CONTRACT.md: hospital ids are slugs), so there is no
            # hospital to answer: a dead letter, at once (an answer could not even be built).
            self.last_unanswerable = "the subject's hospital is not a hospital id"
            return "dead_letter"
        try:
            ce = parse_envelope(incoming.body)
        except Unanswerable as exc:
            self.last_unanswerable = str(exc)
            return "dead_letter"
        except Rejected as rejected:
            if incoming.kind != "cmd":
                self.last_unanswerable = rejected.detail
                return "dead_letter"
            raw_id = str(json.loads(incoming.body)["id"])
            return await self._reject_alone(incoming, raw_id, rejected, conn)
        if incoming.kind == "cmd":
            mismatch = None
            if ce.type != incoming.type:
                # Not echoed: an envelope's attributes are the sender's text.
                mismatch = f"the type does not match the subject's {incoming.type}"
            elif ce.hospital != incoming.hospital:
                mismatch = "the source's hospital does not match the subject's hospital"
            if mismatch:
                return await self._reject_alone(
                    incoming, ce.id, Rejected(ReasonCode.invalid_payload, mismatch), conn
                )
            if incoming.type not in COMMANDS:
                refused = Rejected(ReasonCode.invalid_payload, "no command of this type exists")
                return await self._reject_alone(incoming, ce.id, refused, conn)
        # A command starts its chain: a correlationid it carries is the sender's text, not logged.
        chain = ce.id if incoming.kind == "cmd" else (ce.correlationid or ce.id)
        structlog.contextvars.bind_contextvars(correlation_id=chain)
        try:
            return await self._handle(incoming, ce.id, ce.correlationid, ce.data, conn)
        except _Retry:
            return "retry"

    async def _handle(
        self,
        incoming: Incoming,
        ce_id: str,
        correlation: str | None,
        data: dict[str, Any],
        batch: asyncpg.Connection | None = None,
    ) -> str:
        is_command = incoming.kind == "cmd"
        key = f"{incoming.hospital}:{ce_id}"

        def unit(conn: asyncpg.Connection) -> UnitOfWork:
            return UnitOfWork(
                self.name,
                conn,
                incoming.hospital,
                self.clock,
                message_id=ce_id,
                # A command starts a chain; an event carries its chain's id on.
                correlation_id=ce_id if is_command else (correlation or ce_id),
                stream_seq=incoming.stream_seq,
                message_time=incoming.stored_at,
            )

        try:
            async with self._transaction(batch) as conn:
                uow = unit(conn)
                if not await mark_processed(conn, key, incoming.stream_seq):
                    return "duplicate"
                try:
                    if is_command:
                        message: Any = parse_payload(COMMANDS[incoming.type], data)
                        await self.command_handlers[incoming.type](message, uow)
                    else:
                        message = parse_payload(EVENTS[incoming.type], data)
                        await self.event_handlers[incoming.type](message, uow)
                except Rejected as rejected:
                    if not is_command:
                        log.warning(
                            "event_refused", reason=rejected.reason_code, detail=rejected.detail
                        )
                        raise _Refused("ignored") from None
                    raise _Refused("rejected", rejected) from None
                except NotYetKnown as pending:
                    limit = self.settings.not_yet_known_seconds
                    if stored_age_seconds(incoming, self.clock) < limit:
                        log.info("not_yet_known", detail=pending.detail, attempt=incoming.attempt)
                        raise _Retry() from None
                    if not is_command:
                        self.last_unanswerable = f"not known after {limit:.0f}s: {pending.detail}"
                        raise _Refused("dead_letter") from None
                    raise _Refused(
                        "rejected", Rejected(pending.reason_code, pending.detail)
                    ) from None
                outcome = "ok"
                if is_command and not uow.emitted:
                    log.error("command_without_answer", command_type=incoming.type)
        except _Refused as refused:
            # Rolled back: nothing of the handler is kept (no savepoint around it, which would
            # cost two more round trips on every message). Recorded anew, with the answer.
            async with self._transaction(batch) as conn:
                if not await mark_processed(conn, key, incoming.stream_seq):
                    return "duplicate"
                if refused.rejected is not None:
                    await self._append_rejection(unit(conn), ce_id, incoming.type, refused.rejected)
            outcome = refused.outcome
        self._wake_relay()
        return outcome

    async def _append_rejection(
        self, uow: UnitOfWork, command_id: str, command_type: str, rejected: Rejected
    ) -> None:
        label = command_type if command_type in COMMANDS else "unknown"
        COMMANDS_REJECTED.labels(self.name, label, rejected.reason_code).inc()
        log.info("command_rejected", reason_code=rejected.reason_code, detail=rejected.detail)
        event = CommandRejected(
            hospital=uow.hospital,
            command_id=command_id,
            command_type=command_type[:128],
            reason_code=rejected.reason_code,
            detail=rejected.detail,
        )
        await uow.append(f"rejected:{uow.hospital}:{command_id}", 0, [event])

    @asynccontextmanager
    async def _transaction(
        self, batch: asyncpg.Connection | None
    ) -> AsyncIterator[asyncpg.Connection]:
        """On the consumer's connection: a transaction, or a savepoint of its batch's; else a
        pooled connection's own transaction."""
        if batch is not None:
            async with batch.transaction():
                yield batch
            return
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn

    async def _reject_alone(
        self,
        incoming: Incoming,
        command_id: str,
        rejected: Rejected,
        batch: asyncpg.Connection | None = None,
    ) -> str:
        """Answer a command refused before its payload was read (bad envelope or subject)."""
        async with self._transaction(batch) as conn:
            if not await mark_processed(
                conn, f"{incoming.hospital}:{command_id}", incoming.stream_seq
            ):
                return "duplicate"
            uow = UnitOfWork(
                self.name, conn, incoming.hospital, self.clock, message_id=command_id[:256]
            )
            await self._append_rejection(uow, command_id[:256], incoming.type, rejected)
        self._wake_relay()
        return "rejected"

    async def answer_unprocessable(self, incoming: Incoming, reason: str) -> None:
        """A command that failed every attempt still gets an answer."""
        try:
            command_id = str(json.loads(incoming.body)["id"])
        except Exception:
            return
        await self._reject_alone(
            incoming, command_id, Rejected(ReasonCode.internal_error, "could not be processed")
        )
        log.error("command_unprocessable", reason=reason)

    async def execute(
        self, hospital: str, command: Command, command_id: str | None = None
    ) -> list[Any]:
        """Run a command through its handler now (the HTTP intake): returns the emitted events
        or raises ``Rejected``. Same handler, same transaction rules as the stream."""
        handler = self.command_handlers.get(command.type_name)
        if handler is None:
            raise Unprocessable(f"{self.name} does not own {command.type_name}")
        command_id = command_id or new_id()
        for attempt in range(1, 6):
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    uow = UnitOfWork(
                        self.name,
                        conn,
                        hospital,
                        self.clock,
                        message_id=command_id,
                        answer_repeats=False,
                    )
                    if not await mark_processed(conn, f"{hospital}:{command_id}", None):
                        return []
                    await handler(command, uow)
                self._wake_relay()
                return uow.emitted
            except ConcurrencyError:
                await asyncio.sleep(0.01 * attempt)
            except NotYetKnown as pending:
                COMMANDS_REJECTED.labels(self.name, command.type_name, pending.reason_code).inc()
                raise Rejected(pending.reason_code, pending.detail) from None
            except Rejected as rejected:
                COMMANDS_REJECTED.labels(self.name, command.type_name, rejected.reason_code).inc()
                raise
        raise Rejected(ReasonCode.internal_error, "too much contention, try again")

    # -- HTTP --------------------------------------------------------------------------------

    def _make_http(self, routers: Sequence[APIRouter], description: str) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            await self.start()
            if self._own_process:
                # What exists once started (modules, routes, models, pools) lives as long as
                # the process: out of the collector's sight, a full collection walks only what
                # requests and messages create, not some 70,000 objects every time (a 20 ms
                # pause in a request's tail). Not in a test process that starts many services.
                gc.collect()
                gc.freeze()
            try:
                yield
            finally:
                await self.stop()

        app = FastAPI(
            title=f"POST {self.name} service",
            description=description or f"The {self.name} service of the POST platform.",
            version="1",
            lifespan=lifespan,
        )
        app.state.service = self

        install_error_handlers(app)

        @app.get("/healthz", tags=["operations"])
        async def healthz() -> dict[str, str]:
            """The process is alive."""
            return {"status": "ok", "service": self.name}

        @app.get("/readyz", tags=["operations"])
        async def readyz() -> JSONResponse:
            """Database and NATS reachable, consumer running."""
            checks = {
                "database": self.pool is not None,
                "nats": self.nc is not None and self.nc.is_connected,
                "consumer": self.consumer is None or self.consuming,
            }
            if checks["database"]:
                try:
                    async with self.pool.acquire(timeout=2) as conn:
                        await conn.fetchval("SELECT 1")
                except Exception:
                    checks["database"] = False
            ok = all(checks.values())
            return JSONResponse(
                {"status": "ready" if ok else "not_ready", "checks": checks},
                status_code=200 if ok else 503,
            )

        @app.get("/metrics", tags=["operations"], response_class=Response)
        async def metrics() -> Response:
            """Prometheus exposition."""
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

        if self.settings.test_clock:

            @app.post("/admin/clock", tags=["testing"])
            async def advance_clock(body: ClockAdvance) -> dict[str, str]:
                """Move the service's clock forward (only with POST_TEST_CLOCK=1)."""
                assert isinstance(self.clock, ControlledClock)
                now = self.clock.advance(timedelta(seconds=body.seconds))
                return {"now": now.isoformat()}

        for router in routers:
            app.include_router(router)
        return app
