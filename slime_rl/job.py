"""Jobs behind the CLI: build a Run (data, tokenizer, model, trainer, engine), then SFT / RL / eval.

`slime-rl train` with no flags: generate the synthetic arithmetic task, build a
tiny Llama, SFT warm-up on a small labelled subset, then GRPO on prompts with
only answers; evaluate after SFT and after RL; write metrics JSONL + a plot.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from pathlib import Path

import torch

from slime_rl import algorithms
from slime_rl.builders import build_critic, build_trainer, check_critic_path, megatron_settings
from slime_rl.config import ConfigError, JobConfig, save_config, to_dict
from slime_rl.data import load_prompts
from slime_rl.hf_io import init_tiny_model, load_hf_checkpoint, tiny_hf_config
from slime_rl import checkpoint
from slime_rl.gate import Gate
from slime_rl.loop import (PRINT_KEYS, REFERENCE_DIR, Run, TrainerFailed, evaluate_run, gate_passed, maybe_evaluate,
                           refresh_reference, rl_loop, sync_weights)
from slime_rl.metrics import format_line, open_logger, plot_curves
from slime_rl.rewards.compose import build_reward_fn
from slime_rl.sft import run_sft as sft_train
from slime_rl.threads import cpu_ids, pin_process
from slime_rl.tokenizer import load_tokenizer


def greedy_accuracy(run: Run) -> float:
    """Greedy validation accuracy, reported beside the configured (possibly sampled) one (NaN without engines)."""
    return evaluate_run(run, greedy=True).get("val/accuracy", float("nan"))


def _eval_label(cfg: JobConfig) -> str:
    e = cfg.eval
    return "greedy" if e.greedy else f"mean of {e.n_samples} samples at temperature {e.temperature}"


def _check_supported(cfg: JobConfig) -> None:
    on_ray = cfg.launch.launcher == "ray"
    if algorithms.needs(cfg.algorithm).critic:
        from training.spmd import in_torchrun

        if on_ray:
            raise ConfigError(f"algorithm.name {cfg.algorithm.name} trains a critic, which runs with "
                              "launch.launcher local only for now (its ranks are spawned on this machine)")
        if cfg.train.backend == "megatron" and in_torchrun():
            raise ConfigError(f"algorithm.name {cfg.algorithm.name} trains a critic, which torchrun does not start: "
                              "run without torchrun (ranks are spawned) or with --backend hf")
    if on_ray and cfg.rollout.engine_urls:
        raise ConfigError("rollout.engine_urls must be empty with launch.launcher ray (Ray starts the engines); "
                          f"got {cfg.rollout.engine_urls}")
    if cfg.rollout.num_inferencers != 1 and not cfg.rollout.engine_urls and not on_ray:
        raise ConfigError(f"rollout.num_inferencers is {cfg.rollout.num_inferencers}, but the local launcher runs one "
                          "embedded engine in process: use --launcher ray (Ray starts the engines) or "
                          "--rollout.engine_urls (servers already running)")


def task_episode(task, cfg: JobConfig, tokenizer):
    from slime_rl.tasks import task_episode as make

    try:
        return make(task, cfg, tokenizer)
    except ValueError as exc:  # e.g. a chat template that cannot render turns
        raise ConfigError(f"task {cfg.task}: {exc}") from None


def _task(cfg: JobConfig):
    from slime_rl.tasks import get_task

    try:
        return get_task(cfg.task)
    except ValueError as exc:
        raise ConfigError(f"task: {exc}") from None


def _model_dir(cfg: JobConfig) -> str | None:
    """`model.path`, converted first from `model.gguf` when that is set and the directory holds no conversion."""
    m = cfg.model
    if m.gguf is not None:
        from slime_rl.gguf_convert import convert_gguf, is_converted

        if not is_converted(m.path):
            try:
                convert_gguf(m.path, gguf_path=None if m.gguf == "smollm2" else m.gguf)
            except (FileNotFoundError, ValueError) as exc:
                raise ConfigError(f"model.gguf: {exc}") from None
    return m.path


def _model(cfg: JobConfig, tokenizer) -> tuple[dict, dict]:
    m = cfg.model
    if m.path is not None:
        return load_hf_checkpoint(_model_dir(cfg))
    hf_config = tiny_hf_config(m.arch, vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size,
                               num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                               intermediate_size=m.intermediate_size,
                               max_position_embeddings=m.max_position_embeddings,
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    return hf_config, init_tiny_model(hf_config, seed=m.init_seed)


def _load(path: str | None, cfg: JobConfig, tokenizer, with_response: bool) -> list:
    if path is None:
        return []
    d = cfg.data
    records, stats = load_prompts(path, tokenizer, prompt_key=d.prompt_key, label_key=d.label_key,
                                  response_key=d.response_key if with_response else None,
                                  metadata_keys=tuple(d.metadata_keys), apply_chat_template=d.apply_chat_template,
                                  system_prompt=d.system_prompt, max_prompt_tokens=d.max_prompt_tokens,
                                  skip_bad_lines=d.skip_bad_lines)
    if stats.skipped:
        print(f"[data] {path}: skipped {stats.skipped} bad lines {dict(stats.skipped_by_reason)}")
    return records


def serve_if_torchrun_rank(cfg: JobConfig) -> bool:
    """Under torchrun, ranks > 0 only serve rank 0's trainer commands; True once they are done."""
    from training.spmd import in_torchrun

    if cfg.train.backend != "megatron" or not in_torchrun() or int(os.environ.get("RANK", "0")) == 0:
        return False
    from training.hf import OptimSettings
    from training.megatron.backend import serve_torchrun_rank

    hf_config, state_dict = _model(cfg, _tokenizer(cfg))
    serve_torchrun_rank(hf_config, state_dict, OptimSettings(), megatron_settings(cfg), cfg.trainer_ranks,
                        with_reference=algorithms.needs(cfg.algorithm).reference)
    return True


