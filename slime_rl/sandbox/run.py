"""Run one Python program on one stdin inside the sandbox (`isolation.SandboxSpec`), under a wall clock.

The program and the bootstrap go to a fresh host directory (bound read-only at /box, owned by the run's uid),
stdin comes from an unlinked temporary file, stdout and stderr are read as they come, 64 KiB at a time, and at most
`max_output_bytes` of them together are kept: one byte more and the run is killed, so a program printing a gigabyte
costs a few milliseconds and that many bytes of host memory. At the wall limit (or the output limit) the run is
killed with SIGKILL: under bubblewrap its pid namespace's init first, so the kernel kills every process left in
the namespace (daemons included) before bubblewrap reports the exit, then the process group. A run that ends by
itself ends the same way: when the program exits, so does the namespace's init, and everything it left behind.
The host directory is removed afterwards, whatever happened.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from slime_rl.sandbox import _boot
from slime_rl.sandbox.isolation import SANDBOX_PATH, Limits, RunFds, SandboxSpec
from slime_rl.sandbox.result import RunResult, RunStatus

_BOOT_SOURCE = Path(_boot.__file__).read_bytes()
_READ_CHUNK = 65536
_TEARDOWN_S = 10.0  # bwrap exits once the killed namespace is reaped; this long at most before it is killed too


def run_program(spec: SandboxSpec, limits: Limits, program: str, stdin: str = "", *, mode: str = "run",
                uid: int = -1, wall_s: float = 5.0, max_output_bytes: int = 1 << 20) -> RunResult:
    """Run (mode "run") or only compile (mode "check") `program` in the sandbox; never raises for what the
    program does. `uid` >= 0: the throwaway uid the run drops to (as root)."""
    host_dir = tempfile.mkdtemp(prefix="slime-sandbox-")
    ready_r, ready_w = os.pipe()  # the bootstrap's byte: the limits hold, the program starts
    info_r, info_w = os.pipe()  # bwrap's --info-fd: the host pid of the namespace's init
    seccomp_r, seccomp_w = os.pipe()  # bwrap's --seccomp: the filter, read once at start
    open_fds = {ready_r, ready_w, info_r, info_w, seccomp_r, seccomp_w}

    def close(fd: int) -> None:
        open_fds.discard(fd)
        os.close(fd)

    try:
        _write_box(host_dir, program, uid)
        if spec.seccomp is not None:
            os.write(seccomp_w, spec.seccomp)  # a few hundred bytes: fits the pipe's buffer
        close(seccomp_w)
        bwrap = spec.kind == "bwrap"  # under rlimits the program itself would inherit bwrap's pipes: none
        fds = RunFds(ready=ready_w, info=info_w if bwrap else -1,
                     seccomp=seccomp_r if bwrap and spec.seccomp is not None else -1)
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode("utf-8", errors="replace"))
            stdin_file.seek(0)
            start = time.monotonic()
            proc = subprocess.Popen(
                spec.command(mode, uid, limits, fds, host_dir), stdin=stdin_file, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, pass_fds=[fd for fd in (fds.ready, fds.info, fds.seccomp) if fd >= 0],
                env={"PATH": SANDBOX_PATH}, cwd=host_dir, start_new_session=True)
            for fd in (ready_w, info_w, seccomp_r):
                close(fd)
            out, err, limit_hit = _pump(proc, start + wall_s, max_output_bytes, info_r if bwrap else -1)
            elapsed = time.monotonic() - start
        started = _read_nonblocking(ready_r) == b"R"
        return _result(spec, mode, proc.returncode, out, err, limit_hit, started, elapsed)
    finally:
        for fd in list(open_fds):
            close(fd)
        _remove(host_dir)


def _write_box(host_dir: str, program: str, uid: int) -> None:
    """solution.py readable by the run's uid only; _boot.py by anyone (the bootstrap reads it as a root without
    CAP_DAC_OVERRIDE); the directory traversable, not listable, by others."""
    for name, data, mode in (("solution.py", program.encode("utf-8", errors="replace"), 0o400),
                             ("_boot.py", _BOOT_SOURCE, 0o444)):
        path = os.path.join(host_dir, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        if uid >= 0 and name == "solution.py":
            os.chown(path, uid, uid)
    if uid >= 0:
        os.chown(host_dir, uid, uid)
    os.chmod(host_dir, 0o511 if uid >= 0 else 0o700)


def _pump(proc: subprocess.Popen, deadline: float, cap: int, info_fd: int) -> tuple[bytes, bytes, RunStatus | None]:
    """Read stdout and stderr until both close and the process exits, or a limit kills it (`info_fd`: bwrap's
    --info-fd, -1 under rlimits).

    Returns (stdout, stderr, TIMEOUT / OUTPUT_LIMIT when a limit killed the run else None)."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    kept = {out_fd: bytearray(), err_fd: bytearray()}
    total = 0
    limit_hit: RunStatus | None = None
    with selectors.DefaultSelector() as sel:
        for fd in kept:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and limit_hit is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                limit_hit = RunStatus.TIMEOUT
                break
            for key, _ in sel.select(remaining):
                data = os.read(key.fd, _READ_CHUNK)
                if not data:
                    sel.unregister(key.fd)
                    continue
                kept[key.fd] += data[:max(0, cap - total)]
                total += len(data)
                if total > cap:
                    limit_hit = RunStatus.OUTPUT_LIMIT
                    break
    if limit_hit is None:
        try:  # both pipes closed; the program may still run (it closed them itself)
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            limit_hit = RunStatus.TIMEOUT
    if limit_hit is not None:
        _kill(proc, info_fd)
    proc.stdout.close()
    proc.stderr.close()
    return bytes(kept[out_fd]), bytes(kept[err_fd]), limit_hit


