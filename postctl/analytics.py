"""`postctl analytics rebuild`: new RE-AIM read models from the stream, swapped in while the
old ones keep answering (services/analytics/rebuild.py), with its progress (postctl/progress)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import nats

from postctl.progress import Progress, watch
from shared.contracts import STREAM_NAME, evt_subject
from shared.settings import Settings


def add_cli(subparsers: Any) -> None:
    """Registers `postctl analytics rebuild`."""
    analytics = subparsers.add_parser("analytics", help="analytics operations")
    actions = analytics.add_subparsers(dest="action", required=True)
    rebuild = actions.add_parser(
        "rebuild", help="build new read models from the stream and swap them in"
    )
    rebuild.set_defaults(func=cmd_analytics_rebuild)


async def events_in_stream(settings: Settings) -> int:
    """How many event messages the stream holds: what a rebuild reads (its progress' total)."""
    nc = await nats.connect(settings.nats_servers, tls=settings.nats_tls())
    try:
        info = await nc.jetstream().stream_info(STREAM_NAME, subjects_filter=evt_subject("*", ">"))
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


async def rebuild_with_progress(settings: Settings, progress: Progress) -> dict[str, Any]:
    from services.analytics.rebuild import rebuild

    counts: dict[str, int] = {}
    total = await events_in_stream(settings)
    task = progress.task("events replayed", total)
    watching = asyncio.create_task(watch(task, lambda: counts.get("messages", 0)))
    try:
        return await rebuild(settings, counts=counts)
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)


def cmd_analytics_rebuild(args: argparse.Namespace) -> None:
    with Progress() as progress:
        summary = asyncio.run(rebuild_with_progress(Settings(), progress))
    print(json.dumps(summary, indent=2, default=str))
