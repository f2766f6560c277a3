"""EmbeddedEngine on tiny random Llama / Qwen2 models (CPU, fp32).

Parity with transformers, KV-cache vs no-cache agreement, seeded sampling,
stop / length handling, weight updates, abort / pause from another thread.
"""

from __future__ import annotations

import re
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rollout import EmbeddedEngine
from rollout.model import ModelConfig, rope_inv_freq
from rollout.sampling import SamplingTensors, row_uniforms, sample
from slime_rl.protocols import RolloutEngine
from slime_rl.types import GenerateRequest, SampleStatus, SamplingParams

VOCAB = 80
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)
VARIANTS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(rope_theta=100000.0)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "llama_bias_tied_llama3rope": (LlamaConfig, LlamaForCausalLM, dict(
        attention_bias=True, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16),
    )),
}


def make_hf(variant: str, seed: int = 0):
    """A tiny HF model with every parameter (biases and norms too) randomized."""
    cfg_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**TINY, **extra)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.15)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_and_dir(request, tmp_path_factory):
    model = make_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, str(path)


@pytest.fixture
def engine(hf_and_dir):
    return EmbeddedEngine.from_pretrained(hf_and_dir[1], seed=0)


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (3 + 4 * i % 11,), generator=gen).tolist() for i in range(n)]


def req(ids, rid=None, **sampling) -> GenerateRequest:
    return GenerateRequest(list(ids), SamplingParams(**sampling), rid=rid)


# ---- model parity -----------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
    hf = make_hf(variant)
    hf.save_pretrained(tmp_path)
    eng = EmbeddedEngine.from_pretrained(str(tmp_path))
    ids_BT = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_BTV = hf(ids_BT).logits
        ours_BTV = eng.model(ids_BT)
    assert ref_BTV.std() > 1.0  # not a degenerate, near-uniform model
    torch.testing.assert_close(ours_BTV, ref_BTV, atol=1e-5, rtol=1e-5)


def test_rope_config_forms():
    base = dict(TINY, model_type="llama")
    old = ModelConfig.from_hf(dict(base, rope_theta=100000.0, rope_scaling=None))
    new = ModelConfig.from_hf(dict(base, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}))
    assert old.rope_theta == new.rope_theta == 100000.0
    assert torch.equal(rope_inv_freq(old), rope_inv_freq(new))
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        ModelConfig.from_hf(dict(base, rope_parameters={"rope_theta": 1e4, "rope_type": "yarn", "factor": 2.0}))


# ---- generation -------------------------------------------------------------


def test_kv_cache_generation_matches_no_cache_forward(engine):
    ps = prompts(6)
    assert len({len(p) for p in ps}) > 3
    params = [
        dict(temperature=0.0), dict(temperature=1.0, seed=11), dict(temperature=0.7, top_p=0.9, seed=12),
        dict(temperature=1.3, top_k=5, seed=13), dict(temperature=0.0), dict(temperature=1.0, seed=14),
    ]
    reqs = [req(p, max_new_tokens=12 + i, **kw) for i, (p, kw) in enumerate(zip(ps, params))]
    outs = engine.generate(reqs)
    for r, o in zip(reqs, outs):
        seq = r.input_ids + o.output_ids
        n, sp = len(r.input_ids), r.sampling
        assert o.finish_reason == SampleStatus.TRUNCATED and len(o.output_ids) == sp.max_new_tokens
        logits_TV = engine.model(torch.tensor([seq]))[0, n - 1 : -1]
        # Replay sampling on no-cache logits with the request's own uniforms.
        st = SamplingTensors.from_params([sp] * len(o.output_ids), VOCAB, "cpu")
        u_T = row_uniforms([sp.seed or 0], len(o.output_ids))[0]
        tokens_T, logps_T = sample(logits_TV, st, u_T)
        assert tokens_T.tolist() == o.output_ids
        torch.testing.assert_close(torch.tensor(o.output_logprobs), logps_T, atol=1e-5, rtol=0)
        lp_ref = engine.compute_logprobs([seq], temperature=sp.temperature or 1.0, start_positions=[n])[0]
        torch.testing.assert_close(torch.tensor(o.output_logprobs), lp_ref, atol=1e-5, rtol=0)
    assert len({t for o in outs for t in o.output_ids}) > 10  # the model is not stuck on one token


