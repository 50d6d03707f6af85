"""`postctl region token --name <name> [--revoke]`: region tokens (CONTRACT.md 1.2, "Reading
a hospital's data over HTTP"), for whoever reads the whole region over HTTP: a Grafana, a
regional director, the platform's own tools (`reader_token`).

A region token reads every hospital's data (`GET /reaim`, `GET /hospitals`, and every
hospital's routes) and changes nothing. It is printed once, alone on standard output (for
scripts: `TOKEN=$(postctl region token --name grafana)`), the help on standard error; only its
SHA-256 is kept, in the same tokens file as the hospitals' (shared/auth.py). Issuing the same
name again replaces it; `--revoke` refuses it. The services see either within a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from shared import auth
from shared.settings import current, env_name

# The platform's own tools read with this variable's token when it is set (a deployment,
# where they cannot write the services' tokens file), else with one they issue themselves.
READER_TOKEN_VARIABLE = env_name("region_token")


def reader_token(name: str, environ: dict[str, str] | None = None) -> str:
    """The region token a tool of the platform (`postctl demo`, `load`, the benchmarks) reads
    with: $POST_REGION_TOKEN, else a token issued now under `name` in the tokens file the
    services read (the embedded default: the tools run beside them). Issuing replaces the
    earlier token of that name, so a tool's token lives as long as its next run."""
    if environ is None:  # this process's settings
        given = current().region_token.get_secret_value()
        if given:
            return given
        return auth.issue_region_token(name, auth.tokens_file())
    given = environ.get(READER_TOKEN_VARIABLE, "")
    if given:
        return given
    return auth.issue_region_token(name, auth.tokens_file(environ))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cmd_token(args: argparse.Namespace) -> None:
    path = Path(args.file) if args.file else auth.tokens_file()
    try:
        if args.revoke:
            found = auth.revoke_region_token(args.name, path)
            what = "revoked the region token" if found else "no region token named"
            print(f"{what} {args.name} in {path}", file=sys.stderr)
            return
        token = auth.issue_region_token(args.name, path)
    except ValueError as exc:
        raise SystemExit(f"postctl region token: {exc}") from None
    print(token)
    print(
        f"\nThe region token {args.name}, shown once: only its SHA-256 is kept, in {path}.\n"
        "It reads every hospital's data over HTTP and changes nothing; it replaces any earlier"
        " token of that name at once (no restart).\nSend it over a secure channel. Use it as\n"
        "  Authorization: Bearer <token>   e.g. GET /reaim, GET /hospitals, GET /reaim/<hospital>\n"
        "or open the dashboard at http://<analytics>/#token=<token>.",
        file=sys.stderr,
    )


def add_cli(subparsers: Any) -> None:
    """Registers `postctl region token --name <name> [--file ...] [--revoke]`."""
    region = subparsers.add_parser("region", help="region-wide readers")
    actions = region.add_subparsers(dest="action", required=True)
    token = actions.add_parser(
        "token", help="issue (or replace, or --revoke) a region token: reads all, changes nothing"
    )
    token.add_argument("--name", required=True, help="who holds it, a slug (grafana, ...)")
    token.add_argument(
        "--file", help="the tokens file (default $POST_API_TOKENS_FILE or $POST_DATA_DIR/...)"
    )
    token.add_argument("--revoke", action="store_true", help="refuse the token of that name")
    token.set_defaults(func=cmd_token)
