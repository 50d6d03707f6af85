"""Encryption in transit (CONTRACT.md 1.2): the deployment's own files, run as real servers
with certificates from ``postctl certs``, refuse what they must and take what they should.

- NATS from deploy/nats: nats-1 and nats-2 with our certificates, nats-3 a rogue node whose
  certificates another CA signed. A plaintext client is refused; a client trusting only our
  CA refuses the rogue server, and a server of the wrong name; the cluster refuses the rogue
  node's routes while nats-1 and nats-2 route each other; a client without credentials is
  refused; a TLS client with our CA connects and its messages cross the routes.
- PostgreSQL (Debian's, built with OpenSSL) with the ssl settings and pg_hba.conf of
  docker-compose.yml: a connection without TLS is refused; the services' DSN
  (``sslmode=verify-full``) connects to the right name and refuses a server of the wrong
  name or of another CA.
- The TLS proxy (Caddy, deploy/proxy/Caddyfile) in front of a real service that runs on that
  PostgreSQL with the services' DSN: HTTPS with our CA only, a plaintext request gets no
  page, the hospital routes reach the service (which asks for a token), /healthz, /readyz
  and /metrics stay private.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import nats.errors
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from postctl import certs, tenants
from postctl.cli import main as postctl
from shared.runtime import (
    Platform,
    ServiceProcess,
    _drop_root,
    _owned_by,
    _preexec,
    free_port,
    nats_server_binary,
    wait_for_port,
)
from shared.settings import nats_tls
from tests.integration.test_deploy import (
    CERTS_MOUNT,
    NODES,
    PLATFORM_PASSWORD,
    ROOT,
    STORE_DIR_LINE,
    _compose,
    deploy_nats_copy,
)

pytestmark = pytest.mark.integration

CAN_CONNECT = (OSError, asyncio.TimeoutError, nats.errors.Error)


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our certificates, by the real command line."""
    out = tmp_path_factory.mktemp("certs") / "ours"
    postctl(["certs", "--out", str(out), "--name", "post.example.org"])
    return out


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates of the same names from another CA (an impostor's)."""
    out = tmp_path_factory.mktemp("certs") / "other"
    certs.write_certs(out, ca_name="Someone else's CA")
    return out


# --- postctl certs ------------------------------------------------------------------------


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_postctl_certs_writes_a_ca_and_the_certificates_compose_mounts(ours: Path) -> None:
    assert sorted(p.name for p in ours.iterdir()) == sorted(certs.files())
    ca = _load(ours / certs.CA_CERT)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in certs.files():
        mode = stat.S_IMODE((ours / name).stat().st_mode)
        assert mode == (0o600 if name.endswith("-key.pem") else 0o644), name
    mounted = {
        source.removeprefix("./deploy/certs/")
        for service in _compose()["services"].values()
        for source in (v.split(":")[0] for v in service.get("volumes", []))
        if source.startswith("./deploy/certs/")
    }
    assert mounted == set(certs.files()) - {certs.CA_KEY}  # the CA's key stays offline
    for server in certs.SERVERS:
        cert = _load(ours / server.cert)
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
        assert dns[0] == server.stem and "localhost" in dns and ips == ["127.0.0.1"]
        assert ("post.example.org" in dns) == server.public
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.SERVER_AUTH in usages
        # The routes' mutual TLS: a node's certificate is a client one too.
        assert (ExtendedKeyUsageOID.CLIENT_AUTH in usages) == server.stem.startswith("nats-")


def test_postctl_certs_refuses_to_replace_and_force_keeps_the_ca(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    postctl(["certs", "--out", str(out)])
    ca, proxy = (out / certs.CA_CERT).read_bytes(), (out / "proxy.pem").read_bytes()
    with pytest.raises(SystemExit, match="--force"):
        postctl(["certs", "--out", str(out)])
    assert (out / "proxy.pem").read_bytes() == proxy
    postctl(["certs", "--out", str(out), "--force", "--name", "post.example.org"])
    assert (out / certs.CA_CERT).read_bytes() == ca  # the hospitals' trust stays valid
    assert (out / "proxy.pem").read_bytes() != proxy
    _load(out / "proxy.pem").verify_directly_issued_by(_load(out / certs.CA_CERT))
    with pytest.raises(SystemExit, match="not a DNS name"):
        postctl(["certs", "--out", str(tmp_path / "x"), "--name", "bad name"])


# --- NATS: the deploy configs, one node of them a rogue ---------------------------------------


@dataclass
class Nodes:
    folder: Path
    client_ports: list[int]
    monitor_ports: list[int]
    logs: list[Path]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self, node: int) -> str:
        return f"tls://127.0.0.1:{self.client_ports[node]}"

    def routez(self, node: int) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.monitor_ports[node]}/routez"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return dict(json.loads(resp.read()))

    def remotes(self, node: int) -> set[str]:
        return {route.get("remote_name", "") for route in self.routez(node).get("routes") or []}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, ours: Path, other: Path) -> Iterator[Nodes]:
    folder = tmp_path_factory.mktemp("tls-cluster")
    deploy_nats_copy(folder)  # the deploy's configs as they are, pointing at folder/certs
    shutil.rmtree(folder / "certs")
    shutil.copytree(ours, folder / "certs")
    for i, node in enumerate(NODES):
        conf = folder / "nats" / f"{node}.conf"
        text = conf.read_text().replace(STORE_DIR_LINE, f'store_dir: "{folder / f"data-{i}"}"')
        if node == "nats-3":  # the rogue: the same names, every file from another CA
            text = text.replace(f"{folder / 'certs'}/", f"{other}/")
        conf.write_text(text)
    client_ports = [free_port() for _ in NODES]
    monitor_ports = [free_port() for _ in NODES]
    route_ports = [free_port() for _ in NODES]
    routes = ",".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
    env = {**os.environ, tenants.PLATFORM_PASSWORD_VARIABLE: PLATFORM_PASSWORD}
    cluster = Nodes(folder, client_ports, monitor_ports, [folder / f"{n}.log" for n in NODES])
    try:
        for i, node in enumerate(NODES):
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
                    stdout=open(cluster.logs[i], "wb"),
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


