"""`postctl analytics rebuild`: new RE-AIM read models from the stream, swapped in while the
old ones keep answering (services/analytics/rebuild.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from shared.settings import Settings


def add_cli(subparsers: Any) -> None:
    """Registers `postctl analytics rebuild`."""
    analytics = subparsers.add_parser("analytics", help="analytics operations")
    actions = analytics.add_subparsers(dest="action", required=True)
    rebuild = actions.add_parser(
        "rebuild", help="build new read models from the stream and swap them in"
    )
    rebuild.set_defaults(func=cmd_analytics_rebuild)


def cmd_analytics_rebuild(args: argparse.Namespace) -> None:
    from services.analytics.rebuild import rebuild

    summary = asyncio.run(rebuild(Settings()))
    print(json.dumps(summary, indent=2, default=str))
