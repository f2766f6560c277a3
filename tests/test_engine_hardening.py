"""EmbeddedEngine against bad input: one request's failure stays that request's, requests are
validated against the model, weights with NaN / inf are refused, and checkpoint directories
that name files outside themselves (or are not checkpoints) are refused with a ValueError.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from safetensors.torch import save_file

from rollout import wire
from rollout.engine import EmbeddedEngine, load_safetensors_dir
from rollout.scheduler import Scheduler
from rollout.server import BackgroundServer
from server_procs import post
from slime_rl.buckets import pack_bucket
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.types import GenerateRequest, SampleStatus, SamplingParams

VOCAB = 64
POISON = "poison"
LONG = 40  # new tokens of each "long" generation


@pytest.fixture(scope="module")
def cfg() -> dict:
    return tiny_hf_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                          max_position_embeddings=128)


@pytest.fixture(scope="module")
def weights(cfg) -> dict[str, torch.Tensor]:
    """Peaked random weights (greedy choices far from ties)."""
    gen = torch.Generator().manual_seed(0)
    return {name: (torch.ones_like(t) if name.endswith("norm.weight") else torch.randn(t.shape, generator=gen) * 0.15)
            for name, t in init_tiny_model(cfg, seed=0).items()}


@pytest.fixture
def engine(cfg, weights):
    eng = EmbeddedEngine(cfg, weights, seed=0, max_total_tokens=2048)
    yield eng
    eng.close()


def long_requests() -> list[GenerateRequest]:
    return [GenerateRequest([3 + i, 4, 5 + i, 6], SamplingParams(temperature=0.0, max_new_tokens=LONG), rid=f"long{i}")
            for i in range(6)]


def poison(**sampling) -> GenerateRequest:
    params = dict(temperature=0.0, max_new_tokens=LONG)
    params.update(sampling)
    return GenerateRequest([9], SamplingParams(**params), rid=POISON)


@pytest.fixture
def baseline(engine) -> list[list[int]]:
    """The six long generations' tokens without anything else in the engine."""
    outs = engine.generate(long_requests())
    assert all(o.finish_reason == SampleStatus.TRUNCATED and len(o.output_ids) == LONG for o in outs)
    assert engine.flush_cache()
    return [o.output_ids for o in outs]


def fail_when_poisoned(monkeypatch, step: str) -> None:
    """Make Scheduler.sample_and_append raise for any batch holding the poisoned request, at its
    prefill ("prefill") or at its third decode step ("decode")."""
    original = Scheduler.sample_and_append

    def sample_and_append(self, reqs, logits_BV):
        for r in reqs:
            if r.rid == POISON and (len(r.out_ids) == 0 if step == "prefill" else len(r.out_ids) == 3):
                raise IndexError(f"injected failure in a batch of {len(reqs)}")
        return original(self, reqs, logits_BV)

    monkeypatch.setattr(Scheduler, "sample_and_append", sample_and_append)


def check_six_and_poison(outs, baseline, poison_tokens: int) -> None:
    *six, bad = outs
    assert [o.output_ids for o in six] == baseline
    assert all(o.finish_reason == SampleStatus.TRUNCATED and o.error is None for o in six)
    assert bad.finish_reason == SampleStatus.ABORTED and len(bad.output_ids) == poison_tokens
    assert "IndexError" in bad.error and "Traceback" not in bad.error and "\n" not in bad.error
    assert wire.finish_reason_json(bad) == {"type": "abort", "message": wire.ENGINE_ERROR_MESSAGE, "status_code": 500,
                                            "err_type": "InternalServerError"}  # no exception text over HTTP


# ---- one request's failure --------------------------------------------------------------------


@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_failing_request_in_a_batch_fails_alone(engine, baseline, monkeypatch, caplog, step):
    """All seven are batched together; the step that holds the poisoned request raises."""
    fail_when_poisoned(monkeypatch, step)
    outs = engine.generate(long_requests() + [poison()])
    check_six_and_poison(outs, baseline, 0 if step == "prefill" else 3)
    assert any(r.exc_info and "injected failure" in str(r.exc_info[1]) for r in caplog.records)  # traceback logged
    assert engine.generate([poison(max_new_tokens=5)])[0].finish_reason == SampleStatus.ABORTED  # alone too
    monkeypatch.undo()
    assert engine.generate([poison(max_new_tokens=5)])[0].finish_reason == SampleStatus.TRUNCATED


