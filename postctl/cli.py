"""postctl: the operator's command line for the POST platform.

postctl up [--instances N]       run the platform on the embedded default (Ctrl-C stops),
                                 N instances of each service sharing the hospitals
postctl status [--json]          which instance holds which partitions and hospitals; lag
postctl demo                     up + replay the POST study + the RE-AIM report
postctl simulate post-2023       replay the published POST study through NATS
postctl simulate region ...      a synthetic region, for demos and load
postctl analytics rebuild        drop the RE-AIM read models and replay the stream
postctl load --rate R --duration D   a known mix through NATS: nothing lost, nothing doubled
postctl hospital onboard|token ...   a hospital's NATS user and HTTP token
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from shared.runtime import SERVICES, Platform, port_in_use
from shared.settings import SERVICE_PORTS, Settings


def _platform(settings: Settings, instances: int = 1) -> Platform:
    ports = {name: settings.http_port(name) for name in SERVICE_PORTS}
    nats_port = int(settings.nats_url.rsplit(":", 1)[-1])
    return Platform(
        data_dir=settings.data_dir,
        nats_port=nats_port,
        nats_monitor_port=int(os.environ.get("POST_NATS_MONITOR_PORT", "8222")),
        pg_port=int(os.environ.get("POST_PG_PORT", "5432")),
        service_ports=ports,
        database_url=os.environ.get("POST_DATABASE_URL"),
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


def _banner(platform: Platform) -> str:
    lines = ["", "POST platform is up.", f"  NATS        {platform.nats_url}"]
    lines.append(f"  PostgreSQL  {platform.db_url}")
    for name in SERVICES:
        ports = ", ".join(str(platform.port(name, i)) for i in range(platform.instances))
        lines.append(f"  {name:<11} http://127.0.0.1:{ports}  (/healthz /readyz /metrics /docs)")
    port = platform.service_ports["analytics"]
    lines += [
        f"  RE-AIM      http://127.0.0.1:{port}/reaim",
        f"  data        {platform.data_dir}",
        "Ctrl-C stops everything; the data stays for the next `postctl up`.",
        "",
    ]
    return "\n".join(lines)


def _start(settings: Settings, instances: int = 1) -> Platform:
    platform = _platform(settings, instances)
    _check_ports(platform)
    platform.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(platform.data_dir, 0o755)
    print(f"starting nats-server and PostgreSQL under {platform.data_dir} ...", flush=True)
    platform.start_servers()
    platform.start_services()
    platform.wait_ready()
    return platform


def _run_until_stopped(platform: Platform) -> None:
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


def cmd_up(args: argparse.Namespace) -> None:
    platform = _start(Settings(), args.instances)
    print(_banner(platform), flush=True)
    _run_until_stopped(platform)


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


async def wait_consumed(nats_url: str, consumer: str, timeout: float = 120.0) -> None:
    """Until a service (all its instances) has handled everything in the stream so far."""
    import nats as nats_client

    from shared.partitions import service_lag
    from shared.settings import nats_servers

    nc = await nats_client.connect(nats_servers(nats_url))
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await service_lag(js, consumer) == (0, 0):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"the {consumer} service has not caught up after {timeout:.0f} s")
    finally:
        await nc.close()


def cmd_demo(args: argparse.Namespace) -> None:
    from postctl import paper, simulate

    settings = Settings()
    platform = _start(settings)
    analytics = f"http://127.0.0.1:{platform.service_ports['analytics']}"
    try:
        if _get_json(f"{analytics}/reaim/{paper.HOSPITALS[0]}") is None:
            print("replaying the POST study (Tolins et al., PLOS ONE 2023) through NATS ...")
            summary = asyncio.run(simulate.run_post_2023(platform.nats_url))
            print(f"  sent {summary.get('commands', summary)} commands")
        else:
            print("the POST study is already loaded (data kept from an earlier run)")
        # Every answer of the replay is in the stream: wait until analytics has read it all.
        asyncio.run(wait_consumed(platform.nats_url, "analytics"))
        report = _get_json(f"{analytics}/reaim")
        rows = paper.compare(report)
        print(paper.format_table(rows))
        ok = all(r.match for r in rows)
        print("every figure the paper states matches." if ok else "SOME FIGURES DIFFER.")
    except BaseException:
        platform.stop()
        raise
    print(_banner(platform), flush=True)
    if os.environ.get("POST_DEMO_EXIT") == "1":  # for scripted checks of `make demo`
        platform.stop()
        sys.exit(0 if ok else 1)
    _run_until_stopped(platform)


def cmd_simulate(args: argparse.Namespace) -> None:
    from postctl import simulate

    url = Settings().nats_url
    if args.scenario == "post-2023":
        summary = asyncio.run(simulate.run_post_2023(url))
    else:
        summary = asyncio.run(simulate.run_region(url, args.hospitals, args.years, args.seed))
    print(json.dumps(summary, indent=2, default=str))


def cmd_status(args: argparse.Namespace) -> None:
    """Which instance holds which partitions (and so which hospitals), and each service's lag."""
    import asyncpg
    import nats as nats_client

    from shared.partitions import ownership

    async def report() -> dict[str, Any]:
        settings = Settings()
        nc = await nats_client.connect(settings.nats_servers)
        conn = await asyncpg.connect(settings.database_url)
        try:
            return await ownership(conn, nc.jetstream(), SERVICES)
        finally:
            await conn.close()
            await nc.close()

    found = asyncio.run(report())
    if args.json:
        print(json.dumps(found, indent=2))
        return
    for service, state in found["services"].items():
        lag = f"{state['pending']} pending, {state['unacknowledged']} unacknowledged"
        print(f"{service}: {lag}")
        for partition, holder in state["holders"].items():
            hospitals = found["hospitals"][partition]
            shown = ", ".join(hospitals[:5]) + (
                f" (+{len(hospitals) - 5})" if len(hospitals) > 5 else ""
            )
            print(f"  partition {partition}: {holder or 'NOBODY'}  hospitals: {shown or '-'}")


def cmd_analytics_rebuild(args: argparse.Namespace) -> None:
    from services.analytics.rebuild import rebuild

    summary = asyncio.run(rebuild(Settings()))
    print(json.dumps(summary, indent=2, default=str))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="postctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the platform on the embedded default")
    up.add_argument("--instances", type=int, default=1, help="instances of each service")
    up.set_defaults(func=cmd_up)
    status = sub.add_parser("status", help="which instance holds which hospitals; the lag")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    sub.add_parser("demo", help="up + the POST study + the RE-AIM report").set_defaults(
        func=cmd_demo
    )
    sim = sub.add_parser("simulate", help="send a simulated program through NATS")
    sim.add_argument("scenario", choices=["post-2023", "region"])
    sim.add_argument("--hospitals", type=int, default=10)
    sim.add_argument("--years", type=int, default=3)
    sim.add_argument("--seed", type=int, default=1)
    sim.set_defaults(func=cmd_simulate)
    from postctl import load

    load.add_cli(sub)  # postctl load --rate R --duration D [--hospitals N] [--seed S]
    analytics = sub.add_parser("analytics", help="analytics operations")
    asub = analytics.add_subparsers(dest="action", required=True)
    asub.add_parser("rebuild", help="drop the read models and replay the stream").set_defaults(
        func=cmd_analytics_rebuild
    )
    from postctl import tenants

    tenants.add_cli(sub)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
