"""How a run is isolated: the bubblewrap command line, the throwaway uids, and the refusal without bubblewrap.

With bubblewrap (`bwrap`, Debian's `bubblewrap` package, >= 0.8) a run gets new network, pid, ipc, uts and cgroup
namespaces (only a loopback interface: no network), a root filesystem holding read-only binds of /usr, the /bin and
/lib* links and the interpreter's own prefix (found from `sys.base_prefix` and the real path of the base
executable; its site-packages hidden under an empty read-only tmpfs), the program's directory read-only at /box,
a size-limited tmpfs as /tmp and the working directory (/ and /dev read-only), a fresh /proc and a minimal /dev,
an empty environment (PATH only), no capabilities, a seccomp filter refusing new user namespaces and a few
exploit-prone interfaces (`seccomp`), `--new-session` and `--die-with-parent`. Nothing else of the host is visible: not
$HOME, not the virtual environment, not the other files under /tmp.

As root, bubblewrap runs without a user namespace and keeps only CAP_SETUID/CAP_SETGID for the bootstrap
(`_boot.py`), which drops to a throwaway uid before the program starts: root bypasses RLIMIT_NPROC (and with
uid 0 mapped into a user namespace the count would cover every root process), whereas a uid of its own makes the
limit count exactly the run's processes; the uid owns nothing on the host either. Each run leases one of
`MAX_SLOTS` uids, `UID_BASE + (pid << 8) + slot`: distinct per process, so two jobs on one host never share one.
Not as root, bubblewrap makes a user namespace (`--unshare-all`, nested ones disabled) and the program keeps the
caller's uid; RLIMIT_NPROC then counts the processes of that uid inside the run's user namespace (Linux >= 5.14
counts per namespace), which still bounds a fork bomb.

Without bubblewrap (or `isolation: rlimits`) code runs only behind `allow_unsandboxed`: rlimits, a new session,
an empty environment and a temporary working directory, with a warning logged once per process. That mode
protects from accidents, not from hostile code (see `slime_rl.sandbox`).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import sys
import sysconfig
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from slime_rl.rewards.config import SandboxConfig
from slime_rl.sandbox.seccomp import build_filter

logger = logging.getLogger(__name__)

BOX = "/box"  # the program's directory inside the sandbox
MAX_SLOTS = 256  # runs at once per process (uids leased per run); reward_checks bounds max_parallel by it
UID_BASE = 1 << 30  # clear of system users and of the usual subuid ranges (100000 + 65536 k)
SANDBOX_PATH = "/usr/bin:/bin"
_LINKS_OR_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class SandboxUnavailable(RuntimeError):
    """No sandbox can run here as configured; the message names the field that would change that."""


@dataclass(frozen=True)
class Limits:
    """The rlimits of one run, in the units setrlimit takes."""

    cpu_s: int  # RLIMIT_CPU soft limit, whole seconds (SIGXCPU); the hard limit is one more (SIGKILL)
    memory_bytes: int  # RLIMIT_AS
    max_procs: int  # RLIMIT_NPROC: processes and threads of the run's uid
    file_bytes: int  # RLIMIT_FSIZE, and the size of the /tmp scratch

    @classmethod
    def of(cls, cfg: SandboxConfig) -> "Limits":
        return cls(cpu_s=max(1, -int(-cfg.cpu_s // 1)), memory_bytes=cfg.memory_mb << 20,
                   max_procs=cfg.max_procs, file_bytes=cfg.max_file_mb << 20)


@dataclass(frozen=True)
class RunFds:
    """The pipe ends one run hands to the sandbox (-1: none)."""

    ready: int  # the bootstrap writes one byte once the limits hold
    info: int  # bwrap's --info-fd: the host pid of its child, the pid namespace's init
    seccomp: int  # bwrap's --seccomp: the filter's bytes to read


@dataclass
class SandboxSpec:
    """Everything a run needs that does not change between runs: resolved once per pool."""

    kind: Literal["bwrap", "rlimits"]
    python: str  # the base interpreter's real path (the same path inside the sandbox)
    bwrap: str | None = None
    as_root: bool = False  # runs drop to a leased throwaway uid
    bwrap_fs: list[str] = field(default_factory=list)  # the filesystem arguments, interpreter binds included
    seccomp: bytes | None = None  # the BPF filter (`seccomp.build_filter`); None: this machine has none

    def command(self, mode: str, uid: int, limits: Limits, fds: RunFds, host_dir: str) -> list[str]:
        """The argv launching `_boot.py` on the program in `host_dir` (bound at /box under bwrap)."""
        box = BOX if self.kind == "bwrap" else host_dir
        boot = [self.python, "-I", "-S", f"{box}/_boot.py", mode, str(uid), str(limits.cpu_s),
                str(limits.memory_bytes), str(limits.max_procs), str(limits.file_bytes), str(fds.ready),
                f"{box}/solution.py"]
        if self.kind == "rlimits":
            return boot
        if self.as_root:  # no user namespace: the bootstrap needs setuid/setgid to leave root, nothing else
            ns = ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                  "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            ns = ["--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
        if fds.seccomp >= 0:
            ns += ["--seccomp", str(fds.seccomp)]
        return [self.bwrap, *ns, "--info-fd", str(fds.info), "--hostname", "sandbox", "--die-with-parent",
                "--new-session", "--clearenv", "--setenv", "PATH", SANDBOX_PATH, *self.bwrap_fs,
                "--ro-bind", host_dir, BOX, "--size", str(limits.file_bytes), "--perms", "1777", "--tmpfs", "/tmp",
                "--remount-ro", "/dev", "--remount-ro", "/",  # in a user namespace the run would own both
                "--chdir", "/tmp", "--", *boot]


def find_bwrap() -> str | None:
    """The bubblewrap executable on PATH (tests replace this to simulate a host without it)."""
    return shutil.which("bwrap")


def base_interpreter() -> tuple[str, str]:
    """(real path of the base interpreter, real path of its prefix): not the virtual environment's."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return exe, os.path.realpath(sys.base_prefix)


