"""Safety events from FHIR: the pure mapping of an R4 AdverseEvent to RequestReferrals
(services/referral/fhir.py), against CONTRACT.md 1.1, "Safety events from FHIR"."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from services.referral.fhir import (
    MAX_CONTRIBUTORS,
    Refused,
    command_id,
    map_adverse_event,
    referral_id,
)

HOSPITAL = "st-mary"
MARKER = "Jane Marker"


def role(
    id_: str,
    practitioner: str | None,
    department: str | None = "anesthesia",
    rank: str | None = "attending",
) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "PractitionerRole", "id": id_}
    if practitioner is not None:
        resource["practitioner"] = {"reference": practitioner, "display": MARKER}
    if department is not None:
        resource["specialty"] = [
            {"coding": [{"system": "http://snomed.info/sct", "code": "394577000"}]},
            {"coding": [{"system": "urn:post:department", "code": department}]},
        ]
    if rank is not None:
        resource["code"] = [{"coding": [{"system": "urn:post:rank", "code": rank}]}]
    return resource


def adverse_event(**changes: Any) -> dict[str, Any]:
    """A realistic report: two involved physicians, a patient, a narrative, a procedure."""
    event: dict[str, Any] = {
        "resourceType": "AdverseEvent",
        "id": "AE-2025-0113",
        "text": {"status": "generated", "div": f"<div>{MARKER} arrested in theatre</div>"},
        "actuality": "actual",
        "event": {"text": f"Cardiac arrest of {MARKER} during induction"},
        "subject": {"reference": "Patient/MRN-778812", "display": MARKER},
        "date": "2025-03-04T08:40:00+01:00",
        "recordedDate": "2025-03-04T09:12:00+01:00",
        "recorder": {"reference": "Practitioner/RISK-7"},
        "seriousness": {"coding": [{"code": "serious"}]},
        "contained": [
            role("r1", "Practitioner/P-8812"),
            role("r2", "Practitioner/P-1204", department="emergency-medicine", rank="resident"),
            {"resourceType": "Procedure", "id": "proc", "status": "completed", "note": MARKER},
        ],
        "contributor": [{"reference": "#r1"}, {"reference": "#r2"}],
        "suspectEntity": [{"instance": {"reference": "#proc"}}],
        "note": [{"text": MARKER}],
    }
    event.update(changes)
    return event


def test_each_contained_role_becomes_a_referral_with_the_contracts_fields() -> None:
    mapped = map_adverse_event(HOSPITAL, adverse_event())
    assert mapped.skipped == []
    assert [c.physician_id for _, c in mapped.referrals] == ["P-8812", "P-1204"]
    first = mapped.referrals[0][1]
    assert first.to_data() == {
        "referral_id": referral_id("AE-2025-0113", "P-8812"),
        "physician_id": "P-8812",
        "department": "anesthesia",
        "rank": "attending",
        "source": "safety_event",
        "event_nature": "interventional",
        "requested_at": "2025-03-04T08:12:00Z",  # recordedDate, in UTC
        "referrer_id": "RISK-7",
        "assign_to": None,
        "safety_event_id": "AE-2025-0113",
    }
    second = mapped.referrals[1][1]
    assert (second.department, second.rank) == ("emergency-medicine", "resident")


def test_ids_are_the_contracts_hash_and_repeat() -> None:
    text = b"AE-2025-0113/P-8812"
    assert referral_id("AE-2025-0113", "P-8812") == "ae-" + hashlib.sha256(text).hexdigest()[:32]
    first = map_adverse_event(HOSPITAL, adverse_event())
    again = map_adverse_event(HOSPITAL, adverse_event())
    assert first.referrals == again.referrals
    assert first.referrals[0][0] == command_id(HOSPITAL, "AE-2025-0113", "P-8812")
    # The command id carries the hospital: the stream's dedupe window spans every tenant.
    elsewhere = map_adverse_event("other-hospital", adverse_event())
    assert elsewhere.referrals[0][0] != first.referrals[0][0]
    assert elsewhere.referrals[0][1] == first.referrals[0][1]


def test_nothing_but_the_named_ids_reaches_the_commands() -> None:
    mapped = map_adverse_event(HOSPITAL, adverse_event())
    for _, command in mapped.referrals:
        text = json.dumps(command.to_data())
        assert MARKER not in text and "MRN" not in text


@pytest.mark.parametrize(
    ("changes", "requested_at"),
    [
        ({"recordedDate": None}, "2025-03-04T07:40:00Z"),  # falls back to date
        ({"recordedDate": "2025-03-04T09:12:00.123Z"}, "2025-03-04T09:12:00.123000Z"),
        ({"recordedDate": "2025-03-04T09:12:00-05:00"}, "2025-03-04T14:12:00Z"),
    ],
)
def test_requested_at_is_recorded_date_else_date(
    changes: dict[str, Any], requested_at: str
) -> None:
    event = adverse_event(**changes)
    if changes.get("recordedDate") is None:
        del event["recordedDate"]
    command = map_adverse_event(HOSPITAL, event).referrals[0][1]
    assert command.to_data()["requested_at"] == requested_at


def fields_named(refused: Refused) -> set[str]:
    return {e.removeprefix("AdverseEvent.") for i in refused.issues for e in i.expression}


@pytest.mark.parametrize(
    "value",
    [
        "2025-03-04",  # a date alone
        "2025-03-04T09:12:00",  # a time without a zone
        "2025-03",
        "2025-02-30T09:12:00Z",
        "2025-03-04T09:12Z",  # FHIR needs the seconds
        "2025-03-04 09:12:00Z",
        20250304,
        "",
    ],
)
def test_a_date_that_is_not_a_full_datetime_with_a_zone_is_refused(value: Any) -> None:
    with pytest.raises(Refused) as refused:
        map_adverse_event(HOSPITAL, adverse_event(recordedDate=value))
    assert fields_named(refused.value) == {"recordedDate"}
    assert str(value) not in json.dumps(refused.value.outcome()) or value == ""
    event = adverse_event(date=value)
    del event["recordedDate"]
    with pytest.raises(Refused) as refused:
        map_adverse_event(HOSPITAL, event)
    assert fields_named(refused.value) == {"date"}


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ([], {"resourceType"}),
        ("AdverseEvent", {"resourceType"}),
        ({**adverse_event(), "resourceType": "Patient"}, {"resourceType"}),
        ({k: v for k, v in adverse_event().items() if k != "resourceType"}, {"resourceType"}),
        ({k: v for k, v in adverse_event().items() if k != "id"}, {"id"}),
        (adverse_event(id="AE.2025.0113"), {"id"}),  # a FHIR id, but not a contract id
        (adverse_event(id=113), {"id"}),
        (
            {k: v for k, v in adverse_event().items() if k not in ("date", "recordedDate")},
            {"recordedDate", "date"},
        ),
        (adverse_event(contributor=[]), {"contributor"}),
        (adverse_event(contributor={"reference": "#r1"}), {"contributor"}),
        (
            {k: v for k, v in adverse_event().items() if k not in ("id", "date", "recordedDate")},
            {"id", "recordedDate", "date"},
        ),
    ],
)
def test_what_is_not_a_usable_adverse_event_names_its_fields(body: Any, fields: set[str]) -> None:
    with pytest.raises(Refused) as refused:
        map_adverse_event(HOSPITAL, body)
    assert refused.value.status == 422
    assert fields_named(refused.value) == fields
    outcome = refused.value.outcome()
    assert outcome["resourceType"] == "OperationOutcome"
    assert all(i["severity"] == "error" for i in outcome["issue"])
    assert MARKER not in json.dumps(outcome) and "AE.2025" not in json.dumps(outcome)


SKIPS: list[tuple[dict[str, Any], str]] = [
    (role("x", "Practitioner/P-9"), "ok"),
    ({"resourceType": "Practitioner", "id": "x"}, "not_a_contained_role"),
    (role("x", None), "no_practitioner"),
    (role("x", "#pr"), "no_practitioner"),
    (role("x", "Patient/P-9"), "no_practitioner"),
    ({**role("x", "P-9"), "practitioner": "Practitioner/P-9"}, "no_practitioner"),
    (role("x", "Practitioner/P-9", department=None), "no_department"),
    ({**role("x", "Practitioner/P-9"), "specialty": "anesthesia"}, "no_department"),
    (role("x", "Practitioner/P-9", rank=None), "no_rank"),
    (role("x", "Practitioner/P-9", rank="chief"), "no_rank"),
    (role("x", "Practitioner/Dr Jane Marker"), "invalid_id"),
    (role("x", "Practitioner/" + "p" * 65), "invalid_id"),
    (role("x", "Practitioner/P.9"), "invalid_id"),
    (role("x", "Practitioner/P-9", department="Anesthesia"), "invalid_id"),
    (role("x", "https://fhir.example.org/r4/Practitioner/P-9/_history/2"), "ok"),
]


@pytest.mark.parametrize(("contained", "reason"), SKIPS)
def test_each_contributor_is_referred_or_skipped_with_its_reason(
    contained: dict[str, Any], reason: str
) -> None:
    event = adverse_event()
    event["contained"].append(contained)
    event["contributor"].insert(1, {"reference": "#x"})
    mapped = map_adverse_event(HOSPITAL, event)
    if reason == "ok":
        assert mapped.skipped == []
        assert mapped.referrals[1][1].physician_id == "P-9"
    else:
        assert [(s.contributor, s.reason) for s in mapped.skipped] == [("#x", reason)]
        assert len(mapped.referrals) == 2


@pytest.mark.parametrize(
    ("contributor", "sent"),
    [
        ({"reference": "Practitioner/P-1"}, "Practitioner/P-1"),  # not contained
        ({"reference": "PractitionerRole/r1"}, "PractitionerRole/r1"),
        ({"reference": "#missing"}, "#missing"),
        ({"reference": "#"}, "#"),
        ({"display": MARKER}, None),
        ({"reference": 12}, None),
        ({"reference": "#\ud800"}, None),  # a lone surrogate cannot be answered in UTF-8
        ("#r1", None),
        (None, None),
    ],
)
def test_a_contributor_that_is_not_a_contained_role_is_skipped(
    contributor: Any, sent: str | None
) -> None:
    event = adverse_event(contributor=[{"reference": "#r1"}, contributor])
    mapped = map_adverse_event(HOSPITAL, event)
    assert [(s.contributor, s.reason) for s in mapped.skipped] == [(sent, "not_a_contained_role")]


def test_no_referral_at_all_is_refused_naming_the_contributors() -> None:
    event = adverse_event(contributor=[{"reference": "Practitioner/P-1"}, {"reference": "#proc"}])
    with pytest.raises(Refused) as refused:
        map_adverse_event(HOSPITAL, event)
    assert refused.value.status == 422
    expressions = [e for i in refused.value.issues for e in i.expression]
    assert expressions == [
        "AdverseEvent.contributor",
        "AdverseEvent.contributor[0]",
        "AdverseEvent.contributor[1]",
    ]
    assert "Practitioner/P-1" not in json.dumps(refused.value.outcome())


def test_too_many_contributors_are_refused_before_any_is_read() -> None:
    event = adverse_event(contributor=[{"reference": "#r1"}] * (MAX_CONTRIBUTORS + 1))
    with pytest.raises(Refused) as refused:
        map_adverse_event(HOSPITAL, event)
    assert fields_named(refused.value) == {"contributor"}
    assert refused.value.issues[0].code == "too-costly"
    at_limit = adverse_event(contributor=[{"reference": "#r1"}] * MAX_CONTRIBUTORS)
    assert len(map_adverse_event(HOSPITAL, at_limit).referrals) == 1


def test_the_same_physician_in_two_roles_is_referred_once() -> None:
    event = adverse_event()
    event["contained"].append(role("r3", "Practitioner/P-8812", department="emergency-medicine"))
    event["contributor"].append({"reference": "#r3"})
    mapped = map_adverse_event(HOSPITAL, event)
    assert [c.department for _, c in mapped.referrals] == ["anesthesia", "emergency-medicine"]
    assert mapped.skipped == []


@pytest.mark.parametrize(
    ("suspects", "nature"),
    [
        ([{"instance": {"reference": "#proc"}}], "interventional"),
        ([{"instance": {"reference": "Procedure/PR-1"}}], "interventional"),
        (
            [{"instance": {"reference": "https://fhir.example.org/Procedure/PR-1"}}],
            "interventional",
        ),
        (
            [{"instance": {"reference": "Medication/M-1"}}, {"instance": {"reference": "#proc"}}],
            "interventional",
        ),
        ([{"instance": {"reference": "Medication/M-1"}}], "other"),
        ([{"instance": {"reference": "#r1"}}], "other"),  # contained, but not a Procedure
        ([{"instance": {"reference": "#nowhere"}}], "other"),
        ([{"instance": "Procedure/PR-1"}], "other"),
        ("Procedure/PR-1", "other"),
        ([], "other"),
    ],
)
def test_event_nature_is_interventional_when_a_suspect_is_a_procedure(
    suspects: Any, nature: str
) -> None:
    mapped = map_adverse_event(HOSPITAL, adverse_event(suspectEntity=suspects))
    assert {c.event_nature for _, c in mapped.referrals} == {nature}


@pytest.mark.parametrize(
    ("recorder", "referrer"),
    [
        ({"reference": "Practitioner/RISK-7"}, "RISK-7"),
        ({"reference": "PractitionerRole/r1"}, None),
        ({"reference": "Patient/MRN-778812"}, None),
        ({"reference": "Practitioner/Dr Jane Marker"}, None),  # not an id: left out
        ({"display": MARKER}, None),
        ("Practitioner/RISK-7", None),
        (None, None),
    ],
)
def test_referrer_is_the_recorder_when_a_practitioner(recorder: Any, referrer: str | None) -> None:
    mapped = map_adverse_event(HOSPITAL, adverse_event(recorder=recorder))
    assert {c.referrer_id for _, c in mapped.referrals} == {referrer}


def test_the_patient_the_narrative_and_notes_are_not_read() -> None:
    """Whatever they hold, malformed included, the answer is the same."""
    plain = adverse_event()
    odd = copy.deepcopy(plain)
    odd.update(subject=[1, {"x": None}], text=12, description={"a": MARKER}, note="x")
    for resource in odd["contained"]:
        resource["text"] = {"div": MARKER}
    assert map_adverse_event(HOSPITAL, odd) == map_adverse_event(HOSPITAL, plain)


def test_the_ids_of_the_hospital_integration_guide() -> None:
    """docs/hospital-integration.md shows these; they must be what the intake answers."""
    guide = (Path(__file__).parents[2] / "docs" / "hospital-integration.md").read_text()
    for physician_id in ("P-8812", "P-1204"):
        assert referral_id("AE-2025-0113", physician_id) in guide
        assert command_id("st-mary", "AE-2025-0113", physician_id) in guide


def test_the_route_is_in_the_openapi_spec_with_its_schemas() -> None:
    from services.referral.app import service

    spec = service.http.openapi()
    operation = spec["paths"]["/hospitals/{hospital}/fhir/AdverseEvent"]["post"]
    assert operation["security"] == [{"hospitalToken": []}]
    request = operation["requestBody"]["content"]
    assert set(request) == {"application/fhir+json", "application/json"}
    assert {"resourceType", "id", "recordedDate", "date", "contributor"} <= set(
        request["application/fhir+json"]["schema"]["properties"]
    )
    assert {"202", "401", "403", "413", "422"} <= set(operation["responses"])
    accepted = spec["components"]["schemas"]["AdverseEventAccepted"]
    assert set(accepted["properties"]) == {"referrals", "skipped"}
    refused = operation["responses"]["422"]["content"]["application/fhir+json"]["schema"]
    assert refused["properties"]["resourceType"]["const"] == "OperationOutcome"
