"""An SGLang-style server for weight-sync tests: SGLang's HTTP routes for broadcast weight updates and
SGLang's receive sequence, nothing of ours (imports torch, aiohttp and the standard library only).

    python tests/sglang_style_server.py --port P --config HF_CONFIG.json [--dtype float32]

SGLang itself is not installed here; its side is reproduced from its source (SGLang 0.5.x):

- routes and answers: `sglang/srt/entrypoints/http_server.py` (`init_weights_update_group`,
  `update_weights_from_distributed`, `destroy_weights_update_group`, `update_weight_version`,
  `pause_generation`, `continue_generation`, `flush_cache`, `model_info` / `get_model_info`,
  `server_info` / `get_server_info`, `health`); failures answer HTTP 400 `{"success": false, "message"}`.
  `/server_info` has no `weight_update_staging` / `weight_update_transports` keys (ours only), so a
  client sees a server that applies each bucket as it arrives;
- the group: `sglang/srt/utils/common.py::init_custom_process_group` (rendezvous on "tcp://ADDR:PORT",
  `store.set_timeout`, `PrefixStore(group_name, store)`, `_new_process_group_helper(world_size, rank, [],
  backend, store, group_name=..., backend_options=None, timeout=...)`, `_world.pg_group_ranks[pg] =
  {i: i}`), called by `model_runner.py::init_weights_update_group` with rank = rank_offset + tp_rank
  (this server is one TP rank: tp_rank 0); groups are kept by name (`_model_update_group[group_name]`);
  no warm-up collective;
- receiving: `model_runner.py::update_weights_from_distributed` (per tensor: `torch.empty(shape, dtype)`
  then `dist.broadcast(weight, src=0, group=..., async_op=True)` for all, then wait) and
  `_update_bucketed_weights_from_distributed` with `load_format="flattened_bucket"`:
  `sglang/srt/weight_sync/tensor_bucket.py::FlattenedTensorBucket` (`empty()` allocates ONE dense uint8
  buffer = the listed tensors' bytes back to back, no padding; `reconstruct_tensors` slices and views it
  by names/dtypes/shapes in order), then `model.load_weights(named_tensors)`; here "loading" stores the
  tensors by name after checking each against the HF config's parameter names and shapes (as a Qwen2 /
  Llama `load_weights` would fail on an unknown name; a tied `lm_head.weight` is skipped as
  `Qwen2ForCausalLM.load_weights` does).

Test-only routes: `GET /received_sha256` -> {name: sha256 hex of the tensor's contiguous CPU bytes}
(as `slime_rl.buckets.tensor_sha256`), `GET /requests_log` -> [[route, body], ...] of the update calls.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import threading
from datetime import timedelta

import torch
import torch.distributed as dist
from aiohttp import web
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous


def expected_params(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes of a Llama / Qwen2 config (what `load_weights` accepts)."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    bias = cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias"))
    out = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            out[f"{p}self_attn.{proj}.weight"] = (rows, h)
            if bias:
                out[f"{p}self_attn.{proj}.bias"] = (rows,)
        out[f"{p}self_attn.o_proj.weight"] = (h, heads * hd)
        out[f"{p}mlp.gate_proj.weight"] = (inter, h)
        out[f"{p}mlp.up_proj.weight"] = (inter, h)
        out[f"{p}mlp.down_proj.weight"] = (h, inter)
        out[f"{p}input_layernorm.weight"] = (h,)
        out[f"{p}post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (vocab, h)
    return out


class State:
    def __init__(self, cfg: dict, dtype: str, model_path: str):
        self.cfg, self.dtype, self.model_path = cfg, dtype, model_path
        self.expected = expected_params(cfg)
        self.weights: dict[str, torch.Tensor] = {}
        self.groups: dict[str, dist.ProcessGroup] = {}  # ModelRunner._model_update_group
        self.weight_version = "default"  # server_args.weight_version
        self.paused = False
        self.log: list[list] = []
        self.lock = threading.Lock()


def init_custom_process_group(backend: str, init_method: str, timeout: timedelta, world_size: int, rank: int,
                              group_name: str) -> dist.ProcessGroup:
    """sglang/srt/utils/common.py::init_custom_process_group (store_key/pg_options unused by SGLang here)."""
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)  # the group name itself, no trailing "/"
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      backend_options=None, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def load_weights(state: State, named: list[tuple[str, torch.Tensor]]) -> None:
    """The model's `load_weights`: every name must be a parameter of the right shape; stored by name."""
    for name, t in named:
        if name == "lm_head.weight" and state.cfg.get("tie_word_embeddings", False):
            continue  # Qwen2ForCausalLM.load_weights skips it when tied
        if name not in state.expected:
            raise KeyError(f"unexpected parameter {name}")
        if tuple(t.shape) != tuple(state.expected[name]):
            raise ValueError(f"{name}: shape {tuple(t.shape)} != parameter shape {state.expected[name]}")
        state.weights[name] = t


