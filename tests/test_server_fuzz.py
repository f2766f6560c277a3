"""Fuzz of the HTTP server (rollout/server.py): generation, OpenAI, weight and control routes.

Seeded random requests (`random.Random(SEED)`, no hypothesis): each starts from a valid body of
its route and is mutated (keys dropped or added, values replaced by odd types and extremes,
lists wrapped), or replaced by raw bytes (non-finite JSON literals, truncated or deep JSON,
non-UTF-8, a non-object), with now and then odd headers (Content-Type, a latin-1 Authorization,
a gzip Content-Encoding). Every answer must be < 500, strict JSON where it says JSON, and free of
Python exception text; at the end the server is healthy, its weights are unchanged (every weight
update sends the server's own weights or junk) and a greedy /generate returns what it did before.
All failures are collected and reported together. The run is bounded: MAX_CASES requests or
TIME_BUDGET_S seconds, whichever comes first; request i is the same in every run.
"""

from __future__ import annotations

import base64
import copy
import gzip
import http.client
import io
import json
import logging
import os
import pickle
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from rollout.engine import EmbeddedEngine
from rollout.limits import ServerLimits
from rollout.server import BackgroundServer
from slime_rl.buckets import pack_bucket
from slime_rl.dist_group import free_port, init_weight_group
from slime_rl.hf_io import init_tiny_model, save_hf_checkpoint, tiny_hf_config
from slime_rl.tokenizer import CharTokenizer

