"""The production-like deployment, checked with the real tools on the files themselves.

- nats-server validates each cluster node config (``nats-server -t``);
- a 3-node cluster runs from those very files (only addresses and the folders of the store and
  the certificates moved to this machine; certificates from ``postctl certs``, over TLS), with
  hospitals onboarded by ``postctl hospital onboard``, and proves the tenant isolation: a
  hospital does its own business and nothing of another's;
- a real service, with the settings docker-compose.yml gives it, runs on that cluster;
- docker-compose.yml parses, every service has a health check, and every file it points at
  exists; Prometheus and Grafana point at what compose runs; only the TLS proxy and the NATS
  client ports are published, and every URL that crosses the network is TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import stat
import subprocess
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats
import nats.errors
import nats.js.errors
import pytest
import yaml
from nats.aio.client import Client as NATS
from nats.js.errors import NoStreamResponseError, NotFoundError

from postctl import certs, tenants
from shared import hospitals
from shared.client import PlatformClient
from shared.contracts import RegisterHospital
from shared.runtime import Platform, ServiceProcess, free_port, nats_server_binary, wait_for_port
from shared.service import ensure_stream
from shared.settings import SERVICE_PORTS, nats_tls

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NATS_DIR = DEPLOY / "nats"
NODES = ("nats-1", "nats-2", "nats-3")
SERVICES = tuple(SERVICE_PORTS)
PLATFORM_PASSWORD = "platform-test-password-1234"
STORE_DIR_LINE = 'store_dir: "/data/jetstream"'
CERTS_MOUNT = "/etc/post/certs/"  # where compose mounts deploy/certs in every container


def deploy_nats_copy(folder: Path) -> Path:
    """deploy/nats copied into folder/nats, with certificates from `postctl certs` in
    folder/certs and the configs pointing there (where compose mounts them); returns the
    certificates' folder."""
    shutil.copytree(NATS_DIR, folder / "nats")
    certs.write_certs(folder / "certs")
    for node in NODES:
        conf = folder / "nats" / f"{node}.conf"
        text = conf.read_text()
        assert CERTS_MOUNT in text, "the node's certificates are where compose mounts them"
        conf.write_text(text.replace(CERTS_MOUNT, f"{folder / 'certs'}/"))
    return folder / "certs"


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# --- the node configs, validated by nats-server -------------------------------------------


@pytest.mark.parametrize("node", NODES)
def test_each_cluster_node_config_validates(node: str, tmp_path: Path) -> None:
    deploy_nats_copy(tmp_path / "deploy")
    # Run from elsewhere: the include of tenants.conf must resolve relative to the file.
    result = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(tmp_path / "deploy" / "nats" / f"{node}.conf")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, tenants.PLATFORM_PASSWORD_VARIABLE: PLATFORM_PASSWORD},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout + result.stderr


def test_platform_password_comes_from_the_environment_only(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != tenants.PLATFORM_PASSWORD_VARIABLE}
    deploy_nats_copy(tmp_path / "deploy")
    result = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(tmp_path / "deploy" / "nats" / "nats-1.conf")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=30,
    )
    assert result.returncode != 0
    assert tenants.PLATFORM_PASSWORD_VARIABLE in result.stderr


def test_committed_tenants_file_is_generated_and_holds_no_hospital_secret() -> None:
    assert tenants.read_tenants((NATS_DIR / "tenants.conf").read_text()) == {}


# --- postctl/tenants.py, pure ---------------------------------------------------------------


def test_hospital_permissions_are_its_own_commands_consumer_events_and_inbox() -> None:
    assert tenants.hospital_permissions("st-mary") == {
        "publish": {
            "allow": [
                "post.st-mary.cmd.>",
                "$JS.API.CONSUMER.MSG.NEXT.POST.hospital-st-mary",
                "$JS.API.CONSUMER.INFO.POST.hospital-st-mary",
                "$JS.ACK.POST.hospital-st-mary.>",
            ]
        },
        "subscribe": {"allow": ["post.st-mary.evt.>", "_INBOX_st-mary.>"]},
    }