def receive(state: State, body: dict) -> None:
    """model_runner.py::update_weights_from_distributed / _update_bucketed_weights_from_distributed."""
    group = state.groups[body.get("group_name", "weight_update_group")]
    names, shapes = body["names"], body["shapes"]
    dtypes = [getattr(torch, d.removeprefix("torch.")) for d in body["dtypes"]]
    if body.get("load_format") == "flattened_bucket":
        # FlattenedTensorBucket.empty: one dense uint8 buffer, the tensors' bytes back to back
        meta, offset = [], 0
        for name, dtype, shape in zip(names, dtypes, shapes):
            size = math.prod(shape) * dtype.itemsize
            meta.append((name, dtype, shape, offset, offset + size))
            offset += size
        flat = torch.empty(offset, dtype=torch.uint8)
        dist.broadcast(flat, src=0, group=group)
        # FlattenedTensorBucket.reconstruct_tensors
        named = [(n, flat[s:e].view(dt).reshape(sh)) for n, dt, sh, s, e in meta]
    else:  # per tensor: async broadcasts, then wait for all
        named, handles = [], []
        for name, dtype, shape in zip(names, dtypes, shapes):
            t = torch.empty(shape, dtype=dtype)
            handles.append(dist.broadcast(t, src=0, group=group, async_op=True))
            named.append((name, t))
        for h in handles:
            h.wait()
    load_weights(state, named)


def ok(message: str, **extra) -> web.Response:
    return web.json_response({"success": True, "message": message, **extra})


def fail(message: str) -> web.Response:
    return web.json_response({"success": False, "message": message}, status=400)


def make_app(state: State) -> web.Application:
    routes = web.RouteTableDef()

    async def body_of(request: web.Request, route: str) -> dict:
        body = await request.json() if request.can_read_body else {}
        state.log.append([route, body])
        return body or {}

    @routes.get("/health")
    @routes.get("/health_generate")
    async def health(request):
        return web.Response(status=200)

    @routes.get("/model_info")
    @routes.get("/get_model_info")
    async def model_info(request):
        return web.json_response({"model_path": state.model_path, "tokenizer_path": state.model_path,
                                  "is_generation": True, "preferred_sampling_params": None,
                                  "weight_version": state.weight_version, "has_image_understanding": False,
                                  "has_audio_understanding": False, "model_type": state.cfg.get("model_type"),
                                  "architectures": state.cfg.get("architectures")})

    @routes.get("/server_info")
    @routes.get("/get_server_info")
    async def server_info(request):  # server args + scheduler info; no staging keys
        return web.json_response({"model_path": state.model_path, "tokenizer_path": state.model_path,
                                  "served_model_name": state.model_path, "dtype": state.dtype, "tp_size": 1,
                                  "dp_size": 1, "load_balance_method": "round_robin",
                                  "disaggregation_mode": "null", "max_running_requests": 128,
                                  "max_total_tokens": None, "max_prefill_tokens": 16384,
                                  "weight_version": state.weight_version, "max_total_num_tokens": 4096,
                                  "max_req_input_len": 4090, "status": "ready",
                                  "internal_states": [{"last_gen_throughput": 0.0}], "version": "0.5.23"})

    @routes.post("/pause_generation")
    async def pause(request):
        await body_of(request, "/pause_generation")
        state.paused = True
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    @routes.post("/continue_generation")
    async def cont(request):
        await body_of(request, "/continue_generation")
        state.paused = False
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    @routes.get("/flush_cache")
    @routes.post("/flush_cache")
    async def flush(request):
        return web.Response(text="Cache flushed.\nPlease check backend logs for more details. "
                                 "(When there are running or waiting requests, the operation will not be performed.)\n")

    @routes.post("/init_weights_update_group")
    async def init_group(request):
        b = await body_of(request, "/init_weights_update_group")
        name = b.get("group_name", "weight_update_group")
        rank = b["rank_offset"] + 0  # + tp_rank
        try:  # blocks until every rank (the trainer, rank 0) joined: off the event loop
            pg = await asyncio.to_thread(init_custom_process_group, b.get("backend", "nccl"),
                                         f"tcp://{b['master_address']}:{b['master_port']}",
                                         timedelta(seconds=600), b["world_size"], rank, name)
        except Exception as exc:  # noqa: BLE001
            return fail(f"Failed to initialize custom process group: {exc}.")
        state.groups[name] = pg
        return ok("Succeeded to initialize custom process group.")

    @routes.post("/update_weights_from_distributed")
    async def update_distributed(request):
        b = await body_of(request, "/update_weights_from_distributed")
        try:
            await asyncio.to_thread(receive, state, b)
        except Exception as exc:  # noqa: BLE001
            return fail(f"Failed to update parameter online: {exc}. The full weights of the ModelRunner are "
                        f"partially updated. Please discard the whole weights.")
        if b.get("weight_version") is not None:  # _update_weight_version_if_provided
            state.weight_version = str(b["weight_version"])
        return ok("Succeeded to update parameter online.")  # flush_cache: nothing cached here

    @routes.post("/destroy_weights_update_group")
    async def destroy_group(request):
        b = await body_of(request, "/destroy_weights_update_group")
        pg = state.groups.pop(b.get("group_name", "weight_update_group"), None)
        if pg is None:
            return fail("The group to be destroyed does not exist.")
        dist.destroy_process_group(pg)
        return ok("Succeeded to destroy custom process group.")

    @routes.post("/update_weight_version")
    async def update_version(request):
        b = await body_of(request, "/update_weight_version")
        state.weight_version = str(b["new_version"])
        return ok(f"Weight version updated to {b['new_version']}", new_version=b["new_version"])

    # ---- test-only ----

    @routes.get("/received_sha256")
    async def received(request):
        return web.json_response({n: hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                                                    .numpy()).hexdigest() for n, t in state.weights.items()})

    @routes.get("/requests_log")
    async def requests_log(request):
        return web.json_response(state.log)

    app = web.Application(client_max_size=2**30)
    app.add_routes(routes)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--config", required=True, help="HF config.json of the served model")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    with open(args.config) as f:
        cfg = json.load(f)
    web.run_app(make_app(State(cfg, args.dtype, args.config)), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
