"""A real HTTP endpoint on 127.0.0.1 for the webhook tests: it records every request (headers
and body) and answers as the test says (a status, or a pause longer than the platform waits)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """`answer(request_number)` gives the status of each request (0: no answer for `pause`)."""

    answer: Callable[[int], int] = lambda n: 200
    pause: float = 12.0
    delay: float = 0.0  # before every answer
    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/post/events"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    status = receiver.answer(len(receiver.received))
                    receiver.received.append(
                        Received({k.lower(): v for k, v in self.headers.items()}, body, status)
                    )
                time.sleep(receiver.delay)
                if status == 0:
                    time.sleep(receiver.pause)
                    status = 200  # too late: the platform gave up on it already
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def acknowledged_ids(self) -> list[str]:
        """The webhook-ids answered 2xx, in the order they came."""
        return [r.headers["webhook-id"] for r in self.snapshot() if 200 <= r.status < 300]

    def verify_all(self, secret: str) -> None:
        """Every request is signed with `secret` (the Standard Webhooks reference verifier)."""
        for r in self.snapshot():
            assert r.headers["content-type"] == "application/cloudevents+json"
            Webhook(secret).verify(r.body, r.headers)
