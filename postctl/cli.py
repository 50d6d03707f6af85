"""postctl: the operator's command line for the POST platform.

postctl up [--instances N]       run the platform on the embedded default (Ctrl-C stops),
                                 N instances of each service sharing the hospitals
postctl status [--json]          which instance holds which partitions and hospitals; lag
postctl demo                     up + replay the POST study + the RE-AIM report
postctl simulate post-2023       replay the published POST study through NATS
postctl simulate region ...      a synthetic region, for demos and load
postctl load --rate R --duration D [--hospitals N] [--seed S] [--analytics URL] [--json]
                                 soak: a known mix of commands, then check nothing was lost
postctl analytics rebuild        drop the RE-AIM read models and replay the stream
postctl hospital onboard H       create a hospital's NATS credentials in the tenants file
postctl hospital token H         issue (or --revoke) a hospital's API token (its HTTP routes)
postctl hospital webhook H --url URL | --off
                                 a hospital's webhook endpoint (prints its signing secret once)
postctl region token --name N    issue (or --revoke) a region token: reads every hospital over HTTP
postctl certs --out DIR          a private CA and the server certificates of a trial deployment
postctl backup --out DIR         PostgreSQL and the POST stream, consistent, with a manifest
postctl forget-jobs [--wait]     forgets whose stream messages are not all erased yet
postctl restore DIR [--only postgres|stream]
                                 a backup onto empty servers (the services stopped)

Each subcommand lives in its own module, which registers it with `add_cli(subparsers)`.
"""

from __future__ import annotations

import argparse
import os
import sys

from postctl import (
    analytics,
    backup,
    certs,
    demo,
    forgetting,
    load,
    region,
    simulate,
    status,
    tenants,
    up,
)
from shared.settings import UnknownSettingError, refuse_unknown_variables

__all__ = ["main"]

SUBCOMMANDS = (
    up,
    status,
    demo,
    simulate,
    load,
    analytics,
    tenants,
    region,
    certs,
    backup,
    forgetting,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="postctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_cli(subparsers)
    args = parser.parse_args(argv)
    try:
        refuse_unknown_variables(os.environ)
        args.func(args)
    except UnknownSettingError as exc:
        sys.exit(f"postctl: {exc}")


if __name__ == "__main__":
    main()
