"""Processes the service starts and must find again after a restart: a job's `slime-rl train`, a deployment's
`slime-rl serve`.

Each runs in its own session (its own process group), so it survives the service's exit and is stopped as a
group. A pid alone is not an identity after a restart (pids are reused), so each is recorded with its start
time from /proc; `alive` checks both. A job runs under `sh -c 'CMD; echo $? > exit_code'`, so its exit
status is on disk even when the service that started it has gone.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

EXIT_FILE = "exit_code"


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    state = fields[0]
    return None if state in ("Z", "X") else fields[19]


def alive(pid: int | None, started: str | None) -> bool:
    return bool(pid) and started is not None and start_time(pid) == started


def spawn(argv: list[str], log_path: Path, cwd: Path, exit_file: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `argv` in a new session with stdout and stderr appended to `log_path`; with `exit_file`, its exit
    status is written there when it ends (through a shell that stays its parent)."""
    cmd = argv
    if exit_file is not None:
        cmd = ["/bin/sh", "-c", f"{shlex.join(argv)}; echo $? > {shlex.quote(str(exit_file))}"]
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def slime_rl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "slime_rl", *args]


def stop(pid: int | None, started: str | None, grace_s: float = 10.0) -> None:
    """SIGTERM to the process's group, SIGKILL after `grace_s` if it is still there."""
    if not alive(pid, started):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and alive(pid, started):
        time.sleep(0.1)
    if alive(pid, started):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def read_exit_code(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int, max_bytes: int = 1 << 20) -> list[str]:
    """The last `lines` lines of a text file (at most its last `max_bytes`)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", "replace").replace("\r", "\n")
    return [line for line in text.split("\n") if line.strip()][-lines:] if lines > 0 else []
