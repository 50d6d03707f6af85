"""Webhooks (CONTRACT.md 1.2): a hospital's events POSTed to its endpoint, signed, in order.

What the registration and the delivery share: the Standard Webhooks signature, the back-off,
the check of an endpoint's URL, the sealing of the signing secret and the `webhooks` table of the
referral service's schema (one row a hospital: its endpoint, its sealed secret, and its
position, the `POST` sequence of the last event its endpoint acknowledged). The delivery itself
is shared/webhook_delivery.py; `postctl hospital webhook` is postctl/webhooks.py.
See docs/decisions.md, "Webhooks".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import random
import secrets
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.partitions import partition_of
from shared.settings import current, env_name

SCHEMA = "referral"  # the service that delivers them (services/referral/app.py)
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
FIRST_DELAY = 1.0
# An attempt lasts up to ATTEMPT_TIMEOUT: attempts start at most 5 minutes apart.
ATTEMPT_TIMEOUT = 10.0
MAX_DELAY = 300.0 - ATTEMPT_TIMEOUT
KEY_VARIABLE = env_name("webhook_key")
KEY_FILE = "webhook-secrets.key"


# --- Standard Webhooks ------------------------------------------------------------------------


def new_secret() -> str:
    """A signing secret as Standard Webhooks writes it: `whsec_` + base64 of random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key: the secret's decoded bytes."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)


def signature(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """`v1,` + base64 HMAC-SHA256 of `<webhook-id>.<webhook-timestamp>.<body>`."""
    content = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/cloudevents+json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, webhook_id, timestamp, body),
    }


def retry_delay(failures: int, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt after `failures` failed ones in a row: about 1 s, doubling,
    never more than MAX_DELAY; a tenth of jitter below, so that endpoints that failed together
    are not all tried at once again."""
    base: float = min(FIRST_DELAY * 2.0 ** max(failures - 1, 0), MAX_DELAY)
    return base * (rng or random).uniform(0.9, 1.0)


# --- endpoints --------------------------------------------------------------------------------


def is_loopback_host(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return host is not None and ip_address(host).is_loopback
    except ValueError:
        return False


def embedded_default(nats_hosts: list[str], database_url: str) -> bool:
    """The platform runs on this machine (`postctl up`, `make demo`): its NATS and its
    PostgreSQL are on the loopback interface."""
    hosts = [urlsplit(h if "://" in h else f"nats://{h}").hostname for h in nats_hosts]
    hosts.append(urlsplit(database_url).hostname)
    return all(is_loopback_host(h) for h in hosts)


def check_url(url: str, *, embedded: bool) -> str | None:
    """Why `url` is not an endpoint (a sentence), or None: an https URL with a host; on the
    embedded default also `http://127.0.0.1:<port>/...`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "not a URL"
    if parts.username or parts.password:
        return "credentials in the URL are not accepted: the signature authenticates the platform"
    if parts.fragment:
        return "a URL with a fragment (#...) is not an endpoint"
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname == "127.0.0.1" and port:
        return None if embedded else "only https URLs are accepted outside the embedded default"
    if embedded:
        return "give an https URL, or http://127.0.0.1:<port>/... on the embedded default"
    return "give an https URL"


def endpoint_label(url: str) -> str:
    """The URL without its path and query (which may carry the hospital's own tokens)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# --- the secret at rest -----------------------------------------------------------------------


def sealing_key(data_dir: Path) -> bytes:
    """The key that seals the signing secrets in the database: `POST_WEBHOOK_KEY` (base64 of 32
    bytes), else a file of the data dir, made (mode 0600) when first needed. A copy of the
    database alone does not reveal a secret."""
    value = current().webhook_key.get_secret_value()
    if value:
        key = _decode_key(value)
    else:
        path = data_dir / KEY_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written whole beside, then linked in place: a process starting at the same moment
            # finds either no file or the whole key, and the first link wins.
            tmp = path.with_name(f".{KEY_FILE}.{secrets.token_hex(6)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(base64.b64encode(AESGCM.generate_key(bit_length=256)).decode())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        key = _decode_key(path.read_text().strip())
    if len(key) != 32:
        raise ValueError(f"{KEY_VARIABLE} must be the base64 of 32 bytes")
    return key


def _decode_key(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError(f"{KEY_VARIABLE} must be the base64 of 32 bytes") from None


def seal(key: bytes, hospital: str, secret: str) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, secret.encode(), hospital.encode())


def unseal(key: bytes, hospital: str, sealed: bytes) -> str:
    """The secret; raises `cryptography.exceptions.InvalidTag` under another key (or for
    another hospital's row)."""
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], hospital.encode()).decode()


