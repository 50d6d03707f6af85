"""Limits before decoding (shared/limits.py) and refusals that repeat nothing sent
(shared/contracts/, shared/http.py): no recursion, no echo, a reason code for each."""

from __future__ import annotations

import json
import random
import sys

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict

from shared import limits
from shared.contracts import (
    ReasonCode,
    RecordInteraction,
    Rejected,
    Unanswerable,
    encode,
    make_cloudevent,
    parse_envelope,
    parse_payload,
    top_level_id,
    usable_id,
)
from shared.http import install_error_handlers, read_command

MARKER = "Dr Jane Marker"
DEEP = 10_000  # far past Python's recursion limit
INTERACTION = {
    "referral_id": "r-1",
    "supporter_id": "s-1",
    "occurred_on": "2024-03-02",
    "minutes": 30,
}


def envelope(data: object = None, **attributes: object) -> dict[str, object]:
    ce = make_cloudevent(type_="RecordInteraction", source="/hospitals/h/x", data={}, id_="cmd-1")
    ce["data"] = INTERACTION if data is None else data
    ce.update(attributes)
    return ce


def deep(levels: int, open_: str = "[", close: str = "]") -> str:
    return open_ * levels + close * levels


def test_depth_is_counted_without_recursion_and_strings_do_not_count() -> None:
    assert sys.getrecursionlimit() < DEEP
    assert limits.nesting_depth(deep(DEEP).encode()) == DEEP
    assert limits.nesting_depth(b"[" * DEEP) == DEEP  # unclosed: the decoder recursed as deep
    assert limits.nesting_depth(b'{"a": "[[[[{{{{", "b": [1, {"c": "]]]\\"[["}]}') == 3
    assert limits.nesting_depth(b"{}" * 1000) == 1
    assert limits.nesting_depth(deep(DEEP).encode(), stop_above=16) == 17
    assert limits.nesting_depth(b"") == 0


def test_a_valid_command_is_far_within_the_limits() -> None:
    body = encode(envelope())
    assert len(body) < limits.COMMAND.max_bytes // 20
    assert limits.nesting_depth(body) == 2
    limits.check(body, limits.COMMAND)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (json.loads(deep(200)), ReasonCode.payload_too_deep),
        ({"x": "a" * (70 * 1024)}, ReasonCode.payload_too_large),
    ],
    ids=["deep", "large"],
)
def test_a_command_beyond_a_limit_is_answered_under_its_id(data: object, reason: str) -> None:
    body = encode(envelope(data))
    assert top_level_id(body) == "cmd-1"
    with pytest.raises(Rejected) as refused:
        parse_envelope(body)
    assert refused.value.reason_code == reason
    assert "cmd-1" not in refused.value.detail and "a" * 10 not in refused.value.detail


def test_ten_thousand_levels_deep_is_answered_not_a_recursion_error() -> None:
    body = b'{"specversion":"1.0","id":"deep-1","data":' + deep(DEEP).encode() + b"}"
    with pytest.raises(RecursionError):
        json.loads(body)  # what the platform did before: a crash, retried for minutes
    with pytest.raises(Rejected) as refused:
        parse_envelope(body)
    assert refused.value.reason_code == ReasonCode.payload_too_deep
    assert top_level_id(body) == "deep-1"
    # Without an id there is nothing to answer to: a dead letter.
    with pytest.raises(Unanswerable):
        parse_envelope(deep(DEEP).encode())


def test_the_top_level_id_is_the_one_a_decoder_reads() -> None:
    cases = {
        b'{"id": "a"}': "a",
        b'{"data": {"id": "inner"}, "id": "outer"}': "outer",
        b'{"id": "first", "id": "last"}': "last",  # json.loads keeps the last
        b'{"\\u0069d": "escaped"}': "escaped",
        b'{"x": ["id", "no"], "y": "id", "id": "yes"}': "yes",
        b'{"id": "a\\"b"}': 'a"b',
        b'{"id": 7}': None,
        b'{"id": ""}': None,  # not usable
        b'{"id": "x\\u0000y"}': None,  # a control character: not usable
        b'["id", "x"]': None,
        b'"id"': None,
        b"": None,
        b'{"id": "\xff"}': None,  # not UTF-8
    }
    for body, expected in cases.items():
        assert top_level_id(body) == expected, body
        try:
            decoded = json.loads(body)
        except ValueError:
            continue
        if expected is not None:
            assert decoded["id"] == expected


def test_top_level_id_agrees_with_the_decoder_on_random_envelopes() -> None:
    rng = random.Random(21)
    alphabet = ['"', "\\", "[", "]", "{", "}", ":", ",", "id", "a", "é", " "]
    for _ in range(2000):
        noise = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        ce = {"k": noise, "id": f"id-{rng.randint(0, 99)}", rng.choice(["x", "id"]): noise}
        body = json.dumps(ce, ensure_ascii=rng.random() < 0.5).encode()
        decoded = json.loads(body)["id"]
        assert top_level_id(body) == (decoded if usable_id(decoded) else None), body


