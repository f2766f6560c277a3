"""Issue 16: no request may hurt other users, the weights or the files (rollout/server.py and friends).

One tiny Llama served in-process (`BackgroundServer`) per test group, with
small limits where a limit is under test. Every case here failed before the
hardening (a 500, a silent success, a stall, or everyone's generation
aborted). The CLI side is in test_cli_errors.py, the engine and
shared-memory sides in test_engine_hardening.py and test_shm_safety.py, the
random-input side in test_server_fuzz.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import http.client as httpclient
import json
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest
import torch

from rollout.engine import EmbeddedEngine
from rollout.limits import ServerLimits
from rollout.http_json import dumps
from rollout.server import create_app
from server_procs import START_TIMEOUT_S, http, launch_server, post, serving, wait_healthy
from slime_rl.dist_group import free_port
from slime_rl.hf_io import init_tiny_model, save_hf_checkpoint, tiny_hf_config
from slime_rl.tokenizer import CharTokenizer

TOK = CharTokenizer()
CTX = 128
LONG = {"max_new_tokens": 100, "temperature": 0, "ignore_eos": True}  # still running when the poison arrives


@dataclass
class Tiny:
    cfg: dict
    weights: dict[str, torch.Tensor]
    model_dir: Path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    cfg = tiny_hf_config(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                         max_position_embeddings=CTX, eos_token_id=TOK.eos_token_id)
    weights = init_tiny_model(cfg, seed=0)
    return Tiny(cfg, weights, Path(save_hf_checkpoint(tmp_path_factory.mktemp("tiny"), cfg, weights, TOK)))


@contextlib.contextmanager
def serve(tiny: Tiny, **app_kwargs: Any) -> Iterator[tuple[EmbeddedEngine, str]]:
    engine = EmbeddedEngine(tiny.cfg, tiny.weights, seed=0, max_total_tokens=8192, tokenizer=TOK)
    with serving(engine, TOK, model_path=str(tiny.model_dir), **app_kwargs) as url:
        yield engine, url


def raw_exchange(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers until it closes or goes quiet."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(socket.timeout):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and not chunk:
                    break
        return b"".join(chunks)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else -1


async def apost(session: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> tuple[int, Any]:
    async with session.post(url, json=body, **kw) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if resp.content_type == "application/json" else text


async def until(predicate, timeout: float = 30.0) -> None:
    """Poll a condition of the engine (there is no event to wait on from the HTTP side)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# ---- 1. one request never aborts the others -----------------------------------------------------


def test_poisoned_stop_token_ids_next_to_six_running_generations(tiny):
    with serve(tiny) as (engine, url):
        async def main():
            async with aiohttp.ClientSession() as session:
                six = [asyncio.create_task(apost(session, url + "/generate",
                                                 {"input_ids": [5 + i], "sampling_params": LONG}))
                       for i in range(6)]
                await until(lambda: engine.load()["num_running_reqs"] == 6)
                poison = {"input_ids": [9], "sampling_params": {"max_new_tokens": 4, "min_new_tokens": 1,
                                                                "stop_token_ids": [1_000_000_000]}}
                rejected = await apost(session, url + "/generate", poison)
                return rejected, await asyncio.gather(*six)

        (status, res), results = asyncio.run(main())
        assert status == 400 and "stop_token_ids" in res["error"]["message"], res
        alone = engine.generate([_greedy_request([5 + i]) for i in range(6)])
    for (code, body), ref in zip(results, alone):
        assert code == 200 and body["meta_info"]["finish_reason"]["type"] == "length"
        assert body["output_ids"] == ref.output_ids and len(ref.output_ids) == LONG["max_new_tokens"]


def _greedy_request(ids: list[int]):
    from slime_rl.types import GenerateRequest, SamplingParams
    return GenerateRequest(ids, SamplingParams(temperature=0.0, max_new_tokens=LONG["max_new_tokens"]))


# ---- 3. authentication --------------------------------------------------------------------------