@pytest.mark.parametrize("bad", ["", "A", "-x", "a.b", "a>", "a*", "x" * 64, "a b"])
def test_a_hospital_id_that_is_not_a_slug_is_refused(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        tenants.hospital_permissions(bad)
    with pytest.raises(ValueError):
        tenants.onboard_hospital(tmp_path / "tenants.conf", bad, tmp_path / "seed")


def test_render_and_read_round_trip_in_hospital_order() -> None:
    keys = {h: tenants.public_key(tenants.new_user_seed()) for h in ("b", "a")}
    text = tenants.render_tenants_conf(keys)
    assert tenants.read_tenants(text) == keys
    assert text.index("# hospital a") < text.index("# hospital b")


@pytest.mark.parametrize("bad", ["password-longer-than-16", "SU" + "A" * 56, 'U"quote'])
def test_anything_but_a_public_user_key_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        tenants.render_tenants_conf({"a": bad})


def test_a_hand_edited_tenants_file_is_not_overwritten(tmp_path: Path) -> None:
    conf = tmp_path / "tenants.conf"
    tenants.onboard_hospital(conf, "a", tmp_path / "a.nk")
    conf.write_text(conf.read_text().replace("jetstream: enabled", "jetstream: disabled"))
    with pytest.raises(ValueError, match="by hand"):
        tenants.onboard_hospital(conf, "b", tmp_path / "b.nk")


def test_onboarding_keeps_only_the_public_key_and_writes_the_seed_private(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "tenants.conf"
    shutil.copy(NATS_DIR / "tenants.conf", conf)
    seed_file = tmp_path / "st-mary.nk"
    key, rotated = tenants.onboard_hospital(conf, "st-mary", seed_file)
    seed = seed_file.read_bytes().strip()
    assert not rotated and seed.startswith(b"SU") and key.startswith("U")
    assert tenants.public_key(seed) == key
    assert tenants.read_tenants(conf.read_text()) == {"st-mary": key}
    assert seed.decode() not in conf.read_text()  # nothing stored can log in as the hospital
    assert stat.S_IMODE(seed_file.stat().st_mode) == 0o600
    # Again: a new key, the old one gone from the file.
    new_key, rotated = tenants.onboard_hospital(conf, "st-mary", tmp_path / "again.nk")
    assert rotated and new_key != key
    assert tenants.read_tenants(conf.read_text()) == {"st-mary": new_key}
    assert tenants.revoke_hospital(conf, "st-mary")
    assert tenants.read_tenants(conf.read_text()) == {}
    assert not tenants.revoke_hospital(conf, "st-mary")


def test_postctl_hospital_onboard_writes_the_seed_and_says_how_to_reload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # NATS is not there: the consumer is left to `postctl hospital sync`, and it says so.
    monkeypatch.setenv("POST_NATS_URL", f"nats://127.0.0.1:{free_port()}")
    parser = argparse.ArgumentParser(prog="postctl")
    tenants.add_cli(parser.add_subparsers(dest="command", required=True))
    conf = tmp_path / "tenants.conf"
    seed = tmp_path / "out" / "st-mary.nk"
    args = parser.parse_args(
        ["hospital", "onboard", "st-mary", "--conf", str(conf), "--out", str(seed)]
    )
    args.func(args)
    key = tenants.read_tenants(conf.read_text())["st-mary"]
    assert tenants.public_key(seed.read_bytes().strip()) == key
    out = capsys.readouterr().out
    assert seed.read_text().strip() not in out  # the seed goes to the file only
    assert "post.st-mary.cmd." in out and "_INBOX_st-mary" in out and "hospital-st-mary" in out
    assert "kill -s HUP" in out and "postctl hospital sync" in out
    with pytest.raises(SystemExit, match="--out"):
        args = parser.parse_args(["hospital", "onboard", "st-mary", "--conf", str(conf)])
        args.func(args)


# --- a real 3-node cluster from the deploy configs -----------------------------------------


@dataclass
class Cluster:
    folder: Path
    client_ports: list[int]
    monitor_ports: list[int]
    seeds: dict[str, Path]
    ca_file: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self, node: int = 0) -> str:
        return f"tls://127.0.0.1:{self.client_ports[node]}"

    @property
    def tls(self) -> Any:
        """The services' TLS context: our CA only (shared/settings.py nats_tls)."""
        return nats_tls(self.ca_file)

    @property
    def servers(self) -> list[str]:
        return [self.url(i) for i in range(len(self.client_ports))]

    async def connect_as(self, hospital: str, errors: list[Exception]) -> NATS:
        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        return await nats.connect(
            self.servers,
            nkeys_seed=str(self.seeds[hospital]),
            inbox_prefix=tenants.inbox_prefix(hospital),
            error_cb=on_error,
            name=f"hospital-{hospital}",
            tls=self.tls,
        )

    async def connect_platform(self) -> NATS:
        return await nats.connect(
            self.servers, user=tenants.PLATFORM_USER, password=PLATFORM_PASSWORD, tls=self.tls
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("nats-cluster")
    # The deploy folder as it is, with two hospitals onboarded the operator's way.
    certs_dir = deploy_nats_copy(folder)
    seeds = {h: folder / f"{h}.nk" for h in ("a", "b")}
    for hospital, seed in seeds.items():
        tenants.onboard_hospital(folder / "nats" / "tenants.conf", hospital, seed)
    for i, node in enumerate(NODES):
        conf = folder / "nats" / f"{node}.conf"
        text = conf.read_text()
        assert text.count(STORE_DIR_LINE) == 1, "the test moves exactly this line"
        # nats-server has no flag that may override a configured store_dir.
        conf.write_text(text.replace(STORE_DIR_LINE, f'store_dir: "{folder / f"data-{i}"}"'))
    client_ports = [free_port() for _ in NODES]
    monitor_ports = [free_port() for _ in NODES]
    route_ports = [free_port() for _ in NODES]
    routes = ",".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
    env = {**os.environ, tenants.PLATFORM_PASSWORD_VARIABLE: PLATFORM_PASSWORD}
    cluster = Cluster(folder, client_ports, monitor_ports, seeds, certs_dir / certs.CA_CERT)
    try:
        for i, node in enumerate(NODES):
            log = open(folder / f"{node}.log", "wb")
            cluster.procs.append(
                subprocess.Popen(
                    [
                        nats_server_binary(),
                        "--config",
                        str(folder / "nats" / f"{node}.conf"),
                        "--addr",
                        "127.0.0.1",
                        "--port",
                        str(client_ports[i]),
                        "--http_port",
                        str(monitor_ports[i]),
                        "--cluster",
                        f"nats://127.0.0.1:{route_ports[i]}",
                        "--routes",
                        routes,
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        for port, proc in zip(client_ports, cluster.procs, strict=True):
            wait_for_port(port, proc=proc)
        yield cluster
    finally:
        for proc in cluster.procs:
            proc.terminate()
        for proc in cluster.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
async def platform_nc(cluster: Cluster) -> AsyncIterator[NATS]:
    # As compose's health check: each node's /healthz is ok once JetStream is current.
    for port in cluster.monitor_ports:
        await _wait_healthy(port)
    nc = await cluster.connect_platform()
    await ensure_stream(nc.jetstream(), replicas=3)
    await settle_stream(cluster)
    yield nc
    await nc.close()


async def settle_stream(cluster: Cluster, timeout: float = 30.0) -> None:
    """A new R3 stream elects its own leader and catches its replicas up; until then a node's
    /healthz says 503 and a publish through a node may find no responder. Wait until every
    node is healthy and takes a publish (as compose's health checks do before the services)."""
    deadline = asyncio.get_running_loop().time() + timeout
    for node, port in enumerate(cluster.monitor_ports):
        await _wait_healthy(port, timeout)
        nc = await nats.connect(
            cluster.url(node),
            user=tenants.PLATFORM_USER,
            password=PLATFORM_PASSWORD,
            tls=cluster.tls,
        )
        try:
            while True:
                try:
                    await nc.jetstream().publish(f"post.probe-{node}.evt.ClusterReady", b"{}")
                    break
                except (nats.errors.TimeoutError, NoStreamResponseError):
                    assert asyncio.get_running_loop().time() < deadline, "the stream never settled"
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()


async def _wait_healthy(monitor_port: int, timeout: float = 30.0) -> None:
    def status() -> int:
        url = f"http://127.0.0.1:{monitor_port}/healthz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)

    for _ in range(int(timeout / 0.1)):
        try:
            if await asyncio.to_thread(status) == 200:
                return
        except OSError:  # HTTPError (503) included
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"nats monitoring on {monitor_port} never became healthy")


async def _permission_error(errors: list[Exception], subject: str) -> str:
    """Waits for the server's permissions violation that names the subject."""
    for _ in range(100):
        for exc in errors:
            text = str(exc).lower()
            if "permissions violation" in text and f'"{subject.lower()}"' in text:
                return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"no permissions violation for {subject}: {errors}")


async def _last_stored(nc: NATS, subject: str) -> int:
    """The stream sequence of the last message stored on the subject (0: none)."""
    try:
        return int((await nc.jetstream().get_last_msg("POST", subject)).seq or 0)
    except NotFoundError:
        return 0


async def test_the_cluster_holds_the_post_stream_with_three_replicas(
    cluster: Cluster, platform_nc: NATS
) -> None:
    info = await platform_nc.jetstream().stream_info("POST")
    assert info.config.subjects == ["post.>"]
    assert info.config.num_replicas == 3
    assert info.cluster is not None and info.cluster.name == "post"
    members = {info.cluster.leader} | {peer.name for peer in info.cluster.replicas or []}
    assert members == set(NODES)
    for port in cluster.monitor_ports:  # each node's monitoring endpoint, as the exporter reads
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert json.loads(resp.read())["status"] == "ok"


async def test_a_hospital_publishes_its_own_commands_and_gets_the_stream_ack(
    cluster: Cluster, platform_nc: NATS
) -> None:
    errors: list[Exception] = []
    nc = await cluster.connect_as("a", errors)
    try:
        subject = "post.a.cmd.RegisterHospital"
        ack = await nc.jetstream().publish(
            subject, b"{}", headers={"Nats-Msg-Id": uuid.uuid4().hex}, timeout=5
        )
        assert ack.stream == "POST" and ack.seq > 0
        stored = await platform_nc.jetstream().get_msg("POST", ack.seq)
        assert stored.subject == subject
        assert errors == []
    finally:
        await nc.close()


async def test_a_hospital_receives_its_own_events(cluster: Cluster, platform_nc: NATS) -> None:
    errors: list[Exception] = []
    nc = await cluster.connect_as("a", errors)
    try:
        sub = await nc.subscribe("post.a.evt.>")
        await nc.flush()
        marker = uuid.uuid4().hex.encode()
        # The subscription's interest reaches the other nodes a moment after its flush: an
        # event published before that is routed nowhere, so publish until one arrives.
        for _ in range(20):
            await platform_nc.jetstream().publish("post.a.evt.HospitalRegistered", marker)
            try:
                msg = await sub.next_msg(timeout=0.5)
                break
            except nats.errors.TimeoutError:
                continue
        assert (msg.subject, msg.data) == ("post.a.evt.HospitalRegistered", marker)
        assert errors == []
    finally:
        await nc.close()


@pytest.mark.parametrize(
    "subject",
    [
        "post.b.cmd.RequestReferral",  # another hospital's commands
        "post.a.evt.HospitalRegistered",  # forging the platform's facts
        "post.a.dlq.RequestReferral",
        "$JS.API.STREAM.INFO.POST",  # the stream holds every hospital's data
        "$JS.API.STREAM.MSG.GET.POST",
    ],
)
async def test_a_hospital_cannot_publish_outside_its_commands(
    cluster: Cluster, platform_nc: NATS, subject: str
) -> None:
    errors: list[Exception] = []
    before = await _last_stored(platform_nc, subject) if subject.startswith("post.") else 0
    nc = await cluster.connect_as("a", errors)
    try:
        with pytest.raises(asyncio.TimeoutError):  # nothing answers: the server dropped it
            await nc.request(subject, b'{"seq": 1}', timeout=0.3)
        await _permission_error(errors, subject)
        if subject.startswith("post."):
            assert await _last_stored(platform_nc, subject) == before
        assert nc.is_connected  # refused, not disconnected: its own work goes on
        ack = await nc.jetstream().publish("post.a.cmd.RecordOutreach", b"{}", timeout=5)
        assert ack.stream == "POST"
    finally:
        await nc.close()


@pytest.mark.parametrize(
    "subject",
    [
        "post.b.evt.>",  # another hospital's events
        "post.b.evt.HospitalRegistered",
        "post.*.evt.>",
        "post.>",
        "post.a.cmd.>",  # its own commands, as the platform's consumers see them
        "_INBOX.>",  # the platform's replies: its pull fetches carry every hospital's data
        "_INBOX_b.>",  # another hospital's acks
    ],
)
async def test_a_hospital_cannot_read_anything_but_its_events(
    cluster: Cluster, platform_nc: NATS, subject: str
) -> None:
    errors: list[Exception] = []
    nc = await cluster.connect_as("a", errors)
    try:
        received = []

        async def on_message(msg: Any) -> None:
            received.append(msg.subject)

        await nc.subscribe(subject, cb=on_message)
        await nc.flush()
        await _permission_error(errors, subject)
        js = platform_nc.jetstream()
        await js.publish("post.b.evt.HospitalRegistered", b"{}")
        await js.publish("post.a.cmd.RegisterHospital", b"{}")
        await platform_nc.publish("_INBOX.probe.x", b"")
        await platform_nc.publish("_INBOX_b.probe.x", b"")
        await platform_nc.flush()
        await asyncio.sleep(0.3)
        assert received == []
    finally:
        await nc.close()


async def test_another_hospital_does_its_own_business_too(
    cluster: Cluster, platform_nc: NATS
) -> None:
    errors: list[Exception] = []
    nc = await cluster.connect_as("b", errors)
    try:
        sub = await nc.subscribe("post.b.evt.>")
        await nc.flush()
        ack = await nc.jetstream().publish("post.b.cmd.RegisterHospital", b"{}", timeout=5)
        assert ack.stream == "POST"
        await platform_nc.jetstream().publish("post.b.evt.HospitalRegistered", b"b")
        assert (await sub.next_msg(timeout=5)).data == b"b"
        with pytest.raises(asyncio.TimeoutError):
            await nc.jetstream().publish("post.a.cmd.RegisterHospital", b"{}", timeout=0.5)
        await _permission_error(errors, "post.a.cmd.RegisterHospital")
    finally:
        await nc.close()


@pytest.mark.parametrize("credentials", ["none", "unknown key", "hospital as a password user"])
async def test_a_deployment_refuses_any_connection_without_a_known_key(
    cluster: Cluster, platform_nc: NATS, credentials: str, tmp_path: Path
) -> None:
    options: dict[str, Any] = {}
    if credentials == "unknown key":
        seed = tmp_path / "unknown.nk"
        seed.write_bytes(tenants.new_user_seed())
        options["nkeys_seed"] = str(seed)
    elif credentials == "hospital as a password user":
        options.update(user="a", password="a-guessed-password")
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(
            cluster.url(),
            allow_reconnect=False,
            max_reconnect_attempts=0,
            tls=cluster.tls,
            **options,
        )


# --- a real service with the compose settings, on that cluster -----------------------------


def _compose_environment(service: str, cluster: Cluster, database_url: str) -> dict[str, str]:
    """The service's environment from docker-compose.yml, moved to this machine."""
    env = {k: str(v) for k, v in _compose()["services"][service]["environment"].items()}
    env = {
        k: v.replace("${POST_NATS_PLATFORM_PASSWORD}", PLATFORM_PASSWORD) for k, v in env.items()
    }
    # `${VAR:-default}` as compose reads it with VAR unset in .env: the default
    env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v) for k, v in env.items()}
    for i, node in enumerate(NODES):
        env["POST_NATS_URL"] = env["POST_NATS_URL"].replace(
            f"@{node}:4222", f"@127.0.0.1:{cluster.client_ports[i]}"
        )
    assert "${" not in env["POST_NATS_URL"] and "nats-" not in env["POST_NATS_URL"]
    assert env["POST_NATS_CA_FILE"] == f"{CERTS_MOUNT}{certs.CA_CERT}"
    env["POST_NATS_CA_FILE"] = str(cluster.ca_file)
    env["POST_DATABASE_URL"] = database_url  # the test PostgreSQL, its own database
    env["POST_HTTP_HOST"] = "127.0.0.1"
    env[f"POST_{service.upper()}_PORT"] = str(free_port())
    return env


async def _fresh_database(platform: Platform) -> str:
    name = f"deploy_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(platform.db_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return platform.db_url.rsplit("/", 1)[0] + f"/{name}"


async def _wait_ready(port: int, process: ServiceProcess, timeout: float = 60.0) -> None:
    def get() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return int(resp.status)

    for _ in range(int(timeout / 0.2)):
        if not process.alive():
            tail = process.log_path.read_text()[-3000:] if process.log_path.exists() else ""
            raise AssertionError(f"the service exited:\n{tail}")
        try:
            if await asyncio.to_thread(get) == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError("the service did not become ready")


async def test_a_service_with_the_compose_settings_serves_a_hospital_on_the_cluster(
    cluster: Cluster, platform_nc: NATS, platform: Platform
) -> None:
    env = _compose_environment("matching", cluster, await _fresh_database(platform))
    assert env["POST_STREAM_REPLICAS"] == "3"
    process = ServiceProcess("matching", env, cluster.folder / "matching.log").start()
    client = None
    try:
        await _wait_ready(int(env["POST_MATCHING_PORT"]), process)
        # The hospital connects exactly as docs/hospital-integration.md says.
        client = await PlatformClient.connect(
            cluster.url(1),
            subject="post.a.evt.>",
            nkeys_seed=str(cluster.seeds["a"]),
            inbox_prefix=tenants.inbox_prefix("a"),
            tls=cluster.tls,
        )
        answer = await client.send_and_wait(
            "a", RegisterHospital(name="General", physician_count=120), timeout=20
        )
        assert answer["type"] == "HospitalRegistered"
        assert answer["_subject"] == "post.a.evt.HospitalRegistered"
        info = await platform_nc.jetstream().stream_info("POST")
        assert info.config.num_replicas == 3
    finally:
        if client is not None:
            await client.close()
        process.stop()


async def test_a_hospitals_consumer_survives_the_loss_of_a_node(
    cluster: Cluster, platform_nc: NATS
) -> None:
    """Last of the cluster tests: it kills a node (the consumer's leader)."""
    js = platform_nc.jetstream()
    await hospitals.ensure_consumer(js, "a")
    info = await js.consumer_info("POST", "hospital-a")
    assert info.cluster is not None and len(info.cluster.replicas or []) == 2  # R3, as the stream
    marker = uuid.uuid4().hex
    await js.publish("post.a.evt.NodeLoss", f"{marker}-before".encode())
    node = NODES.index(info.cluster.leader or "")
    cluster.procs[node].kill()
    cluster.procs[node].wait()
    survivors = [cluster.url(i) for i in range(len(NODES)) if i != node]
    platform = await nats.connect(
        survivors, user=tenants.PLATFORM_USER, password=PLATFORM_PASSWORD, tls=cluster.tls
    )
    nc = await nats.connect(
        survivors,
        nkeys_seed=str(cluster.seeds["a"]),
        inbox_prefix=tenants.inbox_prefix("a"),
        tls=cluster.tls,
    )
    try:
        for _ in range(150):  # the survivors elect new leaders first
            try:
                await platform.jetstream().publish(
                    "post.a.evt.NodeLoss", f"{marker}-after".encode(), timeout=1
                )
                break
            except (nats.errors.TimeoutError, NoStreamResponseError):
                await asyncio.sleep(0.2)
        sub = await nc.jetstream().pull_subscribe_bind("hospital-a", stream="POST")
        seen: list[bytes] = []
        deadline = asyncio.get_running_loop().time() + 60
        while asyncio.get_running_loop().time() < deadline:
            if {f"{marker}-before".encode(), f"{marker}-after".encode()} <= set(seen):
                break
            try:
                for msg in await sub.fetch(50, timeout=1):
                    seen.append(msg.data)
                    await msg.ack()
            except nats.errors.TimeoutError:
                continue
            except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
                await asyncio.sleep(0.2)  # the consumer elects its new leader
        mine = [d for d in seen if d.startswith(marker.encode())]
        assert mine == [f"{marker}-before".encode(), f"{marker}-after".encode()]
    finally:
        await nc.close()
        await platform.close()


# --- docker-compose.yml and the files it points at ------------------------------------------


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of each bind mount; named volumes left out."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def _host_path(service: dict[str, Any], container_path: str) -> Path:
    """The file in this repository that a container sees at container_path."""
    for source, target in _mounts(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return ROOT / source / container_path[len(target) :].lstrip("/")
    raise AssertionError(f"nothing is mounted at {container_path}")


def test_compose_runs_the_whole_platform() -> None:
    services = _compose()["services"]
    expected = {*NODES, "postgres", *SERVICES, "prometheus", "grafana", "proxy", "jaeger"}
    expected |= {f"nats-exporter-{i}" for i in (1, 2, 3)}
    assert set(services) == expected


def test_every_compose_service_has_a_health_check_and_a_restart_policy() -> None:
    for name, service in _compose()["services"].items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), name
        assert service.get("restart") == "unless-stopped", name


def test_every_file_compose_points_at_exists() -> None:
    for name, service in _compose()["services"].items():
        for source, _ in _mounts(service):
            if source.startswith("./deploy/certs/"):  # made per deployment, never committed
                assert source.removeprefix("./deploy/certs/") in certs.files(), source
                continue
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            context = ROOT / build["context"]
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name} builds from missing {dockerfile}"
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY ") and "--from=" not in line:
                    for source in line.split()[1:-1]:
                        assert (context / source).exists(), f"{dockerfile} copies {source}"


