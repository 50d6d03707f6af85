"""The referral service's background work: the forget jobs' stream scrubber and the retention
sweep.

**The stream, after a forget's commit** (`Scrubber`): a job reads the hospital's messages that
can name a physician, publishes a redacted copy of each of the physician's `ReferralCreated`
(the same CloudEvents id: a replay or a rebuild still finds the referral, a consumer that saw
it already sees a duplicate), then erases (JetStream overwrites) the original, the commands
that named the id and the `ForgetPhysician` itself. The job row, the one place the id is kept
meanwhile, is deleted in the transaction that holds it locked, once everything is erased: a
crash or a frozen instance leaves it to the next holder, and every step is safe to repeat.
Which message goes is decided in domain/forgetting.py (pure).

**Retention** (`RetentionSweep`): every physician whose referrals all closed before their
hospital's retention is forgotten as by `ForgetPhysician` (handlers.forget).

Each is built with what it uses (app.py wires them), never the whole service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import timedelta

import asyncpg
import structlog
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge, Histogram

from services.referral import handlers, store
from services.referral.domain.forgetting import Action, Job
from shared.clock import Clock
from shared.contracts import STREAM_NAME
from shared.unit_of_work import UnitOfWork

log = structlog.get_logger()

ERASED = Counter(
    "post_referral_forget_erased_total",
    "Messages of the POST stream erased by forget jobs, by subject kind and type.",
    ["kind", "type"],
)
JOBS_PENDING = Gauge(
    "post_referral_forget_jobs_pending",
    "Forget jobs whose stream messages are not all erased yet (the id is kept until then);"
    " every referral instance reports the same count: take the max, not the sum.",
)
JOB_SECONDS = Histogram(
    "post_referral_forget_job_seconds",
    "From a forget's commit to the last of its stream messages erased.",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)

# A job's transaction is idle while the stream is read; a frozen holder loses it after this.
JOB_IDLE_TIMEOUT = "30s"
# Jobs of one hospital erased in one read of its messages.
JOBS_PER_SCAN = 500

UnitOfWorkFactory = Callable[[str], AbstractAsyncContextManager[UnitOfWork]]


# --- the stream: a job per forget ---------------------------------------------------------------


async def _messages(
    js: JetStreamContext, subject: str, last_seq: int
) -> AsyncIterator[tuple[str, int, bytes]]:
    """The stream's messages on `subject` up to `last_seq`: (subject, sequence, body). A
    consumer of the reader's own, without acknowledgements, removed when done."""
    sub = await js.pull_subscribe(
        subject,
        stream=STREAM_NAME,
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=60,
            mem_storage=True,
        ),
    )
    try:
        # What is there now, asked for exactly: a fetch of more waits out its whole timeout.
        remaining = (await sub.consumer_info()).num_pending or 0
        while remaining > 0:
            try:
                msgs = await sub.fetch(min(500, remaining), timeout=5)
            except (NatsTimeoutError, TimeoutError):
                return  # fewer than counted: erased meanwhile
            remaining -= len(msgs)
            for m in msgs:
                seq = m.metadata.sequence.stream
                if seq > last_seq:
                    return
                yield m.subject, seq, m.data
    finally:
        try:
            await sub.unsubscribe()
        except Exception as exc:  # it expires by itself (inactive_threshold)
            log.debug("scan_consumer_left", error=repr(exc)[:200])


