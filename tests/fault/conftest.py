"""A dedicated platform for each fault test: real processes on free ports, its own data dir.

The session's `stack` is never used here: these tests kill things. Keep the data with
``POST_KEEP_TEST_DATA=1`` (the services' logs are under ``logs/``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Mapping

import pytest

from shared.runtime import Platform, Postgres

MakePlatform = Callable[..., Platform]

# Production runs several instances of every service: so does the fault suite.
INSTANCES = 3


def _fault_env() -> dict[str, str]:
    # A frozen instance loses its partitions after 3 s of silence.
    return {"POST_LOG_LEVEL": "info", "POST_TIMER_INTERVAL": "0.5", "POST_LEASE_SECONDS": "3"}


@pytest.fixture
def make_platform() -> Iterator[MakePlatform]:
    """make_platform(nats_url=None, extra_env={}, instances=INSTANCES): servers and the four
    services (each as `instances` processes), ready.

    With `nats_url` (a cluster's servers) only PostgreSQL is started here."""
    made: list[Platform] = []

    def make(
        nats_url: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        instances: int = INSTANCES,
    ) -> Platform:
        env = {**_fault_env(), **(extra_env or {})}
        if nats_url is not None:
            env["POST_NATS_URL"] = nats_url
        platform = Platform.on_free_ports("post-fault-", env)
        platform.instances = instances
        data_dir = platform.data_dir
        made.append(platform)
        if nats_url is None:
            platform.start_servers()
        else:
            platform.postgres = Postgres(data_dir / "postgres", platform.pg_port).start()
        platform.start_services()
        platform.wait_ready()
        return platform

    yield make
    for platform in made:
        platform.stop()
        if os.environ.get("POST_KEEP_TEST_DATA") != "1":
            shutil.rmtree(platform.data_dir, ignore_errors=True)


@pytest.fixture
def fault_platform(make_platform: MakePlatform) -> Platform:
    """The embedded platform (one nats-server, one PostgreSQL), each service as INSTANCES
    processes."""
    return make_platform()