def test_the_four_services_share_one_image_and_the_settings_of_a_cluster() -> None:
    services = _compose()["services"]
    images = {services[name]["image"] for name in SERVICES}
    assert len(images) == 1
    for name, port in SERVICE_PORTS.items():
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["command"] == ["python", "-m", f"services.{name}"]
        # Reached through the TLS proxy only: no port of its own (deploy/proxy/Caddyfile).
        assert service["deploy"]["replicas"] >= 2
        assert "ports" not in service
        assert f"http://127.0.0.1:{port}/readyz" in " ".join(service["healthcheck"]["test"])
        env = service["environment"]
        assert env["POST_STREAM_REPLICAS"] == "3"
        assert env["POST_HTTP_HOST"] == "0.0.0.0"
        assert env["POST_DATABASE_URL"].split("?")[0].endswith("@postgres:5432/post")
        assert "sslmode=verify-full&sslrootcert=/etc/post/certs/ca.pem" in env["POST_DATABASE_URL"]
        servers = env["POST_NATS_URL"].split(",")
        assert [s.rsplit("@", 1)[1] for s in servers] == [f"{n}:4222" for n in NODES]
        assert all(s.startswith(f"tls://{tenants.PLATFORM_USER}:") for s in servers)
        assert env["POST_NATS_CA_FILE"] == f"{CERTS_MOUNT}{certs.CA_CERT}"
        assert _host_path(service, env["POST_NATS_CA_FILE"]) == ROOT / "deploy/certs/ca.pem"
        assert set(service["depends_on"]) == {*NODES, "postgres"}
        assert all(d["condition"] == "service_healthy" for d in service["depends_on"].values())


