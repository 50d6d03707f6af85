"""Backup and restore of the platform's data: PostgreSQL (every service's schema, one `pg_dump`
snapshot) and the `POST` stream (JetStream's snapshot API), with a manifest.

A backup directory holds:

- `postgres.dump`: `pg_dump --format=custom` of the platform's database, one consistent
  snapshot of every schema;
- `POST.snapshot`: the stream as JetStream's `$JS.API.STREAM.SNAPSHOT` sends it (its
  messages and its consumers, the hospitals' durable ones among them), in chunks acknowledged
  for flow control;
- `files/`: the embedded default's tenants file (the hospitals' public keys) and API tokens
  file (hashes only), when they are where the embedded default keeps them;
- `manifest.json`: versions, the stream's first and last sequence, the sequence the services
  replay from after a restore (`replay_from`), each service's work-stream subjects, the size
  and SHA-256 of every file, and when.

The order makes it consistent (docs/decisions.md, "Backup and restore"): first the lowest
`POST` sequence some service had not handled yet (`replay_from`: every message before it was
committed before the dump began), then the dump, then the stream snapshot (which so holds
every message the dump reflects). After a restore the services handle the stream again from
`replay_from` (`catch_up_from_stream`); what the dump had handled already is a duplicate to
them (`processed`), and what they decide again gets the same event id as before
(`UnitOfWork.event_id`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared.contracts import STREAM_NAME
from shared.partitions import ensure_work_stream, service_subjects, source_sequence, work_stream
from shared.runtime import SERVICES, postgres_bin_dir
from shared.settings import Settings

log = structlog.get_logger()

FORMAT = 1
MANIFEST = "manifest.json"
PG_DUMP = "postgres.dump"
STREAM_SNAPSHOT = f"{STREAM_NAME}.snapshot"
FILES = "files"
CHUNK_BYTES = 128 * 1024

# Progress callbacks: (what, bytes done, bytes in all or None); what is "postgres" or "stream".
Progress = Callable[[str, int, int | None], None]


class BackupError(Exception):
    """A backup or restore that cannot go on, with what to do about it (shown to the operator
    as it is: it names files and servers, never data)."""


def _quiet(what: str, done: int, total: int | None) -> None:
    pass


# --- PostgreSQL ------------------------------------------------------------------------------


def _libpq(database_url: str) -> tuple[str, dict[str, str]]:
    """The URL without its password, and the environment that carries the password instead
    (a password on a command line is visible to every user of the machine)."""
    parts = urlsplit(database_url)
    env = dict(os.environ)
    netloc = parts.netloc
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)
        user = parts.username or ""
        host = netloc.rsplit("@", 1)[1]
        netloc = f"{user}@{host}" if user else host
    return urlunsplit(parts._replace(netloc=netloc)), env


def _pg_tool(name: str) -> str:
    path = postgres_bin_dir() / name
    if not path.exists():
        raise BackupError(f"{name} not found beside PostgreSQL's binaries ({path.parent})")
    return str(path)


def _tool_version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _run_pg(args: list[str], env: dict[str, str], what: str) -> None:
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        # pg_dump and pg_restore name objects and files, never row values.
        raise BackupError(f"{what} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def dump_postgres(database_url: str, out: Path) -> None:
    url, env = _libpq(database_url)
    _run_pg(
        [_pg_tool("pg_dump"), "--format=custom", "--file", str(out), "--dbname", url],
        env,
        "pg_dump",
    )


async def _platform_schemas(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'"
        " AND nspname NOT IN ('public', 'information_schema') ORDER BY 1"
    )
    public = await conn.fetchval(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public'"
    )
    return [r["nspname"] for r in rows] + (["public"] if public else [])


async def postgres_is_empty(database_url: str) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        return not await _platform_schemas(conn)
    finally:
        await conn.close()


def restore_postgres(database_url: str, dump: Path) -> None:
    """`pg_restore` into the (empty) database, in one transaction: all of it or nothing."""
    url, env = _libpq(database_url)
    _run_pg(
        [
            _pg_tool("pg_restore"),
            "--exit-on-error",
            "--single-transaction",
            "--dbname",
            url,
            str(dump),
        ],
        env,
        "pg_restore",
    )


# --- the stream: JetStream's snapshot and restore API ------------------------------------------


async def _api(nc: NATS, subject: str, body: dict[str, Any], timeout: float = 30.0) -> Any:
    reply = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    answer = json.loads(reply.data or b"{}")
    if isinstance(answer, dict) and answer.get("error"):
        error = answer["error"]
        raise BackupError(f"{subject}: {error.get('description', error)}")
    return answer


async def snapshot_stream(
    nc: NATS, out: Path, stream: str = STREAM_NAME, progress: Progress = _quiet
) -> dict[str, Any]:
    """Write JetStream's snapshot of `stream` (messages and consumers) to `out`; returns the
    stream's config and state as the server had them when it began (a restore needs both).
    Every chunk comes with a reply subject: answering it is the flow control that lets the
    server send on."""
    inbox = nc.new_inbox()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    written = 0
    total: int | None = None
    digest = hashlib.sha256()
    file = open(out, "wb")

    async def chunk(msg: Msg) -> None:
        nonlocal written
        if done.done():
            return
        status = (msg.headers or {}).get("Status", "")
        if not msg.data:
            if status and status not in ("204",):
                description = (msg.headers or {}).get("Description", status)
                done.set_exception(BackupError(f"snapshot of {stream}: {description}"))
            else:
                done.set_result(None)
            return
        file.write(msg.data)
        digest.update(msg.data)
        written += len(msg.data)
        progress("stream", written, total)
        if msg.reply:
            await nc.publish(msg.reply, b"")

    sub = await nc.subscribe(inbox, cb=chunk, pending_bytes_limit=256 * 1024 * 1024)
    try:
        answer = await _api(
            nc,
            f"$JS.API.STREAM.SNAPSHOT.{stream}",
            {"deliver_subject": inbox, "chunk_size": CHUNK_BYTES, "no_consumers": False},
        )
        total = int(answer.get("state", {}).get("bytes") or 0) or None
        await asyncio.wait_for(done, timeout=3600)
    finally:
        await sub.unsubscribe()
        file.close()
    return {"config": answer["config"], "state": answer["state"], "sha256": digest.hexdigest()}


async def restore_stream(
    nc: NATS,
    snapshot: Path,
    config: dict[str, Any],
    state: dict[str, Any],
    progress: Progress = _quiet,
) -> dict[str, Any]:
    """Send a snapshot to `$JS.API.STREAM.RESTORE`: the stream comes back with its messages,
    sequences and consumers. Each chunk is a request the server acknowledges; an empty one
    ends it, answered with the restored stream's info."""
    name = config["name"]
    answer = await _api(nc, f"$JS.API.STREAM.RESTORE.{name}", {"config": config, "state": state})
    deliver = answer["deliver_subject"]
    total, sent = snapshot.stat().st_size, 0
    with open(snapshot, "rb") as file:
        while data := file.read(CHUNK_BYTES):
            await nc.request(deliver, data, timeout=60)
            sent += len(data)
            progress("stream", sent, total)
    reply = await nc.request(deliver, b"", timeout=600)
    result = json.loads(reply.data or b"{}")
    if result.get("error"):
        raise BackupError(f"restore of {name}: {result['error'].get('description')}")
    return dict(result)


