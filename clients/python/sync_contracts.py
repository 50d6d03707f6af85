"""Regenerate post_client/contracts/ (and the modules it uses) from the platform's shared/.

The client's models are the platform's own modules, copied verbatim under a header: one
source, two installs, no drift. `shared/contracts/` (a package: base, commands, events,
subjects, envelope, parsing) uses `shared/limits.py` (the size and depth limits checked before
a body is decoded) and `shared/errors.py` (the reason codes, `Rejected`), so all are copied and
every ``shared`` import is pointed at the copy. The platform's
tests/unit/test_client_contracts.py compares the JSON Schemas of both, field by field, and
fails when a copy is stale. Run from the repository:

    python clients/python/sync_contracts.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
PACKAGE = HERE / "post_client"
MODULES = ("limits.py", "errors.py")
HEADER = (
    "# GENERATED from the platform's shared/{name} by clients/python/sync_contracts.py:\n"
    "# do not edit. The platform's tests compare the JSON Schemas of both, field by field.\n"
)


def files() -> list[str]:
    """What is copied, as paths under shared/ (and under post_client/)."""
    package = sorted(p.name for p in (SHARED / "contracts").glob("*.py"))
    return [*MODULES, *(f"contracts/{name}" for name in package)]


def generated(name: str, source: str) -> str:
    source = re.sub(r"\bfrom shared import ", "from post_client import ", source)
    source = re.sub(r"\bfrom shared\.", "from post_client.", source)
    return HEADER.format(name=name) + source


def main() -> int:
    stale = []
    wanted = files()
    for name in wanted:
        text = generated(name, (SHARED / name).read_text())
        target = PACKAGE / name
        if "--check" in sys.argv[1:]:
            if not target.exists() or target.read_text() != text:
                stale.append(target)
            continue
        target.parent.mkdir(exist_ok=True)
        target.write_text(text)
        print(f"wrote {target}")
    # A module the platform no longer has is not left behind in the kit.
    for old in (PACKAGE / "contracts").glob("*.py"):
        if f"contracts/{old.name}" not in wanted:
            if "--check" in sys.argv[1:]:
                stale.append(old)
            else:
                old.unlink()
    for target in stale:
        print(f"{target} is stale: run python {Path(__file__).name}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
