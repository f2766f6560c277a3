"""The SGLang-protocol HTTP server of the embedded engine (aiohttp).

Anything that talks to an SGLang server (our `rollout.client`, sglang-router
0.3.2, OpenAI clients) talks to this one; field names and shapes follow
SGLang's native HTTP API. Request parsing and response
shaping live in `rollout.protocol`, JSON and error bodies in
`rollout.http_json`, connection guards in `rollout.http_conn`,
OpenAI-compatible routes in `rollout.openai_api`, weight routes in
`rollout.weight_api`.

    app = create_app(engine, tokenizer, model_path=...)       # an aiohttp Application
    with BackgroundServer(engine, tokenizer) as server:        # its own event-loop thread
        requests.post(server.url + "/generate", ...)
    slime-rl serve --model DIR --port 30000                    # a process (rollout/serve.py)

Concurrency: the engine's scheduler runs on its own thread; generation
handlers only submit and await callbacks. Request work that grows with the
request (JSON parsing of large bodies, validation, submission, response
shaping) runs in the `work` thread pool and blocking weight work (loading,
torch.load, collective receives, group rendezvous) in the `executor` pool, so
the event loop keeps answering `/health`. Weight operations are serialized by
one lock.

Safety (README "Security"): no request can hurt another one.
- Authentication: with `api_key`, every route but `/health` needs
  `Authorization: Bearer <key>` (as SGLang); with `admin_api_key`, the
  weight and control routes (`ADMIN_PATHS`) need that key instead, and it is
  accepted on the other routes too.
- Limits (`rollout.limits.ServerLimits`), checked before a request is queued:
  body size (a larger one for weight routes), no compressed bodies, `n`,
  prompts per request, stop sequences, engine requests in flight (429
  beyond), header and body read timeouts.
- Every malformed input is a 4xx naming the field; an unexpected error is a
  500 whose body names no exception (the log has the traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from aiohttp import web

import slime_rl
from rollout import openai_api, weight_api
from rollout.http_conn import guarded_runner
from rollout.http_json import (
    INLINE_PARSE_BYTES,
    INLINE_SUBMIT,
    SSE_DONE,
    BadRequest,
    TooManyRequests,
    dumps,
    dumps_items,
    engine_error_response,
    error_response,
    get_field,
    json_response,
    read_json,
    short,
    sse,
    start_sse,
)
from rollout.limits import ServerLimits
from rollout.protocol import (
    Submission,
    generate_response,
    new_rid,
    parse_generate,
)
from rollout.versions import WeightVersions
from slime_rl.dist_group import WeightGroup
from slime_rl.types import GenerateRequest, SamplingParams

log = logging.getLogger(__name__)

ADMIN_PATHS = frozenset({
    "/update_weights_from_disk", "/update_weights_from_tensor", "/update_weights_from_distributed",
    "/update_weights_from_shared_memory", "/release_shared_memory", "/commit_weight_update",
    "/abort_weight_update", "/weights_checksum",
    "/init_weights_update_group", "/destroy_weights_update_group", "/update_weight_version",
    "/pause_generation", "/continue_generation", "/flush_cache", "/abort_request",
    "/release_memory_occupation", "/resume_memory_occupation",
})
OPEN_PATHS = frozenset({"/health"})  # a router or supervisor probes it without a key (as SGLang)
HEALTH_GENERATE_TIMEOUT_S = 20.0
WEIGHT_UPDATE_TRANSPORTS = ["tensor", "distributed", "shared_memory", "disk"]
FLUSHED_TEXT = ("Cache flushed.\nPlease check backend logs for more details. "
                "(When there are running or waiting requests, the operation will not be performed.)\n")


@dataclass
class ServerState:
    """What every handler needs (stored on the app under `STATE`)."""

    engine: Any
    tokenizer: Any
    model_path: str
    tokenizer_path: str
    served_model_name: str
    api_key: str | None
    executor: ThreadPoolExecutor  # blocking weight work
    work: ThreadPoolExecutor  # request parsing, submission and response shaping
    admin_api_key: str | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    weight_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    groups: dict[str, WeightGroup] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0  # engine requests admitted by `admit` and not finished
    versions: WeightVersions = field(default_factory=WeightVersions)  # SGLang's string versions <-> ordinals

    @property
    def eos_token_id(self) -> int | None:
        return getattr(self.tokenizer, "eos_token_id", None)

    async def blocking(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking call in the server's thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    async def off_loop(self, fn: Callable, *args: Any, heavy: bool = True, **kwargs: Any) -> Any:
        """Run request work (parsing, submission, shaping) off the event loop; inline when not `heavy`
        (small work costs less than the thread hop, and a small stream's first token is not delayed)."""
        if not heavy:
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.work, functools.partial(fn, *args, **kwargs))

    @contextlib.asynccontextmanager
    async def admit(self, count: int) -> AsyncIterator[None]:
        """Hold `count` of the `max_queued_requests` engine-request slots; TooManyRequests (429) when full."""
        cap = self.limits.max_queued_requests
        if self.in_flight + count > cap:
            raise TooManyRequests(f"the server is busy: {self.in_flight} generations in flight, this request adds "
                                  f"{count}, the limit is {cap} (--max-queued-requests); retry later")
        self.in_flight += count
        try:
            yield
        finally:
            self.in_flight -= count

    def keys_for(self, path: str) -> tuple[str, ...]:
        """The keys any one of which opens `path` (empty: open)."""
        if path in OPEN_PATHS:
            return ()
        if path in ADMIN_PATHS:
            key = self.admin_api_key or self.api_key
            return (key,) if key else ()
        return tuple(k for k in (self.api_key, self.admin_api_key) if k) if self.api_key else ()


