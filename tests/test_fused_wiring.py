"""Both trainer backends give the same step with the fused linear+logprob op as through full logits.

The fused path (HFTrainer(fused_logprob=True), ModelSettings.fused_logprob,
both the default) computes logprobs and entropy from the final hidden states
and the output weight with `slime_rl.ops.fused_linear_logprobs`; the logits
path runs the output layer and `logprobs_from_logits` /
`vocab_parallel_logprobs`. Same weights, same batch, one RL step each: the
logprob passes (policy and reference), the loss statistics, the grad norm and
the weights after the step must agree to fp32 rounding. Each test also checks
that the path it claims ran did: the HF lm_head is never called on the fused
path, and the Megatron loss receives hidden states (width H) there and logits
(width V_local) on the other, with the implementation this process would choose
(the C++ kernel when the library has it, else the torch reference).

Layouts: the HF backend with untied (Qwen2) and tied (Llama) embeddings, with
the reference and (when built) the C++ kernel; Megatron at TP2 with a
vocabulary of 101 padded to 102 (two 51-row shards, the last row padding: V not
divisible by TP; the hidden-state gradient must be all-reduced over TP), and
PP2 with tied embeddings (the last stage's output-layer copy of the embedding
must get the gradient). TP2 with the default padding (a rank holding only
padding rows) runs fused in tests/test_megatron.py. Megatron runs both paths in
one set of ranks (switched between steps, weights and optimizer reset): spawning
ranks is most of the time.

Tolerances: logprobs 1e-5 absolute, loss and grad norm 1e-5 relative. Both
paths evaluate the same matmul; they differ only in how the softmax sums are
accumulated (online over vocab tiles in the C++ kernel), a few ulp in fp32.
Weights after one Adam step within 1e-5 as in tests/test_megatron.py (its
first step is ~lr = 1e-4 per element whatever the gradient's size).
"""

from __future__ import annotations

import pytest
import torch

from slime_rl import ops
from slime_rl.hf_io import init_tiny_model, save_hf_checkpoint, tiny_hf_config
from training.spmd import spawn_ranks
from slime_rl.ops import _backend
from slime_rl.ops.fused_logprob import FORWARD_OP
from test_megatron import HF_CONFIG, LOSS, OPT, make_batch, prepared, rel
from training.hf import HFTrainer
from training.megatron import MegatronBackend, MegatronSettings, ModelSettings
from training.megatron.model import return_hidden_states, unwrap
from training.megatron.worker import MegatronWorker

TIED_CONFIG = tiny_hf_config("llama", vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1,
                             intermediate_size=96, tie_word_embeddings=True)
CONFIGS = {"qwen2-untied": HF_CONFIG, "llama-tied": TIED_CONFIG}
STATS = ("loss", "pg_loss", "kl_ref", "entropy", "clip_frac")


@pytest.fixture(scope="module")
def weights():
    return {name: init_tiny_model(config, seed=3) for name, config in CONFIGS.items()}


def run(backend, batch) -> dict:
    """Logprobs, reference logprobs, one train step (on the prepared batch) and the weights after it."""
    lp = backend.logprobs(batch)
    ref = backend.ref_logprobs(batch)
    stats = backend.train_step(prepared(batch, lp, ref), LOSS)
    return {"logprobs": lp, "ref_logprobs": ref, "stats": stats, "after": dict(backend.named_hf_weights())}


def assert_same_step(fused: dict, logits: dict, mask_BT: torch.Tensor) -> None:
    for key in ("logprobs", "ref_logprobs"):
        assert torch.all(fused[key][~mask_BT.bool()] == 0), key
        diff = ((fused[key] - logits[key]) * mask_BT).abs().max().item()
        assert diff < 1e-5, (key, diff)
    got, want = fused["stats"], logits["stats"]
    for k in STATS:
        assert abs(got[k] - want[k]) < 1e-5 * max(1.0, abs(want[k])), (k, got[k], want[k])
    assert rel(got["loss"], want["loss"]) < 1e-5, (got["loss"], want["loss"])
    assert rel(got["grad_norm"], want["grad_norm"]) < 1e-5, (got["grad_norm"], want["grad_norm"])
    assert set(fused["after"]) == set(logits["after"])
    for k, v in logits["after"].items():
        diff = (fused["after"][k] - v).abs().max().item()
        assert diff < 1e-5, (k, diff)


# ------------------------------------------------------------------ HF backend


def _impl_context(impl: str):
    """force_impl for the reference; the automatic choice for cpp, skipped unless it picks the C++ kernel."""
    if impl == "reference":
        return ops.force_impl("reference")
    if impl not in ops.available_impls(FORWARD_OP):
        pytest.skip(f"no C++ kernel for {FORWARD_OP} here (available: {ops.available_impls(FORWARD_OP)})")
    if _backend.choose(FORWARD_OP, torch.zeros(1)) != impl:
        pytest.skip(f"the automatic choice for {FORWARD_OP} is not {impl} here (SLIME_RL_OPS_IMPL set?)")
    return ops.force_impl(None)


