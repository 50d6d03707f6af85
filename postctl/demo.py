"""`postctl demo`: `up`, the POST study replayed through NATS (once per data directory), and
every figure the paper states beside the platform's answer."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from postctl import paper, showcase
from postctl.simulate import run_post_2023
from postctl.up import banner, run_until_stopped, start_platform
from shared import auth
from shared.client import wait_consumed
from shared.settings import Settings


def _get_json(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def add_cli(subparsers: Any) -> None:
    """Registers `postctl demo`."""
    demo = subparsers.add_parser("demo", help="up + the POST study + the RE-AIM report")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    settings = Settings()
    platform = start_platform(settings)
    analytics = f"http://127.0.0.1:{platform.service_ports['analytics']}"
    # The demo's region token (replacing the one of the last demo): it reads the figures here
    # and opens the dashboard at the URL printed below.
    token = auth.issue_region_token("demo", auth.tokens_file({**os.environ, **platform.env()}))
    try:
        if _get_json(f"{analytics}/reaim/{paper.HOSPITALS[0]}", token) is None:
            print("replaying the POST study (Tolins et al., PLOS ONE 2023) through NATS ...")
            summary = asyncio.run(run_post_2023(platform.nats_url))
            print(f"  sent {summary.get('commands', summary)} commands")
        else:
            print("the POST study is already loaded (data kept from an earlier run)")
        # Every answer of the replay is in the stream: wait until analytics has read it all.
        asyncio.run(wait_consumed(platform.nats_url, "analytics", db_url=platform.db_url))
        report = _get_json(f"{analytics}/reaim", token)
        rows = paper.compare(report)
        print(paper.format_table(rows))
        ok = all(r.match for r in rows)
        print("every figure the paper states matches." if ok else "SOME FIGURES DIFFER.")
        showcase.show(platform.nats_url, analytics, token)
    except BaseException:
        platform.stop()
        raise
    print(banner(platform, token), flush=True)
    if settings.demo_exit:  # for scripted checks of `make demo`
        platform.stop()
        sys.exit(0 if ok else 1)
    run_until_stopped(platform)