def test_unvalidated_bad_stop_id_arriving_mid_run_fails_alone(engine, baseline, monkeypatch):
    """The original report: six long generations run, then a request whose stop id is outside the
    vocab (validation bypassed here) makes its prefill raise IndexError; only it is aborted."""
    running = threading.Event()
    handles = [engine.submit(r, lambda out: running.set()) for r in long_requests()]
    assert running.wait(30)
    monkeypatch.setattr(engine, "_validate", lambda r, where: None)
    bad = engine.submit(poison(max_new_tokens=4, min_new_tokens=1, stop_token_ids=[1_000_000_000])).result(30)
    outs = [h.result(30) for h in handles] + [bad]
    check_six_and_poison(outs, baseline, 0)


def test_batch_failure_no_request_explains_aborts_the_running_with_the_error(engine, monkeypatch):
    """Every request runs alone, yet the batch fails: the old behaviour (abort what runs), with the error."""
    original = Scheduler.forward

    def forward(self, reqs, prefill):
        if len(reqs) > 1:
            raise RuntimeError("batch too big")
        return original(self, reqs, prefill)

    monkeypatch.setattr(Scheduler, "forward", forward)
    outs = engine.generate(long_requests()[:3])
    assert all(o.finish_reason == SampleStatus.ABORTED for o in outs)
    assert all("batch too big" in o.error and "every running request" in o.error for o in outs)
    assert engine.health()
    assert engine.generate([poison(max_new_tokens=2)])[0].finish_reason == SampleStatus.TRUNCATED


def test_plain_abort_renders_as_before(engine):
    out = engine.generate([poison(max_new_tokens=2)])[0]
    out.finish_reason = SampleStatus.ABORTED
    assert out.error is None
    assert wire.finish_reason_json(out) == {"type": "abort", "message": wire.ABORT_MESSAGE, "status_code": None,
                                            "err_type": None}


# ---- validation -----------------------------------------------------------------------------


def test_poisoned_stop_token_ids_are_rejected_at_submit(engine):
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 64\)"):
        engine.submit(poison(max_new_tokens=4, min_new_tokens=1, stop_token_ids=[1_000_000_000]))
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.submit(poison(stop_token_ids=[-1]))
    with pytest.raises(ValueError, match="stop_token_ids must be a list of ints"):
        engine.submit(poison(stop_token_ids=[1.5]))
    assert engine.load()["num_waiting_reqs"] == 0 and engine.generate([poison(max_new_tokens=2)])


@pytest.mark.parametrize("field, value, message", [
    ("input_ids", [1, True], "input_ids must be a list of ints"),
    ("input_ids", [1, 64], r"token ids must be in \[0, 64\)"),
    ("temperature", float("nan"), "temperature"),
    ("temperature", float("inf"), "temperature must be finite"),
    ("top_p", float("nan"), "top_p"),
    ("top_k", 2.0, "top_k must be an int"),
    ("max_new_tokens", "8", "max_new_tokens must be an int"),
    ("seed", 2**70, "seed must be in"),
    ("seed", 1.0, "seed must be an int"),
    ("stop", "x", "stop must be a list of strings"),
    ("rid", 7, "rid must be a string"),
    ("top_logprobs_num", -1, "top_logprobs_num must be >= 0"),
    ("logprob_start_len", 5, "logprob_start_len must be -1 or in"),
])
def test_every_field_is_validated(engine, field, value, message):
    request = poison()
    target = request if hasattr(request, field) else request.sampling
    setattr(target, field, value)
    with pytest.raises(ValueError, match=message):
        engine.submit(request)


def test_min_new_tokens_still_masks_stop_ids(engine):
    first = engine.generate([poison(max_new_tokens=4)])[0].output_ids[0]
    stopped = engine.generate([poison(max_new_tokens=4, stop_token_ids=[first])])[0]
    assert stopped.output_ids == [first] and stopped.matched_stop == first
    masked = engine.generate([poison(max_new_tokens=4, min_new_tokens=1, stop_token_ids=[first])])[0]
    assert masked.output_ids[0] != first and masked.error is None


# ---- non-finite weights ---------------------------------------------------------------------


def with_value(weights: dict[str, torch.Tensor], name: str, value: float) -> dict[str, torch.Tensor]:
    bad = {k: v.clone() for k, v in weights.items()}
    bad[name].view(-1)[3] = value
    return bad


NAME = "model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_are_refused_in_every_update_path(cfg, weights, engine, tmp_path, value):
    bad = with_value(weights, NAME, value)
    with pytest.raises(ValueError, match=f"'{NAME}' has NaN or inf"):
        EmbeddedEngine(cfg, bad)
    before = engine.weights_checksum()
    with pytest.raises(ValueError, match=NAME):
        engine.update_weights_from_tensors([(NAME, bad[NAME])], 1)
    with pytest.raises(ValueError, match=NAME):
        engine.update_weights_from_bucket(pack_bucket(sorted(bad.items())), 1)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=NAME):
        engine.update_weights_from_disk(str(tmp_path), 1)
    with pytest.raises(ValueError, match=NAME):
        engine.stage_weights([(NAME, bad[NAME].to(torch.bfloat16))], "t")
    assert engine.staged_transfer() == (None, 0)
    assert engine.weights_checksum() == before and engine.get_weight_version() == 0


