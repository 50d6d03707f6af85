"""Hospitals in partitions: which instance of a service handles which hospital's messages.

The platform hashes a hospital id into one of `PARTITIONS` partitions with the function NATS's
subject mapping uses (`partition(n, token)`: FNV-1a, 32 bits, modulo n). Each service reads the
`POST` stream through a work stream of its own, `POST_WORK_<SERVICE>`: JetStream sources into it
the subjects the service handles, with the partition prepended to the subject
(`work.<service>.<partition>.<hospital>.<kind>.<Type>`), and keeps a message only until it is
acknowledged (work-queue retention). One durable pull consumer per partition reads it in stream
order.

An instance handles a partition while it holds the PostgreSQL session advisory lock
(service, partition) on a connection of its own, and it writes that partition's effects on that
very connection. The lock is the lease and the fence at once: another instance can take the
partition only once that session has ended, and a session that has ended can commit nothing.
A killed process's session ends when its socket closes; a frozen one's when PostgreSQL's
`idle_session_timeout` / `idle_in_transaction_session_timeout` (the lease, `POST_LEASE_SECONDS`)
runs out. See docs/decisions.md, "Scale-out".
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig, StreamSource, SubjectTransform
from nats.js.errors import BadRequestError, NotFoundError

from shared.contracts import STREAM_NAME

log = structlog.get_logger()

# Fixed for a deployment: the work streams' subjects and the outbox rows carry it. Changing it
# means draining every work stream and outbox first (deploy/README.md).
PARTITIONS = 8


def partition_of(hospital: str, partitions: int = PARTITIONS) -> int:
    """The partition of a hospital: FNV-1a (32 bits) of its id, modulo `partitions`, as NATS's
    `{{partition(n,1)}}` subject mapping computes it."""
    h = 0x811C9DC5
    for byte in hospital.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def lock_key(service: str) -> int:
    """The first key of the service's (service, partition) advisory locks: a stable int32."""
    return zlib.crc32(f"post-partitions:{service}".encode()) - 2**31


def work_stream(service: str) -> str:
    return f"POST_WORK_{service.upper()}"


def work_filter(service: str, partition: int) -> str:
    return f"work.{service}.{partition}.>"


def consumer_name(service: str, partition: int) -> str:
    return f"{service}-p{partition}"


def original_subject(work_subject: str) -> str:
    """`work.<service>.<p>.<hospital>.<kind>.<Type>` -> `post.<hospital>.<kind>.<Type>`."""
    return "post." + work_subject.split(".", 3)[3]


def source_sequence(headers: dict[str, str] | None) -> int | None:
    """The message's sequence in `POST`, from the header JetStream adds when it sources one
    (`Nats-Stream-Source: POST <seq> ...`)."""
    value = (headers or {}).get("Nats-Stream-Source", "")
    parts = value.split(" ", 2)
    if len(parts) >= 2 and parts[0] == STREAM_NAME and parts[1].isdigit():
        return int(parts[1])
    return None


def _transforms(service: str, subjects: Iterable[str]) -> list[SubjectTransform]:
    """`post.*.cmd.X` -> `work.<service>.{{partition(P,1)}}.{{wildcard(1)}}.cmd.X`; a subject
    whose type is a wildcard keeps it (`post.*.cmd.*`)."""
    transforms = []
    for subject in subjects:
        _, _, kind, type_ = subject.split(".")
        tail = "{{wildcard(2)}}" if type_ == "*" else type_
        dest = f"work.{service}.{{{{partition({PARTITIONS},1)}}}}.{{{{wildcard(1)}}}}.{kind}.{tail}"
        transforms.append(SubjectTransform(src=subject, dest=dest))
    return transforms


