"""`postctl hospital ...`: onboard, offboard, sync, token, retention, webhook.

The users of the NATS account and the tenants file they live in are shared/tenants.py's (the
embedded platform onboards the tests' hospitals with it too); every name of it is here as well.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from postctl import webhooks
from shared import hospitals as delivery
from shared.contracts import STREAM_NAME
from shared.settings import Settings, nats_tls
from shared.tenants import (
    ACCOUNT,
    DEFAULT_CONF,
    HEADER,
    PID_FILE,
    PLATFORM_PASSWORD_VARIABLE,
    PLATFORM_USER,
    RELOADED_LINE,
    _check_hospital,
    embedded_tenants_file,
    hospital_permissions,
    inbox_prefix,
    new_user_seed,
    onboard_hospital,
    platform_permissions,
    public_key,
    read_tenants,
    read_tenants_file,
    reload_embedded,
    render_tenants_conf,
    revoke_hospital,
)

# shared/tenants.py's names are postctl.tenants' too (`postctl.tenants.onboard_hospital`).
__all__ = [
    "ACCOUNT",
    "DEFAULT_CONF",
    "HEADER",
    "PID_FILE",
    "PLATFORM_PASSWORD_VARIABLE",
    "PLATFORM_USER",
    "RELOADED_LINE",
    "add_cli",
    "cmd_offboard",
    "cmd_onboard",
    "cmd_retention",
    "cmd_sync",
    "cmd_token",
    "connection_help",
    "embedded_tenants_file",
    "hospital_permissions",
    "inbox_prefix",
    "new_user_seed",
    "onboard_hospital",
    "platform_permissions",
    "public_key",
    "read_tenants",
    "read_tenants_file",
    "reload_embedded",
    "render_tenants_conf",
    "revoke_hospital",
]


async def _with_platform(nats_url: str, fn: Any) -> Any:
    """Runs `fn(js)` on a platform connection (anonymous on the embedded default; the
    platform user of POST_NATS_URL in a deployment)."""
    import nats

    from shared.settings import nats_servers

    async def quiet(exc: Exception) -> None:
        pass

    # nats-py retries a server that refuses for ever, whatever its options: a deadline here.
    nc = await asyncio.wait_for(
        nats.connect(
            nats_servers(nats_url),
            connect_timeout=2,
            allow_reconnect=False,
            error_cb=quiet,
            tls=nats_tls(),
        ),
        timeout=5,
    )
    try:
        return await fn(nc.jetstream())
    finally:
        await nc.close()


def _consumers(nats_url: str, fn: Any) -> tuple[Any, str | None]:
    """(result, None), or (None, why not) when NATS or the stream is not there."""
    import concurrent.futures

    from nats.js.errors import NotFoundError

    try:
        # In a thread of its own: the caller may be running an event loop (a test, a script).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, _with_platform(nats_url, fn)).result(), None
    except NotFoundError:
        return None, f"the stream {STREAM_NAME} does not exist yet (the services create it)"
    except Exception as exc:
        return None, f"NATS at {nats_url.rsplit('@', 1)[-1]} did not answer ({type(exc).__name__})"


# --- postctl hospital onboard / offboard / sync ----------------------------------------------


def connection_help(hospital: str, seed_out: Path, server: str) -> str:
    return f"""\
NATS key of hospital {hospital}: its seed is in {seed_out} (mode 0600). Send that file over a
secure channel; the platform keeps only the public key and cannot issue it again.

  server          {server}
  seed file       {seed_out.name}   (nats-py: nkeys_seed=...)
  inbox prefix    {inbox_prefix(hospital)}
  durable consumer  {delivery.consumer_name(hospital)} on stream {STREAM_NAME}

  publish commands to   post.{hospital}.cmd.<CommandType>  (CloudEvents JSON, Nats-Msg-Id = id)
  every event, durably  js.pull_subscribe_bind("{delivery.consumer_name(hospital)}",
                                               stream="{STREAM_NAME}")
  live events only      post.{hospital}.evt.>

  import nats
  nc = await nats.connect("{server}", nkeys_seed="{seed_out.name}",
                          inbox_prefix="{inbox_prefix(hospital)}")