async def _platform(url: str, ca: Path, **options: Any) -> nats.NATS:
    return await nats.connect(
        url,
        user=tenants.PLATFORM_USER,
        password=PLATFORM_PASSWORD,
        tls=nats_tls(ca),
        allow_reconnect=False,
        max_reconnect_attempts=0,
        connect_timeout=5,
        **options,
    )


def test_a_plaintext_client_is_refused(nodes: Nodes) -> None:
    with socket.create_connection(("127.0.0.1", nodes.client_ports[0]), timeout=10) as sock:
        info = sock.makefile("rb").readline()
        assert info.startswith(b"INFO ")
        assert json.loads(info[5:])["tls_required"] is True
        user = tenants.PLATFORM_USER
        connect = {"user": user, "pass": PLATFORM_PASSWORD, "verbose": True, "pedantic": False}
        sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        answer = b""
        while chunk := sock.recv(4096):  # the server ends the connection
            answer += chunk
        assert b"PONG" not in answer and b"+OK" not in answer


async def test_a_tls_client_trusting_our_ca_connects_and_its_messages_cross_the_routes(
    nodes: Nodes, ours: Path
) -> None:
    # nats-1 and nats-2 route each other over mutual TLS.
    for _ in range(300):
        if "nats-2" in nodes.remotes(0) and "nats-1" in nodes.remotes(1):
            break
        await asyncio.sleep(0.1)
    assert "nats-2" in nodes.remotes(0) and "nats-1" in nodes.remotes(1)
    publisher = await _platform(nodes.url(0), ours / certs.CA_CERT)
    subscriber = await _platform(nodes.url(1), ours / certs.CA_CERT)
    try:
        assert publisher.connected_url is not None
        assert publisher.connected_url.scheme == "tls"
        sub = await subscriber.subscribe("post.tls-probe.evt.>")
        await subscriber.flush()
        marker = uuid.uuid4().hex.encode()
        for _ in range(50):  # the interest reaches nats-1 a moment after the flush
            await publisher.publish("post.tls-probe.evt.Probe", marker)
            try:
                msg = await sub.next_msg(timeout=0.2)
                break
            except nats.errors.TimeoutError:
                continue
        assert msg.data == marker
    finally:
        await publisher.close()
        await subscriber.close()


