"""Nothing lost, nothing doubled, whatever fails: the whole platform as real processes, under
load, while its parts are broken for real.

Each test runs the load generator (`postctl.load`: a known mix of commands from three
hospitals, through NATS) against a platform of its own, breaks something mid-load and repairs
it, then proves that:

- every command ended in exactly one outcome event, the one its plan expects (a success event,
  or a `CommandRejected` with the planned reason), and no event was stored twice;
- the RE-AIM figures of GET /reaim/{hospital} equal those computed from the commands sent
  (`postctl.load.expected_reaim`, independent of the analytics service);
- every service is still running: a fault may slow a service, never kill it.

The faults: `kill -9` of each service; nats-server SIGKILLed and restarted on its data; PostgreSQL
stopped (fast and immediate shutdown) and restarted on its data; a consumer far behind catching
up; every command published again under a new Nats-Msg-Id; a 3-node cluster (from the deploy
configs) losing the node that leads the stream. One more, without the load generator: a command
in flight when its service is killed keeps its place in the stream order.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta

import pytest
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeoutError

from postctl import tenants
from postctl.load import LoadConfig, LoadReport, LoadRun, check_figures
from shared import hospitals
from shared.client import PlatformClient, wait_consumed
from shared.contracts import (
    STREAM_NAME,
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
from shared.partitions import consumer_name, partition_of, service_lag, work_stream
from shared.runtime import SERVICES, Platform
from shared.service import ensure_stream
from tests.conftest import region_token_for
from tests.fault.conftest import MakePlatform
from tests.integration.test_deploy import (  # the cluster of the deploy configs, as it is tested
    NODES,
    PLATFORM_PASSWORD,
    Cluster,
    cluster,  # noqa: F401 (a module-scoped fixture)
    settle_stream,
)

pytestmark = pytest.mark.fault

COMMANDS = 300  # per test: about 8 s of load at RATE
RATE = 40.0
FAULT_AT = 130  # commands sent (the roster of three hospitals is 51) when the fault strikes


def _config(**overrides: object) -> LoadConfig:
    settings: dict[str, object] = {
        "rate": RATE,
        "duration": 300.0,
        "hospitals": 3,
        "seed": 8,
        "max_commands": COMMANDS,
        "outcome_timeout": 90.0,  # generous: a redelivery after a crash waits for ack_wait (60 s)
    }
    settings.update(overrides)
    return LoadConfig(**settings)  # type: ignore[arg-type]


def _logs(platform: Platform) -> str:
    tails = []
    for name, process in platform.processes.items():
        if process.log_path.exists():
            tails.append(f"--- {name} ---\n{process.log_path.read_text()[-1500:]}")
    return "\n".join(tails)


def _assert_nothing_lost(report: LoadReport, platform: Platform) -> None:
    assert report.figures_checked
    assert report.ok, report.format() + "\n" + _logs(platform)
    dead = [name for name, p in platform.processes.items() if not p.alive()]
    assert not dead, f"services died: {dead}\n{_logs(platform)}"


async def _ready(platform: Platform) -> None:
    await asyncio.to_thread(platform.wait_ready, 90.0)


async def _figures(run: LoadRun, report: LoadReport, platform: Platform, nats_url: str) -> None:
    await check_figures(
        run,
        report,
        f"http://127.0.0.1:{platform.service_ports['analytics']}",
        lambda: wait_consumed(nats_url, "analytics", db_url=platform.db_url),
        token=region_token_for(platform),
    )


async def _load_under_fault(
    platform: Platform,
    fault: Callable[[LoadRun], Awaitable[None]],
    nats_url: str | None = None,
    config: LoadConfig | None = None,
) -> LoadReport:
    """The mix, with `fault` striking once FAULT_AT commands are sent; then the checks."""
    url = nats_url or platform.nats_url
    async with LoadRun(url, config or _config()) as run:
        load = asyncio.create_task(run.run())
        reached = asyncio.create_task(run.wait_sent(FAULT_AT))
        await asyncio.wait({load, reached}, return_when=asyncio.FIRST_COMPLETED)
        if not reached.done():
            reached.cancel()
            await load  # the load ended (or failed) before the fault could strike
            raise AssertionError("the load ended before the fault")
        sent_before = len(run.sent)
        await fault(run)
        report = await load
        assert report.commands > sent_before  # the load went on through the fault
        await _figures(run, report, platform, url)
    print(report.format())
    return report


# --- a service killed with SIGKILL mid-load, then restarted -----------------------------------


@pytest.mark.parametrize("service", SERVICES)
async def test_kill_9_of_a_service_mid_load_loses_and_doubles_nothing(
    fault_platform: Platform, service: str
) -> None:
    async def kill_and_restart(run: LoadRun) -> None:
        process = fault_platform.processes[service]
        assert process.proc is not None
        process.proc.kill()
        await asyncio.to_thread(process.proc.wait)
        await asyncio.sleep(1.0)  # the load goes on without it
        fault_platform.start_service(service)
        await _ready(fault_platform)

    report = await _load_under_fault(fault_platform, kill_and_restart)
    _assert_nothing_lost(report, fault_platform)


# --- nats-server killed and restarted on the same port and data -------------------------------


async def test_nats_server_killed_and_restarted_loses_and_doubles_nothing(
    fault_platform: Platform,
) -> None:
    async def kill_and_restart(run: LoadRun) -> None:
        server = fault_platform.nats
        assert server is not None and server.proc is not None
        server.proc.kill()
        await asyncio.to_thread(server.proc.wait)
        await asyncio.sleep(1.0)  # publishers retry, services reconnect meanwhile
        await asyncio.to_thread(server.start)
        await _ready(fault_platform)

    report = await _load_under_fault(fault_platform, kill_and_restart)
    _assert_nothing_lost(report, fault_platform)


# --- PostgreSQL restarted on the same data ----------------------------------------------------


@pytest.mark.parametrize(
    "shutdown", [signal.SIGINT, signal.SIGQUIT], ids=["fast-shutdown", "immediate-shutdown"]
)
async def test_postgres_restarted_mid_load_loses_and_doubles_nothing(
    fault_platform: Platform, shutdown: signal.Signals
) -> None:
    async def restart(run: LoadRun) -> None:
        postgres = fault_platform.postgres
        assert postgres is not None
        # SIGQUIT is an immediate shutdown: no checkpoint, crash recovery at the next start.
        await asyncio.to_thread(postgres.stop, shutdown)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(postgres.start)
        await _ready(fault_platform)

    report = await _load_under_fault(fault_platform, restart)
    _assert_nothing_lost(report, fault_platform)


# --- a consumer far behind, catching up -------------------------------------------------------


async def test_a_consumer_far_behind_catches_up_with_the_right_figures(
    fault_platform: Platform,
) -> None:
    analytics = [p for p in fault_platform.processes.values() if p.name == "analytics"]
    for process in analytics:  # every instance
        process.stop()
    config = _config(max_commands=800, rate=100.0)
    async with LoadRun(fault_platform.nats_url, config) as run:
        report = await run.run()  # answers come from the other services alone
        assert run.client is not None
        behind, _ = await service_lag(run.client.js, "analytics")
        # Every command's answer at least is waiting for it.
        assert behind >= report.commands
        for process in analytics:
            fault_platform.start_service("analytics", process.index)
        await _ready(fault_platform)
        await _figures(run, report, fault_platform, fault_platform.nats_url)
    print(report.format())
    _assert_nothing_lost(report, fault_platform)


# --- the same commands published twice --------------------------------------------------------


async def test_commands_published_again_under_new_message_ids_are_answered_once(
    fault_platform: Platform,
) -> None:
    # Each command twice at once (a new Nats-Msg-Id, the same CloudEvents id), and a third
    # time after every answer is in: JetStream stores all three, the services handle one and
    # erase the copies (and the refused commands) once answered.
    async with LoadRun(fault_platform.nats_url, _config(republish=True)) as run:
        await run.run()
        await run.republish_all()
        await run.settle()
        report = run.verify()
        assert run.client is not None
        stored = 0
        for hospital in run.hospitals:
            info = await run.client.js.stream_info(STREAM_NAME, f"post.{hospital}.cmd.>")
            stored += sum((info.state.subjects or {}).values())
        assert stored == report.commands - report.rejected  # one copy of each accepted
        await _figures(run, report, fault_platform, fault_platform.nats_url)
    print(report.format())
    _assert_nothing_lost(report, fault_platform)


# --- a command in flight when its service dies keeps its place in the stream ---------------


async def test_a_command_in_flight_when_its_service_dies_is_handled_before_the_next(
    make_platform: MakePlatform,
) -> None:
    """kill -9 while records holds a RecordOutreach it has not acknowledged: the RecordInteraction
    published after it must still be handled after it, as the stream orders them (README: each
    service handles its messages in stream order). Otherwise the interaction counts as an
    implied acceptance and the hospital's accepted outreach is refused."""
    fault_platform = await asyncio.to_thread(make_platform, instances=1)  # it holds them all
    client = await PlatformClient.connect(fault_platform.nats_url)
    hospital = "in-flight"
    consumer = (work_stream("records"), consumer_name("records", partition_of(hospital)))
    try:
        roster: list[Command] = [
            RegisterHospital(name="In flight", physician_count=100),
            LaunchDepartment(department="em", physician_count=50, launched_on=date(2024, 1, 1)),
            RegisterSupporter(
                supporter_id="s1",
                department="em",
                rank=Rank.senior,
                interventional=True,
                trained_on=date(2024, 1, 1),
            ),
        ]
        for command in roster:
            assert (await client.send_and_wait(hospital, command, timeout=30))["type"] != (
                "CommandRejected"
            )
        requested = datetime(2024, 3, 1, 10, tzinfo=UTC)
        referral = RequestReferral(
            referral_id="r1",
            physician_id="p1",
            department="em",
            rank=Rank.resident,
            source="self",
            event_nature="other",
            requested_at=requested,
        )
        await client.send_and_wait(hospital, referral, timeout=30)
        await client.wait_for(hospital, "SupporterAssigned", timeout=30)
        await wait_consumed(fault_platform.nats_url, "records", db_url=fault_platform.db_url)

        records = fault_platform.processes["records"]
        assert records.proc is not None
        # Frozen, it still holds an open pull request: the next command is delivered to it
        # and stays unacknowledged; the kill -9 then strikes with that command in flight.
        records.proc.send_signal(signal.SIGSTOP)
        try:
            outreach = await client.send(
                hospital,
                RecordOutreach(
                    referral_id="r1",
                    supporter_id="s1",
                    outcome="accepted",
                    at=requested + timedelta(hours=2),
                ),
            )
            for _ in range(100):
                info = await client.js.consumer_info(*consumer)
                if info.num_ack_pending:
                    break
                await asyncio.sleep(0.05)
            assert info.num_ack_pending == 1, "the outreach never reached the frozen service"
            # Its pull request expires (the consumer fetches for 1 s): what follows waits in
            # the stream for the next process.
            await asyncio.sleep(1.5)
            interaction = await client.send(
                hospital,
                RecordInteraction(
                    referral_id="r1", supporter_id="s1", occurred_on=date(2024, 3, 5), minutes=30
                ),
            )
        finally:
            records.proc.kill()
            await asyncio.to_thread(records.proc.wait)
        fault_platform.start_service("records")
        await _ready(fault_platform)

        first = await client.outcome(outreach, timeout=120)
        second = await client.outcome(interaction, timeout=120)
        assert (first["type"], first["data"].get("reason_code")) == ("OutreachAccepted", None)
        assert second["type"] == "InteractionCompleted"
        assert second["data"]["implied_acceptance"] is False
    finally:
        await client.close()


