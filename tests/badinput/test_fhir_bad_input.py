"""Bad input at the FHIR intake (``POST /hospitals/{h}/fhir/AdverseEvent``): every body that is
not a usable AdverseEvent is answered 4xx with a FHIR OperationOutcome naming the fields (never
their values), a caller without the hospital's token learns nothing, and none of it reaches
the stream, a table or a crash. A huge list of contributors or a huge body is refused before
anything is published. Afterwards the intake still takes a valid report."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from services.referral.fhir import MAX_BODY_BYTES, MAX_CONTRIBUTORS
from shared.client import PlatformClient
from shared.runtime import Platform
from tests.badinput import test_bad_input as bad_input
from tests.badinput.test_bad_input import (
    DEPARTMENT,
    Tenant,
    new_hospital,
    still_healthy_and_nothing_stored,
)

pytestmark = [pytest.mark.e2e, pytest.mark.badinput]

# The bad-input suite's fixture: a hospital onboarded with a department, a supporter and an
# assigned referral, and what it held before (named here so it shadows no parameter).
onboarded = bad_input.tenant

MARKER = "Jane Marker"
FHIR_JSON = "application/fhir+json"


def role(id_: str = "r1", practitioner: Any = "Practitioner/P-7") -> dict[str, Any]:
    return {
        "resourceType": "PractitionerRole",
        "id": id_,
        "practitioner": {"reference": practitioner},
        "specialty": [{"coding": [{"system": "urn:post:department", "code": DEPARTMENT}]}],
        "code": [{"coding": [{"system": "urn:post:rank", "code": "attending"}]}],
    }


def report(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "resourceType": "AdverseEvent",
        "id": "AE-bad-1",
        "subject": {"reference": "Patient/MRN-1", "display": MARKER},
        "recordedDate": "2024-03-01T09:00:00Z",
        "contained": [role()],
        "contributor": [{"reference": "#r1"}],
    }
    event.update(changes)
    return {k: v for k, v in event.items() if v is not None}


def no_dates() -> dict[str, Any]:
    return report(recordedDate=None)


# body -> the fields the OperationOutcome must name
REFUSED: dict[str, tuple[Any, set[str]]] = {
    "a Patient": (report(resourceType="Patient"), {"resourceType"}),
    "no resourceType": (report(resourceType=None), {"resourceType"}),
    "resourceType in lower case": (report(resourceType="adverseEvent"), {"resourceType"}),
    "a Bundle around it": (
        {"resourceType": "Bundle", "entry": [{"resource": report()}]},
        {"resourceType"},
    ),
    "a JSON array": ([report()], {"resourceType"}),
    "JSON null": (None, {"resourceType"}),
    "no id": (report(id=None), {"id"}),
    "an empty id": (report(id=""), {"id"}),
    "an id with a name in it": (report(id=f"AE {MARKER}"), {"id"}),
    "an id of 65 characters": (report(id="a" * 65), {"id"}),
    "an id that is a number": (report(id=7), {"id"}),
    "no dates": (no_dates(), {"recordedDate", "date"}),
    "a date alone": (report(recordedDate="2024-03-01"), {"recordedDate"}),
    "a time without a zone": (report(recordedDate="2024-03-01T09:00:00"), {"recordedDate"}),
    "only date, without a zone": ({**no_dates(), "date": "2024-03-01T09:00:00"}, {"date"}),
    "a date that is a name": (report(recordedDate=MARKER), {"recordedDate"}),
    "a date that is an object": (report(recordedDate={"value": "2024"}), {"recordedDate"}),
    "no contributor": (report(contributor=None), {"contributor"}),
    "contributor not a list": (report(contributor={"reference": "#r1"}), {"contributor"}),
    "no contained resources": (report(contained=None), {"contributor"}),
    "contained not a list": (report(contained={"r1": role()}), {"contributor"}),
    "contained of strings": (report(contained=[MARKER, 7, None]), {"contributor"}),
    "a role that is a string": (report(contained=["PractitionerRole/r1"]), {"contributor"}),
    "a role without id": (report(contained=[{**role(), "id": None}]), {"contributor"}),
    "a role's practitioner is a name": (
        report(contained=[role(practitioner=f"Practitioner/{MARKER}")]),
        {"contributor"},
    ),
    "a role's practitioner is a list": (
        report(contained=[role(practitioner=[1])]),
        {"contributor"},
    ),
    "codings that are not codings": (
        report(contained=[{**role(), "specialty": [{"coding": "urn:post:department"}]}]),
        {"contributor"},
    ),
    "a reference to a practitioner": (
        report(contributor=[{"reference": "Practitioner/P-7", "display": MARKER}]),
        {"contributor"},
    ),
    "too many contributors": (
        report(contributor=[{"reference": "#r1"}] * (MAX_CONTRIBUTORS + 1)),
        {"contributor"},
    ),
    "a huge bundle of contributors": (
        report(
            contained=[role(f"r{i}", f"Practitioner/P-{i}") for i in range(3000)],
            contributor=[{"reference": f"#r{i}"} for i in range(3000)],
        ),
        {"contributor"},
    ),
}
NOT_JSON: dict[str, bytes] = {
    "empty": b"",
    "text": f"{MARKER} fell during the night".encode(),
    "FHIR XML": b'<AdverseEvent xmlns="http://hl7.org/fhir"><id value="AE-1"/></AdverseEvent>',
    "truncated JSON": json.dumps(report()).encode()[:-5],
    "not UTF-8": b'{"resourceType": "AdverseEvent", "id": "\xff\xfe"}',
    "deeply nested": b"[" * 200_000 + b"]" * 200_000,
    "a NUL byte": b"\x00",
}


def url(stack: Platform, hospital: str) -> str:
    return (
        f"http://127.0.0.1:{stack.service_ports['referral']}/hospitals/{hospital}/fhir/AdverseEvent"
    )


def issue_fields(answer: httpx.Response) -> set[str]:
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    assert answer.headers["content-type"].startswith(FHIR_JSON)
    return {
        e.removeprefix("AdverseEvent.").split("[")[0]
        for issue in outcome["issue"]
        for e in issue["expression"]
    }


async def test_bad_adverse_events_are_refused_naming_fields_and_nothing_is_kept(
    client: PlatformClient, stack: Platform, onboarded: Tenant, api_token: Callable[[str], str]
) -> None:
    h = onboarded.hospital
    auth = {"Authorization": f"Bearer {api_token(h)}", "Content-Type": FHIR_JSON}
    wrong: list[str] = []
    async with httpx.AsyncClient(timeout=60) as web:
        for why, (body, fields) in REFUSED.items():
            resp = await web.post(url(stack, h), content=json.dumps(body), headers=auth)
            if resp.status_code != 422 or issue_fields(resp) != fields:
                wrong.append(f"{why}: {resp.status_code} {resp.text[:300]}")
            if MARKER in resp.text or "P-1" in resp.text:
                wrong.append(f"{why}: the answer echoes a value: {resp.text[:300]}")
        for why, raw in NOT_JSON.items():
            for content_type in (FHIR_JSON, "application/json", "text/plain"):
                headers = {**auth, "Content-Type": content_type}
                resp = await web.post(url(stack, h), content=raw, headers=headers)
                if resp.status_code != 422 or issue_fields(resp) != {"resourceType"}:
                    wrong.append(f"{why} as {content_type}: {resp.status_code} {resp.text[:300]}")
        # A body above the limit is refused before it is read, declared or streamed.
        padded = report(text={"div": "x" * MAX_BODY_BYTES})
        resp = await web.post(url(stack, h), content=json.dumps(padded), headers=auth)
        if resp.status_code != 413 or issue_fields(resp) != {"resourceType"}:
            wrong.append(f"a body too large: {resp.status_code} {resp.text[:300]}")

        async def chunks() -> Any:
            for _ in range(40):
                yield b" " * 65_536

        resp = await web.post(url(stack, h), content=chunks(), headers=auth)
        if resp.status_code != 413:
            wrong.append(f"a streamed body too large: {resp.status_code} {resp.text[:300]}")
    assert not wrong, "\n".join(wrong)
    await still_healthy_and_nothing_stored(client, stack, onboarded)


async def test_without_the_hospitals_token_nothing_is_read_or_done(
    client: PlatformClient, stack: Platform, onboarded: Tenant, api_token: Callable[[str], str]
) -> None:
    h, other = onboarded.hospital, new_hospital()
    other_token = api_token(other)
    body = json.dumps(report())
    refusals = {
        "no token": ({}, 401, "unauthenticated"),
        "another scheme": ({"Authorization": "Basic dXNlcjpwYXNz"}, 401, "unauthenticated"),
        "a made-up token": ({"Authorization": "Bearer post_" + "A" * 43}, 401, "unauthenticated"),
        "another hospital's": ({"Authorization": f"Bearer {other_token}"}, 403, "forbidden"),
    }
    async with httpx.AsyncClient(timeout=60) as web:
        for why, (headers, status, reason) in refusals.items():
            for content in (body, "not JSON at all", json.dumps(report(id=None))):
                resp = await web.post(
                    url(stack, h), content=content, headers={**headers, "Content-Type": FHIR_JSON}
                )
                assert (resp.status_code, resp.json()["reason_code"]) == (status, reason), why
        # A hospital that does not exist is answered the same.
        resp = await web.post(url(stack, new_hospital()), content=body)
        assert resp.status_code == 401
    await still_healthy_and_nothing_stored(client, stack, onboarded, others=[other])

    # The hospital's own token: a skipped contributor is answered beside the referral.
    event = report(
        # A lone surrogate (JSON allows it, UTF-8 does not) is answered as null.
        contributor=[
            {"reference": "#r1"},
            {"reference": "Practitioner/P-8"},
            {"reference": "#\ud800"},
        ],
        recordedDate="2024-03-01T10:00:00+01:00",
    )
    async with httpx.AsyncClient(timeout=60) as web:
        resp = await web.post(
            url(stack, h),
            content=json.dumps(event),
            headers={"Authorization": f"Bearer {api_token(h)}", "Content-Type": FHIR_JSON},
        )
    assert resp.status_code == 202, resp.text
    answer = resp.json()
    assert answer["skipped"] == [
        {"contributor": "Practitioner/P-8", "reason": "not_a_contained_role"},
        {"contributor": None, "reason": "not_a_contained_role"},
    ]
    (referral,) = answer["referrals"]
    created = await client.outcome(referral["command_id"], timeout=30)
    assert created["type"] == "ReferralCreated", created["data"]
    assert created["data"]["referral_id"] == referral["referral_id"]
