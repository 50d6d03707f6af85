"""Regenerate post_client/contracts.py (and the limits it uses) from the platform's shared/.

The client's models are the platform's own modules, copied verbatim under a header: one
source, two installs, no drift. `shared/contracts.py` uses `shared/limits.py` (the size and
depth limits checked before a body is decoded), so both are copied and the one import is
pointed at the copy. The platform's tests/unit/test_client_contracts.py compares the JSON
Schemas of both, field by field, and fails when a copy is stale. Run from the repository:

    python clients/python/sync_contracts.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
PACKAGE = HERE / "post_client"
FILES = ("contracts.py", "limits.py")
HEADER = (
    "# GENERATED from the platform's shared/{name} by clients/python/sync_contracts.py:\n"
    "# do not edit. The platform's tests compare the JSON Schemas of both, field by field.\n"
)


def generated(name: str, source: str) -> str:
    return HEADER.format(name=name) + source.replace(
        "from shared import limits", "from post_client import limits"
    )


def main() -> int:
    stale = []
    for name in FILES:
        text = generated(name, (SHARED / name).read_text())
        target = PACKAGE / name
        if "--check" in sys.argv[1:]:
            if not target.exists() or target.read_text() != text:
                stale.append(target)
            continue
        target.write_text(text)
        print(f"wrote {target}")
    for target in stale:
        print(f"{target} is stale: run python {Path(__file__).name}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
