"""Weight-update endpoints of the HTTP server (SGLang protocol, reference section 3).

Every endpoint answers `{"success": bool, "message": str}` with 200 / 400,
runs under the server's weight lock (updates apply in arrival order), and
does its blocking work (torch.load, disk reads, collective receives, group
rendezvous) in the server's thread pool. The engine validates a whole update
before applying it, so a failed update changes nothing.

`weight_version` in a request is an int or an integer-like string (this
server uses integer versions); absent, the version stays as it is.

Payloads:
- `/update_weights_from_tensor`: `serialized_named_tensors` = one base64 blob
  (one TP rank) of `torch.save(obj)` bytes, loaded with `weights_only=True`,
  or of a CUDA-IPC pickle as real SGLang takes it (see `rollout.wire`);
  obj is a list of (name, tensor) pairs, or with `load_format="flattened_bucket"`
  SGLang's dict `{"flattened_tensor": 1-D tensor, "metadata": [FlattenedTensorMetadata]}`
  or ours `{"flattened_tensor": uint8 tensor, "metadata": [{name, dtype, shape, offset}]}`.
- `/update_weights_from_distributed`: rank 0 broadcasts one tensor per name
  in order, or with `load_format="flattened_bucket"` ONE flat buffer laid out
  as SGLang lays it out (`slime_rl.buckets.dense_layout`: the listed tensors'
  bytes back to back, no padding; a single-dtype bucket may be sent in that dtype).
  Groups form as SGLang forms them (`slime_rl.dist_group`).
- `/update_weights_from_shared_memory` (ours): `{"path", "metadata"}`, a file the
  trainer created (normally under /dev/shm, basename `slime_rl_wsync_*`) holding
  a bucket in the same layout. The server maps it once per path (MAP_SHARED,
  re-mapped when the file's inode or size changes) and reads the tensors as
  views of the mapping; `/release_shared_memory` drops mappings.

Staged updates (ours; the engine's `stage_weights` / `commit_weights`): with
a `transfer_id`, the tensor, distributed and shared-memory endpoints stage
what they received instead of applying it, and then IGNORE `weight_version`,
`flush_cache` and `abort_all_requests`; `/commit_weight_update` applies the
whole transfer at once, `/abort_weight_update` drops it. Staging keeps the
received tensors without a copy (broadcast receives and decoded payloads are
the server's own; IPC tensors and shared-memory views stay valid because the
trainer does not rewrite them before the commit). The weight lock serializes
weight endpoints among themselves only: generation never waits for it, so it
runs on the old weights while a transfer is staged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import re
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import torch
from aiohttp import web

from rollout import versions, wire
from rollout.shm import SharedMemoryMappings, shared_memory_path
from rollout.http_json import BadRequest, get_field, json_response, read_json, require, short
from slime_rl.buckets import bucket_layout, dense_layout, dtype_from_name, unpack_bucket
from slime_rl.dist_group import WeightGroup, init_weight_group
from slime_rl.types import WeightBucket

if TYPE_CHECKING:
    from rollout.server import ServerState

log = logging.getLogger(__name__)
_INT_RE = re.compile(r"^[+-]?\d+$")


def weight_result(success: bool, message: str, **extra: Any) -> web.Response:
    return json_response({"success": success, "message": message, **extra}, status=200 if success else 400)


def parse_weight_version(state: ServerState | None, value: Any, current: int, key: str = "weight_version") -> int:
    """The engine's integer version for a request's `key` (None keeps `current`): an int, an integer-like
    string, or any other string label (rollout.versions). With `state` None the value is only checked."""
    if value is None:
        return current
    try:
        if state is None:
            versions.check(value, key)
            return current
        return state.versions.ordinal(value, key)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def decode_tensor_payload(serialized: Any, load_format: Any) -> list[tuple[str, torch.Tensor]] | WeightBucket:
    """`wire.decode_tensor_payload`, its errors as 400s."""
    try:
        return wire.decode_tensor_payload(serialized, load_format)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


def max_update_bytes(engine: Any) -> int:
    """The most bytes one update may announce: the whole model twice over (fp32 tensors for a bf16 model)."""
    return 2 * sum(p.numel() * p.element_size() for p in engine.model.parameters()) + 2**20


def receive_tensors(group: WeightGroup, names: list[str], dtypes: list[str], shapes: list[list[int]],
                    flattened: bool) -> list[tuple[str, torch.Tensor]] | WeightBucket:
    """Receive rank 0's broadcasts (blocking): one per tensor in order, or one flat buffer."""
    if flattened:
        entries, nbytes = dense_layout(names, dtypes, shapes)
        buffer = group.broadcast(torch.empty(nbytes, dtype=torch.uint8, device=group.device), src=0)
        return WeightBucket(buffer, entries)
    return [(name, group.broadcast(torch.empty(shape, dtype=dtype_from_name(dtype), device=group.device), src=0))
            for name, dtype, shape in zip(names, dtypes, shapes)]


