"""An async client for any SGLang-protocol server: real SGLang, sglang-router, or our own server.

`EngineClient` implements the `RolloutEngine` protocol over HTTP (field names
from SGLang's native HTTP API):

- data plane: one `POST /generate` per request (token ids in, ids + logprobs
  out), sent concurrently but at most `max_concurrency` at a time. Requests are
  never batched into one call: the router rejects list-valued
  `sampling_params`, and one request per call keeps rids, retries and
  routing keys per request. `astream` reads SSE cumulative snapshots.
- control plane: abort, pause / continue, flush, weight updates and versions
  fan out to `control_urls` (the workers). A router does not route those
  endpoints, so with a router in `url` the workers must be listed there.

Robustness: connection refused / reset, a connect-phase timeout and HTTP
429 (a server at its in-flight limit) and 502/503/504 are retried with exponential backoff and jitter (`max_retries`
retries after the first attempt, the same body and rid each time); any other
4xx/5xx raises `EngineError` at once with the server's message. Every error
names the URL, the endpoint and the rid. `timeout_s` bounds each attempt.

Sessions are per event loop, so the async API works from any loop; the
concurrency bound holds per loop. The sync methods (`generate`, `abort`, ...)
run the coroutines on a private event loop in a daemon thread: they work from
plain code and from other threads, but must not be called from that private
loop itself (i.e. from code the client runs), which would deadlock; they raise
RuntimeError there instead.

Departures from a real SGLang server: `aupdate_weights_from_tensors` /
`aupdate_weights_from_bucket` send `torch.save` payloads (our server's format);
real SGLang expects torch-multiprocessing pickles of CUDA IPC handles: build
those with `rollout.wire.encode_cuda_ipc_payload` and send them with
`aupdate_weights_from_tensor_payload`. Staged updates (`transfer_id`, commit,
abort), shared-memory updates and checksums are our server's extensions
(`server_info["weight_update_staging"]`). Only cumulative (default) streaming
is understood, not `--incremental-streaming-output`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Iterable, TypeVar

import aiohttp

from rollout.client_weights import WeightCalls
from rollout.wire import (error_message, generate_payload, parse_body,
                          parse_generate_response, weight_version_int)
from slime_rl.types import PAUSE_MODES, GenerateOutput, GenerateRequest

T = TypeVar("T")

RETRY_STATUSES = (429, 502, 503, 504)  # 429: refused before anything was queued
_RETRY_EXCEPTIONS = (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, aiohttp.ConnectionTimeoutError)
log = logging.getLogger(__name__)
ROUTING_KEY_HEADER = "X-SMG-Routing-Key"  # sglang-router's session-affinity header


class EngineError(RuntimeError):
    """A failed call to an engine; the message names the URL, endpoint, rid and what went wrong."""

    def __init__(self, message: str, *, url: str = "", endpoint: str = "", rid: str | None = None,
                 status: int | None = None, attempts: int = 1):
        super().__init__(message)
        self.url, self.endpoint, self.rid, self.status, self.attempts = url, endpoint, rid, status, attempts


class _Retryable(Exception):
    """One failed attempt worth retrying; `reason` goes into the final EngineError."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.reason, self.status = reason, status


@dataclass
class _LoopState:
    """What the client holds per event loop (aiohttp sessions cannot cross loops)."""

    session: aiohttp.ClientSession
    semaphore: asyncio.Semaphore


# ---- the client -------------------------------------------------------------------------------


