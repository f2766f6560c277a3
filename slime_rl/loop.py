"""The visible RL loop: collect -> score -> advantages -> train -> push weights -> evaluate/log/checkpoint.

Asynchronous RL changes when `rollout.get` returns, not the shape of the loop
(slime_rl/producer.py): in sync mode step s generates its groups with the
weights of step s; one-step-off and fully-async modes take them from a buffer
a producer fills ahead of the trainer, at most `max_staleness` versions old,
and the loss corrects for the older tokens (algorithms/off_policy.py).
Everything the loop touches is built in `slime_rl.job`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slime_rl import algorithms, checkpoint
from slime_rl.algorithms import off_policy
from slime_rl.config import ConfigError, JobConfig
from slime_rl.gate import Gate
from slime_rl.evaluate import evaluate
from slime_rl.metrics import MetricsLogger, format_line
from slime_rl.protocols import CriticBackend, RewardFn, RolloutEngine, TrainerBackend
from rollout.episodes import Episode, SingleTurn
from slime_rl.tasks import Task
from slime_rl.producer import (AsyncRollout, DynamicSampling, PromptStream, ReplayRollout, RolloutWorker,
                               SyncRollout, group_uid, save_groups, staleness_of)
from slime_rl.rewards.runner import score_samples
from slime_rl.timing import PhaseTimer, TimeTable, step_times
from slime_rl.types import Sample, SamplingParams, TrainBatch
from training.hf.backend import merge_step_stats

PRINT_KEYS = ["rollout/reward_mean", "rollout/answer_accuracy", "rollout/response_length",
              "train/clip_frac", "train/entropy", "train/train_rollout_logprob_abs_diff", "val/accuracy"]
TRAINED_GROUPS = "trained_groups.jsonl"  # per step: each trained group's uid, size, versions, lengths


class TrainerFailed(RuntimeError):
    """The trainer raised or a trainer rank died; the run stops (its last checkpoint can resume it)."""


@dataclass
class Run:
    """Everything one job holds: built by slime_rl.job, driven by the loops."""

    cfg: JobConfig
    tokenizer: Any  # slime_rl.tokenizer: encode / decode / eos, pad ids / save
    trainer: TrainerBackend | None  # None in rollout-only mode
    critic: CriticBackend | None  # when the algorithm needs one (PPO)
    engine: RolloutEngine | None  # None when replaying saved rollouts
    sync: Any  # weight_sync.WeightSync or an EngineSupervisor over one: trainer -> engine(s); None without engines
    reward_fn: RewardFn
    task: Task  # its prompts, reward and metrics (slime_rl.tasks)
    train_records: list
    val_records: list
    sft_records: list
    logger: MetricsLogger
    out_dir: Path
    weight_version: int = 0
    launch: Any = None  # launch.ray_launch.RayLaunch: colocated engines release memory around training
    router: Any = None  # the router this job started over engine servers (stopped with the job)
    ledger: MetricsLogger | None = None  # trained_groups.jsonl
    reward_errors: int = 0  # reward functions that raised or timed out, over the run
    episode: Episode = field(default_factory=SingleTurn)  # how the task plays a sample (rollout.episodes)
    gate: Gate | None = None  # the deploy gate (gate.metric): the run stops once validation passes it
    start_metrics: dict = field(default_factory=dict)  # validation before RL (after the SFT warm-up)
    timer: PhaseTimer = field(default_factory=PhaseTimer)  # where the time goes (slime_rl.timing); new per rl_loop


def sync_weights(run: Run) -> dict[str, float]:
    """version += 1 and push the trainer's weights to the engine(s) (bucketed; staged, then committed)."""
    if run.sync is None or run.trainer is None:  # replay (no engines) or rollout-only (no trainer)
        return {}
    run.weight_version += 1
    with run.timer.phase("sync"):
        return run.sync.push(run.weight_version)


def sampling_params(run: Run) -> SamplingParams:
    r = run.cfg.rollout
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                          stop_token_ids=[run.tokenizer.eos_token_id])


def make_rollout(run: Run, start_step: int):
    """Where each step's groups come from: saved rollouts, the engines now (sync), or a producer ahead (async);
    filtered by dynamic sampling when the algorithm asks for it."""
    rollout = _source(run, start_step)
    a = run.cfg.algorithm
    if algorithms.needs(a).dynamic_sampling:
        rollout = DynamicSampling(rollout, run.cfg.rollout.prompts_per_step, a.dynamic_sampling_rounds)
    return rollout


