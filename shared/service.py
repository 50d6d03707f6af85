"""`Service`: the composition root of one service instance.

It owns the PostgreSQL pool (with the service's schema and migrations), the NATS connection,
the `POST` stream and the service's work stream, its share of the partitions (the consumer and
the outbox relay of each: shared/consumer.py), background timers and the HTTP app (FastAPI:
``/healthz``, ``/readyz``, ``/metrics``, the service's own routes and its OpenAPI spec). The fate
of a message is decided in shared/dispatch.py. Any number of instances may run.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import nats
import structlog
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from shared import tracing
from shared.auth import AUTH_RESPONSES, AccessLog, Holder, require_any_token
from shared.clock import Clock, ControlledClock, SystemClock
from shared.consumer import Ownership
from shared.contracts import STREAM_NAME, STREAM_SUBJECTS, Command, cmd_subject, evt_subject, new_id
from shared.dispatch import Dispatcher, InjectedFaults
from shared.eventstore import MigrationChangedError, create_pool, migrate
from shared.http import install_error_handlers
from shared.observability import DB_ROUND_TRIPS, SERVICE_UP, configure_logging
from shared.outbox import report_backlog
from shared.partitions import ensure_work_stream, partition_of
from shared.settings import Settings, UnknownSettingError
from shared.unit_of_work import Handler, UnitOfWork

log = structlog.get_logger()

UnitOfWorkFactory = Callable[[str], AbstractAsyncContextManager[UnitOfWork]]


@dataclass(frozen=True)
class Running:
    """What a started instance has, whole: `Service.start` builds it once the pool, NATS and
    the partitions are up. A background task is given it and takes only the parts it uses
    (app.py wires each: `OverdueTimer(running.pool, running.unit_of_work, ...)`), as
    cosmicpython's bootstrap injects each handler's dependencies."""

    name: str
    pool: asyncpg.Pool
    js: JetStreamContext
    clock: Clock
    settings: Settings
    ownership: Ownership | None
    unit_of_work: UnitOfWorkFactory

    @property
    def partitions(self) -> list[int]:
        """The partitions this instance holds now."""
        return self.ownership.held() if self.ownership is not None else []

    @property
    def instance(self) -> str:
        """This instance's name among the service's ("-" without partitions)."""
        return self.ownership.instance if self.ownership is not None else "-"

    def owns(self, hospital: str) -> bool:
        """This instance holds the hospital's partition (its gauges are this instance's to
        export, so that a sum over instances counts each once)."""
        return partition_of(hospital) in self.partitions


# A background task: run forever beside the consumer, given what the instance has.
Background = Callable[[Running], Awaitable[None]]


class NotStarted(RuntimeError):
    """The service's pool or NATS asked for before `start` (or after `stop`)."""


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


