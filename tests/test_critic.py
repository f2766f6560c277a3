"""The critic (PPO's value model) on both backends.

HFCritic, the reference: a zero head gives values of exactly 0; values ignore padding; the
micro-batch size does not change the step; save -> load resumes bit-exactly (optimizer and
schedule included); the HF export loads in transformers as *ForTokenClassification.

MegatronCritic against HFCritic on the same weights (a random head, so values are not trivially
0): values within 1e-5 for TP2, PP2 and DP2, and again after one MSE step. The step's lr (1e-4)
keeps Adam's first step (~lr per element, whatever the gradient's size) from turning summation
differences between layouts into visible value differences. Resume: a TP2 critic saved after one
step and resumed in fresh ranks continues bit-exactly; its HF export loads in transformers.
"""

from __future__ import annotations

import functools

import pytest
import torch

from slime_rl import algorithms
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.protocols import CriticBackend
from slime_rl.types import Sample, TrainBatch
from training.hf import OptimSettings
from training.hf.critic import SCORE, HFCritic, critic_hf_config, init_critic_state

OPT = OptimSettings(lr=1e-4, micro_batch_size=2, grad_clip=1.0)


@functools.cache
def policy() -> tuple[dict, dict[str, torch.Tensor]]:
    """A tiny untied Llama policy (config, weights); built on first use, not at import (ranks import this module)."""
    config = tiny_hf_config("llama", vocab_size=40, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=96, tie_word_embeddings=False)
    return config, init_tiny_model(config, seed=0)


def critic_weights(head_seed: int | None = 1) -> dict[str, torch.Tensor]:
    """The policy's trunk with a random head (None: the zero head of a fresh critic)."""
    config, weights = policy()
    state = init_critic_state(weights, config)
    if head_seed is not None:
        state[SCORE] = 0.1 * torch.randn(1, config["hidden_size"], generator=torch.Generator().manual_seed(head_seed))
    return state


def make_batch(seed: int = 0, n: int = 5) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        P, R = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
        ids = torch.randint(1, 40, (P + R,), generator=g).tolist()
        samples.append(Sample(prompt_ids=ids[:P], response_ids=ids[P:], rollout_logprobs=[0.0] * R))
    batch = algorithms.build_train_batch(samples, [0.0] * n, pad_id=0)
    batch.returns_BT = torch.randn(batch.input_ids_BT.shape, generator=g) * batch.response_mask_BT
    batch.loss_weights_BT = algorithms.token_loss_weights(batch.response_mask_BT, "token_mean")
    return batch