def _source(run: Run, start_step: int):
    cfg = run.cfg
    if cfg.debug.load_rollouts:
        return ReplayRollout(cfg.debug.load_rollouts)
    r, mode = cfg.rollout, cfg.async_rl.mode

    def score(group: list[Sample]) -> None:
        stats = score_samples(group, run.reward_fn, timeout_s=cfg.reward.timeout_s,
                              failure_reward=cfg.reward.failure_reward, max_workers=cfg.reward.max_workers)
        run.reward_errors += stats.errors + stats.timeouts

    in_flight = max(r.prompts_per_step, cfg.async_rl.max_inflight_groups or 0)  # groups scored at once, at most
    worker = RolloutWorker(run.engine, sampling_params(run), r.seed, run.tokenizer.decode, score, episode=run.episode,
                           score_threads=in_flight, timer=run.timer)
    prompts = PromptStream(run.train_records, cfg.train.seed, r.prompts_per_step, r.n_samples_per_prompt)
    if mode == "sync":
        return SyncRollout(worker, prompts)
    worker.partial = cfg.async_rl.partial_rollout
    return AsyncRollout(worker, prompts, cfg.async_rl.staleness, interruptible=mode == "fully_async",
                        capacity=cfg.async_rl.buffer_groups, start_step=start_step,
                        max_inflight=cfg.async_rl.max_inflight_groups)


def prepare(run: Run, groups: list[list[Sample]]) -> TrainBatch:
    """The scored groups packed into a padded batch: shaped rewards, group of each row, loss mask."""
    a = run.cfg.algorithm
    samples = [s for g in groups for s in g]
    rewards = [s.scalar_reward + algorithms.overlong_penalty(*run.episode.length(s, run.cfg), a.overlong_buffer_len,
                                                             a.overlong_penalty) for s in samples]
    return algorithms.build_train_batch(samples, None, run.tokenizer.pad_token_id, loss_agg=a.loss_agg,
                                        temperature=run.cfg.rollout.temperature or 1.0,
                                        constant_len=loss_agg_len(run),
                                        group_index=[i for i, g in enumerate(groups) for _ in g], rewards=rewards,
                                        mask_truncated=a.mask_truncated)


def loss_agg_len(run: Run) -> int:
    """The constant of `loss_agg: constant` (Dr. GRPO): the configured length, else the generation budget."""
    return run.cfg.algorithm.loss_agg_len or run.cfg.rollout.max_new_tokens


def score_batch(run: Run, batch: TrainBatch) -> dict[str, float]:
    """Old (and reference) logprobs, the critic's values, the algorithm's advantages, off-policy weights.

    The old logprobs take a forward of their own only where something needs them before the update: several
    updates per batch (ppo_epochs or mini_batches > 1), an importance weight (tis, decoupled), or the
    algorithm's advantages (a KL penalty in the reward). Otherwise the one update's own forward, detached, is
    the proximal policy (`TrainBatch.proximal_is_update`): the same loss and gradient, one forward fewer."""
    a = run.cfg.algorithm
    algorithm = algorithms.get(a.name)
    needs = algorithm.needs(a)
    method = off_policy.resolve(a.off_policy, run.cfg.async_rl.mode)
    single = a.ppo_epochs * a.mini_batches == 1 and not off_policy.weighs_tokens(method) and not needs.old_logprobs
    with run.timer.phase("logprobs"):
        if not single:
            batch.old_logprobs_BT = run.trainer.logprobs(batch)
        if needs.reference:
            batch.ref_logprobs_BT = run.trainer.ref_logprobs(batch)
        if needs.critic:
            batch.values_BT = run.critic.values(batch) * batch.response_mask_BT
    run.timer.count("logprob_tokens", batch_tokens(batch) * ((not single) + needs.reference + needs.critic))
    stats = _advantages(run, batch, algorithm)
    if single:  # the ratio against the behaviour policy ("coupled") or the update's own forward; no IS weights
        batch.is_weights_BT, batch.proximal_is_update = None, True
        batch.old_logprobs_BT = off_policy.ratio_reference(method, None, batch.rollout_logprobs_BT)
        return stats
    mask = batch.response_mask_BT
    diff = ((batch.old_logprobs_BT - batch.rollout_logprobs_BT).abs() * mask).sum() / mask.sum().clamp(min=1)
    stats["train_rollout_logprob_abs_diff"] = float(diff)
    batch.is_weights_BT, is_stats = off_policy.importance_weights(batch.old_logprobs_BT, batch.rollout_logprobs_BT,
                                                                  mask, method, a.is_cap)
    batch.old_logprobs_BT = off_policy.ratio_reference(method, batch.old_logprobs_BT, batch.rollout_logprobs_BT)
    return {**stats, **is_stats}


