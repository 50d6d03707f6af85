"""Forgetting a physician (CONTRACT.md 1.1): `ForgetPhysician`, retention, and the stream.

A forget has two halves (docs/decisions.md, "Forgetting a physician"):

1. **The stores, in one transaction** (`forget`): the referral service's rows and stored events
   that name the id (as physician or as referrer) get a new opaque ``forget_id`` in its place,
   `PhysicianForgotten` is appended with the referrals that named it (so every other service
   rewrites its own rows by referral id, never told the id again), and a job is queued with
   what the stream still holds. All of it commits together, or none of it does.
2. **The stream, after the commit** (`Scrubber`): the job reads the hospital's messages that
   can name a physician, publishes a redacted copy of each of the physician's
   `ReferralCreated` (the same CloudEvents id: a replay or a rebuild still finds the referral,
   a consumer that saw it already sees a duplicate), then erases (JetStream overwrites) the
   original, the commands that named the id and the `ForgetPhysician` itself. The job row,
   the one place the id is kept meanwhile, is deleted in the transaction that holds it locked,
   once everything is erased: a crash or a frozen instance leaves it to the next holder, and
   every step is safe to repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge, Histogram

from shared import limits
from shared.contracts import (
    STREAM_NAME,
    ForgetPhysician,
    PhysicianForgotten,
    cmd_subject,
    dlq_subject,
    evt_subject,
)
from shared.unit_of_work import NotYetKnown, UnitOfWork

if TYPE_CHECKING:
    from shared.service import Service

log = structlog.get_logger()

FORGET_PREFIX = "forgotten-"

FORGOTTEN = Counter(
    "post_referral_physicians_forgotten_total",
    "Physicians forgotten, by what asked (command: ForgetPhysician; retention: the sweep).",
    ["trigger"],
)
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


def new_forget_id() -> str:
    """Opaque, random: nothing about the physician can be computed from it."""
    return f"{FORGET_PREFIX}{uuid.uuid4().hex}"


# --- the stores: one transaction ----------------------------------------------------------------


async def forget_physician(cmd: ForgetPhysician, uow: UnitOfWork) -> None:
    """The command. It waits while an earlier `RequestReferral` naming the id waits for its
    department (stream order: that referral is among what is forgotten, or refused first)."""
    if uow.stream_seq is not None and await _earlier_request_waits(uow, cmd.physician_id):
        raise NotYetKnown("an earlier referral of this physician is waiting")
    await forget(uow, cmd.physician_id, cmd.requested_on, command_seq=uow.stream_seq)
    FORGOTTEN.labels("command").inc()


async def _earlier_request_waits(uow: UnitOfWork, physician_id: str) -> bool:
    rows = await uow.conn.fetch(
        "SELECT body FROM waiting WHERE hospital = $1 AND subject = $2 AND stream_seq < $3",
        uow.hospital,
        cmd_subject(uow.hospital, "RequestReferral"),
        uow.stream_seq,
    )
    return any(_names(_data(bytes(r["body"])), physician_id) for r in rows)


async def forget(
    uow: UnitOfWork, physician_id: str, requested_on: date, *, command_seq: int | None
) -> PhysicianForgotten:
    """Rewrite every row and stored event of the hospital that names `physician_id`, append
    `PhysicianForgotten` and queue the stream's job, in `uow`'s transaction."""
    conn, hospital = uow.conn, uow.hospital
    forget_id = new_forget_id()
    as_physician, as_referrer = await _rewrite(conn, hospital, physician_id, forget_id)
    event = PhysicianForgotten(
        hospital=hospital,
        forget_id=forget_id,
        requested_on=requested_on,
        referral_ids=as_physician,
        referred_ids=as_referrer,
    )
    await uow.append(f"forget:{hospital}:{forget_id}", 0, [event])
    await conn.execute(
        "INSERT INTO forget_jobs (forget_id, hospital, physician_id, command_seq, referral_ids,"
        " referred_ids) VALUES ($1, $2, $3, $4, $5, $6)",
        forget_id,
        hospital,
        physician_id,
        command_seq,
        as_physician,
        as_referrer,
    )
    log.info(
        "physician_forgotten",
        forget_id=forget_id,
        referrals=len(as_physician),
        referred=len(as_referrer),
    )
    SCRUBBER_WAKE.set()
    return event


async def _rewrite(
    conn: asyncpg.Connection,
    hospital: str,
    physician_id: str,
    forget_id: str,
    only: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """The stores' half of a forget: `forget_id` in place of `physician_id` in the rows and
    stored creations of the hospital (of the referrals `only`, when given); returns the
    referrals that named it as the physician and as the referrer."""
    # A safety event's id goes with the physician: the FHIR referral ids are a hash of it and
    # the physician's id.
    as_physician = await _rename(
        conn, hospital, "physician_id", physician_id, forget_id, {"safety_event_id": None}, only
    )
    as_referrer = await _rename(conn, hospital, "referrer_id", physician_id, forget_id, {}, only)
    if as_physician:
        await conn.execute(
            "DELETE FROM safety_event_referrals WHERE hospital = $1 AND referral_id = ANY($2)",
            hospital,
            as_physician,
        )
    if as_referrer:
        # A safety event without an id is known by who reported it and when.
        await conn.execute(
            """
            UPDATE safety_event_referrals SET safety_key = 'by:' || $3 || substr(safety_key,
                length($4) + 4)
            WHERE hospital = $1 AND referral_id = ANY($2::text[])
              AND left(safety_key, length($4) + 4) = 'by:' || $4 || '@'
            """,
            hospital,
            as_referrer,
            forget_id,
            physician_id,
        )
    return as_physician, as_referrer


async def physician_forgotten(event: PhysicianForgotten, uow: UnitOfWork) -> None:
    """Our own `PhysicianForgotten`, read back from the stream. Normally its referrals carry
    the `forget_id` already and this does nothing. After PostgreSQL was restored from a backup
    taken before the forget, they name the physician again (the backup is the one place the id
    is left): the forget is done again, by the event's referral ids alone, with its own
    `forget_id`, and a job erases whatever the stream may still hold (docs/decisions.md,
    "Backup and restore")."""
    ids = sorted({*event.referral_ids, *event.referred_ids})
    if not ids:
        return
    rows = await uow.conn.fetch(
        "SELECT referral_id, physician_id, referrer_id FROM referrals"
        " WHERE hospital = $1 AND referral_id = ANY($2::text[])",
        uow.hospital,
        ids,
    )
    named = {r["physician_id"] for r in rows if r["referral_id"] in event.referral_ids}
    named |= {r["referrer_id"] for r in rows if r["referral_id"] in event.referred_ids}
    named -= {None, event.forget_id}
    for physician_id in sorted(named):
        as_physician, as_referrer = await _rewrite(
            uow.conn, uow.hospital, physician_id, event.forget_id, ids
        )
        await uow.conn.execute(
            "INSERT INTO forget_jobs (forget_id, hospital, physician_id, command_seq,"
            " referral_ids, referred_ids) VALUES ($1, $2, $3, NULL, $4, $5)"
            " ON CONFLICT (forget_id) DO NOTHING",
            event.forget_id,
            uow.hospital,
            physician_id,
            as_physician,
            as_referrer,
        )
        log.info("physician_forgotten_again", forget_id=event.forget_id)
        SCRUBBER_WAKE.set()


async def _rename(
    conn: asyncpg.Connection,
    hospital: str,
    column: str,
    old: str,
    new: str,
    also: dict[str, Any],
    only: Sequence[str] | None = None,
) -> list[str]:
    """`column` (physician_id or referrer_id) from `old` to `new` in the referral rows (of the
    referrals `only`, when given) and in their stored creations (the referral's own and any
    repeat's copy), with `also` merged into those; returns the referrals it named."""
    rows = await conn.fetch(
        f"UPDATE referrals SET {column} = $3 WHERE hospital = $1 AND {column} = $2"
        " AND ($4::text[] IS NULL OR referral_id = ANY($4::text[])) RETURNING referral_id",
        hospital,
        old,
        new,
        None if only is None else list(only),
    )
    referrals = sorted(r["referral_id"] for r in rows)
    if referrals:
        await conn.execute(
            """
            UPDATE events SET data = data || jsonb_build_object($4::text, $3::text) || $6::jsonb
            WHERE event_type = 'ReferralCreated' AND metadata->>'hospital' = $1
              AND data->>'referral_id' = ANY($2::text[]) AND data->>$4 = $5
            """,
            hospital,
            referrals,
            new,
            column,
            old,
            also,
        )
    return referrals


# --- the stream: a job per forget ---------------------------------------------------------------


class Action(Enum):
    keep = "keep"
    erase = "erase"
    redact = "redact"  # publish the redacted copy, then erase


@dataclass(frozen=True)
class Job:
    forget_id: str
    hospital: str
    physician_id: str
    command_seq: int | None
    referral_ids: frozenset[str]
    referred_ids: frozenset[str]

    @classmethod
    def of(cls, row: asyncpg.Record) -> Job:
        return cls(
            row["forget_id"],
            row["hospital"],
            row["physician_id"],
            row["command_seq"],
            frozenset(row["referral_ids"]),
            frozenset(row["referred_ids"]),
        )

    def subjects(self) -> list[str]:
        """Where the hospital's messages can name a physician."""
        found = [
            cmd_subject(self.hospital, "RequestReferral"),
            evt_subject(self.hospital, "ReferralCreated"),
            dlq_subject(self.hospital, ">"),
        ]
        if self.command_seq is not None:
            found.append(cmd_subject(self.hospital, "ForgetPhysician"))
        return found

    def decide(self, subject: str, seq: int, body: bytes) -> Action:
        """What to do with one message; pure. Only what is certainly the forgotten physician
        goes: a later referral of the same id is a new physician and stays."""
        kind, type_ = subject.split(".")[2:4]
        if kind == "dlq":  # as it came, maybe not even JSON: the id as a whole token
            return Action.erase if self._token().search(body) else Action.keep
        data = _data(body)
        if type_ == "ForgetPhysician":
            ours = self.command_seq is not None and seq <= self.command_seq
            named = data.get("physician_id") == self.physician_id
            return Action.erase if ours and named else Action.keep
        if not self._of_the_forgotten(data):
            return Action.keep
        return Action.redact if kind == "evt" else Action.erase

    def redacted(self, body: bytes) -> bytes:
        """The `ReferralCreated` with the forget's id in place of the physician's."""
        ce = json.loads(body)
        data = ce["data"]
        if data.get("referral_id") in self.referral_ids and data.get("physician_id") == (
            self.physician_id
        ):
            data["physician_id"] = self.forget_id
            data["safety_event_id"] = None
        if data.get("referral_id") in self.referred_ids and data.get("referrer_id") == (
            self.physician_id
        ):
            data["referrer_id"] = self.forget_id
        return json.dumps(ce, separators=(",", ":")).encode()

    def _of_the_forgotten(self, data: dict[str, Any]) -> bool:
        referral, physician = data.get("referral_id"), self.physician_id
        return (referral in self.referral_ids and data.get("physician_id") == physician) or (
            referral in self.referred_ids and data.get("referrer_id") == physician
        )

    def _token(self) -> re.Pattern[bytes]:
        return re.compile(
            rb"(?<![A-Za-z0-9_-])" + re.escape(self.physician_id.encode()) + rb"(?![A-Za-z0-9_-])"
        )


def _data(body: bytes) -> dict[str, Any]:
    try:
        # A command too deep to decode (refused, maybe not yet erased) names nobody we read.
        limits.check(body, limits.EVENT)
        data = json.loads(body).get("data")
    except (ValueError, AttributeError, limits.LimitExceeded):
        return {}
    return data if isinstance(data, dict) else {}


def _names(data: dict[str, Any], physician_id: str) -> bool:
    return physician_id in (data.get("physician_id"), data.get("referrer_id"))


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


# The handler sets it when a forget commits its job; the scrubber also looks once a second.
SCRUBBER_WAKE = asyncio.Event()
# A job's transaction is idle while the stream is read; a frozen holder loses it after this.
JOB_IDLE_TIMEOUT = "30s"
# Jobs of one hospital erased in one read of its messages.
JOBS_PER_SCAN = 500


async def scrub_next(service: Service) -> bool:
    """Run the oldest job nobody is running, with the other jobs of its hospital nobody is
    running; False when there is none."""
    async with service.pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL idle_in_transaction_session_timeout = '{JOB_IDLE_TIMEOUT}'")
        first = await conn.fetchval(
            "SELECT hospital FROM forget_jobs ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT 1"
        )
        if first is None:
            return False
        rows = await conn.fetch(
            "SELECT *, extract(epoch FROM now() - created_at) AS age FROM forget_jobs"
            " WHERE hospital = $1 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED",
            first,
            JOBS_PER_SCAN,
        )
        jobs = [Job.of(row) for row in rows]
        started = time.perf_counter()
        counts = await scrub(service.js, jobs, conn, service.settings.forget_erase_delay)
        await conn.execute(
            "DELETE FROM forget_jobs WHERE forget_id = ANY($1::text[])",
            [job.forget_id for job in jobs],
        )
    took = time.perf_counter() - started
    for row in rows:
        JOB_SECONDS.observe(float(row["age"]) + took)
    log.info("forget_stream_erased", forget_ids=[job.forget_id for job in jobs], **counts)
    return True


async def scrubber(service: Service) -> None:
    """Background: run the forget jobs, at once when one is queued here, else within a
    second (one queued by another instance, or left by one that died)."""
    while True:
        try:
            while await scrub_next(service):
                pass
            async with service.pool.acquire() as conn:
                JOBS_PENDING.set(await conn.fetchval("SELECT count(*) FROM forget_jobs"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # NATS or the database away for a moment: the job waits
            log.warning("forget_job_failed", error=repr(exc)[:300])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(SCRUBBER_WAKE.wait(), timeout=1.0)
        SCRUBBER_WAKE.clear()


# --- retention ---------------------------------------------------------------------------------

# Every id the hospital's referrals name (as physician or referrer) whose referrals all closed
# (a last outreach or interaction, business date) before the cutoff; not a forget's own id.
RETENTION_SQL = """
WITH named AS (
    SELECT physician_id AS id, last_contact_on FROM referrals WHERE hospital = $1
    UNION ALL
    SELECT referrer_id, last_contact_on FROM referrals
    WHERE hospital = $1 AND referrer_id IS NOT NULL
)
SELECT id FROM named
WHERE left(id, length($3)) <> $3
GROUP BY id
HAVING bool_and(last_contact_on IS NOT NULL AND last_contact_on < $2)
ORDER BY id
LIMIT $4
"""
RETENTION_BATCH = 500


async def set_retention(conn: asyncpg.Connection, hospital: str, days: int | None) -> None:
    """`postctl hospital retention`: `days` None removes it."""
    if days is None:
        await conn.execute("DELETE FROM retention WHERE hospital = $1", hospital)
        return
    await conn.execute(
        "INSERT INTO retention (hospital, days) VALUES ($1, $2)"
        " ON CONFLICT (hospital) DO UPDATE SET days = EXCLUDED.days, set_at = now()",
        hospital,
        days,
    )


async def expired_ids(
    conn: asyncpg.Connection, hospital: str, cutoff: date, limit: int = RETENTION_BATCH
) -> list[str]:
    rows = await conn.fetch(RETENTION_SQL, hospital, cutoff, FORGET_PREFIX, limit)
    return [r["id"] for r in rows]


async def sweep_retention(service: Service) -> int:
    """Forget every physician past their hospital's retention; the holder of each hospital's
    partition sweeps it (several instances: one sweep per hospital). Returns how many."""
    today = service.clock.now().date()
    forgotten = 0
    async with service.pool.acquire() as conn:
        settings = await conn.fetch("SELECT hospital, days FROM retention ORDER BY hospital")
    for row in settings:
        hospital = row["hospital"]
        if not service.owns(hospital):
            continue
        cutoff = today - timedelta(days=row["days"])
        async with service.pool.acquire() as conn:
            ids = await expired_ids(conn, hospital, cutoff)
        for physician_id in ids:
            async with service.unit_of_work(hospital) as uow:
                # Under the hospital's lock and checked again: one sweep forgets each once.
                await uow.conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"retention:{hospital}"
                )
                if not await _still_expired(uow.conn, hospital, physician_id, cutoff):
                    continue
                await forget(uow, physician_id, today, command_seq=None)
            FORGOTTEN.labels("retention").inc()
            forgotten += 1
    return forgotten


async def _still_expired(
    conn: asyncpg.Connection, hospital: str, physician_id: str, cutoff: date
) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT bool_and(last_contact_on IS NOT NULL AND last_contact_on < $3)"
            " FROM referrals WHERE hospital = $1 AND (physician_id = $2 OR referrer_id = $2)",
            hospital,
            physician_id,
            cutoff,
        )
    )


async def retention_timer(service: Service) -> None:
    """Background: the retention sweep, every `retention_interval` seconds."""
    while True:
        try:
            await sweep_retention(service)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database away for a moment: next time
            log.warning("retention_sweep_failed", error=repr(exc)[:300])
        await asyncio.sleep(service.settings.retention_interval)
