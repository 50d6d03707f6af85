"""Hospital connections (CONTRACT.md 1.2): each hospital's own NKey against a real nats-server
of the embedded default, its durable consumer, and every refusal of the contract's list.

- durable delivery: what a hospital misses while offline today (a live subscription) and gets
  from its consumer; disconnecting, not acknowledging (redelivery), a restart of every service;
- isolation: another hospital's subjects, consumer and inbox, the stream itself, the JetStream
  API that creates, changes or deletes; a revoked key, an old key after a rotation;
- the embedded default: anonymous loopback connections act as the platform, onboarding takes
  effect on the running server, a store from before (the global account) keeps its data.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, DeliverPolicy
from nats.js.errors import NotFoundError

from postctl import tenants
from shared import hospitals
from shared.client import HospitalKeys, PlatformClient
from shared.contracts import (
    STREAM_NAME,
    LaunchDepartment,
    Rank,
    RegisterHospital,
    RegisterSupporter,
    RequestReferral,
    command_message,
)
from shared.runtime import NatsServer, Platform, free_port, nats_server_binary, wait_for_port
from shared.service import ensure_stream

pytestmark = pytest.mark.integration


@dataclass
class Embedded:
    server: NatsServer
    folder: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def conf(self) -> str:
        return str(self.server.tenants_file)

    def onboard(self, hospital: str) -> Path:
        """As `postctl hospital onboard` does it on the embedded default."""
        seed = self.folder / f"{hospital}-{uuid.uuid4().hex[:6]}.nk"
        tenants.onboard_hospital(self.server.tenants_file, hospital, seed)
        assert tenants.reload_embedded(self.server.tenants_file) is True
        return seed


@pytest.fixture(scope="module")
def embedded() -> Iterator[Embedded]:
    folder = Path(tempfile.mkdtemp(prefix="post-hospitals-"))
    server = NatsServer(folder / "nats", free_port(), free_port()).start()
    try:
        yield Embedded(server, folder)
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
async def platform_nc(embedded: Embedded) -> AsyncIterator[NATS]:
    nc = await nats.connect(embedded.url)  # anonymous on loopback: the platform
    await ensure_stream(nc.jetstream())
    yield nc
    await nc.close()


async def connect_as(
    url: str, hospital: str, seed: Path, errors: list[Exception] | None = None, **options: Any
) -> NATS:
    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(exc)

    return await nats.connect(
        url,
        nkeys_seed=str(seed),
        inbox_prefix=tenants.inbox_prefix(hospital),
        error_cb=on_error,
        **options,
    )


async def refused(url: str, seed: Path, hospital: str) -> bool:
    try:
        nc = await connect_as(url, hospital, seed, allow_reconnect=False)
    except nats.errors.Error as exc:
        assert "Authorization Violation" in str(exc)
        return True
    await nc.close()
    return False


async def onboarded(embedded: Embedded, platform_nc: NATS, hospital: str) -> Path:
    seed = embedded.onboard(hospital)
    await hospitals.ensure_consumer(platform_nc.jetstream(), hospital)
    return seed


def _bodies(msgs: list[Any]) -> list[bytes]:
    return [m.data for m in msgs]


async def _fetch_all(sub: Any, expected: int, timeout: float = 10.0) -> list[Any]:
    got: list[Any] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(got) < expected and asyncio.get_running_loop().time() < deadline:
        try:
            got += await sub.fetch(expected - len(got), timeout=1)
        except nats.errors.TimeoutError:
            continue
    return got


# --- the consumer onboarding creates -------------------------------------------------------


async def test_onboarding_creates_the_contracts_consumer_once(
    embedded: Embedded, platform_nc: NATS
) -> None:
    js = platform_nc.jetstream()
    hospital = f"h-{uuid.uuid4().hex[:8]}"
    embedded.onboard(hospital)
    assert await hospitals.ensure_consumer(js, hospital) is True
    assert await hospitals.ensure_consumer(js, hospital) is False  # idempotent
    info = await js.consumer_info(STREAM_NAME, f"hospital-{hospital}")
    config = info.config
    assert config.durable_name == f"hospital-{hospital}"
    assert config.filter_subject == f"post.{hospital}.evt.>"
    assert config.deliver_policy == DeliverPolicy.ALL
    assert config.ack_policy == AckPolicy.EXPLICIT
    assert config.ack_wait == 30.0  # the contract's 30 s, what every test below shortens
    assert config.max_deliver == -1
    assert config.deliver_subject is None  # pull


async def test_a_hospital_pulls_acks_and_reads_its_own_consumer(
    embedded: Embedded, platform_nc: NATS
) -> None:
    hospital = f"h-{uuid.uuid4().hex[:8]}"
    seed = await onboarded(embedded, platform_nc, hospital)
    errors: list[Exception] = []
    nc = await connect_as(embedded.url, hospital, seed, errors)
    try:
        js = nc.jetstream()
        subject, body, msg_id = command_message(
            hospital, RegisterHospital(name="General", physician_count=10)
        )
        ack = await js.publish(subject, body, headers={"Nats-Msg-Id": msg_id})
        assert ack.stream == STREAM_NAME and ack.seq > 0
        await platform_nc.jetstream().publish(f"post.{hospital}.evt.HospitalRegistered", b"e1")
        sub = await js.pull_subscribe_bind(f"hospital-{hospital}", stream=STREAM_NAME)
        (msg,) = await _fetch_all(sub, 1)
        assert (msg.subject, msg.data) == (f"post.{hospital}.evt.HospitalRegistered", b"e1")
        await msg.ack_sync()
        info = await sub.consumer_info()
        assert info.num_ack_pending == 0 and info.num_pending == 0
        assert errors == []
    finally:
        await nc.close()


async def test_disconnected_the_hospital_gets_everything_after_its_last_ack_in_order(
    embedded: Embedded, platform_nc: NATS
) -> None:
    hospital = f"h-{uuid.uuid4().hex[:8]}"
    seed = await onboarded(embedded, platform_nc, hospital)
    js = platform_nc.jetstream()
    for i in range(3):
        await js.publish(f"post.{hospital}.evt.E", f"{i}".encode())
    nc = await connect_as(embedded.url, hospital, seed)
    sub = await nc.jetstream().pull_subscribe_bind(f"hospital-{hospital}", stream=STREAM_NAME)
    first = await _fetch_all(sub, 2)
    assert _bodies(first) == [b"0", b"1"]
    await first[0].ack_sync()  # "1" delivered, never acknowledged
    await nc.close()
    for i in range(3, 5):  # while it is away
        await js.publish(f"post.{hospital}.evt.E", f"{i}".encode())
    # Back, a new process: the unacknowledged one comes again after the ack wait (shortened
    # here), then the rest in stream order; the acknowledged one never again.
    await hospitals.ensure_consumer(js, hospital, ack_wait=1.0)
    nc = await connect_as(embedded.url, hospital, seed)
    try:
        sub = await nc.jetstream().pull_subscribe_bind(f"hospital-{hospital}", stream=STREAM_NAME)
        again = await _fetch_all(sub, 4, timeout=20)
        assert sorted(_bodies(again)) == [b"1", b"2", b"3", b"4"]
        assert [m.data for m in again if m.data != b"1"] == [b"2", b"3", b"4"]
        for msg in again:
            await msg.ack_sync()
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=2.5)  # past the ack wait: nothing comes again
    finally:
        await nc.close()


async def test_an_event_not_acknowledged_comes_back_after_the_ack_wait_until_it_is(
    embedded: Embedded, platform_nc: NATS
) -> None:
    hospital = f"h-{uuid.uuid4().hex[:8]}"
    seed = await onboarded(embedded, platform_nc, hospital)
    js = platform_nc.jetstream()
    await hospitals.ensure_consumer(js, hospital, ack_wait=1.0)
    await js.publish(f"post.{hospital}.evt.E", b"x")
    nc = await connect_as(embedded.url, hospital, seed)
    try:
        sub = await nc.jetstream().pull_subscribe_bind(f"hospital-{hospital}", stream=STREAM_NAME)
        for delivery in (1, 2, 3):
            (msg,) = await _fetch_all(sub, 1)
            assert msg.data == b"x" and msg.metadata.num_delivered == delivery
        await msg.ack_sync()
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=2.5)
    finally:
        await nc.close()


# --- isolation: every refusal of the contract's list ---------------------------------------


async def _permission_error(errors: list[Exception], subject: str) -> None:
    for _ in range(150):
        for exc in errors:
            text = str(exc).lower()
            if "permissions violation" in text and f'"{subject.lower()}"' in text:
                return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no permissions violation for {subject}: {errors}")


@pytest.fixture(scope="module")
async def pair(embedded: Embedded, platform_nc: NATS) -> dict[str, Path]:
    """Two onboarded hospitals, `a` and `b`, with an event each in the stream."""
    seeds = {h: await onboarded(embedded, platform_nc, h) for h in ("iso-a", "iso-b")}
    for h in seeds:
        await platform_nc.jetstream().publish(f"post.{h}.evt.HospitalRegistered", h.encode())
    return seeds


REFUSED_PUBLISH = [
    "post.iso-b.cmd.RequestReferral",  # another hospital's commands
    "post.iso-a.evt.HospitalRegistered",  # forging the platform's facts
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.POST",  # the stream holds every hospital's data
    "$JS.API.STREAM.MSG.GET.POST",
    "$JS.API.DIRECT.GET.POST",
    "$JS.API.DIRECT.GET.POST.post.iso-b.evt.HospitalRegistered",
    "$JS.API.STREAM.LIST",
    "$JS.API.STREAM.CREATE.MINE",
    "$JS.API.STREAM.UPDATE.POST",
    "$JS.API.STREAM.DELETE.POST",
    "$JS.API.STREAM.PURGE.POST",
    "$JS.API.CONSUMER.LIST.POST",
    "$JS.API.CONSUMER.CREATE.POST",
    "$JS.API.CONSUMER.CREATE.POST.hospital-iso-a",  # not even its own: changing it
    "$JS.API.CONSUMER.CREATE.POST.mine.post.iso-b.evt.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.POST.hospital-iso-a",
    "$JS.API.CONSUMER.DELETE.POST.hospital-iso-a",
    "$JS.API.CONSUMER.DELETE.POST.hospital-iso-b",
    "$JS.API.CONSUMER.MSG.NEXT.POST.hospital-iso-b",  # another hospital's consumer
    "$JS.API.CONSUMER.INFO.POST.hospital-iso-b",
    "$JS.ACK.POST.hospital-iso-b.1.1.1.0.0",
    "$JS.API.CONSUMER.MSG.NEXT.POST_WORK_REFERRAL.referral-p0",  # the services' consumers
    "_INBOX_iso-b.reply",
]


@pytest.mark.parametrize("subject", REFUSED_PUBLISH)
async def test_a_hospital_key_cannot_publish_outside_its_own(
    embedded: Embedded, platform_nc: NATS, pair: dict[str, Path], subject: str
) -> None:
    errors: list[Exception] = []
    nc = await connect_as(embedded.url, "iso-a", pair["iso-a"], errors)
    try:
        last = (await platform_nc.jetstream().stream_info(STREAM_NAME)).state.last_seq
        with pytest.raises(asyncio.TimeoutError):  # nothing answers: the server dropped it
            await nc.request(subject, b'{"seq": 1}', timeout=0.5)
        await _permission_error(errors, subject)
        assert (await platform_nc.jetstream().stream_info(STREAM_NAME)).state.last_seq == last
        assert await platform_nc.jetstream().consumer_info(STREAM_NAME, "hospital-iso-a")
        assert nc.is_connected  # refused, not disconnected: its own work goes on
    finally:
        await nc.close()


REFUSED_SUBSCRIBE = [
    "post.iso-b.evt.>",
    "post.*.evt.>",
    "post.>",
    "post.iso-a.cmd.>",  # its own commands, as the platform's consumers see them
    "_INBOX.>",  # the platform's replies: its pull fetches carry every hospital's data
    "_INBOX_iso-b.>",  # another hospital's replies and consumer deliveries
    "$JS.API.>",
    "$JS.ACK.>",
    ">",
]


@pytest.mark.parametrize("subject", REFUSED_SUBSCRIBE)
async def test_a_hospital_key_cannot_read_anything_but_its_own(
    embedded: Embedded, platform_nc: NATS, pair: dict[str, Path], subject: str
) -> None:
    errors: list[Exception] = []
    nc = await connect_as(embedded.url, "iso-a", pair["iso-a"], errors)
    try:
        received = []

        async def on_message(msg: Any) -> None:
            received.append(msg.subject)

        await nc.subscribe(subject, cb=on_message)
        await nc.flush()
        await _permission_error(errors, subject)
        await platform_nc.jetstream().publish("post.iso-b.evt.HospitalRegistered", b"{}")
        await platform_nc.publish("_INBOX.probe.x", b"")
        await platform_nc.publish("_INBOX_iso-b.probe.x", b"")
        await platform_nc.flush()
        await asyncio.sleep(0.3)
        assert received == []
    finally:
        await nc.close()


async def test_a_hospital_cannot_bind_to_another_hospitals_consumer(
    embedded: Embedded, platform_nc: NATS, pair: dict[str, Path]
) -> None:
    errors: list[Exception] = []
    nc = await connect_as(embedded.url, "iso-a", pair["iso-a"], errors)
    try:
        sub = await nc.jetstream().pull_subscribe_bind("hospital-iso-b", stream=STREAM_NAME)
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=1)
        await _permission_error(errors, "$JS.API.CONSUMER.MSG.NEXT.POST.hospital-iso-b")
        info = await platform_nc.jetstream().consumer_info(STREAM_NAME, "hospital-iso-b")
        assert info.delivered.stream_seq == 0  # b's event went nowhere
    finally:
        await nc.close()


async def test_a_rotated_key_is_refused_and_its_connection_closed_within_the_reload(
    embedded: Embedded, platform_nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POST_NATS_URL", embedded.url)
    hospital = f"h-{uuid.uuid4().hex[:8]}"
    old = await onboarded(embedded, platform_nc, hospital)
    closed = asyncio.Event()

    async def on_disconnect() -> None:
        closed.set()

    nc = await connect_as(
        embedded.url, hospital, old, disconnected_cb=on_disconnect, max_reconnect_attempts=2
    )
    try:
        # The operator's command, to its return (the embedded server has reloaded by then).
        new = tmp_path / "new.nk"
        _postctl("hospital", "onboard", hospital, "--out", str(new), "--conf", embedded.conf)
        assert await refused(embedded.url, old, hospital)
        await asyncio.wait_for(closed.wait(), timeout=5)
        assert not nc.is_connected
        assert not await refused(embedded.url, new, hospital)
        # The consumer is the same one: what it had is there for the new key.
        assert await platform_nc.jetstream().consumer_info(STREAM_NAME, f"hospital-{hospital}")
    finally:
        await nc.close()


async def test_revoke_refuses_the_key_and_keeps_the_consumer_offboard_removes_both(
    embedded: Embedded, platform_nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POST_NATS_URL", embedded.url)
    hospital = f"h-{uuid.uuid4().hex[:8]}"
    seed = await onboarded(embedded, platform_nc, hospital)
    assert not await refused(embedded.url, seed, hospital)
    _postctl("hospital", "onboard", hospital, "--revoke", "--conf", embedded.conf)
    assert await refused(embedded.url, seed, hospital)
    js = platform_nc.jetstream()
    assert await js.consumer_info(STREAM_NAME, f"hospital-{hospital}")
    _postctl("hospital", "offboard", hospital, "--conf", embedded.conf)
    with pytest.raises(NotFoundError):
        await js.consumer_info(STREAM_NAME, f"hospital-{hospital}")
    assert hospital not in tenants.read_tenants_file(embedded.server.tenants_file)


def _postctl(*argv: str) -> None:
    """A postctl command in this process, as an operator runs it (its NATS: POST_NATS_URL)."""
    parser = argparse.ArgumentParser(prog="postctl")
    tenants.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    args.func(args)


# --- the embedded default ------------------------------------------------------------------


async def test_anonymous_loopback_connections_act_as_the_platform(
    embedded: Embedded, platform_nc: NATS
) -> None:
    nc = await nats.connect(embedded.url)
    try:
        info = await nc.jetstream().stream_info(STREAM_NAME)
        assert info.config.subjects == ["post.>"]
    finally:
        await nc.close()


async def test_a_store_from_before_keeps_its_stream_and_consumers(tmp_path: Path) -> None:
    """Before 1.2 the embedded server had no accounts: the stream lived in `$G`."""
    folder = tmp_path / "nats"
    folder.mkdir()
    port = free_port()
    old_conf = folder / "old.conf"
    old_conf.write_text(
        f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{folder}" }}\n'
        "server_name: post-embedded\n"
    )
    proc = subprocess.Popen([nats_server_binary(), "--config", str(old_conf)])
    try:
        wait_for_port(port, proc=proc)
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream()
        await ensure_stream(js)
        for i in range(3):
            await js.publish(f"post.old.evt.E{i}", b"kept")
        await js.add_consumer(STREAM_NAME, hospitals.consumer_config("old"))
        await nc.close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert (folder / "jetstream" / "$G").is_dir()
    server = NatsServer(folder, free_port(), free_port()).start()
    try:
        nc = await nats.connect(server.url)
        info = await nc.jetstream().stream_info(STREAM_NAME)
        assert info.state.messages == 3
        consumer = await nc.jetstream().consumer_info(STREAM_NAME, "hospital-old")
        assert consumer.num_pending == 3
        await nc.close()
    finally:
        server.stop()
    assert not (folder / "jetstream" / "$G").exists()


async def test_the_platforms_start_creates_the_consumers_of_hospitals_onboarded_while_down(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "nats"
    folder.mkdir()
    tenants.onboard_hospital(folder / "tenants.conf", "early", tmp_path / "early.nk")
    assert tenants.reload_embedded(folder / "tenants.conf") is None  # nothing runs yet
    plat = Platform(data_dir=tmp_path, nats_port=free_port(), nats_monitor_port=free_port())
    plat.nats = NatsServer(folder, plat.nats_port, plat.nats_monitor_port).start()
    try:
        nc = await nats.connect(plat.nats_url)
        await ensure_stream(nc.jetstream())  # as the services do when they start
        assert plat.sync_hospitals() == ["early"]
        assert plat.sync_hospitals() == []
        assert await nc.jetstream().consumer_info(STREAM_NAME, "hospital-early")
        await nc.close()
        assert not await refused(plat.nats_url, tmp_path / "early.nk", "early")
    finally:
        plat.nats.stop()


# --- with the services: what a hospital offline loses today, and keeps now ----------------


async def test_a_hospital_offline_when_its_supporter_is_assigned_gets_it_from_its_consumer(
    stack: Platform,
) -> None:
    assert stack.nats is not None
    hospital = f"h-{uuid.uuid4().hex[:10]}"
    seed = stack.data_dir / f"{hospital}.nk"
    tenants.onboard_hospital(stack.nats.tenants_file, hospital, seed)
    assert tenants.reload_embedded(stack.nats.tenants_file)
    platform = await nats.connect(stack.nats_url)
    await hospitals.ensure_consumer(platform.jetstream(), hospital)
    nc = await connect_as(stack.nats_url, hospital, seed)
    live = await nc.subscribe(f"post.{hospital}.evt.>")
    js = nc.jetstream()
    department = "emergency"
    commands = [
        RegisterHospital(name="General", physician_count=100),
        LaunchDepartment(department=department, physician_count=20, launched_on=date(2024, 1, 1)),
        RegisterSupporter(
            supporter_id="s-1",
            department=department,
            rank=Rank.attending,
            interventional=True,
            trained_on=date(2024, 2, 1),
        ),
    ]
    for command in commands:
        subject, body, msg_id = command_message(hospital, command)
        await js.publish(subject, body, headers={"Nats-Msg-Id": msg_id})
    # Wait until the supporter is known, as a careful hospital would (from its live events).
    seen: list[str] = []
    while "SupporterTrained" not in seen:
        seen.append(json.loads((await live.next_msg(timeout=20)).data)["type"])
    referral = RequestReferral(
        referral_id="r-1",
        physician_id="p-1",
        department=department,
        rank=Rank.resident,
        source="self",
        event_nature="other",
        requested_at=datetime.now(UTC) - timedelta(minutes=5),
    )
    subject, body, msg_id = command_message(hospital, referral)
    await js.publish(subject, body, headers={"Nats-Msg-Id": msg_id})
    await nc.close()  # the hospital's process goes down right after its request
    assigned_subject = f"post.{hospital}.evt.SupporterAssigned"
    for _ in range(200):  # the platform assigns meanwhile
        try:
            await platform.jetstream().get_last_msg(STREAM_NAME, assigned_subject)
            break
        except NotFoundError:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("no SupporterAssigned")
    # Today's way, back up: a live subscription never sees what was published while away.
    nc = await connect_as(stack.nats_url, hospital, seed)
    try:
        live = await nc.subscribe(f"post.{hospital}.evt.>")
        await nc.flush()
        with pytest.raises(nats.errors.TimeoutError):
            await live.next_msg(timeout=1)
        # The durable consumer has all of it, the assignment included.
        sub = await nc.jetstream().pull_subscribe_bind(f"hospital-{hospital}", stream=STREAM_NAME)
        types: list[str] = []
        while "SupporterAssigned" not in types:
            for msg in await sub.fetch(50, timeout=5):
                types.append(json.loads(msg.data)["type"])
                await msg.ack()
        assert types[:3] == ["HospitalRegistered", "DepartmentLaunched", "SupporterTrained"]
        assert "ReferralCreated" in types
    finally:
        await nc.close()
        await platform.close()


async def test_the_clients_puller_of_a_closed_hospital_connection_ends(
    embedded: Embedded, platform_nc: NATS
) -> None:
    """`PlatformClient`'s puller of a hospital whose connection closed for good ends by
    itself, and the client closes: a puller that took the closed connection for a passing
    failure polled it forever, and a cancellation lost in its fetch hung the client's close
    (a CI run's test session never ended)."""
    keys = HospitalKeys(embedded.server.tenants_file, embedded.folder / "client-keys")
    client = await PlatformClient.connect(embedded.url, keys=keys)
    try:
        await client.as_hospital("closed-for-good")
        opened = client._hospitals["closed-for-good"]
        await opened.nc.close()
        await asyncio.wait_for(asyncio.shield(opened.puller), 5)
    finally:
        await asyncio.wait_for(client.close(), 10)