def mse_loss(values_BT: torch.Tensor, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Module level: Megatron ranks unpickle it by reference."""
    err_BT = (values_BT - batch.returns_BT) * batch.response_mask_BT
    return ((err_BT ** 2) * batch.loss_weights_BT).sum(), {"value_max": float(values_BT.detach().abs().max())}


def with_opt(**kw) -> OptimSettings:
    return OptimSettings(**{**OPT.__dict__, **kw})


# ---------------------------------------------------------------------------------------------- hf reference
def test_zero_head_gives_zero_values_and_critic_naming():
    config, weights = policy()
    critic = HFCritic(config, weights, OPT)
    assert isinstance(critic, CriticBackend)
    assert torch.equal(critic.values(make_batch()), torch.zeros_like(make_batch().returns_BT))
    state = critic.hf_state_dict()
    assert "lm_head.weight" not in state and torch.equal(state[SCORE], torch.zeros(1, 64))
    assert critic.hf_config["architectures"] == ["LlamaForTokenClassification"]
    assert critic_hf_config(critic.hf_config) == critic.hf_config


def test_values_ignore_padding_and_position_zero():
    config, _ = policy()
    critic = HFCritic(config, critic_weights(), OPT)
    batch = make_batch(n=6)
    values = critic.values(batch)
    lengths = batch.attention_mask_BT.sum(dim=1)
    assert torch.all(values[:, 0] == 0) and torch.all(values[batch.attention_mask_BT == 0] == 0)
    assert torch.all(values[:, 1:][batch.attention_mask_BT[:, 1:] == 1] != 0)
    for row in range(batch.num_sequences):
        alone = batch.select(slice(row, row + 1)).select((slice(None), slice(0, int(lengths[row]))))
        got = critic.values(alone)[0]
        assert torch.allclose(got, values[row, : got.shape[0]], atol=1e-6, rtol=0), row


def test_micro_batch_size_does_not_change_the_step():
    config, _ = policy()
    batch = make_batch(2, n=7)
    critics, stats = [], []
    for mbs in (1, 64):
        critic = HFCritic(config, critic_weights(), with_opt(micro_batch_size=mbs))
        stats.append(critic.train_step(batch, mse_loss))
        critics.append(critic)
    a, b = critics
    assert abs(stats[0]["loss"] - stats[1]["loss"]) < 1e-6 and abs(stats[0]["grad_norm"] - stats[1]["grad_norm"]) < 1e-5
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=0), name
    assert (a.values(batch) - b.values(batch)).abs().max().item() < 1e-6


def test_save_load_resumes_bit_exactly_and_exports_for_transformers(tmp_path):
    from transformers import AutoModelForTokenClassification

    config, weights = policy()
    opt = with_opt(lr=1e-3, schedule="cosine", total_steps=5, warmup_steps=1)
    a = HFCritic(config, critic_weights(), opt)
    for seed in (0, 1):
        a.train_step(make_batch(seed), mse_loss)
    a.save(str(tmp_path))
    saved = make_batch(3)
    saved_values = a.values(saved)
    want = a.train_step(make_batch(2), mse_loss)

    b = HFCritic(config, weights, opt)  # other weights (zero head), then load
    b.load(str(tmp_path))
    assert b.step == 2
    assert torch.equal(b.values(saved), saved_values)
    assert b.train_step(make_batch(2), mse_loss) == want
    assert torch.equal(b.values(saved), a.values(saved))

    hf = AutoModelForTokenClassification.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        logits_BT = hf(input_ids=saved.input_ids_BT, attention_mask=saved.attention_mask_BT).logits[..., 0]
    shifted_BT = torch.cat([torch.zeros_like(logits_BT[:, :1]), logits_BT[:, :-1]], dim=1) * saved.attention_mask_BT
    assert (shifted_BT - saved_values).abs().max().item() < 1e-6


def test_megatron_critic_refuses_torchrun(monkeypatch):
    from training.megatron import MegatronSettings
    from training.megatron.critic import MegatronCritic

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    config, weights = policy()
    with pytest.raises(NotImplementedError, match="torchrun"):
        MegatronCritic(config, weights, OPT, MegatronSettings())


# ---------------------------------------------------------------------------------------------- Megatron
LAYOUTS = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 2)}  # name: (tp, pp, dp)


@pytest.fixture(scope="module")
def reference():
    config, _ = policy()
    critic = HFCritic(config, critic_weights(), OPT)
    batch = make_batch(4, n=7)
    before = critic.values(batch)
    stats = critic.train_step(batch, mse_loss)
    return {"batch": batch, "before": before, "stats": stats, "after": critic.values(batch),
            "weights": critic.hf_state_dict()}


def megatron_critic(tp: int, pp: int, dp: int, state, opt: OptimSettings = OPT):
    from training.megatron import MegatronSettings, ModelSettings
    from training.megatron.critic import MegatronCritic

    config, _ = policy()
    settings = MegatronSettings(model=ModelSettings(tp=tp, pp=pp))
    return MegatronCritic(config, state, opt, settings, num_ranks=tp * pp * dp)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_megatron_matches_reference(reference, name):
    batch = reference["batch"]
    with megatron_critic(*LAYOUTS[name], critic_weights()) as critic:
        before = critic.values(batch)
        stats = critic.train_step(batch, mse_loss)
        after = critic.values(batch)
        weights = critic.hf_state_dict()
    assert torch.all(before[batch.attention_mask_BT == 0] == 0) and torch.all(before[:, 0] == 0)
    assert (before - reference["before"]).abs().max().item() < 1e-5
    assert (after - reference["after"]).abs().max().item() < 1e-5
    assert (after - before).abs().max().item() > 1e-4  # the step moved the values well past the tolerance
    want = reference["stats"]
    assert abs(stats["loss"] - want["loss"]) < 1e-6 * want["loss"]
    assert abs(stats["grad_norm"] - want["grad_norm"]) < 1e-4 * want["grad_norm"]
    assert stats["value_max"] == pytest.approx(want["value_max"], abs=1e-5) and stats["lr"] == want["lr"]
    assert set(weights) == set(reference["weights"])
    for k, v in reference["weights"].items():
        assert (weights[k] - v).abs().max().item() < 1e-5, k


@pytest.mark.slow
def test_megatron_resume_is_bit_exact_and_exports_for_transformers(tmp_path):
    from transformers import AutoModelForTokenClassification

    opt = with_opt(lr=1e-3, warmup_steps=3)  # step 2 has its own LR: the schedule must resume
    probe, b1, b2 = make_batch(5), make_batch(6), make_batch(7)
    config, weights = policy()
    with megatron_critic(2, 1, 1, weights, opt) as critic:  # a policy state dict: the head starts at zero
        assert isinstance(critic, CriticBackend)
        assert torch.equal(critic.values(probe), torch.zeros_like(probe.returns_BT))
        critic.train_step(b1, mse_loss)
        critic.save(str(tmp_path))
        saved_values = critic.values(probe)
        want = critic.train_step(b2, mse_loss)
        want_values, want_weights = critic.values(probe), critic.hf_state_dict()
    assert "lm_head.weight" not in want_weights and want_weights[SCORE].abs().max() > 0
    with megatron_critic(2, 1, 1, critic_weights(head_seed=9), opt) as critic:
        critic.load(str(tmp_path))
        assert critic.step == 1
        assert torch.equal(critic.values(probe), saved_values)
        got = critic.train_step(b2, mse_loss)
        got_values, got_weights = critic.values(probe), critic.hf_state_dict()
    assert got.pop("rank_s") > 0 and want.pop("rank_s") > 0  # the rank's own seconds: timing, not a result
    assert got == want and torch.equal(got_values, want_values)
    for k, v in want_weights.items():
        assert torch.equal(got_weights[k], v), k

    hf = AutoModelForTokenClassification.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        logits_BT = hf(input_ids=probe.input_ids_BT, attention_mask=probe.attention_mask_BT).logits[..., 0]
    shifted_BT = torch.cat([torch.zeros_like(logits_BT[:, :1]), logits_BT[:, :-1]], dim=1) * probe.attention_mask_BT
    assert (shifted_BT - saved_values).abs().max().item() < 1e-5
