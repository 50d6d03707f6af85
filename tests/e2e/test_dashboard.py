"""The built-in RE-AIM dashboard, drawn by a real headless Chromium after the POST study's replay.

Chromium loads the analytics service's page at `/`, runs its scripts against the service's own
JSON and hands back the rendered DOM (`--dump-dom`) or a picture (`--screenshot`). Each view is
chosen through the page's query string (`?hospital=...&department=...&from=...&to=...`) and the
token through its fragment (`#token=...`), so no browser driver is needed for those. What needs
typing, clicking or measuring in the page (the hospital picker, the table of hospitals, the
labels of a chart) drives the same Chromium through Playwright. Without a token the
page asks for one; a region token shows the region and every hospital, a hospital's token
that hospital alone. The figures shown are checked against GET /reaim of the same view.
Region figures must be the study's alone, so the module runs its own platform, as
test_post_2023_e2e.py does. Needs Debian's `chromium` (`apt-get install -y chromium`).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page

from postctl.simulate import run_post_2023
from shared.auth import issue_token, tokens_file
from shared.client import wait_consumed
from shared.runtime import Platform
from tests.conftest import region_token_for
from tests.e2e.browsing import CHROMIUM, browsing_platform, window

pytestmark = pytest.mark.e2e

STATIC = Path(__file__).resolve().parents[2] / "services" / "analytics" / "static"
HOSPITAL_A = "kp-hospital-a"

# --- the rendered DOM -----------------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    parent: Node | None = None
    text_parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The text of the node and everything under it, as textContent gives it."""
        return "".join(self.text_parts) + "".join(c.text for c in self.children)

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [
            n
            for n in self.walk()
            if (tag is None or n.tag == tag)
            and (cls is None or cls in n.attrs.get("class", "").split())
        ]

    def by_id(self, id_: str) -> Node:
        for node in self.walk():
            if node.attrs.get("id") == id_:
                return node
        raise AssertionError(f"no element #{id_} in the rendered page")


