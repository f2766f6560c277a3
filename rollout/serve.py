"""`slime-rl serve`: load an HF model into the embedded engine and serve it over HTTP
(`rollout.server.create_app`) until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

import torch
from aiohttp import web

from rollout.limits import ServerLimits
from rollout.server import create_app, make_runner

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What slime_rl.tokenizer.load_tokenizer recognizes in a directory.
TOKENIZER_FILES = ("char_tokenizer.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ServeConfig:
    """Settings of `slime-rl serve` (one flag per field, same names)."""

    model: str  # HF directory: config.json + *.safetensors
    tokenizer: str | None = None  # None: the model dir if it has tokenizer files, else "char"
    host: str = "127.0.0.1"
    port: int = 30000  # 0 = any free port (the printed line says which)
    api_key: str | None = None
    max_running_requests: int = 64
    max_total_tokens: int | None = None
    page_size: int = 1
    disable_radix_cache: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    served_model_name: str | None = None
    seed: int = 0
    admin_api_key: str | None = None  # when set, weight and control routes need this key instead of api_key
    allow_unauthenticated: bool = False  # serve a non-loopback host without an api key (warns)
    allow_nonfinite_weights: bool = False  # accept weight updates holding NaN / inf
    limits: ServerLimits = field(default_factory=ServerLimits)


def _model_dir_problem(path: str) -> str | None:
    if not os.path.isdir(path):
        return "not a directory"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return "no config.json (expected an HF checkpoint directory)"
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        return "no *.safetensors weight files"
    return None


async def _serve_until_signal(app: web.Application, cfg: ServeConfig, banner: str) -> int:
    runner = make_runner(app)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, cfg.host, cfg.port).start()
        except OSError as exc:
            print(f"slime-rl serve: cannot listen on {cfg.host}:{cfg.port}: {exc}", file=sys.stderr)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        port = runner.addresses[0][1]
        print(f"slime-rl serve: listening on http://{cfg.host}:{port} ({banner})", flush=True)
        await stop.wait()
        print("slime-rl serve: shutting down", flush=True)
        return 0
    finally:
        await runner.cleanup()


def serve_main(cfg: ServeConfig) -> int:
    """Load the model, serve it until SIGINT/SIGTERM, close the engine. Returns the exit code."""
    from rollout.engine import EmbeddedEngine
    from slime_rl.tokenizer import load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = os.path.abspath(cfg.model)
    problem = _model_dir_problem(model_dir)
    if problem:
        print(f"slime-rl serve: --model {cfg.model}: {problem}", file=sys.stderr)
        return 2
    if cfg.dtype not in DTYPES:
        print(f"slime-rl serve: --dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}", file=sys.stderr)
        return 2
    has_files = any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES)
    tokenizer_spec = cfg.tokenizer or (model_dir if has_files else "char")
    try:
        tokenizer = load_tokenizer(tokenizer_spec)
        engine = EmbeddedEngine.from_pretrained(
            model_dir, device=cfg.device, dtype=DTYPES[cfg.dtype], max_batch_size=cfg.max_running_requests,
            seed=cfg.seed, max_total_tokens=cfg.max_total_tokens, page_size=cfg.page_size,
            enable_prefix_cache=not cfg.disable_radix_cache, tokenizer=tokenizer,
        )
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        print(f"slime-rl serve: cannot load {model_dir} (tokenizer {tokenizer_spec!r}): {exc}", file=sys.stderr)
        return 2
    try:
        app = create_app(engine, tokenizer, model_path=model_dir, tokenizer_path=str(tokenizer_spec),
                         served_model_name=cfg.served_model_name, api_key=cfg.api_key)
        n_params = sum(p.numel() for p in engine.model.parameters())
        banner = f"model {model_dir}, {n_params} parameters, tokenizer {tokenizer_spec}"
        return asyncio.run(_serve_until_signal(app, cfg, banner))
    finally:
        engine.close()
