"""The visible RL loop: collect -> score -> advantages -> train -> push weights -> evaluate/log.

Synchronous for now: each step generates with the weights of the previous
step (staleness 0). Everything the loop touches is built in `slime_rl.job`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout.groups import generate_groups
from slime_rl import algorithms
from slime_rl.config import JobConfig
from slime_rl.evaluate import evaluate, reward_metrics
from slime_rl.metrics import MetricsLogger, format_line
from slime_rl.rewards.runner import score_samples
from slime_rl.types import Sample, SamplingParams, TrainBatch

PRINT_KEYS = ["rollout/reward_mean", "rollout/answer_accuracy", "rollout/response_length",
              "train/clip_frac", "train/entropy", "train/train_rollout_logprob_abs_diff", "val/accuracy"]


@dataclass
class Run:
    """Everything one job holds: built by slime_rl.job, driven by the loops."""

    cfg: JobConfig
    tokenizer: Any
    trainer: Any  # TrainerBackend
    engine: Any  # RolloutEngine
    sync: Any  # weight_sync.WeightSync: trainer -> engine(s)
    reward_fn: Any
    train_records: list
    val_records: list
    sft_records: list
    logger: MetricsLogger
    out_dir: Path
    weight_version: int = 0
    extra: dict = field(default_factory=dict)


class PromptSampler:
    """Epoch-shuffled prompts, deterministic from the seed."""

    def __init__(self, records: list, seed: int):
        self.records, self.rng, self.order = records, random.Random(seed), []

    def next(self, k: int) -> list:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(len(self.records)))
                self.rng.shuffle(self.order)
            out.append(self.records[self.order.pop()])
        return out


def sync_weights(run: Run) -> dict[str, float]:
    """version += 1 and push the trainer's weights to the engine(s) (bucketed; staged, then committed)."""
    run.weight_version += 1
    return run.sync.push(run.weight_version)


def collect(run: Run, prompts: list, step: int) -> list[list[Sample]]:
    """Engines produce n samples per prompt; rewards score them in place."""
    r = run.cfg.rollout
    sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens, stop_token_ids=[run.tokenizer.eos_token_id])
    groups = generate_groups(run.engine, prompts, r.n_samples_per_prompt, sampling, base_seed=r.seed, step=step,
                             decode=run.tokenizer.decode)
    stats = score_samples([s for g in groups for s in g], run.reward_fn, timeout_s=run.cfg.reward.timeout_s,
                          failure_reward=run.cfg.reward.failure_reward, max_workers=run.cfg.reward.max_workers)
    run.extra["reward_errors"] = stats.errors + stats.timeouts
    return groups


def prepare(run: Run, groups: list[list[Sample]]) -> TrainBatch:
    """Group-normalized advantages, packed into a padded batch."""
    a = run.cfg.algorithm
    advantages = algorithms.grpo_advantages(groups, scale_by_std=a.scale_adv_by_std, eps=a.adv_eps)
    samples = [s for g in groups for s in g]
    flat_adv = [adv for g in advantages for adv in g]
    return algorithms.build_train_batch(samples, flat_adv, run.tokenizer.pad_token_id, loss_agg=a.loss_agg,
                                        temperature=run.cfg.rollout.temperature or 1.0)


def train(run: Run, batch: TrainBatch, loss_fn) -> dict[str, float]:
    """Old (and reference) logprobs, then one optimizer step per mini-batch."""
    batch.old_logprobs_BT = run.trainer.logprobs(batch)
    if run.cfg.algorithm.kl_coef > 0:
        batch.ref_logprobs_BT = run.trainer.ref_logprobs(batch)
    mask = batch.response_mask_BT
    diff = ((batch.old_logprobs_BT - batch.rollout_logprobs_BT).abs() * mask).sum() / mask.sum().clamp(min=1)
    stats: dict[str, float] = {"train_rollout_logprob_abs_diff": float(diff)}
    n = run.cfg.train.updates_per_step
    size = -(-batch.num_sequences // n)
    for k in range(n):  # mini-batches: weights renormalized per mini-batch
        mini = batch.select(slice(k * size, (k + 1) * size))
        mini.loss_weights_BT = algorithms.token_loss_weights(mini.response_mask_BT, run.cfg.algorithm.loss_agg)
        for key, v in run.trainer.train_step(mini, loss_fn).items():
            stats[key] = stats.get(key, 0.0) + v / n
    return stats


def evaluate_run(run: Run, greedy: bool, n_samples: int = 1, temperature: float = 1.0) -> dict[str, float]:
    """Validation metrics of the engine's current weights."""
    return evaluate(run.engine, run.val_records, run.reward_fn, greedy=greedy, n_samples=n_samples,
                    temperature=temperature, max_new_tokens=run.cfg.rollout.max_new_tokens,
                    stop_token_ids=[run.tokenizer.eos_token_id], decode=run.tokenizer.decode,
                    reward_timeout_s=run.cfg.reward.timeout_s, failure_reward=run.cfg.reward.failure_reward,
                    max_examples=run.cfg.eval.max_examples, seed=run.cfg.rollout.seed)


def maybe_evaluate(run: Run, step: int, force: bool = False) -> dict[str, float]:
    every = run.cfg.eval.every_n_steps
    if not force and (every == 0 or step % every):
        return {}
    e = run.cfg.eval
    return evaluate_run(run, e.greedy, e.n_samples, e.temperature)


def rl_loop(run: Run, progress=None) -> dict[str, float]:
    """GRPO for cfg.train.num_steps steps; returns the final validation metrics."""
    cfg = run.cfg
    a = cfg.algorithm
    loss_fn = algorithms.make_policy_loss(a.eps_clip_low, a.eps_clip_high, a.kl_coef, a.kl_type, a.entropy_coef)
    sampler = PromptSampler(run.train_records, cfg.train.seed)
    sync_weights(run)  # the trainer is the source of truth
    last_eval: dict[str, float] = {}
    for step in range(cfg.train.num_steps):
        t0 = time.perf_counter()
        groups = collect(run, sampler.next(cfg.rollout.prompts_per_step), step)
        t_rollout = time.perf_counter() - t0
        batch = prepare(run, groups)
        stats = train(run, batch, loss_fn)
        sync_stats = sync_weights(run)
        record = {"step": step + 1, "weight_version": run.weight_version,
                  **reward_metrics([s for g in groups for s in g], "rollout"),
                  **{f"train/{k}": v for k, v in stats.items()}, **sync_stats,
                  "reward/errors": run.extra.get("reward_errors", 0),
                  "time/rollout_s": t_rollout, "time/step_s": time.perf_counter() - t0}
        evals = maybe_evaluate(run, step + 1, force=step + 1 == cfg.train.num_steps)
        record.update(evals)
        last_eval = evals or last_eval
        run.logger.log(record)
        if progress is not None:
            progress(step + 1, record)
        else:
            print(format_line(step + 1, record, PRINT_KEYS), flush=True)
    return last_eval

