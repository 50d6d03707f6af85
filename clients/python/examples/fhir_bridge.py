"""A bridge from a safety-event system to the platform: FHIR R4 `AdverseEvent` resources in,
referrals out (CONTRACT.md "Safety events from FHIR").

    export POST_HOSPITAL=st-marys POST_API_TOKEN=...   # the hospital's HTTP token
    export POST_REFERRAL_URL=http://127.0.0.1:8001
    python fhir_bridge.py adverse-event.json [more.json ...]

Before anything leaves the hospital, it keeps only what the platform reads: the id and dates,
the recorder's reference, the contributors that reference a contained `PractitionerRole`, those
roles' practitioner, department and rank codings, and the suspect procedures. The patient,
the narrative, descriptions and notes never leave. Sending the same AdverseEvent again is safe:
the platform derives the referral and command ids from it and answers with the same ids.
Standard library only (urllib).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

FHIR_JSON = "application/fhir+json"
DEPARTMENT_SYSTEM = "urn:post:department"
RANK_SYSTEM = "urn:post:rank"


def _codings(concepts: Any, system: str) -> list[dict[str, Any]]:
    found = []
    for concept in concepts if isinstance(concepts, list) else [concepts]:
        if isinstance(concept, dict):
            for coding in concept.get("coding") or []:
                if isinstance(coding, dict) and coding.get("system") == system:
                    found.append({"system": system, "code": coding.get("code")})
    return found


def minimal(resource: dict[str, Any]) -> dict[str, Any]:
    """The AdverseEvent with only the elements the platform reads."""
    out: dict[str, Any] = {"resourceType": resource.get("resourceType"), "id": resource.get("id")}
    for key in ("recordedDate", "date"):
        if key in resource:
            out[key] = resource[key]
    recorder = resource.get("recorder")
    if isinstance(recorder, dict) and "reference" in recorder:
        out["recorder"] = {"reference": recorder["reference"]}
    contained = []
    for item in resource.get("contained") or []:
        if not isinstance(item, dict):
            continue
        if item.get("resourceType") == "PractitionerRole":
            role: dict[str, Any] = {"resourceType": "PractitionerRole", "id": item.get("id")}
            practitioner = item.get("practitioner")
            if isinstance(practitioner, dict) and "reference" in practitioner:
                role["practitioner"] = {"reference": practitioner["reference"]}
            if specialty := _codings(item.get("specialty"), DEPARTMENT_SYSTEM):
                role["specialty"] = [{"coding": specialty}]
            if rank := _codings(item.get("code"), RANK_SYSTEM):
                role["code"] = [{"coding": rank}]
            contained.append(role)
        elif item.get("resourceType") == "Procedure":
            contained.append({"resourceType": "Procedure", "id": item.get("id")})
    if contained:
        out["contained"] = contained
    contributors = [
        {"reference": c["reference"]}
        for c in resource.get("contributor") or []
        if isinstance(c, dict) and "reference" in c
    ]
    if contributors:
        out["contributor"] = contributors
    suspects = []
    for suspect in resource.get("suspectEntity") or []:
        instance = suspect.get("instance") if isinstance(suspect, dict) else None
        if isinstance(instance, dict) and "reference" in instance:
            suspects.append({"instance": {"reference": instance["reference"]}})
    if suspects:
        out["suspectEntity"] = suspects
    return out


def send(base_url: str, hospital: str, token: str, resource: dict[str, Any]) -> dict[str, Any]:
    """POST one AdverseEvent; the platform's answer (202: referrals and skipped contributors).
    A 4xx raises `urllib.error.HTTPError` (its body is a FHIR OperationOutcome)."""
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/hospitals/{hospital}/fhir/AdverseEvent",
        data=json.dumps(minimal(resource)).encode(),
        headers={"Content-Type": FHIR_JSON, "Authorization": f"Bearer {token}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    hospital = os.environ.get("POST_HOSPITAL", "")
    token = os.environ.get("POST_API_TOKEN", "")
    base_url = os.environ.get("POST_REFERRAL_URL", "http://127.0.0.1:8001")
    if not paths or not hospital or not token:
        print("usage: POST_HOSPITAL=... POST_API_TOKEN=... fhir_bridge.py FILE...", file=sys.stderr)
        return 2
    failed = 0
    for path in paths:
        with open(path) as f:
            resource = json.load(f)
        try:
            answer = send(base_url, hospital, token, resource)
        except urllib.error.HTTPError as exc:
            outcome = exc.read().decode(errors="replace")[:500]
            print(f"{path}: refused {exc.code}: {outcome}", file=sys.stderr)
            failed += 1
            continue
        for referral in answer.get("referrals", []):
            print(f"{path}: referral {referral['referral_id']} (command {referral['command_id']})")
        for skipped in answer.get("skipped", []):
            print(f"{path}: skipped {skipped['contributor']}: {skipped['reason']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