# --- where the services stand in the stream ---------------------------------------------------


async def replay_position(js: JetStreamContext, services: Iterable[str] = SERVICES) -> int:
    """The lowest sequence of `POST` that some service had not handled yet: every message
    before it was handled, and its effects committed, before this returns (a work stream is a
    work queue: it holds what is not acknowledged, and a message is acknowledged only after its
    transaction commits). A service without its work stream yet, or sourcing that does not
    settle, gives the stream's first sequence: replaying more is only slower, never wrong."""
    post = await js.stream_info(STREAM_NAME)
    first = post.state.first_seq or 1
    position = (post.state.last_seq or 0) + 1
    for service in services:
        for _ in range(100):  # sourcing keeps up in milliseconds; wait for it a little
            try:
                info = await js.stream_info(work_stream(service))
            except NotFoundError:
                return first
            if not any(s.lag for s in info.sources or []):
                break
            await asyncio.sleep(0.05)
        else:
            return first
        if info.state.messages:
            try:
                oldest = await js.get_msg(
                    work_stream(service), seq=info.state.first_seq or 1, next=True
                )
            except NotFoundError:
                continue  # acknowledged meanwhile: handled and committed
            seq = source_sequence(dict(oldest.headers or {}))
            position = min(position, seq if seq is not None else first)
    return max(position, first)