def _tokenizer(cfg: JobConfig, task=None):
    """`model.tokenizer`, else the checkpoint's, else (a tiny model) the task's (`Task.tokenizer`, "char");
    `task`: the job's, when it has been built already."""
    m = cfg.model
    if m.tokenizer or m.path:
        return load_tokenizer(m.tokenizer or _model_dir(cfg))
    from slime_rl.tasks import task_tokenizer

    return load_tokenizer(task_tokenizer(task or _task(cfg), cfg))


def plan_local_threads(cfg: JobConfig):
    """This process's torch threads from the plan (slime_rl.threads), which is returned; the spawned ranks get
    theirs (and their cores) from megatron_settings. Printed, with a warning when the processes computing at
    once outnumber the cores. The driver is pinned to its cores later (`pin_process`), once the ranks are
    spawned: they are planned from this process's affinity mask, and inherit it."""
    from slime_rl.threads import apply_to_this_process, job_plan

    plan, ranks = job_plan(cfg)
    apply_to_this_process(plan.driver)
    print(plan.line(ranks))
    if plan.warning:
        print(f"[threads] WARNING: {plan.warning}", file=sys.stderr)
    return plan


def running_line(trainer) -> str:
    """What each process runs with: torch threads, and the cores it may use where it is pinned."""
    layouts = getattr(trainer, "layouts", [])
    line = f"[threads] running: driver {torch.get_num_threads()}" + (
        f", trainer ranks {[layout['torch_threads'] for layout in layouts]}" if layouts else "")
    driver_cores = cpu_ids()
    if len(driver_cores) < (os.cpu_count() or 0):
        line += f"; cores: driver {driver_cores}" + (
            f", trainer ranks {[layout.get('cores') for layout in layouts]}" if layouts else "")
    return line


