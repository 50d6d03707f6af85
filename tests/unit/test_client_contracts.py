"""The hospital kit's models (clients/python, `post_client.contracts`) are the platform's own:
every command, event and the CloudEvents envelope has the same JSON Schema, field by field.
The kit's package is generated from shared/contracts/ (clients/python/sync_contracts.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from post_client import contracts as client  # make install installs ./clients/python
from pydantic import BaseModel

from shared import contracts as platform

REPO = Path(__file__).resolve().parents[2]
FIX = "run: python clients/python/sync_contracts.py"


def schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(mode="validation")


def fields(model: type[BaseModel]) -> dict[str, Any]:
    s = schema(model)
    return {"properties": s.get("properties", {}), "required": sorted(s.get("required", []))}


def test_the_kit_has_every_command_and_event_and_no_other() -> None:
    assert sorted(client.COMMANDS) == sorted(platform.COMMANDS), FIX
    assert sorted(client.EVENTS) == sorted(platform.EVENTS), FIX


@pytest.mark.parametrize(
    "name", sorted(platform.COMMANDS) + sorted(platform.EVENTS) + ["CloudEvent"]
)
def test_each_model_has_the_same_schema_field_by_field(name: str) -> None:
    ours = platform.COMMANDS.get(name) or platform.EVENTS.get(name) or platform.CloudEvent
    theirs = client.COMMANDS.get(name) or client.EVENTS.get(name) or client.CloudEvent
    mine, kit = fields(ours), fields(theirs)
    assert sorted(kit["properties"]) == sorted(mine["properties"]), f"{name}: fields; {FIX}"
    for field, definition in mine["properties"].items():
        assert kit["properties"][field] == definition, f"{name}.{field} differs; {FIX}"
    assert kit["required"] == mine["required"], f"{name}: required fields; {FIX}"
    # the rest too: strictness (additionalProperties), enums and formats in $defs
    assert schema(theirs) == schema(ours), f"{name}; {FIX}"


def test_the_kit_module_is_the_generated_copy() -> None:
    check = subprocess.run(
        [sys.executable, str(REPO / "clients/python/sync_contracts.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
