"""3. End to end through the four services, and 6. their footprint.

Referral lifecycles (RequestReferral -> SupporterAssigned -> RecordOutreach -> RecordInteraction
-> InteractionCompleted) per second at saturation, and the latency from publishing
RequestReferral to seeing SupporterAssigned on the stream at a steady 50 per second. Only the
contract is used: commands on post.{hospital}.cmd.*, answers watched on post.*.evt.>.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bench.common import (
    Costs,
    Section,
    Timer,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    jetstream_publish_rate,
    percentiles,
    rate,
    rss_kib,
)
from shared.client import wait_consumed
from shared.contracts import (
    Command,
    LaunchDepartment,
    Rank,
    RecordInteraction,
    RecordOutreach,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    command_message,
)
from shared.runtime import SERVICES, Platform

DEPARTMENT = "emergency-medicine"
SUPPORTERS = 20


class Watcher:
    """Sends commands and waits for the events that answer them, keyed by (hospital, type, id)."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.waiting: dict[tuple[str, str, str], asyncio.Future[tuple[float, dict[str, Any]]]] = {}
        self.rejected = 0

    @classmethod
    async def connect(cls, url: str) -> Watcher:
        nc = await nats.connect(url, name="post-bench")
        watcher = cls(nc)
        await nc.subscribe("post.*.evt.>", cb=watcher._on_event, pending_msgs_limit=1_000_000)
        await nc.flush()
        return watcher

    async def _on_event(self, msg: Msg) -> None:
        seen = time.perf_counter()
        ce = json.loads(msg.data)
        data = ce.get("data", {})
        if ce["type"] == "CommandRejected":
            self.rejected += 1
        key = data.get("referral_id") or data.get("supporter_id") or data.get("department")
        future = self.waiting.pop((data.get("hospital", ""), ce["type"], str(key)), None)
        if future is not None and not future.done():
            future.set_result((seen, data))

    def expect(self, hospital: str, event_type: str, key: str) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[(hospital, event_type, key)] = future
        return future

    async def send(self, hospital: str, command: Command) -> float:
        subject, body, msg_id = command_message(hospital, command, origin="bench")
        sent = time.perf_counter()
        await self.js.publish(subject, body, headers={"Nats-Msg-Id": msg_id})
        return sent

    async def close(self) -> None:
        await self.nc.close()


async def setup_hospitals(watcher: Watcher, hospitals: list[str], timeout: float = 60) -> None:
    launched = (datetime.now(UTC) - timedelta(days=400)).date()
    for hospital in hospitals:
        done = watcher.expect(hospital, "DepartmentLaunched", DEPARTMENT)
        await watcher.send(hospital, RegisterHospital(name="Bench", physician_count=5000))
        await watcher.send(
            hospital,
            LaunchDepartment(department=DEPARTMENT, physician_count=5000, launched_on=launched),
        )
        await asyncio.wait_for(done, timeout)
        trained = []
        for k in range(SUPPORTERS):
            supporter = f"sup-{k:03d}"
            trained.append(watcher.expect(hospital, "SupporterTrained", supporter))
            await watcher.send(
                hospital,
                RegisterSupporter(
                    supporter_id=supporter,
                    department=DEPARTMENT,
                    rank=Rank.senior,
                    interventional=True,
                    trained_on=launched,
                ),
            )
        await asyncio.wait_for(asyncio.gather(*trained), timeout)


def _referral(n: int, requested_at: datetime) -> RequestReferral:
    return RequestReferral(
        referral_id=f"ref-{n:07d}-{uuid.uuid4().hex[:6]}",
        physician_id=f"phys-{n % 4000:05d}",
        department=DEPARTMENT,
        rank=Rank.attending,
        source="third_party",
        event_nature="other",
        requested_at=requested_at,
        referrer_id=f"clin-{n % 500:04d}",
    )


async def lifecycle(watcher: Watcher, hospital: str, n: int, timeout: float = 120) -> float:
    """One referral through all four services; returns its seconds."""
    requested_at = datetime.now(UTC) - timedelta(hours=3)
    referral = _referral(n, requested_at)
    rid = referral.referral_id
    assigned = watcher.expect(hospital, "SupporterAssigned", rid)
    started = await watcher.send(hospital, referral)
    _, data = await asyncio.wait_for(assigned, timeout)
    supporter = data["supporter_id"]
    completed = watcher.expect(hospital, "InteractionCompleted", rid)
    await watcher.send(
        hospital,
        RecordOutreach(
            referral_id=rid,
            supporter_id=supporter,
            outcome="accepted",
            at=requested_at + timedelta(hours=1),
        ),
    )
    await watcher.send(
        hospital,
        RecordInteraction(
            referral_id=rid,
            supporter_id=supporter,
            occurred_on=(requested_at + timedelta(hours=2)).date(),
            minutes=30,
        ),
    )
    seen, _ = await asyncio.wait_for(completed, timeout)
    return seen - started


async def _bounded(jobs: Sequence[Callable[[], Awaitable[float]]], limit: int) -> list[float]:
    results: list[float] = []
    queue = list(reversed(jobs))

    async def worker() -> None:
        while queue:
            results.append(await queue.pop()())

    await asyncio.gather(*(worker() for _ in range(limit)))
    return results


class RssSampler:
    """The largest RSS of each service process while running."""

    def __init__(self, platform: Platform) -> None:
        self.pids = {
            name: p.proc.pid for name, p in platform.processes.items() if p.proc is not None
        }
        self.peak: dict[str, int] = {name: 0 for name in self.pids}
        self.task: asyncio.Task[None] | None = None

    def now(self) -> dict[str, int]:
        return {name: rss_kib(pid) or 0 for name, pid in self.pids.items()}

    async def _run(self) -> None:
        while True:
            for name, kib in self.now().items():
                self.peak[name] = max(self.peak[name], kib)
            await asyncio.sleep(0.25)

    def __enter__(self) -> RssSampler:
        self.task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()