class EngineClient(WeightCalls):
    """`RolloutEngine` over the SGLang HTTP protocol (async API + sync wrappers)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        control_urls: list[str] | None = None,
        timeout_s: float = 600,
        connect_timeout_s: float = 10,
        max_retries: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        max_concurrency: int = 256,
        routing_key: str | None = None,
    ):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.url = url.rstrip("/")
        self.control_urls = [u.rstrip("/") for u in (control_urls or [url])]
        self.api_key = api_key
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.max_concurrency = max_concurrency
        self.routing_key = routing_key
        self._states: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._states_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # the sync wrappers' private loop
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EngineClient({self.url!r}, control_urls={self.control_urls!r})"

    # ---- transport ----

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        with self._states_lock:
            state = self._states.get(loop)
            if state is None or state.session.closed:
                timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=self.connect_timeout_s)
                session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
                state = self._states[loop] = _LoopState(session, asyncio.Semaphore(self.max_concurrency))
        return state

    def _headers(self, routing_key: str | None = None) -> dict[str, str]:
        headers = {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if routing_key is not None:
            headers[ROUTING_KEY_HEADER] = routing_key
        return headers

    def _backoff(self, retry: int) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        return delay * random.uniform(0.75, 1.25)

    async def _with_retries(self, base: str, endpoint: str, rid: str | None, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` until it does not raise _Retryable, at most 1 + max_retries times."""
        last: _Retryable | None = None
        for n in range(self.max_retries + 1):
            if n:
                await asyncio.sleep(self._backoff(n))
            try:
                return await attempt()
            except _Retryable as exc:
                last = exc
        attempts = self.max_retries + 1
        raise EngineError(
            f"{base}{endpoint} (rid={rid}) failed after {attempts} attempts; last error: {last.reason}",
            url=base, endpoint=endpoint, rid=rid, status=last.status, attempts=attempts,
        )

    def _http_error(self, base: str, endpoint: str, rid: str | None, status: int, body: Any) -> Exception:
        message = f"HTTP {status}: {error_message(body)}"
        if status in RETRY_STATUSES:
            return _Retryable(message, status)
        return EngineError(f"{base}{endpoint} (rid={rid}) failed: {message}",
                           url=base, endpoint=endpoint, rid=rid, status=status)

    def _timeout_error(self, base: str, endpoint: str, rid: str | None) -> EngineError:
        return EngineError(f"{base}{endpoint} (rid={rid}) timed out after {self.timeout_s} s",
                           url=base, endpoint=endpoint, rid=rid)

    def _client_error(self, base: str, endpoint: str, rid: str | None, exc: Exception) -> EngineError:
        return EngineError(f"{base}{endpoint} (rid={rid}) failed: {type(exc).__name__}: {exc}",
                           url=base, endpoint=endpoint, rid=rid)

    async def _call(self, method: str, base: str, endpoint: str, payload: Any = None, *, rid: str | None = None,
                    routing_key: str | None = None) -> Any:
        """One JSON call with retries; returns the parsed body (JSON, or the text when not JSON)."""
        session = self._state().session
        headers = self._headers(routing_key)

        async def attempt() -> Any:
            try:
                async with asyncio.timeout(self.timeout_s):
                    async with session.request(method, base + endpoint, json=payload, headers=headers) as resp:
                        status, body = resp.status, parse_body(await resp.text())
            except _RETRY_EXCEPTIONS as exc:
                raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
            except TimeoutError as exc:
                raise self._timeout_error(base, endpoint, rid) from exc
            except aiohttp.ClientError as exc:  # e.g. a truncated body: not known to be safe to resend
                raise self._client_error(base, endpoint, rid, exc) from exc
            if status >= 400:
                raise self._http_error(base, endpoint, rid, status, body)
            return body

        return await self._with_retries(base, endpoint, rid, attempt)

    async def _fan_out(self, calls: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
        """Await calls concurrently; on the first failure cancel the rest and raise it."""
        tasks = [asyncio.ensure_future(c) for c in calls]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _control(self, endpoint: str, payload: Any = None, method: str = "POST") -> list[Any]:
        return await self._fan_out(self._call(method, u, endpoint, payload) for u in self.control_urls)

    # ---- generation ----

    async def agenerate_one(self, request: GenerateRequest, routing_key: str | None = None) -> GenerateOutput:
        """One request, one `/generate` call; the rid is assigned here when the request has none."""
        rid = request.rid or uuid.uuid4().hex
        key = routing_key if routing_key is not None else self.routing_key
        state = self._state()
        async with state.semaphore:
            body = await self._call("POST", self.url, "/generate", generate_payload(request, rid), rid=rid,
                                    routing_key=key)
        return self._parse(body, request, rid)

    def _parse(self, body: Any, request: GenerateRequest, rid: str, final: bool = True) -> GenerateOutput:
        try:
            return parse_generate_response(body, request, rid, final=final)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise EngineError(f"{self.url}/generate (rid={rid}) returned a malformed result: {exc}",
                              url=self.url, endpoint="/generate", rid=rid) from exc

    async def agenerate(self, requests: list[GenerateRequest],
                        routing_keys: list[str | None] | None = None) -> list[GenerateOutput]:
        """Outputs in request order; if one request fails the others are cancelled and the error raised."""
        if routing_keys is not None and len(routing_keys) != len(requests):
            raise ValueError(f"routing_keys has {len(routing_keys)} entries for {len(requests)} requests")
        keys = routing_keys or [None] * len(requests)
        return await self._fan_out(self.agenerate_one(r, k) for r, k in zip(requests, keys))

    async def astream(self, request: GenerateRequest, routing_key: str | None = None) -> AsyncIterator[GenerateOutput]:
        """Cumulative snapshots over SSE; the last one has finish_reason set.

        A stream that ends without its final chunk (a worker died behind a router, a connection cut)
        is a failure, not an end: the request is sent again (same rid and body, up to `max_retries`
        times, with backoff), and only snapshots longer than the last one yielded are passed on, so
        the caller sees one growing sequence. Closing the iterator early closes the connection, which
        aborts the request on the server.
        """
        rid = request.rid or uuid.uuid4().hex
        key = routing_key if routing_key is not None else self.routing_key
        state = self._state()
        payload = generate_payload(request, rid, stream=True)
        yielded = 0  # tokens in the longest snapshot passed on
        for attempt in range(self.max_retries + 1):
            if attempt:
                log.warning("%s/generate (rid=%s): the stream ended without a finish_reason; sending it again "
                            "(retry %d of %d)", self.url, rid, attempt, self.max_retries)
                await asyncio.sleep(self._backoff(attempt))
            async with state.semaphore:
                async for out in self._stream_once(state.session, payload, request, rid, key):
                    if out.finish_reason is not None or len(out.output_ids) > yielded:
                        yielded = len(out.output_ids)
                        yield out
                    if out.finish_reason is not None:
                        return
        raise EngineError(f"{self.url}/generate (rid={rid}) stream ended without a finish_reason "
                          f"({self.max_retries + 1} attempts)", url=self.url, endpoint="/generate", rid=rid,
                          attempts=self.max_retries + 1)

    async def _stream_once(self, session: aiohttp.ClientSession, payload: dict, request: GenerateRequest, rid: str,
                           key: str | None) -> AsyncIterator[GenerateOutput]:
        """The snapshots of one streaming attempt, until its final chunk, [DONE] or the end of the body."""
        resp = await self._open_stream(session, payload, rid, key)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        async with resp:
            while True:
                line = await self._read_line(resp, deadline, rid)
                data = line.decode("utf-8").strip()
                if not data.startswith("data:"):
                    continue
                data = data[len("data:"):].strip()
                if data == "[DONE]":
                    return
                chunk = parse_body(data)
                if isinstance(chunk, dict) and "error" in chunk:
                    raise EngineError(f"{self.url}/generate (rid={rid}) failed mid-stream: {error_message(chunk)}",
                                      url=self.url, endpoint="/generate", rid=rid)
                out = self._parse(chunk, request, rid, final=False)
                yield out
                if out.finish_reason is not None:  # after the final chunk only [DONE] is left
                    return

    async def _read_line(self, resp: aiohttp.ClientResponse, deadline: float, rid: str) -> bytes:
        """One SSE line before the request's deadline; b"data: [DONE]" at EOF."""
        try:
            async with asyncio.timeout_at(deadline):
                line = await resp.content.readline()
        except TimeoutError as exc:
            raise self._timeout_error(self.url, "/generate", rid) from exc
        except aiohttp.ClientError as exc:
            raise self._client_error(self.url, "/generate", rid, exc) from exc
        return line or b"data: [DONE]"

    async def _open_stream(self, session: aiohttp.ClientSession, payload: dict, rid: str,
                           routing_key: str | None) -> aiohttp.ClientResponse:
        """POST a streaming /generate with retries until a 200 response starts; the caller reads it."""
        headers = self._headers(routing_key)

        async def attempt() -> aiohttp.ClientResponse:
            try:
                async with asyncio.timeout(self.timeout_s):
                    resp = await session.post(self.url + "/generate", json=payload, headers=headers)
                    if resp.status < 400:
                        return resp
                    status, body = resp.status, parse_body(await resp.text())
                    resp.release()
            except _RETRY_EXCEPTIONS as exc:
                raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
            except TimeoutError as exc:
                raise self._timeout_error(self.url, "/generate", rid) from exc
            except aiohttp.ClientError as exc:
                raise self._client_error(self.url, "/generate", rid, exc) from exc
            raise self._http_error(self.url, "/generate", rid, status, body)

        return await self._with_retries(self.url, "/generate", rid, attempt)

    # ---- request control ----

    async def aabort(self, rid: str | None = None) -> None:
        """Abort one request (unknown rids are ignored by the server) or, with None, all of them."""
        payload = {"rid": "", "abort_all": True} if rid is None else {"rid": rid}
        await self._control("/abort_request", payload)

    async def apause_generation(self, mode: str = "abort") -> None:
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
        await self._control("/pause_generation", {"mode": mode})

    async def acontinue_generation(self) -> None:
        await self._control("/continue_generation", {})

    async def aflush_cache(self) -> bool:
        """True when every worker flushed; False when one refused because requests are running (HTTP 400)."""

        async def flush(base: str) -> bool:
            try:
                await self._call("POST", base, "/flush_cache")
            except EngineError as exc:
                if exc.status == 400:
                    return False
                raise
            return True

        return all(await self._fan_out(flush(u) for u in self.control_urls))

    # ---- memory (RL colocation) ----

    async def arelease_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Every worker frees its memory (`tags`: SGLang's "kv_cache" / "weights"; None = all it can) so a
        colocated trainer can use it; requests wait until `aresume_memory_occupation`."""
        await self._control("/release_memory_occupation", {"tags": tags})

    async def aresume_memory_occupation(self, tags: list[str] | None = None) -> None:
        await self._control("/resume_memory_occupation", {"tags": tags})

    # ---- weights ----

    async def _update(self, endpoint: str, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST one payload per control URL; the response bodies in URL order.
        `{"success": false}` raises EngineError."""

        async def one(base: str, payload: dict[str, Any]) -> dict[str, Any]:
            body = await self._call("POST", base, endpoint, payload)
            if isinstance(body, dict) and body.get("success") is False:
                raise EngineError(f"{base}{endpoint} failed: {error_message(body)}", url=base, endpoint=endpoint)
            return body

        return await self._fan_out(one(u, p) for u, p in zip(self.control_urls, payloads))

    def _same_for_all(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        return [payload] * len(self.control_urls)

    # ---- info ----

    async def ahealth(self) -> bool:
        """True when `url` and every control URL answer GET /health with 2xx (one try each, no retries)."""

        async def ok(base: str) -> bool:
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    async with self._state().session.get(base + "/health", headers=self._headers()) as resp:
                        return resp.status < 300
            except (aiohttp.ClientError, TimeoutError, OSError):
                return False

        return all(await asyncio.gather(*(ok(u) for u in dict.fromkeys([self.url, *self.control_urls]))))

    async def _get_first(self, base: str, endpoints: tuple[str, ...]) -> Any:
        """GET the first endpoint that exists (newer SGLang renamed several; 404 -> try the next)."""
        for endpoint in endpoints[:-1]:
            try:
                return await self._call("GET", base, endpoint)
            except EngineError as exc:
                if exc.status != 404:
                    raise
        return await self._call("GET", base, endpoints[-1])

    async def aget_model_info(self) -> dict[str, Any]:
        return await self._get_first(self.url, ("/model_info", "/get_model_info"))

    async def aget_server_info(self) -> dict[str, Any]:
        return await self._get_first(self.url, ("/server_info", "/get_server_info"))

    async def aget_weight_version(self) -> int:
        """The lowest version any worker serves (the stalest one bounds off-policyness)."""

        async def version(base: str) -> int:
            info = await self._get_first(base, ("/model_info", "/get_model_info", "/get_weight_version"))
            if not isinstance(info, dict) or "weight_version" not in info:
                raise EngineError(f"{base}: model info has no weight_version: {str(info)[:200]}", url=base)
            return weight_version_int(info["weight_version"])

        return min(await self._fan_out(version(u) for u in self.control_urls))

    async def aclose(self) -> None:
        """Close this event loop's HTTP session."""
        with self._states_lock:
            state = self._states.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.session.close()

    async def __aenter__(self) -> "EngineClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ---- sync wrappers (RolloutEngine) ----

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._thread_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="engine-client", daemon=True)
                self._thread.start()
            loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise RuntimeError("EngineClient sync methods cannot run on the client's own event loop; use the a* API")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        return self._run(self.agenerate(requests))

    def abort(self, rid: str | None = None) -> None:
        self._run(self.aabort(rid))

    def pause_generation(self, mode: str = "abort") -> None:
        self._run(self.apause_generation(mode))

    def continue_generation(self) -> None:
        self._run(self.acontinue_generation())

    def flush_cache(self) -> bool:
        return self._run(self.aflush_cache())

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._run(self.arelease_memory_occupation(tags))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._run(self.aresume_memory_occupation(tags))

    def health(self) -> bool:
        return self._run(self.ahealth())

    def get_weight_version(self) -> int:
        return self._run(self.aget_weight_version())

    def get_server_info(self) -> dict[str, Any]:
        return self._run(self.aget_server_info())

    def close(self) -> None:
        """Close the private loop's session and stop its thread (sessions of other loops: `aclose`)."""
        with self._thread_lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.aclose(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def __enter__(self) -> "EngineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SGLangClient = EngineClient
