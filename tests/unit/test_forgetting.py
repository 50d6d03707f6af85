"""The pure part of forgetting: which stream messages a forget job erases or redacts."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

from services.referral.domain import closing_date
from services.referral.domain.forgetting import FORGET_PREFIX, Action, Job, new_forget_id
from shared.contracts import InteractionCompleted, OutreachAccepted, SupporterAssigned

P = "doc-7"
JOB = Job(
    forget_id="forgotten-abc",
    hospital="h1",
    physician_id=P,
    command_seq=50,
    referral_ids=frozenset({"r1", "r2"}),
    referred_ids=frozenset({"r3"}),
)


def body(data: dict[str, object], id_: str = "ce-1") -> bytes:
    return json.dumps({"specversion": "1.0", "id": id_, "type": "X", "data": data}).encode()


def test_the_physicians_requests_and_creations_go_and_nothing_else() -> None:
    mine = body({"referral_id": "r1", "physician_id": P, "referrer_id": "x"})
    as_referrer = body({"referral_id": "r3", "physician_id": "q", "referrer_id": P})
    later = body({"referral_id": "r9", "physician_id": P})  # referred again: a new physician
    someone_else = body({"referral_id": "r1", "physician_id": "q"})
    assert JOB.decide("post.h1.cmd.RequestReferral", 3, mine) is Action.erase
    assert JOB.decide("post.h1.cmd.RequestReferral", 4, as_referrer) is Action.erase
    assert JOB.decide("post.h1.evt.ReferralCreated", 5, mine) is Action.redact
    assert JOB.decide("post.h1.evt.ReferralCreated", 6, as_referrer) is Action.redact
    for kept in (later, someone_else, b"not json", body({"physician_id": P})):
        assert JOB.decide("post.h1.cmd.RequestReferral", 7, kept) is Action.keep
        assert JOB.decide("post.h1.evt.ReferralCreated", 7, kept) is Action.keep


def test_the_forget_command_itself_goes_but_not_a_later_one() -> None:
    forget = body({"physician_id": P, "requested_on": "2025-01-01"})
    assert JOB.decide("post.h1.cmd.ForgetPhysician", 50, forget) is Action.erase
    assert JOB.decide("post.h1.cmd.ForgetPhysician", 51, forget) is Action.keep
    other = body({"physician_id": "q", "requested_on": "2025-01-01"})
    assert JOB.decide("post.h1.cmd.ForgetPhysician", 50, other) is Action.keep
    retention = Job(**{**JOB.__dict__, "command_seq": None})
    assert "post.h1.cmd.ForgetPhysician" not in retention.subjects()
    assert JOB.decide("post.h1.cmd.ForgetPhysician", 50, forget) is Action.erase


def test_a_dead_letter_goes_when_it_holds_the_id_as_a_whole_token() -> None:
    assert JOB.decide("post.h1.dlq.RequestReferral", 9, b"junk doc-7 junk") is Action.erase
    assert JOB.decide("post.h1.dlq.RequestReferral", 9, b'{"x":"doc-7"}') is Action.erase
    assert JOB.decide("post.h1.dlq.RequestReferral", 9, b"doc-77 and xdoc-7") is Action.keep


def test_the_redacted_creation_names_the_forget_id_and_keeps_the_rest() -> None:
    data = {
        "referral_id": "r1",
        "physician_id": P,
        "referrer_id": "x",
        "safety_event_id": "ae-1",
        "department": "d",
    }
    out = json.loads(JOB.redacted(body(data, "ce-9")))
    assert out["id"] == "ce-9"
    assert out["data"] == {**data, "physician_id": "forgotten-abc", "safety_event_id": None}
    as_referrer = {"referral_id": "r3", "physician_id": "q", "referrer_id": P}
    out = json.loads(JOB.redacted(body(as_referrer)))
    assert out["data"] == {**as_referrer, "referrer_id": "forgotten-abc"}
    assert P.encode() not in JOB.redacted(body(data))


def test_forget_ids_are_new_each_time_and_valid_ids() -> None:
    ids = {new_forget_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith(FORGET_PREFIX) and len(i) <= 64 for i in ids)


def test_a_referral_closes_on_its_outreach_or_interaction_date() -> None:
    at = datetime(2025, 3, 4, 23, 30, tzinfo=UTC)
    outreach = OutreachAccepted(
        hospital="h1", referral_id="r1", supporter_id="s", at=at, department="d"
    )
    assert closing_date(outreach) == date(2025, 3, 4)
    interaction = InteractionCompleted(
        hospital="h1",
        referral_id="r1",
        supporter_id="s",
        occurred_on=date(2025, 3, 9),
        minutes=30,
        department="d",
    )
    assert closing_date(interaction) == date(2025, 3, 9)
    assigned = SupporterAssigned(
        hospital="h1",
        referral_id="r1",
        supporter_id="s",
        department="d",
        assigned_at=at,
        due_at=at,
        reason="matched",
    )
    assert closing_date(assigned) is None
