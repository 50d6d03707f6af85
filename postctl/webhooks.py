"""`postctl hospital webhook <hospital> (--url URL | --off)`: a hospital's webhook endpoint.

Registering prints the signing secret once (`whsec_` + base64); the referral service keeps it
sealed (shared/webhooks.py) and delivers the hospital's events from the first one after the
registration. `--off` removes the endpoint: nothing more is sent. docs/hospital-integration.md,
"Webhooks".
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import nats

from shared import webhooks
from shared.contracts import STREAM_NAME, is_hospital_id
from shared.settings import Settings


async def register(settings: Settings, hospital: str, url: str) -> tuple[str, bool]:
    """(secret, new): the endpoint registered, from the stream's next event on."""
    import services.referral
    from shared.eventstore import create_pool, migrate

    key = webhooks.sealing_key(settings.data_dir)
    nc = await nats.connect(settings.nats_servers, tls=settings.nats_tls())
    try:
        info = await nc.jetstream().stream_info(STREAM_NAME)
        after = int(info.state.last_seq or 0)
    finally:
        await nc.close()
    pool = await create_pool(
        settings.database_url.get_secret_value(), webhooks.SCHEMA, min_size=1, max_size=1
    )
    try:
        await migrate(pool, webhooks.SCHEMA, Path(services.referral.__file__).parent / "migrations")
        async with pool.acquire() as conn:
            return await webhooks.register(conn, key, hospital, url, after)
    finally:
        await pool.close()


async def unregister(settings: Settings, hospital: str) -> bool:
    import services.referral
    from shared.eventstore import create_pool, migrate

    pool = await create_pool(
        settings.database_url.get_secret_value(), webhooks.SCHEMA, min_size=1, max_size=1
    )
    try:
        await migrate(pool, webhooks.SCHEMA, Path(services.referral.__file__).parent / "migrations")
        async with pool.acquire() as conn:
            return await webhooks.unregister(conn, hospital)
    finally:
        await pool.close()


def cmd_webhook(args: argparse.Namespace) -> None:
    if not is_hospital_id(args.hospital):
        raise SystemExit(
            "postctl hospital webhook: a hospital id is a slug: [a-z0-9][a-z0-9-]{0,62}"
        )
    if bool(args.url) == bool(args.off):
        raise SystemExit("postctl hospital webhook: give --url <https-url> or --off")
    settings = Settings()
    if args.off:
        found = asyncio.run(unregister(settings, args.hospital))
        print(
            f"{'removed the webhook of' if found else 'no webhook to remove for'} {args.hospital}"
        )
        return
    embedded = webhooks.embedded_default(
        settings.nats_hosts, settings.database_url.get_secret_value()
    )
    why = webhooks.check_url(args.url, embedded=embedded)
    if why is not None:
        raise SystemExit(f"postctl hospital webhook: --url: {why}")
    secret, new = asyncio.run(register(settings, args.hospital, args.url))
    print(secret)
    print(
        f"\nThe webhook signing secret of hospital {args.hospital}, shown once (Standard Webhooks:"
        " verify webhook-signature with it).\n"
        + (
            "Delivery starts with the hospital's next event."
            if new
            else "It replaces the earlier secret and URL at once; delivery goes on where it was."
        ),
        file=sys.stderr,
    )


def add_cli(actions: Any) -> None:
    """Registers `postctl hospital webhook` on the `hospital` parser's actions."""
    webhook = actions.add_parser(
        "webhook", help="register (--url) or remove (--off) a hospital's webhook endpoint"
    )
    webhook.add_argument("hospital", help="the hospital id (a slug)")
    webhook.add_argument(
        "--url",
        help="the endpoint: https://... (on the embedded default also http://127.0.0.1:<port>/...)",
    )
    webhook.add_argument("--off", action="store_true", help="remove the hospital's webhook")
    webhook.set_defaults(func=cmd_webhook)


async def status(settings: Settings) -> list[dict[str, Any]]:
    """For `postctl status`: each webhook's endpoint (scheme and host), position, failures in a
    row and last error (a status code or an error class); no secret."""
    import asyncpg

    conn = await asyncpg.connect(
        settings.database_url.get_secret_value(), server_settings={"search_path": webhooks.SCHEMA}
    )
    try:
        exists = await conn.fetchval("SELECT to_regclass('webhooks') IS NOT NULL")
        return await webhooks.status_rows(conn) if exists else []
    finally:
        await conn.close()


def print_status(rows: list[dict[str, Any]]) -> None:
    print(f"webhooks: {len(rows)}")
    for r in rows:
        error = r["last_error"] or "-"
        print(
            f"  {r['hospital']}: {r['endpoint']}  at POST seq {r['position']}"
            f"  failures in a row {r['failures']}  last error {error}"
            + (f" at {r['last_error_at']}" if r["last_error_at"] else "")
        )