def _advantages(run: Run, batch: TrainBatch, algorithm) -> dict[str, float]:
    """The algorithm's advantages (and returns) set on the batch; their statistics."""
    batch.advantages_BT, batch.returns_BT = algorithm.advantages(batch, run.cfg.algorithm)
    mask = batch.response_mask_BT
    n = mask.sum().clamp(min=1)
    adv_mean = (batch.advantages_BT * mask).sum() / n
    stats = {"adv_mean": float(adv_mean),
             "adv_std": float((((batch.advantages_BT - adv_mean) * mask).square().sum() / n).sqrt()),
             "reward_shaped_mean": float(batch.rewards_B.mean())}
    if batch.returns_BT is not None:
        stats.update(explained_variance(batch.values_BT, batch.returns_BT, mask))
    return stats


def explained_variance(values_BT, returns_BT, mask_BT) -> dict[str, float]:
    """1 - Var(returns - values) / Var(returns) over the loss tokens, and the mean value (critic metrics)."""
    n = mask_BT.sum().clamp(min=1)

    def var(x_BT):
        mean = (x_BT * mask_BT).sum() / n
        return ((x_BT - mean).square() * mask_BT).sum() / n

    v_ret = var(returns_BT)
    ev = 1.0 - var(returns_BT - values_BT) / v_ret if v_ret > 0 else torch.tensor(float("nan"))
    return {"explained_variance": float(ev), "value_mean": float((values_BT * mask_BT).sum() / n)}


