"""The FHIR intake keeps nothing but the ids the contract names (CONTRACT.md 1.1): a made-up
name in every free-text place of an AdverseEvent (the patient, the narrative, descriptions,
notes, displays, extensions, the contained resources' own text) is found afterwards in no HTTP
answer, no message of the ``POST`` stream (the commands the intake publishes included), no row
of any service's table and no log of the services, nats-server or PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from shared.client import PlatformClient
from shared.runtime import SERVICES, Platform
from tests.badinput.test_bad_input import DEPARTMENT, new_hospital, onboard, settled
from tests.security.test_security import bearer, log_files, stream_messages, url

pytestmark = [pytest.mark.e2e, pytest.mark.security]


def marked_report(event_id: str, marker: str, recorded: str) -> dict[str, Any]:
    """An AdverseEvent with the marker wherever a reporting system puts free text."""
    note = [{"authorString": marker, "text": f"{marker} was distressed afterwards"}]
    extension = [{"url": "https://example.org/fhir/witness", "valueString": marker}]

    def role(id_: str, physician_id: str) -> dict[str, Any]:
        return {
            "resourceType": "PractitionerRole",
            "id": id_,
            "text": {"status": "generated", "div": f"<div>{marker}, on call</div>"},
            "extension": extension,
            "practitioner": {"reference": f"Practitioner/{physician_id}", "display": marker},
            "specialty": [
                {
                    "text": marker,
                    "coding": [
                        {"system": "urn:post:department", "code": DEPARTMENT, "display": marker}
                    ],
                }
            ],
            "code": [{"coding": [{"system": "urn:post:rank", "code": "attending"}]}],
        }

    return {
        "resourceType": "AdverseEvent",
        "id": event_id,
        "meta": {"tag": [{"display": marker}]},
        "text": {"status": "generated", "div": f"<div>{marker} fell after sedation</div>"},
        "extension": extension,
        "identifier": {"system": "urn:oid:1.2.3", "value": marker},
        "actuality": "actual",
        "event": {"text": f"{marker} fell", "coding": [{"display": marker}]},
        "description": f"{marker} fell after sedation",
        "subject": {"reference": f"Patient/{marker}", "display": marker},
        "encounter": {"display": marker},
        "location": {"display": marker},
        "recordedDate": recorded,
        "recorder": {"reference": "Practitioner/RISK-7", "display": marker},
        "contained": [
            role("r1", "P-sec-1"),
            role("r2", "P-sec-2"),
            {
                "resourceType": "Procedure",
                "id": "proc",
                "note": note,
                "subject": {"display": marker},
            },
            {"resourceType": "Patient", "id": "pat", "name": [{"text": marker}]},
        ],
        "contributor": [
            {"reference": "#r1", "display": marker},
            {"reference": "#r2", "display": marker},
            {"reference": "#pat", "display": marker},
        ],
        "suspectEntity": [{"instance": {"reference": "#proc", "display": marker}}],
        "note": note,
    }


async def rows_with(stack: Platform, needle: str) -> list[str]:
    """Every row of every table of the services' schemas whose text holds the needle."""
    conn = await asyncpg.connect(stack.db_url)
    try:
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_schema = ANY($1::text[]) AND table_type = 'BASE TABLE'",
            list(SERVICES),
        )
        found = []
        for schema, table in tables:
            rows = await conn.fetch(
                f'SELECT t::text AS row FROM "{schema}"."{table}" t WHERE t::text LIKE $1',
                f"%{needle}%",
            )
            found += [f"{schema}.{table}: {r['row'][:300]}" for r in rows]
        return found
    finally:
        await conn.close()


async def test_nothing_of_an_adverse_event_but_its_ids_is_kept(
    client: PlatformClient, stack: Platform, api_token: Callable[[str], str]
) -> None:
    h = new_hospital()
    await onboard(client, h)
    tag = uuid.uuid4().hex[:12]
    marker = f"Dr Jane Marker {tag}"  # a made-up person, unique to this run
    # Only this run's tag on the stream, in tables and logs: other tests' accepted commands may
    # carry the plain marker in envelope attributes the platform never reads.
    needles = [tag.encode()]
    token = api_token(h)
    leaks: list[str] = []

    def check_answer(why: str, resp: httpx.Response) -> None:
        if tag in resp.text or "Jane Marker" in resp.text:
            leaks.append(f"{why}: HTTP {resp.status_code}: {resp.text[:300]}")

    # The id is kept (safety_event_id): it must not carry the tag.
    event = marked_report(f"AE-{uuid.uuid4().hex[:8]}", marker, "2024-03-01T09:00:00Z")
    headers = {**bearer(token), "Content-Type": "application/fhir+json"}
    async with httpx.AsyncClient(timeout=60) as web:
        accepted = await web.post(
            url(stack, "referral", h, "fhir/AdverseEvent"), json=event, headers=headers
        )
        assert accepted.status_code == 202, accepted.text
        check_answer("accepted", accepted)
        assert [s["reason"] for s in accepted.json()["skipped"]] == ["not_a_contained_role"]
        # Refused reports: their answers name fields, never the values.
        for why, bad in {
            "a date without a zone": {**event, "recordedDate": "2024-03-01T09:00:00"},
            "an id with the name": {**event, "id": marker},
            "no contributor yields a referral": {**event, "contributor": event["contributor"][2:]},
            "not an AdverseEvent": {**event, "resourceType": marker},
        }.items():
            resp = await web.post(
                url(stack, "referral", h, "fhir/AdverseEvent"), json=bad, headers=headers
            )
            assert resp.status_code == 422, (why, resp.text)
            check_answer(why, resp)
        resp = await web.post(
            url(stack, "referral", h, "fhir/AdverseEvent"),
            content=f"{marker} {json.dumps(event)}",
            headers=headers,
        )
        assert resp.status_code == 422
        check_answer("not JSON", resp)
        # Without the token: refused, and nothing echoed.
        resp = await web.post(url(stack, "referral", h, "fhir/AdverseEvent"), json=event)
        assert resp.status_code == 401
        check_answer("no token", resp)

    for referral in accepted.json()["referrals"]:
        answer = await client.outcome(referral["command_id"], timeout=60)
        assert answer["type"] == "ReferralCreated", answer["data"]
        await client.wait_for(
            h,
            "SupporterAssigned",
            lambda e, r=referral["referral_id"]: e["data"]["referral_id"] == r,
            timeout=60,
        )
    await settled(client, stack, [h])

    # The stream: not even the commands the intake published hold it (nor anything else).
    for seq, subject, body in await stream_messages(client):
        if any(n in body for n in needles):
            leaks.append(f"stream #{seq} {subject}: {body[:300]!r}")
    leaks += await rows_with(stack, tag)
    for path in log_files(stack):
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if any(n in line for n in needles):
                leaks.append(f"{path.name}:{number}: {line[:300]!r}")
    assert not leaks, "free text of an AdverseEvent kept:\n" + "\n".join(leaks[:20])