def _count_lm_head_calls(trainer: HFTrainer) -> list[int]:
    calls = [0]
    for model in (trainer.model, trainer.ref_model):
        model.get_output_embeddings().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_fused_step_matches_logits_path(weights, name, impl):
    config, batch = CONFIGS[name], make_batch(seed=1)
    with _impl_context(impl):
        results, calls = {}, {}
        for fused in (True, False):
            trainer = HFTrainer(config, weights[name], OPT, with_reference=True, fused_logprob=fused)
            calls[fused] = _count_lm_head_calls(trainer)
            results[fused] = run(trainer, make_batch(seed=1))
    assert calls[True][0] == 0, "the fused path ran the lm_head (it must never form the logits)"
    assert calls[False][0] > 0
    # the fused path gives response tokens only (HFTrainer.response_tokens_only), the logits path every position
    assert_same_step(results[True], results[False], batch.response_mask_BT)


def test_hf_fused_rejects_a_head_it_cannot_fuse(weights):
    """A model whose logits are more than lm_head(hidden) (here: Gemma2-style soft-capping) must say so."""
    capped = {**HF_CONFIG, "final_logit_softcapping": 30.0}
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        HFTrainer(capped, weights["qwen2-untied"], OPT, fused_logprob=True)
    HFTrainer(capped, weights["qwen2-untied"], OPT, fused_logprob=False)  # the logits path still serves it


# ------------------------------------------------------------------ Megatron backend


class SpyWorker(MegatronWorker):
    """A MegatronWorker that records what its loss received — its width (H: hidden states, V_local: logits) and
    the fused op's implementation — and can switch between the two paths, so one set of spawned ranks runs
    both (spawning is most of the cost)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: set[tuple[int, str]] = set()

    def _token_logprobs(self, out_NX, *args, **kwargs):
        self.seen.add((int(out_NX.shape[1]), _backend.choose(FORWARD_OP, out_NX.detach())))
        return super()._token_logprobs(out_NX, *args, **kwargs)

    def take_seen(self) -> list[tuple[int, str]]:
        seen, self.seen = sorted(self.seen), set()
        return seen

    def set_fused_logprob(self, fused: bool) -> None:
        """What building with ModelSettings(fused_logprob=fused) would have done."""
        self.settings.model.fused_logprob = fused
        if self.last_stage:
            gpt = unwrap(self.model)
            gpt.output_layer.__dict__.pop("forward", None)  # back to ColumnParallelLinear.forward
            if fused:
                return_hidden_states(gpt)


def spy_launcher(num_ranks, factory, factory_kwargs, **kwargs):
    return spawn_ranks(num_ranks, f"{__name__}:SpyWorker", factory_kwargs, **kwargs)


MEGATRON_LAYOUTS = {  # name: (config name, tp, pp, vocab_pad_multiple)
    "tp2-vocab-not-divisible": ("qwen2-untied", 2, 1, 1),
    "pp2-tied": ("llama-tied", 1, 2, 128),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(MEGATRON_LAYOUTS))
def test_megatron_fused_step_matches_logits_path(weights, layout, tmp_path):
    """The logits path, then the same ranks switched to the fused path from the same weights and a fresh optimizer."""
    name, tp, pp, pad_multiple = MEGATRON_LAYOUTS[layout]
    config, batch = CONFIGS[name], make_batch(seed=1)
    save_hf_checkpoint(tmp_path, config, weights[name])
    model = ModelSettings(tp=tp, pp=pp, vocab_pad_multiple=pad_multiple, fused_logprob=False)
    results, seen = {}, {}
    with MegatronBackend(config, str(tmp_path), OPT, MegatronSettings(model=model), num_ranks=tp * pp,
                         with_reference=True, launcher=spy_launcher) as b:
        for fused in (False, True):
            b.group.call("set_fused_logprob", fused)
            b.reset_optimizer(OPT)
            b.load(str(tmp_path))  # an HF directory: the weights only
            restored = b.hf_state_dict()
            assert all(torch.equal(restored[k], weights[name][k]) for k in restored)
            results[fused] = run(b, make_batch(seed=1))
            seen[fused] = sorted({x for xs in b.group.call("take_seen") for x in xs})
    v_local = -(-config["vocab_size"] // (pad_multiple * tp)) * pad_multiple
    impl = _backend.choose(FORWARD_OP, torch.zeros(1))  # the ranks inherit this process's environment
    assert seen == {True: [(config["hidden_size"], impl)], False: [(v_local, impl)]}
    assert_same_step(results[True], results[False], batch.attention_mask_BT)