def build_run(cfg: JobConfig) -> Run:
    """Everything a job needs, built once from the config."""
    from rollout import EmbeddedEngine
    from training.spmd import in_torchrun
    from weight_sync import WeightSync

    _check_supported(cfg)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.log.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    logger = open_logger(cfg.log, out_dir, to_dict(cfg))  # wandb/TensorBoard start at its first record
    task = _task(cfg)
    tokenizer = _tokenizer(cfg, task)
    try:
        paths = task.data(cfg, out_dir)
    except ValueError as exc:
        raise ConfigError(f"task {cfg.task}: {exc}") from None
    train_records = _load(paths["train"], cfg, tokenizer, with_response=False)
    val_records = _load(paths["val"], cfg, tokenizer, with_response=False)
    sft_records = _load(paths["sft"], cfg, tokenizer, with_response=True)
    hf_config, state_dict = _model(cfg, tokenizer)
    if cfg.critic.path is not None and algorithms.needs(cfg.algorithm).critic:
        check_critic_path(cfg.critic.path, hf_config)  # before the SFT warm-up, not after it
    ro = cfg.rollout
    launch = router = plan = None
    if cfg.launch.launcher == "local" and not in_torchrun():  # Ray and torchrun size their own processes
        plan = plan_local_threads(cfg)
    if cfg.launch.launcher == "ray":  # engines and trainer ranks are Ray actors; job_run closes the launch last
        from slime_rl.launch.ray_launch import RayLaunch

        launch = RayLaunch(cfg, hf_config, state_dict, tokenizer)
        trainer = launch.trainer
        engine, router = external_engines(ro, launch.engine_urls, kind="Ray", always_route=True)
        sync = supervise(cfg, trainer, launch.engine_urls, engine, router, launch.restart_engine)
    elif ro.engine_urls:
        trainer = build_trainer(cfg, hf_config, state_dict)
        engine, router = external_engines(ro)
        sync = supervise(cfg, trainer, ro.engine_urls, engine, router, restart=None)
    else:
        trainer = build_trainer(cfg, hf_config, state_dict)
        engine = None if cfg.debug.load_rollouts else EmbeddedEngine(
            hf_config, state_dict, max_batch_size=ro.max_batch_size, seed=ro.seed,
            max_total_tokens=ro.max_total_tokens, kv_cache_mb=ro.kv_cache_mb, page_size=ro.page_size,
            enable_prefix_cache=ro.enable_prefix_cache)
        sync = WeightSync(trainer, [engine], cfg.sync) if trainer is not None and engine is not None else None
    if plan is not None and plan.driver_cores:
        pin_process(plan.driver_cores)
    print(running_line(trainer))
    n_params = sum(t.numel() for t in state_dict.values())
    print(f"[model] {hf_config['model_type']} {n_params / 1e6:.2f}M params, vocab {hf_config['vocab_size']}")
    return Run(cfg=cfg, tokenizer=tokenizer, trainer=trainer, critic=None, engine=engine, launch=launch, router=router,
               sync=sync,
               reward_fn=build_reward_fn(cfg.reward, lambda: task.reward_fn(cfg)), task=task,
               episode=task_episode(task, cfg, tokenizer),
               gate=Gate(cfg.gate.metric, cfg.gate.threshold, out_dir) if cfg.gate.metric else None,
               train_records=train_records, val_records=val_records,
               sft_records=sft_records, logger=logger, out_dir=out_dir)


def external_engines(ro, engine_urls: list[str] | None = None, kind: str = "external", always_route: bool = False):
    """A client to generate with on SGLang-protocol servers (`engine_urls`, default `ro.engine_urls`): through
    `router_url`, or a built-in router over the engines when there are several (or always with
    `always_route`: engines that may be restarted at a new URL); and the router we started (None if none)."""
    from rollout.client import EngineClient
    from rollout.router import start_router

    urls = list(engine_urls or ro.engine_urls)
    router = None
    url = ro.router_url or urls[0]
    if ro.router_url is None and (len(urls) > 1 or always_route):
        router = start_router(urls, prefer="builtin")
        url = router.url
    print(f"[rollout] {len(urls)} {kind} engine(s) {urls}, generating through {url}")
    return EngineClient(url, api_key=ro.api_key, control_urls=urls), router


def supervise(cfg: JobConfig, trainer, urls: list[str], engine, router, restart):
    """Weight sync to engine servers under an EngineSupervisor: health probes; a dead engine leaves routing and
    weight sync, is restarted through `restart` (None: engines we do not own stay out) and re-synced."""
    from slime_rl.supervisor import EngineSupervisor, http_sync_factory

    if trainer is None:  # rollout-only: nothing to push
        return None
    ro = cfg.rollout

    def serving(now: list[str]) -> None:
        engine.control_urls = list(now)  # control calls (abort, pause) reach the engines that serve

    return EngineSupervisor(list(urls), sync_factory=http_sync_factory(trainer, cfg.sync, api_key=ro.api_key),
                            router=router, restart=restart, interval_s=ro.health_check_s,
                            timeout_s=ro.health_timeout_s, max_restarts=ro.max_engine_restarts, api_key=ro.api_key,
                            on_change=serving)


