"""One run of the load generator: pacing, publishing with retries, following each flow's
answers, the checks at the end, and `postctl load`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats
from nats.aio.client import Client as NATS

from postctl import region
from postctl.load.eventlog import EventLog
from postctl.load.mix import Flow, Mix, Planned, other_supporter
from postctl.load.oracle import expected_reaim, figure_mismatches
from postctl.load.report import LoadReport, latency_summary
from postctl.progress import Progress
from postctl.progress import watch as progress_watch
from shared.client import PlatformClient, wait_consumed
from shared.contracts import (
    COMMANDS,
    STREAM_NAME,
    cmd_subject,
    encode,
    make_cloudevent,
)
from shared.partitions import service_lag
from shared.settings import Settings, nats_servers, nats_tls


@dataclass
class LoadConfig:
    rate: float = 50.0  # commands a second, at most
    duration: float = 60.0  # seconds during which new flows start
    hospitals: int = 3
    seed: int = 1
    max_commands: int | None = None  # stop starting flows once this many commands are planned
    outcome_timeout: float = 120.0  # the longest wait for any one answer
    republish: bool = False  # publish each command twice: a new Nats-Msg-Id, the same id
    settle: float = 1.0  # quiet seconds before the final count (a late second answer shows)
    # How long the command owners may take to have nothing pending at the end: longer than
    # the consumers' ack_wait (60 s), so a message redelivered after a crash is counted too.
    settle_timeout: float = 120.0
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])


@dataclass
class Sent:
    planned: Planned
    id: str
    subject: str
    body: bytes
    sent_at: datetime
    published: bool = False


class Pacer:
    """At most `rate` sends a second, in the order they ask: each takes the next free slot."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate
        self.next_slot: float | None = None

    def reserve(self, now: float) -> float:
        """Take the next slot; returns how long to wait for it."""
        slot = now if self.next_slot is None else max(now, self.next_slot)
        self.next_slot = slot + self.interval
        return slot - now

    async def wait(self) -> None:
        delay = self.reserve(time.monotonic())
        if delay > 0:
            await asyncio.sleep(delay)


async def _publish_retrying(
    client: PlatformClient, subject: str, body: bytes, msg_id: str, deadline: float
) -> int:
    """Publish until the stream acknowledges; returns the retries. The same CloudEvents id
    each time: a copy that got through before is harmless."""
    retries, delay = 0, 0.1
    while True:
        try:
            # The client's JetStream context, with a shorter wait than its default 5 s.
            await client.js.publish(subject, body, timeout=2.0, headers={"Nats-Msg-Id": msg_id})
            return retries
        except asyncio.CancelledError:
            raise
        except Exception:
            if time.monotonic() + delay > deadline:
                raise
            retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


