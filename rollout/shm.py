"""Shared-memory weight-sync files on the server side: which files may be mapped, and their mappings.

A trainer on the same host writes a bucket (`slime_rl.buckets.pack_bucket`
layout) into a file named `slime_rl_wsync_*` (normally under /dev/shm) and
names it in `/update_weights_from_shared_memory`; the server maps it and reads
the tensors as views of the mapping.

The path comes from a client, and the directory may be writable by others
(/dev/shm is), so the name is checked once (`shared_memory_path`, syntax only)
and everything else is checked on the one descriptor that is then mapped:
the file is opened without following a symlink in its last component, must
be a regular, non-empty file with a single link (a hard link could name any
file of the same owner), and is mapped read-only from that descriptor. Nothing
is opened by name twice, so a file swapped in after the check is never read,
and the reader never changes a file (no truncation, no extension, no write).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import warnings

import torch

from rollout.http_json import BadRequest

SHM_PREFIX = "slime_rl_wsync_"  # only files with this basename may be mapped
PATH_MAX = 4096  # Linux's limit; longer paths are refused before they are echoed in a message


def shared_memory_path(path: str) -> str:
    """`path` if its syntax names a weight-sync file (absolute, basename `SHM_PREFIX*`), else
    BadRequest saying why. The file itself is checked when `SharedMemoryMappings.get` opens it."""
    if len(path) > PATH_MAX:
        raise BadRequest(f"shared-memory path is longer than {PATH_MAX} characters")
    if not os.path.isabs(path):
        raise BadRequest(f"shared-memory path must be absolute, got {path!r}")
    if not os.path.basename(path).startswith(SHM_PREFIX) or "\0" in path:
        raise BadRequest(f"refusing to map {path!r}: only weight-sync files whose name starts with "
                         f"{SHM_PREFIX!r} may be mapped")
    return path


def open_weight_file(path: str) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the weight-sync file `path` and its fstat, after the checks in the
    module docstring; BadRequest naming the path and the rule otherwise. The caller closes it."""
    shared_memory_path(path)
    directory, name = os.path.split(path)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise BadRequest(f"shared-memory file {path!r} does not exist: cannot open its directory "
                         f"({os.strerror(exc.errno)})") from None
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadRequest(f"refusing to map {path!r}: it is a symlink; name the weight-sync file itself") from None
        if exc.errno == errno.ENOENT:
            raise BadRequest(f"shared-memory file {path!r} does not exist") from None
        raise BadRequest(f"cannot open shared-memory file {path!r}: {os.strerror(exc.errno)}") from None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest(f"refusing to map {path!r}: not a regular file")
        if st.st_nlink != 1:
            raise BadRequest(f"refusing to map {path!r}: it has {st.st_nlink} hard links; a weight-sync "
                             f"file must have exactly one")
        if st.st_size == 0:
            raise BadRequest(f"shared-memory file {path!r} is empty")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def map_read_only(fd: int, size: int) -> torch.Tensor:
    """uint8 tensor [size] over a read-only shared mapping of `fd` (the descriptor may be closed after)."""
    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    with warnings.catch_warnings():  # nobody writes through it: the engine copies from it or adopts it
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mapping, dtype=torch.uint8)  # keeps `mapping` alive


class SharedMemoryMappings:
    """Read-only uint8 tensors over shared-memory files, one per path, so repeated syncs do not
    re-fault pages.

    Only the weight endpoints use it, under the server's weight lock. A dropped mapping is
    unmapped once no staged view of it is left. The tensors must never be written.
    """

    def __init__(self) -> None:
        self._maps: dict[str, tuple[tuple[int, int, int], torch.Tensor]] = {}

    def get(self, path: str) -> torch.Tensor:
        """The mapping of the whole file; the file is opened (and checked) every call, and mapped
        again when its device, inode or size differs from the cached mapping's. BadRequest when
        the file breaks a rule (module docstring)."""
        fd, st = open_weight_file(path)
        try:
            ident = (st.st_dev, st.st_ino, st.st_size)
            cached = self._maps.get(path)
            if cached is None or cached[0] != ident:
                self._maps[path] = (ident, map_read_only(fd, st.st_size))
        finally:
            os.close(fd)
        return self._maps[path][1]

    def release(self, path: str | None = None) -> int:
        """Drop the mapping of `path` (all when None); how many were dropped."""
        paths = list(self._maps) if path is None else [path] if path in self._maps else []
        for p in paths:
            del self._maps[p]
        return len(paths)