def _rl_opt(cfg: JobConfig):
    from training.hf import OptimSettings

    t = cfg.train
    return OptimSettings(lr=t.lr, min_lr=t.min_lr, schedule=t.lr_schedule, warmup_steps=t.warmup_steps,
                         total_steps=max(1, t.num_steps * _updates_per_step(cfg)), weight_decay=t.weight_decay,
                         betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, grad_clip=t.grad_clip,
                         micro_batch_size=t.micro_batch_size, max_tokens_per_micro_batch=t.max_tokens_per_micro_batch)


def _updates_per_step(cfg: JobConfig) -> int:
    return cfg.algorithm.ppo_epochs * cfg.algorithm.mini_batches


def _critic_opt(cfg: JobConfig):
    from training.hf import OptimSettings

    c, t = cfg.critic, cfg.train
    return OptimSettings(lr=c.lr, schedule="constant", warmup_steps=0, total_steps=max(1, t.num_steps * _updates_per_step(cfg)),
                         betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, grad_clip=c.grad_clip,
                         micro_batch_size=c.micro_batch_size)


def attach_critic(run: Run) -> None:
    """The critic the algorithm needs (PPO), initialised from `critic.path` or from the policy as it is now
    (after the SFT warm-up, as ReFT does); None otherwise."""
    if run.trainer is None or not algorithms.needs(run.cfg.algorithm).critic:
        return
    run.critic = build_critic(run.cfg, run.trainer, _critic_opt(run.cfg))