def test_same_seed_alone_or_in_batch(hf_and_dir):
    big = EmbeddedEngine.from_pretrained(hf_and_dir[1], max_batch_size=64, seed=5)
    small = EmbeddedEngine.from_pretrained(hf_and_dir[1], max_batch_size=2, seed=99)
    ps = prompts(5, seed=3)
    reqs = [req(p, temperature=1.0, top_p=0.95 if i % 2 else 1.0, max_new_tokens=10 + i, seed=100 + i)
            for i, p in enumerate(ps)]
    batch_outs = big.generate(reqs)
    small_outs = small.generate(list(reversed(reqs)))[::-1]
    for r, b, s in zip(reqs, batch_outs, small_outs):
        alone = big.generate([r])[0]
        assert b.output_ids == alone.output_ids == s.output_ids
        torch.testing.assert_close(
            torch.tensor(b.output_logprobs), torch.tensor(alone.output_logprobs), atol=1e-5, rtol=0
        )
    assert len({tuple(o.output_ids) for o in batch_outs}) == len(reqs)
    # Different seeds, same prompt: different samples.
    a, b = big.generate([req(ps[0], max_new_tokens=16, seed=1), req(ps[0], max_new_tokens=16, seed=2)])
    assert a.output_ids != b.output_ids


def test_unseeded_requests_follow_engine_seed(hf_and_dir):
    e1, e2 = (EmbeddedEngine.from_pretrained(hf_and_dir[1], seed=7) for _ in range(2))
    reqs = [req(p, max_new_tokens=8) for p in prompts(3)]
    first = [o.output_ids for o in e1.generate(reqs)]
    assert first == [o.output_ids for o in e2.generate(reqs)]
    assert first != [o.output_ids for o in e1.generate(reqs)]  # the engine generator advances


def test_stop_tokens_and_max_new_tokens(engine):
    p = prompts(1, seed=4)[0]
    free = engine.generate([req(p, temperature=0.0, max_new_tokens=20)])[0]
    assert free.finish_reason == SampleStatus.TRUNCATED and len(free.output_ids) == 20
    stop = free.output_ids[5]
    first = free.output_ids.index(stop)
    outs = engine.generate([
        req(p, rid="stop", temperature=0.0, max_new_tokens=20, stop_token_ids=[VOCAB - 1 - stop, stop]),
        req(p, rid="len", temperature=0.0, max_new_tokens=3),
        req(p, rid="edge", temperature=0.0, max_new_tokens=first + 1, stop_token_ids=[stop]),
    ])
    assert outs[0].output_ids == free.output_ids[: first + 1]  # stop token included
    assert outs[0].finish_reason == SampleStatus.COMPLETED
    assert outs[1].output_ids == free.output_ids[:3] and outs[1].finish_reason == SampleStatus.TRUNCATED
    assert outs[2].finish_reason == SampleStatus.COMPLETED  # stop on the last allowed token wins
    assert [o.rid for o in outs] == ["stop", "len", "edge"]
    assert all(o.prompt_tokens == len(p) and o.weight_version == 0 for o in outs)
    assert all(len(o.output_logprobs) == len(o.output_ids) for o in outs)


def test_top_k_one_and_tiny_top_p_are_greedy(engine):
    ps = prompts(4, seed=6)
    greedy = engine.generate([req(p, temperature=0.0, max_new_tokens=15) for p in ps])
    topk = engine.generate([req(p, temperature=1.5, top_k=1, max_new_tokens=15, seed=i) for i, p in enumerate(ps)])
    topp = engine.generate([req(p, temperature=1.5, top_p=1e-6, max_new_tokens=15, seed=i) for i, p in enumerate(ps)])
    sampled = engine.generate([req(p, temperature=1.5, max_new_tokens=15, seed=i) for i, p in enumerate(ps)])
    for g, k, t, s in zip(greedy, topk, topp, sampled):
        assert g.output_ids == k.output_ids == t.output_ids
        assert s.output_ids != g.output_ids  # sampling really samples at this temperature
        assert all(lp <= 0 for lp in g.output_logprobs)


# ---- weights ----------------------------------------------------------------


