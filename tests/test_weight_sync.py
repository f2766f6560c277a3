"""Weight sync (weight_sync/): trainer -> engine servers, every transport, versions, pauses, killed senders.

Engines are `slime_rl serve` subprocesses on one tiny Qwen2 (vocabulary of the
char tokenizer, which Megatron must pad; untied embeddings). "Equal" means bit
for bit: `WeightSync.check` compares the sha256 of every engine tensor with the
trainer's HF export, and logprobs are compared on a fixed batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from rollout import EmbeddedEngine
from rollout.client import EngineClient
from server_procs import START_TIMEOUT_S, ServerProc, launch_server, wait_healthy
from rollout.router import http_json
from slime_rl import algorithms
from slime_rl.buckets import tensor_sha256
from slime_rl.config import SyncConfig
from slime_rl.dist_group import free_port
from slime_rl.hf_io import init_tiny_model, save_hf_checkpoint, tiny_hf_config
from slime_rl.tokenizer import CharTokenizer
from slime_rl.types import GenerateRequest, Sample, SampleStatus, SamplingParams, TrainBatch
from training.hf import HFTrainer, OptimSettings
from weight_sync import SyncError, WeightSync

REPO = Path(__file__).resolve().parents[1]
VOCAB = CharTokenizer().vocab_size
HF_CONFIG = tiny_hf_config("qwen2", vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                           intermediate_size=96, tie_word_embeddings=False, max_position_embeddings=2048)
OPT = OptimSettings(lr=1e-3, micro_batch_size=4, warmup_steps=0)
LOSS = algorithms.make_policy_loss(0.2, 0.28)
SMALL_BUCKETS_MB = 0.03  # ~30 KB: a few tensors per bucket, dozens of buckets


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return init_tiny_model(HF_CONFIG, seed=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, weights) -> Path:
    path = tmp_path_factory.mktemp("wsync_model")
    save_hf_checkpoint(path, HF_CONFIG, weights, tokenizer=CharTokenizer())
    return path


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("wsync_logs")
    procs = [launch_server(f"engine{i}", model_dir, log_dir) for i in range(2)]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for p in procs:
            wait_healthy(p, deadline)
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture
def clients(servers, weights):
    """One client per server, each server reset to the initial weights at version 0 first."""
    out = [EngineClient(p.url, max_retries=0) for p in servers]
    for c in out:
        c.update_weights_from_tensors(list(weights.items()), 0)
    yield out
    for c in out:
        c.close()


def make_batch(n: int = 6, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        resp = torch.randint(1, VOCAB, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
        samples.append(Sample(prompt_ids=prompt, response_ids=resp, rollout_logprobs=[-4.6] * len(resp),
                              loss_mask=[1] * len(resp), reward=float(i % 2)))
    return algorithms.build_train_batch(samples, [1.0, -0.5, 0.8, 0.3, -0.2, 1.2][:n], 0, temperature=1.0)


def train_once(trainer, batch: TrainBatch) -> None:
    batch.old_logprobs_BT = trainer.logprobs(batch) - 0.01 * batch.response_mask_BT
    batch.loss_weights_BT = algorithms.token_loss_weights(batch.response_mask_BT, "token")
    trainer.train_step(batch, LOSS)


def engine_logprobs(engine, batch: TrainBatch) -> torch.Tensor:
    """[B, T] logprobs of the batch's tokens under the engine (position 0 and padding: 0)."""
    out = torch.zeros(batch.input_ids_BT.shape)
    lengths = batch.attention_mask_BT.sum(-1).tolist()
    reqs = [GenerateRequest(batch.input_ids_BT[b, :n].tolist(), SamplingParams(max_new_tokens=1, temperature=1.0),
                            logprob_start_len=0) for b, n in enumerate(lengths)]
    for b, res in enumerate(engine.generate(reqs)):
        lp = res.input_logprobs
        out[b, 1:lengths[b]] = torch.tensor(lp[1:], dtype=torch.float32)
    return out


def assert_engines_follow(sync: WeightSync, engines: list, trainer, batch: TrainBatch, version: int) -> None:
    assert sync.check() == {}
    assert [e.get_weight_version() for e in engines] == [version] * len(engines)
    mask_BT = batch.response_mask_BT  # the hf trainer gives logprobs on response tokens only
    assert mask_BT.sum() >= 8
    want = trainer.logprobs(batch) * mask_BT
    for e in engines:
        got = engine_logprobs(e, batch) * mask_BT
        assert float((got - want).abs().max()) < 1e-5


# ---- Megatron TP2 x PP2 into two servers -----------------------------------------------------------

