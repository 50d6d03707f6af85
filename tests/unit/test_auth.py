"""API tokens (shared/auth.py): a hospital's and a region's; issuing, storing, checking, the
HTTP answers of every route of the four services, the OpenAPI schemes and the access log.

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

    @router.get(
        "/hospitals/{hospital}/things", dependencies=[Depends(auth.require_hospital_reader)]
    )
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
        # A read needs a token too (its hospital's or a region's).
        assert (await web.get("/hospitals/st-mary/things")).status_code == 401
        read = await web.get(
            "/hospitals/st-mary/things", headers={"Authorization": f"Bearer {mary}"}
        )
        assert read.json() == {"read": "st-mary"}


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


# --- every route of the four services ----------------------------------------------------------

# Open: not a hospital's data (operations, the spec, the dashboard page and its files).
OPEN = {
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/",
    "/static/{name}",
    "/admin/clock",
}
HOSPITAL_READS = {
    "referral /hospitals/{hospital}/referrals/{referral_id}",
    "matching /hospitals/{hospital}/departments",
    "matching /hospitals/{hospital}/supporters",
    "analytics /reaim/{hospital}",
    "analytics /reaim/{hospital}/{department}",
    "analytics /hospitals/{hospital}",
}
REGION_READS = {"analytics /reaim", "analytics /reaim-hospitals", "analytics /hospitals"}
CHANGES = {
    "referral /hospitals/{hospital}/referrals",
    "referral /hospitals/{hospital}/fhir/AdverseEvent",
    "records /hospitals/{hospital}/outreach",
    "records /hospitals/{hospital}/interactions",
    "records /hospitals/{hospital}/surveys",
}
RULE = {
    auth.require_hospital_token: "changes",
    auth.require_hospital_reader: "hospital",
    auth.require_region_token: "region",
    auth.require_any_token: "any",
}


def _services(monkeypatch: pytest.MonkeyPatch) -> list[Service]:
    monkeypatch.setenv("POST_TEST_CLOCK", "1")  # /admin/clock too: it must stay open
    from services.analytics.app import service as analytics
    from services.matching.app import service as matching
    from services.records.app import service as records
    from services.referral.app import service as referral

    return [referral, records, matching, analytics]


def _flat(routes: list[Any]) -> list[Any]:
    """The routes with the included routers' own (FastAPI keeps an included router whole)."""
    flat = []
    for route in routes:
        included = getattr(route, "original_router", None)
        flat += _flat(included.routes) if included is not None else [route]
    return flat


def _routes(service: Service) -> list[tuple[str, str, str | None]]:
    """(method, path, rule) of every route of the app; rule None when it needs no token."""
    found = []
    for route in _flat(service.http.routes):
        path = str(getattr(route, "path", ""))
        rules = {
            RULE[d.call]
            for d in getattr(getattr(route, "dependant", None), "dependencies", [])
            if d.call in RULE
        }
        assert len(rules) <= 1, (service.name, path, rules)
        assert auth.guarded(route) == bool(rules), (service.name, path)
        rule = next(iter(rules), None)
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                found.append((method, path, rule))
    return found


def test_every_route_of_every_service_needs_its_token_but_the_open_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Enumerated from the apps themselves: a route added later falls under these rules too.
    seen: dict[str, set[str]] = {"changes": set(), "hospital": set(), "region": set()}
    for service in _services(monkeypatch):
        for method, path, rule in _routes(service):
            where = f"{service.name} {path}"
            if path in OPEN:
                assert rule is None, f"{where} is open by design"
                continue
            assert rule is not None, f"{method} {where} needs no token"
            if path == "/whoami":
                assert rule == "any"
                continue
            if method != "GET":
                assert rule == "changes", f"{method} {where}: a hospital's own token only"
            else:
                assert rule == ("hospital" if "{hospital}" in path else "region"), where
            seen[rule].add(where)
    assert seen == {"changes": CHANGES, "hospital": HOSPITAL_READS, "region": REGION_READS}


