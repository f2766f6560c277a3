"""A scripted HTTP server for tests of HTTP clients: canned answers, garbage, errors, held requests.

    with StubServer(lambda req, stub: (200, {"rewards": [1.0]})) as stub:
        ...  # stub.url; stub.requests records every request; stub.in_flight / max_in_flight count overlap

`respond(request, stub)` returns (status, body): a body that is bytes goes out as is, anything else as JSON
(NaN allowed, to play a server that writes it). A handler may block on `stub.release` (set on exit) to
hold requests in flight or play a server slower than a client's timeout.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class StubRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw bytes when not JSON


class StubServer:
    def __init__(self, respond: Callable[[StubRequest, "StubServer"], tuple[int, Any]]):
        self.respond = respond
        self.requests: list[StubRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.cond = threading.Condition()
        self.release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="http-stub", daemon=True)

    def __enter__(self) -> "StubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def wait_for(self, predicate: Callable[["StubServer"], bool], timeout: float) -> bool:
        """Wait until `predicate(self)` holds (True) or `timeout` passes (False); re-checked on every
        request start and end."""
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        request = StubRequest(handler.command, handler.path, dict(handler.headers), body)
        with self.cond:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.cond.notify_all()
        try:
            status, payload = self.respond(request, self)
        finally:
            with self.cond:
                self.in_flight -= 1
                self.cond.notify_all()
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:  # the client gave up (a timeout test)
            pass

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                stub._handle(self)

            do_GET = do_POST

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
