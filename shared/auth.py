"""Per-hospital API tokens for the HTTP routes that change state.

The design, in full:

- **One token per hospital.** ``postctl hospital token <hospital>`` draws a random token
  (``post_`` + 32 random bytes, URL-safe), prints it once and stores only its SHA-256 in the
  tokens file. Issuing again replaces the hospital's token (rotation); ``--revoke`` removes
  it. Nobody, the platform included, can show a token again: a lost one is replaced.
- **The tokens file** is ``$POST_API_TOKENS_FILE``, by default
  ``$POST_DATA_DIR/api-tokens.json``: JSON ``{"format": "post-api-tokens/1", "hospitals":
  {hospital: {"sha256": hex, "issued_at": iso}}}``, written readable by its owner only
  (mode 0600) and replaced atomically (write beside, rename), under a lock so two issuers
  never lose each other's change.
- **The services read it** on the first request and again whenever its modification time,
  size or inode changes: issuing or revoking a token needs no restart. A missing file means
  no token is valid; an unreadable one is logged and refuses every token (fails closed).
- **The check**, ``require_hospital_token``, is a FastAPI dependency on every route that
  changes state (``POST /hospitals/{hospital}/...`` on the referral and records services).
  It reads ``Authorization: Bearer <token>``, hashes it and compares the hash with the path
  hospital's one in constant time (``hmac.compare_digest``):
  no header, another scheme or an unknown token -> 401 ``{"reason_code": "unauthenticated",
  "detail": ...}`` with ``WWW-Authenticate: Bearer``; a valid token of another hospital ->
  403 ``{"reason_code": "forbidden", ...}``. Authentication comes before anything else, so a
  caller without a token learns nothing about payloads, hospitals or referrals. Refusals are
  counted in ``post_http_auth_refused_total{service,reason_code}``; a token is never logged.
- **Reads stay open** on the embedded default: the GET routes (``/reaim``, a referral's
  status, ``/metrics``, ``/docs``) serve only pseudonymous ids and aggregates and listen on
  127.0.0.1 unless ``POST_HTTP_HOST`` says otherwise; a deployment that exposes them puts
  them behind its own gateway. ``POST /admin/clock`` exists only with ``POST_TEST_CLOCK=1``.
- The OpenAPI spec declares the bearer scheme ``hospitalToken`` on the protected routes.

NATS is guarded separately: each hospital's NATS user may only publish its own commands and
read its own events (``postctl/tenants.py``, proved by ``tests/integration/test_deploy.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import structlog
from fastapi import Depends, Request
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import Counter

from shared.contracts import HOSPITAL_PATTERN, is_hospital_id
from shared.http import HttpRejection, problem

__all__ = [
    "AUTH_RESPONSES",
    "TOKENS_FILE_VARIABLE",
    "AuthRejection",
    "TokenStore",
    "hash_token",
    "issue_token",
    "require_hospital_token",
    "revoke_token",
    "tokens_file",
]

log = structlog.get_logger()

TOKENS_FILE_VARIABLE = "POST_API_TOKENS_FILE"
TOKENS_FILE_NAME = "api-tokens.json"
FORMAT = "post-api-tokens/1"
TOKEN_PREFIX = "post_"
SCHEME_NAME = "hospitalToken"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Compared against when a hospital has no token, so both paths take the same time.
_NO_HASH = "0" * 64

AUTH_REFUSED = Counter(
    "post_http_auth_refused_total",
    "HTTP requests refused for their API token, by reason code.",
    ["service", "reason_code"],
)


def tokens_file(environ: Mapping[str, str] | None = None) -> Path:
    """Where the tokens are: $POST_API_TOKENS_FILE, else $POST_DATA_DIR/api-tokens.json."""
    env = os.environ if environ is None else environ
    explicit = env.get(TOKENS_FILE_VARIABLE)
    if explicit:
        return Path(explicit)
    return Path(env.get("POST_DATA_DIR") or Path.cwd() / ".post-data") / TOKENS_FILE_NAME


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- issuing (postctl hospital token) ---------------------------------------------------------


def issue_token(hospital: str, path: Path | None = None, now: datetime | None = None) -> str:
    """A new random token for the hospital, replacing its old one; returns it (shown once)."""
    _check_hospital(hospital)
    path = path or tokens_file()
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    issued_at = (now or datetime.now(UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z")
    with _locked(path):
        hospitals = _read_hospitals(path) if path.exists() else {}
        hospitals[hospital] = {"sha256": hash_token(token), "issued_at": issued_at}
        _write_private(path, hospitals)
    return token


def revoke_token(hospital: str, path: Path | None = None) -> bool:
    """Removes the hospital's token; False when it had none."""
    _check_hospital(hospital)
    path = path or tokens_file()
    with _locked(path):
        hospitals = _read_hospitals(path) if path.exists() else {}
        if hospitals.pop(hospital, None) is None:
            return False
        _write_private(path, hospitals)
    return True


