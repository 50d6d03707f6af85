"""API tokens for the HTTP routes: a hospital's token, and region tokens that read everything.

The design, in full:

- **One token per hospital.** ``postctl hospital token <hospital>`` draws a random token
  (``post_`` + 32 random bytes, URL-safe), prints it once and stores only its SHA-256 in the
  tokens file. Issuing again replaces the hospital's token (rotation); ``--revoke`` removes
  it. Nobody, the platform included, can show a token again: a lost one is replaced.
- **Region tokens** (CONTRACT.md 1.2, "Reading a hospital's data over HTTP"): ``postctl region
  token --name <name>`` does the same for a named reader of the whole region (a slug: who
  holds it, ``grafana``, ``director-east``). A region token reads every hospital's data and
  changes nothing.
- **The tokens file** is ``$POST_API_TOKENS_FILE``, by default
  ``$POST_DATA_DIR/api-tokens.json``: JSON ``{"format": "post-api-tokens/1", "hospitals":
  {hospital: {"sha256": hex, "issued_at": iso}}, "regions": {name: {...the same}}}``, written
  readable by its owner only (mode 0600) and replaced atomically (write beside, rename), under
  a lock so two issuers never lose each other's change. ``regions`` is an addition a reader of
  the first files (hospitals only) does without: the format stays ``/1`` both ways.
- **The services read it** on the first request and again whenever its modification time,
  size or inode changes, and at least every second whatever the file system says: issuing,
  replacing or revoking a token needs no restart. A missing file means no token is valid; an
  unreadable one is logged and refuses every token (fails closed).
- **The checks** are FastAPI dependencies, one per rule, each reading
  ``Authorization: Bearer <token>`` and hashing it:

  - ``require_hospital_token``: the routes that change state (``POST /hospitals/{hospital}/
    ...``): the path hospital's own token only; a region token is read-only (403);
  - ``require_hospital_reader``: the routes that show a hospital's data (``GET /hospitals/
    {hospital}/...``, ``GET /reaim/{hospital}...``): that hospital's token or a region token;
  - ``require_region_token``: the routes over every hospital (``GET /reaim``,
    ``GET /hospitals``): a region token;
  - ``require_any_token``: ``GET /whoami``, which says whose token it is (the dashboard).

  No header, another scheme or an unknown token -> 401 ``{"reason_code": "unauthenticated",
  "detail": ...}`` with ``WWW-Authenticate: Bearer``; a valid token that may not do this ->
  403 ``{"reason_code": "forbidden", ...}``. Authentication comes before anything else (the
  route's own parameters, its body, the database), so a caller without a token learns nothing
  about payloads, hospitals or referrals. Refusals are counted in
  ``post_http_auth_refused_total{service,reason_code}``; a token is never logged.
- **The access log** (``AccessLog``, installed by shared/service.py on every service): every
  request answered by a route that has one of these dependencies, refused or not, is one JSON
  line ``"event": "http_access"`` with time, service, holder (``hospital:<id>``,
  ``region:<name>`` or null), method, the route's template (never the ids of the URL) and the
  status. It is written whatever the service's log level.
- **Open**: ``/healthz``, ``/readyz``, ``/metrics`` (a deployment keeps them on its private
  network), the OpenAPI spec and ``/docs``, and the dashboard page itself (its data comes from
  the protected routes). ``POST /admin/clock`` exists only with ``POST_TEST_CLOCK=1``.
- The OpenAPI spec declares the bearer schemes ``hospitalToken`` and ``regionToken`` on every
  protected route (either of them where either is accepted).

NATS is guarded separately: each hospital's NATS user may only publish its own commands and
read its own events (``shared/tenants.py``, proved by ``tests/integration/test_deploy.py``).

Over 500 lines on purpose: every token rule, the tokens file and the access log in one module,
so that a route's rule is read and checked against one place (tests/unit/test_auth.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
from fastapi import Depends, Request
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.contracts import HOSPITAL_PATTERN, is_hospital_id
from shared.http import AuthReason, HttpRejection, problem
from shared.settings import env_name, raw

__all__ = [
    "AUTH_RESPONSES",
    "READ_RESPONSES",
    "REGION_RESPONSES",
    "REGION_SCHEME_NAME",
    "SCHEME_NAME",
    "TOKENS_FILE_VARIABLE",
    "AccessLog",
    "AuthRejection",
    "Holder",
    "TokenStore",
    "guarded",
    "hash_token",
    "issue_region_token",
    "issue_token",
    "require_any_token",
    "require_hospital_reader",
    "require_hospital_token",
    "require_region_token",
    "revoke_region_token",
    "revoke_token",
    "tokens_file",
]

log = structlog.get_logger()
# The access log is written whatever the service's level: it is the record of who read what.
access_log = structlog.wrap_logger(
    None, wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)
)

TOKENS_FILE_VARIABLE = env_name("api_tokens_file")
TOKENS_FILE_NAME = "api-tokens.json"
FORMAT = "post-api-tokens/1"
TOKEN_PREFIX = "post_"
SCHEME_NAME = "hospitalToken"
REGION_SCHEME_NAME = "regionToken"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Compared against when a hospital has no token, so both paths take the same time.
_NO_HASH = "0" * 64
# Re-read the file at least this often, even when its stat looks the same (a coarse clock).
_REREAD_SECONDS = 1.0

AUTH_REFUSED = Counter(
    "post_http_auth_refused_total",
    "HTTP requests refused for their API token, by reason code.",
    ["service", "reason_code"],
)

Kind = Literal["hospital", "region"]
_KINDS: dict[Kind, str] = {"hospital": "hospitals", "region": "regions"}


@dataclass(frozen=True)
class Holder:
    """Whose token it is: a hospital (by its id) or a region reader (by its name)."""

    kind: Kind
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


def tokens_file(environ: Mapping[str, str] | None = None) -> Path:
    """Where the tokens are: $POST_API_TOKENS_FILE, else $POST_DATA_DIR/api-tokens.json."""
    if environ is None:  # this process's (asked on every request: the text, unparsed, ~1 us)
        explicit, data_dir = raw("api_tokens_file"), raw("data_dir")
    else:  # another process's environment (a platform this one starts)
        explicit, data_dir = environ.get(TOKENS_FILE_VARIABLE), environ.get(env_name("data_dir"))
    if explicit:
        return Path(explicit)
    return Path(data_dir or Path.cwd() / ".post-data") / TOKENS_FILE_NAME


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- issuing (postctl hospital token, postctl region token) -----------------------------------

Entries = dict[str, dict[str, str]]


def issue_token(hospital: str, path: Path | None = None, now: datetime | None = None) -> str:
    """A new random token for the hospital, replacing its old one; returns it (shown once)."""
    _check_slug(hospital, "a hospital id")
    return _issue("hospital", hospital, path, now)


def revoke_token(hospital: str, path: Path | None = None) -> bool:
    """Removes the hospital's token; False when it had none."""
    _check_slug(hospital, "a hospital id")
    return _revoke("hospital", hospital, path)