def interpreter_binds(exe: str, prefix: str) -> list[str]:
    """bwrap arguments giving a read-only view of the system libraries and of the interpreter, nothing more."""
    args = ["--ro-bind", "/usr", "/usr"]
    bound = ["/usr"]
    for path in _LINKS_OR_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
            bound.append(path)
    args += ["--proc", "/proc", "--dev", "/dev"]
    roots = [prefix] if _under(exe, prefix) else [prefix, os.path.dirname(exe)]
    for root in roots:
        if any(_under(root, b) for b in bound):
            continue
        for parent in reversed(Path(root).parents[:-1]):  # mount points readable by the throwaway uid
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", root, root]
        bound.append(root)
    base = {"base": prefix, "platbase": prefix}
    for lib in sorted({sysconfig.get_path("purelib", vars=base), sysconfig.get_path("platlib", vars=base)}):
        if os.path.isdir(lib) and _under(lib, prefix):  # the base install's packages: hidden, read-only, empty
            args += ["--perms", "0555", "--size", "4096", "--tmpfs", lib, "--remount-ro", lib]
    return args


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve(cfg: SandboxConfig) -> SandboxSpec:
    """The sandbox `cfg` asks for, or SandboxUnavailable naming `reward.code.sandbox.allow_unsandboxed`."""
    exe, prefix = base_interpreter()
    as_root = os.geteuid() == 0
    if cfg.isolation == "bwrap":
        bwrap = find_bwrap()
        if bwrap is not None:
            return SandboxSpec("bwrap", exe, bwrap=bwrap, as_root=as_root, bwrap_fs=interpreter_binds(exe, prefix),
                               seccomp=build_filter())
        why = "bubblewrap (bwrap) is not on PATH"
        if not cfg.allow_unsandboxed:
            raise SandboxUnavailable(
                f"{why}: model-written code will not run without it. Install it (`apt-get install bubblewrap`; "
                "`make install` does as root), or set reward.code.sandbox.allow_unsandboxed=true to run it with "
                "rlimits only (NOT isolated: it can read your files and use the network)")
    else:
        why = "reward.code.sandbox.isolation=rlimits"
        if not cfg.allow_unsandboxed:
            raise SandboxUnavailable(
                f"{why} runs model-written code without isolation; set reward.code.sandbox.allow_unsandboxed=true "
                "to accept that, or use isolation=bwrap")
    warn_unsandboxed(why)
    return SandboxSpec("rlimits", exe, as_root=False)


_warned = threading.Event()


def warn_unsandboxed(why: str) -> None:
    """Log, once per process, that model code runs without isolation."""
    if _warned.is_set():
        return
    _warned.set()
    logger.warning(
        "!!! UNSANDBOXED CODE EXECUTION (%s; reward.code.sandbox.allow_unsandboxed=true): model-written programs run "
        "as %s with rlimits only: they can read every file this user can, reach the network, and leave processes "
        "behind. Use it only on a machine you can throw away. !!!", why, "ROOT" if os.geteuid() == 0 else "this user")


class UidLeases:
    """Throwaway uids, one per run in flight, shared by every pool of the process."""

    def __init__(self, base: int, count: int, pid: int):
        self.base, self.count = base, count  # uids base .. base + count - 1
        self.pid = pid  # the process the range belongs to
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(count):
            self._free.put(base + slot)

    def acquire(self) -> int:
        return self._free.get()

    def release(self, uid: int) -> None:
        self._free.put(uid)


_leases: UidLeases | None = None
_leases_lock = threading.Lock()


def uid_leases() -> UidLeases:
    """The process's uid range, made on first use (after a fork the child gets a range of its own pid)."""
    global _leases
    with _leases_lock:
        pid = os.getpid()
        if _leases is None or _leases.pid != pid:
            _leases = UidLeases(UID_BASE + ((pid & 0x3FFFFF) << 8), MAX_SLOTS, pid)
        return _leases
