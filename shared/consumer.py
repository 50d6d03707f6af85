"""Consuming the stream: the partitions this instance holds, each read and written in order.

`Ownership` keeps this instance's fair share of the service's partitions (shared/partitions.py):
it beats a heartbeat, counts the live instances, takes free partitions up to
ceil(partitions / instances), takes any partition left free (its holder died), and hands back
what is over its share when another instance joins.

A `PartitionWorker` holds one partition: the advisory lock on a connection of its own, and
everything of the partition is written on that connection — the handled messages, the waiting
ones, the publishing of the partition's outbox. It reads the partition's durable consumer of
the service's work stream in stream order, a fetched batch in one transaction (one savepoint a
message, decided by `shared/dispatch.py`), then publishes what the batch appended, and only
then acknowledges: an acknowledged message's consequences are in the stream. On taking the
partition it creates the consumer anew, so what the previous holder left unacknowledged comes
first, in order (the work stream keeps every message until it is acknowledged).

Why not a FastStream subscriber: its ordered batch (`PullSub(batch=True)`) holds a lone message
until the pull times out (tests/integration/test_faststream_batch.py); and a subscriber here
lives only while its partition's lease is held, recreated at every takeover, with acks after the
commit and the outbox publish on the lease's connection. docs/decisions.md, "FastStream".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg
import structlog
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from shared import inbox, tracing
from shared.contracts import COMMANDS, STREAM_NAME, dlq_subject, is_hospital_id, parse_subject
from shared.dispatch import (
    HELD,
    IGNORED,
    RETRYING,
    WAITING,
    Dispatcher,
    Fate,
    Outcome,
    is_transient,
)
from shared.eventstore import connect
from shared.inbox import Incoming
from shared.observability import (
    COMMANDS_ERASED,
    CONSUMER_ACK_PENDING,
    CONSUMER_PENDING,
    DB_ROUND_TRIPS,
    DEAD_LETTERS,
    HANDLER_SECONDS,
    HOSPITALS_HELD_BACK,
    MESSAGES_HANDLED,
    PARTITIONS_HELD,
)
from shared.outbox import OutboxRelay
from shared.partitions import (
    HEARTBEAT_SQL,
    LIVE_SQL,
    PARTITIONS,
    consumer_name,
    fair_share,
    held_partitions,
    lock_key,
    original_subject,
    sleep_or_stop,
    source_sequence,
    work_filter,
    work_stream,
)
from shared.settings import Settings
from shared.unit_of_work import Batch, batch_transaction

log = structlog.get_logger()

# The services whose facts another service's command may wait for: the owners of commands.
PRODUCERS = sorted({model.owner for model in COMMANDS.values()})


def backoff_seconds(attempt: int) -> float:
    return float(min(0.2 * 2 ** max(attempt - 1, 0), 30.0))


@dataclass
class Handled:
    """How one message of a batch ended, kept until the batch has committed."""

    outcome: Outcome
    error: BaseException | None = None
    seconds: float = 0.0
    batch_failed: bool = False  # the batch's transaction failed, not this message alone


class LostPartition(Exception):
    """The partition's connection (and with it the lease) is gone."""