def issue_region_token(name: str, path: Path | None = None, now: datetime | None = None) -> str:
    """A new random region token named `name`, replacing the one of that name; returns it."""
    _check_slug(name, "a region token's name")
    return _issue("region", name, path, now)


def revoke_region_token(name: str, path: Path | None = None) -> bool:
    """Removes the region token of that name; False when there was none."""
    _check_slug(name, "a region token's name")
    return _revoke("region", name, path)


def _issue(kind: Kind, name: str, path: Path | None, now: datetime | None) -> str:
    path = path or tokens_file()
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    issued_at = (now or datetime.now(UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z")
    with _locked(path):
        entries = _read_entries(path) if path.exists() else _empty()
        entries[kind][name] = {"sha256": hash_token(token), "issued_at": issued_at}
        _write_private(path, entries)
    return token


def _revoke(kind: Kind, name: str, path: Path | None) -> bool:
    path = path or tokens_file()
    with _locked(path):
        entries = _read_entries(path) if path.exists() else _empty()
        if entries[kind].pop(name, None) is None:
            return False
        _write_private(path, entries)
    return True


def _empty() -> dict[Kind, Entries]:
    return {"hospital": {}, "region": {}}


def _check_slug(name: str, what: str) -> None:
    if not is_hospital_id(name):
        raise ValueError(f"{what} is a slug: [a-z0-9][a-z0-9-]{{0,62}}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_entries(path: Path) -> dict[Kind, Entries]:
    """The file's hospitals and region tokens, checked: ValueError when it is not a tokens
    file. A file of the first release has no `regions`: no region token then."""
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a tokens file: {type(exc).__name__}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tokens file (format {FORMAT} expected)")
    if not isinstance(raw.get("hospitals"), dict):
        raise ValueError(f"{path} is not a tokens file: no hospitals")
    checked = _empty()
    for kind, key in _KINDS.items():
        section = raw.get(key, {})
        if not isinstance(section, dict):
            raise ValueError(f"{path} is not a tokens file: {key} is not an object")
        for name, entry in section.items():
            if (
                not isinstance(name, str)
                or not is_hospital_id(name)
                or not isinstance(entry, dict)
                or not isinstance(entry.get("sha256"), str)
                or not _SHA256_RE.match(entry["sha256"])
            ):
                raise ValueError(f"{path} holds an entry that is not a token hash")
            checked[kind][name] = {
                "sha256": entry["sha256"],
                "issued_at": str(entry.get("issued_at")),
            }
    return checked


def _write_private(path: Path, entries: Mapping[Kind, Entries]) -> None:
    # Written beside and renamed: a service reading meanwhile sees the old file or the new one.
    body: dict[str, Any] = {"format": FORMAT}
    for kind, key in _KINDS.items():
        body[key] = dict(sorted(entries[kind].items()))
    text = json.dumps(body, indent=2)
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
    """The hashes of the tokens file, re-read when the file changes (and at least every
    second, so that a change is seen even where the file's stamps are coarse)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int, int] | None = None
        self._read_at = 0.0
        self._hash_of: dict[str, str] = {}  # hospital -> its token's hash
        self._holder_of: dict[str, Holder] = {}  # a token's hash -> its holder

    def _forget(self) -> None:
        self._stamp, self._hash_of, self._holder_of = None, {}, {}

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._forget()
            return
        stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        now = time.monotonic()
        if stamp == self._stamp and now - self._read_at < _REREAD_SECONDS:
            return
        try:
            entries = _read_entries(self.path)
        except (OSError, ValueError) as exc:
            # Fail closed, and read it again on the next request.
            log.error("api_tokens_unreadable", path=str(self.path), error=str(exc)[:200])
            self._forget()
            return
        if st.st_mode & 0o077 and stamp != self._stamp:
            log.warning("api_tokens_file_not_private", path=str(self.path))
        self._hash_of = {h: entry["sha256"] for h, entry in entries["hospital"].items()}
        self._holder_of = {
            entry["sha256"]: Holder(kind, name)
            for kind in _KINDS
            for name, entry in entries[kind].items()
        }
        self._stamp, self._read_at = stamp, now

    def identify(self, token: str | None) -> Holder | None:
        """Whose token this is, or None for no token or an unknown one."""
        self._refresh()
        if not token:
            return None
        return self._holder_of.get(hash_token(token))

    def check(self, hospital: str, token: str | None) -> str | None:
        """None when the token is the hospital's own; else the reason code of the refusal."""
        self._refresh()
        if not token:
            return "unauthenticated"
        presented = hash_token(token)
        expected = self._hash_of.get(hospital, _NO_HASH)
        if hmac.compare_digest(presented, expected) and expected != _NO_HASH:
            return None
        return "forbidden" if presented in self._holder_of else "unauthenticated"


class AuthRejection(HttpRejection):
    """An HTTP refusal for the caller's credentials (the service answers ``headers`` too)."""

    def __init__(
        self,
        status: int,
        reason_code: AuthReason,
        detail: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, reason_code, detail)
        self.headers = headers


_stores: dict[Path, TokenStore] = {}
# Two schemes over the same header, so that OpenAPI says which token each route takes.
_hospital_bearer = HTTPBearer(
    auto_error=False,
    scheme_name=SCHEME_NAME,
    bearerFormat="opaque",
    description=(
        "The hospital's API token, issued by `postctl hospital token <hospital>`; it is valid "
        "only on the paths of its hospital."
    ),
)
_region_bearer = HTTPBearer(
    auto_error=False,
    scheme_name=REGION_SCHEME_NAME,
    bearerFormat="opaque",
    description=(
        "A region token, issued by `postctl region token --name <name>`: it reads every "
        "hospital's data and changes nothing."
    ),
)
HospitalCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_hospital_bearer)]
RegionCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_region_bearer)]


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


