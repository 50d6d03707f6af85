"""Settings from environment variables, with defaults that point at the embedded runtime."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

SERVICE_PORTS = {"referral": 8001, "matching": 8002, "records": 8003, "analytics": 8004}


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Settings:
    nats_url: str = field(default_factory=lambda: _env("POST_NATS_URL", "nats://127.0.0.1:4222"))
    # A deployment's NATS speaks TLS only (tls:// URLs, CONTRACT.md 1.2): the CA its server
    # certificates are checked against. Empty: the system's trust store (a public CA), or no
    # TLS at all on the embedded default, which stays plaintext on loopback.
    nats_ca_file: str = field(default_factory=lambda: _env("POST_NATS_CA_FILE", ""))
    database_url: str = field(
        default_factory=lambda: _env(
            "POST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/post"
        )
    )
    data_dir: Path = field(
        default_factory=lambda: Path(_env("POST_DATA_DIR", str(Path.cwd() / ".post-data")))
    )
    http_host: str = field(default_factory=lambda: _env("POST_HTTP_HOST", "127.0.0.1"))
    log_level: str = field(default_factory=lambda: _env("POST_LOG_LEVEL", "info"))
    # Timers (the 48-hour promise) poll stored state this often.
    timer_interval: float = field(default_factory=lambda: float(_env("POST_TIMER_INTERVAL", "1.0")))
    # A command waiting for a fact not seen yet is retried this long, then rejected.
    not_yet_known_seconds: float = field(
        default_factory=lambda: float(_env("POST_NOT_YET_KNOWN_SECONDS", "600"))
    )
    # Forgetting (CONTRACT.md 1.1): the retention sweep looks at the hospitals with a retention
    # set (`postctl hospital retention`) this often.
    retention_interval: float = field(
        default_factory=lambda: float(_env("POST_RETENTION_INTERVAL", "300"))
    )
    # The fault suite's knob: a forget job waits this long after each erasure, so that a kill
    # lands in the middle of it. 0 (no wait) everywhere else.
    forget_erase_delay: float = field(
        default_factory=lambda: float(_env("POST_FORGET_ERASE_DELAY", "0"))
    )
    # The fault suite's other knob: a file naming hospitals whose messages fail for a passing
    # reason in this service while they are listed (shared/dispatch.py `InjectedFaults`).
    test_faults_file: str = field(default_factory=lambda: _env("POST_TEST_FAULTS_FILE", ""))
    max_deliver: int = field(default_factory=lambda: int(_env("POST_MAX_DELIVER", "20")))
    fetch_batch: int = field(default_factory=lambda: int(_env("POST_FETCH_BATCH", "100")))
    # Tests and demos may move a service's clock through POST /admin/clock.
    test_clock: bool = field(default_factory=lambda: _env("POST_TEST_CLOCK", "0") == "1")
    stream_replicas: int = field(default_factory=lambda: int(_env("POST_STREAM_REPLICAS", "1")))
    # Scale-out (shared/partitions.py): a partition's holder whose session is idle this long
    # (a frozen process) loses it; instances look at the partitions this often.
    lease_seconds: float = field(default_factory=lambda: float(_env("POST_LEASE_SECONDS", "5")))
    # The embedded runtime (postctl up): its ports, and whether a PostgreSQL was given instead.
    nats_monitor_port: int = field(
        default_factory=lambda: int(_env("POST_NATS_MONITOR_PORT", "8222"))
    )
    pg_port: int = field(default_factory=lambda: int(_env("POST_PG_PORT", "5432")))
    database_given: bool = field(default_factory=lambda: "POST_DATABASE_URL" in os.environ)
    # `make demo` exits after its report instead of running on (scripted checks).
    demo_exit: bool = field(default_factory=lambda: _env("POST_DEMO_EXIT", "0") == "1")
    rebalance_seconds: float = field(
        default_factory=lambda: float(_env("POST_REBALANCE_SECONDS", "1"))
    )

    @property
    def nats_servers(self) -> list[str]:
        """POST_NATS_URL may list a cluster's servers, comma-separated."""
        return nats_servers(self.nats_url)

    @property
    def nats_hosts(self) -> list[str]:
        """The servers without credentials, for logs."""
        return [u.rsplit("@", 1)[-1] for u in self.nats_servers]

    def nats_tls(self) -> ssl.SSLContext | None:
        """nats-py's `tls=` for these settings (see `nats_tls`)."""
        return nats_tls(self.nats_ca_file)

    def http_port(self, service: str) -> int:
        return int(_env(f"POST_{service.upper()}_PORT", str(SERVICE_PORTS.get(service, 0))))


def nats_servers(url: str) -> list[str]:
    return [u.strip() for u in url.split(",") if u.strip()]


def nats_tls(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext | None:
    """The `tls=` context of every NATS connection the platform opens (services, postctl,
    the client): the server's certificate must chain to `ca_file` (default
    $POST_NATS_CA_FILE) and name the host of the URL; only that CA is trusted. None without a
    CA file: nats-py then uses the system's trust store for a server that requires TLS, and
    plaintext for the embedded default."""
    path = os.fspath(ca_file) if ca_file is not None else _env("POST_NATS_CA_FILE", "")
    if not path:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=path)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