See docs/hospital-integration.md."""


def _conf(args: argparse.Namespace) -> Path:
    return Path(args.conf) if args.conf else embedded_tenants_file()


def _apply(conf: Path) -> str:
    """Makes the change take effect, or says how."""
    reloaded = reload_embedded(conf)
    if reloaded:
        return "The embedded nats-server has reloaded its config: the change is in effect."
    if reloaded is False:
        return "The embedded nats-server did not confirm its reload: see its nats-server.log."
    if conf.resolve() == embedded_tenants_file().resolve():
        return "The embedded platform is not running: it reads the file when it starts."
    return (
        f"Wrote {conf}. Make every NATS server read it, e.g.\n"
        "  docker compose kill -s HUP nats-1 nats-2 nats-3"
    )


def _ensure(hospital: str) -> str:
    settings = Settings()
    created, why = _consumers(
        settings.nats_url.get_secret_value(), lambda js: delivery.ensure_consumer(js, hospital)
    )
    name = delivery.consumer_name(hospital)
    if why is not None:
        return f"Consumer {name} not created now: {why}. `postctl hospital sync` creates it."
    return f"Consumer {name} {'created' if created else 'already there (its position kept)'}."


def cmd_onboard(args: argparse.Namespace) -> None:
    conf = _conf(args)
    try:
        if args.revoke:
            found = revoke_hospital(conf, args.hospital)
            print(f"{'revoked the key of' if found else 'no key to revoke for'} {args.hospital}")
            print(_apply(conf))
            return
        if not args.out:
            raise ValueError("give --out FILE: where the hospital's seed is written")
        _, rotated = onboard_hospital(conf, args.hospital, Path(args.out))
    except ValueError as exc:
        raise SystemExit(f"postctl hospital onboard: {exc}") from None
    print(connection_help(args.hospital, Path(args.out), args.server))
    if rotated:
        print(f"\nA new key: the earlier key of {args.hospital} is refused from now on.")
    print(_apply(conf))
    print(_ensure(args.hospital))


def cmd_offboard(args: argparse.Namespace) -> None:
    conf = _conf(args)
    try:
        found = revoke_hospital(conf, args.hospital)
    except ValueError as exc:
        raise SystemExit(f"postctl hospital offboard: {exc}") from None
    print(f"{'removed the key of' if found else 'no key for'} {args.hospital}")
    print(_apply(conf))
    deleted, why = _consumers(
        Settings().nats_url.get_secret_value(),
        lambda js: delivery.delete_consumer(js, args.hospital),
    )
    name = delivery.consumer_name(args.hospital)
    if why is not None:
        raise SystemExit(f"postctl hospital offboard: consumer {name} not deleted: {why}")
    print(f"consumer {name} {'deleted' if deleted else 'was not there'}")


def cmd_sync(args: argparse.Namespace) -> None:
    conf = _conf(args)
    try:
        onboarded = read_tenants_file(conf)
    except ValueError as exc:
        raise SystemExit(f"postctl hospital sync: {exc}") from None
    created, why = _consumers(
        Settings().nats_url.get_secret_value(), lambda js: delivery.sync_consumers(js, onboarded)
    )
    if why is not None:
        raise SystemExit(f"postctl hospital sync: {why}")
    print(
        f"{len(onboarded)} hospitals onboarded; consumers created: {', '.join(created) or 'none'}"
    )


def cmd_token(args: argparse.Namespace) -> None:
    """`postctl hospital token`: the token alone on stdout (for scripts), the help on stderr."""
    from shared import auth

    path = Path(args.file) if args.file else auth.tokens_file()
    try:
        if args.revoke:
            found = auth.revoke_token(args.hospital, path)
            print(f"{'revoked' if found else 'no token to revoke for'} {args.hospital} in {path}")
            return
        token = auth.issue_token(args.hospital, path)
    except ValueError as exc:
        raise SystemExit(f"postctl hospital token: {exc}") from None
    print(token)
    print(
        f"\nThe API token of hospital {args.hospital}, shown once: only its SHA-256 is kept, in"
        f" {path}.\nIt replaces any earlier one at once; the services need no restart. Send"
        " it over a secure channel.\nUse it on the hospital's HTTP routes, its intakes and its"
        " reads:\n"
        f"  Authorization: Bearer <token>   e.g. POST /hospitals/{args.hospital}/referrals,"
        f" GET /reaim/{args.hospital}",
        file=sys.stderr,
    )


def cmd_retention(args: argparse.Namespace) -> None:
    _check_hospital(args.hospital)
    if args.days is None and not args.off:
        raise SystemExit("give --days N (N >= 1) or --off")
    if args.days is not None and args.days < 1:
        raise SystemExit("--days must be at least 1")
    print(json.dumps(asyncio.run(_retention(args.hospital, None if args.off else args.days))))


async def _retention(hospital: str, days: int | None) -> dict[str, Any]:
    """Set (or remove) a hospital's retention in the referral service's schema; the referral
    service's sweep forgets what is past it (every POST_RETENTION_INTERVAL seconds)."""
    import services.referral
    from services.referral import store as referral_store
    from shared.eventstore import create_pool, migrate

    settings = Settings()
    pool = await create_pool(
        settings.database_url.get_secret_value(), "referral", min_size=1, max_size=1
    )
    try:
        await migrate(pool, "referral", Path(services.referral.__file__).parent / "migrations")
        async with pool.acquire() as conn:
            await referral_store.set_retention(conn, hospital, days)
            if days is None:
                return {"hospital": hospital, "retention_days": None}
            cutoff = datetime.now(UTC).date() - timedelta(days=days)
            due = await referral_store.expired_ids(conn, hospital, cutoff, limit=1_000_000)
    finally:
        await pool.close()
    return {
        "hospital": hospital,
        "retention_days": days,
        "forgets_when_all_referrals_closed_before": cutoff.isoformat(),
        "physicians_due_now": len(due),
        "sweep_every_seconds": settings.retention_interval,
    }


