"""`slime_rl serve` subprocesses for tests: launch, wait until healthy, kill or stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rollout.router import free_port, http_json

SERVE_CMD = [sys.executable, "-m", "slime_rl", "serve"]
START_TIMEOUT_S = 60


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