def test_weight_update_all_or_nothing(engine, hf_and_dir, tmp_path):
    variant = "qwen2" if engine.config.model_type == "qwen2" else "llama"
    new_hf = make_hf(variant, seed=123)
    new_sd = list(new_hf.state_dict().items())
    reqs = [req(p, temperature=0.0, max_new_tokens=10) for p in prompts(3)]
    before = [o.output_ids for o in engine.generate(reqs)]
    snapshot = {k: v.clone() for k, v in engine.model.state_dict().items()}

    bad = new_sd[:-1] + [(new_sd[-1][0], torch.zeros(3, 3))]
    with pytest.raises(ValueError, match=re.escape(repr(new_sd[-1][0]))):
        engine.update_weights_from_tensors(bad, weight_version=1)
    with pytest.raises(ValueError, match="unknown tensor 'model.bogus.weight'"):
        engine.update_weights_from_tensors(new_sd + [("model.bogus.weight", torch.zeros(1))], weight_version=1)
    assert engine.get_weight_version() == 0
    assert all(torch.equal(v, snapshot[k]) for k, v in engine.model.state_dict().items())
    assert [o.output_ids for o in engine.generate(reqs)] == before

    engine.update_weights_from_tensors(iter(new_sd), weight_version=3)
    outs = engine.generate(reqs)
    assert engine.get_weight_version() == 3 and all(o.weight_version == 3 for o in outs)
    new_hf.save_pretrained(tmp_path)
    fresh = EmbeddedEngine.from_pretrained(str(tmp_path))
    assert [o.output_ids for o in outs] == [o.output_ids for o in fresh.generate(reqs)] != before

    # Partial update: one tensor, then back to the original checkpoint from disk.
    name = "model.layers.1.mlp.down_proj.weight"
    engine.update_weights_from_tensors([(name, torch.zeros_like(snapshot[name]))], weight_version=4)
    assert engine.get_weight_version() == 4 and not engine.model.state_dict()[name].any()
    engine.update_weights_from_disk(hf_and_dir[1], weight_version=5)
    assert [o.output_ids for o in engine.generate(reqs)] == before and engine.get_weight_version() == 5


# ---- control ----------------------------------------------------------------


class ForwardGate:
    """Blocks the engine's `call_at`-th forward until released (no sleeps)."""

    def __init__(self, engine: EmbeddedEngine, call_at: int):
        self.reached, self.release = threading.Event(), threading.Event()
        self.calls, self.call_at, self._model = 0, call_at, engine.model
        self._fwd = engine.model.hidden
        engine.model.hidden = self

    def remove(self) -> None:
        del self._model.hidden

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.call_at:
            self.reached.set()
            assert self.release.wait(timeout=30)
        return self._fwd(*args, **kwargs)


def run_in_thread(engine, reqs):
    result = {}
    thread = threading.Thread(target=lambda: result.update(outs=engine.generate(reqs)))
    thread.start()
    return thread, result


def interrupted(engine, reqs, call_at, action):
    """Run generate in a thread, call `action()` while it is held before forward `call_at`, then finish."""
    gate = ForwardGate(engine, call_at=call_at)
    thread, result = run_in_thread(engine, reqs)
    assert gate.reached.wait(timeout=30)
    action()
    gate.release.set()
    thread.join(timeout=30)
    gate.remove()
    return result["outs"]


def test_abort_from_another_thread(engine):
    ps = prompts(2)
    reqs = [req(ps[0], rid="a", max_new_tokens=24, seed=1), req(ps[1], rid="b", max_new_tokens=24, seed=2)]
    a, b = interrupted(engine, reqs, 3, lambda: engine.abort("a"))
    assert a.finish_reason == SampleStatus.ABORTED and len(a.output_ids) == 3 == len(a.output_logprobs)
    assert b.finish_reason == SampleStatus.TRUNCATED and len(b.output_ids) == 24
    ref = engine.generate(reqs)
    assert a.output_ids == ref[0].output_ids[:3] and b.output_ids == ref[1].output_ids

    outs = interrupted(engine, reqs, 4, engine.abort)  # abort all
    assert [len(o.output_ids) for o in outs] == [4, 4]
    assert all(o.finish_reason == SampleStatus.ABORTED for o in outs)
    assert engine.generate(reqs)[1].finish_reason == SampleStatus.TRUNCATED  # later calls unaffected


def test_pause_in_place_then_continue_with_new_weights(engine, hf_and_dir):
    reqs = [req(p, temperature=0.0, max_new_tokens=12) for p in prompts(3)]
    ref = engine.generate(reqs)
    gate = ForwardGate(engine, call_at=4)
    thread, result = run_in_thread(engine, reqs)
    assert gate.reached.wait(timeout=30)
    engine.pause_generation("in_place")
    gate.release.set()
    # Paused between steps: a weight update lands before the 5th forward.
    variant = "qwen2" if engine.config.model_type == "qwen2" else "llama"
    engine.update_weights_from_tensors(make_hf(variant, seed=9).state_dict().items(), weight_version=2)
    assert gate.calls == 4
    engine.continue_generation()
    thread.join(timeout=30)
    outs = result["outs"]
    assert all(o.finish_reason == SampleStatus.TRUNCATED and o.weight_version == 2 for o in outs)
    assert [o.output_ids[:4] for o in outs] == [o.output_ids[:4] for o in ref]
    assert [o.output_ids for o in outs] != [o.output_ids for o in ref]


