"""Engine vs trainer: same weights -> same logprobs; step-0 ratio exactly 1; the loop's train()."""

import pytest
import torch

from rollout import EmbeddedEngine
from rollout.groups import generate_groups
from slime_rl import algorithms
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.types import SamplingParams
from training.hf import HFTrainer, OptimSettings
from weight_sync import WeightSync


class P:
    def __init__(self, ids):
        self.prompt_ids, self.prompt_text, self.label, self.metadata = ids, "", None, {}


def setup(arch, temperature=1.0):
    cfg = tiny_hf_config(arch, vocab_size=50, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=arch == "llama")
    sd = init_tiny_model(cfg, seed=3)
    trainer = HFTrainer(cfg, sd, OptimSettings(lr=1e-3, micro_batch_size=5))
    engine = EmbeddedEngine(cfg, sd, max_batch_size=7)
    prompts = [P(list(range(3, 3 + k))) for k in (2, 5, 9, 4)]
    sampling = SamplingParams(temperature=temperature, max_new_tokens=12, stop_token_ids=[2])
    groups = generate_groups(engine, prompts, 4, sampling, base_seed=11)
    for g in groups:
        for i, s in enumerate(g):
            s.reward = float(i % 2)
    return trainer, engine, groups


@pytest.mark.parametrize("arch,temperature", [("llama", 1.0), ("qwen2", 1.0), ("qwen2", 0.7)])
def test_engine_logprobs_equal_trainer_logprobs(arch, temperature):
    trainer, _, groups = setup(arch, temperature)
    samples = [s for g in groups for s in g]
    adv = [a for g in algorithms.grpo_advantages(groups) for a in g]
    batch = algorithms.build_train_batch(samples, adv, pad_id=0, temperature=temperature)
    lp = trainer.logprobs(batch)
    mask = batch.response_mask_BT
    diff = ((lp - batch.rollout_logprobs_BT).abs() * mask).sum() / mask.sum()
    assert mask.sum() > 20
    assert float(diff) < 1e-5, float(diff)
    assert float(((lp - batch.rollout_logprobs_BT).abs() * mask).max()) < 1e-4
    # step 0: the policy ratio is exactly 1 and the sampled-token KL is 0
    batch.old_logprobs_BT = lp
    stats = trainer.train_step(batch, algorithms.make_policy_loss(0.2, 0.2))
    assert stats["ratio_max"] == 1.0 and stats["ratio_min"] == 1.0 and stats["approx_kl"] == 0.0


def test_weight_push_makes_engine_follow_trainer():
    trainer, engine, groups = setup("qwen2")
    samples = [s for g in groups for s in g]
    adv = [a for g in algorithms.grpo_advantages(groups) for a in g]
    batch = algorithms.build_train_batch(samples, adv, pad_id=0)
    batch.old_logprobs_BT = trainer.logprobs(batch)
    trainer.train_step(batch, algorithms.make_policy_loss(0.2, 0.2))
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    starts = [len(s.prompt_ids) for s in samples]
    before = engine.compute_logprobs(seqs, start_positions=starts)
    sync = WeightSync(trainer, [engine])
    stats = sync.push(1)
    sync.close()
    assert engine.get_weight_version() == 1 and stats["sync/bytes"] > 0
    after = engine.compute_logprobs(seqs, start_positions=starts)
    new_lp = trainer.logprobs(batch)
    for b, (s, a, old) in enumerate(zip(samples, after, before)):
        P_, R = len(s.prompt_ids), len(s.response_ids)
        assert torch.allclose(a, new_lp[b, P_:P_ + R], atol=1e-5)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(after, before))