# --- a 3-node cluster losing a node (last: the cluster lives as long as this module) ----------


async def test_a_cluster_losing_the_stream_leader_mid_load_loses_and_doubles_nothing(
    cluster: Cluster,  # noqa: F811 (the fixture imported above)
    make_platform: MakePlatform,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The deploy's nodes take TLS only: this process and the services trust the cluster's CA.
    monkeypatch.setenv("POST_NATS_CA_FILE", str(cluster.ca_file))
    # The stream made and settled on every node first: what is under test is losing its leader
    # mid-load; services starting during the cluster's first elections are
    # tests/integration/test_cluster_start.py's.
    nc = await cluster.connect_platform()
    try:
        await ensure_stream(nc.jetstream(), replicas=3)
        # Hospital "a" (onboarded with its key by the fixture) has its durable consumer, and
        # one fact before the node is lost: it must read it, and the next, through the loss.
        await hospitals.ensure_consumer(nc.jetstream(), "a")
        first_id = await _publish_as_platform(
            nc, "a", RegisterHospital(name="A", physician_count=5)
        )
    finally:
        await nc.close()
    await settle_stream(cluster)
    url = ",".join(
        f"tls://{tenants.PLATFORM_USER}:{PLATFORM_PASSWORD}@127.0.0.1:{port}"
        for port in cluster.client_ports
    )
    platform = await asyncio.to_thread(
        make_platform,
        url,
        {"POST_STREAM_REPLICAS": "3", "POST_NATS_CA_FILE": str(cluster.ca_file)},
    )
    lost: list[str] = []

    async def lose_the_leader(run: LoadRun) -> None:
        assert run.client is not None
        info = await run.client.js.stream_info(STREAM_NAME)
        assert info.config.num_replicas == 3 and info.cluster is not None
        leader = info.cluster.leader
        assert leader in NODES
        node = cluster.procs[NODES.index(leader)]
        node.kill()
        await asyncio.to_thread(node.wait)
        lost.append(leader)

    report = await _load_under_fault(platform, lose_the_leader, nats_url=url)
    assert lost
    _assert_nothing_lost(report, platform)
    # The hospital, with its own key, reads both answers from its consumer: the one stored
    # before the leader was lost and one of a command sent after.
    nc = await cluster.connect_platform()
    try:
        launch = LaunchDepartment(department="er", physician_count=5, launched_on=date(2024, 1, 1))
        second_id = await _publish_as_platform(nc, "a", launch)
    finally:
        await nc.close()
    errors: list[Exception] = []
    hospital_nc = await cluster.connect_as("a", errors)
    try:
        sub = await hospital_nc.jetstream().pull_subscribe_bind(
            hospitals.consumer_name("a"), stream=STREAM_NAME
        )
        causes: set[str] = set()
        deadline = asyncio.get_running_loop().time() + 60
        while {first_id, second_id} - causes:
            assert asyncio.get_running_loop().time() < deadline, "the hospital missed an answer"
            try:
                msgs = await sub.fetch(10, timeout=2.0)
            except (NatsTimeoutError, TimeoutError):
                continue
            for msg in msgs:
                causes.add(json.loads(msg.data).get("causationid"))
                await msg.ack()
    finally:
        await hospital_nc.close()


async def _publish_as_platform(nc: NATS, hospital: str, command: Command) -> str:
    """A command of `hospital`, published as its system would (the test's connection is the
    platform's: the hospital's key is for reading here)."""
    subject, body, msg_id = command_message(hospital, command)
    await nc.jetstream().publish(subject, body, headers={"Nats-Msg-Id": msg_id})
    return msg_id