def _authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Holder:
    """The token's holder, kept for the access log; 401 when there is none."""
    holder = _store().identify(credentials.credentials if credentials else None)
    request.state.token_holder = holder
    if holder is None:
        _refused(request, "unauthenticated")
        raise AuthRejection(
            401,
            "unauthenticated",
            "send an API token: Authorization: Bearer <token>",
            headers={"WWW-Authenticate": 'Bearer realm="post"'},
        )
    return holder


def _forbidden(request: Request, detail: str) -> AuthRejection:
    _refused(request, "forbidden")
    return AuthRejection(403, "forbidden", detail)


def _refused(request: Request, reason_code: AuthReason) -> None:
    service = getattr(getattr(request.app.state, "service", None), "name", "unknown")
    AUTH_REFUSED.labels(service, reason_code).inc()


async def require_hospital_token(
    hospital: HospitalPath, request: Request, credentials: HospitalCredentials
) -> str:
    """The routes that change state: the path hospital's own token, nothing else."""
    holder = _authenticate(request, credentials)
    if holder.kind == "region":
        raise _forbidden(request, "a region token is read-only")
    # Compared in constant time (TokenStore.check) rather than by the holder's name.
    if _store().check(hospital, credentials.credentials if credentials else None) is not None:
        raise _forbidden(request, "the token is not valid for this hospital")
    return hospital


