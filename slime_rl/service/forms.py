"""What a user can choose in the service (models, algorithms, tasks, hyperparameters) and how a job request
becomes a `slime-rl train` config. Every field of a request is checked here, where it enters; a bad one is a
`RequestError` naming it (`hyperparameters.lr_multiplier`), which the API answers with a 400.

Hyperparameters are a few user-facing knobs over the typed config (`JobConfig`), with its defaults:
`batch_size` is `rollout.prompts_per_step`, `lr_multiplier` scales the model template's learning rate,
`epochs` sets `train.num_steps` from the training rows (`max_steps` caps it). A value left at its default
is not written to the job's config, so the task's and the algorithm's presets still choose it (as they do
on the command line).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slime_rl.config import ConfigError, JobConfig, build_config, literal_choices
from slime_rl.algorithms.config import AlgorithmName


class RequestError(ValueError):
    """A bad request: `field` is the dotted name of what is wrong."""

    def __init__(self, field: str, message: str, status: int = 400, **extra: Any):
        super().__init__(message)
        self.field, self.status, self.extra = field, status, extra


MODELS = {
    "tiny": "Tiny Llama (0.4M parameters, random init; SFT warm-up on the task first)",
    "smollm2": "SmolLM2-135M-Instruct (bundled GGUF, its tokenizer and chat template)",
    "path": "A local Hugging Face checkpoint directory",
}
ALGORITHMS = {
    "GRPO": "GRPO (group-normalised advantages)", "DR_GRPO": "Dr. GRPO (no length or std bias)",
    "DAPO": "DAPO (clip-higher, dynamic sampling, overlong penalty)", "RLOO": "RLOO (leave-one-out baseline)",
    "REINFORCE_PP": "REINFORCE++", "REINFORCE_PPB": "REINFORCE++-baseline", "PPO": "PPO (critic + GAE)",
    "GSPO": "GSPO (sequence-level ratio)", "CISPO": "CISPO (clipped IS weights)",
    "RAFT": "RAFT (reward-ranked fine-tuning)",
}
TASKS = {
    "arithmetic": "Arithmetic (generated, or your prompt/label rows; math verifier)",
    "math": "Math word problems from your files (math verifier)",
    "word_problems": "Generated word problems for chat models (lenient math check)",
    "ranked_list": "Ranked list (ReFT grader: top-1 / top-5 / top-max)",
    "code": "Python code against tests (sandboxed)",
    "customer_support": "Customer-support agent with tools (multi-turn simulator)",
    "custom": "Your own task: a dotted path pkg.module:factory",
}
DATA_REQUIRED = {"math"}
_DOTTED = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MAX_NAME = 120


@dataclass(frozen=True)
class Hyper:
    name: str
    label: str
    type: str  # int | float | bool | choice
    default: Any
    key: str | None  # the config field it sets (None: computed, see job_config)
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    help: str = ""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "type": self.type, "default": self.default,
                "min": self.min, "max": self.max, "choices": list(self.choices) or None, "help": self.help}


def _hyperparameters() -> list[Hyper]:
    d = JobConfig()
    return [
        Hyper("batch_size", "Batch size (prompts per step)", "int", d.rollout.prompts_per_step,
              "rollout.prompts_per_step", 1, 4096),
        Hyper("samples_per_prompt", "Samples per prompt (group size)", "int", d.rollout.n_samples_per_prompt,
              "rollout.n_samples_per_prompt", 1, 256),
        Hyper("lr_multiplier", "Learning-rate multiplier", "float", 1.0, None, 1e-3, 100.0,
              help="times the model template's learning rate"),
        Hyper("epochs", "Epochs", "float", 1.0, None, 0.01, 1000.0, help="passes over the training prompts"),
        Hyper("max_steps", "Max RL steps (0 = from epochs)", "int", 0, None, 0, 1_000_000),
        Hyper("max_new_tokens", "Max new tokens per response", "int", d.rollout.max_new_tokens,
              "rollout.max_new_tokens", 1, 32768),
        Hyper("temperature", "Sampling temperature", "float", d.rollout.temperature, "rollout.temperature", 0.0, 2.0),
        Hyper("eval_every", "Validate every N steps (0 = at the end only)", "int", d.eval.every_n_steps,
              "eval.every_n_steps", 0, 1_000_000),
        Hyper("sft_warmup", "SFT warm-up before RL", "choice", "auto", None, choices=("auto", "on", "off"),
              help="auto: on for the tiny model (it starts from random weights), off for a checkpoint"),
        Hyper("sft_epochs", "SFT warm-up epochs", "int", d.sft.epochs, "sft.epochs", 1, 1000),
        Hyper("backend", "Trainer backend", "choice", d.train.backend, "train.backend",
              choices=literal_choices(type(d.train).__annotations__["backend"]) or ("megatron", "hf")),
        Hyper("async_mode", "Generation / training overlap", "choice", d.async_rl.mode, "async_rl.mode",
              choices=("sync", "one_step_off", "fully_async")),
        Hyper("save_every", "Checkpoint every N steps (for resume; 0 = none)", "int", d.ckpt.save_every,
              "ckpt.save_every", 0, 1_000_000),
        Hyper("seed", "Seed", "int", d.seed, "seed", 0, 2**31 - 1),
    ]


HYPERPARAMETERS = {h.name: h for h in _hyperparameters()}


def options() -> dict[str, Any]:
    return {
        "models": [{"id": k, "label": v, "needs_path": k == "path"} for k, v in MODELS.items()],
        "algorithms": [{"id": k, "label": ALGORITHMS.get(k, k)} for k in literal_choices(AlgorithmName)],
        "tasks": [{"id": k, "label": v, "data": "required" if k in DATA_REQUIRED else "optional",
                   "needs_path": k == "custom"} for k, v in TASKS.items()],
        "hyperparameters": [h.describe() for h in HYPERPARAMETERS.values()],
    }


def _choice(body: dict, name: str, allowed: dict | tuple) -> dict:
    """A {"id": ..., "path": ...} selection (a bare id string is accepted too)."""
    value = body.get(name)
    if isinstance(value, str):
        value = {"id": value}
    if not isinstance(value, dict) or not isinstance(value.get("id"), str):
        raise RequestError(f"{name}.id" if isinstance(value, dict) else name,
                           f"{name}: expected {{\"id\": one of {', '.join(allowed)}}}")
    if value["id"] not in allowed:
        raise RequestError(f"{name}.id", f"{name}.id: unknown {value['id']!r}; one of {', '.join(allowed)}")
    path = value.get("path")
    if path is not None and (not isinstance(path, str) or not path.strip() or len(path) > 4096):
        raise RequestError(f"{name}.path", f"{name}.path: expected a non-empty string")
    return {"id": value["id"], **({"path": path.strip()} if path else {})}


def check_hyperparameters(given: Any) -> dict[str, Any]:
    """The request's hyperparameters, typed and in range (unknown names are an error, not ignored)."""
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise RequestError("hyperparameters", "hyperparameters: expected an object of name: value")
    out = {}
    for name, value in given.items():
        field = f"hyperparameters.{name}"
        h = HYPERPARAMETERS.get(name)
        if h is None:
            raise RequestError(field, f"{field}: unknown; known: {', '.join(HYPERPARAMETERS)}")
        if h.type == "bool":
            if not isinstance(value, bool):
                raise RequestError(field, f"{field}: expected true or false, got {value!r}")
        elif h.type == "choice":
            if value not in h.choices:
                raise RequestError(field, f"{field}: expected one of {', '.join(h.choices)}, got {value!r}")
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if h.type == "int":
                ok = ok and float(value).is_integer()
            if not ok:
                raise RequestError(field, f"{field}: expected {'an integer' if h.type == 'int' else 'a number'}, "
                                   f"got {value!r}")
            value = int(value) if h.type == "int" else float(value)
            if not h.min <= value <= h.max:
                raise RequestError(field, f"{field}: {value} is out of range [{h.min}, {h.max}]")
        out[name] = value
    return out


