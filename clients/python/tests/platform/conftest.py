"""The real POST platform for the kit's tests: nats-server, PostgreSQL and the four services on
free ports (the repository's `shared.runtime`), and hospitals onboarded on it.

These tests need the repository around the package (they run from `make test`); a hospital
running the kit alone runs tests/ without this folder (see the README).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nkeys
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

REPO = Path(__file__).resolve().parents[4]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shared.runtime import Platform, nats_server_binary, wait_for_port  # noqa: E402

pytestmark = pytest.mark.platform


@dataclass
class Onboarded:
    hospital: str
    seed_file: Path
    public_key: str


# --- STAND-IN for `postctl hospital onboard` (issue 24, h-keys) ------------------------------
# Until the platform issues hospital keys itself, this fixture does what CONTRACT.md 1.2
# "Hospital connections" says onboarding does: an NKey user with exactly the hospital's
# permissions, the anonymous loopback connection acting as the platform (`no_auth_user`), and
# the durable consumer `hospital-<h>`. When h-keys lands, point `onboard` at
# `postctl hospital onboard <h> --out FILE` and delete the rest of this block.


def hospital_permissions(h: str) -> str:
    publish = [
        f"post.{h}.cmd.>",
        f"$JS.API.CONSUMER.MSG.NEXT.POST.hospital-{h}",
        f"$JS.API.CONSUMER.INFO.POST.hospital-{h}",
        f"$JS.ACK.POST.hospital-{h}.>",
    ]
    subscribe = [f"post.{h}.evt.>", f"_INBOX_{h}.>"]
    quoted = lambda xs: ", ".join(f'"{x}"' for x in xs)  # noqa: E731
    return (
        f"permissions: {{ publish: {{ allow: [{quoted(publish)}] }}, "
        f"subscribe: {{ allow: [{quoted(subscribe)}] }} }}"
    )


class HospitalKeys:
    """Writes the hospitals' NKey users into the platform's nats-server config and reloads it."""

    def __init__(self, plat: Platform) -> None:
        assert plat.nats is not None and plat.nats.proc is not None
        self.plat = plat
        self.config = plat.nats.data_dir / "nats-server.conf"
        self.base = self.config.read_text()
        self.password = secrets.token_hex(16)
        self.users: dict[str, str] = {}  # hospital -> public key
        self.keys_dir = plat.data_dir / "hospital-keys"
        self.keys_dir.mkdir(exist_ok=True)
        # nats-server cannot reload `no_auth_user`: restart it once with authorization on.
        nats_server = plat.nats
        nats_server.stop()
        self.write(reload=False)
        log = open(nats_server.data_dir / "nats-server.log", "ab")
        nats_server.proc = subprocess.Popen(
            [nats_server_binary(), "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(nats_server.port, proc=nats_server.proc)

    def write(self, reload: bool = True) -> None:
        entries = [f'{{ user: "platform", password: "{self.password}" }}'] + [
            f'{{ nkey: "{pub}", {hospital_permissions(h)} }}' for h, pub in self.users.items()
        ]
        self.config.write_text(
            self.base
            + "authorization { users: [\n  "
            + ",\n  ".join(entries)
            + "\n] }\nno_auth_user: platform\n"
        )
        if reload:
            assert self.plat.nats is not None and self.plat.nats.proc is not None
            self.plat.nats.proc.send_signal(signal.SIGHUP)

    async def onboard(self, hospital: str) -> Onboarded:
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        public = nkeys.from_seed(seed).public_key.decode()
        seed_file = self.keys_dir / f"{hospital}.nk"
        seed_file.write_bytes(seed)
        seed_file.chmod(0o600)
        self.users[hospital] = public
        self.write()
        nc = await nats.connect(self.plat.nats_url)
        try:
            await nc.jetstream().add_consumer(
                "POST",
                ConsumerConfig(
                    durable_name=f"hospital-{hospital}",
                    filter_subject=f"post.{hospital}.evt.>",
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=30,
                    max_deliver=-1,
                ),
            )
        finally:
            await nc.close()
        await self._wait_key_works(hospital, seed_file)
        return Onboarded(hospital, seed_file, public)

    async def _wait_key_works(self, hospital: str, seed_file: Path) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                nc = await nats.connect(
                    self.plat.nats_url,
                    nkeys_seed=str(seed_file),
                    inbox_prefix=f"_INBOX_{hospital}",
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                )
                await nc.close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


# --- end of the stand-in ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def kit_platform() -> Iterator[Platform]:
    plat = Platform.on_free_ports(
        "post-kit-", {"POST_LOG_LEVEL": "warning", "POST_NOT_YET_KNOWN_SECONDS": "6"}
    )
    try:
        plat.start_servers()
        plat.hospital_keys = HospitalKeys(plat)  # type: ignore[attr-defined]
        plat.start_services()
        plat.wait_ready()
        yield plat
    finally:
        plat.stop()
        if os.environ.get("POST_KEEP_TEST_DATA") != "1":
            shutil.rmtree(plat.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def hospital_keys(kit_platform: Platform) -> HospitalKeys:
    keys: HospitalKeys = kit_platform.hospital_keys  # type: ignore[attr-defined]
    return keys


@pytest.fixture
async def onboarded(
    hospital_keys: HospitalKeys,
) -> AsyncIterator[Callable[[str], object]]:
    yield hospital_keys.onboard


@pytest.fixture
def new_hospital() -> str:
    return f"kit-{secrets.token_hex(5)}"
