"""`postctl status`: which instance holds which partitions (and so which hospitals), and each
service's lag (docs/decisions.md, "Scale-out")."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import asyncpg
import nats

from postctl import webhooks
from shared import hospitals
from shared.partitions import ownership
from shared.runtime import SERVICES
from shared.settings import Settings


async def report(settings: Settings) -> dict[str, Any]:
    nc = await nats.connect(settings.nats_servers, tls=settings.nats_tls())
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        found = await ownership(conn, nc.jetstream(), SERVICES)
        found["webhooks"] = await webhooks.status(settings)
        # Events each hospital's durable consumer holds not yet acknowledged (CONTRACT.md 1.2).
        found["hospital_events_pending"] = await hospitals.pending(nc.jetstream())
        return found
    finally:
        await conn.close()
        await nc.close()


def add_cli(subparsers: Any) -> None:
    """Registers `postctl status`."""
    status = subparsers.add_parser("status", help="which instance holds which hospitals; lag")
    status.add_argument("--json", action="store_true", help="the report as JSON")
    status.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> None:
    found = asyncio.run(report(Settings()))
    if args.json:
        print(json.dumps(found, indent=2))
        return
    for service, state in found["services"].items():
        print(f"{service}: {state['pending']} pending, {state['unacknowledged']} unacknowledged")
        for partition, holder in state["holders"].items():
            hospitals = found["hospitals"][partition]
            more = f" (+{len(hospitals) - 5})" if len(hospitals) > 5 else ""
            shown = ", ".join(hospitals[:5]) + more
            print(f"  partition {partition}: {holder or 'NOBODY'}  hospitals: {shown or '-'}")
    webhooks.print_status(found["webhooks"])
    pending = found["hospital_events_pending"]
    print(f"hospital consumers: {len(pending)}")
    for hospital, count in sorted(pending.items()):
        print(f"  {hospital}: {count} events not acknowledged")
