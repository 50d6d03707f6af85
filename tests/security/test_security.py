"""Security checks on the running platform: who may change state, and what is never kept.

- The HTTP routes that change state (``POST /hospitals/{hospital}/referrals``, ``/outreach``,
  ``/interactions``, ``/surveys``) refuse a request without a token, with a wrong one or with
  another hospital's (401 / 403, nothing done), accept the hospital's own, and follow a token
  issued or replaced while the services run. Reads stay open (see shared/auth.py).
- No event on the stream and no line of any log carries free text: commands whose extra
  fields, envelope attributes or bodies hold a marker (a made-up name) are refused or
  answered, and afterwards the marker is found in no message of the ``POST`` stream but the
  hospital's own commands (and the dead-letter copy of a body that was not a CloudEvent, as
  the contract requires), in no HTTP answer, in no log file of the services, nats-server
  or PostgreSQL, and in no planner statistics (``pg_statistic``).

Tenant isolation on NATS (a hospital's credentials cannot read or write another tenant's
subjects) is proved on a real 3-node cluster by tests/integration/test_deploy.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from shared.auth import SCHEME_NAME, hash_token
from shared.client import PlatformClient
from shared.contracts import cmd_subject, encode, make_cloudevent
from shared.runtime import Platform
from tests.badinput.test_bad_input import (
    BASE,
    REFERRAL,
    new_hospital,
    onboard,
    settled,
    stored_for,
)
from tests.scan import log_files, statistics_containing, stream_messages

pytestmark = [pytest.mark.e2e, pytest.mark.security]

# Each protected route, and a body it accepts for an onboarded hospital.
ROUTES = {
    ("referral", "referrals"): {**BASE["RequestReferral"], "referral_id": "r-sec"},
    ("records", "outreach"): {
        **{k: v for k, v in BASE["RecordOutreach"].items() if k != "decline_reason"},
        "outcome": "unreachable",
    },
    ("records", "interactions"): BASE["RecordInteraction"],
    ("records", "surveys"): {**BASE["SubmitSurveyResponse"], "response_id": "q-sec"},
}


def url(stack: Platform, service: str, hospital: str, path: str) -> str:
    return f"http://127.0.0.1:{stack.service_ports[service]}/hospitals/{hospital}/{path}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def onboarded(client: PlatformClient, stack: Platform) -> str:
    hospital = new_hospital()
    await onboard(client, hospital)
    await settled(client, stack, [hospital])  # records knows the assignment
    return hospital


async def test_state_changing_routes_refuse_without_the_hospitals_token(
    client: PlatformClient, stack: Platform, onboarded: str, api_token: Callable[[str], str]
) -> None:
    h, other = onboarded, new_hospital()
    other_token = api_token(other)
    old_token = api_token(h)
    token = api_token(h)  # replaces the first one, while the services run
    before = await stored_for(stack, [h])
    refusals = {
        "no token": ({}, 401, "unauthenticated"),
        "another scheme": ({"Authorization": f"Basic {token}"}, 401, "unauthenticated"),
        "a made-up token": (bearer("post_" + "A" * 43), 401, "unauthenticated"),
        "a truncated token": (bearer(token[:-1]), 401, "unauthenticated"),
        "the token's hash": (bearer(hash_token(token)), 401, "unauthenticated"),
        "a replaced token": (bearer(old_token), 401, "unauthenticated"),
        "another hospital's": (bearer(other_token), 403, "forbidden"),
    }
    async with httpx.AsyncClient(timeout=30) as web:
        for (service, path), body in ROUTES.items():
            for why, (headers, status, reason) in refusals.items():
                resp = await web.post(url(stack, service, h, path), json=body, headers=headers)
                assert (resp.status_code, resp.json()["reason_code"]) == (status, reason), (
                    path,
                    why,
                    resp.text,
                )
                assert token not in resp.text and old_token not in resp.text
                if status == 401:
                    assert resp.headers["www-authenticate"].startswith("Bearer")
            # A hospital that does not exist is answered the same: nothing to learn from it.
            resp = await web.post(url(stack, service, new_hospital(), path), json=body)
            assert (resp.status_code, resp.json()["reason_code"]) == (401, "unauthenticated")
        # Nothing was done for any refused request (the intake commits before it answers).
        assert await stored_for(stack, [h]) == before
        status = await web.get(
            f"http://127.0.0.1:{stack.service_ports['referral']}/hospitals/{h}/referrals/r-sec"
        )
        assert status.status_code == 404
        # The hospital's own token is accepted on every route.
        for (service, path), body in ROUTES.items():
            resp = await web.post(url(stack, service, h, path), json=body, headers=bearer(token))
            assert resp.status_code == 202, (path, resp.text)
        # Reads stay open, and carry pseudonymous ids only.
        status = await web.get(
            f"http://127.0.0.1:{stack.service_ports['referral']}/hospitals/{h}/referrals/{REFERRAL}"
        )
        assert status.status_code == 200 and "physician_id" not in status.json()
        # The running services declare the scheme on exactly these routes.
        for service in ("referral", "records"):
            port = stack.service_ports[service]
            spec = (await web.get(f"http://127.0.0.1:{port}/openapi.json")).json()
            for path, operations in spec["paths"].items():
                for method, operation in operations.items():
                    secured = operation.get("security") == [{SCHEME_NAME: []}]
                    assert secured == (method == "post" and path.startswith("/hospitals/")), (
                        service,
                        method,
                        path,
                    )


# --- free text is never kept ------------------------------------------------------------------


async def erased_commands(stack: Platform) -> float:
    """`post_commands_erased_total` summed over the services that own commands."""
    total = 0.0
    async with httpx.AsyncClient(timeout=10) as web:
        for service in ("referral", "matching", "records"):
            text = (await web.get(f"http://127.0.0.1:{stack.service_ports[service]}/metrics")).text
            for line in text.splitlines():
                if line.startswith("post_commands_erased_total{"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


async def test_no_event_no_answer_and_no_log_line_carries_free_text(
    client: PlatformClient, stack: Platform, onboarded: str, api_token: Callable[[str], str]
) -> None:
    h = onboarded
    tag = uuid.uuid4().hex[:12]
    marker = f"Dr Jane Marker {tag}"  # a made-up person, unique to this run
    needles = [tag.encode(), b"Jane Marker"]
    ours: dict[int, str | None] = {}  # stream sequence -> command id (None: not a CloudEvent)
    outcome_ids: list[str] = []

    async def send(type_: str, body: bytes, answered: bool = True) -> None:
        command_id = str(uuid.uuid4())
        ack = await client.js.publish(
            cmd_subject(h, type_), body, headers={"Nats-Msg-Id": command_id}
        )
        ours[ack.seq] = json.loads(body)["id"] if answered else None
        if answered:
            outcome_ids.append(json.loads(body)["id"])

    def ce(type_: str, data: dict[str, Any], **attributes: Any) -> dict[str, Any]:
        event = make_cloudevent(type_=type_, source=f"/hospitals/{h}/security", data=data)
        event.update(attributes)
        return event

    # Free text in extra fields of every kind of command: refused (unknown_field).
    for type_, data in BASE.items():
        await send(type_, encode(ce(type_, {**data, "notes": marker})))
        await send(type_, encode(ce(type_, {**data, "physician_name": marker, "free": [marker]})))
    # Free text where a pseudonymous id, a slug or an enum is due: refused (invalid_payload).
    for field in ("physician_id", "referral_id", "department", "rank", "referrer_id"):
        data = {**BASE["RequestReferral"], field: marker}
        await send("RequestReferral", encode(ce("RequestReferral", data)))
    # Free text in the envelope: its own attributes, an extension, a type that is not the
    # subject's (refused), a source naming no hospital (refused).
    survey = {**BASE["SubmitSurveyResponse"], "response_id": f"q-{tag}"}
    for attributes in (
        {"correlationid": marker},
        {"causationid": marker},
        {"subject": marker},
        {"comment": marker},
        {"source": f"/hospitals/{h}/{marker}"},
    ):
        data = {**survey, "response_id": f"q-{uuid.uuid4().hex[:8]}"}
        await send("SubmitSurveyResponse", encode(ce("SubmitSurveyResponse", data, **attributes)))
    await send("SubmitSurveyResponse", encode(ce("SubmitSurveyResponse", survey, type=marker)))
    await send("SubmitSurveyResponse", encode(ce("SubmitSurveyResponse", survey, source=marker)))
    await send("SubmitSurveyResponse", encode(ce("SubmitSurveyResponse", survey, time=marker)))
    # A body that is not a CloudEvent at all: dead-lettered as it is, by the contract.
    await send("RecordInteraction", f"{marker} cried after the code".encode(), answered=False)

    leaks = []
    answers = await asyncio.gather(*(client.outcome(i, timeout=60) for i in outcome_ids))
    for answer in answers:
        raw = json.dumps(answer).encode()
        if any(n in raw for n in needles):
            leaks.append(f"answer {answer['type']}: {answer['data']}")

    # Over HTTP, with and without the token: refused, and the answer does not echo it.
    token = api_token(h)
    async with httpx.AsyncClient(timeout=30) as web:
        for (service, path), body in ROUTES.items():
            for headers in ({}, bearer(token)):
                resp = await web.post(
                    url(stack, service, h, path), json={**body, "notes": marker}, headers=headers
                )
                assert resp.status_code in (401, 422), resp.text
                if any(n.decode() in resp.text for n in needles):
                    leaks.append(f"HTTP answer {resp.status_code}: {resp.text[:300]}")

    await settled(client, stack, [h])
    # Every refused command is erased from the stream once answered, the non-event once
    # dead-lettered. An accepted one stays as sent (free text in its envelope's extension
    # attributes included: the platform never reads them). Every event and every dead letter
    # of the whole stream must be clean, but the dead-letter copy of our non-event.
    accepted = {
        i for i, a in zip(outcome_ids, answers, strict=True) if a["type"] != "CommandRejected"
    }
    messages = await stream_messages(client)
    kept = {seq for seq, _, _ in messages}
    for seq, command_id in ours.items():
        if command_id not in accepted and seq in kept:
            leaks.append(f"refused command #{seq} ({command_id}) still in the stream")
    for seq, subject, body in messages:
        if not any(n in body for n in needles):
            continue
        if ".cmd." in subject and ours.get(seq) in accepted:
            continue
        if subject == f"post.{h}.dlq.RecordInteraction" and body.startswith(marker.encode()):
            continue
        leaks.append(f"stream #{seq} {subject}: {body[:300]!r}")
    erased = await erased_commands(stack)
    assert erased >= len(ours) - len(accepted), erased
    for path in log_files(stack):
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if any(n in line for n in needles):
                leaks.append(f"{path.name}:{number}: {line[:300]!r}")
    # Nor the planner's statistics (pg_statistic), as ANALYZE would leave them now.
    leaks += [f"pg_statistic: {s}" for s in await statistics_containing(stack.db_url, tag)]
    assert not leaks, "free text kept:\n" + "\n".join(leaks[:20])
