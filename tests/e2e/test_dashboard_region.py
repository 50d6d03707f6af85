"""The built-in dashboard over a region of more hospitals than one page of its table (issue 26):
a synthetic region of 55 hospitals driven through the services (`postctl simulate region`),
then Chromium through Playwright pages through the table of hospitals and finds a hospital by
part of its id. Its own platform: the region's figures must be this region's alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from playwright.async_api import Page

from postctl.simulate.driver import run_region
from shared.client import wait_consumed
from shared.runtime import Platform
from tests.conftest import region_token_for
from tests.e2e.browsing import browsing_platform
from tests.e2e.test_dashboard import number, opened, ranking_rows, showing

pytestmark = pytest.mark.e2e

HOSPITALS = 55
PAGE = 50


@pytest.fixture(scope="module")
def region_platform() -> Iterator[Platform]:
    with browsing_platform("post-dashboard-region-") as platform:
        yield platform


@pytest.fixture(scope="module")
async def base_url(region_platform: Platform) -> str:
    await run_region(region_platform.nats_url, HOSPITALS, 1, 7)
    await wait_consumed(region_platform.nats_url, "analytics", db_url=region_platform.db_url)
    return f"http://127.0.0.1:{region_platform.service_ports['analytics']}"


@pytest.fixture(scope="module")
def token(region_platform: Platform) -> str:
    return region_token_for(region_platform, "dashboard-region")


@pytest.fixture(scope="module")
async def api(base_url: str, token: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base_url, timeout=60, headers=headers) as http:
        yield http


async def served(api: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await api.get("/reaim-hospitals", params={"figure": "reach.referrals", **params})
    response.raise_for_status()
    found: dict[str, Any] = response.json()
    return found


async def test_the_table_of_hospitals_pages_through_the_region(
    page: Page, base_url: str, api: httpx.AsyncClient, token: str
) -> None:
    listed = (await api.get("/hospitals")).json()
    assert len(listed) == HOSPITALS
    await opened(page, base_url, token)
    await page.select_option("#ranking-figure", "reach.referrals")
    await page.wait_for_function(
        "document.getElementById('ranking-title').textContent.includes('referrals')"
    )
    first = await ranking_rows(page)
    whole = await served(api, limit=str(PAGE))
    assert whole["total"] == HOSPITALS
    assert [h for h, _ in first] == [e["hospital"] for e in whole["hospitals"]]
    assert await page.text_content("#ranking-page") == f"1\u2013{PAGE} of {HOSPITALS} hospitals"
    assert await page.is_disabled("#ranking-prev") and not await page.is_disabled("#ranking-next")

    await page.click("#ranking-next")
    await page.wait_for_function(
        f"document.getElementById('ranking-page').textContent.startsWith('{PAGE + 1}')"
    )
    second = await ranking_rows(page)
    rest = await served(api, offset=str(PAGE))
    assert [h for h, _ in second] == [e["hospital"] for e in rest["hospitals"]]
    assert len(second) == HOSPITALS - PAGE and not {h for h, _ in first} & {h for h, _ in second}
    assert (
        await page.text_content("#ranking-page")
        == f"{PAGE + 1}\u2013{HOSPITALS} of {HOSPITALS} hospitals"
    )
    assert not await page.is_disabled("#ranking-prev") and await page.is_disabled("#ranking-next")
    ranks = await page.eval_on_selector_all(
        "#ranking-rows td.rank", "(ts) => ts.map((t) => t.textContent)"
    )
    assert ranks == [str(k) for k in range(PAGE + 1, HOSPITALS + 1)]
    for h, shown in second:  # each as its own page shows it
        answer = (await api.get(f"/reaim/{h}")).json()
        assert shown == number(answer["reach"]["referrals"])

    # Turned round: the first page again, lowest first.
    await page.click("#ranking-sort")
    await page.wait_for_selector("#ranking-value-head[aria-sort='ascending']")
    lowest = await ranking_rows(page)
    ascending = await served(api, order="asc", limit=str(PAGE))
    assert [h for h, _ in lowest] == [e["hospital"] for e in ascending["hospitals"]]

    target = lowest[-1][0]
    await page.click(f"#ranking-rows a[data-hospital='{target}']")
    await showing(page, target)


async def test_the_picker_finds_one_hospital_among_many(
    page: Page, base_url: str, api: httpx.AsyncClient, token: str
) -> None:
    ids = sorted(h["hospital"] for h in (await api.get("/hospitals")).json())
    target = ids[41]
    part = target[-3:]  # the end of its id, as someone remembers it
    matching = [h for h in ids if part in h]
    await opened(page, base_url, token)
    picker = page.locator("#pick-hospital")
    await picker.click()
    await picker.press_sequentially(part)
    hint = await page.text_content("#pick-hint") or ""
    count = len(matching)
    assert f"{count} {'hospital matches' if count == 1 else 'hospitals match'}" in hint, hint
    await picker.fill(target)
    await picker.press("Enter")
    await showing(page, target)
