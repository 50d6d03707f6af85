"""`postctl up`: the platform on the embedded default (nats-server, PostgreSQL, the four
services) until Ctrl-C. `start_platform`, `banner` and `run_until_stopped` also serve `demo`."""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import time
from typing import Any

from shared.runtime import (
    SERVICES,
    EmbeddedServersMissing,
    Platform,
    port_in_use,
    require_embedded_servers,
)
from shared.settings import SERVICE_PORTS, Settings


def _platform(settings: Settings, instances: int = 1) -> Platform:
    ports = {name: settings.http_port(name) for name in SERVICE_PORTS}
    nats_port = settings.nats_port
    return Platform(
        data_dir=settings.data_dir,
        nats_port=nats_port,
        nats_monitor_port=settings.nats_monitor_port,
        pg_port=settings.pg_port,
        service_ports=ports,
        database_url=settings.database_url.get_secret_value() if settings.database_given else None,
        instances=instances,
    )


def _check_ports(platform: Platform) -> None:
    wanted = {"NATS": platform.nats_port, "NATS monitoring": platform.nats_monitor_port}
    if not platform.database_url:
        wanted["PostgreSQL"] = platform.pg_port
    wanted.update(
        {
            Platform.key(name, i): platform.port(name, i)
            for name in platform.service_ports
            for i in range(platform.instances)
        }
    )
    busy = [f"{what} ({port})" for what, port in wanted.items() if port_in_use(port)]
    if busy:
        sys.exit(
            "postctl: ports already in use: "
            + ", ".join(busy)
            + ".\nIs the platform already running? Stop it, or choose ports with POST_NATS_URL,"
            " POST_PG_PORT, POST_NATS_MONITOR_PORT, POST_<SERVICE>_PORT."
        )


def banner(platform: Platform, region_token: str | None = None) -> str:
    """What runs where; with `region_token`, the dashboard's URL that carries it."""
    lines = ["", "POST platform is up.", f"  NATS        {platform.nats_url}"]
    lines.append(f"  PostgreSQL  {platform.db_url}")
    for name in SERVICES:
        ports = ", ".join(str(platform.port(name, i)) for i in range(platform.instances))
        lines.append(f"  {name:<11} http://127.0.0.1:{ports}  (/healthz /readyz /metrics /docs)")
    port = platform.service_ports["analytics"]
    dashboard = f"http://127.0.0.1:{port}/"
    lines += [
        f"  RE-AIM      http://127.0.0.1:{port}/reaim  (Authorization: Bearer <region token>)",
        f"  dashboard   {dashboard}#token={region_token}"
        if region_token
        else f"  dashboard   {dashboard}  (a token: postctl region token --name <you>)",
        f"  data        {platform.data_dir}",
        "Ctrl-C stops everything; the data stays for the next `postctl up`.",
        "",
    ]
    return "\n".join(lines)


def start_platform(settings: Settings, instances: int = 1) -> Platform:
    """The servers and the services (`instances` of each) started and ready, on the ports
    `settings` name (a further instance: the service's port + 10, + 20, ...)."""
    platform = _platform(settings, instances)
    try:
        require_embedded_servers(postgres=not platform.database_url)
    except EmbeddedServersMissing as exc:
        sys.exit(f"postctl: {exc}")
    _check_ports(platform)
    platform.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(platform.data_dir, 0o755)
    print(f"starting nats-server and PostgreSQL under {platform.data_dir} ...", flush=True)
    # Ctrl-C while starting must stop the start. A KeyboardInterrupt can be lost: raised in
    # logging's after-fork hook while subprocess forks a server, Python ignores it ("Exception
    # ignored in: _releaseLock"), and the start went on to the banner and waited for a second
    # Ctrl-C (CI met it in test_ctrl_c_while_starting_leaves_nothing_running); inside
    # asyncio.run a cancellation can come out of a connect as a TimeoutError that a retry loop
    # swallows. This handler raises it and also remembers it, checked after each step.
    interrupted = False

    def interrupt(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        for step in (platform.start_servers, platform.start_services, platform.wait_ready):
            step()
            if interrupted:
                raise KeyboardInterrupt
    except BaseException:  # Ctrl-C (or a failure) while starting: nothing left running
        platform.stop()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    return platform


def run_until_stopped(platform: Platform) -> None:
    """Restart any service that exits, until SIGINT or SIGTERM; then stop everything."""
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping:
            for name in platform.supervise_once():
                print(f"service {name} exited; restarted", flush=True)
            time.sleep(0.5)
    finally:
        print("stopping ...", flush=True)
        platform.stop()
        print("stopped.", flush=True)


def add_cli(subparsers: Any) -> None:
    """Registers `postctl up`."""
    up = subparsers.add_parser("up", help="run the platform on the embedded default")
    up.add_argument("--instances", type=int, default=1, help="instances of each service")
    up.add_argument(
        "--servers-only",
        action="store_true",
        help="nats-server and PostgreSQL without the services (for postctl restore)",
    )
    up.set_defaults(func=cmd_up)


def cmd_up(args: argparse.Namespace) -> None:
    # `kill -USR1 <postctl>` writes every thread's stack to stderr: where a start or a stop
    # that does not end is waiting.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if args.servers_only:
        servers = _platform(Settings())
        servers.service_ports = {}
        _check_ports(servers)
        servers.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(servers.data_dir, 0o755)
        servers.start_servers()
        print(
            f"NATS {servers.nats_url} and PostgreSQL {servers.db_url} are up, no services;"
            " Ctrl-C stops them.",
            flush=True,
        )
        run_until_stopped(servers)
        return
    platform = start_platform(Settings(), args.instances)
    print(banner(platform), flush=True)
    run_until_stopped(platform)
