"""The checked-in AsyncAPI document is the one the code generates, and it names the contract."""

from __future__ import annotations

import difflib
import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import asyncapi
from shared.contracts import (
    COMMANDS,
    EVENTS,
    HospitalRegistered,
    LaunchDepartment,
    command_message,
    make_cloudevent,
    parse_envelope,
)

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "docs" / "asyncapi.yaml"
CONTRACT = ROOT.parent / "shared" / "CONTRACT.md"
REGENERATE = ".venv/bin/python -m shared.asyncapi > docs/asyncapi.yaml"


@pytest.fixture(scope="module")
def generated() -> str:
    return asyncapi.to_yaml(asyncapi.document())


@pytest.fixture(scope="module")
def doc(generated: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(generated)
    return loaded


@pytest.fixture(scope="module")
def contract() -> str:
    if not CONTRACT.exists():
        pytest.skip(f"{CONTRACT} is not beside the repository")
    return CONTRACT.read_text()


def test_the_checked_in_document_is_the_generated_one(generated: str) -> None:
    checked_in = CHECKED_IN.read_text() if CHECKED_IN.exists() else ""
    if checked_in != generated:
        diff = "".join(
            list(
                difflib.unified_diff(
                    checked_in.splitlines(keepends=True),
                    generated.splitlines(keepends=True),
                    "docs/asyncapi.yaml (checked in)",
                    "generated from the code",
                )
            )[:60]
        )
        pytest.fail(f"docs/asyncapi.yaml drifted from the code; regenerate: {REGENERATE}\n{diff}")


def test_generation_is_repeatable(generated: str) -> None:
    assert asyncapi.to_yaml(asyncapi.document()) == generated


def contract_messages(contract: str) -> tuple[dict[str, tuple[str, list[str]]], set[str]]:
    """CONTRACT.md's commands (-> owner, success events) and every event it names."""
    commands: dict[str, tuple[str, list[str]]] = {}
    events: set[str] = set()
    section = contract.split("## Commands and the events they produce")[1].split("\n## ")[0]
    for line in section.splitlines():
        row = re.match(r"\| `(\w+)` \(.*\| (\w+) \| (.+) \|$", line)
        if row:
            answers = re.findall(r"`(\w+)`", row.group(3))
            commands[row.group(1)] = (row.group(2), answers)
            events.update(answers)
        emitted = re.match(r"- `(\w+)` \(", line)
        if emitted:
            events.add(emitted.group(1))
    return commands, events


def test_the_document_names_every_command_and_event_of_the_contract(
    doc: dict[str, Any], contract: str
) -> None:
    commands, events = contract_messages(contract)
    assert len(commands) == 9 and len(events) == 15, (commands, events)  # the parse found them
    channels, operations = doc["channels"], doc["operations"]
    for name, (owner, answers) in commands.items():
        assert channels[name]["address"] == f"post.{{hospital}}.cmd.{name}"
        assert operations[name]["action"] == "receive"
        assert COMMANDS[name].owner == owner
        assert list(asyncapi.ANSWERS[name]) == answers
        for answer in answers:
            assert f"post.{{hospital}}.evt.{answer}" in channels[name]["description"]
    for name in events:
        assert channels[name]["address"] == f"post.{{hospital}}.evt.{name}"
        assert operations[name]["action"] == "send"
    # and nothing the code has is missing from the document
    assert set(channels) == {*COMMANDS, *EVENTS, asyncapi.DEAD_LETTER}
    assert channels[asyncapi.DEAD_LETTER]["address"] == "post.{hospital}.dlq.{message_type}"


def test_the_document_carries_the_contract_version(doc: dict[str, Any], contract: str) -> None:
    version = re.search(r"^# Integration contract, version (\S+)", contract, re.MULTILINE)
    assert version is not None
    assert doc["info"]["version"] == version.group(1) == asyncapi.CONTRACT_VERSION


def test_every_parameterised_address_declares_its_parameters(doc: dict[str, Any]) -> None:
    for name, channel in doc["channels"].items():
        declared = set(re.findall(r"\{(\w+)\}", channel["address"]))
        assert declared == set(channel["parameters"]), name


def test_payloads_are_the_contract_models(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    for name, model in {**COMMANDS, **EVENTS}.items():
        message = doc["components"]["messages"][name]
        assert message["contentType"] == "application/cloudevents+json"
        kind = "Command" if name in COMMANDS else "Event"
        assert message["payload"] == {"$ref": f"#/components/schemas/{name}{kind}"}
        envelope = schemas[f"{name}{kind}"]
        assert envelope["properties"]["data"] == {"$ref": f"#/components/schemas/{name}"}
        assert envelope["properties"]["type"]["const"] == name
        assert set(schemas[name]["properties"]) == set(model.model_fields)
        assert schemas[name]["additionalProperties"] is False  # payloads are strict


def test_the_documented_envelopes_accept_what_the_platform_exchanges() -> None:
    launch = LaunchDepartment(department="surgery", physician_count=12, launched_on=date.today())
    _, body, _ = command_message("st-mary", launch)
    command = asyncapi.envelope("LaunchDepartment", LaunchDepartment, event=False)
    assert command.model_validate_json(body).type == "LaunchDepartment"

    fact = HospitalRegistered(hospital="st-mary", name="St Mary", physician_count=300)
    published = make_cloudevent(
        type_="HospitalRegistered",
        source="/hospitals/st-mary/matching",
        data=fact.to_data(),
        time=datetime.now(UTC),
        correlationid="c-1",
        causationid="c-1",
    )
    event = asyncapi.envelope("HospitalRegistered", HospitalRegistered, event=True)
    assert event.model_validate(published).causationid == "c-1"
    parse_envelope(body)  # and the platform's own parser takes the same command


def test_dead_letter_headers_are_the_consumers(doc: dict[str, Any]) -> None:
    consumer = (ROOT / "shared" / "consumer.py").read_text()
    headers = doc["components"]["messages"][asyncapi.DEAD_LETTER]["headers"]["properties"]
    for header in headers:
        assert f'"{header}"' in consumer, header


def test_the_deployment_server_is_tls_and_hospitals_connect_with_their_key(
    doc: dict[str, Any],
) -> None:
    # CONTRACT.md 1.2: in a deployment every connection is TLS, and a hospital's key is an NKey.
    servers = doc["servers"]
    assert set(servers) == {"development", "production"}
    assert servers["development"]["host"].startswith("127.0.0.1:")  # loopback, may be plaintext
    production = servers["production"]
    assert "tls://" in production["description"] and "ca.pem" in production["description"]
    assert [tag["name"] for tag in production["tags"]] == ["tls"]
    assert production["variables"]["port"]["enum"] == ["4222", "4223", "4224"]
    key = {"$ref": "#/components/securitySchemes/hospital-nkey"}
    assert all(server["security"] == [key] for server in servers.values())
    (name,) = doc["components"]["securitySchemes"]
    scheme = doc["components"]["securitySchemes"][name]
    assert scheme["type"] == "asymmetricEncryption"
    assert "nkeys_seed" in scheme["description"] and "inbox_prefix" in scheme["description"]
    for channel in doc["channels"].values():
        assert {s["$ref"] for s in channel["servers"]} == {
            "#/servers/development",
            "#/servers/production",
        }
