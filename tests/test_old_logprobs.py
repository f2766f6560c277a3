"""The old logprobs' forward is skipped when a batch gets exactly one update and nothing needs them before it.

With one update per batch the proximal policy is the trainer as it is, so the update's own forward (detached)
serves as the ratio's reference: ratio exactly 1, the same loss and gradient as with a separate no-grad forward,
one forward fewer per step (TRL skips it the same way). The separate forward stays where something reads the
old logprobs before the update: several updates (ppo_epochs, mini_batches), importance weights (tis,
decoupled), a KL penalty in the reward."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from slime_rl import algorithms
from slime_rl.config import build_config
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.loop import score_batch
from slime_rl.timing import PhaseTimer
from slime_rl.types import Sample, SampleStatus
from training.hf import HFTrainer, OptimSettings

VOCAB = 40
HF_CONFIG = tiny_hf_config("qwen2", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=64)
OPT = OptimSettings(lr=1e-2, micro_batch_size=3, grad_clip=1.0, warmup_steps=0)  # 2 micro-batches


def batch_of(cfg):
    """Two groups of three ragged samples whose rollout logprobs are off the trainer's (a stale engine)."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(6):
        n = 2 + i % 3
        samples.append(Sample(prompt_ids=torch.randint(1, VOCAB, (3 + i % 2,), generator=g).tolist(),
                              response_ids=torch.randint(1, VOCAB, (n,), generator=g).tolist(),
                              rollout_logprobs=(-0.5 - 3 * torch.rand(n, generator=g)).tolist(), loss_mask=[1] * n,
                              reward=float(i % 3 == 0), status=SampleStatus.COMPLETED, group_id=i // 3, index=i % 3))
    return algorithms.build_train_batch(samples, None, 0, loss_agg=cfg.algorithm.loss_agg,
                                        group_index=[0] * 3 + [1] * 3, rewards=[s.scalar_reward for s in samples])


@pytest.mark.parametrize("name,mode", [("GRPO", "sync"), ("CISPO", "sync"), ("GSPO", "sync"),
                                       ("GRPO", "fully_async")])  # fully_async: the "coupled" correction
def test_one_update_without_the_old_forward_has_the_same_loss_and_gradient(name, mode):
    cfg = build_config(overrides=[("algorithm.name", name), ("async_rl.mode", mode)])
    weights = init_tiny_model(HF_CONFIG, seed=1)
    trainer_a, trainer_b = HFTrainer(HF_CONFIG, weights, OPT), HFTrainer(HF_CONFIG, weights, OPT)
    calls = []
    trainer_a.logprobs = lambda batch: calls.append(batch)  # must not be called
    batch_a = batch_of(cfg)
    stats_a = score_batch(SimpleNamespace(cfg=cfg, trainer=trainer_a, critic=None, timer=PhaseTimer()), batch_a)
    assert not calls and batch_a.proximal_is_update and batch_a.is_weights_BT is None
    coupled = mode != "sync"
    assert (batch_a.old_logprobs_BT is None) != coupled
    # today's path: a separate no-grad forward for the old logprobs
    old_BT = trainer_b.logprobs(batch_of(cfg))
    ref_BT = batch_a.rollout_logprobs_BT.float() if coupled else old_BT
    batch_b = dataclasses.replace(batch_a, old_logprobs_BT=ref_BT, proximal_is_update=False)
    loss_fn = algorithms.get(name).loss(cfg.algorithm)
    for batch in (batch_a, batch_b):
        batch.loss_weights_BT = algorithms.token_loss_weights(batch.response_mask_BT, cfg.algorithm.loss_agg, 16)
    step_a, step_b = trainer_a.train_step(batch_a, loss_fn), trainer_b.train_step(batch_b, loss_fn)
    for key in ("loss", "pg_loss", "clip_frac", "entropy"):
        assert step_a[key] == pytest.approx(step_b[key], rel=1e-5, abs=1e-7), key
    for (n, p_a), p_b in zip(trainer_a.model.named_parameters(), trainer_b.model.parameters()):
        torch.testing.assert_close(p_a, p_b, rtol=1e-5, atol=1e-6, msg=n)
    assert any(not torch.equal(p, weights[n]) for n, p in trainer_a.model.state_dict().items() if n in weights)
    # the trainer-rollout gap, measured on the update's forward and weighted like the loss (the mean over the
    # loss tokens under the default token-mean aggregation; GSPO's sequence mean weighs each row alike)
    gap = float(((old_BT - batch_a.rollout_logprobs_BT).abs() * batch_a.loss_weights_BT).sum())
    assert gap > 0.5 and step_a["train_rollout_logprob_abs_diff"] == pytest.approx(gap, rel=1e-5)
    assert "train_rollout_logprob_abs_diff" not in stats_a


class _Recorder:
    def __init__(self):
        self.forwards = 0

    def logprobs(self, batch):
        self.forwards += 1
        return batch.rollout_logprobs_BT - 0.1

    ref_logprobs = logprobs


@pytest.mark.parametrize("overrides", [
    [("algorithm.ppo_epochs", 2)], [("algorithm.mini_batches", 2)], [("algorithm.off_policy", "tis")],
    [("async_rl.mode", "fully_async"), ("algorithm.off_policy", "decoupled")],
    [("algorithm.name", "REINFORCE_PP")],  # its preset puts a KL penalty in the reward
], ids=["ppo_epochs", "mini_batches", "tis", "decoupled", "kl_in_reward"])
def test_the_old_forward_stays_where_something_reads_it_before_the_update(overrides):
    cfg = build_config(overrides=overrides)
    recorder = _Recorder()
    batch = batch_of(cfg)
    stats = score_batch(SimpleNamespace(cfg=cfg, trainer=recorder, critic=None, timer=PhaseTimer()), batch)
    assert recorder.forwards == 1 + algorithms.needs(cfg.algorithm).reference
    assert not batch.proximal_is_update and batch.old_logprobs_BT is not None
    assert stats["train_rollout_logprob_abs_diff"] == pytest.approx(0.1, rel=1e-5)


def test_a_batch_without_old_logprobs_must_be_marked():
    cfg = build_config()
    batch = batch_of(cfg)
    batch.advantages_BT = torch.zeros_like(batch.rollout_logprobs_BT)
    batch.loss_weights_BT = batch.response_mask_BT
    with pytest.raises(ValueError, match="no old logprobs"):
        algorithms.get("GRPO").loss(cfg.algorithm)(batch.rollout_logprobs_BT, batch.rollout_logprobs_BT, batch)
