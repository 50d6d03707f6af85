"""A webhook receiver on FastAPI: the platform POSTs each of the hospital's events to it.

    pip install "post-client[webhooks]"
    export POST_WEBHOOK_SECRET=whsec_...      # printed once by `postctl hospital webhook`
    uvicorn webhook_receiver:app --port 9000  # then register http://127.0.0.1:9000/post-events

It verifies the Standard Webhooks signature (a request not signed with the secret, or older
than five minutes, is 401) and deduplicates by `webhook-id` (the CloudEvents id): an event the
platform sends again, after a lost answer or a restart, is acknowledged and not acted on twice.
The ids seen are kept in SQLite, so that holds across the receiver's restarts too. Any 2xx
acknowledges; an exception answers 500 and the platform retries the same event.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, Response

from post_client import CloudEvent, Event, decode_event
from post_client.webhooks import InvalidSignature, verify


class Seen:
    """The webhook ids already handled, in SQLite (one row each)."""

    def __init__(self, path: str | Path) -> None:
        self.db = sqlite3.connect(str(path), check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (webhook_id TEXT PRIMARY KEY)")
        self.db.commit()

    def __contains__(self, webhook_id: str) -> bool:
        row = self.db.execute("SELECT 1 FROM seen WHERE webhook_id = ?", (webhook_id,))
        return row.fetchone() is not None

    def add(self, webhook_id: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (webhook_id,))
        self.db.commit()


Handler = Callable[[CloudEvent, Event | None], None]


def print_event(envelope: CloudEvent, event: Event | None) -> None:
    print(f"{envelope.type} {envelope.id}: {event!r}", flush=True)


def create_app(secret: str, seen: Seen, handle: Handler = print_event) -> FastAPI:
    app = FastAPI(title="POST webhook receiver")

    @app.post("/post-events", status_code=204)
    async def receive(request: Request) -> Response:
        body = await request.body()
        try:
            webhook_id = verify(secret, request.headers, body)
        except InvalidSignature as exc:
            raise HTTPException(status_code=401, detail=str(exc)) from None
        if webhook_id in seen:
            return Response(status_code=204)  # already handled: acknowledge, do nothing
        envelope, event = decode_event(body)
        handle(envelope, event)
        seen.add(webhook_id)  # after handling: a crash in between means at least once
        return Response(status_code=204)

    return app


def app_from_environment() -> FastAPI:
    return create_app(
        os.environ["POST_WEBHOOK_SECRET"],
        Seen(os.environ.get("POST_WEBHOOK_SEEN_DB", "webhooks-seen.sqlite")),
    )


if "POST_WEBHOOK_SECRET" in os.environ:
    app = app_from_environment()
