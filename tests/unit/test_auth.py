"""Per-hospital API tokens (shared/auth.py): issuing, storing, checking, and the HTTP answers.

No servers: the services' FastAPI apps are built without starting them, and only their
refusals (which come before any database work) and a stand-in route are called.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends
from hypothesis import given, settings
from hypothesis import strategies as st

from postctl import cli
from shared import auth
from shared.service import Service


@pytest.fixture
def tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "data" / "api-tokens.json"
    monkeypatch.setenv(auth.TOKENS_FILE_VARIABLE, str(path))
    return path


def test_the_tokens_file_defaults_to_the_data_dir_and_the_variable_wins() -> None:
    assert auth.tokens_file({"POST_DATA_DIR": "/srv/post"}) == Path("/srv/post/api-tokens.json")
    chosen = {"POST_DATA_DIR": "/srv/post", "POST_API_TOKENS_FILE": "/run/secrets/t.json"}
    assert auth.tokens_file(chosen) == Path("/run/secrets/t.json")
    assert auth.tokens_file({}) == Path.cwd() / ".post-data" / "api-tokens.json"


def test_only_the_hash_is_stored_in_a_private_file(tokens: Path) -> None:
    token = auth.issue_token("st-mary")
    assert token.startswith("post_") and len(token) > 40
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    text = tokens.read_text()
    assert token not in text and token[5:] not in text
    stored = json.loads(text)
    assert stored["format"] == "post-api-tokens/1"
    assert stored["hospitals"]["st-mary"]["sha256"] == auth.hash_token(token)
    assert auth.issue_token("st-mary") != token  # random each time


def test_a_valid_token_of_its_own_hospital_only(tokens: Path) -> None:
    mary, john = auth.issue_token("st-mary"), auth.issue_token("st-john")
    store = auth.TokenStore(tokens)
    assert store.check("st-mary", mary) is None
    assert store.check("st-john", john) is None
    assert store.check("st-mary", john) == "forbidden"
    assert store.check("st-mary", None) == "unauthenticated"
    assert store.check("st-mary", "") == "unauthenticated"
    assert store.check("st-mary", mary + "x") == "unauthenticated"
    assert store.check("st-mary", auth.hash_token(mary)) == "unauthenticated"  # not the hash
    assert store.check("nowhere", mary) == "forbidden"


def test_issuing_again_replaces_the_token_without_a_restart(tokens: Path) -> None:
    old = auth.issue_token("st-mary")
    john = auth.issue_token("st-john")
    store = auth.TokenStore(tokens)
    assert store.check("st-mary", old) is None
    new = auth.issue_token("st-mary")
    assert store.check("st-mary", old) == "unauthenticated"
    assert store.check("st-mary", new) is None
    assert store.check("st-john", john) is None  # the others' tokens stay
    assert auth.revoke_token("st-mary") is True
    assert store.check("st-mary", new) == "unauthenticated"
    assert auth.revoke_token("st-mary") is False


def test_no_file_means_no_valid_token_and_a_broken_one_fails_closed(tokens: Path) -> None:
    store = auth.TokenStore(tokens)
    assert store.check("st-mary", "post_anything") == "unauthenticated"
    token = auth.issue_token("st-mary")
    assert store.check("st-mary", token) is None
    tokens.write_text('{"format": "post-api-tokens/1", "hospitals": {"st-mary": ')
    assert store.check("st-mary", token) == "unauthenticated"
    with pytest.raises(ValueError, match="not a tokens file"):
        auth.issue_token("st-john")  # and issuing does not overwrite what it cannot read
    tokens.unlink()
    token = auth.issue_token("st-mary")
    assert store.check("st-mary", token) is None


@pytest.mark.parametrize("bad", ["St-Mary", "-mary", "st_mary", "", "a" * 64, "st mary"])
def test_a_token_is_only_for_a_hospital_slug(bad: str, tokens: Path) -> None:
    with pytest.raises(ValueError, match="slug"):
        auth.issue_token(bad)


def test_concurrent_issuers_lose_nothing(tokens: Path) -> None:
    issued: dict[str, str] = {}

    def issue(hospital: str) -> None:
        issued[hospital] = auth.issue_token(hospital)

    threads = [threading.Thread(target=issue, args=(f"h-{i}",)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = auth.TokenStore(tokens)
    assert all(store.check(h, token) is None for h, token in issued.items())
    assert not [p for p in tokens.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def one_token(tmp_path_factory: pytest.TempPathFactory) -> tuple[auth.TokenStore, str]:
    path = tmp_path_factory.mktemp("tokens") / "api-tokens.json"
    return auth.TokenStore(path), auth.issue_token("st-mary", path)


@settings(max_examples=200, deadline=None)
@given(guess=st.one_of(st.text(max_size=80), st.from_regex(r"\Apost_[A-Za-z0-9_-]{43}\Z")))
def test_no_other_string_passes_for_a_token(
    one_token: tuple[auth.TokenStore, str], guess: str
) -> None:
    store, token = one_token
    assert store.check("st-mary", guess) == (None if guess == token else "unauthenticated")
    assert store.check("st-mary", token) is None


# --- the HTTP answers -------------------------------------------------------------------------


def _client(app: Any) -> httpx.AsyncClient:
    # ASGI in-process, without the lifespan: the service is not started, no servers needed.
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _app_with_a_protected_route() -> httpx.AsyncClient:
    router = APIRouter()

    @router.post(
        "/hospitals/{hospital}/things", dependencies=[Depends(auth.require_hospital_token)]
    )
    async def change(hospital: str) -> dict[str, str]:
        return {"changed": hospital}

    @router.get("/hospitals/{hospital}/things")
    async def read(hospital: str) -> dict[str, str]:
        return {"read": hospital}

    return _client(Service("referral", routers=[router]).http)


async def test_the_dependency_answers_401_403_or_lets_through(tokens: Path) -> None:
    mary = auth.issue_token("st-mary")
    john = auth.issue_token("st-john")
    async with _app_with_a_protected_route() as web:

        async def post(hospital: str, authorization: str | None) -> tuple[int, Any, str]:
            headers = {"Authorization": authorization} if authorization is not None else {}
            resp = await web.post(f"/hospitals/{hospital}/things", headers=headers)
            return resp.status_code, resp.json(), resp.headers.get("www-authenticate", "")

        assert (await post("st-mary", f"Bearer {mary}"))[:2] == (200, {"changed": "st-mary"})
        assert (await post("st-mary", f"bearer {mary}"))[0] == 200  # scheme: any case
        for authorization in (None, "", f"Basic {mary}", "Bearer", f"Bearer {mary}x", mary):
            status, body, challenge = await post("st-mary", authorization)
            assert status == 401 and body["reason_code"] == "unauthenticated"
            assert challenge.startswith("Bearer")
            assert mary not in json.dumps(body)
        status, body, challenge = await post("st-mary", f"Bearer {john}")
        assert (status, body["reason_code"], challenge) == (403, "forbidden", "")
        assert (await post("Not_A_Slug", f"Bearer {mary}"))[0] == 403
        # Reads stay open.
        assert (await web.get("/hospitals/st-mary/things")).status_code == 200


async def test_the_intakes_refuse_before_reading_the_body(tokens: Path) -> None:
    from services.records.app import service as records
    from services.referral.app import service as referral

    john = auth.issue_token("st-john")
    for service, paths in (
        (referral, ["referrals"]),
        (records, ["outreach", "interactions", "surveys"]),
    ):
        async with _client(service.http) as web:  # a refusal needs no database
            for path in paths:
                resp = await web.post(f"/hospitals/st-mary/{path}", content=b"{not json")
                assert resp.status_code == 401, resp.text
                assert resp.json()["reason_code"] == "unauthenticated"
                resp = await web.post(
                    f"/hospitals/st-mary/{path}",
                    json={},
                    headers={"Authorization": f"Bearer {john}"},
                )
                assert resp.status_code == 403 and resp.json()["reason_code"] == "forbidden"


def test_openapi_shows_the_bearer_scheme_on_the_routes_that_change_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("POST_TEST_CLOCK", raising=False)
    from services.analytics.app import service as analytics
    from services.matching.app import service as matching
    from services.records.app import service as records
    from services.referral.app import service as referral

    protected = set()
    for service in (referral, records, matching, analytics):
        spec = service.http.openapi()
        for path, operations in spec["paths"].items():
            if path == "/admin/clock":
                continue  # only with POST_TEST_CLOCK=1: see the test below
            for method, operation in operations.items():
                secured = operation.get("security") == [{auth.SCHEME_NAME: []}]
                if method in ("post", "put", "patch", "delete"):
                    assert secured, f"{service.name}: {method.upper()} {path} is not protected"
                    assert {"401", "403"} <= set(operation["responses"])
                    protected.add(f"{service.name} {path}")
                else:
                    assert not secured, f"{service.name}: {method.upper()} {path}"
        if any(p.startswith(service.name) for p in protected):
            scheme = spec["components"]["securitySchemes"][auth.SCHEME_NAME]
            assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert protected == {
        "referral /hospitals/{hospital}/referrals",
        "referral /hospitals/{hospital}/fhir/AdverseEvent",
        "records /hospitals/{hospital}/outreach",
        "records /hospitals/{hospital}/interactions",
        "records /hospitals/{hospital}/surveys",
    }


def test_the_test_clock_route_exists_only_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POST_TEST_CLOCK", raising=False)
    assert "/admin/clock" not in Service("referral").http.openapi()["paths"]
    monkeypatch.setenv("POST_TEST_CLOCK", "1")
    assert "/admin/clock" in Service("referral").http.openapi()["paths"]


def test_postctl_hospital_token_prints_it_once_and_keeps_its_hash(
    tokens: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli.main(["hospital", "token", "st-mary"])
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("post_") and "\n" not in token
    assert "Authorization: Bearer" in err and str(tokens) in err
    assert auth.TokenStore(tokens).check("st-mary", token) is None
    other = tokens.parent / "elsewhere.json"
    cli.main(["hospital", "token", "st-mary", "--file", str(other)])
    assert auth.TokenStore(other).check("st-mary", capsys.readouterr().out.strip()) is None
    cli.main(["hospital", "token", "st-mary", "--revoke"])
    assert auth.TokenStore(tokens).check("st-mary", token) == "unauthenticated"
    with pytest.raises(SystemExit, match="slug"):
        cli.main(["hospital", "token", "Not_A_Slug"])
    assert os.environ[auth.TOKENS_FILE_VARIABLE] == str(tokens)