async def test_a_route_node_with_another_cas_certificate_is_refused(nodes: Nodes) -> None:
    def refused(log: Path, node: str) -> bool:
        # Dialling the rogue, our node refuses its certificate (and the rogue ours).
        text = log.read_text()
        return bool(
            re.search(rf"TLS route handshake error: .*unknown authority \(CN={node},", text)
        )

    def settled() -> bool:
        ours_refuse = all(refused(nodes.logs[i], "nats-3") for i in (0, 1))
        return ours_refuse and refused(nodes.logs[2], "nats-1") and refused(nodes.logs[2], "nats-2")

    for _ in range(300):  # the nodes dial each other again every second or so
        if settled() and "nats-2" in nodes.remotes(0):
            break
        await asyncio.sleep(0.1)
    assert settled(), [log.read_text()[-3000:] for log in nodes.logs]
    assert "nats-2" in nodes.remotes(0)  # our nodes do route each other meanwhile
    assert "nats-3" not in nodes.remotes(0) | nodes.remotes(1)
    assert nodes.remotes(2) == set()


async def test_a_client_trusting_only_our_ca_refuses_a_server_of_another_ca(
    nodes: Nodes, ours: Path, other: Path
) -> None:
    with pytest.raises(CAN_CONNECT) as refused:
        await _platform(nodes.url(2), ours / certs.CA_CERT)
    assert "certificate verify failed" in repr(refused.value) + repr(refused.value.__cause__)
    # The same client with the other CA does connect: the refusal was about trust only.
    nc = await _platform(nodes.url(2), other / certs.CA_CERT)
    await nc.close()


async def test_a_client_refuses_a_server_of_the_wrong_name(nodes: Nodes, ours: Path) -> None:
    with pytest.raises(CAN_CONNECT) as refused:
        await _platform(nodes.url(0), ours / certs.CA_CERT, tls_hostname="postgres")
    text = repr(refused.value) + repr(refused.value.__cause__)
    assert "certificate verify failed" in text and "postgres" in text


async def test_a_client_without_credentials_is_refused(nodes: Nodes, ours: Path) -> None:
    # No user, no key: in a deployment no connection is anonymous (no no_auth_user).
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(
            nodes.url(0),
            tls=nats_tls(ours / certs.CA_CERT),
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )


# --- PostgreSQL with the deploy's ssl settings ------------------------------------------------