class PartitionWorker:
    """One partition of one service, while this instance holds it."""

    def __init__(
        self,
        service: str,
        partition: int,
        dispatcher: Dispatcher,
        js: JetStreamContext,
        settings: Settings,
        instance: str,
    ) -> None:
        self.service = service
        self.partition = partition
        self.dispatcher = dispatcher
        self.js = js
        self.settings = settings
        self.instance = instance
        self.relay = OutboxRelay(service, js)
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()  # events were committed elsewhere in this process
        self.held = False
        self.waiting = 0
        self.holding: set[str] = set()  # this partition's hospitals held back by a retried message
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one user of the connection at a time
        self._quiet_before = False

    # -- holding the partition -------------------------------------------------------------

    async def run(self) -> None:
        lease_ms = str(int(self.settings.lease_seconds * 1000))
        conn = await connect(
            self.settings.database_url.get_secret_value(),
            self.service,
            application_name=f"{self.service}:{self.instance}",
            on_round_trip=DB_ROUND_TRIPS.labels(self.service).inc,
            # The lease: a frozen holder's session ends, and its lock with it.
            idle_session_timeout=lease_ms,
            idle_in_transaction_session_timeout=lease_ms,
        )
        publisher: asyncio.Task[None] | None = None
        try:
            key = lock_key(self.service)
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", key, self.partition):
                return
            self._conn, self.held = conn, True
            PARTITIONS_HELD.labels(self.service).inc()
            log.info("partition_taken", partition=self.partition)
            sub = await self._subscribe()
            self.waiting = await conn.fetchval(
                "SELECT count(*) FROM waiting WHERE partition = $1", self.partition
            )
            self.holding = await inbox.held_back(conn, self.partition)
            # What the last holder committed and did not publish goes first: from here on a
            # batch publishes only what it appended itself.
            await self.relay.publish_pending(conn, self.partition)
            publisher = asyncio.create_task(self._publish_loop())
            await self._consume(sub)
        finally:
            if publisher is not None:
                publisher.cancel()
                await asyncio.gather(publisher, return_exceptions=True)
            if self.held and not conn.is_closed():
                with contextlib.suppress(Exception):  # else the next holder publishes them again
                    await asyncio.wait_for(self.relay.delete_published(conn, self.partition), 2)
            if self.held:
                PARTITIONS_HELD.labels(self.service).dec()
                for gauge in (CONSUMER_PENDING, CONSUMER_ACK_PENDING, HOSPITALS_HELD_BACK):
                    with contextlib.suppress(KeyError):
                        gauge.remove(self.service, str(self.partition))
                log.info("partition_released", partition=self.partition)
            self.held, self._conn = False, None
            try:
                await asyncio.wait_for(conn.close(), timeout=2)  # the session ends: the lock goes
            except Exception:
                conn.terminate()

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        """The partition's consumer, created anew: it starts at the first message nobody
        acknowledged, whatever the previous holder had fetched."""
        stream, name = work_stream(self.service), consumer_name(self.service, self.partition)
        with contextlib.suppress(NotFoundError):
            await self.js.delete_consumer(stream, name)
        await self.js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=name,
                filter_subject=work_filter(self.service, self.partition),
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=60,
                max_deliver=-1,  # the limit is ours: see _settle
                max_ack_pending=10_000,
            ),
        )
        return await self.js.pull_subscribe_bind(durable=name, stream=stream)

    async def _consume(self, sub: JetStreamContext.PullSubscription) -> None:
        backlog = True
        while not self.stop.is_set():
            try:
                # nats-py's fetch of n, once one message came, waits for all n until the pull
                # expires: caught up, ask for one (it comes the moment it is stored); behind,
                # for a batch (what is waiting comes at once).
                msgs = await sub.fetch(self.settings.fetch_batch if backlog else 1, 1.0)
            except (NatsTimeoutError, TimeoutError):
                backlog = False
                if self.holding:
                    await self.retry_held()
                if self.waiting:
                    await self.retry_waiting(settle=True)
                continue
            except NatsError as exc:
                # JetStream away for a moment (a config reload answers "no responders" to the
                # account's API for an instant): the partition stays ours, ask again.
                log.warning("fetch_failed", partition=self.partition, error=type(exc).__name__)
                await sleep_or_stop(self.stop, 0.2)
                continue
            last = msgs[-1].metadata if msgs else None
            backlog = bool(last and last.num_pending)
            await self.handle_batch(msgs)
            if self.holding:
                await self.retry_held()

    def _connection(self) -> asyncpg.Connection:
        conn = self._conn
        if conn is None or conn.is_closed():
            raise LostPartition(f"partition {self.partition}: its connection is gone")
        return conn

    # -- a batch -------------------------------------------------------------------------

    async def handle_batch(self, msgs: Sequence[Msg]) -> None:
        """Handle fetched messages in order: one transaction (one commit, one disk flush), a
        savepoint each. Messages waiting for a fact of the batch's hospitals are tried again
        after them. The batch's events are published, then the messages acknowledged."""
        items = [(msg, self._incoming(msg)) for msg in msgs]
        done: list[Handled] = []
        retried: list[tuple[Incoming, Handled]] = []
        if all(i is None or self.dispatcher.ignores(i) for _, i in items):
            # Other services' commands only (referral sees every command, to answer a type
            # nobody owns): nothing to write, so no transaction (BEGIN and COMMIT saved).
            for msg, incoming in items:
                await self._settle(self._connection(), msg, incoming, Handled(IGNORED))
            return
        async with self._lock:
            conn = self._connection()
            appended = False
            try:
                async with self._transaction(conn) as batch:
                    for _, incoming in items:
                        done.append(await self._take(conn, incoming))
                    hospitals = sorted({i.hospital for _, i in items if i is not None})
                    if self.waiting and hospitals:
                        retried = await self._retry(conn, hospitals, settled=False)
                appended = batch.appended
            except Exception as exc:  # the commit or the connection failed: nothing stands
                if conn.is_closed():
                    raise LostPartition(repr(exc)) from exc
                done = [Handled(Outcome(Fate.error), exc, batch_failed=True) for _ in items]
                retried = []
                self.holding = await inbox.held_back(conn, self.partition)
            self._count_waiting(done, retried)
            if appended:  # nothing appended, nothing to publish: no read of the outbox
                await self.relay.publish_pending(conn, self.partition)
            for (msg, incoming), handled in zip(items, done, strict=True):
                await self._settle(conn, msg, incoming, handled)
            for incoming, handled in retried:
                await self._settle(conn, None, incoming, handled)

    @contextlib.asynccontextmanager
    async def _transaction(self, conn: asyncpg.Connection) -> AsyncIterator[Batch]:
        """A batch's transaction; the outbox rows published after the last one are deleted in
        it, on its first message's statement (no round trip, no flush of their own)."""
        lead, taken = self.relay.take_published(self.partition)
        try:
            async with batch_transaction(conn, lead) as batch:
                yield batch
        except BaseException:
            self.relay.keep_published(taken)
            raise
        if not batch.lead_done:
            self.relay.keep_published(taken)

    async def _take(self, conn: asyncpg.Connection, incoming: Incoming | None) -> Handled:
        """One message from the stream: kept behind its hospital's retried message, or handled;
        a passing failure makes it its hospital's head, tried again later."""
        if incoming is None or self.dispatcher.ignores(incoming):
            return Handled(IGNORED)
        if incoming.hospital in self.holding:
            kept = await inbox.hold(conn, incoming)
            return Handled(HELD if kept else Outcome(Fate.duplicate, same_message=True))
        handled = await self._dispatch(conn, incoming)
        exc = handled.error
        if exc is not None and is_transient(exc) and incoming.attempt < self.settings.max_deliver:
            await self._hold_head(conn, incoming, exc)
            return Handled(RETRYING, None, handled.seconds)
        return handled

    async def _hold_head(
        self, conn: asyncpg.Connection, incoming: Incoming, exc: BaseException
    ) -> None:
        failures = incoming.attempt
        retry_at = inbox.retry_time(self.dispatcher.clock.now(), backoff_seconds(failures))
        await inbox.hold_head(conn, self.service, incoming, failures, retry_at)
        self.holding.add(incoming.hospital)
        # The class only: an error's text may quote what the message carried.
        log.warning(
            "hospital_held_back",
            error=type(exc).__name__,
            attempt=failures,
            retry_in=backoff_seconds(failures),
        )

    async def retry_held(self) -> None:
        """Try the heads that are due again; a head that is done releases its hospital's held
        messages, handled in stream order as if they came now (the first that fails for a
        passing reason becomes the new head, and the rest stay behind it)."""
        if not self.holding:
            return
        async with self._lock:
            conn = self._connection()
            done: list[tuple[Incoming, Handled]] = []
            appended = False
            try:
                async with self._transaction(conn) as batch:
                    now = self.dispatcher.clock.now()
                    for hospital in await inbox.due_heads(conn, self.partition, now):
                        done += await self._drain(conn, hospital)
                appended = batch.appended
            except Exception as exc:
                if conn.is_closed():
                    raise LostPartition(repr(exc)) from exc
                log.warning("held_retry_failed", error=type(exc).__name__)
                done = []
                self.holding = await inbox.held_back(conn, self.partition)
            self._count_waiting([h for _, h in done], [])
            if appended:
                await self.relay.publish_pending(conn, self.partition)
            for incoming, handled in done:
                await self._settle(conn, None, incoming, handled)

    async def _drain(
        self, conn: asyncpg.Connection, hospital: str
    ) -> list[tuple[Incoming, Handled]]:
        queue = await inbox.take_queue(conn, hospital)
        self.holding.discard(hospital)
        done = []
        for i, incoming in enumerate(queue):
            if hospital in self.holding:  # a new head: the rest wait behind it again
                for rest in queue[i:]:
                    await inbox.hold(conn, rest)
                break
            done.append((incoming, await self._take(conn, incoming)))
        if hospital not in self.holding:
            await inbox.release(conn, self.service, hospital)
        return done

    async def _dispatch(
        self, conn: asyncpg.Connection, incoming: Incoming | None, settled: bool = False
    ) -> Handled:
        if incoming is None:
            return Handled(IGNORED)
        started = time.perf_counter()
        structlog.contextvars.bind_contextvars(event_type=incoming.type, hospital=incoming.hospital)
        try:
            if tracing.TRACER is None:
                outcome = await self.dispatcher.dispatch(incoming, conn, settled=settled)
            else:
                outcome = await self._dispatch_traced(conn, incoming, settled)
            return Handled(outcome, None, time.perf_counter() - started)
        except Exception as exc:  # transient: retry with back-off, then dead-letter
            if conn.is_closed():
                raise
            return Handled(Outcome(Fate.error), exc, time.perf_counter() - started)
        finally:
            structlog.contextvars.unbind_contextvars("event_type", "hospital", "correlation_id")

    async def _dispatch_traced(
        self, conn: asyncpg.Connection, incoming: Incoming, settled: bool
    ) -> Outcome:
        """`dispatch` in the message's handling span (shared/tracing.py): named by what the
        logs bind, the subject's type and hospital, or "unknown"/"invalid" when they are not
        the platform's."""
        label = incoming.label
        hospital = incoming.hospital if is_hospital_id(incoming.hospital) else "invalid"
        subject = f"post.{hospital}.{incoming.kind}.{label}"
        with tracing.handling(
            self.service, subject, incoming.kind, label, hospital, incoming.body
        ) as span:
            outcome = await self.dispatcher.dispatch(incoming, conn, settled=settled)
            span.finish(outcome.label, reason_code=outcome.reason_code)
            return outcome

    async def _retry(
        self, conn: asyncpg.Connection, hospitals: list[str] | None, settled: bool
    ) -> list[tuple[Incoming, Handled]]:
        retried = []
        # Not settled for a hospital some service holds back: its held message may bring the
        # fact (a RequestReferral retried in referral, a RecordOutreach waiting in records).
        held = await inbox.held_back_anywhere(conn, self.partition) if settled else set()
        for incoming in await inbox.waiting_messages(conn, self.partition, hospitals):
            settled_here = settled and incoming.hospital not in held
            retried.append((incoming, await self._dispatch(conn, incoming, settled_here)))
        return retried

    def _count_waiting(self, done: list[Handled], retried: list[tuple[Incoming, Handled]]) -> None:
        self.waiting += sum(1 for h in done if h.outcome is WAITING)
        self.waiting -= sum(1 for _, h in retried if h.outcome is not WAITING and not h.error)

    async def retry_waiting(self, settle: bool) -> None:
        """Idle: try the waiting messages again; once the platform has settled (nothing of the
        partition pending in any service), the ones still waiting are refused."""
        settled = settle and await self._settled()
        async with self._lock:
            conn = self._connection()
            async with self._transaction(conn) as batch:
                retried = await self._retry(conn, None, settled)
            self._count_waiting([], retried)
            if batch.appended:
                await self.relay.publish_pending(conn, self.partition)
            for incoming, handled in retried:
                await self._settle(conn, None, incoming, handled)

    async def _settled(self) -> bool:
        """Every producing service has sourced `POST` into its work stream, handled all it
        has of this partition and published what followed (a worker acknowledges only then) —
        on two checks in a row, a second apart: a fact of one may be on its way to another."""
        quiet = True
        try:
            for service in PRODUCERS:
                stream = await self.js.stream_info(work_stream(service))
                info = await self.js.consumer_info(
                    work_stream(service), consumer_name(service, self.partition)
                )
                if any(s.lag for s in stream.sources or []) or (
                    info.num_pending or info.num_ack_pending
                ):
                    quiet = False
                    break
        except NotFoundError:  # a service that never ran: what it would answer is pending
            quiet = False
        settled, self._quiet_before = quiet and self._quiet_before, quiet
        return settled

    # -- after the commit --------------------------------------------------------------

    async def _settle(
        self, conn: asyncpg.Connection, msg: Msg | None, incoming: Incoming | None, handled: Handled
    ) -> None:
        """Acknowledge, retry later or dead-letter one message; `msg` is None for one taken
        from ``waiting`` (acknowledged when it was parked)."""
        if incoming is None:  # not a POST subject
            if msg is not None:
                await msg.ack()
            return
        outcome, exc = handled.outcome, handled.error
        structlog.contextvars.bind_contextvars(event_type=incoming.type, hospital=incoming.hospital)
        try:
            if exc is not None:
                passing = handled.batch_failed or is_transient(exc)
                if passing and incoming.attempt < self.settings.max_deliver:
                    # The whole batch failed (the database or NATS): it comes again, in order.
                    # A waiting message stays in ``waiting`` and is tried with the next.
                    log.warning(
                        "handler_failed", error=type(exc).__name__, attempt=incoming.attempt
                    )
                    if msg is not None:
                        await msg.nak(delay=backoff_seconds(incoming.attempt))
                else:
                    # Failed for good (every try), or in a way no retry changes (a parse error,
                    # a limit, a bug this message triggers): dead-lettered and answered now.
                    how = f"failed {incoming.attempt} times" if passing else "failed for good"
                    reason = f"{how}: {type(exc).__name__}"
                    await self.dead_letter(incoming, reason)
                    if incoming.parked_key is not None:
                        async with conn.transaction():
                            await inbox.unpark(conn, incoming.parked_key)
                    if incoming.kind == "cmd":
                        try:
                            await self.dispatcher.answer_unprocessable(conn, incoming, reason)
                            await self.relay.publish_pending(conn, self.partition)
                        except Exception as failed:  # dead-lettered already: go on, never loop
                            log.error("answer_failed", error=type(failed).__name__)
                    outcome = Outcome(Fate.dead_letter, reason)
                    if msg is not None:
                        await msg.ack()
            else:
                if outcome.label is Fate.dead_letter:
                    await self.dead_letter(incoming, outcome.dead_letter_reason)
                if msg is not None:
                    await msg.ack()
            if incoming.kind == "cmd" and outcome.erases_command:
                await self.erase(incoming)
        finally:
            MESSAGES_HANDLED.labels(self.service, incoming.label, outcome.label).inc()
            HANDLER_SECONDS.labels(self.service, incoming.label).observe(handled.seconds)
            structlog.contextvars.unbind_contextvars("event_type", "hospital")

    async def erase(self, incoming: Incoming) -> None:
        """Erase an answered command the platform did not take from `POST` (JetStream
        overwrites it). Its answer and its id in `processed` stay, so a copy sent later is still
        answered once. Accepted commands stay as sent (only validated fields were read)."""
        if incoming.stream_seq is None:
            return
        try:
            await self.js.delete_msg(STREAM_NAME, incoming.stream_seq)
            COMMANDS_ERASED.labels(self.service, incoming.label).inc()
        except NotFoundError:
            pass  # erased already, by a holder that died before its ack
        except Exception as exc:  # the answer stands; the message stays until retention ends
            log.warning("command_not_erased", error=repr(exc)[:200], seq=incoming.stream_seq)

    async def dead_letter(self, incoming: Incoming, reason: str) -> None:
        DEAD_LETTERS.labels(self.service, incoming.label).inc()
        log.error("dead_letter", reason=reason, subject=incoming.subject)
        await self.js.publish(
            dlq_subject(incoming.hospital, incoming.type),
            incoming.body,
            headers={
                "Post-Dead-Letter-Reason": reason[:500],
                "Post-Original-Subject": incoming.subject,
                "Post-Service": self.service,
            },
        )

    def _incoming(self, msg: Msg) -> Incoming | None:
        try:
            subject = original_subject(msg.subject)
            hospital, kind, type_ = parse_subject(subject)
        except (ValueError, IndexError):
            return None
        meta = msg.metadata
        return Incoming(
            subject=subject,
            hospital=hospital,
            kind=kind,
            type=type_,
            body=msg.data,
            stream_seq=source_sequence(msg.headers),
            attempt=meta.num_delivered if meta else 1,
            stored_at=meta.timestamp if meta else None,
        )

    # -- events committed outside a message (HTTP, timers) -----------------------------

    async def _publish_loop(self) -> None:
        """Publish the partition's events committed by others (an HTTP intake, a timer, another
        instance): at once when this process committed them, else within a second."""
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=1.0)
            self.wake.clear()
            try:
                async with self._lock:
                    await self.relay.publish_pending(self._connection(), self.partition)
            except LostPartition:
                self.stop.set()
                return
            except Exception as exc:  # NATS away for a moment: the rows wait for the next try
                log.warning("outbox_publish_failed", error=repr(exc)[:200])

    async def report_lag(self) -> None:
        info = await self.js.consumer_info(
            work_stream(self.service), consumer_name(self.service, self.partition)
        )
        labels = (self.service, str(self.partition))
        CONSUMER_PENDING.labels(*labels).set(info.num_pending or 0)
        CONSUMER_ACK_PENDING.labels(*labels).set(info.num_ack_pending or 0)
        HOSPITALS_HELD_BACK.labels(*labels).set(len(self.holding))