def service_of(request: Request) -> Service:
    """The service a route runs in (views.py must not import app.py)."""
    service: Service = request.app.state.service
    return service


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
        role: str | None = None,
    ) -> None:
        """`role`: the service whose commands it answers, when not `name` (a test's stand-in
        for one of the four)."""
        self.name = name
        # A new service reads the stream from its first message (ALL), so a new service or a
        # rebuilt one sees the whole history; tests of a throw-away service may start at NEW.
        self.deliver_policy = deliver_policy
        self._own_process = False  # run by main(): the process is this service alone
        self.migrations = migrations
        self.background = list(background)
        try:
            self.settings = settings or Settings()
        except UnknownSettingError as exc:  # refused at start, by name
            raise SystemExit(f"{name}: {exc}") from None
        self.clock: Clock = clock or (
            ControlledClock() if self.settings.test_clock else SystemClock()
        )
        self.dispatcher = Dispatcher(
            name,
            self.clock,
            role=role or name,
            command_handlers=command_handlers or {},
            event_handlers=event_handlers or {},
            answers_unknown_commands=answers_unknown_commands,
            not_yet_known_seconds=self.settings.not_yet_known_seconds,
            faults=InjectedFaults.from_file(self.settings.test_faults_file, name),
        )
        # The service that answers unknown command types sees every command (and lets the ones
        # other services own pass: see shared/dispatch.py).
        commands = (
            [cmd_subject("*", "*")]
            if answers_unknown_commands
            else [cmd_subject("*", t) for t in self.dispatcher.command_handlers]
        )
        self.subjects = commands + [evt_subject("*", t) for t in self.dispatcher.event_handlers]
        # What start() opens, to close in stop() even when start() failed half-way; the whole
        # of it, once started, is `running` (never half-built).
        self._pool: asyncpg.Pool | None = None
        self._nc: NATS | None = None
        self._running: Running | None = None
        self.ownership: Ownership | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.http = self._make_http(routers, description)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> Running:
        """The started instance's pool, NATS, clock and partitions; `NotStarted` before."""
        if self._running is None:
            raise NotStarted(f"the {self.name} service is not running")
        return self._running

    @property
    def pool(self) -> asyncpg.Pool:
        return self.running.pool

    @property
    def js(self) -> JetStreamContext:
        return self.running.js

    async def start(self) -> None:
        if self._pool is None:
            self._pool = await create_pool(
                self.settings.database_url.get_secret_value(),
                self.name,
                on_round_trip=DB_ROUND_TRIPS.labels(self.name).inc,
            )
            try:
                await migrate(self._pool, self.name, self.migrations)
            except MigrationChangedError as exc:
                log.error("migration_changed", migration=exc.version, file=str(exc.path))
                raise
        pool = self._pool
        self._nc = await nats.connect(
            self.settings.nats_servers,
            name=f"post-{self.name}",
            tls=self.settings.nats_tls(),
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )
        js = self._nc.jetstream()
        await ensure_stream(js, self.settings.stream_replicas)
        self._stop.clear()
        if self.subjects:
            for attempt in range(240):  # a busy or starting cluster answers late: wait it out
                try:
                    await self._ensure_work_stream(js)
                    break
                except (NatsTimeoutError, NoRespondersError, ServiceUnavailableError):
                    if attempt == 239:
                        raise
                    await asyncio.sleep(0.25)
            self.ownership = Ownership(
                self.name,
                self.dispatcher,
                pool,
                js,
                self.settings,
                self.settings.http_port(self.name),
            )
            ownership = self.ownership
            self._spawn("partitions", lambda: ownership.run(self._stop))
            self._spawn("lag", self._report_lag)
        running = self._running = Running(
            self.name, pool, js, self.clock, self.settings, self.ownership, self.unit_of_work
        )
        for fn in self.background:
            self._spawn(fn.__name__, lambda fn=fn: fn(running))  # type: ignore[misc]
        SERVICE_UP.labels(self.name).set(1)
        log.info("service_started", nats=self.settings.nats_hosts)

    async def _ensure_work_stream(self, js: JetStreamContext) -> None:
        """The work stream; a service of the single-consumer releases (a durable consumer on
        `POST` named after it) goes on from the first message it had not acknowledged."""
        start_seq, start_time = None, None
        if self.deliver_policy == DeliverPolicy.NEW:
            start_time = datetime.now(UTC)
        try:
            old = await js.consumer_info(STREAM_NAME, self.name)
            start_seq = (old.ack_floor.stream_seq if old.ack_floor else 0) + 1
        except NotFoundError:
            old = None
        await ensure_work_stream(
            js,
            self.name,
            self.subjects,
            self.settings.stream_replicas,
            start_seq=start_seq,
            start_time=start_time,
        )
        if old is not None:
            await js.delete_consumer(STREAM_NAME, self.name)
            log.info("single_consumer_retired", resumed_from_stream_seq=start_seq)

    async def stop(self) -> None:
        self._stop.set()
        SERVICE_UP.labels(self.name).set(0)
        if self.ownership is not None:
            await self.ownership.release_all()  # hand the partitions over at once
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._running = None
        if self._nc is not None:
            # Every publish was already acknowledged, so a plain close loses nothing.
            await self._nc.close()
            self._nc = None
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), timeout=5)
            except Exception as exc:
                log.warning("database_close_slow", error=repr(exc))
                self._pool.terminate()
            self._pool = None
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

    async def _report_lag(self) -> None:
        while not self._stop.is_set():
            try:
                if self.ownership is not None:
                    await self.ownership.report_lag()
                if self._running is not None:
                    await report_backlog(self.name, self._running.pool)
            except Exception as exc:
                log.debug("lag_unavailable", error=repr(exc))
            await asyncio.sleep(5)

    def main(self) -> None:
        """The process entrypoint: ``python -m services.<name>``."""
        configure_logging(self.name, self.settings.log_level)
        self._own_process = True
        # OpenTelemetry, when the OTEL_* variables ask for it (off by default: shared/tracing.py)
        if tracing.setup(self.name):
            tracing.instrument_app(self.http)
            log.info("tracing_on", exporters=tracing.exporters())
        try:
            self._serve()
        finally:
            tracing.shutdown()  # what is buffered is exported

    def _serve(self) -> None:
        uvicorn.run(
            self.http,
            host=self.settings.http_host,
            port=self.settings.http_port(self.name),
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=15,
            # Longer than the idle keep-alive of the callers that reuse connections (Caddy's
            # upstream pool keeps them 2 minutes; httpx 5 s, uvicorn's own default): a server
            # that closes first races the caller's next request into a reset.
            timeout_keep_alive=150,
        )

    # -- partitions --------------------------------------------------------------------------

    @property
    def partitions(self) -> list[int]:
        """The partitions this instance holds now."""
        return self.ownership.held() if self.ownership is not None else []

    def owns(self, hospital: str) -> bool:
        """This instance holds the hospital's partition (its gauges are this instance's to
        export, so that a sum over instances counts each once)."""
        return partition_of(hospital) in self.partitions

    def wake(self, hospital: str) -> None:
        """Events of `hospital` were committed: its partition's publisher sends them now, when
        this instance holds it (else its holder does within a second)."""
        if self.ownership is not None:
            self.ownership.wake(partition_of(hospital))

    @asynccontextmanager
    async def unit_of_work(
        self, hospital: str, *, correlation_id: str = "", causation_id: str = ""
    ) -> AsyncIterator[UnitOfWork]:
        """A transaction outside any message (timers): events appended are published after,
        the children of its span (a trace of its own) when tracing is on."""
        with tracing.span(f"{self.name} background work", post_hospital=hospital):
            async with self.pool.acquire() as conn, conn.transaction():
                yield UnitOfWork(
                    self.name,
                    conn,
                    hospital,
                    self.clock,
                    message_id=causation_id or new_id(),
                    correlation_id=correlation_id,
                )
        self.wake(hospital)

    async def execute(
        self, hospital: str, command: Command, command_id: str | None = None
    ) -> list[Any]:
        """Run a command through its handler now (the HTTP intake): returns the emitted events
        or raises ``Rejected``."""
        emitted = await self.dispatcher.execute(self.pool, hospital, command, command_id)
        self.wake(hospital)
        return emitted

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
        # One `http_access` line per request to a route that needs a token (shared/auth.py).
        app.add_middleware(AccessLog, service=self.name)

        @app.get("/healthz", tags=["operations"])
        async def healthz() -> dict[str, str]:
            """The process is alive."""
            return {"status": "ok", "service": self.name}

        @app.get("/readyz", tags=["operations"])
        async def readyz() -> JSONResponse:
            """Database and NATS reachable, partitions looked after; which this instance holds."""
            ownership = self.ownership
            running = self._running
            checks = {
                "database": running is not None,
                "nats": self._nc is not None and self._nc.is_connected,
                "partitions": ownership is None or ownership.running,
            }
            if running is not None:
                try:
                    async with running.pool.acquire(timeout=2) as conn:
                        await conn.fetchval("SELECT 1")
                except Exception:
                    checks["database"] = False
            ok = all(checks.values())
            body: dict[str, Any] = {"status": "ready" if ok else "not_ready", "checks": checks}
            if ownership is not None:
                body["instance"] = ownership.instance
                body["partitions"] = ownership.held()
            return JSONResponse(body, status_code=200 if ok else 503)

        @app.get("/metrics", tags=["operations"], response_class=Response)
        async def metrics() -> Response:
            """Prometheus exposition."""
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

        @app.get("/whoami", tags=["operations"], responses={401: AUTH_RESPONSES[401]})
        async def whoami(holder: Holder = Depends(require_any_token)) -> dict[str, str]:
            """Whose API token this is: `{"holder": "hospital:<id>" or "region:<name>", "kind",
            "name"}` (the dashboard asks, to show what the token may read)."""
            return {"holder": str(holder), "kind": holder.kind, "name": holder.name}

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
