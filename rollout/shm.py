"""Shared-memory weight-sync files on the server side: which files may be mapped, and their mappings.

A trainer on the same host writes a bucket (`slime_rl.buckets.pack_bucket`
layout) into a file named `slime_rl_wsync_*` (normally under /dev/shm) and
names it in `/update_weights_from_shared_memory`; the server maps it and reads
the tensors as views of the mapping.
"""

from __future__ import annotations

import os

import torch

from rollout.protocol import BadRequest

SHM_PREFIX = "slime_rl_wsync_"  # only files with this basename may be mapped


def shared_memory_path(path: str) -> str:
    """`path` if it names an existing trainer-created weight-sync file (basename `SHM_PREFIX*`,
    symlinks resolved to the same rule), else BadRequest saying why."""
    if not os.path.isabs(path):
        raise BadRequest(f"shared-memory path must be absolute, got {path!r}")
    for name in (os.path.basename(path), os.path.basename(os.path.realpath(path))):
        if not name.startswith(SHM_PREFIX):
            raise BadRequest(f"refusing to map {path!r}: only weight-sync files whose name starts with "
                             f"{SHM_PREFIX!r} may be mapped")
    if not os.path.isfile(path):
        raise BadRequest(f"shared-memory file {path!r} does not exist")
    return path


class SharedMemoryMappings:
    """uint8 tensors over shared-memory files, one per path, so repeated syncs do not re-fault pages.

    Only the weight endpoints use it, under the server's weight lock. A dropped mapping is
    unmapped once no staged view of it is left.
    """

    def __init__(self) -> None:
        self._maps: dict[str, tuple[tuple[int, int, int], torch.Tensor]] = {}

    def get(self, path: str) -> torch.Tensor:
        """The mapping of the whole file (re-mapped when its device, inode or size changed)."""
        st = os.stat(path)
        ident = (st.st_dev, st.st_ino, st.st_size)
        cached = self._maps.get(path)
        if cached is None or cached[0] != ident:
            if st.st_size == 0:
                raise BadRequest(f"shared-memory file {path!r} is empty")
            self._maps[path] = (ident, torch.from_file(path, shared=True, size=st.st_size, dtype=torch.uint8))
        return self._maps[path][1]

    def release(self, path: str | None = None) -> int:
        """Drop the mapping of `path` (all when None); how many were dropped."""
        paths = list(self._maps) if path is None else [path] if path in self._maps else []
        for p in paths:
            del self._maps[p]
        return len(paths)

