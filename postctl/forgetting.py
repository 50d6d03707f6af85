"""`postctl forget-jobs [--wait]`: how many forgets still have stream messages to erase, as the
referral service exposes it (`post_referral_forget_jobs_pending` on its /metrics; every
instance reports the same count), and with `--wait` their progress until none is left."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from typing import Any

from postctl.progress import Progress, error
from shared.settings import Settings

GAUGE = "post_referral_forget_jobs_pending"


def pending(url: str) -> int:
    """The gauge from a referral instance's /metrics (text exposition)."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(GAUGE + " ") or line.startswith(GAUGE + "{"):
                return int(float(line.rsplit(" ", 1)[1]))
    raise ValueError(f"{url}/metrics has no {GAUGE}")


def add_cli(subparsers: Any) -> None:
    """Registers `postctl forget-jobs [--wait] [--url URL] [--json]`."""
    jobs = subparsers.add_parser(
        "forget-jobs", help="forgets whose stream messages are not all erased yet"
    )
    jobs.add_argument("--wait", action="store_true", help="show their progress until none is left")
    jobs.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits at most")
    jobs.add_argument("--url", help="a referral instance (default: from POST_REFERRAL_PORT)")
    jobs.add_argument("--json", action="store_true", help="the count as JSON")
    jobs.set_defaults(func=cmd_forget_jobs)


def cmd_forget_jobs(args: argparse.Namespace) -> None:
    url = args.url or f"http://127.0.0.1:{Settings().http_port('referral')}"
    try:
        left = pending(url)
        if args.wait and left:
            deadline = time.monotonic() + args.timeout
            with Progress() as progress:
                task = progress.task("forget jobs done", left)
                most = left
                while left and time.monotonic() < deadline:
                    time.sleep(1.0)
                    left = pending(url)
                    most = max(most, left)  # more queued meanwhile: the total grows
                    task.update(most - left, most)
    except (OSError, ValueError) as exc:
        error(f"the referral service's forget jobs could not be read from {url}: {exc}")
        sys.exit(1)
    if args.json:
        print(json.dumps({"forget_jobs_pending": left}))
    else:
        print(f"{left} forget job(s) pending")
    sys.exit(0 if not (args.wait and left) else 1)