async def ensure_work_stream(
    js: JetStreamContext,
    service: str,
    subjects: list[str],
    replicas: int,
    *,
    start_seq: int | None = None,
    start_time: datetime | None = None,
) -> None:
    """The service's work stream, sourcing `subjects` of `POST` (created, or widened when the
    service gained a handler). A new one sources `POST` from its first message (a new service
    sees the whole history), or from `start_seq` / `start_time`."""
    source = StreamSource(
        name=STREAM_NAME,
        subject_transforms=_transforms(service, subjects),
        opt_start_seq=start_seq,
        opt_start_time=start_time,
    )
    name = work_stream(service)
    config = StreamConfig(
        name=name,
        subjects=[],
        sources=[source],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=120.0,
    )
    for _ in range(240):
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            try:
                await js.add_stream(config)
                return
            except BadRequestError:  # another instance is creating it (a cluster: for a while)
                await asyncio.sleep(0.25)
                continue
        current = {t.src for s in info.config.sources or [] for t in s.subject_transforms or []}
        if current != set(subjects):
            log.info("work_stream_updated", stream=name, subjects=sorted(subjects))
            await js.update_stream(config)
        return
    raise TimeoutError(f"the work stream {name} could be neither found nor created")


def fair_share(live_instances: int, partitions: int = PARTITIONS) -> int:
    return math.ceil(partitions / max(live_instances, 1))


HEARTBEAT_SQL = """
INSERT INTO instances (instance_id, http_port, heartbeat_at) VALUES ($1, $2, clock_timestamp())
ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = clock_timestamp(), http_port = $2
"""
# Instances seen within the lease, and the partitions some session of this database holds.
LIVE_SQL = """
SELECT count(*) FROM instances WHERE heartbeat_at > clock_timestamp() - make_interval(secs => $1)
"""
HELD_SQL = """
SELECT l.objid::int AS partition, a.application_name AS holder
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid = $1::oid AND l.database = (SELECT oid FROM pg_database
                                                  WHERE datname = current_database())
ORDER BY 1
"""


def _as_oid(key: int) -> int:
    """pg_locks shows the advisory lock's first int4 key as an oid (unsigned)."""
    return key & 0xFFFFFFFF


async def held_partitions(conn: asyncpg.Connection, service: str) -> dict[int, str]:
    """Partition -> the application_name of the session holding it (`<service>:<instance>`)."""
    rows = await conn.fetch(HELD_SQL, _as_oid(lock_key(service)))
    return {r["partition"]: r["holder"] for r in rows}


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds`, or less if `stop` is set; True when stopping."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


async def service_lag(js: JetStreamContext, service: str) -> tuple[int, int]:
    """(messages not yet delivered, delivered but not acknowledged) over the service's work
    stream: what it has not handled yet. Messages `POST` holds that the work stream has not
    sourced yet count as not delivered; a partition without its consumer yet counts what its
    stream holds for it."""
    stream = await js.stream_info(work_stream(service))
    pending = sum(s.lag or 0 for s in stream.sources or [])
    unacked = 0
    for partition in range(PARTITIONS):
        try:
            info = await js.consumer_info(work_stream(service), consumer_name(service, partition))
        except NotFoundError:
            subjects = await js.stream_info(
                work_stream(service), subjects_filter=work_filter(service, partition)
            )
            pending += sum((subjects.state.subjects or {}).values())
            continue
        pending += info.num_pending or 0
        unacked += info.num_ack_pending or 0
    return pending, unacked


async def service_subjects(js: JetStreamContext, service: str) -> list[str]:
    """The subjects of `POST` a service handles, as its work stream sources them."""
    stream = await js.stream_info(work_stream(service))
    return [t.src for s in stream.config.sources or [] for t in s.subject_transforms or []]


async def ownership(
    conn: asyncpg.Connection, js: JetStreamContext, services: Iterable[str]
) -> dict:
    """Who holds what, for an operator (`postctl status`): per service, each partition's holder
    (`<service>:<instance>`, or None) and lag, and the registered hospitals of each partition."""
    info = await js.stream_info(STREAM_NAME, subjects_filter="post.*.evt.HospitalRegistered")
    hospitals: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}
    for subject in sorted(info.state.subjects or {}):
        hospital = subject.split(".")[1]
        hospitals[partition_of(hospital)].append(hospital)
    report: dict[str, Any] = {"partitions": PARTITIONS, "hospitals": hospitals, "services": {}}
    for service in services:
        held = await held_partitions(conn, service)
        try:
            pending, unacked = await service_lag(js, service)
        except NotFoundError:
            pending = unacked = -1
        report["services"][service] = {
            "holders": {p: held.get(p) for p in range(PARTITIONS)},
            "pending": pending,
            "unacknowledged": unacked,
        }
    return report