async def work_subjects(
    js: JetStreamContext, services: Iterable[str] = SERVICES
) -> dict[str, list[str]]:
    """Each service's subjects of `POST`, as its work stream sources them."""
    found: dict[str, list[str]] = {}
    for service in services:
        try:
            found[service] = await service_subjects(js, service)
        except NotFoundError:
            continue
    return found


async def catch_up_from_stream(
    js: JetStreamContext, replay_from: int, subjects: dict[str, list[str]], replicas: int = 1
) -> None:
    """After PostgreSQL is restored, before the services start: every service's work stream
    anew, sourcing `POST` from `replay_from`, so that the services handle again everything the
    restored database had not. (With positions kept in PostgreSQL instead of work streams, the
    restored positions resume by themselves and this has nothing to do.)"""
    for service, wanted in subjects.items():
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(work_stream(service))
        await ensure_work_stream(js, service, wanted, replicas, start_seq=replay_from)
        log.info("work_stream_replays", service=service, from_stream_seq=replay_from)


# --- the whole backup -------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def database_url(settings: Settings) -> str:
    """The platform's database: POST_DATABASE_URL, or the embedded default's PostgreSQL on
    POST_PG_PORT."""
    if settings.database_given:
        return settings.database_url.get_secret_value()
    return f"postgresql://postgres@127.0.0.1:{settings.pg_port}/post"


def _embedded_files(settings: Settings) -> dict[str, Path]:
    """The embedded default's files beside the data: the tenants file (hospitals' public keys)
    and the API tokens file (hashes)."""
    from shared.auth import tokens_file

    return {
        "tenants.conf": settings.data_dir / "nats" / "tenants.conf",
        "api-tokens.json": tokens_file({**os.environ, "POST_DATA_DIR": str(settings.data_dir)}),
    }


