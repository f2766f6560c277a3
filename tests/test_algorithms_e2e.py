"""The algorithm suite end to end on tiny jobs (the reference backend), and every policy loss x aggregation on
Megatron TP2 / PP2 / DP2 against the reference backend."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from slime_rl import algorithms
from slime_rl.cli import main
from slime_rl.hf_io import init_tiny_model, load_hf_checkpoint, tiny_hf_config
from slime_rl.types import Sample
from training.hf import HFTrainer, OptimSettings

TINY = ["--model.hidden_size", "64", "--model.intermediate_size", "128", "--data.task_max_operand", "29",
        "--data.num_train", "300", "--data.num_val", "16", "--data.num_sft", "64", "--rollout.max_new_tokens", "8",
        "--rollout.prompts_per_step", "6", "--rollout.n_samples_per_prompt", "4", "--log.progress", "false",
        "--backend", "hf", "--sft.epochs", "3", "--eval.every_n_steps", "0", "--log.plot", "false",
        "--reward.name", "test_e2e:sevens"]  # a dense reward: groups whose rewards differ from the first step


def records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", algorithms.implemented())
def test_every_algorithm_runs_a_job_with_its_metrics(tmp_path, algo):
    out = tmp_path / algo
    assert main(["train", *TINY, "--algo", algo.lower(), "--train.num_steps", "2", "--log.output_dir", str(out),
                 "--algorithm.ppo_epochs", "2", "--algorithm.mini_batches", "2"]) == 0
    steps = [r for r in records(out) if "rollout/reward_mean" in r]
    assert len(steps) == 2
    for key in ("rollout/reward_mean", "rollout/response_length", "rollout/answer_accuracy", "train/adv_mean",
                "train/adv_std", "train/clip_frac_low", "train/clip_frac_high", "train/dual_clip_frac",
                "train/approx_kl", "train/entropy"):
        assert all(key in r and not math.isinf(r[key]) for r in steps), key
    if algo == "PPO":
        assert all("train/critic_value_loss" in r and "train/explained_variance" in r for r in steps)
        assert (out / "critic" / "config.json").exists()
    if algo == "DAPO":
        assert all("rollout/filtered_groups_frac" in r for r in steps)
    if algo == "REINFORCE_PP":  # the KL is against the policy RL started from, written for resumes
        assert (out / "reference" / "config.json").exists()


def test_ppo_resumes_bit_exactly_critic_and_its_optimizer_included(tmp_path):
    flags = [*TINY, "--algo", "PPO", "--train.num_steps", "4", "--ckpt.save_every", "2", "--ckpt.keep", "2",
             "--algorithm.ppo_epochs", "2", "--critic.lr", "1e-3"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(["train", *flags, "--log.output_dir", str(full)]) == 0
    shutil.copytree(full, resumed)
    for name in ("checkpoints/step_000004", "checkpoint", "critic"):
        shutil.rmtree(resumed / name)
    assert main(["train", *flags, "--log.output_dir", str(resumed), "--resume", "auto"]) == 0
    for sub in ("checkpoint", "critic"):
        want, got = load_hf_checkpoint(full / sub)[1], load_hf_checkpoint(resumed / sub)[1]
        assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want), sub
    last = [r for r in records(full) if r.get("step") == 4 and "train/critic_value_loss" in r]
    again = [r for r in records(resumed) if r.get("step") == 4 and "train/critic_value_loss" in r]
    assert last[-1]["train/critic_value_loss"] > 0 and last[-1]["train/adv_std"] > 0  # a step that moves things
    step2 = load_hf_checkpoint(full / "checkpoints" / "step_000002" / "critic")[1]
    assert any(not torch.equal(step2[k], v) for k, v in load_hf_checkpoint(full / "critic")[1].items())
    drop = ("time/", "sync/")
    assert {k: v for k, v in last[-1].items() if not k.startswith(drop)} == \
        {k: v for k, v in again[-1].items() if not k.startswith(drop)}


def test_a_critic_path_that_does_not_fit_is_a_config_error(tmp_path, capsys):
    from slime_rl.hf_io import save_hf_checkpoint

    other = tiny_hf_config("llama", vocab_size=500, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                           intermediate_size=64)
    save_hf_checkpoint(tmp_path / "critic", other, init_tiny_model(other, seed=0))
    rc = main(["train", *TINY, "--algo", "PPO", "--critic.path", str(tmp_path / "critic"),
               "--log.output_dir", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "critic.path" in err and "vocab_size 500" in err


# ---------------------------------------------------------------------------- Megatron layouts vs the reference
HF_CONFIG = tiny_hf_config("qwen2", vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=64, tie_word_embeddings=False)
OPT = OptimSettings(lr=1e-4, micro_batch_size=2, grad_clip=1.0, warmup_steps=0)  # Adam: |step| ~ lr
CASES = [(kind, agg) for kind in algorithms.losses.POLICY_LOSSES
         for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant")]


def mixed_batch():
    """Ragged rows, environment tokens (loss_mask 0) inside responses, and a row without any loss token."""
    g = torch.Generator().manual_seed(5)
    samples = []
    for i in range(7):
        p = torch.randint(1, 61, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        n = int(torch.randint(3, 11, (1,), generator=g))
        mask = [0 if i == 6 or (i % 3 == 0 and 1 <= t <= 2) else 1 for t in range(n)]
        samples.append(Sample(prompt_ids=p, response_ids=torch.randint(1, 61, (n,), generator=g).tolist(),
                              loss_mask=mask, reward=float(i % 2), group_id=i // 3))
    return algorithms.build_train_batch(samples, [1.0, -0.5, 0.8, 0.3, -0.2, 1.2, 0.6], 0, temperature=0.9)


def for_case(batch, old_BT, agg):
    b = batch.select(slice(None))
    b.old_logprobs_BT = old_BT - 0.03 * torch.arange(b.input_ids_BT.shape[1]) % 0.2 * b.response_mask_BT
    b.ref_logprobs_BT = old_BT + 0.02 * b.response_mask_BT
    b.loss_weights_BT = algorithms.token_loss_weights(b.response_mask_BT, agg, constant_len=12)
    return b


def loss_for(kind):
    return algorithms.make_policy_loss(0.2, 0.28, kl_coef=0.05, dual_clip_c=3.0 if kind != "cispo" else None,
                                       kind=kind)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["tp2", "pp2", "dp2"])
def test_every_policy_loss_and_aggregation_matches_the_reference_on_megatron(layout, tmp_path):
    from slime_rl.hf_io import save_hf_checkpoint
    from training.megatron import MegatronBackend, MegatronSettings, ModelSettings

    weights = init_tiny_model(HF_CONFIG, seed=4)
    save_hf_checkpoint(tmp_path / "w", HF_CONFIG, weights)
    batch = mixed_batch()
    old = HFTrainer(HF_CONFIG, weights, OPT).logprobs(batch)
    want = {}
    for kind, agg in CASES:
        ref = HFTrainer(HF_CONFIG, weights, OPT)
        stats = ref.train_step(for_case(batch, old, agg), loss_for(kind))
        want[kind, agg] = (stats, ref.hf_state_dict())
    tp, pp, dp = layout
    settings = MegatronSettings(model=ModelSettings(tp=tp, pp=pp))
    with MegatronBackend(HF_CONFIG, weights, OPT, settings, num_ranks=tp * pp * dp) as b:
        for kind, agg in CASES:
            b.load(str(tmp_path / "w"))  # the same starting weights and a fresh optimizer for every case
            b.reset_optimizer(OPT)
            got = b.train_step(for_case(batch, old, agg), loss_for(kind))
            stats, after = want[kind, agg]
            assert abs(got["loss"] - stats["loss"]) <= 1e-6 * abs(stats["loss"]), (kind, agg)  # measured <= 7e-8
            assert abs(got["grad_norm"] - stats["grad_norm"]) <= 1e-6 * stats["grad_norm"], (kind, agg)  # <= 1.3e-7
            new = b.hf_state_dict()
            # Adam's first step is lr * g / (|g| + 1e-8): elements whose gradient is near 1e-8 (GSPO's clipped
            # sequences leave many) turn float32 noise into a visible share of a step; the loss and the grad norm
            # above carry the precision check, this one says every element moved the same way
            assert max((new[k] - v).abs().max().item() for k, v in after.items()) < 0.5 * OPT.lr, (kind, agg)


def test_ppo_first_update_has_ratio_one_and_later_updates_do_not(tmp_path):
    """loop.train with PPO, 2 epochs x 2 mini-batches: old logprobs are taken once, so the first policy update
    sees ratio exactly 1 (clip fraction 0) and the later ones a moved policy."""
    from slime_rl import loop
    from slime_rl.config import build_config
    from slime_rl.metrics import MetricsLogger
    from training.hf import HFCritic

    cfg = build_config(overrides=[("algorithm.name", "PPO"), ("algorithm.ppo_epochs", 2),
                                  ("algorithm.mini_batches", 2), ("rollout.max_new_tokens", 12)])
    weights = init_tiny_model(HF_CONFIG, seed=4)
    trainer = HFTrainer(HF_CONFIG, weights, OptimSettings(lr=1e-2, micro_batch_size=4))
    critic = HFCritic(HF_CONFIG, weights, OptimSettings(lr=1e-2, micro_batch_size=4))
    seen = []
    step = trainer.train_step
    trainer.train_step = lambda batch, fn: seen.append(step(batch, fn)) or seen[-1]

    class Tok:
        pad_token_id = 0

    from slime_rl.tasks import get_task

    run = loop.Run(cfg=cfg, tokenizer=Tok(), trainer=trainer, critic=critic, engine=None, sync=None, reward_fn=None,
                   task=get_task("arithmetic"),
                   train_records=[], val_records=[], sft_records=[], logger=MetricsLogger(tmp_path / "m.jsonl"),
                   out_dir=tmp_path)
    batch = mixed_batch()
    batch.rollout_logprobs_BT = trainer.logprobs(batch)
    stats = loop.train(run, batch, algorithms.get("PPO").loss(cfg.algorithm))
    assert len(seen) == 4
    assert seen[0]["ratio_max"] == 1.0 and seen[0]["ratio_min"] == 1.0 and seen[0]["clip_frac"] == 0.0
    assert max(abs(s["ratio_max"] - 1) + abs(s["ratio_min"] - 1) for s in seen[1:]) > 1e-3
    assert stats["ratio_max"] == max(s["ratio_max"] for s in seen)  # a max over the step, not a mean
    assert stats["critic_value_loss"] > 0 and "explained_variance" in stats