@pytest.mark.slow
def test_megatron_tp2pp2_into_two_servers_over_every_transport(weights, clients):
    from training.megatron import MegatronBackend, MegatronSettings, ModelSettings

    batch = make_batch()
    settings = MegatronSettings(model=ModelSettings(tp=2, pp=2))
    with MegatronBackend(HF_CONFIG, weights, OPT, settings, num_ranks=4) as trainer:
        for version, kind in enumerate(("shm", "broadcast", "disk"), start=1):
            train_once(trainer, batch)  # new weights every round: a sync that did nothing would fail the check
            sync = WeightSync(trainer, clients, SyncConfig(transport=kind, bucket_mb=SMALL_BUCKETS_MB))
            try:
                assert sync.plan.pp_size == 2 and len(sync.plan.buckets) > 4
                metrics = sync.push(version)
                assert metrics["sync/bytes"] == sum(t.numel() * 4 for t in weights.values())
                assert metrics["sync/buckets"] == len(sync.plan.buckets) and metrics["sync/paused_s"] >= 0
                if kind != "disk":  # engines keep the staged buffers as parameters: nothing is copied at the commit
                    assert metrics["sync/adopted_bytes"] == metrics["sync/bytes"] and metrics["sync/copied_bytes"] == 0
                assert_engines_follow(sync, clients, trainer, batch, version)
                exported = {n: tensor_sha256(t) for n, t in trainer.hf_state_dict().items()}  # gathered on rank 0
                assert all(c.weights_checksum()[c.url] == exported for c in clients)
            finally:
                sync.close()


# ---- Megatron TP2 into an SGLang-style server (issue 17) -------------------------------------------

