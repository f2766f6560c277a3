"""Runs first inside the sandbox, before any model-written code: drop to the run's uid, set the rlimits, exec.

    python -I -S _boot.py MODE UID CPU_S AS_BYTES NPROC FSIZE_BYTES READY_FD PROGRAM

MODE "run" execs `python -I -S PROGRAM`; MODE "check" only compiles PROGRAM (as the unprivileged uid, under the
limits) and exits 0, or EXIT_SYNTAX with the error on stderr. UID < 0 keeps the current uid (not root, or the
rlimits-only fallback). Once the limits hold, one byte goes to READY_FD and the fd is closed, so the program never
holds it: the host reads that byte as "the sandbox started" (no byte: a set-up failure, not the program's).

The host copies this file into each run's read-only program directory; it is never imported there.
Standard library only.
"""

import os
import resource
import sys

EXIT_SYNTAX = 65  # check mode: the program does not compile
EXIT_SETUP = 70  # privileges not dropped or a limit not set: the program did not run


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) != (uid, uid, uid, uid):
        raise RuntimeError(f"still uid {os.getuid()}/{os.geteuid()} gid {os.getgid()}/{os.getegid()}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise RuntimeError("setuid(0) succeeded after dropping privileges")


def _set_limits(cpu_s: int, as_bytes: int, nproc: int, fsize: int) -> None:
    # soft CPU limit: SIGXCPU; the hard limit one second later: SIGKILL (a program that ignores SIGXCPU)
    for res, soft, hard in ((resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
                            (resource.RLIMIT_AS, as_bytes, as_bytes), (resource.RLIMIT_NPROC, nproc, nproc),
                            (resource.RLIMIT_FSIZE, fsize, fsize)):
        resource.setrlimit(res, (soft, hard))


def main(argv: list) -> None:
    mode, uid, cpu_s, as_bytes, nproc, fsize, ready_fd, program = argv
    try:
        if int(uid) >= 0 and os.getuid() == 0:
            _drop_privileges(int(uid))
        _set_limits(int(cpu_s), int(as_bytes), int(nproc), int(fsize))
    except Exception as e:  # noqa: BLE001 - any failure here means the program must not run
        sys.stderr.write(f"sandbox bootstrap: {type(e).__name__}: {e}\n")
        os._exit(EXIT_SETUP)
    os.write(int(ready_fd), b"R")
    os.close(int(ready_fd))
    if mode == "check":
        with open(program, "rb") as f:
            source = f.read()
        try:
            compile(source, "solution.py", "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as e:  # ValueError: source with null bytes
            sys.stderr.write(f"{type(e).__name__}: {e}\n")
            sys.exit(EXIT_SYNTAX)
        sys.exit(0)
    os.execv(sys.executable, [sys.executable, "-I", "-S", program])


if __name__ == "__main__":
    main(sys.argv[1:])
