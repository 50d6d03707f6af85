"""What every section of the harness shares: the embedded servers, timing, percentiles, RSS,
and the sample payload (a real contract event, so sizes match what the platform stores)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.contracts import Rank, ReferralCreated, encode, evt_subject, make_cloudevent
from shared.runtime import SERVICES, Platform, free_port

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
