"""The driver: sends a scenario through NATS with `shared.client.PlatformClient`, waiting for each
answer it needs (matching's choice of supporter before the records commands), checking every
outcome; and `postctl simulate`."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any, Protocol

import structlog

from postctl.simulate.post_2023 import post_2023_scenario
from postctl.simulate.region import REGION_START, region_scenario
from postctl.simulate.scenario import (
    ReferralPlan,
    Scenario,
    add_months,
    close_department,
    launch_department,
    record_interaction,
    record_outreach,
    register_hospital,
    register_supporter,
    request_referral,
    retire_supporter,
    set_matching_policy,
    set_supporter_availability,
    submit_survey_response,
)
from shared.client import PlatformClient
from shared.contracts import (
    Command,
)
from shared.settings import Settings

log = structlog.get_logger()


class SimulationError(RuntimeError):
    """A command was refused or went unanswered: the simulation stops."""


class Platform(Protocol):
    """What the driver needs of `shared.client.PlatformClient`."""

    async def send(self, hospital: str, command: Command, id_: str | None = None) -> str: ...

    async def outcome(self, command_id: str, timeout: float = ...) -> dict[str, Any]: ...

    async def wait_for(
        self,
        hospital: str,
        event_type: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float,
    ) -> dict[str, Any]: ...


# Command ids derive from the scenario, so sending a scenario twice is processed once.
_ID_NAMESPACE = uuid.UUID("5b0c3c1e-6f1a-4d0e-9a57-70a2d1f0c2a3")


class Driver:
    """Sends a scenario through the platform with bounded concurrency, checking every outcome."""

    def __init__(
        self, client: Platform, scenario: Scenario, concurrency: int = 20, timeout: float = 120.0
    ) -> None:
        self.client = client
        self.scenario = scenario
        self.concurrency = concurrency
        self.timeout = timeout
        self.namespace = uuid.uuid5(_ID_NAMESPACE, scenario.name)
        self.sent: Counter[str] = Counter()
        self.without_supporter = 0

    def command_id(self, hospital: str, command: Command, key: str) -> str:
        return str(uuid.uuid5(self.namespace, f"{hospital}/{command.type_name}/{key}"))

    async def send(
        self, hospital: str, command: Command, key: str
    ) -> Callable[[], Awaitable[None]]:
        """Publish one command; returns the check of its outcome, to await when convenient."""
        command_id = self.command_id(hospital, command, key)
        await self.client.send(hospital, command, id_=command_id)
        self.sent[command.type_name] += 1

        async def check() -> None:
            await self.answer(hospital, command, command_id, key)

        return check

    async def answer(
        self, hospital: str, command: Command, command_id: str, key: str
    ) -> dict[str, Any]:
        """The success event of a command; a refusal or silence stops the simulation."""
        what = f"{command.type_name} {key!r} of {hospital} (command {command_id})"
        try:
            outcome = await self.client.outcome(command_id, timeout=self.timeout)
        except TimeoutError:
            raise SimulationError(
                f"{what}: no outcome within {self.timeout:.0f} s (are the services running?"
                " was this scenario already sent to this platform?)"
            ) from None
        if outcome.get("type") == "CommandRejected":
            data = outcome.get("data", {})
            raise SimulationError(
                f"{what} was rejected: {data.get('reason_code')}: {data.get('detail')}"
            )
        return outcome

    async def send_all(self, items: Iterable[tuple[str, Command, str]]) -> None:
        """Pipeline a batch: publish in order, then await every outcome."""
        checks = [await self.send(hospital, command, key) for hospital, command, key in items]
        await _gather_bounded(checks, self.concurrency * 10)

    async def drive(self) -> dict[str, Any]:
        started = time.perf_counter()
        s = self.scenario
        log.info("simulation_started", scenario=s.name, commands=s.command_count())
        # The roster in dependency order: each batch is known before the next needs it.
        await self.send_all((h.hospital, register_hospital(h), h.hospital) for h in s.hospitals)
        await self.send_all((d.hospital, launch_department(d), d.department) for d in s.departments)
        await self.send_all(
            (p.hospital, register_supporter(p), p.supporter_id) for p in s.supporters
        )
        await self.send_all((p.hospital, set_matching_policy(p), p.hospital) for p in s.policies)
        await _gather_bounded([partial(self.referral, r) for r in s.referrals], self.concurrency)
        # Pauses, caps, retirements and closings come after the referrals they would otherwise
        # turn away (their business dates still count for RE-AIM); a pause before a retirement.
        await self.send_all(
            (a.hospital, set_supporter_availability(a), a.supporter_id) for a in s.availability
        )
        await self.send_all(
            (p.hospital, retire_supporter(p), p.supporter_id)
            for p in sorted(s.supporters, key=lambda p: p.retired_on or date.max)
            if p.retired_on is not None
        )
        await self.send_all(
            (d.hospital, close_department(d), d.department)
            for d in s.departments
            if d.closed_on is not None
        )
        await self.send_all(
            (v.hospital, submit_survey_response(v), v.response_id) for v in s.surveys
        )
        elapsed = time.perf_counter() - started
        summary = {
            "scenario": s.name,
            "hospitals": len(s.hospitals),
            "departments": len(s.departments),
            "supporters": len(s.supporters),
            "referrals": len(s.referrals),
            "commands": sum(self.sent.values()),
            "by_type": dict(sorted(self.sent.items())),
            "referrals_without_supporter": self.without_supporter,
            "elapsed_seconds": round(elapsed, 1),
        }
        log.info("simulation_finished", **summary)
        return summary

    async def referral(self, plan: ReferralPlan) -> None:
        """Request, wait for matching's choice, then record the planned fate in order."""
        hospital, referral_id = plan.hospital, plan.referral_id
        command = request_referral(plan)
        command_id = self.command_id(hospital, command, referral_id)
        await self.client.send(hospital, command, id_=command_id)
        self.sent[command.type_name] += 1
        created = await self.answer(hospital, command, command_id, referral_id)
        supporter_id = await self.assignment(plan, created)
        if supporter_id is None:
            self.without_supporter += 1
            return
        for k, outreach in enumerate(plan.outreach):
            check = await self.send(
                hospital, record_outreach(plan, outreach, supporter_id), f"{referral_id}/o{k}"
            )
            await check()
        if not plan.interactions:
            return
        # The first record settles acceptance; the follow-ups can then be pipelined.
        first, *rest = plan.interactions
        check = await self.send(
            hospital, record_interaction(plan, first, supporter_id), f"{referral_id}/i0"
        )
        await check()
        checks = [
            await self.send(
                hospital, record_interaction(plan, i, supporter_id), f"{referral_id}/i{k}"
            )
            for k, i in enumerate(rest, start=1)
        ]
        await asyncio.gather(*(c() for c in checks))

    async def assignment(self, plan: ReferralPlan, created: dict[str, Any]) -> str | None:
        """The supporter matching assigned, or None when it found nobody eligible."""
        answers = ("SupporterAssigned", "NoSupporterAvailable")
        try:
            # Matching answers `ReferralCreated` with one of them, caused by that event.
            event = await self.client.outcome(str(created["id"]), timeout=self.timeout)
            if event.get("type") not in answers:
                event = await self._assignment_by_referral(plan)
        except TimeoutError:
            raise SimulationError(
                f"referral {plan.referral_id!r} of {plan.hospital}: matching answered nothing"
                f" within {self.timeout:.0f} s"
            ) from None
        if event.get("type") == "NoSupporterAvailable":
            log.warning("no_supporter_available", department=plan.department)
            return None
        return str(event["data"]["supporter_id"])

    async def _assignment_by_referral(self, plan: ReferralPlan) -> dict[str, Any]:
        # Slower: scans every event seen, for when another consumer answered first.
        def about(event: dict[str, Any]) -> bool:
            return bool(event.get("data", {}).get("referral_id") == plan.referral_id)

        waits = [
            asyncio.ensure_future(
                self.client.wait_for(plan.hospital, kind, about, timeout=self.timeout)
            )
            for kind in ("SupporterAssigned", "NoSupporterAvailable")
        ]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return next(iter(done)).result()


