"""shared/README.md maps every module of shared/ and services/ (issue 22: the map stays true).

A module the README does not name is a room a newcomer cannot find; this fails on the first
one added without a line there.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules() -> list[Path]:
    found = []
    for top in ("shared", "services"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name == "__init__.py" and path.stat().st_size == 0:
                continue
            found.append(path)
    return found


def test_shared_readme_names_every_module() -> None:
    readme = (ROOT / "shared" / "README.md").read_text()
    missing = []
    for path in modules():
        relative = path.relative_to(ROOT)
        # A package's module is named with its package (`domain/forgetting.py`), a top-level
        # one by its file name.
        named = f"`{path.name}`" in readme or f"{relative.parent.name}/{path.name}" in readme
        if not named:
            missing.append(str(relative))
    assert missing == [], f"shared/README.md does not name: {missing}"


def test_the_check_sees_the_modules() -> None:
    # The walk itself: it finds the services' rooms, so the check above cannot pass empty.
    names = {p.relative_to(ROOT).as_posix() for p in modules()}
    assert "services/matching/handlers.py" in names
    assert "shared/eventstore.py" in names


def test_the_sizes_it_gives_are_near_the_files() -> None:
    # `| `name` | lines | ...`: the size a newcomer plans by, within a fifth (or 20 lines).
    readme = (ROOT / "shared" / "README.md").read_text()
    wrong = []
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \|", readme, re.M)
    assert len(rows) > 20
    for name, size in rows:
        path = ROOT / "shared" / name
        files = sorted(path.glob("*.py")) if path.is_dir() else [path]
        lines = sum(len(f.read_text().splitlines()) for f in files)
        if abs(lines - int(size)) > max(20, lines // 5):
            wrong.append(f"{name}: says {size}, has {lines}")
    assert wrong == [], wrong
