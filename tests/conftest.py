"""Servers for the tests: one nats-server and one PostgreSQL per test session, real processes
on free ports, and (for end-to-end tests) the four services started as the platform runs them.

Fixtures:
- ``platform``: a `shared.runtime.Platform` with nats-server and PostgreSQL running
  (``platform.nats_url``, ``platform.db_url``); no services.
- ``stack``: the same platform with the four services running (test clock enabled, timers
  every 0.2 s, a command waits 6 s for a fact it depends on);
  ``stack.service_ports[name]`` gives each HTTP port.
- ``client``: a `shared.client.PlatformClient` on the stack's NATS that plays each hospital
  with that hospital's own key (onboarded on first use) and its durable consumer.
- ``hospital``: a fresh hospital id for this test (tests share the stack, not tenants).
- ``advance_clock(service, seconds)``: moves a running service's clock forward.
- ``http(service, token=None)``: an httpx.AsyncClient on that service (sending
  ``Authorization: Bearer <token>`` when given).
- ``api_token(hospital)``: issues the hospital's API token on the stack (``Bearer`` it).
- ``region_token()``: issues a new region token on the stack (reads every hospital's data over
  HTTP, changes nothing; each call a new name, so no test replaces another's).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from shared.auth import issue_region_token, issue_token, tokens_file
from shared.client import HospitalKeys, PlatformClient
from shared.runtime import Platform


def _discard(plat: Platform) -> None:
    plat.stop()
    if os.environ.get("POST_KEEP_TEST_DATA") != "1":
        shutil.rmtree(plat.data_dir, ignore_errors=True)


@contextmanager
def dedicated_platform(prefix: str, **extra_env: str) -> Iterator[Platform]:
    """A whole platform of its own (servers and the four services, ready), for tests whose
    region-wide figures must hold only their own data, or that break things."""
    plat = Platform.on_free_ports(prefix, {"POST_LOG_LEVEL": "warning", **extra_env})
    try:
        plat.start_servers()
        plat.start_services()
        plat.wait_ready()
        yield plat
    finally:
        _discard(plat)


def region_token_for(plat: Platform, name: str = "tests") -> str:
    """A region token issued on `plat` (a dedicated platform's own tokens file); the same name
    again replaces it."""
    return issue_region_token(name, tokens_file({**os.environ, **plat.env()}))


@pytest.fixture(scope="session")
def platform() -> Iterator[Platform]:
    plat = Platform.on_free_ports(
        "post-test-",
        {
            "POST_TEST_CLOCK": "1",
            "POST_TIMER_INTERVAL": "0.2",
            "POST_LOG_LEVEL": "info",
            # A command refused for want of another service's fact waits this long for it
            # (600 s in production): refusals such as unknown_hospital then come after ~6.2 s,
            # the first retry past it (back-off 0.2, 0.4, 0.8, 1.6, 3.2 s).
            "POST_NOT_YET_KNOWN_SECONDS": "6",
            # The retention sweep (300 s in production) looks every second.
            "POST_RETENTION_INTERVAL": "1",
        },
    )
    try:
        plat.start_servers()
        yield plat
    finally:
        _discard(plat)


@pytest.fixture(scope="session")
def stack(platform: Platform) -> Platform:
    platform.start_services()
    platform.wait_ready()
    return platform


@pytest.fixture(scope="session")
async def client(stack: Platform) -> AsyncIterator[PlatformClient]:
    assert stack.nats is not None
    keys = HospitalKeys(stack.nats.tenants_file, stack.data_dir / "hospital-keys")
    c = await PlatformClient.connect(stack.nats_url, keys=keys)
    yield c
    await c.close()


@pytest.fixture
def hospital() -> str:
    return f"h-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def advance_clock(stack: Platform) -> Callable[[str, float], Awaitable[None]]:
    async def advance(service: str, seconds: float) -> None:
        async with httpx.AsyncClient() as http:
            resp = await http.post(
                f"http://127.0.0.1:{stack.service_ports[service]}/admin/clock",
                json={"seconds": seconds},
            )
            resp.raise_for_status()

    return advance


@pytest.fixture
def http(stack: Platform) -> Callable[..., httpx.AsyncClient]:
    def make(service: str, token: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{stack.service_ports[service]}",
            headers={"Authorization": f"Bearer {token}"} if token else None,
        )

    return make


@pytest.fixture
def api_token(stack: Platform) -> Callable[[str], str]:
    # The same file the services read: their environment is the stack's over this process's.
    path = tokens_file({**os.environ, **stack.env()})

    def issue(hospital: str) -> str:
        return issue_token(hospital, path)

    return issue


@pytest.fixture
def region_token(stack: Platform) -> Callable[[], str]:
    def issue() -> str:
        return region_token_for(stack, f"tests-{uuid.uuid4().hex[:10]}")

    return issue