def test_openapi_declares_the_schemes_on_every_protected_route(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    schemes = {
        "changes": [{auth.SCHEME_NAME: []}],
        "hospital": [{auth.SCHEME_NAME: []}, {auth.REGION_SCHEME_NAME: []}],
        "region": [{auth.REGION_SCHEME_NAME: []}],
        "any": [{auth.SCHEME_NAME: []}, {auth.REGION_SCHEME_NAME: []}],
    }
    for service in _services(monkeypatch):
        spec = service.http.openapi()
        for method, path, rule in _routes(service):
            operation = spec["paths"].get(path, {}).get(method.lower())
            if operation is None:
                assert path in OPEN, path  # only the open pages are out of the spec
                continue
            assert operation.get("security") == (schemes[rule] if rule else None), (method, path)
            if rule:
                refusals = {"401"} if rule == "any" else {"401", "403"}
                assert refusals <= set(operation["responses"]), (method, path)
        declared = spec["components"]["securitySchemes"]
        for name in (auth.SCHEME_NAME, auth.REGION_SCHEME_NAME):
            assert declared[name]["type"] == "http" and declared[name]["scheme"] == "bearer"


def _concrete(path: str, hospital: str = "st-mary") -> str:
    return path.format(hospital=hospital, referral_id="r-1", department="icu")


async def test_every_protected_route_refuses_before_anything_else(
    tokens: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """401 for no token, another scheme or an unknown one; 403 for another hospital's token
    and for a region token where state changes; all of it before any database work (the
    services are not even started), with one http_access line each."""
    from structlog.testing import capture_logs

    mary, john = auth.issue_token("st-mary"), auth.issue_token("st-john")
    region = auth.issue_region_token("grafana")
    checked = 0
    for service in _services(monkeypatch):
        async with _client(service.http) as web:
            for method, path, rule in _routes(service):
                if rule is None:
                    continue
                url = _concrete(path)
                expected: list[tuple[dict[str, str], int, str | None]] = [
                    ({}, 401, None),
                    ({"Authorization": f"Basic {mary}"}, 401, None),
                    ({"Authorization": "Bearer post_" + "A" * 43}, 401, None),
                    ({"Authorization": f"Bearer {auth.hash_token(mary)}"}, 401, None),
                ]
                if rule in ("changes", "hospital"):
                    expected.append(({"Authorization": f"Bearer {john}"}, 403, "hospital:st-john"))
                if rule == "region":
                    expected.append(({"Authorization": f"Bearer {mary}"}, 403, "hospital:st-mary"))
                if rule == "changes":
                    expected.append(({"Authorization": f"Bearer {region}"}, 403, "region:grafana"))
                for headers, status, holder in expected:
                    with capture_logs() as logs:
                        resp = await web.request(method, url, headers=headers, content=b"{no")
                    reason = "unauthenticated" if status == 401 else "forbidden"
                    assert (resp.status_code, resp.json()["reason_code"]) == (status, reason), (
                        method,
                        url,
                        headers,
                    )
                    assert ("www-authenticate" in resp.headers) == (status == 401)
                    access = [line for line in logs if line["event"] == "http_access"]
                    assert access == [
                        {
                            "event": "http_access",
                            "log_level": "info",
                            "time": access[0]["time"],
                            "service": service.name,
                            "holder": holder,
                            "method": method,
                            "route": path,
                            "status": status,
                        }
                    ], (method, url)
                    assert not any(t in json.dumps(logs) for t in (mary, john, region))
                    checked += 1
    assert checked >= 5 * 6 + 6 * 5 + 2 * 5


async def test_the_open_routes_need_no_token_and_write_no_access_line(
    tokens: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from structlog.testing import capture_logs

    from services.analytics.app import service as analytics

    async with _client(analytics.http) as web:
        with capture_logs() as logs:
            for path in ("/", "/static/dashboard.js", "/openapi.json", "/docs", "/healthz"):
                assert (await web.get(path)).status_code == 200, path
            assert (await web.get("/metrics")).status_code == 200
        assert not [line for line in logs if line["event"] == "http_access"]


def test_the_access_line_is_written_whatever_the_log_level() -> None:
    """An audit record: a service logging at `warning` still writes it (and nothing else)."""
    import subprocess
    import sys

    script = (
        "from shared.observability import configure_logging\n"
        "configure_logging('referral', 'warning')\n"
        "import structlog\n"
        "from shared.auth import access_log\n"
        "structlog.get_logger().info('an_info_line')\n"
        "access_log.info('http_access', route='/reaim', status=200)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(e["event"], e["service"], e["status"]) for e in lines] == [
        ("http_access", "referral", 200)
    ]


async def test_whoami_names_the_holder(tokens: Path) -> None:
    mary, region = auth.issue_token("st-mary"), auth.issue_region_token("director-east")
    async with _client(Service("referral").http) as web:
        for token, answer in (
            (mary, {"holder": "hospital:st-mary", "kind": "hospital", "name": "st-mary"}),
            (region, {"holder": "region:director-east", "kind": "region", "name": "director-east"}),
        ):
            resp = await web.get("/whoami", headers={"Authorization": f"Bearer {token}"})
            assert resp.json() == answer
        assert (await web.get("/whoami")).status_code == 401


# --- region tokens -------------------------------------------------------------------------------


def test_a_region_token_is_stored_as_a_hash_beside_the_hospitals(tokens: Path) -> None:
    mary = auth.issue_token("st-mary")
    region = auth.issue_region_token("grafana")
    stored = json.loads(tokens.read_text())
    assert stored["format"] == "post-api-tokens/1"
    assert stored["regions"]["grafana"]["sha256"] == auth.hash_token(region)
    assert region not in tokens.read_text() and stat.S_IMODE(tokens.stat().st_mode) == 0o600
    store = auth.TokenStore(tokens)
    assert store.identify(region) == auth.Holder("region", "grafana")
    assert store.identify(mary) == auth.Holder("hospital", "st-mary")
    assert store.identify(None) is None and store.identify(region + "x") is None
    # A region token is no hospital's own: the routes that change state refuse it (403).
    assert store.check("st-mary", region) == "forbidden"
    with pytest.raises(ValueError, match="slug"):
        auth.issue_region_token("Grafana Cloud")


def test_the_first_files_without_regions_are_still_read(tokens: Path) -> None:
    digest = auth.hash_token("post_old")
    tokens.parent.mkdir(parents=True)
    tokens.write_text(
        json.dumps({"format": "post-api-tokens/1", "hospitals": {"st-mary": {"sha256": digest}}})
    )
    store = auth.TokenStore(tokens)
    assert store.identify("post_old") == auth.Holder("hospital", "st-mary")
    region = auth.issue_region_token("grafana")  # adds regions, keeps the hospital
    assert store.identify(region) == auth.Holder("region", "grafana")
    assert store.identify("post_old") == auth.Holder("hospital", "st-mary")


def test_a_replaced_or_revoked_region_token_is_refused_at_the_next_request(tokens: Path) -> None:
    store = auth.TokenStore(tokens)
    first = auth.issue_region_token("grafana")
    other = auth.issue_region_token("director-east")
    assert store.identify(first) is not None  # read, and kept until the file changes
    second = auth.issue_region_token("grafana")  # the same name replaces it
    assert store.identify(first) is None
    assert store.identify(second) == auth.Holder("region", "grafana")
    assert auth.revoke_region_token("grafana") is True
    assert store.identify(second) is None
    assert store.identify(other) == auth.Holder("region", "director-east")
    assert auth.revoke_region_token("grafana") is False
    # Revoking a hospital's token leaves the region's alone, and the other way round.
    mary = auth.issue_token("st-mary")
    auth.revoke_region_token("director-east")
    assert store.identify(mary) is not None and store.identify(other) is None


def test_postctl_region_token_prints_it_once_and_keeps_its_hash(
    tokens: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli.main(["region", "token", "--name", "grafana"])
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n" and token.startswith("post_")
    assert "region token" in err and "Authorization: Bearer" in err and str(tokens) in err
    assert auth.TokenStore(tokens).identify(token) == auth.Holder("region", "grafana")
    cli.main(["region", "token", "--name", "grafana"])
    replacement = capsys.readouterr().out.strip()
    store = auth.TokenStore(tokens)
    assert store.identify(token) is None and store.identify(replacement) is not None
    cli.main(["region", "token", "--name", "grafana", "--revoke"])
    out, err = capsys.readouterr()
    assert out == "" and "revoked" in err
    assert auth.TokenStore(tokens).identify(replacement) is None
    with pytest.raises(SystemExit, match="slug"):
        cli.main(["region", "token", "--name", "Not_A_Slug"])


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


def test_the_platforms_tools_read_with_the_given_token_or_one_of_their_own(
    tokens: Path,
) -> None:
    from postctl import region

    env = {auth.TOKENS_FILE_VARIABLE: str(tokens)}
    given = {**env, region.READER_TOKEN_VARIABLE: "post_given"}
    assert region.reader_token("postctl-load", given) == "post_given"
    assert not tokens.exists()  # nothing issued when one is given
    first = region.reader_token("postctl-load", env)
    assert auth.TokenStore(tokens).identify(first) == auth.Holder("region", "postctl-load")
    second = region.reader_token("postctl-load", env)  # the next run replaces it
    assert auth.TokenStore(tokens).identify(first) is None
    assert auth.TokenStore(tokens).identify(second) is not None