@dataclass
class Backup:
    """A backup directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> Backup:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise BackupError(f"{path} holds no {MANIFEST}: not a backup") from None
        if manifest.get("format") != FORMAT:
            raise BackupError(f"{path}: backup format {manifest.get('format')}, not {FORMAT}")
        return cls(path, manifest)

    def verify(self) -> None:
        """Every file as the manifest recorded it (size and SHA-256)."""
        for name, expected in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file():
                raise BackupError(f"{file} is missing")
            if file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
                raise BackupError(f"{file} does not match its checksum in the manifest")


async def backup(settings: Settings, out: Path, progress: Progress = _quiet) -> Backup:
    """A consistent backup of PostgreSQL and the `POST` stream into `out` (new or empty)."""
    if out.exists() and any(out.iterdir()):
        raise BackupError(f"{out} is not empty: give a new directory")
    out.mkdir(parents=True, exist_ok=True)
    try:
        return await _backup(settings, out, progress)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # half a backup must not pass for one
        raise


async def _backup(settings: Settings, out: Path, progress: Progress) -> Backup:
    db_url = database_url(settings)
    started = datetime.now(UTC)
    nc = await nats.connect(settings.nats_servers, tls=settings.nats_tls())
    try:
        js = nc.jetstream()
        replay_from = await replay_position(js)
        subjects = await work_subjects(js)
        progress("postgres", 0, None)
        await asyncio.to_thread(dump_postgres, db_url, out / PG_DUMP)
        size = (out / PG_DUMP).stat().st_size
        progress("postgres", size, size)
        stream = await snapshot_stream(nc, out / STREAM_SNAPSHOT, progress=progress)
        version = nc.connected_server_version
        nats_version = f"{version.major}.{version.minor}.{version.patch}"
        conn = await asyncpg.connect(db_url)
        try:
            pg_version = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
    finally:
        await nc.close()
    files = {PG_DUMP: out / PG_DUMP, STREAM_SNAPSHOT: out / STREAM_SNAPSHOT}
    if not settings.database_given:  # the embedded default: its keys and tokens files too
        (out / FILES).mkdir(exist_ok=True)
        for name, path in _embedded_files(settings).items():
            if not path.is_file():
                continue
            shutil.copy2(path, out / FILES / name)
            files[f"{FILES}/{name}"] = out / FILES / name
    state = stream["state"]
    manifest = {
        "format": FORMAT,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "versions": {
            "postgres_server": pg_version,
            "pg_dump": _tool_version(_pg_tool("pg_dump")),
            "nats_server": str(nats_version),
        },
        "stream": {
            "name": STREAM_NAME,
            "first_seq": state.get("first_seq"),
            "last_seq": state.get("last_seq"),
            "messages": state.get("messages"),
            "bytes": state.get("bytes"),
            "config": stream["config"],
            "state": state,
        },
        "replay_from": replay_from,
        "work_streams": subjects,
        "files": {
            name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            for name, path in files.items()
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    log.info("backup_written", last_seq=state.get("last_seq"), replay_from=replay_from)
    return Backup(out, manifest)


async def restore(
    settings: Settings,
    source: Path,
    *,
    postgres: bool = True,
    stream: bool = True,
    progress: Progress = _quiet,
) -> dict[str, Any]:
    """Restore a backup onto empty servers, with the services stopped: PostgreSQL (the
    database must hold no platform schema), the `POST` stream (it must not exist), or both;
    then the services' work streams replay from the backup's position. Returns what it did."""
    found = Backup.read(source)
    found.verify()
    manifest = found.manifest
    done: dict[str, Any] = {"replay_from": manifest["replay_from"]}
    db_url = database_url(settings)
    nc = await nats.connect(settings.nats_servers, tls=settings.nats_tls())
    try:
        js = nc.jetstream()
        if stream:
            try:
                await js.stream_info(STREAM_NAME)
                raise BackupError(
                    f"the stream {STREAM_NAME} exists on {', '.join(settings.nats_hosts)}:"
                    " restore it onto a NATS without it, or restore PostgreSQL alone"
                    " (--only postgres)"
                )
            except NotFoundError:
                pass
        if postgres and not await postgres_is_empty(db_url):
            raise BackupError(
                "the database already holds the platform's schemas: restore onto an empty one"
                " (a new PostgreSQL, or the stream alone: --only stream)"
            )
        if stream:
            info = manifest["stream"]
            restored = await restore_stream(
                nc, source / STREAM_SNAPSHOT, info["config"], info["state"], progress
            )
            done["stream_last_seq"] = (restored.get("state") or {}).get("last_seq")
        if postgres:
            progress("postgres", 0, None)
            await asyncio.to_thread(restore_postgres, db_url, source / PG_DUMP)
            size = (source / PG_DUMP).stat().st_size
            progress("postgres", size, size)
            done["postgres"] = "restored"
        if not settings.database_given:
            for name in manifest["files"]:
                if not name.startswith(f"{FILES}/"):
                    continue
                target = _embedded_files(settings).get(name.split("/", 1)[1])
                if target is not None and not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source / name, target)
                    os.chmod(target, 0o600)
        subjects = manifest.get("work_streams") or await work_subjects(js)
        await catch_up_from_stream(js, manifest["replay_from"], subjects, settings.stream_replicas)
        done["work_streams"] = sorted(subjects)
    finally:
        await nc.close()
    return done
