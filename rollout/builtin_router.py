"""Built-in HTTP router: the fallback when sglang-router is missing or will not start.

An aiohttp reverse proxy on its own event-loop thread with the subset of
sglang-router 0.3.2's API that slime_rl uses and the same shapes: it forwards
`POST /generate`, `/v1/completions`, `/v1/chat/completions` to one worker (SSE
relayed chunk by chunk) and serves `GET /health`, `/readiness`, `/workers`,
`/v1/models`, `POST /workers`, `DELETE /workers/{id}`, `POST /flush_cache` (fan-out).

Worker choice: (1) header `X-SMG-Routing-Key` sticks to the worker it first went
to while that one is healthy (under every policy; the real router only under
`manual`); (2) `cache_aware`: the worker that saw the longest prefix of the
routing text (`text`, or `input_ids` as decimal numbers joined by spaces, like
the real router) if it covers > `cache_threshold` of the text and in-flight
loads are not too unbalanced, else the least-loaded worker; `round_robin`;
`random`; `manual` (random without a key); `power_of_two` (by our in-flight
counts, not the workers' /get_load). Departure: the prefix index hashes whole
BLOCK-char blocks (the real router keeps a character radix tree).

Health: `GET /health` on every worker each interval; `health_failure_threshold`
failures take a worker out of rotation, `health_success_threshold` successes
bring it back. A connection error while forwarding ejects the worker at once and
the request is retried on another worker, as is a 5xx answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import web

logger = logging.getLogger(__name__)

BUILTIN_POLICIES = ("cache_aware", "round_robin", "random", "power_of_two", "manual")
ROUTED_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
FORWARDED_HEADERS = ("Content-Type", "Authorization", "X-Request-Id", "X-Correlation-Id", "Traceparent",
                     "X-SMG-Routing-Key")
BLOCK = 4  # prefix-index granularity in characters
MAX_ROUTING_KEYS = 100_000


def routing_text(path: str, payload: dict[str, Any]) -> str:
    """The text cache_aware matches on: `text`/`prompt`/message contents, or token ids joined by spaces."""
    if path == "/v1/chat/completions":
        parts = [m.get("content") for m in payload.get("messages") or [] if isinstance(m, dict)]
        return " ".join(p if isinstance(p, str) else json.dumps(p) for p in parts if p is not None)
    value = payload.get("prompt") if path == "/v1/completions" else payload.get("text")
    if value is None and path == "/generate":
        value = payload.get("input_ids")
    if isinstance(value, str):
        return value
    flat: list[Any] = []
    for item in value or []:
        flat.extend(item if isinstance(item, list) else [item])
    return " ".join(map(str, flat))


class PrefixIndex:
    """Which workers saw which prefixes: chained hash of each BLOCK-char prefix -> {worker url: tick}, LRU-bounded."""

    def __init__(self, max_entries: int = 1 << 18):
        self.max_entries = max_entries
        self._nodes: OrderedDict[int, dict[str, int]] = OrderedDict()
        self._tick = 0

    @staticmethod
    def _keys(text: str):
        key = 0
        for start in range(0, len(text) - BLOCK + 1, BLOCK):
            key = hash((key, text[start:start + BLOCK]))
            yield key

    def match(self, text: str, alive: set[str]) -> tuple[str | None, int]:
        """(a live worker holding the longest matched prefix, its length in chars)."""
        best, matched = None, 0
        for n_blocks, key in enumerate(self._keys(text), start=1):
            tenants = {u: t for u, t in self._nodes.get(key, {}).items() if u in alive}
            if not tenants:
                break
            best, matched = max(tenants, key=tenants.__getitem__), n_blocks * BLOCK
        return best, matched

    def insert(self, text: str, url: str) -> None:
        self._tick += 1
        for key in self._keys(text):
            self._nodes.setdefault(key, {})[url] = self._tick
            self._nodes.move_to_end(key)
        while len(self._nodes) > self.max_entries:
            self._nodes.popitem(last=False)


@dataclass
class _Worker:
    url: str
    id: str
    healthy: bool = False
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    successes: int = 0
    model_id: str = "unknown"

    def as_dict(self) -> dict[str, Any]:  # the real router's GET /workers entry (subset)
        return {"id": self.id, "url": self.url, "model_id": self.model_id, "priority": 50, "cost": 1.0,
                "worker_type": "regular", "is_healthy": self.healthy, "load": self.in_flight,
                "connection_mode": "HTTP", "disable_health_check": False}


def _error(status: int, code: str, message: str) -> web.Response:
    """The real router's error shape, e.g. 503 {"error": {"type": "Service Unavailable", "code": ..., "message": ...}}."""
    return web.json_response({"error": {"type": HTTPStatus(status).phrase, "code": code, "message": message}},
                             status=status)


