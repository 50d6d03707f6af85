"""`postctl backup --out DIR` and `postctl restore DIR`: PostgreSQL and the `POST` stream, with a
manifest (shared/backup.py; docs/decisions.md, "Backup and restore"; deploy/README.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import structlog

from postctl.progress import Progress, Task, console, error
from shared.backup import BackupError, backup, restore
from shared.settings import Settings

PHASES = {"postgres": "PostgreSQL", "stream": "stream POST"}


def _logs_to_stderr() -> None:
    """The library's log lines beside the progress, on standard error: standard output is the
    result (`--json`)."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))


def _reporter(progress: Progress) -> Any:
    tasks: dict[str, Task] = {}

    def report(what: str, done: int, total: int | None) -> None:
        task = tasks.get(what)
        if task is None:
            task = tasks[what] = progress.task(PHASES.get(what, what), total, "B")
        task.update(done, total)
        if total is not None and done >= total:
            task.finish()

    return report


def add_cli(subparsers: Any) -> None:
    """Registers `postctl backup` and `postctl restore`."""
    made = subparsers.add_parser(
        "backup", help="a consistent backup of PostgreSQL and the POST stream, with a manifest"
    )
    made.add_argument("--out", type=Path, required=True, help="a new (or empty) directory")
    made.add_argument("--json", action="store_true", help="the manifest as JSON")
    made.set_defaults(func=cmd_backup)
    back = subparsers.add_parser(
        "restore", help="restore a backup onto empty servers (the services stopped)"
    )
    back.add_argument("dir", type=Path, help="a directory written by postctl backup")
    back.add_argument(
        "--only",
        choices=["postgres", "stream"],
        help="restore one of the two (PostgreSQL lost: --only postgres)",
    )
    back.add_argument("--json", action="store_true", help="what was restored, as JSON")
    back.set_defaults(func=cmd_restore)


def cmd_backup(args: argparse.Namespace) -> None:
    _logs_to_stderr()
    try:
        with Progress() as progress:
            made = asyncio.run(backup(Settings(), args.out, _reporter(progress)))
    except BackupError as exc:
        error(str(exc))
        sys.exit(1)
    manifest = made.manifest
    if args.json:
        print(json.dumps(manifest, indent=2, default=str))
        return
    stream = manifest["stream"]
    console().print(
        f"backup written to [bold]{made.path}[/]:"
        f" PostgreSQL {manifest['versions']['postgres_server']},"
        f" stream {stream['name']} sequences {stream['first_seq']}..{stream['last_seq']}"
        f" ({stream['messages']} messages); services replay from {manifest['replay_from']}"
        " after a restore."
    )


def cmd_restore(args: argparse.Namespace) -> None:
    only = args.only
    _logs_to_stderr()
    try:
        with Progress() as progress:
            done = asyncio.run(
                restore(
                    Settings(),
                    args.dir,
                    postgres=only in (None, "postgres"),
                    stream=only in (None, "stream"),
                    progress=_reporter(progress),
                )
            )
    except BackupError as exc:
        error(str(exc))
        sys.exit(1)
    if args.json:
        print(json.dumps(done, indent=2, default=str))
        return
    console().print(
        f"restored from [bold]{args.dir}[/]. Start the services: they handle the stream again"
        f" from sequence {done['replay_from']} (what the restore had is a duplicate to them)."
    )
