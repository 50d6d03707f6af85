"""What every section of the harness shares: the embedded servers, timing, percentiles, RSS,
and the sample payload (a real contract event, so sizes match what the platform stores)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats

from shared.contracts import Rank, ReferralCreated, encode, evt_subject, make_cloudevent
from shared.runtime import SERVICES, NatsServer, Platform, free_port

Result = dict[str, Any]


@dataclass
class Section:
    """One section's measurements: `figures` are raw numbers, `rows` the table lines."""

    name: str
    figures: Result = field(default_factory=dict)
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # what, measured, target

    def row(self, what: str, measured: str, target: str = "", met: bool | None = None) -> None:
        if target:
            target = f"target {target}: {'met' if met else 'MISSED'}"
        self.rows.append((what, measured, target))


@contextmanager
def embedded_platform(
    *, extra_env: dict[str, str] | None = None, keep: bool = False
) -> Iterator[Platform]:
    """nats-server and PostgreSQL on free ports in a fresh directory (services not started)."""
    data_dir = Path(tempfile.mkdtemp(prefix="post-bench-"))
    os.chmod(data_dir, 0o755)  # PostgreSQL runs as `nobody` when the bench runs as root
    plat = Platform(
        data_dir=data_dir,
        nats_port=free_port(),
        nats_monitor_port=free_port(),
        pg_port=free_port(),
        service_ports={name: free_port() for name in SERVICES},
        extra_env=dict(extra_env or {}),
    )
    plat.start_servers()
    try:
        yield plat
    finally:
        plat.stop()
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


class Timer:
    def __enter__(self) -> Timer:
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


def percentiles(samples: Sequence[float], points: Sequence[float] = (50, 90, 99)) -> Result:
    """Nearest-rank percentiles (and max) of `samples`, in the samples' unit."""
    ordered = sorted(samples)
    if not ordered:
        return {f"p{p:g}": None for p in points} | {"max": None, "n": 0}
    out: Result = {}
    for p in points:
        rank = max(1, int(-(-p * len(ordered) // 100)))  # ceil(p/100 * n)
        out[f"p{p:g}"] = ordered[rank - 1]
    out["max"] = ordered[-1]
    out["n"] = len(ordered)
    return out


def rss_kib(pid: int) -> int | None:
    """Resident memory of a process, from /proc (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}/s"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


# --- a sample event: the payload every store and publish measurement writes ------------------


def sample_event(hospital: str = "bench-h001", n: int = 0) -> ReferralCreated:
    return ReferralCreated(
        hospital=hospital,
        referral_id=f"ref-{n:07d}",
        physician_id=f"phys-{n % 997:04d}",
        department="emergency-medicine",
        rank=Rank.attending,
        source="third_party",
        event_nature="other",
        requested_at=datetime(2024, 3, 1, 9, 30, tzinfo=UTC),
        referrer_id=f"clin-{n % 101:04d}",
    )


def sample_metadata(hospital: str = "bench-h001") -> dict[str, Any]:
    cid = str(uuid.uuid4())
    return {"correlation_id": cid, "causation_id": cid, "hospital": hospital, "service": "bench"}


def sample_message(hospital: str = "bench-h001", n: int = 0) -> tuple[str, bytes, str]:
    """(subject, body, id) of the sample event as the relay publishes it."""
    event = sample_event(hospital, n)
    meta = sample_metadata(hospital)
    ce = make_cloudevent(
        type_=event.type_name,
        source=f"/hospitals/{hospital}/bench",
        data=event.to_data(),
        correlationid=meta["correlation_id"],
        causationid=meta["causation_id"],
    )
    return evt_subject(hospital, event.type_name), encode(ce), ce["id"]


def sample_sizes() -> Result:
    event = sample_event()
    return {
        "event_data_bytes": len(json.dumps(event.to_data(), separators=(",", ":"))),
        "message_bytes": len(sample_message()[1]),
    }


# --- what a unit of work costs: JetStream writes and PostgreSQL round trips, counted ---------


async def jetstream_writes(nats_url: str) -> dict[str, int]:
    """Records each stream of the account has written to its store: every message stored
    (published, or sourced into a work stream) and every one removed (a work-queue
    acknowledgement, an erasure), each a write that `sync_interval: always` fsyncs."""
    nc = await nats.connect(nats_url, name="post-bench-costs")
    try:
        writes = {}
        for info in await nc.jetstream().streams_info():
            state = info.state  # last_seq stored so far, of which `messages` are still there
            writes[str(info.config.name)] = state.last_seq + (state.last_seq - state.messages)
        return writes
    finally:
        await nc.close()


_ROUND_TRIPS = re.compile(r'^post_db_round_trips_total\{service="[^"]+"\} ([0-9.e+]+)$', re.M)


def db_round_trips(platform: Platform) -> dict[str, int]:
    """PostgreSQL round trips of every running service instance by service, from their
    /metrics (`post_db_round_trips_total`, counted by asyncpg's query logger on each
    connection)."""
    totals: dict[str, int] = {}
    for key, proc in platform.processes.items():
        with urllib.request.urlopen(platform.url(key, "/metrics"), timeout=5) as resp:
            text = resp.read().decode()
        trips = int(sum(float(v) for v in _ROUND_TRIPS.findall(text)))
        totals[proc.name] = totals.get(proc.name, 0) + trips
    return totals


class Costs:
    """The JetStream writes and PostgreSQL round trips of the platform between `start` and
    `stop`, over every stream and every instance."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.writes: dict[str, int] = {}
        self.trips: dict[str, int] = {}

    async def start(self) -> None:
        self.writes = await jetstream_writes(self.platform.nats_url)
        self.trips = await asyncio.to_thread(db_round_trips, self.platform)

    async def stop(self, units: int) -> Result:
        writes = await jetstream_writes(self.platform.nats_url)
        trips = await asyncio.to_thread(db_round_trips, self.platform)
        by_stream = _per_unit(writes, self.writes, units)
        by_service = _per_unit(trips, self.trips, units)
        return {
            "units": units,
            "jetstream_writes": round(sum(by_stream.values()), 2),
            "jetstream_writes_by_stream": by_stream,
            "db_round_trips": round(sum(by_service.values()), 2),
            "db_round_trips_by_service": by_service,
        }


def _per_unit(after: dict[str, int], before: dict[str, int], units: int) -> dict[str, float]:
    return {
        name: round((n - before.get(name, 0)) / units, 2)
        for name, n in sorted(after.items())
        if n != before.get(name, 0)
    }


async def jetstream_publish_rate(messages: int, sync_interval: str = "always") -> float:
    """Pipelined JetStream publishes per second (500 in flight) into one stream of a bare
    nats-server of its own: with `sync_interval: always`, the durable-write limit."""
    folder = Path(tempfile.mkdtemp(prefix="post-bench-sync-"))
    server = NatsServer(
        folder, free_port(), free_port(), sync_interval=sync_interval, tenants=False
    )
    await asyncio.to_thread(server.start)
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="SYNC", subjects=["sync.>"])
        body = b"x" * 300
        window = 500
        with Timer() as t:
            for start in range(0, messages, window):
                acks = [js.publish(f"sync.{n % 10}", body) for n in range(start, start + window)]
                await asyncio.gather(*acks)
        await nc.close()
        return rate(messages, t.seconds)
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(folder, ignore_errors=True)
