"""Wire compatibility with SGLang and slime, both directions, bit-exact weights (issue 17 D1 + D2).

SGLang itself is not installed here (its wheel pulls GPU-only dependencies and its package
`__init__` imports most of the runtime), so its side is reproduced from its source:

- the group: `sglang/srt/utils/common.py::init_custom_process_group` (rendezvous on
  "tcp://ADDR:PORT", `store.set_timeout`, `PrefixStore(group_name, store)`,
  `_new_process_group_helper(world_size, rank, [], backend, store, group_name=...,
  backend_options=None, timeout=...)`, `_world.pg_group_ranks[pg] = {i: i}`), as
  `weight_updater.py::init_weights_update_group` calls it; no warm-up collective;
- buckets: `sglang/srt/weight_sync/tensor_bucket.py::FlattenedTensorBucket` (`__init__`
  concatenates `flatten().view(uint8)`, `empty()` allocates the dense receive buffer,
  `reconstruct_tensors` slices and views) and `weight_updater.py::
  _receive_bucketed_weights_from_distributed`; before 0.5 the buckets were typed
  (`torch.cat` of the flattened tensors, element offsets), also accepted here.

The SGLang-side peer runs in a subprocess (`PEER`) using only torch, so it shares no state
with our process group registry.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import subprocess
import sys
import textwrap
import threading
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rollout.engine import EmbeddedEngine
from server_procs import post, serving
from slime_rl.buckets import dense_buffer, pack_bucket, tensor_sha256
from slime_rl.dist_group import free_port, init_weight_group
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
TOK = CharTokenizer()

# An SGLang-side rank written from SGLang's source (see the module docstring); torch only.
PEER = textwrap.dedent("""
    import hashlib, json, os, sys
    from datetime import timedelta
    import torch, torch.distributed as dist
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                    rendezvous)

    role, port, group_name, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    rank = 0 if role == "trainer" else 1
    timeout = timedelta(seconds=60)
    # sglang/srt/utils/common.py::init_custom_process_group
    store, rank, world_size = next(rendezvous(f"tcp://127.0.0.1:{port}", rank, 2, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(2, rank, [], Backend("gloo"), store, group_name=group_name,
                                      backend_options=None, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(2)}
    spec = torch.load(path)  # {"named": [(name, tensor)], "buckets": [[names]]}
    if role == "trainer":  # what slime sends: each tensor, then SGLang's flattened buckets
        for _, t in spec["named"]:
            dist.broadcast(t, src=0, group=pg)
        named = spec["flat"]
        for names in spec["buckets"]:  # FlattenedTensorBucket(named_tensors=...).get_flattened_tensor()
            flat = torch.cat([named[n].flatten().view(torch.uint8) for n in names])
            dist.broadcast(flat, src=0, group=pg)
        print(json.dumps({"ok": True}))
    else:  # weight_updater.py::_receive_bucketed_weights_from_distributed, per bucket
        out = {}
        for bucket in spec["buckets"]:
            offset, meta = 0, []
            for name, dtype, shape in bucket:  # FlattenedTensorBucket.empty
                dtype = getattr(torch, dtype)
                assert offset % dtype.itemsize == 0
                size = torch.Size(shape).numel() * dtype.itemsize
                meta.append((name, dtype, shape, offset, offset + size))
                offset += size
            flat = torch.empty(offset, dtype=torch.uint8)
            dist.broadcast(flat, src=0, group=pg)
            for name, dtype, shape, start, end in meta:  # reconstruct_tensors
                t = flat[start:end].view(dtype).reshape(shape)
                out[name] = hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
        print(json.dumps(out))
    dist.destroy_process_group(pg)
    # The result is out; leave without interpreter teardown: under load the peer's gloo / store-client threads
    # were once caught mid-exit (std::terminate, "terminate called without an active exception").
    sys.stdout.flush()
    os._exit(0)
""")


@dataclass
class Tiny:
    cfg: dict
    weights: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    cfg = tiny_hf_config(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                         max_position_embeddings=64, eos_token_id=TOK.eos_token_id)
    return Tiny(cfg, init_tiny_model(cfg, seed=0))


@contextlib.contextmanager
def serve(tiny: Tiny):
    engine = EmbeddedEngine(tiny.cfg, tiny.weights, seed=0, max_total_tokens=4096, tokenizer=TOK)
    with serving(engine, TOK) as url:
        yield engine, url


def new_weights(tiny: Tiny, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + torch.randn(v.shape, generator=g).to(v.dtype)).contiguous() for k, v in tiny.weights.items()}


def peer(role: str, port: int, group: str, spec: dict, tmp_path: Path) -> subprocess.Popen:
    path = tmp_path / f"{role}.pt"
    torch.save(spec, path)
    return subprocess.Popen([sys.executable, "-c", PEER, role, str(port), group, str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_sglang_style_trainer_updates_our_server_per_tensor_and_flattened(tiny, tmp_path):
    """(a) slime/SGLang trainer -> our server: its group forms, per-tensor and flattened_bucket updates land."""
    per_tensor, flat = new_weights(tiny, 1), new_weights(tiny, 2)
    names = list(tiny.weights)
    half = len(names) // 2
    buckets = [names[:half], names[half:]]
    spec = {"named": [(n, per_tensor[n]) for n in names], "buckets": buckets}
    with serve(tiny) as (engine, url):
        port, group, results = free_port(), "weight_update_group", {}

        def call(path, body):
            results[path] = post(url + path, body)

        init = threading.Thread(target=call, args=("/init_weights_update_group", {
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": group, "backend": "gloo"}))
        init.start()
        proc = peer("trainer", port, group, {**spec, "flat": flat}, tmp_path)
        init.join(60)
        assert results["/init_weights_update_group"][0] == 200, results
        meta = lambda ns: {"names": ns, "dtypes": [str(tiny.weights[n].dtype).removeprefix("torch.") for n in ns],
                           "shapes": [list(tiny.weights[n].shape) for n in ns], "group_name": group}
        status, body = post(url + "/update_weights_from_distributed", {**meta(names), "weight_version": "1"})
        assert status == 200, body
        assert engine.weights_checksum() == {n: tensor_sha256(per_tensor[n]) for n in names}
        for ns in buckets:
            status, body = post(url + "/update_weights_from_distributed", {**meta(ns), "load_format": "flattened_bucket"})
            assert status == 200, body
        assert engine.weights_checksum() == {n: tensor_sha256(flat[n]) for n in names}
        finish(proc)
        assert post(url + "/destroy_weights_update_group", {"group_name": group})[0] == 200


def test_our_broadcast_sender_updates_an_sglang_style_receiver(tiny, tmp_path):
    """(b) our trainer side (dist_group rank 0 + the broadcast transport's dense bucket) -> SGLang receiver."""
    weights = new_weights(tiny, 3)
    names = list(weights)
    buckets = [names[:3], names[3:]]
    spec = {"buckets": [[(n, str(weights[n].dtype).removeprefix("torch."), list(weights[n].shape)) for n in ns]
                        for ns in buckets]}
    port, group = free_port(), "slime_rl_wsync_test_pp0"
    proc = peer("receiver", port, group, spec, tmp_path)
    g = init_weight_group("127.0.0.1", port, 0, 2, group_name=group, timeout_s=60)
    try:
        for ns in buckets:  # what run_on_rank("broadcast") sends for a planned (ALIGN-padded) bucket
            bucket = pack_bucket([(n, weights[n]) for n in ns])
            g.broadcast(dense_buffer(bucket.buffer, bucket.entries), src=0)
        assert finish(proc) == {n: tensor_sha256(weights[n]) for n in names}
    finally:
        g.destroy()


def sglang_module():
    """A stand-in `sglang.srt.weight_sync.tensor_bucket` with SGLang's dataclass, to pickle as SGLang does."""
    module = types.ModuleType("sglang.srt.weight_sync.tensor_bucket")

    @dataclass
    class FlattenedTensorMetadata:  # sglang/srt/weight_sync/tensor_bucket.py
        name: str
        shape: torch.Size
        dtype: torch.dtype
        start_idx: int
        end_idx: int
        numel: int

    FlattenedTensorMetadata.__module__ = module.__name__
    FlattenedTensorMetadata.__qualname__ = "FlattenedTensorMetadata"
    module.FlattenedTensorMetadata = FlattenedTensorMetadata
    return module


@pytest.mark.parametrize("generation", ["bytes", "typed"])
def test_sglang_flattened_bucket_tensor_payload_is_accepted(tiny, monkeypatch, generation):
    """(c) `/update_weights_from_tensor` with SGLang's FlattenedTensorBucket dict (current byte layout and
    the older typed one), pickled with SGLang's module path."""
    module = sglang_module()
    for name in ("sglang", "sglang.srt", "sglang.srt.weight_sync"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    weights = new_weights(tiny, 4)
    meta, pieces, idx = [], [], 0
    for name, t in weights.items():  # FlattenedTensorBucket.__init__
        flat = t.flatten().view(torch.uint8) if generation == "bytes" else t.flatten()
        meta.append(module.FlattenedTensorMetadata(name, t.shape, t.dtype, idx, idx + flat.numel(), flat.numel()))
        pieces.append(flat)
        idx += flat.numel()
    buf = io.BytesIO()
    torch.save({"flattened_tensor": torch.cat(pieces), "metadata": meta}, buf)  # CPU: torch.save, not fd passing
    with serve(tiny) as (engine, url):
        status, body = post(url + "/update_weights_from_tensor", {
            "serialized_named_tensors": [base64.b64encode(buf.getvalue()).decode()],
            "load_format": "flattened_bucket", "weight_version": "2"})
        assert status == 200, body
        assert engine.weights_checksum() == {n: tensor_sha256(t) for n, t in weights.items()}


def test_sglang_metadata_state_is_restricted():
    """The stand-in takes the six fields only; any other global in the pickle is still refused."""
    from rollout import wire
    from slime_rl.buckets import sglang_class_importable, FlattenedTensorMetadata

    with sglang_class_importable():
        bad = FlattenedTensorMetadata("w", torch.Size([1]), torch.float32, 0, 1, 1)
        bad.__dict__["extra"] = 1
        import pickle
        raw = pickle.dumps([bad])
    with pytest.raises(ValueError):
        wire._CudaIpcUnpickler(io.BytesIO(raw)).load()
