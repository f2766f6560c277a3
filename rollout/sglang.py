"""Launch real SGLang servers (`python -m sglang.launch_server`) for GPU rollouts.

Targets SGLang 0.5.x (PyPI has 0.5.23). A launched server speaks the same
HTTP protocol as our embedded server, so it is driven by the same
`rollout.client.EngineClient` (alone, or behind sglang-router).

Engine arguments are not re-declared here: `rollout.sglang_args` (a dict in
the config) passes through to the command line, `{"tp_size": 2,
"mem_fraction_static": 0.8, "enable_metrics": True}` becoming
`--tp-size 2 --mem-fraction-static 0.8 --enable-metrics`. We set the model
path, host and port ourselves, and by default `--skip-server-warmup` (an RL
server is driven by token-id requests right away; the warmup request only
delays startup; pass `skip_server_warmup=False` to keep it).

SGLang needs a GPU; on CPU machines only the command building and process
handling here are exercised (tests use a fake server script).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

RESERVED_FLAGS = ("model-path", "host", "port")  # set by build_sglang_command itself
DEFAULT_ARGS: dict[str, Any] = {"skip_server_warmup": True}
LOG_TAIL_LINES = 40


def _flag(key: str) -> str:
    return "--" + key.strip().lstrip("-").replace("_", "-")


def build_sglang_command(model_path: str, *, host: str = "127.0.0.1", port: int, sglang_args: dict[str, Any] | None = None,
                         python: str = sys.executable) -> list[str]:
    """The argv of `python -m sglang.launch_server` for `model_path` on host:port.

    `sglang_args` keys (with `_` or `-`) become `--key-with-dashes`; True is a
    bare flag, False / None omit the flag, lists repeat values after one flag.
    Keys we set ourselves (model-path, host, port; also the `model` alias) are
    rejected. DEFAULT_ARGS apply unless the same key is given.
    """
    args = dict(DEFAULT_ARGS)
    seen: dict[str, str] = {}
    for key, value in (sglang_args or {}).items():
        flag = _flag(str(key))
        if flag[2:] in RESERVED_FLAGS or flag == "--model":
            raise ValueError(f"sglang_args key {key!r} collides with {flag}, which the launcher sets itself "
                             f"(model path, host and port are arguments of build_sglang_command)")
        if flag in seen:
            raise ValueError(f"sglang_args keys {seen[flag]!r} and {key!r} both mean {flag}")
        seen[flag] = str(key)
        args = {k: v for k, v in args.items() if _flag(k) != flag}
        args[str(key)] = value
    cmd = [python, "-m", "sglang.launch_server", "--model-path", str(model_path), "--host", host, "--port", str(port)]
    for key, value in args.items():
        flag = _flag(key)
        if value is None or value is False:
            continue
        if value is True:
            cmd.append(flag)
        elif isinstance(value, (list, tuple)):
            cmd += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            raise ValueError(f"sglang_args[{key!r}] is a dict; pass JSON-valued flags as a string")
        else:
            cmd += [flag, str(value)]
    return cmd


def log_tail(path: str | Path, n: int = LOG_TAIL_LINES) -> str:
    """The last n lines of a log file ("" when it does not exist)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=n))
    except FileNotFoundError:
        return ""


class SGLangServer:
    """One `sglang.launch_server` process in its own process group, logging to a file.

    `command` overrides the built argv (tests launch a fake server this way).
    """

    def __init__(self, model_path: str, port: int, sglang_args: dict[str, Any] | None = None,
                 host: str = "127.0.0.1", log_path: str | Path | None = None, env: dict[str, str] | None = None,
                 python: str = sys.executable, command: list[str] | None = None):
        self.model_path, self.port, self.host = model_path, port, host
        self.command = command or build_sglang_command(model_path, host=host, port=port,
                                                       sglang_args=sglang_args, python=python)
        self.log_path = Path(log_path) if log_path else Path(f"sglang_{host}_{port}.log")
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"SGLangServer({self.url}, log={str(self.log_path)!r})"

    def start(self, wait: bool = True, timeout_s: float = 600) -> "SGLangServer":
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self} is already running (pid {self.process.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(self.env or {})}
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        if wait:
            try:
                self.wait_healthy(timeout_s)
            except BaseException:
                self.stop()
                raise
        return self

    def _health_ok(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                return 200 <= resp.status < 300
        except (urllib.error.URLError, OSError):  # refused, 503 while starting, timeouts
            return False

    def wait_healthy(self, timeout_s: float = 600) -> None:
        """Poll GET /health with backoff until 200; fail fast if the process exits."""
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            if self._health_ok():
                return
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"SGLang server {self.url} exited with code {code} before becoming healthy; "
                                   f"last {LOG_TAIL_LINES} lines of {self.log_path}:\n{log_tail(self.log_path)}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"SGLang server {self.url} not healthy after {timeout_s} s; last "
                                   f"{LOG_TAIL_LINES} lines of {self.log_path}:\n{log_tail(self.log_path)}")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM the process group, SIGKILL it after timeout_s."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is not None:  # the leader is gone; reap children it left in its group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "SGLangServer":
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch_sglang_servers(model_path: str, n: int, base_port: int, sglang_args: dict[str, Any] | None = None, *,
                          host: str = "127.0.0.1", log_dir: str | Path = ".", env: dict[str, str] | None = None,
                          gpus_per_server: int | None = None, timeout_s: float = 600,
                          python: str = sys.executable) -> list[SGLangServer]:
    """Start n servers on ports base_port.. (in parallel) and wait until all are healthy.

    With `gpus_per_server`, server i gets `--base-gpu-id i * gpus_per_server`
    (match it to tp_size); otherwise placement is the caller's (sglang_args or
    CUDA_VISIBLE_DEVICES in env). On any failure every server started here is
    stopped.
    """
    args = dict(sglang_args or {})
    if gpus_per_server is not None and any(_flag(k) == "--base-gpu-id" for k in args):
        raise ValueError("give either gpus_per_server or sglang_args['base_gpu_id'], not both")
    servers = []
    for i in range(n):
        server_args = args if gpus_per_server is None else {**args, "base_gpu_id": i * gpus_per_server}
        servers.append(SGLangServer(model_path, base_port + i, server_args, host=host, env=env, python=python,
                                    log_path=Path(log_dir) / f"sglang_{base_port + i}.log"))
    try:
        for s in servers:
            s.start(wait=False)
        deadline = time.monotonic() + timeout_s
        for s in servers:
            s.wait_healthy(max(0.0, deadline - time.monotonic()))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers
