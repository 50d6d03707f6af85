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
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

REPO = Path(__file__).resolve().parents[4]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shared.runtime import Platform  # noqa: E402

pytestmark = pytest.mark.platform


@dataclass
class Onboarded:
    hospital: str
    seed_file: Path
    public_key: str


# --- onboarding, as `postctl hospital onboard <h> --out FILE` does it -------------------------


class HospitalKeys:
    """Hospitals onboarded on the kit's platform through the platform's own code: the key in
    the tenants file of the embedded nats-server (which reloads), the seed in a file, and the
    durable consumer `hospital-<h>`."""

    def __init__(self, plat: Platform) -> None:
        self.plat = plat
        self.keys_dir = plat.data_dir / "hospital-keys"
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        self._lock = asyncio.Lock()

    async def onboard(self, hospital: str) -> Onboarded:
        from postctl import tenants
        from shared import hospitals

        assert self.plat.nats is not None
        seed_file = self.keys_dir / f"{hospital}.nk"
        async with self._lock:  # one rewrite of the tenants file at a time
            public, _ = tenants.onboard_hospital(self.plat.nats.tenants_file, hospital, seed_file)
            if not await asyncio.to_thread(tenants.reload_embedded, self.plat.nats.tenants_file):
                raise RuntimeError("the embedded nats-server did not reload its tenants")
        nc = await nats.connect(self.plat.nats_url)  # anonymous on loopback: the platform
        try:
            await hospitals.ensure_consumer(nc.jetstream(), hospital)
        finally:
            await nc.close()
        return Onboarded(hospital, seed_file, public)


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