def sft_stage(run: Run) -> dict[str, float]:
    """Warm-up on labelled (prompt, response) pairs; returns validation metrics after it."""
    from training.hf import OptimSettings

    s = run.cfg.sft
    if not run.sft_records:
        raise ValueError("SFT needs data: set data.sft_path (prompt/response jsonl) or use the synthetic task")
    steps = s.epochs * -(-len(run.sft_records) // s.batch_size)
    run.trainer.reset_optimizer(OptimSettings(lr=s.lr, schedule="cosine", warmup_steps=s.warmup_steps,
                                              total_steps=steps, micro_batch_size=s.micro_batch_size))
    t0 = time.perf_counter()
    print(f"[sft] {len(run.sft_records)} examples x {s.epochs} epochs = {steps} steps")
    bar = _bar(steps, "sft", run.cfg.log.progress)
    sft_train(run.trainer, run.sft_records, run.tokenizer, s.epochs, s.batch_size, seed=run.cfg.seed,
            on_step=lambda i, st: bar(i + 1, {"nll": st["nll"]}))
    sync_weights(run)
    metrics = maybe_evaluate(run, 0, force=True)
    print(f"[sft] done in {time.perf_counter() - t0:.0f}s: validation accuracy {metrics.get('val/accuracy', float('nan')):.3f}")
    return metrics


def _bar(total: int, desc: str, enabled: bool):
    """A tqdm progress bar as a callback(step, record); plain prints when disabled."""
    import sys

    if not enabled or not sys.stdout.isatty():  # logs and CI: a plain line every ~10% instead of a bar
        every = max(1, total // 10)

        def line(step: int, record: dict) -> None:
            if step % every == 0 or step == total or "val/accuracy" in record:
                print(format_line(step, record, PRINT_KEYS + ["nll"]).replace("step", desc, 1), flush=True)

        return line
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)

    def update(step: int, record: dict) -> None:
        bar.update(step - bar.n)
        shown = {k.split("/")[-1]: f"{v:.3f}" for k, v in record.items()
                 if k in PRINT_KEYS[:3] or k == "nll" or k == "val/accuracy"}
        bar.set_postfix(shown, refresh=False)
        if "val/accuracy" in record:
            bar.write(format_line(step, record, PRINT_KEYS))
        if step >= total:
            bar.close()

    return update


@contextlib.contextmanager
def job_run(cfg: JobConfig):
    """build_run, and on the way out stop what it started (trainer ranks, the engine's scheduler thread).

    Yields None on torchrun ranks > 0, which have served the trainer commands by then.
    """
    if serve_if_torchrun_rank(cfg):
        yield None
        return
    cores_before = tuple(cpu_ids())  # the plan may pin this process (slime_rl.threads); a caller gets it back
    try:
        run = build_run(cfg)
        try:
            yield run
        finally:
            router, launch = run.router, run.launch
            for close in (run.logger.close, getattr(run.sync, "close", None), getattr(run.trainer, "close", None),
                          getattr(run.critic, "close", None),
                          getattr(run.engine, "close", None),
                          router.stop if router is not None else None, launch.close if launch is not None else None):
                if close is not None:
                    close()
    finally:
        if hasattr(os, "sched_setaffinity") and tuple(cpu_ids()) != cores_before:
            pin_process(cores_before)


def run_train(cfg: JobConfig) -> int:
    with job_run(cfg) as run:
        return 0 if run is None else _train(run)


def _train(run: Run) -> int:
    cfg = run.cfg
    t0 = time.perf_counter()
    if cfg.debug.rollout_only:
        return _rollout_only(run)
    resume = _resume_point(cfg, run.out_dir)
    if resume is not None:
        state = _load_checkpoint(run, resume)
        before = next((r for r in state["metrics"] if r.get("step") == 0), {})
        sft_acc, sft_greedy = before.get("val/accuracy", float("nan")), before.get("val/greedy_accuracy", float("nan"))
    else:
        state = None
        if cfg.sft.enabled:
            run.start_metrics = sft_stage(run)
        else:
            sync_weights(run)
            run.start_metrics = maybe_evaluate(run, 0, force=True)
        sft_acc = run.start_metrics.get("val/accuracy", float("nan"))
        sft_greedy = greedy_accuracy(run)
        run.logger.log({"step": 0, **run.start_metrics, "val/greedy_accuracy": sft_greedy})
        if gate_passed(run, run.start_metrics, 0):
            print(f"[gate] passed before RL: the model at {run.out_dir / 'checkpoint'} is the result; no RL steps run")
            return 0
        run.trainer.reset_optimizer(_rl_opt(cfg))
        if algorithms.needs(cfg.algorithm).reference:
            refresh_reference(run)  # KL to the policy RL starts from (after the SFT warm-up)
        attach_critic(run)
    print(f"[rl] {cfg.algorithm.name}, {cfg.async_rl.mode}: {cfg.train.num_steps} steps x "
          f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.n_samples_per_prompt} samples")
    try:
        with long_lived_frozen():
            final = rl_loop(run, progress=_bar(cfg.train.num_steps, "rl", cfg.log.progress), resume=state)
    except TrainerFailed as exc:
        print(f"slime-rl: {exc}", file=sys.stderr)
        print(f"slime-rl: {_resume_hint(run)}", file=sys.stderr)
        return 1
    rl_acc = final.get("val/accuracy", float("nan"))
    rl_greedy = greedy_accuracy(run)
    run.logger.log({"step": run.logger.history[-1]["step"] if run.logger.history else cfg.train.num_steps,
                    "val/greedy_accuracy": rl_greedy})
    _finish(run, (sft_acc, sft_greedy), (rl_acc, rl_greedy), time.perf_counter() - t0)
    return _gate_verdict(run)


@contextlib.contextmanager
def long_lived_frozen():
    """The objects built before the RL loop (modules, the engine, the data, imported code) out of the garbage
    collector's passes while it runs, given back after. A full pass walks them all holding the GIL: 100-260 ms
    each in the driver of the default job, every few seconds, stalling the engine's generation and the loop
    alike (an async producer then fell behind the trainer)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _gate_verdict(run: Run) -> int:
    """0, or 3 when a gate was set and the run ended without passing it (said on stderr)."""
    gate = run.gate
    if gate is None or (gate.last is not None and gate.last.passed):
        return 0
    last = f"last measured {gate.last.value:.4f} at step {gate.last.step}" if gate.last else "never measured"
    print(f"slime-rl: the gate {gate.metric} >= {gate.threshold} was NOT passed ({last}); report: {gate.path}",
          file=sys.stderr)
    return 3


def _resume_point(cfg: JobConfig, out_dir: Path) -> Path | None:
    if not cfg.ckpt.resume:
        return None
    path = checkpoint.resolve(cfg.ckpt.resume, out_dir)
    if path is None:
        print(f"[ckpt] --resume auto: no checkpoint under {checkpoint.root(out_dir)}; starting from the beginning")
    return path


def _load_checkpoint(run: Run, path: Path) -> dict:
    """The RL optimizer as a fresh run builds it, then the checkpoint's trainer state over it."""
    run.trainer.reset_optimizer(_rl_opt(run.cfg))
    attach_critic(run)
    state = checkpoint.load(run.trainer, path, critic=run.critic)
    a = run.cfg.algorithm
    if algorithms.needs(a).reference:
        ref = run.out_dir / REFERENCE_DIR
        if not (ref / "config.json").exists():
            raise FileNotFoundError(f"resuming {a.name} with a KL term needs its reference model at {ref} "
                                    "(written at RL start by the run being resumed)")
        run.trainer.load_reference(str(ref))
    print(f"[ckpt] resumed from {path}: step {state['step']}, weight version {state['weight_version']}")
    return state


def _resume_hint(run: Run) -> str:
    found = checkpoint.list_checkpoints(run.out_dir)
    if not found:
        return ("no checkpoint was written (set --ckpt.save_every N to checkpoint every N steps); "
                "the run has to start over")
    return f"the newest checkpoint is {found[-1]}: resume with the same flags plus --resume auto (or --resume {found[-1]})"


def _rollout_only(run: Run) -> int:
    """Generate and score every step with the engines' current weights; no trainer, no weight updates."""
    cfg = run.cfg
    print(f"[rollout-only] {cfg.train.num_steps} steps x {cfg.rollout.prompts_per_step} prompts x "
          f"{cfg.rollout.n_samples_per_prompt} samples, no training")
    rl_loop(run, progress=_bar(cfg.train.num_steps, "rollout", cfg.log.progress))
    rewards = run.logger.series("rollout/reward_mean")[1]
    print(f"[rollout-only] mean reward {sum(rewards) / max(1, len(rewards)):.3f} over {len(rewards)} steps; "
          f"records: {run.logger.path}" + (f", rollouts: {cfg.debug.save_rollouts}" if cfg.debug.save_rollouts else ""))
    return 0


def _finish(run: Run, sft: tuple[float, float], rl: tuple[float, float], seconds: float) -> None:
    """Save, plot, and print the summary: (accuracy, greedy accuracy) before and after RL."""
    out = run.out_dir
    if run.cfg.log.save_checkpoint:
        run.trainer.save(str(out / "checkpoint"))
        run.tokenizer.save(str(out / "checkpoint"))
        if run.critic is not None:
            run.critic.save(str(out / "critic"))
    plot = plot_curves(run.logger, out / "curves.png", title=f"{run.cfg.algorithm.name} on {out.name}") \
        if run.cfg.log.plot else None
    label = "after SFT" if run.cfg.sft.enabled else "before RL"
    print("\n" + "=" * 60)
    print(f"validation accuracy ({_eval_label(run.cfg)}; greedy in brackets)")
    print(f"  {label + ':':10s} {sft[0] * 100:5.1f}%   [greedy {sft[1] * 100:5.1f}%]")
    print(f"  {'after RL:':10s} {rl[0] * 100:5.1f}%   [greedy {rl[1] * 100:5.1f}%]   "
          f"({(rl[0] - sft[0]) * 100:+.1f} points)")
    print(f"metrics: {run.logger.path}")
    if plot:
        print(f"plot:    {plot}")
    if run.cfg.log.save_checkpoint:
        print(f"model:   {out / 'checkpoint'}" + (f"   critic: {out / 'critic'}" if run.critic is not None else ""))
    print(f"time:    {seconds:.0f}s")
    print("=" * 60)


def run_sft(cfg: JobConfig) -> int:
    with job_run(cfg) as run:
        return 0 if run is None else _sft_only(run)


def _sft_only(run: Run) -> int:
    acc = sft_stage(run)["val/accuracy"]
    run.trainer.save(str(run.out_dir / "checkpoint"))
    run.tokenizer.save(str(run.out_dir / "checkpoint"))
    print(f"SFT validation accuracy: {acc * 100:.1f}%  model: {run.out_dir / 'checkpoint'}")
    return 0


def run_eval(cfg: JobConfig) -> int:
    with job_run(cfg) as run:
        return 0 if run is None else _eval_only(run)


def _eval_only(run: Run) -> int:
    sync_weights(run)
    metrics = maybe_evaluate(run, 0, force=True)
    run.logger.log({"step": 0, **metrics})
    for k, v in sorted(metrics.items()):
        print(f"{k}: {v:.4f}")
    return 0