class LoadRun:
    """One run of the load generator. ``async with LoadRun(url, config) as run``:
    ``await run.run()`` sends the mix and returns the checked report; tests may act meanwhile
    (``await run.wait_sent(n)``) and afterwards (``republish_all``, ``verify``)."""

    def __init__(self, nats_url: str, config: LoadConfig, **nats_options: Any) -> None:
        self.nats_url = nats_url
        self.config = config
        self.nats_options = nats_options
        self.mix = Mix(config.seed, config.hospitals, config.tag)
        self.hospitals = [r.hospital for r in self.mix.rosters]
        self.sent: list[Sent] = []
        self.publish_retries = 0
        self.stalled_flows = 0
        self.started = 0.0
        self.finished = 0.0
        self._give_up_at: float | None = None  # once no flow starts: the last answer's deadline
        self._sent_changed = asyncio.Event()
        self.nc: NATS | None = None
        self.client: PlatformClient | None = None
        self.log: EventLog | None = None
        self._log_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoadRun:
        self.nc = await nats.connect(
            nats_servers(self.nats_url),
            name="post-load",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            **{"tls": nats_tls(), **self.nats_options},
        )
        self.client = PlatformClient(self.nc)
        info = await self.client.js.stream_info(STREAM_NAME)
        self.log = EventLog(self.nc, self.hospitals, (info.state.last_seq or 0) + 1)
        self._log_task = asyncio.create_task(self.log.run(), name="load:events")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._log_task is not None:
            self._log_task.cancel()
            await asyncio.gather(self._log_task, return_exceptions=True)
        if self.nc is not None:
            await self.nc.close()

    # -- sending -----------------------------------------------------------------------------

    async def wait_sent(self, n: int) -> None:
        """Until at least n commands have been published (for a fault mid-load)."""
        while sum(1 for s in self.sent if s.published) < n:
            self._sent_changed.clear()
            await self._sent_changed.wait()

    async def _send(self, p: Planned, pacer: Pacer) -> Sent:
        assert self.client is not None
        await pacer.wait()
        ce = make_cloudevent(
            type_=p.command_type, source=f"/hospitals/{p.hospital}/load", data=p.data
        )
        subject = cmd_subject(p.hospital, p.command_type)
        sent = Sent(p, ce["id"], subject, encode(ce), datetime.now(UTC))
        self.sent.append(sent)
        deadline = time.monotonic() + self.config.outcome_timeout
        try:
            self.publish_retries += await _publish_retrying(
                self.client, sent.subject, sent.body, sent.id, deadline
            )
            if self.config.republish:
                self.publish_retries += await _publish_retrying(
                    self.client, sent.subject, sent.body, f"{sent.id}:again", deadline
                )
        except Exception:
            return sent  # never acknowledged: counted as unpublished
        sent.published = True
        self._sent_changed.set()
        return sent

    def _timeout(self) -> float:
        """A wait's limit: `outcome_timeout`, and no later than the run's own deadline."""
        if self._give_up_at is None:
            return self.config.outcome_timeout
        return max(0.0, min(self.config.outcome_timeout, self._give_up_at - time.monotonic()))

    async def _answered(self, sent: Sent) -> bool:
        assert self.log is not None
        log = self.log
        return await log.wait(
            ("cause", sent.id), lambda: bool(log.by_cause.get(sent.id)), self._timeout()
        )

    async def _follow(self, flow: Flow, sent: Sent, pacer: Pacer) -> None:
        """The rest of a flow whose first command was sent: its answer, then its records."""
        assert self.log is not None
        log = self.log
        if not sent.published or not await self._answered(sent):
            self.stalled_flows += bool(flow.records)
            return
        if flow.referral_id is None or not flow.records:
            return
        key = (flow.hospital, flow.referral_id)
        if not await log.wait(("match", *key), lambda: key in log.assignment, self._timeout()):
            self.stalled_flows += 1
            return
        outcome, assigned = log.assignment[key]
        if outcome != "SupporterAssigned" or assigned is None:
            self.stalled_flows += 1  # the mix staffs these departments: a supporter was due
            return
        roster = next(r for r in self.mix.rosters if r.hospital == flow.hospital)
        assert flow.department is not None
        for step in flow.records:
            supporter = (
                assigned
                if step.supporter == "assigned"
                else other_supporter(roster, flow.department, assigned)
            )
            sent = await self._send(step.build(flow.hospital, flow.referral_id, supporter), pacer)
            if not sent.published or not await self._answered(sent):
                self.stalled_flows += 1
                return

    async def run(self) -> LoadReport:
        """Setup, the mix at the configured rate, then the settled, checked report."""
        assert self.log is not None
        config = self.config
        pacer = Pacer(config.rate)
        self.started = time.monotonic()
        setup = [await self._send(p, pacer) for p in self.mix.setup()]
        # The roster must be known everywhere before the first referral names it.
        await asyncio.gather(*(self._answered(s) for s in setup))
        flows: list[asyncio.Task[None]] = []
        planned_commands = len(setup)
        stop_at = self.started + config.duration
        while time.monotonic() < stop_at and (
            config.max_commands is None or planned_commands < config.max_commands
        ):
            flow = self.mix.next_flow()
            planned_commands += flow.planned_commands
            # One slot at a time: follow-ups waiting for a slot go between two new flows.
            sent = await self._send(flow.first, pacer)
            flows.append(asyncio.create_task(self._follow(flow, sent, pacer)))
        self._give_up_at = time.monotonic() + config.outcome_timeout
        await asyncio.gather(*flows)
        self.finished = time.monotonic()
        # Answers already missing: the platform is stuck, and waiting longer tells nothing.
        unanswered = any(not self.log.by_cause.get(s.id) for s in self.sent)
        await self.settle(timeout=10.0 if unanswered else config.settle_timeout)
        return self.verify()

    async def _owners_busy(self) -> bool:
        """Whether a service that owns commands (every instance of it) still has messages to
        handle. Only a command's owner can answer it, so a service that reads events alone
        (analytics) may lag without delaying the count."""
        assert self.client is not None
        try:
            for service in sorted({model.owner for model in COMMANDS.values()}):
                if await service_lag(self.client.js, service) != (0, 0):
                    return True
        except Exception:
            return True
        return False

    async def settle(self, timeout: float | None = None) -> None:
        """Until the command owners' consumers have nothing pending, a quiet moment, and the
        event log has read everything: a late second answer would show now."""
        assert self.log is not None
        deadline = time.monotonic() + (self.config.settle_timeout if timeout is None else timeout)
        for _ in range(2):
            while time.monotonic() < deadline and await self._owners_busy():
                await asyncio.sleep(0.2)
            await asyncio.sleep(self.config.settle)
        await self.log.sync(timeout=max(deadline - time.monotonic(), 5.0))

    async def republish_all(self) -> None:
        """Every command again, long after the first time: a new Nats-Msg-Id, the same id."""
        assert self.client is not None
        deadline = time.monotonic() + self.config.outcome_timeout
        for n, s in enumerate(self.sent):
            self.publish_retries += await _publish_retrying(
                self.client, s.subject, s.body, f"{s.id}:later", deadline
            )
            if n % 200 == 199:
                await asyncio.sleep(0)

    def verify(self) -> LoadReport:
        """Every command answered exactly once, as planned; nothing stored twice."""
        assert self.log is not None
        log = self.log
        missing, doubled, unexpected, latencies = [], [], [], []
        by_type: Counter[str] = Counter()
        rejected = 0
        for s in self.sent:
            by_type[s.planned.command_type] += 1
            answers = list(log.by_cause.get(s.id, {}).values())
            if not answers:
                missing.append(f"{s.planned.command_type} {s.id}")
                continue
            if len(answers) > 1:
                doubled.append(f"{s.planned.command_type} {s.id}: {[a.type for a in answers]}")
            first = min(answers, key=lambda a: a.stream_seq)
            want = (s.planned.expect, s.planned.reason)
            if (first.type, first.reason) != want:
                unexpected.append(
                    f"{s.planned.command_type} {s.id}: expected {want}, got"
                    f" {(first.type, first.reason)}"
                )
            rejected += first.type == "CommandRejected"
            latencies.append((first.stored_at - s.sent_at).total_seconds() * 1000)
        end = self.finished or time.monotonic()
        return LoadReport(
            hospitals=self.hospitals,
            commands=len(self.sent),
            answered=len(self.sent) - len(missing) - len(doubled),
            rejected=rejected,
            by_type=dict(sorted(by_type.items())),
            missing=missing,
            doubled=doubled,
            unexpected=unexpected,
            stored_twice=sum(1 for c in log.copies.values() if c > 1),
            unpublished=sum(1 for s in self.sent if not s.published),
            publish_retries=self.publish_retries,
            stalled_flows=self.stalled_flows,
            elapsed=end - self.started,
            latency_ms=latency_summary(latencies),
        )

    def expected(self) -> dict[str, dict[str, dict[str, Any]]]:
        return expected_reaim(s.planned for s in self.sent if s.published)