def _check_hospital(hospital: str) -> None:
    if not is_hospital_id(hospital):
        raise ValueError("a hospital id is a slug: [a-z0-9][a-z0-9-]{0,62}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_hospitals(path: Path) -> dict[str, dict[str, str]]:
    """The file's hospitals, checked: ValueError when it is not a tokens file."""
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a tokens file: {type(exc).__name__}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tokens file (format {FORMAT} expected)")
    hospitals = raw.get("hospitals")
    if not isinstance(hospitals, dict):
        raise ValueError(f"{path} is not a tokens file: no hospitals")
    checked: dict[str, dict[str, str]] = {}
    for hospital, entry in hospitals.items():
        if (
            not isinstance(hospital, str)
            or not is_hospital_id(hospital)
            or not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not _SHA256_RE.match(entry["sha256"])
        ):
            raise ValueError(f"{path} holds an entry that is not a hospital's token hash")
        checked[hospital] = {"sha256": entry["sha256"], "issued_at": str(entry.get("issued_at"))}
    return checked


def _write_private(path: Path, hospitals: Mapping[str, Mapping[str, str]]) -> None:
    # Written beside and renamed: a service reading meanwhile sees the old file or the new one.
    text = json.dumps({"format": FORMAT, "hospitals": dict(sorted(hospitals.items()))}, indent=2)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- checking (the services) ------------------------------------------------------------------


class TokenStore:
    """The hashes of the tokens file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int, int] | None = None
        self._hash_of: dict[str, str] = {}
        self._owner_of: dict[str, str] = {}

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._hash_of, self._owner_of = None, {}, {}
            return
        stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            hospitals = _read_hospitals(self.path)
        except (OSError, ValueError) as exc:
            # Fail closed, and read it again on the next request.
            log.error("api_tokens_unreadable", path=str(self.path), error=str(exc)[:200])
            self._stamp, self._hash_of, self._owner_of = None, {}, {}
            return
        if st.st_mode & 0o077:
            log.warning("api_tokens_file_not_private", path=str(self.path))
        self._hash_of = {h: entry["sha256"] for h, entry in hospitals.items()}
        self._owner_of = {digest: h for h, digest in self._hash_of.items()}
        self._stamp = stamp

    def check(self, hospital: str, token: str | None) -> str | None:
        """None when the token is the hospital's; else the reason code of the refusal."""
        self._refresh()
        if not token:
            return "unauthenticated"
        presented = hash_token(token)
        expected = self._hash_of.get(hospital, _NO_HASH)
        if hmac.compare_digest(presented, expected) and expected != _NO_HASH:
            return None
        return "forbidden" if presented in self._owner_of else "unauthenticated"


class AuthRejection(HttpRejection):
    """An HTTP refusal for the caller's credentials (the service answers ``headers`` too)."""

    def __init__(
        self, status: int, reason_code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status, reason_code, detail)
        self.headers = headers


_stores: dict[Path, TokenStore] = {}
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name=SCHEME_NAME,
    bearerFormat="opaque",
    description=(
        "The hospital's API token, issued by `postctl hospital token <hospital>`; it is valid "
        "only on the paths of its hospital."
    ),
)


def _store() -> TokenStore:
    path = tokens_file()
    store = _stores.get(path)
    if store is None:
        store = _stores[path] = TokenStore(path)
    return store


# Shown in OpenAPI as the slug it is; validated after authentication (the route does it).
HospitalPath = Annotated[
    str,
    PathParam(description="The hospital's slug.", json_schema_extra={"pattern": HOSPITAL_PATTERN}),
]


async def require_hospital_token(
    hospital: HospitalPath,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The dependency of the routes that change state: the path's hospital, authenticated."""
    refusal = _store().check(hospital, credentials.credentials if credentials else None)
    if refusal is None:
        return hospital
    service = getattr(getattr(request.app.state, "service", None), "name", "unknown")
    AUTH_REFUSED.labels(service, refusal).inc()
    log.info("http_auth_refused", reason_code=refusal, path_template=_route_path(request))
    if refusal == "forbidden":
        raise AuthRejection(403, "forbidden", "the token is not valid for this hospital")
    raise AuthRejection(
        401,
        "unauthenticated",
        "send the hospital's API token: Authorization: Bearer <token>",
        headers={"WWW-Authenticate": 'Bearer realm="post"'},
    )


def _route_path(request: Request) -> str:
    # The template, not the URL: a path is chosen by the caller and may hold anything.
    route: Any = request.scope.get("route")
    return str(getattr(route, "path", "?"))


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: problem(why)
    for status, why in (
        (401, "unauthenticated: no valid API token (Authorization: Bearer)"),
        (403, "forbidden: the API token belongs to another hospital"),
    )
}
