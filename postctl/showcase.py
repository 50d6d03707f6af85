"""What `postctl demo` shows of CONTRACT 1.1 after the paper's figures: a matching policy, a
supporter's availability, and a FHIR safety report — each as a hospital sends it and as the
platform answers.

The policy and the availability go to a POST hospital and change no figure of the paper (the
policy is the one in force anyway, the supporter stays available, dated the day it trained).
The AdverseEvent is mapped, not sent: its referrals would join the study's."""

from __future__ import annotations

import asyncio
from typing import Any

from postctl.simulate import post_2023_scenario
from services.referral.fhir import map_adverse_event
from shared.client import PlatformClient
from shared.contracts import SetMatchingPolicy, SetSupporterAvailability

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


async def run(nats_url: str) -> list[str]:
    """Send the two commands, map the report; returns the lines to print."""
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


def show(nats_url: str) -> None:
    print("\n".join(asyncio.run(run(nats_url))), flush=True)
