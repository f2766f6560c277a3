"""Staged (transactional) weight updates: the engine's stage / commit / abort / checksum, the HTTP
endpoints that drive them (tensor, distributed, shared memory), and the CUDA-IPC payload decoder.

CPU, a tiny random Llama; the GPU test (a CUDA-IPC round trip through a child process) skips itself
without CUDA.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import uuid
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from rollout import wire
from rollout.engine import EmbeddedEngine
from rollout.server import BackgroundServer
from server_procs import http, post, weight_group_with
from slime_rl.buckets import pack_bucket
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.types import GenerateRequest, SamplingParams

REPO = Path(__file__).resolve().parents[1]
PROMPT = [3, 4, 5, 6, 7, 8]


# ---- model and helpers -------------------------------------------------------------------


def random_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Peaked random weights (greedy choices far from ties), in the engine's parameter naming."""
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.ones_like(t) if name.endswith("norm.weight") else torch.randn(t.shape, generator=gen) * 0.15)
            for name, t in init_tiny_model(cfg, seed=0).items()}


@pytest.fixture(scope="module")
def cfg() -> dict:
    return tiny_hf_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                          max_position_embeddings=64)


@pytest.fixture(scope="module")
def w_old(cfg):
    return random_weights(cfg, 0)


@pytest.fixture(scope="module")
def w_new(cfg):
    return random_weights(cfg, 1)


@pytest.fixture
def engine(cfg, w_old):
    eng = EmbeddedEngine(cfg, w_old, seed=0, max_total_tokens=1024)
    yield eng
    eng.close()


def greedy(engine: EmbeddedEngine, ids: list[int] = PROMPT, max_new: int = 6):
    req = GenerateRequest(list(ids), SamplingParams(max_new_tokens=max_new, temperature=0.0))
    return engine.generate([req])[0]