class Ownership:
    """This instance's share of the service's partitions."""

    def __init__(
        self,
        service: str,
        dispatcher: Dispatcher,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        settings: Settings,
        http_port: int,
    ) -> None:
        self.service = service
        self.dispatcher = dispatcher
        self.pool = pool
        self.js = js
        self.settings = settings
        self.http_port = http_port
        self.instance = uuid.uuid4().hex[:12]
        self.workers: dict[int, PartitionWorker] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self.running = False
        # Spread instances that start together over different partitions first.
        start = int(self.instance, 16) % PARTITIONS
        self._order = [(start + i) % PARTITIONS for i in range(PARTITIONS)]

    def held(self) -> list[int]:
        return sorted(p for p, w in self.workers.items() if w.held)

    def wake(self, partition: int) -> None:
        worker = self.workers.get(partition)
        if worker is not None:
            worker.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        self.running = True
        free_before: set[int] = set()
        try:
            while not stop.is_set():
                free_before = await self._rebalance(free_before)
                if await sleep_or_stop(stop, self.settings.rebalance_seconds):
                    break
        finally:
            self.running = False
            await self.release_all()

    async def _rebalance(self, free_before: set[int]) -> set[int]:
        for p, task in list(self._tasks.items()):
            if task.done():  # lost, released, or never got the lock
                del self._tasks[p], self.workers[p]
        async with self.pool.acquire() as conn:
            await conn.execute(HEARTBEAT_SQL, self.instance, self.http_port)
            live = await conn.fetchval(LIVE_SQL, self.settings.lease_seconds)
            held = await held_partitions(conn, self.service)
        target = fair_share(live)
        mine = [p for p in self._order if p in self.workers]
        free = {p for p in range(PARTITIONS) if p not in held and p not in self.workers}
        if len(mine) > target:
            for p in mine[target:]:
                self.workers[p].stop.set()  # handed back after its current batch
        else:
            wanted = [p for p in self._order if p in free][: target - len(mine)]
            # A partition free two rounds running has nobody: take it whatever the share.
            wanted += [p for p in self._order if p in free & free_before and p not in wanted]
            for p in wanted:
                self._start(p)
        return free

    def _start(self, partition: int) -> None:
        worker = PartitionWorker(
            self.service, partition, self.dispatcher, self.js, self.settings, self.instance
        )
        self.workers[partition] = worker

        async def run() -> None:
            try:
                await worker.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("partition_lost", partition=partition, error=repr(exc)[:300])

        self._tasks[partition] = asyncio.create_task(run(), name=f"{self.service}:p{partition}")

    async def release_all(self) -> None:
        for worker in self.workers.values():
            worker.stop.set()
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self.workers.clear()
        try:
            await self.pool.execute("DELETE FROM instances WHERE instance_id = $1", self.instance)
        except Exception as exc:  # the row ages out of the lease anyway
            log.debug("instance_row_left", error=repr(exc)[:200])

    async def report_lag(self) -> None:
        for worker in list(self.workers.values()):
            if worker.held:
                await worker.report_lag()