def _kill(proc: subprocess.Popen, info_fd: int) -> None:
    """SIGKILL the sandbox and return once every process in it is gone.

    Under bwrap the namespace's init is killed first: its parent (bwrap) reaps it only after the kernel has
    killed and reaped every other process of the pid namespace, and then exits; killing bwrap first would leave
    that teardown running after this returns. Then the process group (bwrap itself; the program under rlimits)."""
    found = re.search(rb'"child-pid":\s*(\d+)', _read_nonblocking(info_fd, 4096)) if info_fd >= 0 else None
    if found and proc.poll() is None:  # bwrap alive: its child's pid is still that child's
        try:
            os.kill(int(found.group(1)), signal.SIGKILL)
            proc.wait(timeout=_TEARDOWN_S)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read_nonblocking(fd: int, n: int = 1) -> bytes:
    """What a pipe holds now (b"" when nothing was written)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, n)
    except BlockingIOError:  # a writer still holds it open but wrote nothing
        return b""


def _result(spec: SandboxSpec, mode: str, rc: int, out: bytes, err: bytes, limit_hit: RunStatus | None,
            started: bool, elapsed: float) -> RunResult:
    stdout, stderr = out.decode("utf-8", errors="replace"), err.decode("utf-8", errors="replace")
    if limit_hit is not None:
        return RunResult(limit_hit, None, stdout, stderr, elapsed)
    if not started:
        return RunResult(RunStatus.SANDBOX_ERROR, rc, stdout, stderr, elapsed)
    # bwrap reports a child killed by signal s as exit status 128 + s; Popen as -s
    sig = -rc if rc < 0 else (rc - 128 if spec.kind == "bwrap" and 128 < rc < 128 + 65 else None)
    code = 128 + sig if sig is not None else rc
    if sig == signal.SIGXCPU:
        status = RunStatus.TIMEOUT
    elif sig is not None:
        status = RunStatus.KILLED
    elif rc == 0:
        status = RunStatus.OK
    elif mode == "check" and rc == _boot.EXIT_SYNTAX:
        status = RunStatus.COMPILE_ERROR
    elif "MemoryError" in stderr[-2000:]:
        status = RunStatus.MEMORY
    else:
        status = RunStatus.RUNTIME_ERROR
    return RunResult(status, code, stdout, stderr, elapsed, signal=sig)


def _remove(host_dir: str) -> None:
    """Remove the run's directory; a program running as the caller (rlimits mode) may have locked parts of it."""
    try:
        shutil.rmtree(host_dir)
    except OSError:
        for root, dirs, _ in os.walk(host_dir):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700)
        os.chmod(host_dir, 0o700)
        shutil.rmtree(host_dir)
