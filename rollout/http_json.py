"""JSON over HTTP for the server's handlers: errors that become 4xx bodies, field reading that
names the field, strict JSON out (no NaN), bounded JSON in (depth, UTF-8, large bodies parsed off
the event loop without holding the GIL), server-sent events.

The error bodies are SGLang's: `{"object": "error", "message", "type", "param", "code"}` for a
rejected request, `{"error": {"message"}}` for one the engine refused.
"""

from __future__ import annotations

import asyncio
import json
import json.scanner
import math
from http import HTTPStatus
from typing import Any

from aiohttp import web


class BadRequest(ValueError):
    """A malformed request: rendered as SGLang's 400 `{"object": "error", ...}` body."""

    status = 400


class TooManyRequests(BadRequest):
    """The server is at its limit of requests in flight (429): retry later."""

    status = 429


# ---- reading fields ---------------------------------------------------------------------


def get_field(d: dict, key: str, kinds: tuple[type, ...], default: Any, where: str) -> Any:
    value = d.get(key)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is never a valid number here.
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise BadRequest(f"{where}.{key} must be {names}, got {short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"{where}.{key} must be a finite number, got {value!r}")
    return value


def short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters (error messages must stay small)."""
    if isinstance(value, (list, dict)) and len(value) >= 50:
        return f"<{type(value).__name__} of {len(value)}>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require(body: dict, key: str, kinds: tuple[type, ...], where: str) -> Any:
    if body.get(key) is None:
        raise BadRequest(f"{where}: field {key!r} is required")
    return get_field(body, key, kinds, None, where)


# ---- JSON out and in ---------------------------------------------------------------------


def _finite(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Strict JSON (RFC 8259): a NaN or infinite float becomes null, never a bare `NaN`."""
    try:
        return json.dumps(obj, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), allow_nan=False)


def dumps_items(items: list[Any], around: dict[str, Any] | None = None, key: str = "") -> str:
    """`dumps(items)` (or of `around` with `items` under `key`), one item per C call: a large response
    never holds the GIL for longer than one item takes (the event loop keeps answering)."""
    listed = "[" + ", ".join(dumps(item) for item in items) + "]"
    if around is None:
        return listed
    return dumps({**around, key: None}).replace(f'"{key}": null', f'"{key}": {listed}', 1)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=dumps)


def error_response(message: str, status: int = 400) -> web.Response:
    """SGLang's validation-error body."""
    return json_response({"object": "error", "message": message, "type": HTTPStatus(status).phrase,
                          "param": None, "code": status}, status=status)


def engine_error_response(message: str) -> web.Response:
    """SGLang's body for a request the engine rejected (`{"error": {"message"}}`)."""
    return json_response({"error": {"message": message}}, status=400)


INLINE_PARSE_BYTES = 64 * 1024  # larger bodies are parsed off the event loop
INLINE_SUBMIT = 64  # a request with more engine requests than this is submitted off the event loop


class _YieldingDecoder(json.JSONDecoder):
    """json's own pure-Python scanner: slower than the C one (~10x), but it runs as bytecode, so the
    thread parsing a large body hands the GIL back every switch interval and the event loop keeps
    answering. The C scanner would hold the GIL for the whole body (~40 ms per MiB of small ints)."""

    def __init__(self) -> None:
        super().__init__()
        self.scan_once = json.scanner.py_make_scanner(self)


_YIELDING = _YieldingDecoder()


def loads(raw: bytes, yielding: bool = False) -> Any:
    """JSON: invalid UTF-8 and too deep nesting are BadRequest. NaN / Infinity literals (and 1e999)
    parse as floats so that `get_field` can refuse them naming the field: no number reaches the
    engine without it. `yielding`: parse with the GIL-friendly scanner (for large bodies, off the loop)."""
    try:
        if yielding:
            return _YIELDING.decode(raw.decode("utf-8"))
        return json.loads(raw)
    except RecursionError:
        raise BadRequest("malformed JSON body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BadRequest(f"malformed JSON body: {exc}") from None


async def read_json(request: web.Request, optional: bool = False) -> dict[str, Any]:
    """The JSON-object body; an empty body is `{}` when `optional`."""
    raw = await request.read()
    if not raw.strip():
        if optional:
            return {}
        raise BadRequest(f"{request.path}: the request body is empty; expected a JSON object")
    try:
        if len(raw) <= INLINE_PARSE_BYTES:
            body = loads(raw)
        else:
            body = await asyncio.get_running_loop().run_in_executor(None, loads, raw, True)
    except BadRequest as exc:
        raise BadRequest(f"{request.path}: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"{request.path}: the request body must be a JSON object, got {type(body).__name__}")
    return body


def sse(obj: Any) -> bytes:
    """One server-sent event."""
    return b"data: " + dumps(obj).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def start_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp
