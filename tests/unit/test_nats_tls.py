"""Every NATS connection the platform opens goes through `shared.settings.nats_tls`: in a
deployment it trusts the deployment's CA alone (CONTRACT.md 1.2, "Encryption in transit")."""

from __future__ import annotations

import ast
import ssl
from pathlib import Path

import pytest

from postctl import certs
from shared.settings import Settings, nats_tls

ROOT = Path(__file__).resolve().parents[2]


def test_without_a_ca_file_the_embedded_default_stays_plaintext(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("POST_NATS_CA_FILE", raising=False)
    assert nats_tls() is None
    assert Settings().nats_tls() is None


def test_with_a_ca_file_only_that_ca_is_trusted_and_names_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs.write_certs(tmp_path)
    monkeypatch.setenv("POST_NATS_CA_FILE", str(tmp_path / certs.CA_CERT))
    for context in (nats_tls(), Settings().nats_tls()):
        assert context is not None
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
        (ca,) = context.get_ca_certs()  # not the system's store
        assert ("commonName", "POST platform trial CA") in [n for rdn in ca["subject"] for n in rdn]


def _passes_tls(call: ast.Call) -> bool:
    for keyword in call.keywords:
        if keyword.arg == "tls":
            return True
        if keyword.arg is None and isinstance(keyword.value, ast.Dict):
            keys = [k.value for k in keyword.value.keys if isinstance(k, ast.Constant)]
            if "tls" in keys:
                return True
    return False


def test_every_nats_connect_of_the_platform_passes_the_tls_context() -> None:
    calls = []
    for folder in ("shared", "services", "postctl"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                func = node.func if isinstance(node, ast.Call) else None
                if (
                    isinstance(func, ast.Attribute)
                    and func.attr == "connect"
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "nats"
                ):
                    assert isinstance(node, ast.Call)
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    calls.append(where)
                    # PlatformClient.connect sets options["tls"] itself before passing them on.
                    if where.startswith("shared/client.py") and any(
                        k.arg is None and isinstance(k.value, ast.Name) for k in node.keywords
                    ):
                        continue
                    assert _passes_tls(node), f"{where}: nats.connect without tls="
    assert any(c.startswith("shared/service.py") for c in calls)
