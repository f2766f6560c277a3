"""A small seccomp filter (classic BPF, handed to bubblewrap's `--seccomp`): no new user namespaces, less kernel.

Why: run as a throwaway uid on a host that allows unprivileged user namespaces, a program could create its own
user and mount namespaces and, root in there, mount a tmpfs with no size limit (the /tmp scratch bound bypassed;
tried and seen) or reach kernel code that only namespace-root can reach, where most recent local privilege
escalations live. So the filter refuses, with EPERM:

- `unshare` and `clone` with CLONE_NEWUSER (and `clone3` with ENOSYS: its flags sit in memory a filter cannot
  read, and the C library then falls back to `clone`), and `setns`;
- a few interfaces no test program needs and exploits often use: bpf, userfaultfd, perf_event_open, the keyring
  (add_key, request_key, keyctl), io_uring;
- every x32 system call on x86_64; and it kills a process calling through another architecture's table (i386
  `int 0x80` on x86_64), where the numbers above would not hold.

Built for x86_64 and aarch64; other machines get no filter (`build_filter` returns None) and keep the rest.
"""

from __future__ import annotations

import errno
import platform
import struct

_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL_PROCESS, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (arg0's low 32 bits, little-endian)
CLONE_NEWUSER = 0x10000000
_X32_BIT = 0x40000000

# machine -> (AUDIT_ARCH_*, {syscall: number}); numbers from the kernel's syscall tables
_TABLES = {
    "x86_64": (0xC000003E, {"clone": 56, "unshare": 272, "clone3": 435, "setns": 308, "bpf": 321,
                            "userfaultfd": 323, "perf_event_open": 298, "add_key": 248, "request_key": 249,
                            "keyctl": 250, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}),
    "aarch64": (0xC00000B7, {"clone": 220, "unshare": 97, "clone3": 435, "setns": 268, "bpf": 280,
                             "userfaultfd": 282, "perf_event_open": 241, "add_key": 217, "request_key": 218,
                             "keyctl": 219, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}),
}
_FLAG_CHECKED = ("clone", "unshare")
_DENIED = ("setns", "bpf", "userfaultfd", "perf_event_open", "add_key", "request_key", "keyctl", "io_uring_setup",
           "io_uring_enter", "io_uring_register")


def build_filter(machine: str | None = None) -> bytes | None:
    """The filter as bwrap reads it (struct sock_filter entries, native byte order), or None for an unknown
    machine."""
    machine = machine or platform.machine()
    if machine not in _TABLES:
        return None
    arch, nr = _TABLES[machine]
    prog: list[tuple[int, str | int, str | int, int]] = [  # (code, jump if true, jump if false, k); str = label
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ, 0, "kill", arch),
        (_LD_W_ABS, 0, 0, _NR),
    ]
    if machine == "x86_64":
        prog.append((_JGE, "deny", 0, _X32_BIT))
    prog.append((_JEQ, "nosys", 0, nr["clone3"]))
    prog += [(_JEQ, "flags", 0, nr[name]) for name in _FLAG_CHECKED]
    prog += [(_JEQ, "deny", 0, nr[name]) for name in _DENIED]
    labels = {"allow": len(prog)}
    prog.append((_RET, 0, 0, _ALLOW))
    labels["flags"] = len(prog)
    prog += [(_LD_W_ABS, 0, 0, _ARG0), (_JSET, "deny", 0, CLONE_NEWUSER), (_RET, 0, 0, _ALLOW)]
    for label, value in (("deny", _ERRNO | errno.EPERM), ("nosys", _ERRNO | errno.ENOSYS), ("kill", _KILL_PROCESS)):
        labels[label] = len(prog)
        prog.append((_RET, 0, 0, value))

    def offset(i: int, target: str | int) -> int:
        return target if isinstance(target, int) else labels[target] - i - 1

    return b"".join(struct.pack("=HBBI", code, offset(i, jt), offset(i, jf), k)
                    for i, (code, jt, jf, k) in enumerate(prog))
