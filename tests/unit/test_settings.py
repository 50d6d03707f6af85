"""Settings on pydantic-settings (issue 25): every variable in one place, an unknown POST_*
variable refused by name, secrets as SecretStr, and the README's table equal to the fields."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from shared.settings import (
    HOSPITAL_KIT_VARIABLES,
    Settings,
    UnknownSettingError,
    env_name,
    known_variables,
    variables_table,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_defaults_are_the_embedded_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("POST_"):
            monkeypatch.delenv(name)
    s = Settings()
    assert s.nats_servers == ["nats://127.0.0.1:4222"] and s.nats_port == 4222
    assert s.database_url.get_secret_value().startswith("postgresql://postgres@127.0.0.1:5432/")
    assert not s.database_given
    assert s.data_dir == Path.cwd() / ".post-data"
    assert [s.http_port(n) for n in ("referral", "matching", "records", "analytics")] == [
        8001,
        8002,
        8003,
        8004,
    ]
    assert not s.test_clock and s.max_deliver == 20 and s.lease_seconds == 5


def test_variables_are_read_and_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POST_DATABASE_URL", "postgresql://post:pw@db:5432/post")
    monkeypatch.setenv("POST_TEST_CLOCK", "1")
    monkeypatch.setenv("POST_RECORDS_PORT", "9103")
    monkeypatch.setenv("POST_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("POST_LEASE_SECONDS", "2.5")
    s = Settings()
    assert s.database_given and s.test_clock and s.http_port("records") == 9103
    assert s.data_dir == tmp_path and s.lease_seconds == 2.5
    monkeypatch.setenv("POST_MAX_DELIVER", "twenty")
    with pytest.raises(ValueError, match="max_deliver"):
        Settings()


def test_an_unknown_post_variable_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POST_NATS_ULR", "nats://elsewhere:4222")
    with pytest.raises(UnknownSettingError, match="POST_NATS_ULR") as refused:
        Settings()
    assert "did you mean POST_NATS_URL?" in str(refused.value)
    assert "elsewhere" not in str(refused.value)  # the name, never the value
    # a hospital kit example's variable in the same shell is no typo of the platform's
    monkeypatch.delenv("POST_NATS_ULR")
    monkeypatch.setenv("POST_HOSPITAL", "st-marys")
    monkeypatch.setenv("POST_NKEY_SEED", "st-marys.nk")
    Settings()  # not refused


def test_the_hospital_kit_variables_are_the_examples_own() -> None:
    read = set()
    for path in (ROOT / "clients" / "python" / "examples").glob("*.py"):
        read |= set(re.findall(r"\"(POST_[A-Z_]+)\"", path.read_text()))
    assert read - known_variables() == HOSPITAL_KIT_VARIABLES


def test_a_service_and_postctl_refuse_an_unknown_variable_at_start(tmp_path: Path) -> None:
    env = {**os.environ, "POST_LEASE_SECOND": "1", "POST_DATA_DIR": str(tmp_path)}
    for argv in (["-m", "services.records"], ["-m", "postctl.cli", "status"]):
        done = subprocess.run(
            [sys.executable, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        said = done.stdout + done.stderr
        assert done.returncode == 1, said[-2000:]
        assert "unknown environment variable POST_LEASE_SECOND" in said, said[-2000:]
        assert "POST_LEASE_SECONDS?" in said and "Traceback" not in said, said[-2000:]


def test_secrets_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POST_NATS_URL", "tls://post_platform:s3cret@n1:4222,tls://u:s3cret@n2:4")
    monkeypatch.setenv("POST_DATABASE_URL", "postgresql://post:s3cret@db/post")
    monkeypatch.setenv("POST_WEBHOOK_KEY", "s3cret")
    monkeypatch.setenv("POST_REGION_TOKEN", "s3cret")
    s = Settings()
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.model_dump())
    assert s.nats_hosts == ["n1:4222", "n2:4"]  # for logs, parsed, no credentials
    assert s.nats_servers[0] == "tls://post_platform:s3cret@n1:4222"  # to connect
    for name, info in Settings.model_fields.items():
        secretish = name.endswith(("_password", "_key", "_token", "_url"))
        assert (info.annotation is SecretStr) == secretish, name


def _post_names_read(path: Path) -> set[str]:
    """POST_* names in string constants of a module (what it reads or writes)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= set(re.findall(r"\bPOST_[A-Z][A-Z_]*[A-Z]\b", node.value))
    return found


def test_every_variable_is_declared_and_no_module_reads_the_environment_itself() -> None:
    known = known_variables()
    not_variables = {"POST_WORK_"}  # the work streams' names (shared/partitions.py)
    for folder in ("shared", "services", "postctl"):
        for path in (ROOT / folder).rglob("*.py"):
            source = path.read_text()
            if path.name != "settings.py":
                # the environment is read in shared/settings.py alone; others may pass one on
                # to a child process ({**os.environ, ...}), never look a variable up in it
                assert not re.search(r"os\.environ\.get|os\.getenv|environ\[", source), path
            names = {n for n in _post_names_read(path) if not n.startswith(tuple(not_variables))}
            # a POST_* constant of the study's figures (postctl/simulate) is no variable
            names = {n for n in names if "/simulate/" not in str(path)}
            if path.name == "settings.py":
                names -= HOSPITAL_KIT_VARIABLES  # declared there as not the platform's
            assert names <= known | {"POST_SERVICE_PORT"}, (path, names - known)
    # tests and the bench read theirs from the environment: declared too, or they are refused
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]:
        for name in re.findall(r"environ(?:\.get)?\(?\[?\"(POST_[A-Z_]+)\"", path.read_text()):
            assert name in known, (path, name)


def test_the_readme_table_is_the_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    start = "<!-- settings table: python -m shared.settings -->\n"
    end = "<!-- end of settings table -->"
    assert start in readme and end in readme
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == variables_table(), "README.md's table is stale: python -m shared.settings"
    for name in Settings.model_fields:
        assert f"| `{env_name(name)}` |" in table


def test_the_deployments_set_only_declared_variables() -> None:
    """compose and Kubernetes give the services only variables the platform knows (else every
    instance would refuse to start)."""
    import yaml

    known = known_variables()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    given: set[str] = set()
    for service in compose["services"].values():
        env = service.get("environment") or {}
        given |= set(env if isinstance(env, dict) else (e.split("=", 1)[0] for e in env))
    for path in (ROOT / "deploy" / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ConfigMap":
                given |= set(doc.get("data", {}))
            for name in re.findall(r"- name: (POST_[A-Z_]+)", yaml.safe_dump(doc)):
                given.add(name)
    example = (ROOT / "deploy" / "env.example").read_text()
    given |= set(re.findall(r"^(POST_[A-Z_]+)=", example, re.M))
    posts = {g for g in given if g.startswith("POST_")}
    assert "POST_NATS_URL" in posts and "POST_STREAM_REPLICAS" in posts  # the scan found them
    assert posts <= known, posts - known
