"""`postctl certs --out DIR`: a private CA and the server certificates of a trial deployment.

docker-compose.yml mounts these files from deploy/certs/ (CONTRACT.md 1.2, "Encryption in
transit"). Production brings its own CA or certificates under the same file names.

- ``ca.pem`` the private CA (give it to the hospitals: they trust it for ``tls://``), its
  key ``ca-key.pem`` beside it;
- ``nats-1.pem`` .. ``nats-3.pem``: each NATS node, for its client port and for the routes
  between the nodes (mutual TLS: the certificate serves as a client one too);
- ``postgres.pem``: PostgreSQL, for the services' ``sslmode=verify-full``;
- ``proxy.pem``: the TLS proxy in front of the four services and Grafana;
- ``jaeger.pem``: Jaeger's OTLP receiver, for the services' trace export.

Each certificate names its compose service (``nats-1``, ``postgres``, ``proxy``) and
``localhost``/``127.0.0.1`` (for trials on one machine); ``--name`` adds the names hospitals
and browsers use (``post.example.org``) to the ones they reach: the NATS nodes and the
proxy. Keys are ECDSA P-256, PKCS#8 PEM, written mode 0600.

Existing files are never replaced silently: an existing CA (``ca.pem`` and ``ca-key.pem``) is
kept and signs the new certificates, so the hospitals' trust stays valid; an existing server
certificate makes the command refuse, unless ``--force`` (then the server certificates are
issued again, by the same CA).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 1825  # five years: a trial's CA outlives its server certificates
SERVER_DAYS = 397  # the longest the browsers accept from a public CA; issue again yearly
LOCAL_NAMES = ("localhost", "127.0.0.1")
CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"


@dataclass(frozen=True)
class Server:
    """One server certificate: its file stem, its compose name, and whether the outside
    reaches it (then `--name` adds the public names), and whether it is a TLS client too."""

    stem: str
    public: bool
    client_auth: bool = False

    @property
    def cert(self) -> str:
        return f"{self.stem}.pem"

    @property
    def key(self) -> str:
        return f"{self.stem}-key.pem"


SERVERS = (
    Server("nats-1", public=True, client_auth=True),
    Server("nats-2", public=True, client_auth=True),
    Server("nats-3", public=True, client_auth=True),
    Server("postgres", public=False),
    Server("proxy", public=True),
    Server("jaeger", public=False),
)


def files() -> list[str]:
    """Every file `postctl certs` writes (docker-compose.yml mounts some of them)."""
    return [CA_CERT, CA_KEY] + [f for s in SERVERS for f in (s.cert, s.key)]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _check_name(name: str) -> str:
    name = name.strip().lower()
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    labels = name.removeprefix("*.").split(".")
    if not name or not all(
        label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
        for label in labels
    ):
        raise ValueError(f"not a DNS name or an IP address: {name!r}")
    return name


def _write(path: Path, data: bytes, mode: int) -> None:
    # Beside and renamed: a reader never sees half a file; a key is never world-readable.
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _new_ca(common_name: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "POST platform"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _server_cert(
    server: Server,
    names: Sequence[str],
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    if server.client_auth:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "POST platform"),
                    x509.NameAttribute(NameOID.COMMON_NAME, server.stem),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    if not cert_path.exists() and not key_path.exists():
        return None
    if not (cert_path.exists() and key_path.exists()):
        raise ValueError(f"{out} holds one of {CA_CERT} and {CA_KEY} without the other")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an ECDSA key")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise ValueError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def server_names(server: Server, extra: Iterable[str] = ()) -> list[str]:
    """The subject alternative names of a server's certificate, its compose name first."""
    names = [server.stem, *LOCAL_NAMES]
    if server.public:
        names += [_check_name(n) for n in extra]
    return list(dict.fromkeys(names))


def write_certs(
    out: Path,
    names: Iterable[str] = (),
    *,
    force: bool = False,
    days: int = SERVER_DAYS,
    ca_days: int = CA_DAYS,
    ca_name: str = "POST platform trial CA",
) -> list[Path]:
    """Writes the CA (unless one is there: it is kept) and every server certificate into
    out; returns the files written. Refuses to replace a server certificate unless force."""
    extra = [_check_name(n) for n in names]
    if days < 1 or ca_days < 1:
        raise ValueError("a lifetime is at least one day")
    out.mkdir(parents=True, exist_ok=True)
    existing = [s.cert for s in SERVERS if (out / s.cert).exists()]
    existing += [s.key for s in SERVERS if (out / s.key).exists()]
    if existing and not force:
        raise ValueError(
            f"{out} already holds {', '.join(sorted(existing))}: give --force to issue them again"
        )
    written = []
    loaded = _load_ca(out)
    if loaded is None:
        ca, ca_key = _new_ca(ca_name, ca_days)
        _write(out / CA_KEY, _key_pem(ca_key), 0o600)
        _write(out / CA_CERT, ca.public_bytes(serialization.Encoding.PEM), 0o644)
        written += [out / CA_CERT, out / CA_KEY]
    else:
        ca, ca_key = loaded
    for server in SERVERS:
        cert, key = _server_cert(server, server_names(server, extra), ca, ca_key, days)
        _write(out / server.key, _key_pem(key), 0o600)
        _write(out / server.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        written += [out / server.cert, out / server.key]
    return written


def cmd_certs(args: argparse.Namespace) -> None:
    out = Path(args.out)
    try:
        written = write_certs(out, args.name, force=args.force, days=args.days)
    except ValueError as exc:
        raise SystemExit(f"postctl certs: {exc}") from None
    for path in written:
        print(path)
    kept = "" if out / CA_CERT in written else " (the CA already there was kept)"
    print(
        f"\nA private CA and the server certificates of a trial deployment{kept}.\n"
        f"Give {out / CA_CERT} to the hospitals (they trust it for tls://); keep"
        f" {out / CA_KEY} offline.\nServer certificates last {args.days} days: issue them"
        " again with --force (same CA) and restart the servers.",
        file=sys.stderr,
    )


def add_cli(subparsers: Any) -> None:
    """Registers `postctl certs --out DIR [--name NAME ...] [--days N] [--force]`."""
    certs = subparsers.add_parser(
        "certs", help="a private CA and the server certificates of a trial deployment"
    )
    certs.add_argument("--out", required=True, help="the folder (deploy/certs for compose)")
    certs.add_argument(
        "--name",
        action="append",
        default=[],
        help="a DNS name or IP that hospitals and browsers use (post.example.org); repeatable."
        " Added to the NATS nodes' and the proxy's certificates",
    )
    certs.add_argument(
        "--days", type=int, default=SERVER_DAYS, help="server certificates' lifetime"
    )
    certs.add_argument(
        "--force", action="store_true", help="issue existing server certificates again"
    )
    certs.set_defaults(func=cmd_certs)