async def require_hospital_reader(
    hospital: HospitalPath,
    request: Request,
    credentials: HospitalCredentials,
    region: RegionCredentials,
) -> Holder:
    """The routes that show a hospital's data: that hospital's token or a region token."""
    holder = _authenticate(request, credentials or region)
    if holder.kind == "region" or holder == Holder("hospital", hospital):
        return holder
    raise _forbidden(request, "the token is not valid for this hospital")


async def require_region_token(request: Request, region: RegionCredentials) -> Holder:
    """The routes over every hospital: a region token."""
    holder = _authenticate(request, region)
    if holder.kind != "region":
        raise _forbidden(request, "this route needs a region token")
    return holder


async def require_any_token(
    request: Request, credentials: HospitalCredentials, region: RegionCredentials
) -> Holder:
    """Any valid token (``GET /whoami``)."""
    return _authenticate(request, credentials or region)


GUARDS = (require_hospital_token, require_hospital_reader, require_region_token, require_any_token)


def guarded(route: Any) -> bool:
    """The route needs a token: one of the GUARDS is among its dependencies."""
    cached = getattr(route, "_post_guarded", None)
    if cached is not None:
        return bool(cached)
    found, stack = False, [getattr(route, "dependant", None)]
    while stack and not found:
        dependant = stack.pop()
        if dependant is None:
            continue
        found = dependant.call in GUARDS
        stack.extend(dependant.dependencies)
    with contextlib.suppress(AttributeError):
        route._post_guarded = found
    return found


class AccessLog:
    """ASGI middleware: one ``http_access`` line for every request answered by a route that
    needs a token, whatever its answer (401, 403, 404, 422, 500 included)."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")  # set by the router, in this same scope, on a match
            if route is not None and guarded(route):
                holder = scope.get("state", {}).get("token_holder")  # set by _authenticate
                access_log.info(
                    "http_access",
                    time=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                    service=self.service,
                    holder=str(holder) if holder is not None else None,
                    method=scope["method"],
                    route=str(getattr(route, "path", "?")),
                    status=status,
                )


_AUTH_WHY = {
    401: "unauthenticated: no valid API token (Authorization: Bearer)",
    403: "forbidden: the API token belongs to another hospital, or is a region token",
}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {s: problem(w) for s, w in _AUTH_WHY.items()}
READ_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: problem(_AUTH_WHY[401]),
    403: problem("forbidden: the token is another hospital's (a region token reads any)"),
}
REGION_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: problem(_AUTH_WHY[401]),
    403: problem("forbidden: a hospital's token (this route needs a region token)"),
}