def train(run: Run, batch: TrainBatch, loss_fn, step: int = 0) -> dict[str, float]:
    """score_batch, then `ppo_epochs` passes of `mini_batches` optimizer steps (the critic's first, then the
    policy's; during the critic's warm-up only the critic's). Old logprobs are computed once, before the first
    update, so every update after the first sees a ratio other than 1."""
    a = run.cfg.algorithm
    stats = score_batch(run, batch)
    value_loss = algorithms.ValueLoss(run.cfg.critic.value_clip) if run.critic is not None else None
    train_policy = run.critic is None or step >= run.cfg.critic.warmup_steps
    n = a.mini_batches
    size = -(-batch.num_sequences // n)
    updates = a.ppo_epochs * n
    per_update = []  # each update's metrics, means pre-divided: merged, they sum to the mean over the step
    for _ in range(a.ppo_epochs):
        for k in range(n):  # mini-batches: weights renormalized per mini-batch
            mini = batch.select(slice(k * size, (k + 1) * size))
            mini.loss_weights_BT = algorithms.token_loss_weights(mini.response_mask_BT, a.loss_agg, loss_agg_len(run))
            steps = [(run.critic, value_loss, "critic_")] if value_loss is not None else []
            steps += [(run.trainer, loss_fn, "")] if train_policy else []
            for backend, fn, prefix in steps:
                out = backend.train_step(mini, fn)
                # the trainer ranks' own seconds (Megatron reports them): a time (time/rank_s), not a statistic
                run.timer.count("rank_seconds", out.pop("rank_s", 0.0))
                per_update.append({prefix + key: v if key.endswith(("_max", "_min")) else v / updates
                                   for key, v in out.items()})
    stats.update(merge_step_stats(per_update))
    run.timer.count("trained_tokens", batch_tokens(batch) * a.ppo_epochs * train_policy)
    if a.ref_update_every and (step + 1) % a.ref_update_every == 0:
        refresh_reference(run)
    return stats


def batch_tokens(batch: TrainBatch) -> int:
    """The batch's real (unpadded) tokens, prompt and response: what a forward pass over it processes."""
    return int(batch.attention_mask_BT.sum())


REFERENCE_DIR = "reference"  # <output_dir>/reference: the reference model as of RL start or the last refresh


def refresh_reference(run: Run) -> None:
    """The reference model becomes the policy as it is now, and is written out (HF) so a resumed run gets it
    back (`job` loads it)."""
    from slime_rl.hf_io import save_hf_checkpoint

    run.trainer.update_reference()
    save_hf_checkpoint(run.out_dir / REFERENCE_DIR, run.trainer.hf_config, run.trainer.hf_state_dict())


def evaluate_run(run: Run, greedy: bool, n_samples: int = 1, temperature: float = 1.0) -> dict[str, float]:
    """Validation metrics of the engine's current weights (none when replaying without engines)."""
    if run.engine is None:
        return {}
    return evaluate(run.engine, run.val_records, run.reward_fn, greedy=greedy, n_samples=n_samples,
                    temperature=temperature, max_new_tokens=run.cfg.rollout.max_new_tokens,
                    stop_token_ids=[run.tokenizer.eos_token_id], decode=run.tokenizer.decode,
                    reward_timeout_s=run.cfg.reward.timeout_s, failure_reward=run.cfg.reward.failure_reward,
                    max_examples=run.cfg.eval.max_examples, seed=run.cfg.rollout.seed, metrics=run.task.eval_metrics,
                    episode=run.episode)


def maybe_evaluate(run: Run, step: int, force: bool = False) -> dict[str, float]:
    every = run.cfg.eval.every_n_steps
    if not force and (every == 0 or step % every):
        return {}
    e = run.cfg.eval
    return evaluate_run(run, e.greedy, e.n_samples, e.temperature)


def rl_loop(run: Run, progress=None, resume: dict | None = None) -> dict[str, float]:
    """cfg.train.num_steps RL steps (from a checkpoint's step when `resume` is its state); returns the
    final validation metrics."""
    cfg = run.cfg
    a = cfg.algorithm
    loss_fn = algorithms.get(a.name).loss(a)
    start = resume["step"] if resume else 0
    timer = run.timer = PhaseTimer()
    t_start = time.perf_counter()
    rollout = make_rollout(run, start)
    if resume:
        restore(run, rollout, resume)
    sync_weights(run)  # the trainer is the source of truth
    rollout.start()
    last_eval: dict[str, float] = {}
    try:
        for step in range(start, cfg.train.num_steps):
            t0, before = time.perf_counter(), timer.snapshot()
            trainer_version = run.weight_version  # the weights this step trains from
            with idle_trainer(run), timer.phase("rollout"):  # a restarted engine may be re-synced meanwhile
                groups = rollout.get(step, trainer_version)
            t_rollout = time.perf_counter() - t0
            record_groups(run, step, groups)
            stats, sync_stats, times = {}, {}, {}
            if run.trainer is not None:
                t1 = time.perf_counter()
                with timer.phase("train"):
                    batch = prepare(run, groups)
                    stats = train_phase(run, batch, loss_fn, step)
                t2 = time.perf_counter()
                with timer.phase("rollout"):  # one-step-off: the push first waits for the groups in flight
                    sync_stats = rollout.push(lambda: sync_weights(run))
                times = {"time/train_s": t2 - t1, "time/push_s": time.perf_counter() - t2}
            record = {"step": step + 1, "weight_version": run.weight_version,
                      **run.task.eval_metrics([s for g in groups for s in g], "rollout"),
                      "rollout/max_staleness": staleness_of(groups, trainer_version),
                      **rollout.metrics(), **{f"train/{k}": v for k, v in stats.items()}, **sync_stats,
                      "reward/errors": run.reward_errors,
                      "time/rollout_s": t_rollout, **times, "time/step_s": time.perf_counter() - t0}
            with timer.phase("eval"):
                evals = maybe_evaluate(run, step + 1, force=step + 1 == cfg.train.num_steps)
            record.update(evals)
            record.update(step_times(timer.snapshot().since(before)))
            last_eval = evals or last_eval
            run.logger.log(record)
            if progress is not None:
                progress(step + 1, record)
            else:
                print(format_line(step + 1, record, PRINT_KEYS), flush=True)
            with timer.phase("ckpt"):
                maybe_checkpoint(run, step + 1, rollout)
            if gate_passed(run, evals, step + 1):
                break
    finally:
        rollout.close()
    report_time(run, time.perf_counter() - t_start, overlapped=rollout.overlaps_training)
    return last_eval


TIME_TABLE = "time_table.json"


def report_time(run: Run, wall_s: float, overlapped: bool) -> TimeTable:
    """The run's closing table of where the loop's wall time went (slime_rl.timing): printed, written to
    <output_dir>/time_table.json and logged as one last record (time/table/...)."""
    table = TimeTable.build(run.timer.snapshot(), wall_s, run.cfg.async_rl.mode, overlapped)
    print(table.format(), flush=True)
    table.write(run.out_dir / TIME_TABLE)
    run.logger.log({"step": run.logger.history[-1].get("step", 0) if run.logger.history else 0, **table.metrics()})
    return table


def gate_passed(run: Run, metrics: dict[str, float], step: int) -> bool:
    """Check the deploy gate on fresh validation metrics: the report is written and printed; True when it
    passes, with the model saved to <output_dir>/checkpoint (the report names it)."""
    if run.gate is None:
        return False
    try:
        report = run.gate.check(metrics, step)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    if report is None:
        return False
    if report.passed and run.trainer is not None:
        path = run.out_dir / "checkpoint"
        run.trainer.save(str(path))
        run.tokenizer.save(str(path))
        report.checkpoint = str(path)
    run.gate.write(report)
    print(f"[gate] {report.line()}", flush=True)
    return report.passed


def idle_trainer(run: Run):
    """While the trainer holds exactly the last pushed weights and nothing else calls it (an EngineSupervisor
    may push them to a replacement engine); a no-op without one."""
    idle = getattr(run.sync, "trainer_idle", None)
    return idle() if idle is not None else contextlib.nullcontext()


def train_phase(run: Run, batch: TrainBatch, loss_fn, step: int) -> dict[str, float]:
    """`train`, with colocated engines' memory released around it (Ray, launch.colocate)."""
    launch = run.launch
    if launch is not None:
        launch.before_train()
    try:
        return train(run, batch, loss_fn, step)
    except Exception as exc:  # noqa: BLE001 - any trainer failure ends the run the same way
        raise TrainerFailed(f"the trainer failed at weight version {run.weight_version}: "
                            f"{type(exc).__name__}: {exc}") from exc
    finally:
        if launch is not None:
            launch.after_train()


def record_groups(run: Run, step: int, groups: list[list[Sample]]) -> None:
    """The trained-groups ledger (uid, samples, token versions per group) and, in debug mode, the groups."""
    if run.ledger is None:
        run.ledger = MetricsLogger(run.out_dir / TRAINED_GROUPS)
    ledger = run.ledger
    ledger.log({"step": step + 1, "trainer_version": run.weight_version,
                "groups": [{"uid": group_uid(g) if "uid" in g[0].metadata else str(g[0].group_id), "n": len(g),
                            "min_version": min((v for s in g for v in s.weight_versions), default=-1),
                            "max_version": max((v for s in g for v in s.weight_versions), default=-1),
                            "response_lengths": [len(s.response_ids) for s in g]}
                           for g in groups]})
    if run.cfg.debug.save_rollouts:
        save_groups(Path(run.cfg.debug.save_rollouts) / f"step_{step:06d}.pt", groups)


def maybe_checkpoint(run: Run, step: int, rollout) -> None:
    c = run.cfg.ckpt
    if run.trainer is None or not c.save_every or step % c.save_every:
        return
    t0 = time.perf_counter()
    ledger = run.ledger
    state = {"weight_version": run.weight_version, "rollout": rollout.state_dict(),
             "metrics": list(run.logger.history), "ledger": list(ledger.history) if ledger else [],
             "reward_errors": run.reward_errors}
    path = checkpoint.save(run.trainer, run.out_dir, step, state, keep=c.keep, critic=run.critic)
    print(f"[ckpt] step {step} -> {path} ({time.perf_counter() - t0:.1f}s)", flush=True)


def restore(run: Run, rollout, state: dict) -> None:
    """Everything but the trainer (loaded by checkpoint.load) from a checkpoint's state."""
    run.weight_version = state["weight_version"] - 1  # the first push of rl_loop makes it the checkpoint's again
    rollout.load_state_dict(state["rollout"])
    run.logger.restore(state["metrics"])
    run.ledger = MetricsLogger(run.out_dir / TRAINED_GROUPS)
    run.ledger.restore(state["ledger"])
    run.reward_errors = state["reward_errors"]