class BuiltinRouter:
    """The fallback router; the same public methods as `rollout.router.SGLangRouter`."""

    def __init__(self, worker_urls: list[str], *, policy: str = "cache_aware", host: str = "127.0.0.1",
                 port: int = 0, health_check_interval_s: float = 2.0, min_healthy_workers: int | None = None,
                 health_failure_threshold: int = 2, health_success_threshold: int = 1,
                 cache_threshold: float = 0.3, balance_abs_threshold: int = 64, balance_rel_threshold: float = 1.5,
                 max_attempts: int = 3, request_timeout_s: float = 1800.0):
        if policy not in BUILTIN_POLICIES:
            raise ValueError(f"policy must be one of {BUILTIN_POLICIES} for the built-in router, got {policy!r}")
        self.policy, self.host, self.port, self.url = policy, host, port, ""
        self.initial_urls = [u.rstrip("/") for u in worker_urls]
        self.min_healthy_workers = len(self.initial_urls) if min_healthy_workers is None else min_healthy_workers
        self.health_check_interval_s = health_check_interval_s
        self.failure_threshold, self.success_threshold = health_failure_threshold, health_success_threshold
        self.cache_threshold = cache_threshold
        self.balance_abs, self.balance_rel = balance_abs_threshold, balance_rel_threshold
        self.max_attempts, self.request_timeout_s = max_attempts, request_timeout_s
        self._workers: dict[str, _Worker] = {}  # by url, in registration order
        self._sticky: OrderedDict[str, str] = OrderedDict()  # routing key -> worker url, LRU-bounded
        self._index = PrefixIndex()
        self._rr = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._health_task: asyncio.Task | None = None

    # ---- caller's thread -----------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> "BuiltinRouter":
        """Bind, register the workers, wait until `min_healthy_workers` pass a health check."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="builtin-router", daemon=True)
        self._thread.start()
        try:
            self._call(self._serve())
            self._call(self._wait(lambda: self._healthy_count() >= self.min_healthy_workers, timeout_s))
        except BaseException as e:
            self.stop()
            if not isinstance(e, TimeoutError):
                raise
            raise RuntimeError(f"built-in router: {self.min_healthy_workers} of {self.initial_urls} not healthy "
                               f"after {timeout_s} s (GET <worker>/health must answer 200)") from None
        return self

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=10)
            loop.close()

    def __enter__(self) -> "BuiltinRouter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def workers(self) -> list[dict[str, Any]]:
        return self._call(self._list())

    def add_worker(self, url: str, timeout_s: float = 60.0) -> None:
        """Register a worker and wait until its health check passes."""
        url = url.rstrip("/")
        self._call(self._add(url))
        try:
            self._call(self._wait(lambda: url in self._workers and self._workers[url].healthy, timeout_s))
        except TimeoutError:
            raise RuntimeError(f"worker {url} not healthy in router {self.url} after {timeout_s} s") from None

    def remove_worker(self, url: str, timeout_s: float = 30.0) -> None:
        if not self._call(self._remove(url.rstrip("/"))):
            raise ValueError(f"worker {url} is not registered with router {self.url}; "
                             f"registered: {[w['url'] for w in self.workers()]}")

    def flush_cache(self) -> dict[str, Any]:
        return self._call(self._flush())

    # ---- event loop: lifecycle and worker registry ------------------------------------------

    async def _serve(self) -> None:
        self._changed = asyncio.Condition()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(self.request_timeout_s, sock_connect=5))
        app = web.Application(client_max_size=1 << 29)
        app.add_routes([web.post(path, self._proxy) for path in ROUTED_PATHS] + [
            web.get("/health", self._health), web.get("/readiness", self._readiness),
            web.get("/workers", self._h_list), web.post("/workers", self._h_add),
            web.delete("/workers/{id}", self._h_remove), web.post("/flush_cache", self._h_flush),
            web.get("/v1/models", self._models)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://{self.host}:{self.port}"
        for url in self.initial_urls:
            await self._add(url)
        self._health_task = asyncio.create_task(self._health_loop())

    async def _shutdown(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        await self._session.close()

    async def _wait(self, predicate, timeout_s: float) -> None:
        """Until predicate() holds, re-checked whenever worker state changes; TimeoutError after timeout_s."""
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        await asyncio.wait_for(wait(), timeout_s)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _healthy_count(self) -> int:
        return sum(w.healthy for w in self._workers.values())

    async def _list(self) -> list[dict[str, Any]]:
        return [w.as_dict() for w in self._workers.values()]  # read on the loop: no torn state

    async def _add(self, url: str) -> _Worker:
        if url not in self._workers:
            self._workers[url] = _Worker(url, str(uuid.uuid4()))
            asyncio.create_task(self._check(self._workers[url]))  # first probe now, not after an interval
        return self._workers[url]

    async def _remove(self, url: str) -> bool:
        removed = self._workers.pop(url, None) is not None
        await self._notify()
        return removed

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_check_interval_s)
            await asyncio.gather(*(self._check(w) for w in list(self._workers.values())))

    async def _check(self, w: _Worker) -> None:
        try:
            async with self._session.get(w.url + "/health", timeout=aiohttp.ClientTimeout(5)) as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            ok = False
        w.failures, w.successes = (0, w.successes + 1) if ok else (w.failures + 1, 0)
        if ok and not w.healthy and w.successes >= self.success_threshold:
            w.healthy = True
            w.model_id = await self._model_id(w)
            logger.info("worker %s is healthy", w.url)
        elif not ok and w.failures >= self.failure_threshold:
            self._mark_unhealthy(w, f"{w.failures} failed health checks")
        await self._notify()

    def _mark_unhealthy(self, w: _Worker, why: str) -> None:
        if w.healthy:
            logger.warning("worker %s taken out of rotation: %s", w.url, why)
        w.healthy, w.successes = False, 0

    async def _model_id(self, w: _Worker) -> str:
        try:
            async with self._session.get(w.url + "/get_server_info", timeout=aiohttp.ClientTimeout(5)) as r:
                info = await r.json(content_type=None)
            return str(info.get("served_model_name") or info.get("model_path") or "unknown")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
            return "unknown"

    # ---- event loop: routing ----------------------------------------------------------------

    def _select(self, text: str, key: str | None, exclude: set[str]) -> _Worker | None:
        live = {w.url: w for w in self._workers.values() if w.healthy and w.url not in exclude}
        if not live:
            return None
        least = min(live.values(), key=lambda w: (w.in_flight, w.served))  # ties: the one that served least
        if key is not None and self._sticky.get(key) in live:
            chosen = live[self._sticky[key]]
        elif self.policy == "cache_aware":
            lo, hi = least.in_flight, max(w.in_flight for w in live.values())
            balanced = not (hi - lo > self.balance_abs and hi > lo * self.balance_rel)
            url, matched = self._index.match(text, set(live))
            chosen = live[url] if balanced and text and matched / len(text) > self.cache_threshold else least
        elif self.policy == "round_robin":
            self._rr += 1
            chosen = list(live.values())[self._rr % len(live)]
        elif self.policy == "power_of_two":
            chosen = min(random.sample(list(live.values()), min(2, len(live))), key=lambda w: w.in_flight)
        else:  # random, manual
            chosen = random.choice(list(live.values()))
        if key is not None:
            self._sticky[key] = chosen.url
            self._sticky.move_to_end(key)
            if len(self._sticky) > MAX_ROUTING_KEYS:
                self._sticky.popitem(last=False)
        if self.policy == "cache_aware" and text:
            self._index.insert(text, chosen.url)
        return chosen

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            payload = json.loads(body)
        except ValueError as e:
            return _error(400, "invalid_json", f"{request.path}: body is not JSON: {e}")
        text = routing_text(request.path, payload) if isinstance(payload, dict) else ""
        headers = {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers}
        tried: set[str] = set()
        errors: list[str] = []
        last_5xx: web.Response | None = None  # answered if no other worker does better
        while len(tried) < self.max_attempts:
            w = self._select(text, request.headers.get("X-SMG-Routing-Key"), tried)
            if w is None:
                break
            tried.add(w.url)
            w.in_flight += 1
            try:
                upstream = await self._session.post(w.url + request.path, data=body, headers=headers)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                w.in_flight -= 1
                self._mark_unhealthy(w, f"connection error: {e!r}")
                errors.append(f"{w.url}: {e!r}")
                continue
            try:
                if upstream.status < 500:
                    w.served += 1
                    return await self._relay(request, upstream)
                last_5xx = web.Response(body=await upstream.read(), status=upstream.status,
                                        headers={"Content-Type": upstream.content_type})
            except BaseException:
                upstream.close()  # e.g. our client left mid-stream: the worker sees it and aborts
                raise
            finally:
                upstream.release()  # fully read: back to the keep-alive pool
                w.in_flight -= 1
        return last_5xx or _error(503, "no_available_workers",
                                  f"{request.path}: no healthy worker could serve it; tried: {errors or 'none'}")

    @staticmethod
    async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        ctype = upstream.headers.get("Content-Type", "application/json")
        if not ctype.startswith("text/event-stream"):
            return web.Response(body=await upstream.read(), status=upstream.status, headers={"Content-Type": ctype})
        resp = web.StreamResponse(status=upstream.status, headers={"Content-Type": ctype, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    # ---- event loop: control endpoints ------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")  # the router itself is up

    async def _readiness(self, request: web.Request) -> web.Response:
        healthy, total = self._healthy_count(), len(self._workers)
        return web.json_response({"status": "ready" if healthy else "not ready", "healthy_workers": healthy,
                                  "total_workers": total}, status=200 if healthy else 503)

    async def _h_list(self, request: web.Request) -> web.Response:
        workers = await self._list()
        return web.json_response({"workers": workers, "total": len(workers),
                                  "stats": {"prefill_count": 0, "decode_count": 0, "regular_count": len(workers)}})

    async def _h_add(self, request: web.Request) -> web.Response:
        try:
            url = str((await request.json())["url"]).rstrip("/")
        except (ValueError, KeyError, TypeError) as e:
            return _error(400, "invalid_request", f"POST /workers needs a JSON body with 'url': {e!r}")
        w = await self._add(url)
        return web.json_response({"status": "accepted", "worker_id": w.id, "url": url,
                                  "location": f"/workers/{w.id}", "message": "Worker addition queued"}, status=202)

    async def _h_remove(self, request: web.Request) -> web.Response:
        wid = request.match_info["id"]
        w = next((w for w in self._workers.values() if w.id == wid), None)
        if w is None:
            return web.json_response({"error": f"Worker {wid} not found", "code": "WORKER_NOT_FOUND"}, status=404)
        await self._remove(w.url)
        return web.json_response({"status": "accepted", "worker_id": wid, "message": "Worker removed"}, status=202)

    async def _flush(self) -> dict[str, Any]:
        live = [w for w in self._workers.values() if w.healthy]

        async def one(w: _Worker) -> str | None:
            try:
                async with self._session.post(w.url + "/flush_cache") as r:
                    return None if r.status == 200 else f"HTTP {r.status}: {(await r.text())[:200]}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                return repr(e)

        errors = await asyncio.gather(*(one(w) for w in live))
        failed = [{"worker": w.url, "error": err} for w, err in zip(live, errors) if err is not None]
        return {"status": "partial_success" if failed else "success",
                "message": f"Flushed cache on {len(live) - len(failed)} of {len(live)} HTTP workers",
                "workers_flushed": len(live) - len(failed), "total_http_workers": len(live),
                "total_workers": len(self._workers), **({"failed": failed} if failed else {})}

    async def _h_flush(self, request: web.Request) -> web.Response:
        return web.json_response(await self._flush())

    async def _models(self, request: web.Request) -> web.Response:
        ids = sorted({w.model_id for w in self._workers.values()}) or ["unknown"]
        return web.json_response({"object": "list", "data": [{"id": i, "object": "model", "owned_by": "local"}
                                                             for i in ids]})
