"""The README's first program, as a new hospital developer runs it: twice, against the real
platform, with the hospital's own key."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def first_program() -> str:
    match = re.search(r"```python\n(import asyncio.*?)```", README.read_text(), re.S)
    assert match, "the README's first program is missing"
    return match.group(1)


async def test_the_readme_program_refers_and_prints_the_assignment_twice(
    kit_platform, hospital_keys, new_hospital, tmp_path
) -> None:
    on = await hospital_keys.onboard(new_hospital)
    program = (
        first_program()
        .replace("nats://127.0.0.1:4222", kit_platform.nats_url)
        .replace('"st-marys.nk"', repr(str(on.seed_file)))
        .replace('"st-marys"', repr(new_hospital))
    )
    path = tmp_path / "first.py"
    path.write_text(program)
    for _ in range(2):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(path), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert "created r-" in out.decode()
        assert "assigned to s-1 due 20" in out.decode()
