"""Every environment variable of the platform, in one place (pydantic-settings), with defaults
that point at the embedded runtime.

Each field is the variable ``POST_<FIELD>``. A ``POST_*`` variable that no field declares is
refused when settings are read (a misspelt one would otherwise be silently ignored), naming
it. Secrets (URLs with passwords, keys, tokens) are `SecretStr`: they print as ``**********``.
The README's table is this module's `variables_table()` (``python -m shared.settings``), and a
unit test keeps the two equal.
"""

from __future__ import annotations

import difflib
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICE_PORTS = {"referral": 8001, "matching": 8002, "records": 8003, "analytics": 8004}
PREFIX = "POST_"


# The hospital kit's examples (clients/python/examples) read these in a hospital's shell, which
# may be the shell that runs `make demo`: not the platform's, and not refused.
HOSPITAL_KIT_VARIABLES = frozenset(
    {
        "POST_HOSPITAL",
        "POST_NKEY_SEED",
        "POST_API_TOKEN",
        "POST_REFERRAL_URL",
        "POST_WEBHOOK_SECRET",
        "POST_WEBHOOK_SEEN_DB",
    }
)


class UnknownSettingError(ValueError):
    """A POST_* variable in the environment that the platform does not know."""


def _field(default: Any = ..., *, doc: str, shown: str | None = None, **kw: Any) -> Any:
    """A setting: `doc` is its line in the README's table, `shown` its default there (when
    the value itself would say less)."""
    extra: dict[str, Any] = {"shown": shown} if shown is not None else {}
    return Field(default, description=doc, json_schema_extra=cast(Any, extra), **kw)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="forbid")

    # -- what a deployment sets ----------------------------------------------------------------
    nats_url: SecretStr = _field(
        SecretStr("nats://127.0.0.1:4222"),
        shown="nats://127.0.0.1:4222",
        doc="NATS with JetStream (comma-separated servers; `tls://` in a deployment; a secret:"
        " it may carry the platform's password)",
    )
    # A deployment's NATS speaks TLS only (tls:// URLs, CONTRACT.md 1.2). Empty: the system's
    # trust store (a public CA), or no TLS at all on the embedded default (plaintext, loopback).
    nats_ca_file: str = _field(
        "",
        shown="(none)",
        doc="the CA that NATS servers' certificates must chain to (`postctl certs`' `ca.pem`);"
        " without it a `tls://` URL uses the system's trust store",
    )
    database_url: SecretStr = _field(
        SecretStr("postgresql://postgres@127.0.0.1:5432/post"),
        shown="embedded PostgreSQL on `POST_PG_PORT` (5432)",
        doc="give one to use your own PostgreSQL (a secret: it may carry a password)",
    )
    data_dir: Path = _field(
        default_factory=lambda: Path.cwd() / ".post-data",
        shown="`./.post-data`",
        doc="nats and PostgreSQL data, service logs",
    )
    http_host: str = _field("127.0.0.1", doc="the address the services' HTTP listens on")
    referral_port: int = _field(8001, doc="HTTP port of referral")
    matching_port: int = _field(8002, doc="HTTP port of matching")
    records_port: int = _field(8003, doc="HTTP port of records")
    analytics_port: int = _field(8004, doc="HTTP port of analytics")
    log_level: str = _field("info", doc="JSON logs: service, correlation_id, event_type")
    api_tokens_file: str = _field(
        "",
        shown="`$POST_DATA_DIR/api-tokens.json`",
        doc="hashes of the hospitals' and region HTTP tokens",
    )
    webhook_key: SecretStr = _field(
        SecretStr(""),
        shown="a key file `$POST_DATA_DIR/webhook-secrets.key`",
        doc="base64 of 32 bytes: seals the webhook signing secrets in the database",
    )
    region_token: SecretStr = _field(
        SecretStr(""),
        shown="(none)",
        doc="the region token `postctl load` and the benchmarks read with (else they issue one)",
    )
    stream_replicas: int = _field(1, doc="replicas of the `POST` stream (3 on a NATS cluster)")

    # -- how it behaves --------------------------------------------------------------------------
    # Timers (the 48-hour promise) poll stored state this often.
    timer_interval: float = _field(1.0, doc="seconds between checks of due assignments")
    max_deliver: int = _field(
        20,
        doc="tries of a message that fails for a passing reason (the database, NATS) before it"
        " is dead-lettered and answered; meanwhile only its own hospital waits behind it. A"
        " failure no retry changes is answered at once",
    )
    fetch_batch: int = _field(100, doc="messages a consumer fetches at once")
    not_yet_known_seconds: float = _field(
        600,
        doc="the longest a command waits for a fact it depends on (it is refused sooner, once"
        " nothing it could wait for is pending)",
    )
    # Scale-out (shared/partitions.py): a partition's holder whose session is idle this long
    # (a frozen process) loses it; instances look at the partitions this often.
    lease_seconds: float = _field(5, doc="a frozen instance loses its partitions after this long")
    rebalance_seconds: float = _field(1, doc="how often instances share out the partitions")
    # Forgetting (CONTRACT.md 1.1): the sweep looks at the hospitals with a retention set.
    retention_interval: float = _field(
        300, doc="seconds between retention sweeps (`postctl hospital retention`)"
    )
    analytics_department_gauges: str = _field(
        "*",
        shown="`*`",
        doc="the hospitals whose departments get RE-AIM gauges (`*`: all; empty: none;"
        " else comma-separated ids)",
    )
    analytics_department_gauges_max: int = _field(
        500, doc="caps the departments with gauges, in total"
    )

    # -- the embedded runtime (postctl up) -------------------------------------------------------
    nats_monitor_port: int = _field(8222, doc="the embedded nats-server's monitoring port")
    pg_port: int = _field(5432, doc="the embedded PostgreSQL's port")
    demo_exit: bool = _field(False, doc="`make demo` exits after its report (scripted checks)")

    # -- read by the servers of a deployment, not by the services (compose, Kubernetes) --------
    # Declared so that one environment (an .env file sourced by an operator) is not refused.
    nats_platform_password: SecretStr = _field(
        SecretStr(""),
        shown="(none)",
        doc="deployments: the services' NATS password, read by nats-server"
        " (`deploy/nats/tenants.conf`); the services take it in `POST_NATS_URL`",
    )
    db_password: SecretStr = _field(
        SecretStr(""),
        shown="(none)",
        doc="compose only: PostgreSQL's password (the services take it in `POST_DATABASE_URL`)",
    )
    grafana_admin_password: SecretStr = _field(
        SecretStr(""), shown="(none)", doc="compose only: Grafana's admin password"
    )

    # -- tests and benchmarks --------------------------------------------------------------------
    # Tests and demos may move a service's clock through POST /admin/clock.
    test_clock: bool = _field(False, doc="tests: services accept `POST /admin/clock`")
    # The fault suite's knobs: a forget job waits this long after each erasure, so that a kill
    # lands in the middle of it; a file naming hospitals whose messages fail for a passing
    # reason while they are listed (shared/dispatch.py `InjectedFaults`).
    forget_erase_delay: float = _field(0, doc="tests: seconds a forget job waits per erasure")
    test_faults_file: str = _field(
        "", shown="(none)", doc="tests: hospitals whose messages fail for a passing reason"
    )
    keep_test_data: bool = _field(False, doc="tests: keep each test platform's data dir")
    badinput_seed: int = _field(21, doc="tests: the seed of the bad-input suite")
    badinput_count: int = _field(10000, doc="tests: inputs of the bad-input suite")
    bench_national_hospitals: int | None = _field(
        None, shown="(the bench's)", doc="bench: hospitals of the national region"
    )
    bench_national_region_queries: int = _field(30, doc="bench: region queries timed")
    bench_national_instances: int = _field(4, doc="bench: analytics instances")

    def __init__(self, **values: Any) -> None:
        refuse_unknown_variables(os.environ)
        super().__init__(**values)

    # -- derived ---------------------------------------------------------------------------------

    @property
    def database_given(self) -> bool:
        """A PostgreSQL was given (POST_DATABASE_URL, or the caller's): none is embedded."""
        return "database_url" in self.model_fields_set

    @property
    def nats_servers(self) -> list[str]:
        """POST_NATS_URL's servers, comma-separated, credentials included (to connect)."""
        return nats_servers(self.nats_url.get_secret_value())

    @property
    def nats_hosts(self) -> list[str]:
        """The servers as `host:port`, for logs: no credentials."""
        return [_host(u) for u in self.nats_servers]

    @property
    def nats_port(self) -> int:
        """The embedded nats-server's port: the first server's."""
        return urlsplit(self.nats_servers[0]).port or 4222

    def nats_tls(self) -> ssl.SSLContext | None:
        """nats-py's `tls=` for these settings (see `nats_tls`)."""
        return nats_tls(self.nats_ca_file)

    def http_port(self, service: str) -> int:
        port = getattr(self, f"{service}_port", None)
        return port if isinstance(port, int) else SERVICE_PORTS.get(service, 0)