SEED = 16
MAX_CASES = 600
TIME_BUDGET_S = 25.0
REQUEST_TIMEOUT_S = 10.0  # no fuzz request may take longer (generation is capped at MAX_NEW tokens)
GROUP_TIMEOUT_S = 1.0  # the server's --group-init-timeout-s
BLOCK_TIMEOUT_S = 8.0  # a group rendezvous with nobody on the other side must be answered within this
MAX_NEW = 8  # max_new_tokens / max_tokens / n of otherwise valid generation bodies stay this small
TOK = CharTokenizer()
CTX = 128
API_KEY = "fuzz-key"
NAN, INF = float("nan"), float("inf")
LEAK_RE = re.compile(r"Traceback|\b\w+(Error|Exception)\b")  # internal exception names must not leak
GREEDY = {"input_ids": [33, 34, 35, 36], "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}}
GENERATION = ("/generate", "/v1/completions", "/v1/chat/completions")
CONTROL = ("/abort_request", "/pause_generation", "/continue_generation", "/flush_cache",
           "/release_memory_occupation", "/resume_memory_occupation")


# ---- server and payloads -----------------------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def torch_save_b64(obj: Any) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return b64(buf.getvalue())


def bucket_metadata(bucket) -> list[dict]:
    return [{"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "offset": e.offset} for e in bucket.entries]


@dataclass
class Target:
    url: str
    model_dir: str
    weights: dict[str, torch.Tensor]
    files: dict[str, str]  # name -> path of the odd files the weight routes are pointed at
    payloads: list[tuple[str, str | None]]  # (serialized_named_tensors[0], load_format): own weights, junk
    shm_metadata: list[dict]  # two tensors of files["shm_own"] (a bucket of the server's own weights)


def make_files(root, model_dir: str, weights: dict[str, torch.Tensor]) -> tuple[dict[str, str], list[dict]]:
    """Checkpoint directories and shared-memory files, good and bad, under `root`."""
    files = {"model": model_dir}
    for name, contents in [("junk_ckpt", {"model.safetensors": b"\x08" + os.urandom(64)}),
                           ("index_no_map", {"model.safetensors.index.json": b'{"metadata": {}}'}),
                           ("index_escape", {"model.safetensors.index.json":
                                             b'{"weight_map": {"a": "../../../../etc/passwd"}}'}),
                           ("empty_dir", {}), ("slime_rl_wsync_dir", {})]:
        path = root / name
        path.mkdir()
        for fname, data in contents.items():
            (path / fname).write_bytes(data)
        files[name] = str(path)
    bucket = pack_bucket(sorted(weights.items()))
    (root / "slime_rl_wsync_own").write_bytes(bucket.buffer.numpy().tobytes())
    (root / "slime_rl_wsync_empty").write_bytes(b"")
    (root / "slime_rl_wsync_junk").write_bytes(b"junk")
    (root / "slime_rl_wsync_zero").symlink_to("/dev/zero")
    for name in ("own", "empty", "junk", "zero"):
        files[f"shm_{name}"] = str(root / f"slime_rl_wsync_{name}")
    return files, bucket_metadata(bucket)[:2]


def make_payloads(weights: dict[str, torch.Tensor]) -> list[tuple[str, str | None]]:
    """(serialized_named_tensors[0], load_format) candidates: the server's own weights (an update that
    changes nothing) first, then junk: not base64, base64 of junk bytes, of a broken zip, of a foreign
    pickle, of torch.save objects of the wrong shape."""
    (name, tensor), pairs = sorted(weights.items())[0], sorted(weights.items())
    bucket = pack_bucket(pairs)
    rng = random.Random(SEED)
    junk = bytes(rng.randrange(256) for _ in range(256))

    def flat(buffer: torch.Tensor, metadata: Any) -> tuple[str, str]:
        return torch_save_b64({"flattened_tensor": buffer, "metadata": metadata}), "flattened_bucket"

    plain = ["!!not base64!!", "abc", "", "=" * 8, b64(junk), b64(b"PK\x03\x04" + junk), b64(b"\x80\x04N."),
             b64(pickle.dumps(("x", 1))), b64(pickle.dumps({"a": [1, 2]})), torch_save_b64({"a": 1}),
             torch_save_b64([("no.such.weight", tensor)]), torch_save_b64([(name, tensor[:1])]),
             torch_save_b64([(name, tensor.to(torch.int64))]), torch_save_b64([(7, tensor)]),
             torch_save_b64([(name,)])]
    return [(torch_save_b64([(name, tensor)]), None), flat(bucket.buffer, bucket_metadata(bucket)),
            *[(p, None) for p in plain],
            flat(bucket.buffer, [{"name": name}]), flat(bucket.buffer, {"name": name}),
            flat(bucket.buffer, [{**bucket_metadata(bucket)[0], "shape": [-1]}]),
            flat(bucket.buffer, [{**bucket_metadata(bucket)[0], "offset": 2**62}]),
            flat(bucket.buffer, [{**bucket_metadata(bucket)[0], "dtype": "torch.nonsense"}]),
            flat(bucket.buffer[:8], bucket_metadata(bucket)), flat(bucket.buffer.float(), bucket_metadata(bucket))]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    cfg = tiny_hf_config(vocab_size=TOK.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                         max_position_embeddings=CTX, eos_token_id=TOK.eos_token_id)
    weights = init_tiny_model(cfg, seed=0)
    model_dir = str(save_hf_checkpoint(tmp_path_factory.mktemp("tiny"), cfg, weights, TOK))
    files, shm_metadata = make_files(tmp_path_factory.mktemp("files"), model_dir, weights)
    engine = EmbeddedEngine(cfg, weights, seed=0, max_total_tokens=4096, tokenizer=TOK)
    server = BackgroundServer(engine, TOK, model_path=model_dir, api_key=API_KEY,
                              limits=ServerLimits(group_init_timeout_s=GROUP_TIMEOUT_S))
    try:
        server.start()
        yield Target(server.url, model_dir, weights, files, make_payloads(weights), shm_metadata)
    finally:
        server.stop()
        engine.close()


# ---- the client ----------------------------------------------------------------------------------


@dataclass
class Case:
    method: str
    path: str
    raw: bytes | None
    headers: dict[str, Any] = field(default_factory=dict)
    timeout: float = REQUEST_TIMEOUT_S

    def describe(self) -> str:
        odd = {k: v for k, v in self.headers.items() if (k, v) not in DEFAULT_HEADERS.items()}
        body = "<no body>" if self.raw is None else repr(self.raw[:300]) + ("..." if len(self.raw) > 300 else "")
        return f"{self.method} {self.path} {body}" + (f" headers={odd}" if odd else "")


DEFAULT_HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}


@dataclass
class Reply:
    status: int | None  # None: no answer (the body says why)
    content_type: str
    body: bytes


def send(url: str, case: Case) -> Reply:
    """One request on a fresh connection; header values may be raw bytes (sent as they are)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=case.timeout)
    try:
        conn.putrequest(case.method, case.path, skip_accept_encoding=True)
        for key, value in case.headers.items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", str(len(case.raw or b"")))
        conn.endheaders(case.raw)
        resp = conn.getresponse()
        return Reply(resp.status, resp.getheader("Content-Type", "").split(";")[0], resp.read())
    except TimeoutError:
        return Reply(None, "", b"no answer within %.0f s" % case.timeout)
    except (ConnectionError, http.client.HTTPException) as exc:
        return Reply(None, "", f"connection dropped: {exc!r}".encode())
    finally:
        conn.close()


def no_constant(name: str) -> Any:
    raise ValueError(f"non-finite JSON constant {name}")


def problems(reply: Reply) -> list[tuple[str, str]]:
    """(kind, detail) for every rule the reply breaks."""
    text = reply.body.decode("utf-8", errors="replace")
    if reply.status is None:
        return [("no answer", text)]
    found = []
    if reply.status >= 500:
        found.append((f"status {reply.status}", text))
    leak = LEAK_RE.search(text)
    if leak:
        found.append((f"leaks {leak.group(0)}", text))
    docs = [text] if reply.content_type == "application/json" else []
    if reply.content_type == "text/event-stream":
        docs = [c[len("data: "):] for c in text.split("\n\n") if c.startswith("data: ") and c != "data: [DONE]"]
    for doc in docs:
        try:
            reply.body.decode("utf-8")
            json.loads(doc, parse_constant=no_constant)
        except ValueError as exc:
            found.append(("not strict JSON", f"{exc}: {doc[:300]}"))
            break
    return found


# ---- the generator -------------------------------------------------------------------------------

ODD_SCALARS = [None, True, False, -1, 0, 1, 3, 2**31, 2**63, 2**70, -2**70, 1e308, -1e308, 0.5, -0.0, 1e-320,
               NAN, INF, -INF, "NaN", "Infinity", "-inf", "1e999", "", "0", "-1", "null", "true", "/etc/passwd",
               "../x", "/dev/zero", "\ud800", "\x00", "\u202e\U0001f600", "é"]
KEYS = ["text", "input_ids", "sampling_params", "rid", "stream", "return_logprob", "logprob_start_len",
        "top_logprobs_num", "prompt", "messages", "max_tokens", "n", "logprobs", "model_path", "weight_version",
        "transfer_id", "names", "load_format", "path", "metadata", "tags", "mode", "abort_all", "group_name", ""]


def rand_str(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abc019 +=-_/.:'\"\\{}[]é\u4e2d") for _ in range(n))


def odd_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(10 if depth < 2 else 8)
    if pick < 4:
        return rng.choice(ODD_SCALARS)
    if pick == 4:
        return rand_str(rng, rng.choice([1, 8, 300, 4096]))
    if pick == 5:
        return rng.choice([[], {}, [[]], [{}], {"": None}, [[[1]]], [None]])
    if pick in (6, 7):
        return rng.randint(-3, 40)
    if pick == 8:
        return [odd_value(rng, depth + 1) for _ in range(rng.randint(1, 4))]
    return {rng.choice(KEYS): odd_value(rng, depth + 1) for _ in range(rng.randint(1, 3))}


def locations(obj: Any, at: tuple = ()) -> list[tuple]:
    """Paths (keys / indices from the root) of every value inside `obj`, the root included."""
    found = [at]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for key, value in items:
        found += locations(value, at + (key,))
    return found


def mutate(rng: random.Random, body: Any) -> Any:
    """One random edit: replace / drop / wrap a value, or add a key to an object."""
    spots = locations(body)
    at = rng.choice(spots)
    op = rng.choice(["replace", "replace", "drop", "wrap", "add", "null"])
    if not at:  # the root
        if op == "add" and isinstance(body, dict):
            body[rng.choice(KEYS)] = odd_value(rng)
            return body
        return [body] if op == "wrap" else odd_value(rng) if op == "replace" else body
    parent = body
    for key in at[:-1]:
        parent = parent[key]
    key = at[-1]
    if op == "drop":
        del parent[key]
    elif op == "wrap":
        parent[key] = [parent[key]]
    elif op == "null":
        parent[key] = None
    elif op == "add" and isinstance(parent[key], dict):
        parent[key][rng.choice(KEYS)] = odd_value(rng)
    else:
        parent[key] = odd_value(rng)
    return body


def cap_generation(path: str, body: Any) -> None:
    """Keep generation small: token budgets and n of at most MAX_NEW, also where a mutation dropped them."""
    if path not in GENERATION or not isinstance(body, dict):
        return
    sampling = body.get("sampling_params")
    dicts = [body, *(sampling if isinstance(sampling, list) else [sampling])]
    for d in dicts:
        for key in ("max_new_tokens", "max_tokens", "max_completion_tokens", "n", "min_new_tokens", "min_tokens"):
            if isinstance(d, dict) and type(d.get(key)) is int and d[key] > MAX_NEW:
                d[key] = MAX_NEW
    if path == "/generate":
        if not isinstance(sampling, (dict, list)):
            body["sampling_params"] = sampling = {}
        for d in sampling if isinstance(sampling, list) else [sampling]:
            if isinstance(d, dict) and d.get("max_new_tokens") is None:
                d["max_new_tokens"] = MAX_NEW
    elif path == "/v1/completions" and body.get("max_tokens") is None:
        body["max_tokens"] = MAX_NEW
    elif path == "/v1/chat/completions" and all(type(body.get(k)) is not int
                                                 for k in ("max_tokens", "max_completion_tokens")):
        body["max_completion_tokens"] = MAX_NEW


def may_rendezvous(body: Any) -> bool:
    """Would /init_weights_update_group with this body wait for peers (or form a group of one)?"""
    if not isinstance(body, dict):
        return False
    port, rank, size = body.get("master_port"), body.get("rank_offset"), body.get("world_size")
    ints = all(type(v) is int for v in (port, rank, size))
    return (ints and 0 <= rank < size and isinstance(body.get("master_address"), str)
            and body.get("backend") in (None, "gloo", "nccl") and body.get("group_name", 1) not in ("",))


RAW_BODIES = [b"", b"   ", b"null", b"[]", b"[{}]", b"1", b'"s"', b"true", b"NaN", b"-Infinity", b"{", b'{"a":',
              b'{"text": "\xff\xfe"}', b"\xff\xfe\x00\x00", b"\xef\xbb\xbf{}", '{"text": "ab"}'.encode("utf-16"),
              b"[" * 5000 + b"]" * 5000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
              b'{"input_ids": [' + b"1" * 5000 + b"]}", b'{"text": "a", "text": 1}', b"{}" * 3, b"\x00"]


def raw_body(rng: random.Random, body: Any) -> bytes:
    """Odd bytes: a canned one, the body cut short, or the body with some numbers made non-finite or huge."""
    good = json.dumps(body, allow_nan=True).encode()
    pick = rng.randrange(3)
    if pick == 0:
        return rng.choice(RAW_BODIES)
    if pick == 1:
        return good[: rng.randrange(max(1, len(good)))]
    odd = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1" * 5000]  # 1e999 parses as inf
    return re.sub(rb"(?<![\w.\"])-?\d+(\.\d+)?(?![\w.\"])", lambda m: rng.choice([*odd, m.group(0)]), good)


def odd_headers(rng: random.Random, raw: bytes) -> tuple[dict[str, Any], bytes]:
    headers = dict(DEFAULT_HEADERS)
    pick = rng.randrange(9)
    if pick == 0:
        headers["Content-Type"] = rng.choice(["text/plain", "application/x-www-form-urlencoded",
                                              "multipart/form-data; boundary=zz", "application/json; charset=utf-16"])
    elif pick == 1:
        del headers["Content-Type"]
    elif pick == 2:
        headers["Authorization"] = b"Bearer \xff\xfe\x80"
    elif pick == 3:
        headers["Authorization"] = rng.choice(["Bearer caf\xe9", b"Bearer " + API_KEY.encode() + b"\xe9", "Basic x"])
    elif pick == 4:
        headers["Content-Encoding"] = "gzip"
        raw = gzip.compress(raw)
    elif pick == 5:
        headers["Content-Encoding"] = rng.choice(["gzip", "deflate", "br", "zstd", "x-junk"])  # body not encoded
    elif pick == 6:
        headers["Content-Encoding"] = "gzip"
        raw = gzip.compress(b" " * (4 << 20) + raw)  # 4 MiB of padding behind a few KiB
    elif pick == 7:
        headers["Content-Type"] = "application/json; charset=latin-1"
        raw = raw.decode("utf-8", errors="replace").encode("latin-1", errors="replace")
    else:
        headers["Transfer-Encoding"] = "chunked"  # and Content-Length: a request smuggling shape
    return headers, raw


class Fuzzer:
    """Case i of a seeded sequence; bodies start from the valid ones of each route."""

    def __init__(self, target: Target, seed: int = SEED):
        self.rng = random.Random(seed)
        self.t = target
        self.dead_port = free_port()  # nothing listens there
        self.valid = self._valid_bodies()
        self.routes = sorted(self.valid) + 2 * list(GENERATION)  # generation routes 3x as often

    def _valid_bodies(self) -> dict[str, list[Any]]:
        t, (name, tensor) = self.t, sorted(self.t.weights.items())[0]
        chat = [{"role": "system", "content": "be terse"},
                {"role": "user", "content": [{"type": "text", "text": "2+2"}]}]
        dist = {"names": [name], "dtypes": ["float32"], "shapes": [list(tensor.shape)], "group_name": "g",
                "load_format": None, "weight_version": 1}
        return {
            "/generate": [
                {"text": "12+34=", "sampling_params": {"max_new_tokens": 8, "temperature": 0}, "return_logprob": True,
                 "logprob_start_len": 0, "top_logprobs_num": 2, "return_text_in_logprobs": True, "rid": "r"},
                {"input_ids": [[5, 6, 7], [8, 9]], "rid": ["a", "b"], "return_logprob": [True, False],
                 "sampling_params": [{"max_new_tokens": 4, "temperature": 1.0, "sampling_seed": 7},
                                     {"max_new_tokens": 3, "temperature": 0}]},
                {"input_ids": [40, 41, 42], "stream": True, "sampling_params": {
                    "max_new_tokens": 6, "min_new_tokens": 1, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
                    "stop": ["a"], "stop_token_ids": [3], "ignore_eos": True, "n": 2, "sampling_seed": 3,
                    "no_stop_trim": True, "skip_special_tokens": False, "min_p": 0}},
            ],
            "/v1/completions": [
                {"model": "m", "prompt": "7+8=", "max_tokens": 6, "temperature": 0, "logprobs": 2},
                {"model": "m", "prompt": ["1+", [5, 6, 7]], "n": 2, "max_tokens": 3, "seed": 4, "stop": ["x"],
                 "stream": True, "stream_options": {"include_usage": True}},
            ],
            "/v1/chat/completions": [
                {"model": "m", "messages": chat, "max_tokens": 50, "max_completion_tokens": 5, "temperature": 0,
                 "logprobs": True, "top_logprobs": 2},
                {"model": "m", "messages": chat, "max_tokens": 4, "stream": True, "response_format": {"type": "text"},
                 "stream_options": {"include_usage": True}, "top_p": 0.5, "seed": 1},
            ],
            # About half the disk and tensor bodies start from an update that succeeds (with the server's
            # own weights), the rest from junk.
            "/update_weights_from_disk": [{"model_path": path, "weight_version": "1", "flush_cache": True,
                                           "abort_all_requests": False}
                                          for path in [t.model_dir] * 8 + list(t.files.values())]
            + [{"model_path": p} for p in ("/etc/passwd", "../x", "", "/dev/zero", "/dev", "/")],
            "/update_weights_from_tensor": [{"serialized_named_tensors": [p], "load_format": load_format,
                                             "weight_version": 2, "flush_cache": True,
                                             "transfer_id": "t" if i % 3 == 2 else None}
                                            for i, (p, load_format) in enumerate(t.payloads[:2] * 10
                                                                                 + t.payloads[2:])],
            "/update_weights_from_shared_memory": [{"path": p, "metadata": t.shm_metadata, "weight_version": "3",
                                                    "transfer_id": None if i % 2 else "t"}
                                                   for i, p in enumerate([t.files["shm_own"]] * 2 + [
                                                       t.files[k] for k in ("shm_empty", "shm_junk", "shm_zero",
                                                                            "slime_rl_wsync_dir")]
                                                       + ["/etc/passwd", "../x", "", "/dev/zero"])],
            "/release_shared_memory": [{"path": t.files["shm_own"]}, {"path": None}],
            "/commit_weight_update": [{"transfer_id": "t", "weight_version": 4, "flush_cache": True,
                                       "expected_tensors": 1, "adopt": False, "abort_all_requests": False}],
            "/abort_weight_update": [{"transfer_id": "t"}, {}],
            "/weights_checksum": [{"names": [name]}, {"names": None}],
            "/init_weights_update_group": [{"master_address": "127.0.0.1", "master_port": self.dead_port,
                                            "rank_offset": 1, "world_size": 2, "group_name": "g", "backend": "gloo"}],
            "/update_weights_from_distributed": [dist, {**dist, "load_format": "flattened_bucket", "transfer_id": "t"}],
            "/destroy_weights_update_group": [{"group_name": "g"}, {}],
            "/update_weight_version": [{"new_version": "5", "abort_all_requests": False}],
            "/abort_request": [{"rid": "r"}, {"abort_all": True}],
            "/pause_generation": [{"mode": "in_place"}, {"mode": "retract"}, {}],
            "/continue_generation": [{}],
            "/flush_cache": [{}],
            "/release_memory_occupation": [{"tags": None}, {"tags": ["kv_cache"]}],
            "/resume_memory_occupation": [{"tags": None}, {"tags": ["kv_cache"]}],
        }

    def case(self) -> Case:
        rng = self.rng
        path = rng.choice(self.routes)
        body = copy.deepcopy(rng.choice(self.valid[path]))
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            body = mutate(rng, body)
        cap_generation(path, body)
        if path == "/init_weights_update_group" and may_rendezvous(body):
            body["rank_offset"] = rng.choice([-1, 2**70, body["world_size"], "1", 1.0, True])
        raw = raw_body(rng, body) if rng.random() < 0.15 else json.dumps(body, allow_nan=True).encode()
        headers = dict(DEFAULT_HEADERS)
        if rng.random() < 0.12:
            headers, raw = odd_headers(rng, raw)
        method = "GET" if rng.random() < 0.03 else "POST"
        return Case(method, path, raw, headers)


# ---- the run -------------------------------------------------------------------------------------


@dataclass
class Findings:
    """Failures grouped by (route, kind, status); each class keeps its shortest example."""

    classes: dict[tuple, tuple[int, Case, Reply, str]] = field(default_factory=dict)

    def add(self, case: Case, reply: Reply, kind: str, detail: str) -> None:
        key = (case.path, kind, reply.status)
        old = self.classes.get(key)
        if old is None or len(case.raw or b"") < len(old[1].raw or b""):
            self.classes[key] = (0 if old is None else old[0]) + 1, case, reply, detail
        else:
            self.classes[key] = (old[0] + 1, *old[1:])

    def check(self, case: Case, reply: Reply) -> Reply:
        found = problems(reply)
        if found:
            self.add(case, reply, " + ".join(kind for kind, _ in found), found[0][1])
        return reply

    def report(self) -> str:
        lines = [f"{len(self.classes)} failure classes:"]
        for (path, kind, status), (count, case, reply, detail) in sorted(self.classes.items(), key=str):
            lines += [f"- {path}: {kind} (x{count})", f"    sent: {case.describe()}",
                      f"    got:  {status} {reply.content_type} {detail[:300]!r}"]
        return "\n".join(lines)


def call(target: Target, findings: Findings, method: str, path: str, body: Any = None,
         timeout: float = REQUEST_TIMEOUT_S) -> tuple[Case, Reply]:
    case = Case(method, path, None if body is None else json.dumps(body).encode(), dict(DEFAULT_HEADERS), timeout)
    return case, findings.check(case, send(target.url, case))


def restore(target: Target, findings: Findings) -> None:
    """Undo what a control route may have done (pause, memory release) so generation keeps running."""
    for path in ("/continue_generation", "/resume_memory_occupation"):
        call(target, findings, "POST", path, {})


def end_state(target: Target, findings: Findings) -> tuple[Any, Any]:
    """(greedy /generate output, weight checksums); a failing health check or call is a finding."""
    case, reply = call(target, findings, "GET", "/health")
    if reply.status != 200:
        findings.add(case, reply, "unhealthy", f"GET /health answered {reply.status}")
    outputs = []
    for path, body, pick in [("/generate", GREEDY, lambda r: (r["output_ids"], r["text"])),
                             ("/weights_checksum", {}, lambda r: r["checksums"])]:
        case, reply = call(target, findings, "POST", path, body)
        if reply.status != 200:
            findings.add(case, reply, "end-state call failed", reply.body.decode(errors="replace"))
        outputs.append(pick(json.loads(reply.body)) if reply.status == 200 else None)
    return outputs[0], outputs[1]


def test_fuzzed_requests_get_no_500_no_leaked_exception_and_leave_the_server_healthy(target, caplog):
    caplog.set_level(logging.ERROR)  # each refused request logs a warning; keep the tracebacks of 500s only
    findings = Findings()
    greedy_before, weights_before = end_state(target, findings)
    assert greedy_before is not None and weights_before is not None, findings.report()
    fuzzer, deadline, sent = Fuzzer(target), time.monotonic() + TIME_BUDGET_S, 0
    for _ in range(MAX_CASES):
        if time.monotonic() > deadline:
            break
        case = fuzzer.case()
        findings.check(case, send(target.url, case))
        sent += 1
        if case.path in CONTROL:
            restore(target, findings)
    restore(target, findings)
    greedy_after, weights_after = end_state(target, findings)
    changed = [what for what, same in [("greedy /generate output", greedy_after == greedy_before),
                                       ("weights", weights_after == weights_before)] if not same]
    assert sent >= 100, f"only {sent} fuzz requests in {TIME_BUDGET_S} s"
    assert not findings.classes and not changed, (f"{sent} fuzz requests (seed {SEED}); changed by the fuzz: "
                                                  f"{changed or 'nothing'}; " + findings.report())


def test_group_rendezvous_with_nobody_answers_in_time_and_the_server_stays_healthy(target):
    """A group init whose master never answers must not hang its client (the server gives up or
    answers); afterwards the weight routes and generation still answer."""
    findings = Findings()
    port = free_port()  # nothing listens there until this test hosts the group itself
    body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": "silent", "backend": "gloo"}
    _, reply = call(target, findings, "POST", "/init_weights_update_group", body, timeout=BLOCK_TIMEOUT_S)
    if reply.status is None:  # still waiting: be the master it waits for, so its thread ends now
        init_weight_group("127.0.0.1", port, 0, 2, group_name="silent", timeout_s=30).destroy()
    call(target, findings, "POST", "/destroy_weights_update_group", {"group_name": "silent"})
    call(target, findings, "POST", "/abort_weight_update", {}, timeout=BLOCK_TIMEOUT_S)
    greedy, _ = end_state(target, findings)
    assert greedy is not None and not findings.classes, findings.report()
