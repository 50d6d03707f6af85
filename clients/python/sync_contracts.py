"""Regenerate post_client/contracts.py from the platform's shared/contracts.py.

The client's models are the platform's own module, copied verbatim under a header: one source,
two installs, no drift. The platform's tests/unit/test_client_contracts.py compares the JSON
Schemas of both, field by field, and fails when this copy is stale. Run from the repository:

    python clients/python/sync_contracts.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent.parent / "shared" / "contracts.py"
TARGET = HERE / "post_client" / "contracts.py"
HEADER = (
    "# GENERATED from the platform's shared/contracts.py by clients/python/sync_contracts.py:\n"
    "# do not edit. The platform's tests compare the JSON Schemas of both, field by field.\n"
)


def generated(source: str) -> str:
    return HEADER + source


def main() -> int:
    text = generated(SOURCE.read_text())
    if "--check" in sys.argv[1:]:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