def debian_postgres_bin() -> Path:
    """The machine's PostgreSQL (scripts/system-deps.sh installs it): built with OpenSSL."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "postgres").exists():
            return candidate
    pytest.fail("Debian's PostgreSQL is missing: make system-deps")


@dataclass
class TlsPostgres:
    port: int
    password: str
    folder: Path


@pytest.fixture(scope="module")
def tls_postgres(ours: Path) -> Iterator[TlsPostgres]:
    """PostgreSQL with docker-compose.yml's settings (its `-c` options and pg_hba.conf), the
    paths moved here; the key copied to one the server owns, as compose's entrypoint does."""
    postgres = _compose()["services"]["postgres"]
    options = [a for a in postgres["command"][1:] if a != "-c"]
    bindir = debian_postgres_bin()
    ids = _drop_root()
    folder = Path(tempfile.mkdtemp(prefix="post-tls-pg-"))  # the server's user can reach it
    password = uuid.uuid4().hex
    (folder / "pwfile").write_text(password)
    moved = {
        "/etc/post/certs/postgres.pem": ours / "postgres.pem",
        "/var/lib/postgresql/server-key.pem": ours / "postgres-key.pem",
        "/etc/post/postgres/pg_hba.conf": ROOT / "deploy" / "postgres" / "pg_hba.conf",
    }
    settings = []
    for option in options:
        name, value = option.split("=", 1)
        if value in moved:
            shutil.copy(moved[value], folder / Path(value).name)
            value = str(folder / Path(value).name)
        settings.append(f"{name}={value}")
    assert {s.split("=")[0] for s in settings} >= {"ssl", "ssl_cert_file", "ssl_key_file"}
    os.chmod(folder / "server-key.pem", 0o600)
    _owned_by(folder, ids)
    subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(folder / "pgdata"),
            "-U",
            "post",
            f"--pwfile={folder / 'pwfile'}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_preexec(ids),
    )
    port = free_port()
    args = [str(bindir / "postgres"), "-D", str(folder / "pgdata"), "-p", str(port)]
    # 127.0.0.2 too: a name the certificate does not hold, for the wrong-name refusal.
    local = ["listen_addresses=127.0.0.1,127.0.0.2", f"unix_socket_directories={folder}"]
    for setting in local + settings:
        args += ["-c", setting]
    log = open(folder / "postgres.log", "wb")
    proc = subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_preexec(ids),
        start_new_session=True,
    )
    try:
        wait_for_port(port, proc=proc)
        subprocess.run(
            [str(bindir / "createdb"), "-h", str(folder), "-p", str(port), "-U", "post", "post"],
            check=True,
            capture_output=True,
            preexec_fn=_preexec(ids),
        )
        yield TlsPostgres(port, password, folder)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _services_dsn(pg: TlsPostgres, ca: Path, host: str = "localhost") -> str:
    """The services' POST_DATABASE_URL of docker-compose.yml, moved to this machine."""
    env = _compose()["services"]["referral"]["environment"]
    dsn = str(env["POST_DATABASE_URL"]).replace("${POST_DB_PASSWORD}", pg.password)
    assert "@postgres:5432/" in dsn and f"sslrootcert={CERTS_MOUNT}{certs.CA_CERT}" in dsn
    dsn = dsn.replace("@postgres:5432/", f"@{host}:{pg.port}/")
    return dsn.replace(f"sslrootcert={CERTS_MOUNT}{certs.CA_CERT}", f"sslrootcert={ca}")


async def test_the_services_connect_to_postgres_with_verify_full(
    tls_postgres: TlsPostgres, ours: Path
) -> None:
    conn = await asyncpg.connect(_services_dsn(tls_postgres, ours / certs.CA_CERT))
    try:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await conn.close()


async def test_postgres_refuses_a_connection_without_tls(tls_postgres: TlsPostgres) -> None:
    dsn = f"postgresql://post:{tls_postgres.password}@localhost:{tls_postgres.port}/post"
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(dsn + "?sslmode=disable")


async def test_verify_full_refuses_a_postgres_of_the_wrong_name(
    tls_postgres: TlsPostgres, ours: Path
) -> None:
    dsn = _services_dsn(tls_postgres, ours / certs.CA_CERT, host="127.0.0.2")
    with pytest.raises(ssl.SSLCertVerificationError, match=r"127\.0\.0\.2"):
        await asyncpg.connect(dsn)
    # The same server, its name not checked, answers: the refusal was about the name only.
    conn = await asyncpg.connect(dsn.replace("sslmode=verify-full", "sslmode=verify-ca"))
    await conn.close()