def test_each_nats_node_runs_its_own_config() -> None:
    services = _compose()["services"]
    for node in NODES:
        service = services[node]
        config = service["command"][service["command"].index("--config") + 1]
        assert _host_path(service, config) == NATS_DIR / f"{node}.conf"
        assert "/data" in [v.split(":")[1] for v in service["volumes"]]  # the store survives
        assert tenants.PLATFORM_PASSWORD_VARIABLE in service["environment"]
        text = (NATS_DIR / f"{node}.conf").read_text()
        for path in re.findall(r'(?:cert|key|ca)_file: "([^"]+)"', text):
            assert path.startswith(CERTS_MOUNT), path
            assert _host_path(service, path) == ROOT / "deploy/certs" / path[len(CERTS_MOUNT) :]
        # The clients' port only, which speaks TLS alone (tests/integration/test_tls.py).
        assert service["ports"] == [f"{4221 + int(node[-1])}:4222"]
        exporter = services[f"nats-exporter-{node[-1]}"]
        assert exporter["command"][-1] == f"http://{node}:8222"


def test_every_variable_compose_needs_is_in_the_example_env() -> None:
    needed = set(re.findall(r"\$\{(\w+)", (ROOT / "docker-compose.yml").read_text()))
    example = (DEPLOY / "env.example").read_text()
    documented = set(re.findall(r"^(\w+)=", example, re.MULTILINE))
    assert needed == documented


