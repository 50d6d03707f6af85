"""What the dashboard's browser tests share: Debian's Chromium (headless runs and Playwright),
a platform of their own for a module, and the window they open. Their `browser` and `page`
fixtures are in tests/e2e/conftest.py."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

from playwright.async_api import Browser, async_playwright

from shared.runtime import Platform
from tests.conftest import dedicated_platform

CHROMIUM = "/usr/bin/chromium"


@contextlib.contextmanager
def browsing_platform(prefix: str) -> Iterator[Platform]:
    """A platform of its own for a module of browser tests (Debian's Chromium is needed)."""
    assert os.access(CHROMIUM, os.X_OK), "install Debian's chromium: apt-get install -y chromium"
    with dedicated_platform(prefix) as platform:
        yield platform


@contextlib.asynccontextmanager
async def driven_chromium() -> AsyncIterator[Browser]:
    """Debian's Chromium, driven by Playwright (which downloads no browser of its own)."""
    async with async_playwright() as driver:
        launched = await driver.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            await launched.close()


def window(width: int) -> dict[str, Any]:
    # The page's CSP forbids eval, which Playwright's waits use to run their conditions:
    # the test's own scripts only (the CSP itself is checked on the served page).
    return {"viewport": {"width": width, "height": 1600}, "bypass_csp": True}
