"""What `postctl demo` shows of CONTRACT 1.1 after the paper's figures: a matching policy, a
supporter's availability, a FHIR safety report and a physician forgotten — each as a hospital
sends it and as the platform answers.

Forgetting one of the study's supported physicians changes no figure either: the demo reads
the region's RE-AIM answer before and after and says so.

The policy and the availability go to a POST hospital and change no figure of the paper (the
policy is the one in force anyway, the supporter stays available, dated the day it trained).
The AdverseEvent is mapped, not sent: its referrals would join the study's."""

from __future__ import annotations

import asyncio
from datetime import date
from typing import Any

import httpx

from postctl.simulate import post_2023_scenario
from services.referral.fhir import map_adverse_event
from shared.client import PlatformClient, wait_consumed
from shared.contracts import ForgetPhysician, SetMatchingPolicy, SetSupporterAvailability

# Two involved physicians, a patient and a narrative: only the ids the contract names are read.
ADVERSE_EVENT: dict[str, Any] = {
    "resourceType": "AdverseEvent",
    "id": "ae-2022-0417",
    "text": {"status": "generated", "div": "<div>Narrative the platform never reads</div>"},
    "subject": {"reference": "Patient/never-read"},
    "recordedDate": "2022-04-17T08:30:00-07:00",
    "recorder": {"reference": "Practitioner/rn-5521"},
    "contained": [
        {
            "resourceType": "PractitionerRole",
            "id": "role-1",
            "practitioner": {"reference": "Practitioner/md-1042"},
            "code": [{"coding": [{"system": "urn:post:rank", "code": "attending"}]}],
            "specialty": [
                {"coding": [{"system": "urn:post:department", "code": "emergency-medicine"}]}
            ],
        },
        {
            "resourceType": "PractitionerRole",
            "id": "role-2",
            "practitioner": {"reference": "Practitioner/md-2210"},
            "code": [{"coding": [{"system": "urn:post:rank", "code": "resident"}]}],
            "specialty": [{"coding": [{"system": "urn:post:department", "code": "anesthesia"}]}],
        },
        {"resourceType": "Procedure", "id": "proc-1", "status": "completed"},
    ],
    "contributor": [{"reference": "#role-1"}, {"reference": "#role-2"}],
    "suspectEntity": [{"instance": {"reference": "#proc-1"}}],
}


async def run(
    nats_url: str, analytics_url: str | None = None, token: str | None = None
) -> list[str]:
    """Send the commands, map the report; returns the lines to print. With `analytics_url`,
    forget a physician of the study and compare the region's answer before and after."""
    scenario = post_2023_scenario()
    supporter = next(
        s for s in scenario.supporters if s.retired_on is None and s.hospital == "kp-hospital-a"
    )
    lines = ["", "CONTRACT 1.1, as a hospital uses it:"]
    client = await PlatformClient.connect(nats_url)
    try:
        policy = SetMatchingPolicy(policy="same_department")
        answer = await client.send_and_wait(supporter.hospital, policy, timeout=60)
        lines.append(f"  SetMatchingPolicy same_department -> {answer['type']}")
        availability = SetSupporterAvailability(
            supporter_id=supporter.supporter_id,
            available=True,
            max_open_assignments=10,
            changed_on=supporter.trained_on,  # inside the study: no period moves
        )
        answer = await client.send_and_wait(supporter.hospital, availability, timeout=60)
        lines.append(
            f"  SetSupporterAvailability {supporter.supporter_id} available, at most 10 open"
            f" -> {answer['type']}"
        )
        if analytics_url is not None:
            assert token, "reading the region's figures needs a region token"
            lines += await _forget_one(client, nats_url, analytics_url, token)
    finally:
        await client.close()
    mapped = map_adverse_event("kp-hospital-a", ADVERSE_EVENT)
    lines.append(
        "  FHIR AdverseEvent ae-2022-0417 (two involved physicians; patient and narrative never"
        " read) would become, at POST /hospitals/{h}/fhir/AdverseEvent:"
    )
    for command_id, referral in mapped.referrals:
        lines.append(
            f"    RequestReferral {referral.referral_id} ({referral.department},"
            f" {referral.rank}, {referral.event_nature}) as command {command_id}"
        )
    return lines


async def _forget_one(
    client: PlatformClient, nats_url: str, analytics_url: str, token: str
) -> list[str]:
    """Forget the first physician the study supported; the region's figures stay."""
    scenario = post_2023_scenario()
    plan = next(r for r in scenario.referrals if r.interactions)
    before = await _region(nats_url, analytics_url, token)
    forget = ForgetPhysician(physician_id=plan.physician_id, requested_on=date.today())
    answer = await client.send_and_wait(plan.hospital, forget, timeout=60)
    data = answer["data"]
    after = await _region(nats_url, analytics_url, token)
    return [
        f"  ForgetPhysician {plan.physician_id} -> {answer['type']} {data.get('forget_id')}:"
        f" {len(data.get('referral_ids', []))} referral(s) now name the forget_id, not the id",
        "  every RE-AIM figure of the region after forgetting: "
        + ("unchanged" if after == before else "CHANGED"),
    ]


async def _region(nats_url: str, analytics_url: str, token: str) -> Any:
    await wait_consumed(nats_url, "analytics")
    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {token}"}) as web:
        return (await web.get(f"{analytics_url}/reaim")).json()


def show(nats_url: str, analytics_url: str | None = None, token: str | None = None) -> None:
    print("\n".join(asyncio.run(run(nats_url, analytics_url, token))), flush=True)