def test_prometheus_scrapes_what_compose_runs() -> None:
    services = _compose()["services"]
    prometheus = services["prometheus"]
    flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = _host_path(prometheus, flag.split("=", 1)[1])
    config = yaml.safe_load(config_path.read_text())
    for rule_file in config["rule_files"]:
        assert (config_path.parent / rule_file).is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        "nats": [t for group in jobs["nats"]["static_configs"] for t in group["targets"]],
        # every replica of each service: a service's name resolves to all of them
        "post-services": [
            f"{name}:{sd['port']}"
            for sd in jobs["post-services"]["dns_sd_configs"]
            for name in sd["names"]
        ],
    }
    assert targets["post-services"] == [f"{name}:{port}" for name, port in SERVICE_PORTS.items()]
    assert jobs["post-services"].get("metrics_path", "/metrics") == "/metrics"
    exporters = {t.split(":")[0] for t in targets["nats"]}
    assert exporters == {f"nats-exporter-{i}" for i in (1, 2, 3)} <= set(services)
    assert all(t.endswith(":7777") for t in targets["nats"])


def test_the_alert_rules_cover_the_program_and_the_platform() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert exprs == {
        # A counter born at its first increment has no increase(): "new in the window" counts.
        "OutreachPast48Hours": (
            "increase(post_matching_overdue_total[1h]) > 0"
            " or (post_matching_overdue_total unless post_matching_overdue_total offset 1h)"
        ),
        "NoSupporterAvailable": (
            "increase(post_matching_no_supporter_total[1h]) > 0"
            " or (post_matching_no_supporter_total"
            " unless post_matching_no_supporter_total offset 1h)"
        ),
        "ConsumerLagGrowing": (
            "deriv(post_consumer_pending_messages[10m]) > 0"
            " and post_consumer_pending_messages > 100"
        ),
        "DeadLetters": (
            "increase(post_dead_letters_total[15m]) > 0"
            " or (post_dead_letters_total unless post_dead_letters_total offset 15m)"
        ),
        "ServiceDown": 'up{job="post-services"} == 0 or post_service_up == 0',
        # A forget keeps the id in forget_jobs until its job has erased the stream.
        "ForgetNotFinished": "max(post_referral_forget_jobs_pending) > 0",
        # Exported by the webhook's one delivering instance.
        "WebhookBehind": "max by (hospital) (post_webhook_events_pending) > 0",
        "HospitalBehind": "sum by (hospital) (post_hospital_events_pending) > 100",
    }


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard_folder() -> None:
    services = _compose()["services"]
    grafana = services["grafana"]
    provisioning = _host_path(grafana, "/etc/grafana/provisioning")
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"  # the private network
    assert "ports" not in services["prometheus"]
    providers = yaml.safe_load((provisioning / "dashboards" / "post.yml").read_text())
    (provider,) = providers["providers"]
    assert _host_path(grafana, provider["options"]["path"]) == DEPLOY / "grafana" / "dashboards"