STATE = web.AppKey("slime_rl_server_state", ServerState)


def get_state(request: web.Request) -> ServerState:
    return request.app[STATE]


# ---- middleware ------------------------------------------------------------------------


def _bearer_matches(header: str, key: str) -> bool:
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: encode them back the same way.
    return hmac.compare_digest(header.encode("utf-8", "surrogateescape"), f"Bearer {key}".encode())


@web.middleware
async def auth_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    keys = request.app[STATE].keys_for(request.path)
    if keys:
        given = request.headers.get("Authorization", "")
        if not any(_bearer_matches(given, key) for key in keys):
            which = "admin api key" if request.path in ADMIN_PATHS and request.app[STATE].admin_api_key else "api key"
            why = "missing" if not given else "wrong"
            return error_response(f"{request.path} needs 'Authorization: Bearer <{which}>' ({why} header)", 401)
    return await handler(request)


def _refuse_body(message: str, status: int) -> web.Response:
    """An error for a body that is not read (or not wholly): the connection closes after it."""
    response = error_response(message, status)
    response.force_close()
    return response


@web.middleware
async def body_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Refuse compressed and oversized bodies before reading them; read the body within the timeout."""
    limits = request.app[STATE].limits
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        return _refuse_body(f"{request.path}: compressed request bodies (Content-Encoding: {short(encoding, 40)}) "
                              f"are not accepted; send the body uncompressed", 415)
    weights = request.path in weight_api.PATHS
    limit = limits.max_weight_body_bytes if weights else limits.max_body_bytes
    flag = "--max-weight-body-mb" if weights else "--max-body-mb"
    too_large = f"{request.path}: the request body exceeds {limit} bytes ({flag})"
    if request.content_length is not None and request.content_length > limit:
        return _refuse_body(too_large, 413)
    if request.body_exists:
        request = request.clone(client_max_size=limit)
        try:
            await asyncio.wait_for(request.read(), limits.body_timeout_s)
        except asyncio.TimeoutError:
            return _refuse_body(f"{request.path}: the request body did not arrive within "
                                  f"{limits.body_timeout_s} s (--body-timeout-s)", 408)
        except web.HTTPRequestEntityTooLarge:
            return _refuse_body(too_large, 413)
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """No request may kill the server: validation errors -> 4xx with our message; anything unexpected ->
    500 whose body names no exception (the traceback goes to the log)."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except BadRequest as exc:
        return error_response(str(exc), exc.status)
    except Exception:  # noqa: BLE001 - the server must stay up
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(f"internal error in {request.method} {request.path}; see the server log", 500)


# ---- generation -------------------------------------------------------------------------


async def generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    parsed = await state.off_loop(parse_generate, body, state.tokenizer, state.eos_token_id, state.limits,
                                  heavy=request.content_length is None or request.content_length > INLINE_PARSE_BYTES)
    async with state.admit(len(parsed.items)):
        sub = Submission(state.engine, [item.request for item in parsed.items], stream=parsed.stream)
        try:
            try:
                await state.off_loop(sub.start, heavy=len(parsed.items) > INLINE_SUBMIT)
            except ValueError as exc:  # e.g. a prompt longer than the context (the message says both lengths)
                return engine_error_response(str(exc))
            if parsed.stream:
                resp = await start_sse(request)
                try:
                    async for updates in sub.updates():
                        for index, out in updates:
                            chunk = generate_response(parsed.items[index], out, state.tokenizer, state.versions)
                            if not parsed.single:
                                chunk["index"] = index
                            await resp.write(sse(chunk))
                    await resp.write(SSE_DONE)
                except ConnectionResetError:  # the client went away mid-stream
                    log.info("client of %s disconnected; aborting its requests", request.path)
                return resp
            outs = await sub.results()
        finally:
            sub.abort_unfinished()  # client went away (handler cancelled / write failed)

    def shape() -> str:
        bodies = [generate_response(item, out, state.tokenizer, state.versions)
                  for item, out in zip(parsed.items, outs)]
        return dumps(bodies[0]) if parsed.single else dumps_items(bodies)

    return web.Response(text=await state.off_loop(shape), content_type="application/json")


# ---- request control --------------------------------------------------------------------


async def abort_request(request: web.Request) -> web.Response:
    state, body = request.app[STATE], await read_json(request, optional=True)
    rid = get_field(body, "rid", (str,), "", "abort_request")
    if get_field(body, "abort_all", (bool,), False, "abort_request"):
        await state.blocking(state.engine.abort, None)
    elif rid:
        await state.blocking(state.engine.abort, rid)
    return web.Response(status=200)


async def pause_generation(request: web.Request) -> web.Response:
    state, body = request.app[STATE], await read_json(request, optional=True)
    mode = get_field(body, "mode", (str,), "abort", "pause_generation")
    try:
        await state.blocking(state.engine.pause_generation, mode)
    except ValueError as exc:
        raise BadRequest(f"pause_generation: {exc}") from exc
    return json_response({"message": "Generation paused successfully.", "status": "ok"})


async def continue_generation(request: web.Request) -> web.Response:
    state = request.app[STATE]
    await state.blocking(state.engine.continue_generation)
    return json_response({"message": "Generation continued successfully.", "status": "ok"})