# ---- handlers ---------------------------------------------------------------------------

Handler = Callable[["ServerState", dict], Awaitable[web.Response]]


async def _apply(state: ServerState, body: dict, where: str, update: Callable, payload: Any) -> web.Response:
    """Abort if asked, then run the engine update."""
    version = parse_weight_version(state, body.get("weight_version"), state.engine.get_weight_version())
    flush = get_field(body, "flush_cache", (bool,), True, where)
    if get_field(body, "abort_all_requests", (bool,), False, where):
        await state.blocking(state.engine.abort, None)
    await state.blocking(update, payload, version, flush_cache=flush)
    message = "Succeeded to update model weights."
    if body.get("weight_version") is not None:
        message += f" Weight version updated to {state.versions.label(version)}."
    return weight_result(True, message, num_paused_requests=0)


def _update_fn(engine: Any, payload: Any) -> Callable:
    if isinstance(payload, WeightBucket):
        return engine.update_weights_from_bucket
    return engine.update_weights_from_tensors


def _transfer_id(body: dict, where: str) -> str | None:
    transfer_id = get_field(body, "transfer_id", (str,), None, where)
    if transfer_id == "":
        raise BadRequest(f"{where}.transfer_id must be a non-empty string or null")
    return transfer_id


async def _stage_or_apply(state: ServerState, body: dict, where: str, transfer_id: str | None,
                          payload: list[tuple[str, torch.Tensor]] | WeightBucket) -> web.Response:
    """Stage the received tensors without a copy under `transfer_id`, or (None) apply them now."""
    if transfer_id is None:
        return await _apply(state, body, where, _update_fn(state.engine, payload), payload)
    named = unpack_bucket(payload) if isinstance(payload, WeightBucket) else payload
    staged = await state.blocking(state.engine.stage_weights, named, transfer_id, copy=False)
    return weight_result(True, f"Staged {len(named)} tensors for transfer {transfer_id!r} ({staged} staged).",
                         num_staged=staged)


async def update_weights_from_disk(state: ServerState, body: dict) -> web.Response:
    path = require(body, "model_path", (str,), "update_weights_from_disk")
    response = await _apply(state, body, "update_weights_from_disk", state.engine.update_weights_from_disk, path)
    state.model_path = os.path.abspath(path)  # /model_info names what is served now (as SGLang)
    return response


async def update_weights_from_tensor(state: ServerState, body: dict) -> web.Response:
    transfer_id = _transfer_id(body, "update_weights_from_tensor")
    if transfer_id is None:
        parse_weight_version(None, body.get("weight_version"), 0)  # a bad version fails before the work
    payload = await state.blocking(decode_tensor_payload, body.get("serialized_named_tensors"),
                                   body.get("load_format"))
    return await _stage_or_apply(state, body, "update_weights_from_tensor", transfer_id, payload)


GROUP_INIT_GRACE_S = 2.0  # beyond the rendezvous timeout, before the handler gives up on the joining thread