def test_an_envelope_refuses_unknown_attributes_by_count_never_by_name() -> None:
    body = encode(envelope(**{MARKER: 1, "comment": MARKER}))
    with pytest.raises(Rejected) as refused:
        parse_envelope(body)
    assert refused.value.reason_code == ReasonCode.unknown_field
    assert refused.value.detail == "envelope has 2 unknown attributes"
    known = envelope(
        dataschema="urn:x",
        subject="s",
        correlationid="c",
        causationid="c",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate="vendor=1",
    )
    assert parse_envelope(encode(known)).id == "cmd-1"


def test_a_payload_refusal_names_positions_and_rules_never_what_was_sent() -> None:
    with pytest.raises(Rejected) as refused:
        parse_payload(RecordInteraction, {**INTERACTION, MARKER: MARKER, "notes": 1})
    assert refused.value.detail == "data has 2 unknown fields"
    with pytest.raises(Rejected) as refused:
        parse_payload(RecordInteraction, {**INTERACTION, "minutes": 601})
    assert refused.value.reason_code == ReasonCode.invalid_payload
    assert refused.value.detail.startswith("data.minutes: ")
    assert "601" not in refused.value.detail
    with pytest.raises(Rejected) as refused:
        parse_payload(RecordInteraction, {**INTERACTION, "referral_id": MARKER})
    assert MARKER not in refused.value.detail and "data.referral_id" in refused.value.detail


def test_a_body_that_is_not_utf8_is_not_decoded_another_way() -> None:
    # json.loads on bytes also reads UTF-16; the limits measured UTF-8.
    body = json.dumps(envelope()).encode("utf-16")
    json.loads(body)
    with pytest.raises(Unanswerable):
        parse_envelope(body)


# --- over HTTP ----------------------------------------------------------------------------------


class Typed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float


def http_app() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/hospitals/{hospital}/interactions")
    async def intake(hospital: str, request: Request) -> dict[str, str]:
        command = await read_command(request, RecordInteraction)
        return {"referral_id": command.referral_id}

    @app.post("/typed")
    async def typed(body: Typed) -> dict[str, float]:
        return {"seconds": body.seconds}

    @app.post("/hospitals/{hospital}/fhir/AdverseEvent")
    async def fhir(request: Request) -> dict[str, int]:
        return {"read": len(await request.body())}

    return TestClient(app, raise_server_exceptions=False)


def test_http_bodies_beyond_a_limit_are_refused_before_anything_decodes_them() -> None:
    web = http_app()
    for path in ("/hospitals/h/interactions", "/typed"):
        resp = web.post(path, content=deep(DEEP).encode())
        assert (resp.status_code, resp.json()["reason_code"]) == (422, "payload_too_deep")
        resp = web.post(path, content=b'{"x": "' + b"a" * (65 * 1024) + b'"}')
        assert (resp.status_code, resp.json()["reason_code"]) == (413, "payload_too_large")

        def chunks() -> object:
            for _ in range(20):
                yield b" " * 8192

        resp = web.post(path, content=chunks())  # streamed: no Content-Length
        assert (resp.status_code, resp.json()["reason_code"]) == (413, "payload_too_large")
        resp = web.post(path, content=json.dumps(INTERACTION).encode("utf-16"))
        assert (resp.status_code, resp.json()["reason_code"]) == (422, "invalid_payload")
    ok = web.post("/hospitals/h/interactions", json=INTERACTION)
    assert ok.status_code == 200 and ok.json() == {"referral_id": "r-1"}
    assert web.post("/typed", json={"seconds": 1}).json() == {"seconds": 1}
    # A FHIR route reads and limits its body itself (services/referral/views.py).
    assert web.post("/hospitals/h/fhir/AdverseEvent", content=b"[" * 100).json() == {"read": 100}


def test_http_refusals_repeat_no_name_and_no_value_that_was_sent() -> None:
    web = http_app()
    resp = web.post("/typed", json={"seconds": MARKER, MARKER: MARKER})
    assert resp.status_code == 422
    assert resp.json() == {"reason_code": "unknown_field", "detail": "body has 1 unknown field"}
    resp = web.post("/typed", json={"seconds": MARKER})
    assert resp.json()["reason_code"] == "invalid_payload"
    assert resp.json()["detail"].startswith("body.seconds: "), resp.json()
    assert MARKER not in resp.text
    resp = web.post("/typed", json={"seconds": {MARKER: 1}})
    assert MARKER not in resp.text and resp.status_code == 422
    resp = web.post("/hospitals/h/interactions", json={**INTERACTION, MARKER: 1, "minutes": 601})
    assert resp.json() == {"reason_code": "unknown_field", "detail": "data has 1 unknown field"}
    resp = web.post("/hospitals/h/interactions", json={**INTERACTION, "minutes": MARKER})
    assert resp.status_code == 422 and MARKER not in resp.text


def test_the_intakes_declare_their_limits_in_openapi() -> None:
    from services.records.app import service as records
    from services.referral.app import service as referral

    for svc, paths in (
        (referral, ["/hospitals/{hospital}/referrals"]),
        (
            records,
            [f"/hospitals/{{hospital}}/{p}" for p in ("outreach", "interactions", "surveys")],
        ),
    ):
        spec = svc.http.openapi()
        for path in paths:
            operation = spec["paths"][path]["post"]
            assert "413" in operation["responses"] and "422" in operation["responses"], path
            described = operation["requestBody"]["description"]
            assert "payload_too_large" in described and "payload_too_deep" in described
            assert str(limits.COMMAND.max_bytes) in described