def test_nonfinite_weights_accepted_when_allowed(cfg, weights):
    bad = with_value(weights, NAME, float("nan"))
    eng = EmbeddedEngine(cfg, bad, reject_nonfinite_weights=False, max_total_tokens=256)
    try:
        assert eng.reject_nonfinite_weights is False
        eng.update_weights_from_tensors([(NAME, bad[NAME])], 1)
        assert eng.stage_weights(list(bad.items()), "t") == len(bad)
        eng.commit_weights("t", 2)
        assert torch.isnan(eng._params[NAME]).any()
    finally:
        eng.close()


# ---- checkpoint directories -----------------------------------------------------------------


def write_index(model_dir, weight_map) -> None:
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def sharded(tmp_path, weights, shard_names: list[str]):
    """A model dir whose index spreads the weights over `shard_names` (written where they point)."""
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    names = sorted(weights)
    groups = {s: names[i::len(shard_names)] for i, s in enumerate(shard_names)}
    for shard, group in groups.items():
        path = shard if os.path.isabs(shard) else model_dir / shard
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({n: weights[n] for n in group}, str(path))
    write_index(model_dir, {n: s for s, group in groups.items() for n in group})
    return str(model_dir)


def test_sharded_dir_inside_loads_including_subdir_and_linked_shard(tmp_path, weights):
    model_dir = sharded(tmp_path, weights, ["a.safetensors", "sub/b.safetensors"])
    blobs = tmp_path / "blobs"  # the HF hub cache links every snapshot file into its blob store
    blobs.mkdir()
    os.replace(os.path.join(model_dir, "a.safetensors"), blobs / "a")
    os.symlink(blobs / "a", os.path.join(model_dir, "a.safetensors"))
    loaded = load_safetensors_dir(model_dir)
    assert sorted(loaded) == sorted(weights) and all(torch.equal(loaded[n], weights[n]) for n in weights)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABS", "linkdir/x.safetensors", "sub/../../o.safetensors"])
def test_index_naming_a_file_outside_is_refused(tmp_path, weights, shard):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if shard == "ABS":
        shard = str(outside / "abs.safetensors")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "linkdir").symlink_to(outside, target_is_directory=True)
    target = shard if os.path.isabs(shard) else os.path.normpath(os.path.join(model_dir, shard))
    save_file(dict(weights), str(target))  # a valid checkpoint there: refused by the rule, not by its bytes
    write_index(model_dir, {n: shard for n in weights})
    with pytest.raises(ValueError, match="shard") as info:
        load_safetensors_dir(str(model_dir))
    assert repr(shard) in str(info.value)


@pytest.mark.parametrize("case, message", [
    ("not_json", "as JSON"),
    ("no_weight_map", "weight_map"),
    ("bad_weight_map", "weight_map"),
    ("list_index", "weight_map"),
    ("missing_shard", "is not a file"),
    ("junk_single", "cannot load"),
    ("junk_shard", "cannot load"),
    ("empty_dir", "no \\*.safetensors"),
    ("missing_dir", "does not exist"),
])
def test_broken_checkpoint_dirs_are_value_errors(tmp_path, weights, case, message):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    index = model_dir / "model.safetensors.index.json"
    if case == "not_json":
        index.write_bytes(b"\xff{not json")
    elif case == "no_weight_map":
        index.write_text(json.dumps({"metadata": {}}))
    elif case == "bad_weight_map":
        index.write_text(json.dumps({"weight_map": {"a": 3}}))
    elif case == "list_index":
        index.write_text(json.dumps([1, 2]))
    elif case == "missing_shard":
        write_index(model_dir, {"a": "gone.safetensors"})
    elif case == "junk_single":
        (model_dir / "model.safetensors").write_bytes(b"junk junk junk")
    elif case == "junk_shard":
        (model_dir / "s.safetensors").write_bytes(b"\x08" + bytes(7) + b"{}")
        write_index(model_dir, {"a": "s.safetensors"})
    elif case == "missing_dir":
        model_dir = tmp_path / "nope"
    with pytest.raises(ValueError, match=message):
        load_safetensors_dir(str(model_dir))


def test_update_from_disk_endpoint_answers_400_for_an_escaping_shard(engine, tmp_path, weights):
    model_dir = sharded(tmp_path, weights, ["../outside.safetensors"])
    with BackgroundServer(engine) as server:
        status, res = post(server.url + "/update_weights_from_disk", {"model_path": model_dir, "weight_version": 2})
    assert status == 400 and "outside.safetensors" in res["message"], res
    assert engine.get_weight_version() == 0
