"""Safety events from FHIR end to end, as a hospital's safety-reporting system sees it: an R4
AdverseEvent over HTTP, the referrals it becomes answered on the stream (CONTRACT.md 1.1)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from shared.client import PlatformClient
from shared.contracts import LaunchDepartment, Rank, RegisterHospital, RegisterSupporter
from tests.e2e.test_referral_e2e import barrier

pytestmark = pytest.mark.e2e

Http = Callable[..., httpx.AsyncClient]
FHIR_JSON = "application/fhir+json"
DEPARTMENTS = ("anesthesia", "emergency-medicine")


def role(id_: str, physician_id: str, department: str, rank: str) -> dict[str, Any]:
    return {
        "resourceType": "PractitionerRole",
        "id": id_,
        "practitioner": {"reference": f"Practitioner/{physician_id}"},
        "specialty": [{"coding": [{"system": "urn:post:department", "code": department}]}],
        "code": [{"coding": [{"system": "urn:post:rank", "code": rank}]}],
    }


def adverse_event(event_id: str, recorded: datetime, patient_name: str = "Ann Example") -> dict:
    """A report as a safety-reporting system sends it: two involved physicians, the patient,
    a narrative and a description (never read by the platform), a procedure under suspicion."""
    return {
        "resourceType": "AdverseEvent",
        "id": event_id,
        "text": {
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{patient_name} desaturated '
            "during induction; airway rescued after two attempts.</div>",
        },
        "actuality": "actual",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/adverse-event-category",
                        "code": "procedure-mishap",
                    }
                ]
            }
        ],
        "event": {"text": f"Failed intubation of {patient_name}"},
        "subject": {"reference": "Patient/MRN-448812", "display": patient_name},
        "date": (recorded - timedelta(minutes=30)).isoformat(),
        "recordedDate": recorded.isoformat(),
        "recorder": {"reference": "Practitioner/RISK-7"},
        "seriousness": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness",
                    "code": "serious",
                }
            ]
        },
        "contained": [
            role("anesthetist", "P-8812", "anesthesia", "attending"),
            role("resident", "P-1204", "emergency-medicine", "resident"),
            {
                "resourceType": "Procedure",
                "id": "intubation",
                "status": "completed",
                "subject": {"reference": "Patient/MRN-448812"},
            },
        ],
        "contributor": [{"reference": "#anesthetist"}, {"reference": "#resident"}],
        "suspectEntity": [{"instance": {"reference": "#intubation"}}],
    }


def referral_id(event_id: str, physician_id: str) -> str:
    return "ae-" + hashlib.sha256(f"{event_id}/{physician_id}".encode()).hexdigest()[:32]


async def onboard(client: PlatformClient, hospital: str) -> None:
    """Register, launch both departments, train a supporter in each; each answer awaited."""
    launched = datetime.now(UTC).date() - timedelta(days=60)
    commands: list[Any] = [RegisterHospital(name="St Mary", physician_count=300)]
    for number, department in enumerate(DEPARTMENTS):
        commands += [
            LaunchDepartment(department=department, physician_count=40, launched_on=launched),
            RegisterSupporter(
                supporter_id=f"S-{number}",
                department=department,
                rank=Rank.senior,
                interventional=True,
                trained_on=launched,
            ),
        ]
    for command in commands:
        answer = await client.send_and_wait(hospital, command, timeout=30)
        assert answer["type"] != "CommandRejected", answer["data"]


async def test_an_adverse_event_refers_each_involved_physician_once(
    client: PlatformClient, hospital: str, http: Http, api_token: Callable[[str], str]
) -> None:
    await onboard(client, hospital)
    token = api_token(hospital)
    recorded = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    event = adverse_event("AE-2025-0113", recorded)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}
    path = f"/hospitals/{hospital}/fhir/AdverseEvent"

    async with http("referral") as web:
        resp = await web.post(path, json=event, headers=headers)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["skipped"] == []
    expected = [referral_id("AE-2025-0113", p) for p in ("P-8812", "P-1204")]
    assert [r["referral_id"] for r in body["referrals"]] == expected
    command_ids = [r["command_id"] for r in body["referrals"]]
    assert len(set(command_ids)) == 2

    # Each is answered on the stream like any RequestReferral, and matched.
    for command_id, rid, physician, department in zip(
        command_ids, expected, ("P-8812", "P-1204"), DEPARTMENTS, strict=True
    ):
        answer = await client.outcome(command_id, timeout=30)
        assert answer["type"] == "ReferralCreated", answer["data"]
        assert answer["correlationid"] == command_id
        assert answer["data"] == {
            "hospital": hospital,
            "referral_id": rid,
            "physician_id": physician,
            "department": department,
            "rank": "attending" if physician == "P-8812" else "resident",
            "source": "safety_event",
            "event_nature": "interventional",
            "requested_at": recorded.isoformat().replace("+00:00", "Z"),
            "referrer_id": "RISK-7",
            "assign_to": None,
            "safety_event_id": "AE-2025-0113",
        }
        assigned = await client.wait_for(
            hospital, "SupporterAssigned", lambda e, r=rid: e["data"]["referral_id"] == r, 30
        )
        assert assigned["data"]["department"] == department

    # The same report again (as JSON this time): the same ids, and nothing new anywhere.
    seen = len(client.events)
    headers["Content-Type"] = "application/json"
    async with http("referral") as web:
        again = await web.post(path, json=event, headers=headers)
        assert (again.status_code, again.json()) == (202, body)
        await barrier(client, hospital)  # the referral service has handled all before it
        status = await web.get(f"/hospitals/{hospital}/referrals/{expected[0]}", headers=headers)
    assert status.status_code == 200 and status.json()["source"] == "safety_event"
    new = [e for e in client.events[seen:] if e["_subject"].startswith(f"post.{hospital}.")]
    assert [e["type"] for e in new] == ["CommandRejected"], [e["type"] for e in new]
    for command_id in command_ids:
        assert len(client.caused_by(command_id)) == 1