# --- RE-AIM figures from the analytics service ------------------------------------------------


def _get_json(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


async def check_figures(
    run: LoadRun,
    report: LoadReport,
    analytics_url: str,
    wait_caught_up: Callable[[], Awaitable[None]] | None = None,
    *,
    token: str,
) -> LoadReport:
    """Compare GET /reaim/{hospital} with the figures computed from the commands sent (once
    analytics has caught up; at once when answers are missing: it may never catch up then).
    `token`: a region token (postctl/region.py `reader_token`)."""
    if wait_caught_up is not None and not report.missing:
        await wait_caught_up()
    for hospital, expected in run.expected().items():
        try:
            actual = await asyncio.to_thread(_get_json, f"{analytics_url}/reaim/{hospital}", token)
        except (OSError, ValueError) as exc:
            report.figure_mismatches[hospital] = [f"GET /reaim/{hospital} failed: {exc!r}"]
            continue
        report.figure_mismatches[hospital] = figure_mismatches(expected, actual)
    report.figures_checked = True
    return report


async def run_load(
    nats_url: str,
    config: LoadConfig,
    analytics_url: str | None = None,
    token: str | None = None,
) -> LoadReport:
    """`token`: the region token that reads the figures (needed with `analytics_url`)."""
    async with LoadRun(nats_url, config) as run:
        with Progress() as progress:
            planned = config.max_commands or round(config.rate * config.duration)
            sending = progress.task("commands sent", planned)
            watching = asyncio.create_task(progress_watch(sending, lambda: len(run.sent)))
            try:
                report = await run.run()
            finally:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
        if analytics_url:
            assert token, "reading the RE-AIM figures needs a region token"
            await check_figures(
                run,
                report,
                analytics_url,
                lambda: wait_consumed(nats_url, "analytics"),
                token=token,
            )
        return report


# --- postctl load -----------------------------------------------------------------------------


def add_cli(subparsers: Any) -> None:
    """Registers `postctl load --rate R --duration D [--hospitals N] [--seed S] [--analytics URL]
    [--json]`."""
    p = subparsers.add_parser(
        "load",
        help="soak: a known mix of commands at a bounded rate, then check nothing was lost",
    )
    p.add_argument("--rate", type=float, required=True, help="commands a second, at most")
    p.add_argument("--duration", type=float, required=True, help="seconds of new flows")
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--analytics",
        default=None,
        help="the analytics service's URL (default: from POST_ANALYTICS_PORT); 'none' to skip"
        " the RE-AIM check, read with $POST_REGION_TOKEN or a region token postctl-load issued"
        " in the local tokens file",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_load)


def cmd_load(args: argparse.Namespace) -> None:
    settings = Settings()
    analytics = args.analytics or f"http://127.0.0.1:{settings.http_port('analytics')}"
    config = LoadConfig(
        rate=args.rate, duration=args.duration, hospitals=args.hospitals, seed=args.seed
    )
    if analytics == "none":
        report = asyncio.run(run_load(settings.nats_url.get_secret_value(), config))
    else:
        # $POST_REGION_TOKEN, else one issued beside the services (postctl/region.py).
        token = region.reader_token("postctl-load")
        report = asyncio.run(
            run_load(settings.nats_url.get_secret_value(), config, analytics, token)
        )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format(), flush=True)
    sys.exit(0 if report.ok else 1)
