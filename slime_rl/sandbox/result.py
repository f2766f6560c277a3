"""The outcome of one sandboxed run: a status enum and what the program printed."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RunStatus(str, enum.Enum):
    OK = "ok"  # exited 0
    COMPILE_ERROR = "compile_error"  # check mode: the program does not compile (SyntaxError, null bytes)
    RUNTIME_ERROR = "runtime_error"  # exited non-zero (an uncaught exception, sys.exit(n))
    TIMEOUT = "timeout"  # past the wall limit, or killed by RLIMIT_CPU (SIGXCPU)
    MEMORY = "memory"  # died of MemoryError (RLIMIT_AS)
    OUTPUT_LIMIT = "output_limit"  # printed more than max_output_kb: killed
    KILLED = "killed"  # died of a signal it did not get from a limit (SIGKILL to itself, SIGSEGV, ...)
    SANDBOX_ERROR = "sandbox_error"  # the sandbox did not start: the program never ran (not the model's fault)


@dataclass
class RunResult:
    """One run of one program on one stdin.

    `stdout` / `stderr` hold at most `max_output_kb` KiB together (decoded UTF-8, bad bytes replaced);
    `returncode` is the program's exit status (a signal `s` reads 128 + s), None when it was killed at a limit;
    `elapsed_s` is wall-clock seconds from launching the sandbox to its exit, the sandbox start included.
    """

    status: RunStatus
    returncode: int | None
    stdout: str
    stderr: str
    elapsed_s: float
    signal: int | None = None  # the signal that ended the program, if one did

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.OK
