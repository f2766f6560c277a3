"""A pool of sandboxed runs: at most `max_parallel` at once, shared by every thread that calls it.

`run` blocks for one run; `run_many` fans a list of runs out over the pool's threads and returns the results in
order. Both wait for a slot, so the bound holds whatever mix of callers there is (the reward runner's worker
threads each scoring a sample, each sample running its test cases through `run_many`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from slime_rl.rewards.config import SandboxConfig
from slime_rl.sandbox.isolation import MAX_SLOTS, Limits, SandboxUnavailable, resolve, uid_leases
from slime_rl.sandbox.result import RunResult, RunStatus
from slime_rl.sandbox.run import run_program


class SandboxPool:
    """Sandboxed runs under one `SandboxConfig`. Raises SandboxUnavailable at construction when no sandbox can
    run as configured (bubblewrap missing and not `allow_unsandboxed`, or bubblewrap failing to start here)."""

    def __init__(self, cfg: SandboxConfig):
        self.cfg = cfg
        self.spec = resolve(cfg)
        self.limits = Limits.of(cfg)
        self.max_parallel = min(cfg.max_parallel or os.cpu_count() or 1, MAX_SLOTS)
        self._slots = threading.BoundedSemaphore(self.max_parallel)
        self._executor = ThreadPoolExecutor(self.max_parallel, thread_name_prefix="sandbox")
        if self.spec.kind == "bwrap":
            self._probe()

    def run(self, program: str, stdin: str = "", mode: str = "run") -> RunResult:
        """One run of `program` on `stdin` (mode "check": compile only), once a slot is free."""
        with self._slots:
            leases = uid_leases() if self.spec.as_root else None
            uid = leases.acquire() if leases else -1
            try:
                return run_program(self.spec, self.limits, program, stdin, mode=mode, uid=uid,
                                   wall_s=self.cfg.wall_s, max_output_bytes=self.cfg.max_output_kb << 10)
            finally:
                if leases:
                    leases.release(uid)

    def check(self, program: str) -> RunResult:
        """Compile `program` inside the sandbox: OK, or COMPILE_ERROR with the SyntaxError on stderr."""
        return self.run(program, mode="check")

    def run_many(self, jobs: Sequence[tuple[str, str]]) -> list[RunResult]:
        """Run every (program, stdin) in parallel on the pool; results in the order of `jobs`."""
        if len(jobs) == 1:
            return [self.run(*jobs[0])]
        futures = [self._executor.submit(self.run, program, stdin) for program, stdin in jobs]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def _probe(self) -> None:
        """Start one sandbox now, so a host where bubblewrap cannot (no user namespaces, an old version) fails at
        set-up with bubblewrap's own message rather than on every sample."""
        result = self.check("pass")
        if result.status is not RunStatus.OK:
            raise SandboxUnavailable(
                f"bubblewrap ({self.spec.bwrap}) could not start a sandbox here ({result.status.value}, exit "
                f"{result.returncode}): {result.stderr.strip()[-500:] or '(no message)'}. It needs user namespaces "
                "(not as root) and bubblewrap >= 0.8; or set reward.code.sandbox.allow_unsandboxed=true with "
                "isolation=rlimits to run code unisolated")