async def scrub(
    js: JetStreamContext,
    jobs: Sequence[Job],
    keepalive: asyncpg.Connection,
    delay: float = 0.0,
) -> dict[str, int]:
    """Erase what the stream holds of the forgotten physicians (jobs of one hospital, read
    once for all of them: a retention sweep queues many); safe to run again."""
    last_seq = (await js.stream_info(STREAM_NAME)).state.last_seq
    counts = {"erased": 0, "republished": 0, "scanned": 0}
    subjects = sorted({s for job in jobs for s in job.subjects()})
    for subject in subjects:
        async for found, seq, body in _messages(js, subject, last_seq):
            counts["scanned"] += 1
            if counts["scanned"] % 1000 == 0:
                await keepalive.execute("SELECT 1")  # not an idle transaction: still working
            actions = [(job, job.decide(found, seq, body)) for job in jobs]
            redacting = [job for job, action in actions if action is Action.redact]
            if redacting:
                copy = body
                for job in redacting:
                    copy = job.redacted(copy)
                ce_id = json.loads(body)["id"]
                await js.publish(
                    found,
                    copy,
                    headers={
                        # A run killed after this publish repeats it: deduplicated by JetStream.
                        "Nats-Msg-Id": f"{ce_id}:{redacting[0].forget_id}",
                        "Post-Forgotten": redacting[0].forget_id,
                    },
                )
                counts["republished"] += 1
            elif all(action is Action.keep for _, action in actions):
                continue
            try:
                await js.delete_msg(STREAM_NAME, seq)  # no_erase unset: JetStream overwrites it
            except NotFoundError:
                continue  # erased already, by a run that died before it finished
            kind, type_ = found.split(".")[2:4]
            ERASED.labels(kind, type_ if kind != "dlq" else "dead_letter").inc()
            counts["erased"] += 1
            if delay:
                await asyncio.sleep(delay)
    return counts


class Scrubber:
    """Runs the forget jobs: at once when one is queued here (`wake`), else within a second
    (one queued by another instance, or left by one that died). It owns its wake-up."""

    def __init__(self) -> None:
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A forget queued its job here (handlers.forget_physician, the retention sweep)."""
        self._wake.set()

    async def scrub_next(
        self, pool: asyncpg.Pool, js: JetStreamContext, erase_delay: float = 0.0
    ) -> bool:
        """Run the oldest job nobody is running, with the other jobs of its hospital nobody
        is running; False when there is none."""
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"SET LOCAL idle_in_transaction_session_timeout = '{JOB_IDLE_TIMEOUT}'"
            )
            locked = await store.lock_next_jobs(conn, JOBS_PER_SCAN)
            if not locked:
                return False
            jobs = [job for job, _ in locked]
            started = time.perf_counter()
            counts = await scrub(js, jobs, conn, erase_delay)
            await store.delete_jobs(conn, [job.forget_id for job in jobs])
        took = time.perf_counter() - started
        for _, age in locked:
            JOB_SECONDS.observe(age + took)
        log.info("forget_stream_erased", forget_ids=[job.forget_id for job in jobs], **counts)
        return True

    async def run(self, pool: asyncpg.Pool, js: JetStreamContext, erase_delay: float) -> None:
        """Background, forever."""
        while True:
            try:
                while await self.scrub_next(pool, js, erase_delay):
                    pass
                JOBS_PENDING.set(await store.jobs_pending(pool))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS or the database away for a moment: the job waits
                log.warning("forget_job_failed", error=repr(exc)[:300])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()


# --- retention ---------------------------------------------------------------------------------


class RetentionSweep:
    """Forgets every physician past their hospital's retention; the holder of each hospital's
    partition sweeps it (several instances: one sweep per hospital)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        unit_of_work: UnitOfWorkFactory,
        clock: Clock,
        owns: Callable[[str], bool],
        queued: Callable[[], None],
    ) -> None:
        self.pool = pool
        self.unit_of_work = unit_of_work
        self.clock = clock
        self.owns = owns
        self.queued = queued  # a forget's job was queued (wakes the scrubber)

    async def sweep(self) -> int:
        """One sweep; returns how many were forgotten."""
        today = self.clock.now().date()
        forgotten = 0
        for hospital, days in await store.retentions(self.pool):
            if not self.owns(hospital):
                continue
            cutoff = today - timedelta(days=days)
            for physician_id in await store.expired_ids(self.pool, hospital, cutoff):
                async with self.unit_of_work(hospital) as uow:
                    # Under the hospital's lock and checked again: one sweep forgets each once.
                    await store.lock_retention(uow.conn, hospital)
                    if not await store.still_expired(uow.conn, hospital, physician_id, cutoff):
                        continue
                    await handlers.forget(uow, physician_id, today, command_seq=None)
                handlers.count_forgotten("retention")
                self.queued()
                forgotten += 1
        return forgotten

    async def run(self, interval: float) -> None:
        """Background: a sweep every `interval` seconds, forever."""
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database away for a moment: next time
                log.warning("retention_sweep_failed", error=repr(exc)[:300])
            await asyncio.sleep(interval)
