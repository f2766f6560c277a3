"""Builders of the trainer-side components a job holds: the policy's TrainerBackend and PPO's critic.

Apart from job.py so that launchers (launch/ray_launch.py hands `build_trainer` a launcher placing ranks on
Ray) can use them without importing the job module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slime_rl import algorithms
from slime_rl.config import ConfigError, JobConfig


def build_trainer(cfg: JobConfig, hf_config: dict, state_dict: dict | str, launcher=None):
    """The TrainerBackend of train.backend: Megatron ranks (spawned, torchrun's, or created by `launcher`,
    e.g. Ray actors; see MegatronBackend) or the reference."""
    from training.hf import HFTrainer, OptimSettings

    if cfg.debug.rollout_only:
        print("[train] rollout-only mode: no trainer")
        return None
    with_reference = algorithms.needs(cfg.algorithm).reference
    if cfg.train.backend == "hf":
        trainer = HFTrainer(hf_config, state_dict, OptimSettings(), with_reference=with_reference,
                            fused_logprob=cfg.train.fused_logprob)
        trainer.shared_prefix = cfg.train.shared_prompt_forward
        return trainer
    from training.megatron import MegatronBackend

    t = cfg.train
    ranks = cfg.trainer_ranks
    print(f"[train] megatron: {ranks} rank(s) = tp {t.tp} x pp {t.pp} x dp {ranks // (t.tp * t.pp)}")
    return MegatronBackend(hf_config, state_dict, OptimSettings(), megatron_settings(cfg), num_ranks=ranks,
                           with_reference=with_reference, launcher=launcher)


def megatron_settings(cfg: JobConfig):
    from training.megatron import MegatronSettings, ModelSettings

    from slime_rl.threads import job_plan

    t = cfg.train
    plan = job_plan(cfg)[0]
    return MegatronSettings(
        model=ModelSettings(tp=t.tp, pp=t.pp, spec=t.megatron_spec, dtype=t.dtype,
                            vocab_pad_multiple=t.vocab_pad_multiple, fused_logprob=t.fused_logprob),
        use_distributed_optimizer=t.use_distributed_optimizer, max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
        shared_prompt=t.shared_prompt_forward,
        seed=cfg.seed, threads=plan.rank, cores=plan.rank_cores)


SUPPORTED = ("llama", "qwen2")


def check_critic_path(path: str, policy_hf_config: dict) -> dict:
    """The config.json of the checkpoint at `critic.path`, or ConfigError naming the field and the mismatch."""
    import json

    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"critic.path: cannot read {config_file}: {exc}") from None
    if not isinstance(config, dict) or config.get("model_type") not in SUPPORTED:
        raise ConfigError(f"critic.path: {path} is a {config.get('model_type') if isinstance(config, dict) else '?'!r} "
                          f"model; the critic must be one of {', '.join(SUPPORTED)}")
    if config.get("vocab_size") != policy_hf_config.get("vocab_size"):
        raise ConfigError(f"critic.path: {path} has vocab_size {config.get('vocab_size')} but the policy has "
                          f"{policy_hf_config.get('vocab_size')}: the critic must share the policy's tokenizer")
    return config


def build_critic(cfg: Any, trainer, opt):
    """A CriticBackend on cfg.train.backend: from `cfg.critic.path`, else from the trainer's current policy."""
    from slime_rl.hf_io import load_hf_checkpoint

    c = cfg.critic
    if c.path is not None:
        hf_config = check_critic_path(c.path, trainer.hf_config)
        try:
            _, state = load_hf_checkpoint(c.path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"critic.path: cannot load the checkpoint at {c.path}: {exc}") from None
        source = c.path
    else:
        hf_config, state, source = trainer.hf_config, trainer.hf_state_dict(), "the policy"
        state = {k: v.detach().clone() for k, v in state.items()}  # views of live parameters otherwise
    try:
        if cfg.train.backend == "hf":
            from training.hf import HFCritic

            critic = HFCritic(hf_config, state, opt)
        else:
            from training.megatron import MegatronCritic

            critic = MegatronCritic(hf_config, state, opt, megatron_settings(cfg), num_ranks=cfg.trainer_ranks)
    except (ValueError, RuntimeError) as exc:  # transformers' strict load raises RuntimeError on a mismatch
        if c.path is None:
            raise
        raise ConfigError(f"critic.path: {source} does not fit the critic: {str(exc)[:400]}") from exc
    print(f"[critic] {cfg.train.backend} critic from {source}, lr {opt.lr}")
    return critic