def test_tracing_is_off_by_default_and_goes_to_jaeger_over_tls_when_on() -> None:
    services = _compose()["services"]
    for name in SERVICES:
        env = services[name]["environment"]
        assert env["OTEL_TRACES_EXPORTER"] == "${OTEL_TRACES_EXPORTER:-none}"  # off unless .env
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "https://jaeger:4318"
        ca = env["OTEL_EXPORTER_OTLP_CERTIFICATE"]
        assert _host_path(services[name], ca) == ROOT / "deploy/certs/ca.pem"
        assert "OTEL_SERVICE_NAME" not in env  # each service names itself
    example = (DEPLOY / "env.example").read_text()
    assert re.search(r"^OTEL_TRACES_EXPORTER=none$", example, re.MULTILINE)
    jaeger = services["jaeger"]
    flags = dict(f.split("=", 1) for f in jaeger["command"])
    assert flags["--collector.otlp.http.host-port"] == ":4318"
    assert flags["--collector.otlp.http.tls.enabled"] == "true"
    for flag in ("--collector.otlp.http.tls.cert", "--collector.otlp.http.tls.key"):
        assert _host_path(jaeger, flags[flag]).parent == ROOT / "deploy/certs"
    assert "ports" not in jaeger
    grafana = services["grafana"]
    provisioning = _host_path(grafana, "/etc/grafana/provisioning")
    sources = yaml.safe_load((provisioning / "datasources" / "jaeger.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "jaeger" and source["url"] == "http://jaeger:16686"
    assert "jaeger" in grafana["depends_on"]


# --- TLS on every hop (CONTRACT.md 1.2, "Encryption in transit") ----------------------------


def test_nothing_but_the_proxy_and_the_nats_client_ports_is_published() -> None:
    services = _compose()["services"]
    published = {name: service["ports"] for name, service in services.items() if "ports" in service}
    http_ports = [str(port) for port in SERVICE_PORTS.values()] + ["3000"]
    assert published.pop("proxy") == [f"{port}:{port}" for port in http_ports]
    # NATS monitoring (8222) is on no host port: the private network only.
    assert published == {node: [f"{4221 + int(node[-1])}:4222"] for node in NODES}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_every_url_in_compose_that_crosses_the_network_is_tls() -> None:
    found = []
    for name, service in _compose()["services"].items():
        for text in _strings({k: v for k, v in service.items() if k != "healthcheck"}):
            for url in re.findall(r"[a-z]+://[^\s,\"']+", text):
                found.append((name, url))
                scheme, rest = url.split("://", 1)
                host = rest.rsplit("@", 1)[-1].split("/")[0].split(":")[0]
                if scheme == "http" and host.startswith("nats-") and ":8222" in rest:
                    continue  # an exporter reads its node's monitoring: the private network
                if scheme == "postgresql":
                    assert "sslmode=verify-full" in url and "sslrootcert=" in url, (name, url)
                    continue
                assert scheme in ("tls", "https"), (name, url)
    assert {name for name, _ in found} >= {*SERVICES}
    # A health check runs inside its own container, on its loopback: it crosses no network.
    for name, service in _compose()["services"].items():
        for url in re.findall(r"[a-z]+://[^\s,\"']+", " ".join(service["healthcheck"]["test"])):
            assert "://127.0.0.1:" in url, (name, url)


def test_postgres_serves_tls_only() -> None:
    postgres = _compose()["services"]["postgres"]
    settings = dict(
        arg.split("=", 1) for arg in postgres["command"] if "=" in arg and not arg.startswith("-")
    )
    assert settings["ssl"] == "on"
    assert _host_path(postgres, settings["ssl_cert_file"]) == ROOT / "deploy/certs/postgres.pem"
    # The key is copied (owned by postgres) by the entrypoint from the mounted one.
    script = " ".join(postgres["entrypoint"])
    assert f"/etc/post/certs/postgres-key.pem {settings['ssl_key_file']}" in script
    assert _host_path(postgres, "/etc/post/certs/postgres-key.pem").name == "postgres-key.pem"
    hba = _host_path(postgres, settings["hba_file"]).read_text()
    rules = [line.split() for line in hba.splitlines() if line and not line.startswith("#")]
    assert ["hostnossl", "all", "all", "all", "reject"] in rules
    assert all(rule[0] in ("local", "hostssl", "hostnossl") for rule in rules)


def test_the_proxy_serves_every_service_and_grafana_over_https_only() -> None:
    proxy = _compose()["services"]["proxy"]
    config = proxy["command"][proxy["command"].index("--config") + 1]
    caddyfile = _host_path(proxy, config).read_text()
    sites = re.findall(r"^([^\s(]\S*) \{$", caddyfile, re.MULTILINE)  # not the (snippets)
    assert sites == [f"https://:{port}" for port in [*SERVICE_PORTS.values(), 3000]]
    for name, port in SERVICE_PORTS.items():
        assert f"dynamic a {name} {port} {{" in caddyfile  # every replica of the service
    assert "reverse_proxy grafana:3000" in caddyfile
    for path in re.findall(r"(/etc/post/certs/\S+)", caddyfile):
        assert _host_path(proxy, path).name in ("proxy.pem", "proxy-key.pem")
    assert "auto_https off" in caddyfile  # no plain-HTTP listener, no ACME