async def _gather_bounded(jobs: Sequence[Callable[[], Awaitable[None]]], limit: int) -> None:
    """Run the jobs with at most `limit` at once; the first failure stops the rest."""
    semaphore = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        async with semaphore:
            await job()

    tasks = [asyncio.ensure_future(run(job)) for job in jobs]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def simulate(client: Platform, scenario: Scenario, concurrency: int = 20) -> dict[str, Any]:
    return await Driver(client, scenario, concurrency).drive()


async def simulate_post_2023(client: Platform) -> dict[str, Any]:
    return await simulate(client, post_2023_scenario())


def region_plan(hospitals: int, years: int, seed: int) -> Scenario:
    today = datetime.now(UTC).date()
    # Business dates may not lie in the future: a long region starts early enough to end today.
    start = min(REGION_START, add_months(today, -12 * years) - timedelta(days=1))
    return region_scenario(hospitals, years, seed, start)


async def simulate_region(
    client: Platform, hospitals: int, years: int, seed: int
) -> dict[str, Any]:
    return await simulate(client, region_plan(hospitals, years, seed))


async def simulate_with_progress(nats_url: str, scenario: Scenario) -> dict[str, Any]:
    """A scenario driven through NATS, its commands sent shown as they go (postctl/progress)."""
    from postctl.progress import Progress, watch

    client = await PlatformClient.connect(nats_url)
    try:
        driver = Driver(client, scenario)
        with Progress() as progress:
            task = progress.task("commands sent", scenario.command_count())
            watching = asyncio.create_task(watch(task, lambda: sum(driver.sent.values())))
            try:
                return await driver.drive()
            finally:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
    finally:
        await client.close()