class _TreeBuilder(HTMLParser):
    """Chromium's serialisation closes every non-void element, so a stack is enough."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.current = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs}, parent=self.current)
        self.current.children.append(node)
        if tag not in _VOID:
            self.current = node

    def handle_endtag(self, tag: str) -> None:
        node: Node | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        # Text after a child goes with the parent; order within a node does not matter here.
        self.current.text_parts.append(data)


def parse(html: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(html)
    return builder.root


# --- Chromium -------------------------------------------------------------------------------


def chromium(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run on `url`, in a throwaway profile, nothing but loopback."""
    profile = tempfile.mkdtemp(prefix="dashboard-chromium-")
    try:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",  # the tests may run as root
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-proxy-server",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                # Virtual time waits for the page's fetches, then lets its scripts finish.
                "--virtual-time-budget=10000",
                *args,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def rendered(base_url: str, query: str = "", token: str | None = None) -> Node:
    """The page's DOM after its scripts ran (with `token` in the URL's fragment); it must have
    finished loading, or be asking for a token."""
    fragment = f"#token={token}" if token else ""
    result = chromium(f"{base_url}/{query}{fragment}", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    page = parse(result.stdout)
    body = page.find_all("body")
    assert body, result.stdout[:500]
    assert body[0].attrs.get("data-state") in {"ready", "error", "token"}, result.stdout[:2000]
    if token:
        assert token not in result.stdout  # taken from the address, written nowhere on the page
    return page


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


# --- what the page must show for a figure (the page's own formatting rules) -----------------

NO_DATA = "no data"


def percent(rate: float | None) -> str:
    # The page's Math.round(x) is floor(x + 0.5) on the same double.
    return NO_DATA if rate is None else f"{math.floor(rate * 1000 + 0.5) / 10:.1f}%"


def number(value: float | None, unit: str = "") -> str:
    if value is None:
        return NO_DATA
    text = f"{value:,.1f}".removesuffix(".0")
    return f"{text} {unit}" if unit else text


def expected_figures(answer: dict[str, Any]) -> dict[str, str]:
    """Every figure of the page, by element id, as it must read for this GET /reaim answer."""
    r, e, a = answer["reach"], answer["effectiveness"], answer["adoption"]
    i, m = answer["implementation"], answer["maintenance"]
    return {
        "interactions": number(r["interactions"]),
        "reach-rate": percent(r["reach_rate"]),
        "physicians-supported": number(r["physicians_supported"]),
        "eligible": number(r["eligible_physicians"]),
        "referrals": number(r["referrals"]),
        "minutes": number(r["minutes_median"], "minutes"),
        "trained": number(r["supporters_trained"]),
        "acceptance": percent(a["outreach_acceptance_rate"]),
        "declined": number(sum(i["decline_reasons"].values())),
        "within-48h": percent(i["outreach_within_48h_rate"]),
        "hours-to-outreach": number(i["hours_to_outreach_median"], "hours"),
        "ratio": number(i["physicians_per_active_supporter"]),
        "without-supporter": number(i["referrals_without_supporter"]),
        "retention": percent(m["supporter_retention_rate"]),
        "supporters-active": number(m["supporters_active"]),
        "supporters-available": number(i["supporters_available"]),
        "departments-active": percent(m["departments_active_rate"]),
        "respondents": number(e["respondents_with_interaction"]),
        "helpful": percent(e["helpful_rate"]),
        "wellbeing": percent(e["wellbeing_improved_rate"]),
        "comfort": percent(e["comfort_improved_rate"]),
        "escalation": percent(e["escalation_rate"]),
        "hospitals": number(a["hospitals_adopted"]),
        "departments": number(a["departments_launched"]),
        "coverage": percent(a["physician_coverage"]),
        "no-referrals": number(a["departments_without_referrals"]),
        "recommend": percent(a["would_recommend_rate"]),
    }


def shown_figures(page: Node) -> dict[str, str]:
    return {
        n.attrs["id"].removeprefix("fig-"): " ".join(n.find_all(cls="value")[0].text.split())
        for n in page.find_all(cls="figure")
    }


def bars(page: Node, chart_id: str) -> list[tuple[str, int]]:
    """(data-key, data-value) of each bar of one chart, in drawing order."""
    return [
        (b.attrs["data-key"], int(float(b.attrs["data-value"])))
        for b in page.by_id(chart_id).find_all("rect", cls="bar")
    ]


def suggestions(page: Node) -> list[str]:
    """The hospital ids the picker offers (its datalist)."""
    return [o.attrs["value"] for o in page.by_id("hospital-list").find_all("option")]


def selected(page: Node, select_id: str) -> str:
    chosen = [o for o in page.by_id(select_id).find_all("option") if "selected" in o.attrs]
    assert len(chosen) == 1
    return chosen[0].attrs["value"]


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard_platform() -> Iterator[Platform]:
    with browsing_platform("post-dashboard-") as platform:
        yield platform


@pytest.fixture(scope="module")
async def base_url(dashboard_platform: Platform) -> str:
    """The analytics service, once it has read the whole replay of the study."""
    await run_post_2023(dashboard_platform.nats_url)
    await wait_consumed(dashboard_platform.nats_url, "analytics", db_url=dashboard_platform.db_url)
    return f"http://127.0.0.1:{dashboard_platform.service_ports['analytics']}"


@dataclass
class Tokens:
    region: str
    hospital_a: str


@pytest.fixture(scope="module")
def tokens(dashboard_platform: Platform) -> Tokens:
    return Tokens(
        region=region_token_for(dashboard_platform, "dashboard"),
        hospital_a=issue_token(HOSPITAL_A, tokens_file({**os.environ, **dashboard_platform.env()})),
    )


@pytest.fixture(scope="module")
async def api(base_url: str, tokens: Tokens) -> AsyncIterator[httpx.AsyncClient]:
    """The service's JSON as a region token reads it."""
    headers = {"Authorization": f"Bearer {tokens.region}"}
    async with httpx.AsyncClient(base_url=base_url, timeout=30, headers=headers) as http:
        yield http


async def reaim(api: httpx.AsyncClient, path: str, **params: str) -> dict[str, Any]:
    response = await api.get(path, params=params)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dashboard-screenshots")


# --- tests ----------------------------------------------------------------------------------


async def test_the_page_and_its_assets_are_served_from_the_service(
    base_url: str, api: httpx.AsyncClient
) -> None:
    page = await api.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    # The browser is told to load nothing from anywhere else.
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for name in ("dashboard.js", "dashboard.css"):
        assert (await api.get(f"/static/{name}")).status_code == 200
    assert (await api.get("/static/app.py")).status_code == 404
    assert "/" not in (await api.get("/openapi.json")).json()["paths"]


def test_the_page_names_no_other_host() -> None:
    for path in STATIC.iterdir():
        urls = set(re.findall(r"[a-z]+://[^\s\"')]+", path.read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)


async def test_region_view_shows_the_replayed_study(
    base_url: str, api: httpx.AsyncClient, tokens: Tokens
) -> None:
    answer = await reaim(api, "/reaim")
    page = rendered(base_url, token=tokens.region)
    assert page.find_all("body")[0].attrs["data-state"] == "ready"
    assert shown_figures(page) == expected_figures(answer)
    assert shown_figures(page)["interactions"] == "306"

    monthly = bars(page, "monthly-svg")
    assert len(monthly) == 36
    assert monthly == [(m["month"], m["interactions"]) for m in answer["reach"]["monthly"]]
    assert (monthly[0][0], monthly[-1][0]) == ("2019-06", "2022-05")
    assert sum(n for _, n in monthly) == 306
    assert page.by_id("monthly-svg").attrs["data-total"] == "306"

    years = answer["maintenance"]["interactions_by_program_year"]
    assert [n for _, n in bars(page, "years-svg")] == years
    declines = {k: n for k, n in answer["implementation"]["decline_reasons"].items() if n}
    assert dict(bars(page, "declines-svg")) == declines
    sources = {k: n for k, n in answer["reach"]["referrals_by_source"].items() if n}
    assert dict(bars(page, "sources-svg")) == sources
    ratio = page.by_id("ratio-svg").find_all("rect", cls="bar")[0]
    assert (
        float(ratio.attrs["data-value"])
        == answer["implementation"]["physicians_per_active_supporter"]
    )

    assert suggestions(page) == ["kp-hospital-a", "kp-hospital-b"]
    assert page.by_id("pick-hospital").attrs.get("value", "") == ""  # the whole region
    assert "disabled" in page.by_id("pick-department").attrs
    assert "the whole region" in page.by_id("showing").text
    assert "region token “dashboard”" in page.by_id("holder-text").text
    assert "hidden" in page.by_id("token-form").attrs


async def test_hospital_view(base_url: str, api: httpx.AsyncClient, tokens: Tokens) -> None:
    answer = await reaim(api, f"/reaim/{HOSPITAL_A}")
    listed = {h["hospital"]: h for h in (await api.get("/hospitals")).json()}
    page = rendered(base_url, f"?hospital={HOSPITAL_A}", tokens.region)
    assert shown_figures(page) == expected_figures(answer)
    assert sum(n for _, n in bars(page, "monthly-svg")) == answer["reach"]["interactions"] > 0
    assert page.by_id("pick-hospital").attrs["value"] == HOSPITAL_A
    departments = [o.attrs["value"] for o in page.by_id("pick-department").find_all("option")]
    assert departments == ["", *(d["department"] for d in listed[HOSPITAL_A]["departments"])]
    assert f"hospital {HOSPITAL_A}, all departments" in page.by_id("showing").text


async def test_department_view_over_a_period(
    base_url: str, api: httpx.AsyncClient, tokens: Tokens
) -> None:
    period = {"from": "2020-01-01", "to": "2021-01-01"}
    answer = await reaim(api, f"/reaim/{HOSPITAL_A}/emergency-medicine", **period)
    page = rendered(
        base_url,
        f"?hospital={HOSPITAL_A}&department=emergency-medicine&from=2020-01-01&to=2021-01-01",
        tokens.region,
    )
    assert shown_figures(page) == expected_figures(answer)
    monthly = bars(page, "monthly-svg")
    assert [k for k, _ in monthly] == [f"2020-{m:02d}" for m in range(1, 13)]
    assert sum(n for _, n in monthly) == answer["reach"]["interactions"] > 0
    assert selected(page, "pick-department") == "emergency-medicine"
    # The page shows the last day included; the query's `to` is exclusive, as in the API.
    assert page.by_id("pick-from").attrs["value"] == "2020-01-01"
    assert page.by_id("pick-through").attrs["value"] == "2020-12-31"
    assert "from 1 January 2020 through 31 December 2020" in page.by_id("showing").text


async def test_a_figure_without_a_denominator_reads_no_data(
    base_url: str, api: httpx.AsyncClient, tokens: Tokens
) -> None:
    # The study's first day: a launch and little else, so most rates have nothing to divide.
    answer = await reaim(api, "/reaim", **{"from": "2019-06-01", "to": "2019-06-02"})
    page = rendered(base_url, "?from=2019-06-01&to=2019-06-02", tokens.region)
    shown = shown_figures(page)
    assert shown == expected_figures(answer)
    assert list(shown.values()).count(NO_DATA) >= 5
    assert shown["helpful"] == NO_DATA


def test_an_unknown_department_is_explained(base_url: str, tokens: Tokens) -> None:
    page = rendered(
        base_url, f"?hospital={HOSPITAL_A}&department=no-such-department", tokens.region
    )
    assert page.find_all("body")[0].attrs["data-state"] == "error"
    assert "no such department" in page.by_id("status").text
    assert "hidden" in page.by_id("dashboard").attrs


def test_screenshots(
    base_url: str, tokens: Tokens, screenshots: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, query in [("region", ""), ("hospital", f"?hospital={HOSPITAL_A}")]:
        png = screenshots / f"dashboard-{name}.png"
        result = chromium(
            f"{base_url}/{query}#token={tokens.region}",
            f"--screenshot={png}",
            "--window-size=1400,2000",
            "--hide-scrollbars",
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert png_size(png) == (1400, 2000)
        # A blank or half-drawn page compresses to a few kilobytes; charts and text do not.
        assert png.stat().st_size > 60_000
    with capsys.disabled():
        print(f"\ndashboard screenshots: {screenshots}")


# --- the token ------------------------------------------------------------------------------


def test_without_a_token_the_page_asks_for_one(base_url: str) -> None:
    page = rendered(base_url, f"?hospital={HOSPITAL_A}")
    assert page.find_all("body")[0].attrs["data-state"] == "token"
    assert "hidden" not in page.by_id("token-form").attrs
    assert "Enter an API token" in page.by_id("status").text
    # Nothing of any hospital: no figure, no picker filled, no data asked for.
    assert "hidden" in page.by_id("dashboard").attrs and "hidden" in page.by_id("filters").attrs
    assert not [n for n in page.find_all(cls="figure")]
    assert not suggestions(page) and not page.by_id("pick-hospital").attrs.get("value")


def test_an_unknown_token_is_refused_and_asked_again(base_url: str) -> None:
    page = rendered(base_url, "", "post_" + "D" * 43)
    assert page.find_all("body")[0].attrs["data-state"] == "token"
    assert "This token was refused" in page.by_id("status").text
    assert not page.find_all(cls="figure")


async def test_a_hospitals_token_shows_that_hospital_alone(
    base_url: str, api: httpx.AsyncClient, tokens: Tokens
) -> None:
    answer = await reaim(api, f"/reaim/{HOSPITAL_A}")
    listed = {h["hospital"]: h for h in (await api.get("/hospitals")).json()}
    # Asked for nothing, for the region's place, or for another hospital: its own hospital.
    for query in ("", "?hospital=kp-hospital-b"):
        page = rendered(base_url, query, tokens.hospital_a)
        assert page.find_all("body")[0].attrs["data-state"] == "ready", query
        assert shown_figures(page) == expected_figures(answer), query
        assert suggestions(page) == [HOSPITAL_A]  # no other hospital
        assert page.by_id("pick-hospital").attrs["value"] == HOSPITAL_A
        assert "disabled" in page.by_id("pick-hospital").attrs
        departments = [o.attrs["value"] for o in page.by_id("pick-department").find_all("option")]
        assert departments == ["", *(d["department"] for d in listed[HOSPITAL_A]["departments"])]
        assert f"hospital {HOSPITAL_A}, all departments" in page.by_id("showing").text
        assert f"token of hospital {HOSPITAL_A}" in page.by_id("holder-text").text
    query = f"?hospital={HOSPITAL_A}&department=emergency-medicine"
    page = rendered(base_url, query, tokens.hospital_a)
    department = await reaim(api, f"/reaim/{HOSPITAL_A}/emergency-medicine")
    assert shown_figures(page) == expected_figures(department)
    assert selected(page, "pick-department") == "emergency-medicine"


# --- in the page: typing, clicking, measuring (Playwright on the same Chromium) --------------


READY = "document.body.dataset.state === 'ready'"


async def opened(page: Page, base_url: str, token: str, query: str = "") -> None:
    await page.goto(f"{base_url}/{query}#token={token}")
    await page.wait_for_function(READY)


async def showing(page: Page, hospital: str) -> None:
    """The page has drawn the view of `hospital` ("" for the region)."""
    search = f"hospital={hospital}" if hospital else ""
    await page.wait_for_function(
        f"{READY} && new URLSearchParams(location.search).get('hospital') === "
        + ("null" if not hospital else repr(hospital))
    )
    text = await page.text_content("#showing") or ""
    assert (f"hospital {hospital}," if hospital else "the whole region") in text, (search, text)


async def test_the_picker_finds_a_hospital_from_part_of_its_id(
    page: Page, base_url: str, tokens: Tokens
) -> None:
    await opened(page, base_url, tokens.region)
    picker = page.locator("#pick-hospital")
    await picker.click()
    await picker.press_sequentially("hospital-a")
    assert "1 hospital matches" in (await page.text_content("#pick-hint") or "")
    offered = await page.eval_on_selector_all(
        "#hospital-list option",
        "(os) => os.map((o) => o.value).filter((v) => v.includes('hospital-a'))",
    )
    assert offered == [HOSPITAL_A]
    # Chosen from the list, the suggestion replaces the text (headless Chromium draws no
    # list to click: the same text typed and Enter is the same choice).
    await picker.fill(HOSPITAL_A)
    await picker.press("Enter")
    await showing(page, HOSPITAL_A)
    assert await page.is_hidden("#ranking-panel")
    departments = await page.eval_on_selector_all(
        "#pick-department option", "(os) => os.map((o) => o.value)"
    )
    assert "emergency-medicine" in departments

    # Text that is no hospital: said so, and the page keeps the view it had.
    await picker.fill("no-such-hospital")
    await picker.press("Enter")
    hint = await page.text_content("#pick-hint") or ""
    assert "No hospital is called “no-such-hospital”" in hint, hint
    await showing(page, HOSPITAL_A)
    await page.click("#all-time")  # nor does another button open anything with that text
    await showing(page, HOSPITAL_A)
    assert "No hospital is called" in (await page.text_content("#pick-hint") or "")

    # Empty: the whole region.
    await picker.fill("")
    await picker.press("Enter")
    await showing(page, "")


async def test_a_hospitals_token_cannot_pick_another(
    page: Page, base_url: str, tokens: Tokens
) -> None:
    await opened(page, base_url, tokens.hospital_a)
    assert await page.is_disabled("#pick-hospital")
    assert await page.input_value("#pick-hospital") == HOSPITAL_A
    assert await page.is_hidden("#ranking-panel")


async def ranking_rows(page: Page) -> list[tuple[str, str]]:
    await page.wait_for_selector("#ranking-panel[data-state='ready']")
    rows = await page.eval_on_selector_all(
        "#ranking-rows tr",
        "(rs) => rs.map((r) => [r.dataset.hospital, r.querySelector('td.value').textContent])",
    )
    return [(h, v) for h, v in rows]


async def test_the_region_table_lists_sorts_and_opens_the_hospitals(
    page: Page, base_url: str, api: httpx.AsyncClient, tokens: Tokens
) -> None:
    await opened(page, base_url, tokens.region)

    async def served(figure: str, order: str) -> list[str]:
        found = await reaim(api, "/reaim-hospitals", figure=figure, order=order)
        assert found["total"] == 2
        return [e["hospital"] for e in found["hospitals"]]

    rows = await ranking_rows(page)
    assert [h for h, _ in rows] == await served("reach.reach_rate", "desc")
    for h, shown in rows:  # each as its own page shows it
        answer = await reaim(api, f"/reaim/{h}")
        assert shown == percent(answer["reach"]["reach_rate"])
    assert "Hospitals by physicians reached" in (await page.text_content("#ranking-title") or "")
    assert await page.text_content("#ranking-page") == "1\u20132 of 2 hospitals"
    assert await page.is_disabled("#ranking-prev") and await page.is_disabled("#ranking-next")

    await page.select_option("#ranking-figure", "reach.interactions")
    await page.wait_for_function(
        "document.getElementById('ranking-title').textContent.includes('conversations')"
    )
    down = await ranking_rows(page)
    assert [h for h, _ in down] == await served("reach.interactions", "desc")
    await page.click("#ranking-sort")
    await page.wait_for_selector("#ranking-value-head[aria-sort='ascending']")
    up = await ranking_rows(page)
    assert up == list(reversed(down)) and [h for h, _ in up] == await served(
        "reach.interactions", "asc"
    )
    for h, shown in up:
        answer = await reaim(api, f"/reaim/{h}")
        assert shown == number(answer["reach"]["interactions"])

    await page.click(f"#ranking-rows a[data-hospital='{up[0][0]}']")
    await showing(page, up[0][0])


async def test_the_ranking_is_refused_to_a_hospitals_token(base_url: str, tokens: Tokens) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as web:
        params = {"figure": "reach.referrals"}
        own = await web.get(
            "/reaim-hospitals",
            params=params,
            headers={"Authorization": f"Bearer {tokens.hospital_a}"},
        )
        assert (own.status_code, own.json()["reason_code"]) == (403, "forbidden")
        region = {"Authorization": f"Bearer {tokens.region}"}
        bad = await web.get("/reaim-hospitals", params={**params, "limit": "0"}, headers=region)
        assert (bad.status_code, bad.json()["reason_code"]) == (422, "invalid_payload")


LABEL_BOXES = """(svg) => [...svg.querySelectorAll('text')].map((t) => {
    const b = t.getBoundingClientRect();
    return {text: t.firstChild ? t.firstChild.textContent : '', left: b.left, right: b.right,
            top: b.top, bottom: b.bottom};
})"""


def overlaps(boxes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        (a["text"], b["text"])
        for i, a in enumerate(boxes)
        for b in boxes[i + 1 :]
        if a["left"] < b["right"] and b["left"] < a["right"]
        and a["top"] < b["bottom"] and b["top"] < a["bottom"]
    ]  # fmt: skip


async def years_labels(page: Page) -> list[dict[str, Any]]:
    boxes: list[dict[str, Any]] = await page.eval_on_selector("#years-svg", LABEL_BOXES)
    return boxes


async def test_the_maintenance_labels_never_overlap(
    browser: Browser, base_url: str, api: httpx.AsyncClient, tokens: Tokens
) -> None:
    answer = await reaim(api, "/reaim")
    rates = answer["maintenance"]["monthly_rate_by_program_year"]
    assert len(rates) >= 3
    # At 360 px the three years' notes once ran into one another ("9.1 a month10.3 a month").
    for width in (360, 700, 1400):
        context = await browser.new_context(**window(width))
        page = await context.new_page()
        try:
            await opened(page, base_url, tokens.region)
            boxes = await years_labels(page)
            assert not overlaps(boxes), (width, overlaps(boxes))
            notes = await page.eval_on_selector_all(
                "#years-svg text.axis-note",
                "(ts) => ts.map((t) => [t.firstChild.textContent,"
                " t.querySelector('title').textContent])",
            )
            assert notes, width  # drawn where there is room, short if need be
            for shown, title in notes:
                assert shown.split(" ")[0].split("/")[0] in title and "a month" in title
        finally:
            await context.close()