_current: tuple[tuple[tuple[str, str], ...], Settings] | None = None


def current() -> Settings:
    """This process's settings as the environment is now: read again only when a POST_*
    variable changed (reading costs ~2 ms; looking at the environment ~20 us), for the code
    that asks on each request (the tokens file) or that tests change under a running app."""
    global _current
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k[:5].upper() == PREFIX))
    cached = _current
    if cached is not None and cached[0] == key:
        return cached[1]
    settings = Settings()
    _current = (key, settings)
    return settings


def raw(field: str) -> str | None:
    """The text of a declared variable, unparsed (~1 us): for a path that asks on every
    request (the tokens file), where reading all settings would cost more than the answer."""
    return os.environ.get(env_name(field)) or None


_ENV_NAMES = {f: PREFIX + f.upper() for f in Settings.model_fields}


def env_name(field: str) -> str:
    """The variable of a field of `Settings` (a KeyError for a field it does not have)."""
    return _ENV_NAMES[field]


def known_variables() -> set[str]:
    return set(_ENV_NAMES.values())


def refuse_unknown_variables(environ: Mapping[str, str]) -> None:
    """An unknown POST_* variable is refused by name (with the nearest known one)."""
    known = known_variables()
    allowed = known | HOSPITAL_KIT_VARIABLES
    unknown = sorted(
        k for k in environ if k.upper().startswith(PREFIX) and k.upper() not in allowed
    )
    if unknown:
        hints = []
        for name in unknown:
            near = difflib.get_close_matches(name.upper(), known, n=1)
            hints.append(f"{name} (did you mean {near[0]}?)" if near else name)
        raise UnknownSettingError(
            "unknown environment variable"
            + ("s " if len(unknown) > 1 else " ")
            + ", ".join(hints)
            + ": the platform's variables are in README.md ('Settings')"
        )


def nats_servers(url: str) -> list[str]:
    return [u.strip() for u in url.split(",") if u.strip()]


def _host(url: str) -> str:
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host = parts.hostname or ""
    return f"[{host}]:{parts.port}" if ":" in host else f"{host}:{parts.port or 4222}"


def nats_tls(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext | None:
    """The `tls=` context of every NATS connection the platform opens (services, postctl,
    the client): the server's certificate must chain to `ca_file` (default
    $POST_NATS_CA_FILE) and name the host of the URL; only that CA is trusted. None without a
    CA file: nats-py then uses the system's trust store for a server that requires TLS, and
    plaintext for the embedded default."""
    path = os.fspath(ca_file) if ca_file is not None else current().nats_ca_file
    if not path:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=path)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def variables_table() -> str:
    """The README's table of every variable, from the fields."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        shown = extra.get("shown")
        if shown is None:
            value = info.get_default(call_default_factory=False)
            shown = str(value).lower() if isinstance(value, bool) else str(value)
        rows.append(f"| `{env_name(name)}` | {shown} | {info.description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(variables_table(), end="")
