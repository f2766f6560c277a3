"""Shared-memory weight updates (rollout/shm.py) against files swapped or planted by someone else.

The endpoint `/update_weights_from_shared_memory` maps a client-named file; these
tests check that only the file that passed the rules is ever read (a symlink swapped
in between is not followed), that the reader never changes a file, and that hard
links, FIFOs and directories named like weight-sync files are refused without hanging.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import tempfile
import threading
import uuid
from urllib.parse import urlparse

import pytest
import torch

from rollout.engine import EmbeddedEngine
from rollout.http_json import BadRequest
from rollout.server import BackgroundServer
from rollout.shm import SharedMemoryMappings, shared_memory_path
from server_procs import post
from slime_rl.buckets import pack_bucket, unpack_bucket
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.types import BucketEntry, GenerateRequest, WeightBucket

SUBSET = "model.norm.weight"  # one small tensor: each race request is fast
DECOY_VALUE = 777.0  # the decoy's recognizable float32 pattern
MIN_SWAPS = 1000


@pytest.fixture(scope="module")
def cfg() -> dict:
    return tiny_hf_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                          max_position_embeddings=64)


@pytest.fixture(scope="module")
def weights(cfg) -> dict[str, torch.Tensor]:
    return {name: t.float() for name, t in init_tiny_model(cfg, seed=0).items()}


@pytest.fixture
def engine(cfg, weights):
    eng = EmbeddedEngine(cfg, weights, seed=0, max_total_tokens=256)
    yield eng
    eng.close()


@pytest.fixture
def shm_dir():
    """A fresh directory under /dev/shm (tmpfs, as in production) or the temp dir."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=root, prefix="shm_safety_") as d:
        yield d


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def metadata(bucket) -> list[dict]:
    return [{"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "offset": e.offset} for e in bucket.entries]


def file_state(path: str) -> tuple[int, int, bytes]:
    st = os.stat(path)
    with open(path, "rb") as f:
        return st.st_size, st.st_mtime_ns, f.read()


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


class Client:
    """One keep-alive HTTP connection (the race sends hundreds of requests)."""

    def __init__(self, url: str):
        u = urlparse(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read())

    def close(self) -> None:
        self.conn.close()


# ---- the race ---------------------------------------------------------------------------------


def test_symlink_swap_race_never_reads_or_changes_a_refused_file(engine, shm_dir, weights):
    """A thread flips `slime_rl_wsync_x` between the real weight-sync file and symlinks to two decoys
    (`secret.bin`, the real file's size, and `tiny.bin`, 12 bytes) while the endpoint is called."""
    shape = weights[SUBSET].shape
    legit = torch.full(shape, 0.5) + torch.arange(shape.numel()).reshape(shape) / 1000
    bucket = pack_bucket([(SUBSET, legit)])
    legit_bytes = bucket.buffer.numpy().tobytes()
    target = os.path.join(shm_dir, "slime_rl_wsync_x")
    stash = os.path.join(shm_dir, "stash")
    secret = os.path.join(shm_dir, "secret.bin")
    tiny = os.path.join(shm_dir, "tiny.bin")
    write(target, legit_bytes)
    write(secret, torch.full((len(legit_bytes) // 4,), DECOY_VALUE).numpy().tobytes())
    write(tiny, b"SECRET-12-B!")
    before = {p: file_state(p) for p in (secret, tiny)}
    body = {"path": target, "metadata": metadata(bucket)}
    legit_sha = sha(legit)

    swaps, stop = [0], threading.Event()

    def flip() -> None:  # real -> symlink to a decoy -> real (the real file moves by rename: one link)
        decoys = (secret, tiny)
        while not stop.is_set():
            os.rename(target, stash)
            os.symlink(decoys[swaps[0] // 2 % 2], target)
            os.rename(stash, target)  # atomically replaces the symlink
            swaps[0] += 2

    with BackgroundServer(engine) as server:
        client = Client(server.url)
        try:
            # Both outcomes, deterministically, before the race.
            os.rename(target, stash)
            os.symlink(secret, target)
            status, res = client.post("/update_weights_from_shared_memory", {**body, "weight_version": 1})
            assert status == 400, res
            os.rename(stash, target)
            status, res = client.post("/update_weights_from_shared_memory", {**body, "weight_version": 1})
            assert status == 200, res
            assert engine.weights_checksum([SUBSET])[SUBSET] == legit_sha

            flipper = threading.Thread(target=flip, daemon=True)
            flipper.start()
            statuses = []
            try:
                i = 0
                while i < 300 or swaps[0] < MIN_SWAPS:
                    i += 1
                    if i % 2:  # map afresh half the time: the mapping path runs under the race too
                        client.post("/release_shared_memory", {"path": target})
                    status, res = client.post("/update_weights_from_shared_memory", {**body, "weight_version": i})
                    statuses.append(status)
                    assert status in (200, 400), res
                    if status == 200:
                        assert engine.weights_checksum([SUBSET])[SUBSET] == legit_sha, "decoy bytes were loaded"
                    if i > 20000:
                        break
            finally:
                stop.set()
                flipper.join(timeout=10)
        finally:
            client.close()

    assert swaps[0] >= MIN_SWAPS, swaps
    assert statuses.count(200) + statuses.count(400) == len(statuses)
    assert not bool((engine._params[SUBSET] == DECOY_VALUE).any())
    for path, state in before.items():  # never grown, truncated, touched or written
        assert file_state(path) == state, path


# ---- files that are refused ---------------------------------------------------------------------


def test_refused_files_hard_link_fifo_directory_symlink(engine, shm_dir, weights):
    secret = os.path.join(shm_dir, "secret.bin")
    write(secret, bytes(range(256)))
    before = file_state(secret)
    cases = {}
    cases["hard links"] = os.path.join(shm_dir, "slime_rl_wsync_hardlink")
    os.link(secret, cases["hard links"])
    cases["not a regular file"] = os.path.join(shm_dir, "slime_rl_wsync_fifo")
    os.mkfifo(cases["not a regular file"])
    directory = os.path.join(shm_dir, "slime_rl_wsync_dir")
    os.mkdir(directory)
    cases["symlink"] = os.path.join(shm_dir, "slime_rl_wsync_link")
    os.symlink(secret, cases["symlink"])
    empty = os.path.join(shm_dir, "slime_rl_wsync_empty")
    write(empty, b"")
    cases["is empty"] = empty

    mappings = SharedMemoryMappings()
    for rule, path in cases.items():
        with pytest.raises(BadRequest, match=rule) as info:
            mappings.get(path)
        assert path in str(info.value)
    with pytest.raises(BadRequest, match="not a regular file"):
        mappings.get(directory)
    with pytest.raises(BadRequest, match="does not exist"):
        mappings.get(os.path.join(shm_dir, "slime_rl_wsync_missing"))
    with pytest.raises(BadRequest, match="does not exist"):
        mappings.get(os.path.join(shm_dir, "no_such_dir", "slime_rl_wsync_a"))
    for bad in ("relative/slime_rl_wsync_a", os.path.join(shm_dir, "secret.bin"), shm_dir + "/slime_rl_wsync_a/.."):
        with pytest.raises(BadRequest):
            shared_memory_path(bad)

    bucket = pack_bucket([(SUBSET, weights[SUBSET])])
    with BackgroundServer(engine) as server:  # through the endpoint: 400s, and the FIFO does not hang
        for rule, path in [*cases.items(), ("not a regular file", directory)]:
            status, res = post(server.url + "/update_weights_from_shared_memory",
                               {"path": path, "metadata": metadata(bucket), "weight_version": 3}, timeout=10)
            assert status == 400 and rule in res["message"], (rule, res)
    assert engine.get_weight_version() == 0
    assert file_state(secret) == before


def test_mapping_is_read_only_remapped_on_change_and_offsets_checked(shm_dir):
    path = os.path.join(shm_dir, "slime_rl_wsync_a")
    write(path, bytes(range(64)))
    mappings = SharedMemoryMappings()
    first = mappings.get(path)
    assert first.tolist() == list(range(64))
    assert mappings.get(path) is first  # same inode and size: the cached mapping
    with open(path, "r+b") as f:  # written in place by its owner: MAP_SHARED sees it
        f.write(b"\xff")
    assert int(first[0]) == 255
    write(path + ".new", bytes(128))
    os.replace(path + ".new", path)  # a new inode: mapped again
    second = mappings.get(path)
    assert second.numel() == 128 and int(first[1]) == 1  # the old mapping still reads the old file
    assert mappings.release(path) == 1 and mappings.release(path) == 0

    beyond = WeightBucket(second, [BucketEntry("w", "float32", (8,), 128 - 16)])
    with pytest.raises(ValueError, match="outside"):
        unpack_bucket(beyond)


# ---- adopted read-only mappings ------------------------------------------------------------------


def test_adopted_read_only_mapping_is_never_written(cfg, weights, shm_dir):
    """A commit with adopt=True makes views of the read-only mapping parameters; later updates copy
    the parameters out first (a write into the mapping would crash the process)."""
    path = os.path.join(shm_dir, f"slime_rl_wsync_{uuid.uuid4().hex}")
    new = {name: t + 0.25 for name, t in weights.items()}
    bucket = pack_bucket(sorted(new.items()))
    write(path, bucket.buffer.numpy().tobytes())
    before = file_state(path)
    engine = EmbeddedEngine(cfg, weights, seed=0, max_total_tokens=256)
    try:
        mappings = SharedMemoryMappings()
        views = unpack_bucket(WeightBucket(mappings.get(path), bucket.entries))
        engine.stage_weights(views, "t1", copy=False)
        info = engine.commit_weights("t1", 1, adopt=True)
        assert info["adopted_bytes"] > 0
        # A second adopting commit whose tensors cannot all be adopted (fresh, non-contiguous
        # tensors): what is left is copied into new memory, never into the first mapping.
        engine.stage_weights([(n, (t + 0.5).t().contiguous().t()) for n, t in new.items()], "t2", copy=False)
        engine.commit_weights("t2", 2, adopt=True)
        engine.update_weights_from_tensors([(SUBSET, weights[SUBSET])], 3)  # partial: copies params out first
        assert engine.weights_checksum([SUBSET])[SUBSET] == sha(weights[SUBSET])
        assert engine.generate([GenerateRequest([1, 2, 3])])[0].output_ids
    finally:
        engine.close()
    assert file_state(path) == before