async def test_verify_full_refuses_a_postgres_of_another_ca(
    tls_postgres: TlsPostgres, other: Path
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await asyncpg.connect(_services_dsn(tls_postgres, other / certs.CA_CERT))


# --- the TLS proxy in front of a real service ---------------------------------------------------


@dataclass
class Proxy:
    ports: dict[int, int]  # the Caddyfile's port -> where it listens here
    service_port: int


@pytest.fixture(scope="module")
async def proxy(platform: Platform, ours: Path, tls_postgres: TlsPostgres) -> AsyncIterator[Proxy]:
    """deploy/proxy/Caddyfile run by Caddy, its listeners and upstreams moved to this
    machine's free ports; behind it a real referral service, on the TLS PostgreSQL with the
    services' DSN of docker-compose.yml (verify-full)."""
    caddy = shutil.which("caddy")
    if caddy is None:
        pytest.fail("caddy is missing: make system-deps")
    folder = Path(tempfile.mkdtemp(prefix="post-tls-proxy-"))
    service_port = free_port()
    service = ServiceProcess(
        "referral",
        {
            **platform.env(),
            "POST_REFERRAL_PORT": str(service_port),
            "POST_DATABASE_URL": _services_dsn(tls_postgres, ours / certs.CA_CERT),
        },
        folder / "referral.log",
    ).start()
    text = (ROOT / "deploy" / "proxy" / "Caddyfile").read_text()
    text = text.replace(CERTS_MOUNT, f"{ours}/")
    ports = {port: free_port() for port in (8001, 8002, 8003, 8004, 3000)}
    for port, here in ports.items():
        text = text.replace(f"https://:{port} {{", f"https://:{here} {{\n\tbind 127.0.0.1")
    text = text.replace("dynamic a referral 8001 {", f"dynamic a 127.0.0.1 {service_port} {{")
    text = text.replace("admin 127.0.0.1:2019", f"admin 127.0.0.1:{free_port()}")
    (folder / "Caddyfile").write_text(text)
    env = {
        **os.environ,
        "XDG_DATA_HOME": str(folder / "data"),
        "XDG_CONFIG_HOME": str(folder / "config"),
    }
    proc = subprocess.Popen(
        [caddy, "run", "--config", str(folder / "Caddyfile"), "--adapter", "caddyfile"],
        env=env,
        stdout=open(folder / "caddy.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port(ports[8001], proc=proc)
        for _ in range(300):
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{service_port}/readyz", timeout=2
                ) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert service.alive(), (folder / "referral.log").read_text()[-3000:]
            await asyncio.sleep(0.2)
        yield Proxy(ports, service_port)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        service.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _https(ca: Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca)), timeout=10)


async def test_the_proxy_serves_a_service_over_https_with_our_ca(
    proxy: Proxy, ours: Path, tls_postgres: TlsPostgres
) -> None:
    async with _https(ours / certs.CA_CERT) as http:
        url = f"https://localhost:{proxy.ports[8001]}/hospitals/st-mary/referrals"
        answer = await http.post(url, json={})
    # The service itself answers: a hospital's routes need its token.
    assert answer.status_code == 401
    assert answer.json()["reason_code"] == "unauthenticated"
    # Behind it, every connection of the service to PostgreSQL is TLS (pool and leases).
    conn = await asyncpg.connect(_services_dsn(tls_postgres, ours / certs.CA_CERT))
    try:
        rows = await conn.fetch(
            "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)"
            " WHERE a.application_name LIKE 'post-referral%'"
        )
    finally:
        await conn.close()
    assert rows and all(row["ssl"] for row in rows)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_the_proxy_keeps_health_and_metrics_private(
    proxy: Proxy, ours: Path, path: str
) -> None:
    async with _https(ours / certs.CA_CERT) as http:
        answer = await http.get(f"https://localhost:{proxy.ports[8001]}{path}")
    assert answer.status_code == 404
    assert "post_" not in answer.text
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.service_port}{path}") as resp:
        assert resp.status == 200  # the private network still has it


async def test_the_proxy_refuses_plaintext_and_another_cas_trust(proxy: Proxy, other: Path) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(f"http://localhost:{proxy.ports[8001]}/hospitals")
    assert answer.status_code == 400  # "Client sent an HTTP request to an HTTPS server"
    assert "reason_code" not in answer.text
    async with _https(other / certs.CA_CERT) as http:
        with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
            await http.get(f"https://localhost:{proxy.ports[8001]}/hospitals")
