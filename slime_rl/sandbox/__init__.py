"""Run model-written Python safely enough to score it: bubblewrap namespaces plus rlimits, a pool of runs.

    pool = SandboxPool(SandboxConfig(cpu_s=2, wall_s=5))
    result = pool.run("print(int(input()) * 2)", stdin="21\\n")   # RunResult(status=OK, stdout="42\\n", ...)
    results = pool.run_many([(program, case_stdin) for case_stdin in inputs])

What a run is kept from (`isolation` has the mechanics): the network (its own network namespace, loopback only);
the host's files (a root of read-only binds of /usr and the interpreter only; writes go to a size-limited tmpfs
that vanishes with the run); the host's environment (emptied, PATH only) and processes (its own pid namespace; as
root it runs as a throwaway uid); the host's resources (RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE,
no core files, a wall clock, a cap on output); and outliving its run (the pid namespace dies with the run).

What it is not: a defence against kernel exploits (the program makes system calls to the host kernel; a seccomp
filter only refuses new user namespaces and a few exploit-prone interfaces, `seccomp`), against side channels
(timing, caches, speculative execution), or against CPU and memory-bandwidth contention with the trainer beyond
the limits above. The interpreter's standard library and everything in /usr are readable. Without bubblewrap
nothing runs unless `reward.code.sandbox.allow_unsandboxed` says so, and then only rlimits stand between the
program and the host.
"""

from slime_rl.sandbox.isolation import Limits, SandboxSpec, SandboxUnavailable, find_bwrap, resolve
from slime_rl.sandbox.pool import SandboxPool
from slime_rl.sandbox.result import RunResult, RunStatus
from slime_rl.sandbox.run import run_program

__all__ = ["Limits", "RunResult", "RunStatus", "SandboxPool", "SandboxSpec", "SandboxUnavailable", "find_bwrap",
           "resolve", "run_program"]