@contextlib.contextmanager
def sglang_style_server(tmp_path: Path):
    """tests/sglang_style_server.py (SGLang's routes and receive sequence, no staging) in a subprocess."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(HF_CONFIG))
    port = free_port()
    log_path = tmp_path / "sglang_style.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "sglang_style_server.py"), "--port", str(port),
                                 "--config", str(config), "--dtype", "float32"], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    server = ServerProc("sglang_style", f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_healthy(server, time.monotonic() + START_TIMEOUT_S)
        yield server
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("pp", [1, 2])
def test_megatron_tp2_broadcast_into_an_sglang_style_server(pp, weights, tmp_path):
    """Our Megatron TP2 (x PP 1 or 2) trainer's broadcast transport drives a server that speaks only SGLang's protocol
    (no staging keys in /server_info; SGLang's group rendezvous and dense flattened buckets): the sync pauses
    it, sends every bucket with load_format "flattened_bucket" and no transfer_id, stamps the version with
    /update_weight_version, and the received tensors equal the trainer's HF export bit for bit."""
    from training.megatron import MegatronBackend, MegatronSettings, ModelSettings

    with sglang_style_server(tmp_path) as server, \
            MegatronBackend(HF_CONFIG, weights, OPT, MegatronSettings(model=ModelSettings(tp=2, pp=pp)),
                            num_ranks=2 * pp) as trainer:
        train_once(trainer, make_batch())
        client = EngineClient(server.url, max_retries=0)
        sync = WeightSync(trainer, [client], SyncConfig(transport="broadcast", bucket_mb=SMALL_BUCKETS_MB))
        try:
            assert sync.endpoints[0].staging is False and sync.dtype == "float32"
            assert len(sync.plan.buckets) > 4 and sync.plan.pp_size == pp
            metrics = sync.push(1)
            assert metrics["sync/paused_s"] >= metrics["sync/stage_s"] > 0
            assert client.get_weight_version() == 1
            exported = {n: tensor_sha256(t) for n, t in trainer.hf_state_dict().items()}
            assert set(exported) == set(weights)  # untied: lm_head is exported and sent
            status, received = http_json("GET", server.url + "/received_sha256")
            assert status == 200 and received == exported
            assert exported != {n: tensor_sha256(t) for n, t in weights.items()}  # the step changed them
        finally:
            sync.close()
        _, log = http_json("GET", server.url + "/requests_log")
    routes = [r for r, _ in log]
    updates = [b for r, b in log if r == "/update_weights_from_distributed"]
    assert routes[0] == "/pause_generation"  # paused before the group forms: buckets apply as they arrive
    assert routes[-1 - pp:] == ["/continue_generation"] + ["/destroy_weights_update_group"] * pp  # close() leaves
    assert routes.count("/init_weights_update_group") == pp and len(updates) == len(sync.plan.buckets)
    assert all(b["load_format"] == "flattened_bucket" and "transfer_id" not in b for b in updates)
    groups = [b["group_name"] for r, b in log if r == "/init_weights_update_group"]  # one group per PP stage
    stage_group = {int(g.rsplit("_pp", 1)[1]): g for g in groups}
    assert sorted(stage_group) == list(range(pp))
    assert [b["group_name"] for b in updates] == [stage_group[b.stage] for b in sync.plan.buckets]  # stage order
    assert sorted(b["group_name"] for r, b in log if r == "/destroy_weights_update_group") == sorted(groups)
    assert sum(len(b["names"]) for b in updates) == len(weights)
    assert routes.index("/update_weight_version") > max(i for i, r in enumerate(routes)
                                                        if r == "/update_weights_from_distributed")


# ---- the transport contract (reference trainer: this process is the sender) ---------------------

@pytest.mark.parametrize("kind", ["shm", "broadcast", "disk", "local"])
def test_transport_contract(kind, weights, servers, tmp_path):
    trainer = HFTrainer(HF_CONFIG, weights, OPT)
    batch = make_batch()
    if kind == "local":
        engines = [EmbeddedEngine(HF_CONFIG, weights, seed=0)]
    else:
        engines = [EngineClient(p.url, max_retries=0) for p in servers]
        for e in engines:
            e.update_weights_from_tensors(list(weights.items()), 0)
    settings = SyncConfig(transport=kind, bucket_mb=SMALL_BUCKETS_MB, directory=str(tmp_path / "disk"))
    sync = WeightSync(trainer, engines, settings)
    try:
        for version in (1, 2):
            train_once(trainer, batch)
            metrics = sync.push(version)
            assert metrics["sync/version"] == version and metrics["sync/gbps"] > 0
            assert_engines_follow(sync, engines, trainer, batch, version)
        if kind == "disk":  # only the version the engines serve stays on disk
            assert [p.name.split("-")[0] for p in (tmp_path / "disk").iterdir()] == ["v2"]
    finally:
        sync.close()
        for e in engines:
            e.close()


def test_server_without_staging_is_paused_for_the_whole_transfer(weights, clients):
    """Real SGLang cannot stage: buckets apply as they arrive, so the sync pauses first and stamps the version
    with /update_weight_version at the end."""
    trainer = HFTrainer(HF_CONFIG, weights, OPT)
    train_once(trainer, make_batch())
    sync = WeightSync(trainer, clients[:1], SyncConfig(bucket_mb=SMALL_BUCKETS_MB))
    sync.close()
    endpoint = sync.endpoints[0]
    endpoint.staging = False  # what HttpEndpoint reads from a real SGLang server's /server_info
    sync = WeightSync(trainer, [endpoint], SyncConfig(bucket_mb=SMALL_BUCKETS_MB))
    try:
        assert sync.kind == "broadcast"
        metrics = sync.push(1)
        assert metrics["sync/paused_s"] >= metrics["sync/stage_s"] > 0
        assert clients[0].get_weight_version() == 1 and sync.check() == {}
        with pytest.raises(ValueError, match="stage weight updates"):
            WeightSync(trainer, [endpoint], SyncConfig(transport="shm"))
    finally:
        sync.close()


def test_auto_transport_and_settings_errors(weights):
    trainer = HFTrainer(HF_CONFIG, weights, OPT)
    engine = EmbeddedEngine(HF_CONFIG, weights, seed=0)
    try:
        sync = WeightSync(trainer, [engine])
        assert sync.kind == "local"
        sync.close()
        with pytest.raises(ValueError, match="sync.pause_mode"):
            WeightSync(trainer, [engine], SyncConfig(pause_mode="later"))
        with pytest.raises(ValueError, match="sync.transport"):
            WeightSync(trainer, [engine], SyncConfig(transport="pigeon"))
        with pytest.raises(ValueError, match="at least one engine"):
            WeightSync(trainer, [])
    finally:
        engine.close()


def test_failed_stage_keeps_old_weights_and_next_sync_succeeds(weights, monkeypatch):
    trainer = HFTrainer(HF_CONFIG, weights, OPT)
    engine = EmbeddedEngine(HF_CONFIG, weights, seed=0)
    sync = WeightSync(trainer, [engine], SyncConfig(transport="local", bucket_mb=SMALL_BUCKETS_MB))
    before = engine.weights_checksum()
    real, calls = engine.stage_weights, []

    def flaky(named, transfer_id, copy=True):
        calls.append(transfer_id)
        if len(calls) == 3:
            raise RuntimeError("injected failure on the third bucket")
        return real(named, transfer_id, copy=copy)

    try:
        train_once(trainer, make_batch())
        monkeypatch.setattr(engine, "stage_weights", flaky)
        with pytest.raises(SyncError, match="in-process") as err:
            sync.push(1)
        assert "third bucket" in str(err.value.__cause__ or err.value)
        assert engine.get_weight_version() == 0 and engine.weights_checksum() == before
        assert engine.staged_transfer() == (None, 0) and not engine.is_paused()
        monkeypatch.setattr(engine, "stage_weights", real)
        sync.push(1)
        assert engine.get_weight_version() == 1 and sync.check() == {}
    finally:
        sync.close()
        engine.close()


# ---- a long generation across a sync --------------------------------------------------------------

def stream_in_thread(client: EngineClient, request: GenerateRequest) -> tuple[threading.Thread, queue.Queue]:
    """Stream `request`; every snapshot (and finally None) lands in the queue."""
    snapshots: queue.Queue = queue.Queue()

    async def consume():
        async for out in client.astream(request):
            snapshots.put(out)
        await client.aclose()

    def run():
        try:
            asyncio.run(consume())
        finally:
            snapshots.put(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, snapshots


@pytest.mark.parametrize("mode", ["abort", "in_place", "retract"])
def test_generation_across_a_sync_reports_token_versions(mode, weights, clients):
    client = clients[0]
    trainer = HFTrainer(HF_CONFIG, weights, OPT)
    train_once(trainer, make_batch())
    sync = WeightSync(trainer, [client], SyncConfig(transport="shm", pause_mode=mode))
    request = GenerateRequest([5, 6, 7], SamplingParams(max_new_tokens=1500, min_new_tokens=1500, seed=1))
    thread, snapshots = stream_in_thread(EngineClient(client.url, max_retries=0), request)
    try:
        while len((snap := snapshots.get(timeout=60)).output_ids) < 8:  # wait until it is decoding
            assert snap.finish_reason is None, "the generation ended before the sync"
        sync.push(1)
        last = snap
        while (snap := snapshots.get(timeout=120)) is not None:
            last = snap
        thread.join(timeout=10)
    finally:
        sync.close()
    versions = last.output_versions
    assert len(versions) == len(last.output_ids) and versions[:8] == [0] * 8
    if mode == "abort":  # finished at the pause with what it had, all from the old weights
        assert last.finish_reason == SampleStatus.ABORTED and set(versions) == {0}
    else:  # paused, then continued under the new weights: one switch from 0 to 1, never back
        assert last.finish_reason == SampleStatus.TRUNCATED and len(versions) == 1500
        switch = versions.index(1)
        assert versions == [0] * switch + [1] * (1500 - switch)
    after = client.generate([GenerateRequest([5, 6], SamplingParams(max_new_tokens=4))])[0]
    assert set(after.output_versions) == {1} and client.get_weight_version() == 1


# ---- a sender killed mid-transfer ---------------------------------------------------------------------

SENDER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from rollout.client import EngineClient
    from slime_rl.config import SyncConfig
    from slime_rl.hf_io import load_hf_checkpoint
    from weight_sync import WeightSync

    class DyingState(dict):
        # SIGKILLs this process when the sender reads its Nth tensor: mid-transfer.
        reads = 0

        def __getitem__(self, name):
            DyingState.reads += 1
            if DyingState.reads == int(sys.argv[3]):
                os.kill(os.getpid(), signal.SIGKILL)
            return dict.__getitem__(self, name)

    class Trainer:
        def __init__(self, state):
            self.state = DyingState({k: v + 1.0 for k, v in state.items()})  # weights the engine must never see

        def hf_state_dict(self):
            return self.state

        def weight_layout(self):
            return {"tp_size": 1, "stages": [[(n, [(n, tuple(t.shape))]) for n, t in dict.items(self.state)]]}

    _, state = load_hf_checkpoint(sys.argv[1])
    client = EngineClient(sys.argv[2], max_retries=0)
    sync = WeightSync(Trainer(state), [client], SyncConfig(transport=sys.argv[4], bucket_mb=0.03))
    sync.push(7)
    print("the sender was not killed")
""")


@pytest.mark.parametrize("kind", ["broadcast", "shm", "disk"])
def test_killed_sender_leaves_old_version_and_next_sync_succeeds(kind, weights, clients, model_dir):
    client = clients[0]
    before = client.weights_checksum()[client.url]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    n_tensors = len(weights)
    proc = subprocess.run([sys.executable, "-c", SENDER, str(model_dir), client.url, str(n_tensors // 2), kind],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    assert client.get_weight_version() == 0
    assert client.weights_checksum()[client.url] == before
    out = client.generate([GenerateRequest([5, 6], SamplingParams(max_new_tokens=3))])[0]
    assert set(out.output_versions) == {0}

    trainer = HFTrainer(HF_CONFIG, weights, OPT)
    train_once(trainer, make_batch())
    sync = WeightSync(trainer, [client], SyncConfig(transport=kind, bucket_mb=SMALL_BUCKETS_MB))
    try:
        sync.push(1)
        assert client.get_weight_version() == 1 and sync.check() == {}
        assert client.weights_checksum()[client.url] != before
        want = {n: tensor_sha256(t) for n, t in trainer.hf_state_dict().items()}
        assert client.weights_checksum()[client.url] == want
    finally:
        sync.close()
