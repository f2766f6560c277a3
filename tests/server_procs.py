"""`slime_rl serve` subprocesses for tests: launch, wait until healthy, kill or stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from rollout.router import free_port, http_json
from slime_rl.dist_group import init_weight_group

SERVE_CMD = [sys.executable, "-m", "slime_rl", "serve"]
START_TIMEOUT_S = 60


def http(method: str, url: str, body: Any = None, headers: dict | None = None, raw: bytes | None = None,
         timeout: float = 60) -> tuple[int, Any]:
    """(status, parsed JSON body or text)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read().decode()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload


def post(url: str, body: Any = None, **kw) -> tuple[int, Any]:
    return http("POST", url, body, **kw)


@dataclass
class ServerProc:
    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    version: int = 0  # the weight version stamped on it: identifies the server in meta_info

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def kill(self) -> None:
        """SIGKILL the server's whole process group (no goodbye to the router)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def launch_server(name: str, model_dir: Path, log_dir: Path, *extra_args: str) -> ServerProc:
    port = free_port()
    log_path = log_dir / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*SERVE_CMD, "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                                 *extra_args],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    return ServerProc(name, f"http://127.0.0.1:{port}", proc, log_path)


@contextlib.contextmanager
def serving(engine: Any, tokenizer: Any = None, **app_kwargs: Any) -> Iterator[str]:
    """An in-process `BackgroundServer(engine, tokenizer, **app_kwargs)`; yields its URL, then stops it
    and closes the engine."""
    from rollout.server import BackgroundServer

    server = BackgroundServer(engine, tokenizer, **app_kwargs)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()
        engine.close()


def wait_healthy(server: ServerProc, deadline: float) -> None:
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server {server.name} ({server.url}) exited with {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            if http_json("GET", server.url + "/health", timeout_s=2)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server {server.name} ({server.url}) not healthy in time:\n{server.log_tail()}")
        time.sleep(0.1)


def launch_versioned(names, model_dir: Path, log_dir: Path, procs: dict[str, ServerProc]) -> None:
    """Start a server per name into `procs` (the caller stops them), wait until all are healthy, and give the
    i-th weight version i (from 1): every /generate answer then says which server produced it."""
    for name in names:
        procs[name] = launch_server(name, model_dir, log_dir)
    deadline = time.monotonic() + START_TIMEOUT_S
    for version, server in enumerate(procs.values(), start=1):
        wait_healthy(server, deadline)
        status, body = http_json("POST", server.url + "/update_weight_version", {"new_version": str(version)})
        assert status == 200 and body["success"], (server.name, body)
        server.version = version


@contextlib.contextmanager
def weight_group_with(url: str, post: Callable[[str, Any], tuple[int, Any]], group_name: str = "g"):
    """This process as rank 0 of a gloo weight group with the server at `url` (rank 1).

    Yields (group, call, results): `call(path, body)` posts from a background thread (a distributed
    update blocks until this process broadcasts) and its (status, body) lands in results[path].
    """
    port, results = free_port(), {}

    def call(path: str, body: dict) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.__setitem__(path, post(url + path, body)))
        thread.start()
        return thread

    thread = call("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": port,
                                                  "rank_offset": 1, "world_size": 2, "group_name": group_name,
                                                  "backend": "gloo"})
    group = init_weight_group("127.0.0.1", port, 0, 2, group_name=group_name, timeout_s=60)
    try:
        thread.join(60)
        assert results["/init_weights_update_group"][0] == 200, results
        yield group, call, results
    finally:
        post(url + "/destroy_weights_update_group", {"group_name": group_name})
        group.destroy()