async def flush_cache(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if await state.blocking(state.engine.flush_cache):
        return web.Response(text=FLUSHED_TEXT)
    load = state.engine.load()
    return web.Response(status=400, text=f"Cache not flushed: {load['num_running_reqs']} running and "
                                         f"{load['num_waiting_reqs']} waiting requests.\n")


# ---- memory and info -------------------------------------------------------------------


MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # SGLang's; slime sends ["weights"] and ["kv_cache", "cuda_graph"]


async def _releases_kv(request: web.Request) -> bool:
    """Check SGLang's `tags` (null = all); True when the KV cache is among them. The embedded engine
    keeps its weights resident (so a weight sync can land while the trainer runs) and has no CUDA
    graphs: those tags succeed and do nothing."""
    body = await read_json(request, optional=True)
    tags = get_field(body, "tags", (list,), None, request.path.lstrip("/"))
    if tags is None:
        return True
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown:
        raise BadRequest(f"{request.path}: unknown tags {short(unknown)}; allowed: {list(MEMORY_TAGS)} or null")
    return "kv_cache" in tags


async def release_memory_occupation(request: web.Request) -> web.Response:
    """Free the KV cache pool (requests wait until resume); 200 with body null, as SGLang."""
    state = request.app[STATE]
    if await _releases_kv(request):
        await state.blocking(state.engine.release_memory_occupation)
    return json_response(None)


async def resume_memory_occupation(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if await _releases_kv(request):
        await state.blocking(state.engine.resume_memory_occupation)
    return json_response(None)


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[STATE].engine.health() else 503)


async def health_generate(request: web.Request) -> web.Response:
    """A 1-token greedy generation (rid HEALTH_CHECK_...); 503 if it fails or takes too long."""
    state = request.app[STATE]
    probe = GenerateRequest([0], SamplingParams(max_new_tokens=1, temperature=0.0), rid=f"HEALTH_CHECK_{new_rid()}")
    sub = Submission(state.engine, [probe])
    try:
        sub.start()
        await asyncio.wait_for(sub.results(), HEALTH_GENERATE_TIMEOUT_S)
        return web.Response(status=200)
    except (ValueError, RuntimeError, asyncio.TimeoutError) as exc:
        log.warning("health_generate failed: %r", exc)
        return web.Response(status=503)
    finally:
        sub.abort_unfinished()


def _settings(engine: Any) -> dict[str, Any]:
    """Engine settings for server_info."""
    prefix = engine.enable_prefix_cache
    return {
        "max_running_requests": engine.max_batch_size,
        "page_size": engine.page_size,
        "enable_prefix_cache": bool(prefix), "disable_radix_cache": not prefix,
        "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
    }


def model_info_dict(state: ServerState) -> dict[str, Any]:
    engine = state.engine
    return {
        "model_path": state.model_path, "tokenizer_path": state.tokenizer_path, "is_generation": True,
        "preferred_sampling_params": None, "weight_version": state.versions.label(engine.get_weight_version()),
        "has_image_understanding": False, "has_audio_understanding": False,
        "model_type": engine.config.model_type, "architectures": list(engine.hf_config.get("architectures") or []),
    }


async def model_info(request: web.Request) -> web.Response:
    return json_response(model_info_dict(request.app[STATE]))


async def server_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = state.engine
    load = engine.load()
    return json_response({
        **model_info_dict(state),
        "served_model_name": state.served_model_name, "tp_size": 1, "dp_size": 1,
        "load_balance_method": "round_robin", "disaggregation_mode": "null", **_settings(engine),
        "max_total_tokens": load["max_total_num_tokens"], "max_total_num_tokens": load["max_total_num_tokens"],
        "context_length": engine.context_len, "max_req_input_len": engine.context_len - 1,
        "status": "ready", "version": slime_rl.__version__,
        "weight_update_staging": True, "weight_update_transports": WEIGHT_UPDATE_TRANSPORTS,
        "internal_states": [{**load, **engine.stats()}],
    })


async def get_load(request: web.Request) -> web.Response:
    load = request.app[STATE].engine.load()
    return json_response([{
        "dp_rank": 0, "num_reqs": load["num_running_reqs"] + load["num_waiting_reqs"],
        "num_waiting_reqs": load["num_waiting_reqs"], "num_tokens": load["num_used_tokens"],
    }])


LOAD_SECTIONS = ("core", "memory", "spec", "lora", "disagg", "queues", "all")


async def get_loads_v1(request: web.Request) -> web.Response:
    """SGLang's `GET /v1/loads[?include=core,...][&dp_rank=N]`: one load snapshot per DP rank (this server
    has one). slime polls it after `abort_request` until the worker is idle. Sections other than core
    carry what the embedded engine has (memory: the KV pool); the rest are empty."""
    state = request.app[STATE]
    include = [s for part in request.query.getall("include", ["core"]) for s in part.split(",") if s]
    unknown = [s for s in include if s not in LOAD_SECTIONS]
    if unknown:
        raise BadRequest(f"/v1/loads: unknown include sections {short(unknown)}; allowed: {list(LOAD_SECTIONS)}")
    dp_rank = request.query.get("dp_rank")
    if dp_rank is not None and not (dp_rank.isdigit() and len(dp_rank) < 6):
        raise BadRequest(f"/v1/loads: dp_rank must be a non-negative integer, got {short(dp_rank)}")
    load, stats, engine = state.engine.load(), state.engine.stats(), state.engine
    total = load["max_total_num_tokens"]
    snapshot: dict[str, Any] = {
        "dp_rank": 0, "timestamp": time.time(),
        "num_running_reqs": load["num_running_reqs"], "num_waiting_reqs": load["num_waiting_reqs"],
        "num_used_tokens": load["num_used_tokens"], "num_total_tokens": total, "max_total_num_tokens": total,
        "token_usage": load["num_used_tokens"] / total if total else 0.0,
        "gen_throughput": 0.0, "cache_hit_rate": stats["cache_hit_rate"],
        "utilization": load["num_running_reqs"] / engine.max_batch_size,
        "max_running_requests": engine.max_batch_size,
    }
    if "memory" in include or "all" in include:
        snapshot["memory"] = {"kv_cache_released": engine.is_memory_released(), "num_total_tokens": total}
    loads = [snapshot] if dp_rank in (None, "0") else []
    return json_response({"timestamp": snapshot["timestamp"], "dp_rank_count": 1, "loads": loads})


async def get_weight_version(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response({"weight_version": state.versions.label(state.engine.get_weight_version())})


# ---- the application --------------------------------------------------------------------


def create_app(engine: Any, tokenizer: Any = None, *, model_path: str = "", tokenizer_path: str = "",
               served_model_name: str | None = None, api_key: str | None = None,
               admin_api_key: str | None = None, limits: ServerLimits | None = None) -> web.Application:
    """The aiohttp application serving `engine` (owned by the caller: the app never closes it).
    An empty `api_key` / `admin_api_key` is refused: leave it None to serve without one."""
    for name, key in (("api_key", api_key), ("admin_api_key", admin_api_key)):
        if key is not None and not key.strip():
            raise ValueError(f"{name} must be a non-empty string (None serves without one)")
    limits = (limits or ServerLimits()).validate()
    app = web.Application(middlewares=[error_middleware, auth_middleware, body_middleware],
                          client_max_size=limits.max_weight_body_bytes)
    state = ServerState(engine, tokenizer, model_path, tokenizer_path or model_path,
                        served_model_name or model_path or "default", api_key,
                        ThreadPoolExecutor(max_workers=4, thread_name_prefix="slime-rl-weights"),
                        ThreadPoolExecutor(max_workers=4, thread_name_prefix="slime-rl-requests"),
                        admin_api_key=admin_api_key, limits=limits)
    app[STATE] = state

    async def cleanup(app: web.Application) -> None:
        for group in state.groups.values():
            group.destroy()
        for pool in (state.executor, state.work):
            pool.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(cleanup)
    r = app.router
    r.add_post("/generate", generate)
    r.add_put("/generate", generate)
    for path, handler in [("/abort_request", abort_request), ("/pause_generation", pause_generation),
                          ("/continue_generation", continue_generation)]:
        r.add_post(path, handler)
    for path, handler in [("/flush_cache", flush_cache), ("/release_memory_occupation", release_memory_occupation),
                          ("/resume_memory_occupation", resume_memory_occupation)]:
        r.add_route("GET", path, handler)
        r.add_post(path, handler)
    for path, handler in [("/health", health), ("/health_generate", health_generate),
                          ("/model_info", model_info), ("/get_model_info", model_info),
                          ("/server_info", server_info), ("/get_server_info", server_info),
                          ("/get_load", get_load), ("/v1/loads", get_loads_v1),
                          ("/get_weight_version", get_weight_version)]:
        r.add_get(path, handler)
    weight_api.add_routes(app, get_state)
    openai_api.add_routes(app, get_state)
    return app


def make_runner(app: web.Application) -> web.AppRunner:
    """The runner serving `app` with its connection guards (`rollout.http_conn`)."""
    return guarded_runner(app, header_timeout_s=app[STATE].limits.header_timeout_s)


class BackgroundServer:
    """Serve `create_app(engine, ...)` on its own event-loop thread (tests, in-process rollout)."""

    def __init__(self, engine: Any, tokenizer: Any = None, *, host: str = "127.0.0.1", port: int = 0,
                 **create_app_kwargs: Any):
        self.app = create_app(engine, tokenizer, **create_app_kwargs)
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "BackgroundServer":
        """Bind and start serving; returns once the port is bound (raises what binding raised)."""
        self._thread = threading.Thread(target=self._run, name=f"slime-rl-server:{self.port}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        runner = make_runner(self.app)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            self._started.set()
            loop.run_until_complete(runner.cleanup())
            loop.close()
            return
        self._started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    def stop(self) -> None:
        """Stop serving (in-flight requests are aborted); the engine stays open."""
        if self._thread is None or self._loop is None:
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