# --- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Webhook:
    hospital: str
    url: str
    sealed: bytes
    position: int
    failures: int


COLUMNS = "hospital, url, secret_sealed, position, failures"


def _webhook(row: asyncpg.Record) -> Webhook:
    return Webhook(
        row["hospital"], row["url"], bytes(row["secret_sealed"]), row["position"], row["failures"]
    )


async def register(
    conn: asyncpg.Connection, key: bytes, hospital: str, url: str, after_seq: int
) -> tuple[str, bool]:
    """Registers (or re-registers) the hospital's endpoint with a new secret; returns (secret,
    new). A new registration delivers the events after `after_seq` (the stream's last sequence
    now); registering again changes the URL and the secret, and goes on from the position the
    old endpoint reached, so nothing is skipped."""
    secret = new_secret()
    new = await conn.fetchval(
        """
        INSERT INTO webhooks (hospital, partition, url, secret_sealed, position)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (hospital) DO UPDATE SET url = $3, secret_sealed = $4, failures = 0,
            last_error = NULL, last_error_at = NULL, registered_at = now()
        RETURNING (xmax = 0)
        """,
        hospital,
        partition_of(hospital),
        url,
        seal(key, hospital, secret),
        after_seq,
    )
    return secret, bool(new)


async def unregister(conn: asyncpg.Connection, hospital: str) -> bool:
    done: str = await conn.execute("DELETE FROM webhooks WHERE hospital = $1", hospital)
    return done != "DELETE 0"


async def of_partition(conn: asyncpg.Connection, partition: int) -> list[str]:
    rows = await conn.fetch(
        "SELECT hospital FROM webhooks WHERE partition = $1 ORDER BY hospital", partition
    )
    return [r["hospital"] for r in rows]


async def load(conn: asyncpg.Connection, hospital: str) -> Webhook | None:
    row = await conn.fetchrow(f"SELECT {COLUMNS} FROM webhooks WHERE hospital = $1", hospital)
    return _webhook(row) if row is not None else None


async def acknowledged(conn: asyncpg.Connection, hook: Webhook, seq: int) -> bool:
    """The endpoint acknowledged the event at `seq`: the position moves there, unless the row
    changed meanwhile (removed, or registered anew)."""
    done = await conn.execute(
        """
        UPDATE webhooks SET position = $3, failures = 0, delivered_at = now()
        WHERE hospital = $1 AND position = $2 AND secret_sealed = $4
        """,
        hook.hospital,
        hook.position,
        seq,
        hook.sealed,
    )
    return bool(done != "UPDATE 0")


async def failed(conn: asyncpg.Connection, hook: Webhook, error: str) -> int:
    """An attempt failed (`error`: a status code or an error class, never a body): the count of
    failures in a row."""
    failures = await conn.fetchval(
        """
        UPDATE webhooks SET failures = failures + 1, last_error = $3, last_error_at = now()
        WHERE hospital = $1 AND position = $2 RETURNING failures
        """,
        hook.hospital,
        hook.position,
        error[:100],
    )
    return int(failures or 0)


async def status_rows(conn: asyncpg.Connection) -> list[dict[str, object]]:
    """For `postctl status`: no secret, no path or query of the URL."""
    rows = await conn.fetch(
        """
        SELECT hospital, url, position, failures, last_error, last_error_at, delivered_at,
               registered_at
        FROM webhooks ORDER BY hospital
        """
    )
    out = []
    for r in rows:
        item = dict(r)
        item["endpoint"] = endpoint_label(item.pop("url"))
        for k in ("last_error_at", "delivered_at", "registered_at"):
            item[k] = item[k].isoformat() if item[k] is not None else None
        out.append(item)
    return out