@dataclass(frozen=True)
class JobRequest:
    name: str
    model: dict
    algorithm: str
    task: dict
    train_upload: str | None
    val_upload: str | None
    hyperparameters: dict

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def parse_job_request(body: Any) -> JobRequest:
    if not isinstance(body, dict):
        raise RequestError("body", "body: expected a JSON object")
    known = {"name", "model", "algorithm", "task", "train_upload", "val_upload", "hyperparameters"}
    for key in body:
        if key not in known:
            raise RequestError(str(key)[:80], f"{str(key)[:80]}: unknown field; known: {', '.join(sorted(known))}")
    name = body.get("name") or ""
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise RequestError("name", f"name: expected a string of at most {MAX_NAME} characters")
    model = _choice(body, "model", MODELS)
    if model["id"] == "path" and "path" not in model:
        raise RequestError("model.path", "model.path: a checkpoint directory is needed for model 'path'")
    algorithm = body.get("algorithm", "GRPO")
    if not isinstance(algorithm, str) or algorithm.upper() not in literal_choices(AlgorithmName):
        raise RequestError("algorithm", f"algorithm: expected one of {', '.join(literal_choices(AlgorithmName))}")
    task = _choice(body, "task", TASKS)
    if task["id"] == "custom" and not _DOTTED.match(task.get("path", "")):
        raise RequestError("task.path", "task.path: expected a dotted path pkg.module:factory")
    uploads = {}
    for key in ("train_upload", "val_upload"):
        value = body.get(key)
        if value is not None and (not isinstance(value, str) or not re.fullmatch(r"u_[0-9a-f]{12}", value)):
            raise RequestError(key, f"{key}: expected an upload id (u_ + 12 hex digits) or null")
        uploads[key] = value
    if task["id"] in DATA_REQUIRED and uploads["train_upload"] is None:
        raise RequestError("train_upload", f"train_upload: task {task['id']} trains on your file; upload one")
    return JobRequest(name.strip(), model, algorithm.upper(), task, uploads["train_upload"], uploads["val_upload"],
                      check_hyperparameters(body.get("hyperparameters")))