def sha256s(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    return {n: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
            for n, t in weights.items()}


def halves(weights: dict[str, torch.Tensor]) -> tuple[list, list]:
    items = sorted(weights.items())
    return items[: len(items) // 2], items[len(items) // 2:]


@pytest.fixture
def served(engine):
    with BackgroundServer(engine) as server:
        yield engine, server.url


def metadata(bucket) -> list[dict]:
    return [{"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "offset": e.offset} for e in bucket.entries]


def torch_save_b64(obj: Any) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode()


# ---- engine -----------------------------------------------------------------------------------


def test_stage_then_commit_applies_weights_version_and_flushes_cache(cfg, engine, w_old, w_new):
    greedy(engine)
    assert greedy(engine).cached_tokens > 0  # the prompt is in the prefix cache
    first, second = halves(w_new)
    assert engine.stage_weights(first, "t1") == len(first)
    assert engine.stage_weights(second, "t1") == len(w_new)
    assert engine.staged_transfer() == ("t1", len(w_new))
    assert engine.weights_checksum() == sha256s(w_old)  # staging never touches live params

    result = engine.commit_weights("t1", 3, expected_tensors=len(w_new))
    assert result["num_tensors"] == len(w_new) and result["seconds"] >= 0
    assert result["bytes"] == sum(t.numel() * t.element_size() for t in w_new.values())
    assert engine.get_weight_version() == 3 and engine.staged_transfer() == (None, 0)
    assert engine.weights_checksum() == sha256s(w_new)
    out = greedy(engine)
    assert out.cached_tokens == 0 and out.output_versions == [3] * len(out.output_ids)
    fresh = EmbeddedEngine(cfg, w_new, seed=0, max_total_tokens=1024)
    try:
        ref = greedy(fresh)
    finally:
        fresh.close()
    assert out.output_ids == ref.output_ids and out.output_logprobs == pytest.approx(ref.output_logprobs, abs=1e-6)


def test_generation_runs_on_old_weights_while_staged(engine, w_new):
    before = greedy(engine)
    # Staging does not take the step lock: it completes while another thread holds it.
    done = threading.Event()
    with engine._lock:
        worker = threading.Thread(target=lambda: (engine.stage_weights(w_new.items(), "t"), done.set()))
        worker.start()
        worker.join(30)
        assert done.is_set()
    during = greedy(engine)  # submitted after staging, before the commit
    assert during.output_versions == [0] * len(during.output_ids)
    # The second run reuses the first one's prompt KV (prefix cache), so its sums may differ in the last bits.
    assert during.output_ids == before.output_ids
    assert during.output_logprobs == pytest.approx(before.output_logprobs, abs=1e-5)
    engine.commit_weights("t", 1)
    after = greedy(engine)
    assert after.weight_version == 1 and after.output_logprobs != before.output_logprobs


@pytest.mark.parametrize("case", ["wrong_id", "missing", "expected_mismatch"])
def test_failed_commit_changes_nothing_and_drops_the_staging(engine, w_old, w_new, case):
    first, _ = halves(w_new)
    staged = first if case == "missing" else list(w_new.items())
    engine.stage_weights(staged, "t")
    commit, match = {
        "wrong_id": (lambda: engine.commit_weights("other", 5), "no staged transfer other; staged: t"),
        "missing": (lambda: engine.commit_weights("t", 5), r"missing \d+ tensors"),
        "expected_mismatch": (lambda: engine.commit_weights("t", 5, expected_tensors=len(w_new) + 1),
                              f"expected {len(w_new) + 1} tensors, {len(w_new)} are staged"),
    }[case]
    with pytest.raises(ValueError, match=match):
        commit()
    assert engine.weights_checksum() == sha256s(w_old) and engine.get_weight_version() == 0
    assert engine.staged_transfer() == (None, 0)
    with pytest.raises(ValueError, match="no staged transfer t; staged: none"):
        engine.commit_weights("t", 5)


def test_new_transfer_replaces_staging_and_abort_drops_it(engine, w_new):
    first, second = halves(w_new)
    assert engine.stage_weights(first, "a") == len(first)
    assert engine.stage_weights(second[:1], "b") == 1  # a new transfer drops the dead one
    assert engine.stage_weights(second[:1], "b") == 1  # staging a name twice overwrites
    assert engine.staged_transfer() == ("b", 1)
    assert engine.abort_weight_update("a") is False and engine.staged_transfer() == ("b", 1)
    assert engine.abort_weight_update() is True and engine.staged_transfer() == (None, 0)
    assert engine.abort_weight_update() is False


def test_stage_validation_error_keeps_the_previous_staging(engine, w_new):
    first, _ = halves(w_new)
    engine.stage_weights(first, "a")
    name, good = first[0]
    bad_cases = [
        [(name, good), ("model.nope.weight", good)],
        [(name, good), (name, torch.zeros(3, 3))],
        [(name, good), (name, good.to(torch.int32))],
    ]
    for bad in bad_cases:
        for transfer_id in ("a", "b"):  # a bad bucket of a new transfer does not drop the old one either
            with pytest.raises(ValueError, match="weight update: tensor|unknown tensor"):
                engine.stage_weights(bad, transfer_id)
            assert engine.staged_transfer() == ("a", len(first))
    with pytest.raises(ValueError, match="transfer_id"):
        engine.stage_weights(first, "")


def test_copy_true_clones_and_copy_false_keeps_the_callers_tensor(engine, w_new):
    for copy in (True, False):
        source = {n: t.clone() for n, t in w_new.items()}
        engine.stage_weights(source.items(), f"t{copy}", copy=copy)
        for t in source.values():
            t.add_(1.0)  # the caller changes its tensors after staging
        engine.commit_weights(f"t{copy}", 1)
        assert engine.weights_checksum() == sha256s(w_new if copy else source)


def test_weights_checksum_names_and_tied_lm_head(engine, w_old):
    assert engine.dtype == torch.float32
    names = ["model.norm.weight", "model.embed_tokens.weight"]
    assert engine.weights_checksum(names) == {n: sha256s(w_old)[n] for n in names}
    assert set(engine.weights_checksum()) == set(w_old)
    for bad in (["lm_head.weight"], ["model.nope"]):  # tied: lm_head is not a parameter of its own
        with pytest.raises(ValueError, match="unknown parameters"):
            engine.weights_checksum(bad)


# ---- HTTP --------------------------------------------------------------------------------------


def test_tensor_endpoint_stages_commit_and_abort(served, w_old, w_new):
    engine, url = served
    first, second = halves(w_new)
    for part in (first, second):
        status, res = post(url + "/update_weights_from_tensor", {
            "serialized_named_tensors": [torch_save_b64(part)], "transfer_id": "x",
            "weight_version": "not-a-version", "abort_all_requests": True})  # ignored when staging
        assert status == 200 and res["success"] is True, res
    assert res["num_staged"] == len(w_new)
    assert http("GET", url + "/get_weight_version")[1] == {"weight_version": "0"}
    status, res = post(url + "/commit_weight_update", {"transfer_id": "x", "weight_version": 4,
                                                       "expected_tensors": len(w_new)})
    assert status == 200 and res["success"] is True and res["weight_version"] == "4", res
    assert res["num_tensors"] == len(w_new) and res["bytes"] > 0 and res["seconds"] >= 0
    assert engine.weights_checksum() == sha256s(w_new)

    post(url + "/update_weights_from_tensor", {"serialized_named_tensors": [torch_save_b64(first)],
                                               "transfer_id": "y"})
    assert post(url + "/abort_weight_update", {"transfer_id": "z"})[1]["dropped"] is False
    status, res = post(url + "/abort_weight_update", {"transfer_id": "y"})
    assert status == 200 and res == {"success": True, "message": res["message"], "dropped": True}
    status, res = post(url + "/commit_weight_update", {"transfer_id": "y", "weight_version": 5})
    assert status == 400 and res["success"] is False and "no staged transfer y" in res["message"]
    assert engine.get_weight_version() == 4 and engine.weights_checksum() == sha256s(w_new)


@pytest.fixture
def shm_dir():
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def write_bucket(path: str, weights: dict[str, torch.Tensor]):
    bucket = pack_bucket(sorted(weights.items()))
    with open(path, "wb") as f:
        f.write(bucket.buffer.numpy().tobytes())
    return bucket


def test_shared_memory_endpoint_stages_commits_and_remaps(served, shm_dir, w_old, w_new):
    engine, url = served
    path = os.path.join(shm_dir, f"slime_rl_wsync_{uuid.uuid4().hex}")
    try:
        bucket = write_bucket(path, w_new)
        body = {"path": path, "metadata": metadata(bucket)}
        status, res = post(url + "/update_weights_from_shared_memory", {**body, "transfer_id": "s"})
        assert status == 200 and res["num_staged"] == len(w_new), res
        assert engine.weights_checksum() == sha256s(w_old)
        status, res = post(url + "/commit_weight_update", {"transfer_id": "s", "weight_version": "7"})
        assert status == 200 and res["weight_version"] == "7", res
        status, res = http("GET", url + "/weights_checksum")
        assert status == 200 and res["weight_version"] == "7" and res["algorithm"] == "sha256"
        assert res["checksums"] == sha256s(w_new)

        write_bucket(path, w_old)  # rewritten in place: the cached MAP_SHARED mapping sees it
        status, res = post(url + "/update_weights_from_shared_memory", {**body, "weight_version": 8})
        assert status == 200 and engine.weights_checksum() == sha256s(w_old), res
        replacement = path + ".new"
        write_bucket(replacement, w_new)
        os.replace(replacement, path)  # a new inode: the server maps it again
        status, res = post(url + "/update_weights_from_shared_memory", {**body, "weight_version": 9})
        assert status == 200 and engine.weights_checksum() == sha256s(w_new) and engine.get_weight_version() == 9

        size = os.path.getsize(path)
        outside = [{**metadata(bucket)[0], "offset": size}]
        status, res = post(url + "/update_weights_from_shared_memory", {**body, "metadata": outside, "transfer_id": "o"})
        assert status == 400 and "outside" in res["message"], res
        bad_name = os.path.join(shm_dir, f"other_{uuid.uuid4().hex}")
        status, res = post(url + "/update_weights_from_shared_memory", {**body, "path": bad_name})
        assert status == 400 and "slime_rl_wsync_" in res["message"], res
        status, res = post(url + "/update_weights_from_shared_memory", {**body, "path": path + "_missing"})
        assert status == 400 and "does not exist" in res["message"], res
        assert post(url + "/release_shared_memory", {"path": None})[1]["released"] == 1
        assert engine.get_weight_version() == 9
    finally:
        for p in (path, path + ".new"):
            if os.path.exists(p):
                os.unlink(p)


def test_distributed_endpoint_stages_then_commits(served, w_old, w_new):
    """The test process is rank 0 of a gloo group with the server (rank 1)."""
    engine, url = served
    with weight_group_with(url, post) as (group, call, results):
        bucket = pack_bucket(sorted(w_new.items()))
        meta = {"names": [e.name for e in bucket.entries], "dtypes": [e.dtype for e in bucket.entries],
                "shapes": [list(e.shape) for e in bucket.entries], "group_name": "g",
                "load_format": "flattened_bucket", "transfer_id": "d"}
        thread = call("/update_weights_from_distributed", meta)
        group.broadcast(bucket.buffer, src=0)
        thread.join(60)
        status, res = results["/update_weights_from_distributed"]
        assert status == 200 and res["num_staged"] == len(w_new), res
        assert engine.get_weight_version() == 0 and engine.weights_checksum() == sha256s(w_old)
        status, res = post(url + "/commit_weight_update", {"transfer_id": "d", "weight_version": 2,
                                                           "expected_tensors": len(w_new)})
        assert status == 200 and res["success"] is True, res
        assert engine.get_weight_version() == 2 and engine.weights_checksum() == sha256s(w_new)


def test_weights_checksum_endpoint_and_server_info(served):
    engine, url = served
    names = ["model.norm.weight"]
    status, res = post(url + "/weights_checksum", {"names": names})
    assert status == 200 and res["checksums"] == engine.weights_checksum(names) and res["weight_version"] == "0"
    assert http("GET", url + "/weights_checksum")[1]["checksums"] == engine.weights_checksum()
    status, res = post(url + "/weights_checksum", {"names": ["lm_head.weight"]})
    assert status == 400 and "unknown parameters" in res["message"]
    info = http("GET", url + "/server_info")[1]
    assert info["weight_update_staging"] is True and info["dtype"] == "float32"
    assert info["weight_update_transports"] == ["tensor", "distributed", "shared_memory", "disk"]


def test_new_endpoints_need_the_api_key(engine):
    with BackgroundServer(engine, api_key="k") as server:
        for path in ("/commit_weight_update", "/abort_weight_update", "/weights_checksum",
                     "/update_weights_from_shared_memory", "/release_shared_memory"):
            assert post(server.url + path, {})[0] == 401, path
        assert post(server.url + "/abort_weight_update", {}, headers={"Authorization": "Bearer k"})[0] == 200


# ---- CUDA-IPC payloads ------------------------------------------------------------------------


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    marker = tmp_path / "pwned"
    evil = [
        ("os.system", b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."),
        ("builtins.eval", pickle.dumps(type("E", (), {"__reduce__": lambda self: (eval, ("1",))})())),
        ("torch._utils._rebuild_tensor_v2", b"ctorch._utils\n_rebuild_tensor_v2\n."),
    ]
    for name, raw in evil:
        with pytest.raises(ValueError, match=f"forbidden global {name}"):
            wire.decode_tensor_payload([base64.b64encode(raw).decode()], None)
    assert not marker.exists()


class _FakeCudaTensor:
    """Pickles exactly as reduce_tensor pickles an empty CUDA tensor (no IPC handle needed)."""

    def __reduce__(self):
        return (rebuild_cuda_tensor, (torch.nn.Parameter, torch.Size([0]), (1,), 0, torch.storage.TypedStorage,
                                      torch.bfloat16, 0, None, 0, 0, False, b"ref", 0, b"event", True))


def test_ipc_allowlist_admits_every_global_of_a_cuda_tensor_pickle():
    blob = base64.b64encode(bytes(ForkingPickler.dumps([("w", _FakeCudaTensor())]))).decode()
    if torch.cuda.is_available():
        [(name, t)] = wire.decode_tensor_payload([blob], None)
        assert name == "w" and t.is_cuda and t.dtype == torch.bfloat16
    else:  # every global passes; only opening the (CUDA) storage fails
        with pytest.raises(ValueError, match="CUDA IPC pickle") as err:
            wire.decode_tensor_payload([blob], None)
        assert "forbidden" not in str(err.value)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        wire.encode_cuda_ipc_payload([("w", torch.zeros(2))])


CHILD = """
import hashlib, sys, torch
from rollout import wire
from slime_rl.buckets import unpack_bucket
blob, load_format = sys.stdin.read().split()
obj = wire.decode_tensor_payload([blob], None if load_format == "none" else load_format)
pairs = obj if isinstance(obj, list) else unpack_bucket(obj)
for name, t in pairs:
    assert t.is_cuda, name
    print(name, hashlib.sha256(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest())
"""


@pytest.mark.gpu
def test_cuda_ipc_payload_opens_in_a_child_process():
    gen = torch.Generator().manual_seed(0)
    named = [("a.weight", torch.randn(4, 8, generator=gen)), ("b.bias", torch.randn(5, generator=gen))]
    expected = {n: hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest() for n, t in named}
    cuda = [(n, t.cuda()) for n, t in named]
    for obj, load_format in ((cuda, "none"), (pack_bucket(cuda), "flattened_bucket")):
        blob = wire.encode_cuda_ipc_payload(obj)  # `obj` stays alive until the child is done
        child = subprocess.run([sys.executable, "-c", CHILD], input=f"{blob} {load_format}", text=True,
                               capture_output=True, cwd=REPO, timeout=120)
        assert child.returncode == 0, child.stderr
        assert dict(line.split() for line in child.stdout.splitlines()) == expected
