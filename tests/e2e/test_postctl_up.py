"""`postctl up` as an operator runs it: all four services answer, a command published by a
plain nats-py client comes back as its event, and Ctrl-C then a second `up` keeps every event."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import nats
import pytest

from shared.contracts import make_cloudevent
from shared.runtime import SERVICES, free_port, port_in_use

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _up(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "postctl", "up"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )


def _wait_banner(log: Path, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    # The log is appended to by every run: only a banner this run printed counts.
    already = log.read_text().count("POST platform is up.") if log.exists() else 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.read_text().count("POST platform is up.") > already:
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError("postctl up did not come up:\n" + log.read_text()[-3000:])


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read().decode()


async def _register_and_wait(nats_url: str, hospital: str, physician_count: int = 120) -> dict:
    nc = await nats.connect(nats_url)
    sub = await nc.subscribe(f"post.{hospital}.evt.>")
    ce = make_cloudevent(
        type_="RegisterHospital",
        source=f"/hospitals/{hospital}/plain-client",
        data={"name": "Plain Client General", "physician_count": physician_count},
    )
    js = nc.jetstream()
    await js.publish(
        f"post.{hospital}.cmd.RegisterHospital",
        json.dumps(ce).encode(),
        headers={"Nats-Msg-Id": ce["id"]},
    )
    msg = await sub.next_msg(timeout=20)
    await nc.close()
    answer = json.loads(msg.data)
    assert answer["causationid"] == ce["id"]
    return answer


async def _stored_events(nats_url: str, hospital: str) -> list[str]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    sub = await js.subscribe(f"post.{hospital}.>", ordered_consumer=True)
    types = []
    try:
        while True:
            msg = await sub.next_msg(timeout=1)
            types.append(msg.subject.rsplit(".", 1)[-1])
    except (nats.errors.TimeoutError, TimeoutError):
        pass
    await nc.close()
    return types


async def test_up_serves_every_service_and_keeps_events_across_a_restart() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="post-up-"))
    os.chmod(data_dir, 0o755)
    ports = {name: free_port() for name in SERVICES}
    nats_port = free_port()
    env = {
        "POST_DATA_DIR": str(data_dir),
        "POST_NATS_URL": f"nats://127.0.0.1:{nats_port}",
        "POST_NATS_MONITOR_PORT": str(free_port()),
        "POST_PG_PORT": str(free_port()),
        **{f"POST_{name.upper()}_PORT": str(port) for name, port in ports.items()},
    }
    env.pop("POST_DATABASE_URL", None)
    log = data_dir / "postctl.log"
    hospital = f"h-{uuid.uuid4().hex[:8]}"

    proc = _up(env, log)
    try:
        _wait_banner(log, proc)
        for name, port in ports.items():
            status, body = _get(f"http://127.0.0.1:{port}/healthz")
            assert status == 200 and name in body
            _, metrics = _get(f"http://127.0.0.1:{port}/metrics")
            assert "post_handler_seconds" in metrics
            assert "post_messages_handled_total" in metrics or name == "analytics"
        answer = await _register_and_wait(env["POST_NATS_URL"], hospital)
        assert answer["type"] == "HospitalRegistered"
        assert answer["data"]["physician_count"] == 120
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert "stopped." in log.read_text()

    proc = _up(env, log)
    try:
        _wait_banner(log, proc)
        assert await _stored_events(env["POST_NATS_URL"], hospital) == [
            "RegisterHospital",
            "HospitalRegistered",
        ]
        # the matching service kept its state too: registering the hospital differently conflicts
        second = await _register_and_wait(env["POST_NATS_URL"], hospital, physician_count=99)
        assert second["type"] == "CommandRejected"
        assert second["data"]["reason_code"] == "conflicting_duplicate"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert log.read_text().count("stopped.") == 2  # the second run stopped as the first did


@pytest.mark.parametrize("listening", ["nats", "postgres"])
def test_ctrl_c_while_starting_leaves_nothing_running(listening: str) -> None:
    """An operator who presses Ctrl-C before the banner (the servers coming up, the services
    not yet) gets the prompt back with every server and service stopped, not orphaned. Pressed
    once NATS listens, or once PostgreSQL does (while the start creates the database in
    asyncio.run: a Ctrl-C there was once swallowed, and the start went on to the banner)."""
    data_dir = Path(tempfile.mkdtemp(prefix="post-up-"))
    os.chmod(data_dir, 0o755)
    ports = {name: free_port() for name in SERVICES}
    nats_port, pg_port = free_port(), free_port()
    env = {
        "POST_DATA_DIR": str(data_dir),
        "POST_NATS_URL": f"nats://127.0.0.1:{nats_port}",
        "POST_NATS_MONITOR_PORT": str(free_port()),
        "POST_PG_PORT": str(pg_port),
        **{f"POST_{name.upper()}_PORT": str(port) for name, port in ports.items()},
    }
    env.pop("POST_DATABASE_URL", None)
    log = data_dir / "postctl.log"
    proc = _up(env, log)
    try:
        deadline = time.monotonic() + 90
        # A server listening: there is something to leave behind.
        while not port_in_use(nats_port if listening == "nats" else pg_port):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        assert "POST platform is up." not in log.read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # Where it waits: postctl up writes its threads' stacks on SIGUSR1.
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            proc.kill()
            raise AssertionError(
                "postctl up did not stop within 60 s of Ctrl-C:\n" + log.read_text()[-6000:]
            ) from None
    listening = [p for p in [nats_port, pg_port, *ports.values()] if port_in_use(p)]
    assert listening == [], log.read_text()[-3000:]