async def steady_latency(
    watcher: Watcher, hospitals: list[str], per_second: float, seconds: float
) -> list[float]:
    """RequestReferral -> SupporterAssigned latencies (ms) at a fixed rate."""
    count = int(per_second * seconds)
    interval = 1.0 / per_second
    latencies: list[float] = []
    pending: list[asyncio.Task[None]] = []
    requested_at = datetime.now(UTC) - timedelta(hours=1)

    async def one(n: int) -> None:
        hospital = hospitals[n % len(hospitals)]
        referral = _referral(10_000_000 + n, requested_at)
        assigned = watcher.expect(hospital, "SupporterAssigned", referral.referral_id)
        sent = await watcher.send(hospital, referral)
        seen, _ = await asyncio.wait_for(assigned, 60)
        latencies.append((seen - sent) * 1000)

    begin = time.perf_counter()
    for n in range(count):
        # A fixed schedule (not a sleep after each send): the rate holds whatever the latency.
        delay = begin + n * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(one(n)))
    await asyncio.gather(*pending)
    return latencies


async def run(platform: Platform, scale: float = 1.0) -> Section:
    section = Section("end to end")
    fig = section.figures
    hospitals = [f"bench-e2e-{k:02d}" for k in range(10)]
    platform.start_services()
    platform.wait_ready()
    watcher = await Watcher.connect(platform.nats_url)
    try:
        await setup_hospitals(watcher, hospitals)
        sampler = RssSampler(platform)
        await asyncio.sleep(3)  # let start-up work settle before the idle reading
        fig["rss_idle_kib"] = sampler.now()

        # warm-up, then saturation: many lifecycles in flight at once
        await _bounded([partial(lifecycle, watcher, hospitals[n % 10], n) for n in range(50)], 25)
        lifecycles = int(2000 * scale)
        jobs = [
            partial(lifecycle, watcher, hospitals[n % len(hospitals)], 1000 + n)
            for n in range(lifecycles)
        ]
        for name in SERVICES:
            await wait_consumed(platform.nats_url, name, timeout=600, db_url=platform.db_url)
        costs = Costs(platform)
        await costs.start()
        with sampler, Timer() as t:
            durations = await _bounded(jobs, 200)
        fig["lifecycles"] = lifecycles
        fig["in_flight"] = 200
        fig["lifecycles_per_second"] = rate(lifecycles, t.seconds)
        fig["events_per_second"] = rate(lifecycles * 4, t.seconds)  # 4 facts per lifecycle
        fig["lifecycle_seconds"] = percentiles(durations)
        fig["rss_load_kib"] = dict(sampler.peak)

        # The steady rate is measured on a quiet platform: every consumer caught up first.
        # What the lifecycles cost is counted once all they caused is done.
        for name in SERVICES:
            await wait_consumed(platform.nats_url, name, timeout=600, db_url=platform.db_url)
        fig["per_lifecycle"] = await costs.stop(lifecycles)
        await asyncio.sleep(1)
        seconds = max(10.0, 30 * scale)
        latencies = await steady_latency(watcher, hospitals, 50, seconds)
        fig["steady"] = {"per_second": 50, "seconds": seconds, "ms": percentiles(latencies)}
        fig["rejected"] = watcher.rejected
        p99 = fig["steady"]["ms"]["p99"]
        fig["target_met"] = p99 is not None and p99 < 50
        # The durable-write limit, measured in the same run: fsynced publishes per second over
        # the 7 messages a lifecycle must store (3 commands, 4 facts).
        fig["durable_publish_per_second"] = await jetstream_publish_rate(
            max(5000, int(20000 * scale))
        )
        fig["durable_limit_lifecycles_per_second"] = fig["durable_publish_per_second"] / 7
        fig["ratio_lifecycles_vs_durable_limit"] = (
            fig["lifecycles_per_second"] / fig["durable_limit_lifecycles_per_second"]
        )
    finally:
        await watcher.close()
        for proc in platform.processes.values():
            proc.stop()
        platform.processes.clear()

    section.row("referral lifecycles at saturation", fmt_rate(fig["lifecycles_per_second"]))
    section.row("  contract events per second", fmt_rate(fig["events_per_second"]))
    ratio = fig["ratio_lifecycles_vs_durable_limit"]
    section.row(
        "  / the durable-write limit (fsynced publishes/s / 7)",
        f"{fmt_ratio(ratio)} of {fmt_rate(fig['durable_limit_lifecycles_per_second'])}",
        ">= 0.5x",
        ratio >= 0.5,
    )
    cost = fig["per_lifecycle"]
    section.row(
        "  JetStream writes per lifecycle (stored + removed)",
        f"{cost['jetstream_writes']:.1f}",
        "<= 10",
        cost["jetstream_writes"] <= 10,
    )
    section.row(
        "  PostgreSQL round trips per lifecycle",
        f"{cost['db_round_trips']:.1f}",
        "<= 30",
        cost["db_round_trips"] <= 30,
    )
    ms = fig["steady"]["ms"]
    section.row("RequestReferral -> SupporterAssigned @50/s p50", fmt_ms(ms["p50"]))
    section.row("  p90", fmt_ms(ms["p90"]))
    section.row("  p99", fmt_ms(ms["p99"]), "< 50 ms", fig["target_met"])
    for name in SERVICES:
        idle = fig["rss_idle_kib"].get(name, 0) / 1024
        load = fig["rss_load_kib"].get(name, 0) / 1024
        section.row(f"RSS {name}: idle / under load", f"{idle:.0f} / {load:.0f} MiB")
    return section
