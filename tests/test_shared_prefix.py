"""Shared-prompt forward of the reference trainer: the same logprobs, loss and gradient as the full rows."""

import math

import pytest
import torch

from slime_rl.algorithms import build_train_batch, make_policy_loss
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.types import Sample
from training.hf import HFTrainer, OptimSettings
from training.hf.shared_prefix import plan_shared_prefix


def tiny(arch="llama"):
    cfg = tiny_hf_config(arch, vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
    return cfg, init_tiny_model(cfg, seed=0)


def group_batch(seed=0, groups=3, n=4):
    """`groups` prompts of different lengths, n responses each of different lengths; one response has an
    observation in the middle (loss mask 0, as a tool result) and one has no loss at all (truncated)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(groups):
        prompt = torch.randint(3, 40, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n):
            R = int(torch.randint(1, 9, (1,), generator=g))
            samples.append(Sample(prompt_ids=prompt, response_ids=torch.randint(3, 40, (R,), generator=g).tolist(),
                                  rollout_logprobs=[0.0] * R, loss_mask=[1] * R))
    long = max(samples, key=lambda s: len(s.response_ids))
    long.loss_mask[1:3] = [0, 0]
    samples[1].loss_mask = [0] * len(samples[1].response_ids)
    adv = torch.randn(len(samples), generator=g).tolist()
    return build_train_batch(samples, adv, pad_id=0, loss_agg="token")


def run(shared, arch, max_tokens, attn="sdpa"):
    cfg, sd = tiny(arch)
    trainer = HFTrainer(cfg, sd, OptimSettings(lr=1e-2, max_tokens_per_micro_batch=max_tokens))
    trainer.model.config._attn_implementation = attn
    trainer.shared_prefix = shared
    plans = []
    plan_of = trainer._shared_prefix_plan
    trainer._shared_prefix_plan = lambda model, mb: plans.append(plan_of(model, mb)) or plans[-1]
    batch = group_batch()
    old_BT = trainer.logprobs(batch)
    batch.old_logprobs_BT = old_BT
    stats = trainer.train_step(batch, make_policy_loss(0.2, 0.2))
    assert any(p is not None for p in plans) == shared  # the shared forward ran (in some micro-batch)
    return old_BT, stats, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("arch,max_tokens,attn", [("llama", 4096, "sdpa"), ("qwen2", 4096, "sdpa"),
                                                  ("llama", 40, "sdpa"), ("llama", 4096, "eager")])
def test_shared_prompts_give_the_same_logprobs_loss_and_gradient(arch, max_tokens, attn):
    plain_lp, plain, plain_grads = run(False, arch, max_tokens, attn)
    shared_lp, shared, shared_grads = run(True, arch, max_tokens, attn)
    assert (plain_lp - shared_lp).abs().max() < 1e-5
    assert plain.keys() == shared.keys()
    for key in plain:
        assert math.isclose(plain[key], shared[key], rel_tol=1e-5, abs_tol=1e-6), key
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, shared_grads[name], atol=1e-5 * float(grad.abs().max()), rtol=0), name


def test_the_plan_dedupes_prompts_and_declines_when_little_is_saved():
    batch = group_batch(groups=2, n=3)
    plan = plan_shared_prefix(batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT, 0.0)
    assert plan is not None and len(plan.prefixes) == 2
    assert plan.rows.tolist() == [0, 2, 3, 4, 5]  # row 1 has no loss token: nothing of it is computed
    assert plan.prefix_of_R.tolist() == [0, 0, 1, 1, 1]
    real = int(batch.attention_mask_BT.sum())
    computed = sum(map(len, plan.prefixes)) + int((plan.length_R - plan.prefix_len_R).sum())
    assert plan.saved_tokens == real - computed > 0
    assert plan_shared_prefix(batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT, 0.99) is None
    distinct = group_batch(groups=4, n=1)
    distinct.response_mask_BT[1] = 1  # every token after the first is a response token: nothing to share
    assert plan_shared_prefix(distinct.input_ids_BT[1:2], distinct.attention_mask_BT[1:2],
                              distinct.response_mask_BT[1:2], 0.0) is None