async def init_weights_update_group(state: ServerState, body: dict) -> web.Response:
    """Join the trainer's group as rank `rank_offset` (blocks until every rank arrived, at most
    `limits.group_init_timeout_s`: then the weight lock is released and the late group, if it ever
    forms, is destroyed). The join runs on a daemon thread of its own, so a peer that never answers
    holds neither a pool thread nor the process at exit."""
    where = "init_weights_update_group"
    name = get_field(body, "group_name", (str,), "weight_update_group", where)
    if name in state.groups:
        raise BadRequest(f"weight group {short(name)} already exists; destroy it first")
    on_gpu = torch.cuda.is_available() and torch.device(state.engine.device).type == "cuda"
    address = require(body, "master_address", (str,), where)
    port = require(body, "master_port", (int,), where)
    rank, world_size = require(body, "rank_offset", (int,), where), require(body, "world_size", (int,), where)
    backend = get_field(body, "backend", (str,), "nccl" if on_gpu else "gloo", where)
    if not 0 < port < 65536:
        raise BadRequest(f"{where}.master_port must be in [1, 65535], got {port}")
    if not 0 < rank < world_size:
        raise BadRequest(f"{where}: rank_offset must be in [1, world_size) (the trainer is rank 0), got rank_offset "
                         f"{rank} and world_size {world_size}")
    timeout = state.limits.group_init_timeout_s
    loop = asyncio.get_running_loop()
    joined: asyncio.Future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:  # on the loop
        if joined.cancelled():  # the handler gave up: a late group is nobody's
            if error is None:
                result.destroy()
        elif error is not None:
            joined.set_exception(error)
        else:
            joined.set_result(result)

    def join() -> None:  # on the joining thread
        group, error = None, None
        try:
            group = init_weight_group(address, port, rank, world_size, backend=backend, group_name=name,
                                      timeout_s=timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the handler
            error = exc
        try:
            loop.call_soon_threadsafe(settle, group, error)
        except RuntimeError:  # the server stopped meanwhile: nobody will use this group
            if group is not None:
                group.destroy()

    threading.Thread(target=join, name=f"slime-rl-group-init:{name}", daemon=True).start()
    try:
        group = await asyncio.wait_for(joined, timeout + GROUP_INIT_GRACE_S)
    except asyncio.TimeoutError:
        raise BadRequest(f"{where}: rank {rank} could not join group {short(name)} at {short(address)}:{port} "
                         f"within {timeout} s (--group-init-timeout-s)") from None
    except (RuntimeError, OSError) as exc:
        log.warning("%s failed: %r", where, exc)
        raise BadRequest(f"{where}: rank {rank} could not join group {short(name)} at {short(address)}:{port} "
                         f"(timeout {timeout} s); the server log has the details") from None
    state.groups[name] = group
    return weight_result(True, "Succeeded to initialize custom process group.")


async def update_weights_from_distributed(state: ServerState, body: dict) -> web.Response:
    where = "update_weights_from_distributed"
    names = require(body, "names", (list,), where)
    dtypes = require(body, "dtypes", (list,), where)
    shapes = require(body, "shapes", (list,), where)
    if not len(names) == len(dtypes) == len(shapes):
        raise BadRequest(f"names ({len(names)}), dtypes ({len(dtypes)}) and shapes ({len(shapes)}) must align")
    if not all(isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in shapes):
        raise BadRequest("shapes must be lists of non-negative integers")
    if not all(isinstance(n, str) for n in names):
        raise BadRequest(f"{where}.names must be a list of strings")
    if not all(isinstance(d, str) for d in dtypes):
        raise BadRequest(f"{where}.dtypes must be a list of dtype names such as 'bfloat16'")
    load_format = body.get("load_format")
    layout = dense_layout if load_format == "flattened_bucket" else bucket_layout
    _, nbytes = layout(names, dtypes, shapes)  # a bad dtype (or SGLang-unaligned tensor) fails before any receive
    cap = max_update_bytes(state.engine)
    if nbytes > cap:
        raise BadRequest(f"{where}: the announced tensors hold {nbytes} bytes, more than twice the model "
                         f"({cap} bytes); refusing to allocate them")
    if load_format not in (None, "flattened_bucket"):
        raise BadRequest(f"load_format must be null or 'flattened_bucket', got {load_format!r}")
    name = get_field(body, "group_name", (str,), "weight_update_group", where)
    if name not in state.groups:
        raise BadRequest(f"no weight group {name!r}; call /init_weights_update_group first")
    transfer_id = _transfer_id(body, where)
    if transfer_id is None:
        parse_weight_version(None, body.get("weight_version"), 0)
    payload = await state.blocking(receive_tensors, state.groups[name], names, dtypes, shapes,
                                   load_format == "flattened_bucket")
    return await _stage_or_apply(state, body, where, transfer_id, payload)


async def update_weights_from_shared_memory(mappings: SharedMemoryMappings, state: ServerState,
                                            body: dict) -> web.Response:
    where = "update_weights_from_shared_memory"
    path = shared_memory_path(require(body, "path", (str,), where))
    entries = wire.bucket_entries(require(body, "metadata", (list,), where))
    transfer_id = _transfer_id(body, where)
    if transfer_id is None:
        parse_weight_version(None, body.get("weight_version"), 0)
    buffer = await state.blocking(mappings.get, path)
    return await _stage_or_apply(state, body, where, transfer_id, WeightBucket(buffer, entries))


async def release_shared_memory(mappings: SharedMemoryMappings, state: ServerState, body: dict) -> web.Response:
    path = get_field(body, "path", (str,), None, "release_shared_memory")
    released = mappings.release(path)
    return weight_result(True, f"Released {released} shared-memory mappings.", released=released)


async def commit_weight_update(state: ServerState, body: dict) -> web.Response:
    """Apply the staged transfer (engine.commit_weights); any failure drops the staging."""
    where = "commit_weight_update"
    transfer_id = require(body, "transfer_id", (str,), where)
    version = parse_weight_version(state, require(body, "weight_version", (int, str), where), 0)
    flush = get_field(body, "flush_cache", (bool,), True, where)
    expected = get_field(body, "expected_tensors", (int,), None, where)
    adopt = get_field(body, "adopt", (bool,), False, where)
    if get_field(body, "abort_all_requests", (bool,), False, where):
        await state.blocking(state.engine.abort, None)
    result = await state.blocking(state.engine.commit_weights, transfer_id, version, flush_cache=flush,
                                  expected_tensors=expected, adopt=adopt)
    return weight_result(True, f"Succeeded to commit weight update {transfer_id!r} ({result['num_tensors']} "
                               f"tensors). Weight version updated to {state.versions.label(version)}.",
                         **result, weight_version=state.versions.label(version))


async def abort_weight_update(state: ServerState, body: dict) -> web.Response:
    transfer_id = get_field(body, "transfer_id", (str,), None, "abort_weight_update")
    dropped = await state.blocking(state.engine.abort_weight_update, transfer_id)
    message = "Dropped the staged weight update." if dropped else "No matching staged weight update."
    return weight_result(True, message, dropped=dropped)


async def weights_checksum(state: ServerState, body: dict) -> web.Response:
    names = get_field(body, "names", (list,), None, "weights_checksum")
    if names is not None and not all(isinstance(n, str) for n in names):
        raise BadRequest("weights_checksum.names must be a list of strings or null")
    checksums = await state.blocking(state.engine.weights_checksum, names)
    return json_response({"success": True, "message": f"{len(checksums)} checksums.",
                              "weight_version": state.versions.label(state.engine.get_weight_version()),
                              "algorithm": "sha256",
                              "checksums": checksums})


async def destroy_weights_update_group(state: ServerState, body: dict) -> web.Response:
    name = get_field(body, "group_name", (str,), "weight_update_group", "destroy_weights_update_group")
    group = state.groups.pop(name, None)
    if group is None:
        raise BadRequest(f"no weight group {name!r}")
    await state.blocking(group.destroy)
    return weight_result(True, "Succeeded to destroy custom process group.")


async def update_weight_version(state: ServerState, body: dict) -> web.Response:
    where = "update_weight_version"
    version = parse_weight_version(state, require(body, "new_version", (str, int), where), 0, key="new_version")
    if get_field(body, "abort_all_requests", (bool,), True, where):
        await state.blocking(state.engine.abort, None)
    # An empty update stamps the version without touching weights or the cache.
    await state.blocking(state.engine.update_weights_from_tensors, [], version, flush_cache=False)
    label = state.versions.label(version)
    return weight_result(True, f"Weight version updated to {label}.", new_version=label)


SHM_HANDLERS = ("/update_weights_from_shared_memory", "/release_shared_memory")
HANDLERS: dict[str, Handler] = {
    "/update_weights_from_disk": update_weights_from_disk,
    "/update_weights_from_tensor": update_weights_from_tensor,
    "/init_weights_update_group": init_weights_update_group,
    "/update_weights_from_distributed": update_weights_from_distributed,
    "/destroy_weights_update_group": destroy_weights_update_group,
    "/update_weight_version": update_weight_version,
    "/commit_weight_update": commit_weight_update,
    "/abort_weight_update": abort_weight_update,
    "/weights_checksum": weights_checksum,
}
GET_TOO = ("/weights_checksum",)  # also answered on GET (no body: every parameter)
PATHS = frozenset(HANDLERS) | frozenset(SHM_HANDLERS)  # routes whose bodies may carry tensors


def add_routes(app: web.Application, get_state: Callable[[web.Request], ServerState]) -> None:
    """POST routes for every weight endpoint (GET too for `GET_TOO`); failures become
    `{"success": false, ...}` (400). The app owns one set of shared-memory mappings."""
    mappings = SharedMemoryMappings()
    handlers: dict[str, Handler] = {
        **HANDLERS,
        "/update_weights_from_shared_memory": functools.partial(update_weights_from_shared_memory, mappings),
        "/release_shared_memory": functools.partial(release_shared_memory, mappings),
    }

    def wrap(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        @functools.wraps(handler)
        async def endpoint(request: web.Request) -> web.Response:
            state = get_state(request)
            try:
                body = await read_json(request, optional=True)
                async with state.weight_lock:
                    return await handler(state, body)
            except ValueError as exc:  # BadRequest and the engine's validation: our own messages
                log.warning("%s failed: %s", request.path, exc)
                return weight_result(False, f"{request.path}: {exc}")
            except (TypeError, OSError, RuntimeError, asyncio.TimeoutError):  # transport or I/O failures
                log.exception("%s failed", request.path)
                return weight_result(False, f"{request.path} failed inside the server; the server log has the "
                                            f"details")

        return endpoint

    for path, handler in handlers.items():
        app.router.add_post(path, wrap(handler))
        if path in GET_TOO:
            app.router.add_get(path, wrap(handler))

    async def release_all(app: web.Application) -> None:
        mappings.release(None)

    app.on_cleanup.append(release_all)
