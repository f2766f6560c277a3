"""Connection-level guards of the HTTP server (aiohttp), below any handler.

- A connection must complete each request's headers within `header_timeout_s`
  of connecting or of its first byte: half-sent requests are cut instead of
  holding a socket forever (aiohttp itself only times out idle keep-alive).
- Bodies are never decompressed (`auto_decompress=False`): the server refuses
  a `Content-Encoding` (415) instead of inflating a bomb.
- After refusing a body, the server reads what the client still sends for at
  most `LINGER_S` (so the client sees the answer rather than a reset), then
  closes; an idle keep-alive connection closes after `KEEPALIVE_TIMEOUT_S`.
- A client that disconnects cancels its handler (`handler_cancellation`),
  whose `finally` aborts its engine requests.

The header deadline needs aiohttp's request handler class (`RequestHandler`,
its `_request_count` and `_messages` (whose payloads say when a body is whole), and `Server`'s
`_loop` / `_kwargs`): tests cover it, including a body that arrives slower
than the header deadline (it is the body timeout's to judge, not this one's).
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

KEEPALIVE_TIMEOUT_S = 75.0  # an idle keep-alive connection is closed after this
LINGER_S = 1.0


class _HeaderDeadline(RequestHandler):
    """A connection must complete each request's headers within `header_timeout_s` of its first byte
    (or of connecting): half-sent requests are cut instead of holding a socket forever."""

    __slots__ = ("header_timeout_s", "_deadline", "_armed_at_count", "_body")

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._body = None  # the payload (StreamReader) of the last request whose headers arrived
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._disarm()
            self._body = self._messages[-1][1] if self._messages else None
        elif data and self._deadline is None and self._between_requests():
            self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        """The last request's body arrived whole: a byte now starts new headers (not more of that body)."""
        return self._body is None or self._body.is_eof()

    def _arm(self) -> None:
        self._armed_at_count = self._request_count
        self._deadline = self._loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        deadline, self._deadline = getattr(self, "_deadline", None), None
        if deadline is not None:
            deadline.cancel()

    def _expire(self) -> None:
        self._deadline = None
        if self._request_count == self._armed_at_count:
            self.force_close()


class _GuardedServer(web.Server):
    """aiohttp's low-level server, whose connections enforce the header deadline."""

    header_timeout_s = 10.0

    def __call__(self) -> RequestHandler:
        handler = _HeaderDeadline(self, loop=self._loop, **self._kwargs)
        handler.header_timeout_s = self.header_timeout_s
        return handler


class _Runner(web.AppRunner):
    def __init__(self, app: web.Application, header_timeout_s: float, **kwargs: Any):
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer  # the same server; its connections get the header deadline
        server.header_timeout_s = self.header_timeout_s
        return server


def guarded_runner(app: web.Application, header_timeout_s: float) -> web.AppRunner:
    """An AppRunner for `app` whose connections are guarded (module docstring)."""
    return _Runner(app, header_timeout_s, handler_cancellation=True, access_log=None, shutdown_timeout=1.0,
                   keepalive_timeout=KEEPALIVE_TIMEOUT_S, auto_decompress=False, lingering_time=LINGER_S)


async def serve_until_signal(runner: web.AppRunner, host: str, port: int, name: str, banner: str,
                             bad_address: Callable[[str], Exception], path: str = "") -> int:
    """Serve `runner` on host:port until SIGINT or SIGTERM; returns 0. A host/port that cannot be bound raises
    `bad_address(message)` naming the flags. `name` and `path` make the "listening on" line."""
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise bad_address(f"--host {host} --port {port}: cannot listen: {' '.join(str(exc).split())}") from exc
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        bound = runner.addresses[0][1]
        print(f"{name}: listening on http://{host}:{bound}{path} ({banner})", flush=True)
        await stop.wait()
        print(f"{name}: shutting down", flush=True)
        return 0
    finally:
        await runner.cleanup()