async def _with_client(
    nats_url: str, run: Callable[[Platform], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    client = await PlatformClient.connect(nats_url)
    try:
        return await run(client)
    finally:
        await client.close()


async def run_post_2023(nats_url: str) -> dict[str, Any]:
    """`postctl simulate post-2023`: replay the POST study; returns what was sent."""
    return await _with_client(nats_url, simulate_post_2023)


async def run_region(nats_url: str, hospitals: int, years: int, seed: int) -> dict[str, Any]:
    """`postctl simulate region`: a synthetic region; returns what was sent."""
    return await _with_client(
        nats_url, lambda client: simulate_region(client, hospitals, years, seed)
    )


# --- postctl simulate -------------------------------------------------------------------------


def add_cli(subparsers: Any) -> None:
    """Registers `postctl simulate post-2023` and `postctl simulate region [--hospitals N]
    [--years Y] [--seed S]`."""
    sim = subparsers.add_parser("simulate", help="send a simulated program through NATS")
    sim.add_argument("scenario", choices=["post-2023", "region"])
    sim.add_argument("--hospitals", type=int, default=10)
    sim.add_argument("--years", type=int, default=3)
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument(
        "--straight",
        action="store_true",
        help="region only: write the facts the services would emit straight into the stream"
        " (6,000 hospitals x 5 years in minutes), for analytics and its rebuild at scale; run"
        " it where only analytics consumes, as the other services would act on these facts",
    )
    sim.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> None:
    url = Settings().nats_url.get_secret_value()
    if args.scenario == "post-2023":
        summary = asyncio.run(simulate_with_progress(url, post_2023_scenario()))
    elif args.straight:
        from postctl.progress import Progress
        from postctl.simulate import straight
        from postctl.simulate.region import region_scenarios

        # The plans are made as it goes (a national region does not fit in memory at once):
        # the count and the rate, without a total.
        plans = region_scenarios(args.hospitals, args.years, args.seed)
        with Progress() as progress:
            task = progress.task("events published")
            summary = asyncio.run(straight.publish_region(url, plans, on_window=task.update))
    else:
        plan = region_plan(args.hospitals, args.years, args.seed)
        summary = asyncio.run(simulate_with_progress(url, plan))
    print(json.dumps(summary, indent=2, default=str))