def add_cli(subparsers: Any) -> None:
    """Registers `postctl hospital onboard <hospital> --out FILE [--revoke] [--conf ...]`,
    `postctl hospital offboard <hospital>`, `postctl hospital sync`,
    `postctl hospital token <hospital> [--file ...] [--revoke]` and
    `postctl hospital retention <hospital> (--days N | --off)`."""
    hospital = subparsers.add_parser("hospital", help="tenant operations")
    actions = hospital.add_subparsers(dest="action", required=True)
    conf_help = (
        "the tenants file (default: the embedded platform's, $POST_DATA_DIR/nats/tenants.conf;"
        f" a deployment: {DEFAULT_CONF})"
    )
    onboard = actions.add_parser(
        "onboard",
        help="issue a hospital's NATS key (again: a new key, the old one refused) and create"
        " its durable consumer",
    )
    onboard.add_argument("hospital", help="the hospital id (a slug)")
    onboard.add_argument("--out", help="where to write the hospital's seed (mode 0600)")
    onboard.add_argument(
        "--revoke",
        action="store_true",
        help="refuse the hospital's key, issue none (the consumer stays)",
    )
    onboard.add_argument("--conf", help=conf_help)
    onboard.add_argument(
        "--server", default="nats://localhost:4222", help="the NATS URL given to the hospital"
    )
    onboard.set_defaults(func=cmd_onboard)
    offboard = actions.add_parser(
        "offboard", help="remove a hospital's NATS key and its durable consumer"
    )
    offboard.add_argument("hospital", help="the hospital id (a slug)")
    offboard.add_argument("--conf", help=conf_help)
    offboard.set_defaults(func=cmd_offboard)
    sync = actions.add_parser(
        "sync", help="create the durable consumer of every hospital of the tenants file"
    )
    sync.add_argument("--conf", help=conf_help)
    sync.set_defaults(func=cmd_sync)
    token = actions.add_parser(
        "token", help="issue (or replace) a hospital's API token for the HTTP intakes"
    )
    token.add_argument("hospital", help="the hospital id (a slug)")
    token.add_argument(
        "--file", help="the tokens file (default $POST_API_TOKENS_FILE or $POST_DATA_DIR/...)"
    )
    token.add_argument("--revoke", action="store_true", help="remove the hospital's token")
    token.set_defaults(func=cmd_token)
    retention = actions.add_parser(
        "retention",
        help="forget a hospital's physicians once all their referrals closed N days ago",
    )
    retention.add_argument("hospital", help="the hospital id (a slug)")
    retention.add_argument(
        "--days", type=int, help="days after a referral's last outreach or interaction"
    )
    retention.add_argument("--off", action="store_true", help="remove the hospital's retention")
    retention.set_defaults(func=cmd_retention)
    webhooks.add_cli(actions)  # `postctl hospital webhook`: postctl/webhooks.py
