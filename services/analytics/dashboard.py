"""The built-in RE-AIM dashboard: one page at `/` for the embedded default, where Grafana is not
running. It draws the analytics service's own JSON (`/hospitals`, `/reaim...`) in the browser,
charts included, with no library and no network beyond this service, so it works offline.

The page reads its view from the query string, with the API's meanings: `/?hospital=h`,
`&department=d`, `&from=YYYY-MM-DD` (inclusive), `&to=YYYY-MM-DD` (exclusive). Every picker
change rewrites it, so a view can be bookmarked or sent to a colleague.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).parent / "static"

# Only these files are served: a fixed list leaves no path to traverse.
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}

# The browser itself refuses anything not from this service (no CDN, no beacon, no font).
_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files that change with a release: revalidate rather than serve a stale page.
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["dashboard"])


@router.get("/", include_in_schema=False)
async def dashboard() -> FileResponse:
    """The RE-AIM dashboard page."""
    return FileResponse(
        STATIC / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS
    )


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    """The page's script and style sheet."""
    if name not in ASSETS:
        raise HTTPException(404, "no such file")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=_HEADERS)