def test_pause_abort_mode(engine):
    reqs = [req(p, max_new_tokens=30, seed=3) for p in prompts(2)]
    outs = interrupted(engine, reqs, 2, lambda: engine.pause_generation("abort"))
    assert all(o.finish_reason == SampleStatus.ABORTED and len(o.output_ids) == 2 for o in outs)
    engine.continue_generation()
    assert all(o.finish_reason == SampleStatus.TRUNCATED for o in engine.generate(reqs))
    with pytest.raises(ValueError, match="pause mode"):
        engine.pause_generation("sideways")


# ---- validation / contract --------------------------------------------------


def test_request_validation(engine):
    ok = req([1, 2, 3], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"request 1 \(rid='long'\): prompt of 128 tokens does not fit the context "
                                         r"limit of 128 tokens"):
        engine.generate([ok, req(list(range(64)) * 2, rid="long", max_new_tokens=9)])
    # Like SGLang, max_new_tokens is clamped to the room left in the context.
    (clamped,) = engine.generate([req(list(range(60)) * 2, rid="near", max_new_tokens=9)])
    assert clamped.finish_reason == SampleStatus.TRUNCATED and len(clamped.output_ids) == 8
    with pytest.raises(ValueError, match=r"request 0 .*top_p"):
        engine.generate([req([1, 2], top_p=0.0)])
    with pytest.raises(ValueError, match="empty"):
        engine.generate([req([])])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 80\)"):
        engine.generate([req([1, VOCAB])])
    assert engine.generate([]) == []


def test_engine_satisfies_protocol(engine):
    assert isinstance(engine, RolloutEngine)
    assert engine.health() is True
    engine.flush_cache()
    assert engine.get_weight_version() == 0


def test_random_init_engine_from_config():
    cfg = dict(TINY, model_type="qwen2")
    a, b = EmbeddedEngine(cfg, seed=3), EmbeddedEngine(cfg, seed=3)
    r = [req([1, 2, 3], temperature=0.0, max_new_tokens=5)]
    assert a.generate(r)[0].output_ids == b.generate(r)[0].output_ids
    with pytest.raises(ValueError, match="missing"):
        EmbeddedEngine(cfg, state_dict={"model.norm.weight": torch.ones(64)})


# ---- sampling ---------------------------------------------------------------


def _params_rows(n: int, gen: torch.Generator) -> list[SamplingParams]:
    tops = torch.rand(n, generator=gen).tolist()
    ks = torch.randint(1, 40, (n,), generator=gen).tolist()
    return [SamplingParams(temperature=0.8, top_p=0.3 + 0.7 * p if i % 3 else 1.0, top_k=k if i % 2 else -1)
            for i, (p, k) in enumerate(zip(tops, ks))]


def test_truncated_sampling_fast_path_equals_full_sort(monkeypatch):
    import rollout.sampling as sampling

    gen = torch.Generator().manual_seed(0)
    logits_BV = torch.randn(256, 50, generator=gen) * 2
    st = SamplingTensors.from_params(_params_rows(256, gen), 50, "cpu")
    u_B = torch.rand(256, generator=gen, dtype=torch.float64)
    monkeypatch.setattr(sampling, "FAST_CANDIDATES", 50)  # every row: one full sorted prefix
    ref_B, ref_lp_B = sample(logits_BV, st, u_B)
    monkeypatch.setattr(sampling, "FAST_CANDIDATES", 4)  # most rows fall back to the full sort
    tok_B, lp_B = sample(logits_BV, st, u_B)
    assert torch.equal(tok_B, ref_B) and torch.equal(lp_B, ref_lp_B)


@pytest.mark.parametrize("top_p,top_k", [(1.0, -1), (0.7, -1), (1.0, 3), (0.9, 5)])
def test_sampling_follows_truncated_distribution(top_p, top_k):
    logits_V = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    temp, n = 0.9, 40000
    probs_V = torch.softmax(logits_V / temp, -1)
    keep_V = torch.zeros(8, dtype=torch.bool)  # probs_V is already in descending order
    excl = probs_V.cumsum(0) - probs_V
    keep_V[: (top_k if top_k > 0 else 8)] = True
    keep_V &= excl <= top_p
    expect_V = torch.where(keep_V, probs_V, 0.0) / probs_V[keep_V].sum()
    sp = SamplingParams(temperature=temp, top_p=top_p, top_k=top_k)
    st = SamplingTensors.from_params([sp] * n, 8, "cpu")
    u_B = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tok_B, lp_B = sample(logits_V.expand(n, 8), st, u_B)
    freq_V = torch.bincount(tok_B, minlength=8).double() / n
    assert torch.all(freq_V[~keep_V] == 0)
    torch.testing.assert_close(freq_V, expect_V.double(), atol=0.01, rtol=0)
    # Reported logprobs are NOT renormalized after truncation (see rollout/sampling.py).
    torch.testing.assert_close(lp_B, torch.log(probs_V)[tok_B], atol=1e-6, rtol=0)