def job_config(req: JobRequest, out_dir: Path, models_dir: Path, files: dict[str, tuple[str, int] | None]) -> dict:
    """The job's config file (a mapping as `slime-rl train -c` reads it); `files`: kind -> (stored path, rows)
    of its uploads. Built and validated as the job will be (`build_config`): a ConfigError is the request's."""
    hp = {**{n: h.default for n, h in HYPERPARAMETERS.items()}, **req.hyperparameters}
    cfg: dict[str, Any] = {"task": req.task.get("path") if req.task["id"] == "custom" else req.task["id"],
                           "algorithm": {"name": req.algorithm},
                           "log": {"output_dir": str(out_dir)}}
    if model := _model_section(req.model, models_dir):
        cfg["model"] = model
    for name, h in HYPERPARAMETERS.items():
        if h.key and name in req.hyperparameters and req.hyperparameters[name] != h.default:
            _put(cfg, h.key, hp[name])
    tiny = req.model["id"] == "tiny"
    if hp["sft_warmup"] != "auto" or not tiny:  # a checkpoint starts from its weights unless a warm-up is asked
        _put(cfg, "sft.enabled", hp["sft_warmup"] == "on" or (hp["sft_warmup"] == "auto" and tiny))
    if not tiny and files.get("train"):  # the user's plain prompts in the chat model's template
        _put(cfg, "data.apply_chat_template", True)
    for kind in ("train", "val"):
        if files.get(kind):
            _put(cfg, f"data.{kind}_path", files[kind][0])
    built = _validated(cfg)
    base_lr = 2e-6 if req.model["id"] == "smollm2" else built.train.lr
    _put(cfg, "train.lr", base_lr * hp["lr_multiplier"])
    rows = files["train"][1] if files.get("train") else built.data.num_train
    steps = max(1, math.ceil(hp["epochs"] * rows / built.rollout.prompts_per_step))
    _put(cfg, "train.num_steps", min(steps, hp["max_steps"]) if hp["max_steps"] else steps)
    _validated(cfg)
    return cfg


def _validated(cfg: dict) -> JobConfig:
    """The config as the job will build it. A custom task is not imported here (its code runs in the job,
    not in the service): the built-in default task's presets stand in for its own. A ConfigError names a
    config field: the hyperparameter that sets it when there is one."""
    if ":" in cfg["task"]:
        cfg = {**cfg, "task": "arithmetic"}
    try:
        return build_config(cfg)
    except ConfigError as exc:
        message = str(exc)
        for h in HYPERPARAMETERS.values():
            if h.key and message.startswith(h.key):
                raise RequestError(f"hyperparameters.{h.name}", f"hyperparameters.{h.name}: {message}") from None
        raise RequestError("config", f"config: {message}") from None


def _model_section(model: dict, models_dir: Path) -> dict:
    if model["id"] == "tiny":
        return {}
    if model["id"] == "smollm2":
        return {"path": str(models_dir / "smollm2"), "gguf": "smollm2"}
    path = Path(model["path"]).expanduser()
    if not (path / "config.json").is_file():
        raise RequestError("model.path", f"model.path: {model['path']} is not a Hugging Face checkpoint directory "
                           "(no config.json there)")
    return {"path": str(path.resolve())}


def _put(cfg: dict, dotted: str, value: Any) -> None:
    *sections, last = dotted.split(".")
    for s in sections:
        cfg = cfg.setdefault(s, {})
    cfg[last] = value