def test_api_key_guards_every_route_but_health_and_the_admin_key_guards_weights(tiny):
    with pytest.raises(ValueError, match="api_key"):
        create_app(None, api_key="")
    with pytest.raises(ValueError, match="admin_api_key"):
        create_app(None, admin_api_key="  ")
    gen = {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}}
    user, admin = {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer admin-key"}
    with serve(tiny, api_key="user-key", admin_api_key="admin-key") as (engine, url):
        assert http("GET", url + "/health")[0] == 200
        for path in ("/get_model_info", "/server_info", "/v1/models", "/get_weight_version"):
            assert http("GET", url + path)[0] == 401, path
            assert http("GET", url + path, headers=user)[0] == 200, path
        assert post(url + "/generate", gen)[0] == 401
        assert post(url + "/generate", gen, headers=user)[0] == 200
        assert post(url + "/generate", gen, headers=admin)[0] == 200  # the admin key opens everything
        status, res = post(url + "/pause_generation", {"mode": "in_place"}, headers=user)
        assert status == 401 and "admin api key" in res["message"] and not engine.is_paused()
        status, res = post(url + "/update_weight_version", {"new_version": 7}, headers=user)
        assert status == 401 and engine.get_weight_version() == 0
        assert post(url + "/update_weight_version", {"new_version": 7}, headers=admin)[0] == 200
        assert engine.get_weight_version() == 7
        # A header that is not UTF-8 is a wrong key (401), not a crash.
        raw = raw_exchange(url, b"GET /get_model_info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\n"
                                b"Connection: close\r\n\r\n")
        assert status_of(raw) == 401, raw[:200]
    with serve(tiny, admin_api_key="admin-key") as (engine, url):  # admin key only: generation stays open
        assert post(url + "/generate", gen)[0] == 200
        assert post(url + "/flush_cache")[0] == 401
        assert post(url + "/flush_cache", headers=admin)[0] == 200


# ---- 4. limits ---------------------------------------------------------------------------------


SMALL = ServerLimits(max_body_mb=0.05, max_n=4, max_batch_size=3, max_stop=2, max_queued_requests=8,
                     header_timeout_s=1.0, body_timeout_s=1.0)


def test_request_limits_are_400s_naming_the_field_and_a_full_server_answers_429(tiny):
    with serve(tiny, limits=SMALL) as (engine, url):
        cases = [
            ({"input_ids": [5], "sampling_params": {"n": 5}}, ["n", "--max-n"]),
            ({"input_ids": [[5]] * 4}, ["input_ids", "--max-batch-size"]),
            ({"text": ["a"] * 4}, ["text", "--max-batch-size"]),
            ({"input_ids": [5], "sampling_params": {"stop": ["a", "b", "c"]}}, ["stop", "--max-stop"]),
            ({"input_ids": [5], "sampling_params": {"stop_token_ids": [1, 2, 3]}}, ["stop_token_ids"]),
            ({"input_ids": [[5]] * 3, "sampling_params": {"n": 3}}, ["9 generations", "--max-queued-requests"]),
            ({"input_ids": [5], "sampling_params": {"sampling_seed": 2**64}}, ["sampling_seed"]),
            ({"input_ids": [5], "return_logprob": True, "top_logprobs_num": 10**6}, ["top_logprobs_num"]),
            ({"input_ids": [5], "rid": "r" * 10_000}, ["rid"]),
        ]
        for body, needles in cases:
            status, res = post(url + "/generate", body)
            assert status == 400 and all(n in res["message"] for n in needles), (body, res)
        status, res = post(url + "/v1/completions", {"prompt": ["a"] * 4, "max_tokens": 1})
        assert status == 400 and "--max-batch-size" in res["message"]

        async def main():
            async with aiohttp.ClientSession() as session:
                full = asyncio.create_task(apost(session, url + "/generate",
                                                 {"input_ids": [[5], [6]], "sampling_params": {**LONG, "n": 4}}))
                await until(lambda: engine.load()["num_running_reqs"] == 8)
                busy = await apost(session, url + "/generate", {"input_ids": [7], "sampling_params": LONG})
                chat = await apost(session, url + "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
                engine.abort(None)
                first = await full
                after = await apost(session, url + "/generate", {"input_ids": [7], "sampling_params": {"n": 4}})
                return busy, chat, first, after

        busy, chat, first, after = asyncio.run(main())
        for status, res in (busy, chat):
            assert status == 429 and res["code"] == 429 and "--max-queued-requests" in res["message"], res
        assert first[0] == 200 and len(first[1]) == 8
        assert after[0] == 200 and len(after[1]) == 4  # the slots came back


def test_body_limits_compressed_bodies_and_read_timeouts(tiny):
    with serve(tiny, limits=SMALL) as (engine, url):
        limit = SMALL.max_body_bytes
        big = json.dumps({"input_ids": [5], "pad": "x" * limit}).encode()
        status, res = post(url + "/generate", raw=big)
        assert status == 413 and "--max-body-mb" in res["message"]

        async def chunked():  # no Content-Length: the limit holds while reading
            async def body():
                for _ in range(4):
                    yield b" " * (limit // 2)
            async with aiohttp.ClientSession() as session:
                async with session.post(url + "/generate", data=body()) as resp:
                    return resp.status, await resp.json()

        status, res = asyncio.run(chunked())
        assert status == 413 and "--max-body-mb" in res["message"]
        gz = zlib.compressobj(wbits=31)
        bomb = gz.compress(b'{"input_ids": [5], "pad": "' + b"x" * 10_000_000) + gz.flush()
        status, res = post(url + "/generate", raw=bomb, headers={"Content-Encoding": "gzip"})
        assert status == 415 and "uncompressed" in res["message"]

        # A body that never completes: 408 after body_timeout_s; headers that never complete: the socket is cut.
        started = time.monotonic()
        raw = raw_exchange(url, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"input_ids\"")
        assert status_of(raw) == 408 and time.monotonic() - started < SMALL.body_timeout_s + 3, raw[:300]
        host, port = url.removeprefix("http://").split(":")
        socks = [socket.create_connection((host, int(port)), timeout=10) for _ in range(50)]
        started = time.monotonic()
        try:
            for sock in socks:
                sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Le")
            assert all(sock.recv(100) == b"" for sock in socks)  # closed by the server
        finally:
            for sock in socks:
                sock.close()
        assert time.monotonic() - started < SMALL.header_timeout_s + 3
        assert post(url + "/generate", {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}})[0] == 200


def test_a_body_slower_than_the_header_deadline_is_not_cut(tiny):
    """The header deadline guards headers only: a request whose headers arrived, whose body comes in parts over
    longer than header_timeout_s (but within body_timeout_s) gets its answer, not a closed socket."""
    limits = dataclasses.replace(SMALL, header_timeout_s=0.5, body_timeout_s=10.0)
    with serve(tiny, limits=limits) as (engine, url):
        body = json.dumps({"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
            for i in range(0, len(body), 8):  # 8 bytes every 0.3 s: ~2 s in all, 4 header deadlines
                time.sleep(0.3)
                sock.sendall(body[i:i + 8])
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        assert status_of(raw) == 200, raw[:300]


class HealthProbe:
    """GET /health in a loop on its own thread, on one keep-alive connection; every latency."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.conn = httpclient.HTTPConnection(host, int(port), timeout=30)
        self.latencies: list[float] = []
        self._first = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self.conn.request("GET", "/health")
            resp = self.conn.getresponse()
            resp.read()
            assert resp.status == 200
            self.latencies.append(time.perf_counter() - started)
            self._first.set()
            self._stop.wait(0.005)

    def wait_for(self, count: int) -> None:
        """Until `count` answers were recorded (the last ones may start after the load ended)."""
        deadline = time.monotonic() + 30
        while len(self.latencies) < count and time.monotonic() < deadline:
            self._first.clear()
            self._first.wait(1)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        assert self._first.wait(30)
        self.latencies.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(30)
        self.conn.close()


def post_bytes(url: str, raw: bytes, headers: dict[str, str]) -> int:
    """POST `raw`; the status (the answer is read and dropped)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=300)
    try:
        conn.request("POST", "/" + url.split("/", 3)[3], body=raw, headers={"Content-Type": "application/json",
                                                                              **headers})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_health_answers_within_100ms_under_max_n_a_max_size_body_and_a_gzip_body(tiny, tmp_path):
    """Measured on a `slime-rl serve` process of its own with the default limits (what is promised)."""
    limits = ServerLimits()
    prompts = limits.max_queued_requests // limits.max_n
    small_ints = b"[" + b"0," * (limits.max_body_bytes // 2 - 100) + b"0]"  # the most JSON values per byte
    heavy = [  # (name, body, headers, expected status)
        ("max n", json.dumps({"text": ["12+3="] * prompts,
                              "sampling_params": {"n": limits.max_n, "max_new_tokens": 4}}).encode(), {}, 200),
        ("max-size body", b'{"input_ids": [5], "sampling_params": {"max_new_tokens": 1}, "pad": ' + small_ints + b"}",
         {}, 200),
        ("gzip body", zlib.compress(b"[" * 300 * 2**20), {"Content-Encoding": "gzip"}, 415),
    ]
    server = launch_server("health", tiny.model_dir, tmp_path)
    try:
        wait_healthy(server, time.monotonic() + START_TIMEOUT_S)
        for name, raw, headers, expect in heavy:
            assert len(raw) <= limits.max_body_bytes, name
            worsts = []
            for _ in range(2):  # a second try when the first was slow: the suite's other worker shares 2 cores
                # The probe's own process must not stall either: the heavy answers are read as bytes, not parsed,
                # and this process's garbage collector (pytest holds millions of objects) waits until the end.
                gc.disable()
                try:
                    with HealthProbe(server.url) as probe:
                        for _ in range(3 if name == "gzip body" else 1):  # (the bomb is refused at once)
                            status = post_bytes(server.url + "/generate", raw, headers)
                            assert status == expect, (name, server.log_tail())
                        probe.wait_for(3)
                finally:
                    gc.enable()
                worsts.append(max(probe.latencies))
                print(f"{name}: {len(probe.latencies)} /health calls during the request, slowest "
                      f"{worsts[-1] * 1000:.1f} ms")
                if worsts[-1] < 0.1:
                    break
            assert min(worsts) < 0.1, f"{name}: /health took {[round(w * 1000) for w in worsts]} ms"
    finally:
        server.stop()


# ---- 5. finite numbers ---------------------------------------------------------------------------


def test_non_finite_numbers_are_refused_and_responses_are_strict_json(tiny):
    with serve(tiny) as (engine, url):
        for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
            for key in (b"temperature", b"top_p"):
                body = b'{"input_ids": [5], "sampling_params": {"' + key + b'": ' + literal + b"}}"
                status, res = post(url + "/generate", raw=body)
                assert status == 400 and f"sampling_params.{key.decode()} must be a finite number" in res["message"]
        body = b'{"prompt": "ab", "max_tokens": 1, "temperature": NaN}'
        status, res = post(url + "/v1/completions", raw=body)
        assert status == 400 and "temperature" in res["message"]
        # A temperature too small to divide by samples greedily (as SGLang), never NaN logprobs.
        status, res = post(url + "/generate", {"input_ids": [5], "return_logprob": True,
                                               "sampling_params": {"temperature": 1e-300, "max_new_tokens": 3}})
        assert status == 200 and all(t[0] is not None for t in res["meta_info"]["output_token_logprobs"])
        # NaN weights are refused, and the weights stay as they were.
        before = engine.weights_checksum()
        name = "model.layers.0.mlp.up_proj.weight"
        bad = torch.full_like(tiny.weights[name], float("nan"))
        status, res = post(url + "/update_weights_from_tensor",
                           {"serialized_named_tensors": [_b64([(name, bad)])], "weight_version": 3})
        assert status == 400 and res["success"] is False and name in res["message"], res
        assert engine.weights_checksum() == before and engine.get_weight_version() == 0
    assert dumps({"a": [1.0, float("nan"), float("-inf")]}) == '{"a": [1.0, null, null]}'


def _b64(obj: Any) -> str:
    import base64
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode()


# ---- 6. weight-group init to a dead peer -----------------------------------------------------------


def test_group_init_to_a_dead_peer_times_out_and_frees_the_weight_lock(tiny):
    limits = ServerLimits(group_init_timeout_s=1.0)
    silent = socket.socket()  # accepts connections, never answers: the rendezvous can only time out
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        with serve(tiny, limits=limits) as (engine, url):
            for port in (silent.getsockname()[1], free_port()):
                started = time.monotonic()
                status, res = post(url + "/init_weights_update_group",
                                   {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1,
                                    "world_size": 2, "group_name": "g", "backend": "gloo"})
                elapsed = time.monotonic() - started
                assert status == 400 and "could not join" in res["message"], res
                assert elapsed < limits.group_init_timeout_s + 4, elapsed
                started = time.monotonic()  # the weight lock is free again
                assert post(url + "/abort_weight_update", {})[0] == 200
                assert time.monotonic() - started < 2
    finally:
        silent.close()


# ---- 7 and 8. malformed input is a 4xx; disk loads stay inside the model directory --------------------


def test_malformed_bodies_and_model_directories_are_400s(tiny, tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    with serve(tiny) as (engine, url):
        for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/abort_request",
                     "/update_weights_from_tensor"):
            status, res = post(url + path, raw=deep)
            assert status == 400 and "nested too deeply" in res["message"], (path, res)
        status, res = post(url + "/generate", raw=b'{"text": "\\ud800"}')
        assert status == 400 and "text" in res["message"]
        secret = tmp_path / "secret.safetensors"
        secret.write_bytes((tiny.model_dir / "model.safetensors").read_bytes())
        cases = {
            "junk": {"model.safetensors": b"not a safetensors file"},
            "no-weight-map": {"model.safetensors.index.json": b'{"metadata": {}}'},
            "index-not-json": {"model.safetensors.index.json": b"{"},
            "escape": {"model.safetensors.index.json": json.dumps(
                {"weight_map": {"model.embed_tokens.weight": "../secret.safetensors"}}).encode()},
            "absolute": {"model.safetensors.index.json": json.dumps(
                {"weight_map": {"model.embed_tokens.weight": str(secret)}}).encode()},
        }
        for name, files in cases.items():
            model_dir = tmp_path / name
            model_dir.mkdir()
            for file, data in files.items():
                (model_dir / file).write_bytes(data)
            status, res = post(url + "/update_weights_from_disk", {"model_path": str(model_dir), "weight_version": 1})
            assert status == 400 and res["success"] is False, (name, res)
            assert "Traceback" not in res["message"] and "Error:" not in res["message"], (name, res)
        status, res = post(url + "/update_weights_from_disk", {"model_path": str(tmp_path / "missing")})
        assert status == 400 and res["success"] is False
        assert engine.get_weight_version() == 0 and http("GET", url + "/health")[0] == 200
