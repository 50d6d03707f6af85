"""Fixtures of the end-to-end browser tests (tests/e2e/browsing.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page

from tests.e2e.browsing import driven_chromium, window


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with driven_chromium() as launched:
        yield launched


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(**window(1400))
    try:
        yield await context.new_page()
    finally:
        await context.close()
