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
    run as configured: bubblewrap missing and not `allow_unsandboxed`, bubblewrap failing to start here, or limits
    too tight for the interpreter to print one line."""

    def __init__(self, cfg: SandboxConfig):
        self.cfg = cfg
        self.spec = resolve(cfg)
        self.limits = Limits.of(cfg)
        self.max_parallel = min(cfg.max_parallel or os.cpu_count() or 1, MAX_SLOTS)
        self._slots = threading.BoundedSemaphore(self.max_parallel)
        self._executor = ThreadPoolExecutor(self.max_parallel, thread_name_prefix="sandbox")
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
        """Run one trivial program now, so a host where bubblewrap cannot start a sandbox (no user namespaces, an
        old version), or limits too tight for the interpreter itself, fail at set-up rather than on every sample
        (where they would read as the model's failures)."""
        result = self.run("print('ok')")
        if result.status is RunStatus.SANDBOX_ERROR:
            raise SandboxUnavailable(
                f"the {self.spec.kind} sandbox ({self.spec.bwrap or 'no bwrap'}) did not start here "
                f"(exit {result.returncode}): "
                f"{result.stderr.strip()[-500:] or '(no message)'}. It needs bubblewrap >= 0.8 and, not as root, "
                "user namespaces; or set reward.code.sandbox.allow_unsandboxed=true with isolation=rlimits to run "
                "code unisolated")
        if result.status is not RunStatus.OK or result.stdout != "ok\n":
            raise SandboxUnavailable(
                f"print('ok') fails in the sandbox under reward.code.sandbox's limits ({result.status.value}, exit "
                f"{result.returncode}): {result.stderr.strip()[-500:] or '(no message)'}; raise memory_mb, cpu_s "
                "or wall_s")
