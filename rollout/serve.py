"""`slime-rl serve`: load an HF model into the embedded engine and serve it over HTTP
(`rollout.server.create_app`) until SIGINT/SIGTERM.

`ServeConfig` is the command's whole surface: the CLI makes one flag per field
(the field's comment is the flag's help), `ServeConfig.validate` checks every
value before anything loads, and a bad value or a checkpoint that does not load
is a `ServeConfigError` naming the flag. Shutdown is bounded: a request thread
stuck in a blocking call (say, a weight-group rendezvous with a dead peer)
cannot keep the process alive after SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rollout.http_conn import serve_until_signal
from rollout.limits import ServerLimits
from rollout.server import create_app, make_runner

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What slime_rl.tokenizer.load_tokenizer recognizes in a directory.
TOKENIZER_FILES = ("char_tokenizer.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
ENGINE_CLOSE_TIMEOUT_S = 5.0  # engine.close() waits for its lock, which a stuck weight update may hold
THREAD_JOIN_GRACE_S = 1.0  # idle request threads wind down well within this after the executor shuts down


class ServeConfigError(ValueError):
    """A `slime-rl serve` setting that cannot work; the message starts with the flag."""


@dataclass
class ServeConfig:
    """Settings of `slime-rl serve`: one flag per field (`--field-name`), the comment is its help."""

    model: str  # HF checkpoint directory: config.json + *.safetensors
    tokenizer: str | None = None  # tokenizer directory or 'char' (default: the model dir's tokenizer, else char)
    host: str = "127.0.0.1"  # address to listen on; beyond loopback it needs --api-key or --allow-unauthenticated
    port: int = 30000  # 0 = any free port (the printed line says which)
    api_key: str | None = None  # every route but /health needs 'Authorization: Bearer KEY'
    max_running_requests: int = 64  # requests decoding at once
    max_total_tokens: int | None = None  # KV pool size in tokens (default: what 256 MiB holds)
    page_size: int = 1  # tokens per KV page
    disable_radix_cache: bool = False  # no prefix cache
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights and KV cache
    device: str = "cpu"  # cpu, cuda or cuda:N
    served_model_name: str | None = None  # model name in OpenAI responses (default: the model path)
    seed: int = 0  # sampling seed
    num_threads: int | None = None  # torch threads (default: every core this process may use)
    admin_api_key: str | None = None  # when set, weight and control routes need this key, not --api-key's
    allow_unauthenticated: bool = False  # serve a non-loopback host without an api key (warns)
    allow_nonfinite_weights: bool = False  # accept weight updates holding NaN / inf
    limits: ServerLimits = field(default_factory=ServerLimits)

    def validate(self) -> "ServeConfig":
        """Raise ServeConfigError naming the first flag whose value cannot work; returns self."""
        problem = _model_dir_problem(self.model)
        if problem:
            raise ServeConfigError(f"--model {self.model}: {problem}")
        min_tokens = max(2, self.page_size)  # a 1-token prompt and one new token, in whole pages
        checks = [
            ("--host", bool(self.host.strip()), "an address or host name"),
            ("--port", 0 <= self.port <= 65535, "in 0..65535 (0 = any free port)"),
            ("--api-key", _key_ok(self.api_key), "a non-blank key without surrounding whitespace "
             "(an empty key would turn authentication off; check $SLIME_RL_API_KEY)"),
            ("--admin-api-key", _key_ok(self.admin_api_key), "a non-blank key without surrounding whitespace "
             "(check $SLIME_RL_ADMIN_API_KEY)"),
            ("--max-running-requests", self.max_running_requests >= 1, ">= 1"),
            ("--page-size", self.page_size >= 1, ">= 1"),
            ("--num-threads", self.num_threads is None or self.num_threads >= 1, ">= 1"),
            ("--max-total-tokens", self.max_total_tokens is None or self.max_total_tokens >= min_tokens,
             f">= {min_tokens} (room for a 1-token prompt and one new token in pages of --page-size "
             f"{self.page_size})"),
            ("--dtype", self.dtype in DTYPES, f"one of {', '.join(DTYPES)}"),
        ]
        for flag, ok, rule in checks:
            if not ok:
                raise ServeConfigError(f"{flag} must be {rule}, got {getattr(self, flag[2:].replace('-', '_'))!r}")
        problem = _device_problem(self.device)
        if problem:
            raise ServeConfigError(f"--device {self.device!r}: {problem}")
        if not (is_loopback(self.host) or self.api_key is not None or self.allow_unauthenticated):
            raise ServeConfigError(
                f"--host {self.host} is not a loopback address and no --api-key is set, so anyone who can reach it "
                "could use it; set --api-key (or $SLIME_RL_API_KEY), or pass --allow-unauthenticated to serve it "
                "without authentication anyway")
        try:
            self.limits.validate()
        except ValueError as exc:
            raise ServeConfigError(str(exc)) from None
        return self


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key_ok(key: str | None) -> bool:
    # HTTP strips the whitespace around a header value, so no client could match such a key.
    return key is None or (key.strip() != "" and key == key.strip())


def _device_problem(device: str) -> str | None:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        return f"not a device torch knows ({exc})"
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return "the embedded engine runs on cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        return "CUDA is not available here (torch.cuda.is_available() is False)"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def _model_dir_problem(path: str) -> str | None:
    if not os.path.isdir(path):
        return "not a directory"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return "no config.json (expected an HF checkpoint directory)"
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        return "no *.safetensors weight files"
    return None


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _load(cfg: ServeConfig) -> tuple[Any, Any, str]:
    """(engine, tokenizer, tokenizer spec) for a validated config."""
    from rollout.engine import EmbeddedEngine
    from slime_rl.tokenizer import load_tokenizer

    model_dir = os.path.abspath(cfg.model)
    has_files = any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES)
    tokenizer_spec = cfg.tokenizer or (model_dir if has_files else "char")
    # A junk checkpoint or tokenizer fails in many ways (JSON, safetensors, KeyError, a 0 head count...); every one
    # is the directory's fault, so it is one line naming the flag (`slime-rl --debug serve` shows the traceback).
    try:
        tokenizer = load_tokenizer(tokenizer_spec)
    except Exception as exc:  # noqa: BLE001
        raise ServeConfigError(f"--tokenizer {tokenizer_spec}: cannot load: {_one_line(exc)}") from exc
    try:
        engine = EmbeddedEngine.from_pretrained(
            model_dir, device=cfg.device, dtype=DTYPES[cfg.dtype], max_batch_size=cfg.max_running_requests,
            seed=cfg.seed, max_total_tokens=cfg.max_total_tokens, page_size=cfg.page_size,
            enable_prefix_cache=not cfg.disable_radix_cache, tokenizer=tokenizer,
            reject_nonfinite_weights=not cfg.allow_nonfinite_weights,
        )
    except Exception as exc:  # noqa: BLE001
        raise ServeConfigError(f"--model {model_dir}: cannot load: {_one_line(exc)}") from exc
    return engine, tokenizer, tokenizer_spec


def serve_main(cfg: ServeConfig) -> int:
    """Validate, load the model, serve it until SIGINT/SIGTERM, close the engine. Returns the exit code;
    a bad setting or a checkpoint that does not load raises ServeConfigError."""
    cfg.validate()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.api_key is None and not is_loopback(cfg.host):
        print(f"slime-rl serve: WARNING: --host {cfg.host} is not a loopback address and there is no --api-key "
              "(--allow-unauthenticated): the server is reachable without authentication", file=sys.stderr, flush=True)
    threads_before = set(threading.enumerate())
    from slime_rl.threads import apply_to_this_process, available_cores

    apply_to_this_process(cfg.num_threads or available_cores())
    engine, tokenizer, tokenizer_spec = _load(cfg)
    model_dir = os.path.abspath(cfg.model)
    try:
        app = create_app(engine, tokenizer, model_path=model_dir, tokenizer_path=str(tokenizer_spec),
                         served_model_name=cfg.served_model_name, api_key=cfg.api_key,
                         admin_api_key=cfg.admin_api_key, limits=cfg.limits)
        n_params = sum(p.numel() for p in engine.model.parameters())
        banner = f"model {model_dir}, {n_params} parameters, tokenizer {tokenizer_spec}"
        # Everything loaded so far lives as long as the server: keep it out of the garbage collector's
        # full passes, which hold the GIL (hundreds of ms over torch + transformers) and would stall /health.
        gc.collect()
        gc.freeze()
        # Threads parsing or shaping large requests hand the GIL over every 1 ms instead of 5 ms, so the
        # event loop waits little for it even when several of them are busy.
        sys.setswitchinterval(0.001)
        code = asyncio.run(serve_until_signal(make_runner(app), cfg.host, cfg.port, "slime-rl serve", banner,
                                                 ServeConfigError))
    finally:
        closed = _close_within(engine, ENGINE_CLOSE_TIMEOUT_S)
    _exit_now_if_stuck(threads_before, code, closed)
    return code


def _close_within(engine: Any, timeout_s: float) -> bool:
    """engine.close() on a daemon thread; False when it had not returned after `timeout_s`."""
    closer = threading.Thread(target=engine.close, name="engine-close", daemon=True)
    closer.start()
    closer.join(timeout_s)
    if closer.is_alive():
        log.warning("engine.close() has not returned after %.0f s", timeout_s)
    return not closer.is_alive()


def _exit_now_if_stuck(threads_before: set[threading.Thread], code: int, closed: bool) -> None:
    """Leave with os._exit(code) when a thread serving started is still running: the interpreter would wait for
    it at exit (executor threads are joined), and a call blocked on a dead peer may not return for minutes."""
    deadline = time.monotonic() + THREAD_JOIN_GRACE_S
    stuck = []
    for thread in threading.enumerate():
        if thread in threads_before or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            stuck.append(thread.name)
    if not stuck and closed:
        return
    log.warning("still running after shutdown: %s; exiting without waiting for them",
                ", ".join(stuck + ([] if closed else ["engine.close()"])))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
