"""Routing across embedded servers: sglang-router 0.3.2 and the built-in fallback, side by side.

Four `slime_rl serve` subprocesses share one tiny random model (char tokenizer);
each gets its own weight version through `/update_weight_version`, so
`meta_info.weight_version` in every answer says which server produced it.
Every routing test runs against both routers (`start_router(prefer=...)`).

Observed on a shared 2-core CPU box (what the kill test pins down): with one
probe per second and `--health-failure-threshold 1`, sglang-router lists a
SIGKILLed worker unhealthy 0.94-1.0 s after the kill; the 20-40 requests sent
in that window all succeeded (those routed to the dead worker got a connection
error and were retried on the other one, adding < 0.1 s). The built-in router
ejects the worker on the first connection error (~0.1 s after the kill) and
retries elsewhere; no request failed either.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import rollout.router as router_mod
from rollout.builtin_router import BuiltinRouter, PrefixIndex, routing_text
from rollout.router import SGLangRouter, free_port, http_json, start_router
from server_procs import START_TIMEOUT_S, ServerProc, launch_versioned
from slime_rl.hf_io import init_tiny_model, save_hf_checkpoint, tiny_hf_config
from slime_rl.tokenizer import CharTokenizer

KINDS = ("sglang-router", "builtin")
SERVER_NAMES = ("a", "b", "victim-sglang-router", "victim-builtin")
VOCAB = CharTokenizer().vocab_size


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    config = tiny_hf_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=1, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("router_model")
    save_hf_checkpoint(path, config, init_tiny_model(config, seed=0), tokenizer=CharTokenizer())
    return path


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory) -> dict[str, ServerProc]:
    """a, b (shared by all tests) and one victim per router kind for the kill test; started concurrently."""
    log_dir = tmp_path_factory.mktemp("router_logs")
    procs: dict[str, ServerProc] = {}
    try:
        launch_versioned(SERVER_NAMES, model_dir, log_dir, procs)
        yield procs
    finally:
        for server in procs.values():
            server.stop()


@pytest.fixture
def make_router():
    """start_router(prefer=kind) that must give the router asked for; all stopped at teardown."""
    routers = []

    def make(kind: str, urls: list[str], policy: str, **kwargs):
        router = start_router(urls, policy=policy, prefer=kind, health_check_interval_s=1,
                              start_timeout_s=START_TIMEOUT_S, **kwargs)
        routers.append(router)
        assert isinstance(router, SGLangRouter if kind == "sglang-router" else BuiltinRouter), type(router)
        return router

    yield make
    for router in routers:
        router.stop()


# ---- helpers ------------------------------------------------------------------------------


def generate(url: str, input_ids: list[int], max_new_tokens: int = 4) -> dict:
    body = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                                        "ignore_eos": True}}
    status, out = http_json("POST", url + "/generate", body, timeout_s=60)
    assert status == 200, f"POST {url}/generate -> {status}: {out}"
    return out


def served_by(servers: dict[str, ServerProc], out: dict) -> str:
    by_version = {s.version: s.name for s in servers.values()}
    return by_version[int(out["meta_info"]["weight_version"])]


def random_ids(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]  # no pad/bos/eos


def server_stats(server: ServerProc) -> dict:
    status, info = http_json("GET", server.url + "/get_server_info")
    assert status == 200, info
    return info["internal_states"][0]


def healthy_urls(router) -> set[str]:
    return {w["url"].rstrip("/") for w in router.workers() if w["is_healthy"]}


# ---- the routing tests, against both routers ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_generate_is_spread_over_both_workers(kind, servers, make_router):
    a, b = servers["a"], servers["b"]
    router = make_router(kind, [a.url, b.url], "round_robin")
    assert healthy_urls(router) == {a.url, b.url}
    before = {s.name: server_stats(s)["prompt_tokens"] for s in (a, b)}
    rng = random.Random(1)
    outs = [generate(router.url, random_ids(5 + i, rng)) for i in range(6)]
    names = [served_by(servers, o) for o in outs]
    assert Counter(names) == {"a": 3, "b": 3}, names
    # the servers' own counters agree with where the answers say they came from
    for s in (a, b):
        expected = sum(o["meta_info"]["prompt_tokens"] for o, n in zip(outs, names) if n == s.name)
        assert server_stats(s)["prompt_tokens"] - before[s.name] == expected, s.name

    # a stream is relayed chunk by chunk: cumulative snapshots, then [DONE]. The server coalesces the
    # snapshots a slow reader has not taken yet (as SGLang does), so the stream is long enough that a busy
    # machine still yields several chunks.
    body = json.dumps({"input_ids": random_ids(6, rng), "stream": True,
                       "sampling_params": {"max_new_tokens": 64, "temperature": 0.0, "ignore_eos": True}}).encode()
    req = urllib.request.Request(router.url + "/generate", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [line[len(b"data: "):] for line in resp.read().split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]" and len(events) >= 3, events
    chunks = [json.loads(e) for e in events[:-1]]
    assert [len(c["output_ids"]) for c in chunks] == sorted(len(c["output_ids"]) for c in chunks)
    assert len(chunks[-1]["output_ids"]) == 64 and chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


@dataclass
class Sent:
    start: float
    end: float
    status: int
    server: str  # or the error


@dataclass
class Sender:
    """Sends /generate requests back to back from a thread, recording each outcome."""

    url: str
    servers: dict[str, ServerProc]
    log: list[Sent] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def run(self) -> None:
        rng = random.Random(7)
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                body = {"input_ids": random_ids(8, rng), "sampling_params": {"max_new_tokens": 2, "temperature": 0.0}}
                status, out = http_json("POST", self.url + "/generate", body, timeout_s=60)
                server = served_by(self.servers, out) if status == 200 else str(out)[:200]
            except OSError as e:
                status, server = -1, repr(e)
            with self.changed:
                self.log.append(Sent(start, time.monotonic(), status, server))
                self.changed.notify_all()

    def wait_for(self, predicate, timeout_s: float, what: str) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.log), timeout_s), f"timed out waiting for {what}"


@pytest.mark.parametrize("kind", KINDS)
def test_killed_worker_is_taken_out_of_rotation(kind, servers, make_router):
    a, victim = servers["a"], servers[f"victim-{kind}"]
    router = make_router(kind, [a.url, victim.url], "round_robin", extra_args={"health-failure-threshold": 1})
    sender = Sender(router.url, servers)
    thread = threading.Thread(target=sender.run, daemon=True)
    thread.start()
    try:
        sender.wait_for(lambda log: any(s.server == victim.name for s in log), 30, "traffic to the victim")
        killed_at = time.monotonic()
        victim.kill()
        deadline = killed_at + 15
        while victim.url in healthy_urls(router):
            assert time.monotonic() < deadline, f"{kind}: {victim.url} still healthy 15 s after SIGKILL"
            time.sleep(0.05)
        detected_at = time.monotonic()
        sender.wait_for(lambda log: sum(s.start > detected_at for s in log) >= 10, 30, "10 requests after detection")
    finally:
        sender.stop.set()
        thread.join(timeout=60)
    log = sender.log
    window = [s for s in log if killed_at <= s.start <= detected_at]
    after = [s for s in log if s.start > detected_at]
    print(f"\n{kind}: detected {detected_at - killed_at:.2f} s after SIGKILL; {len(log)} requests, "
          f"{len(window)} in the detection window (max latency "
          f"{max((s.end - s.start for s in window), default=0):.3f} s), "
          f"failures: {[s for s in log if s.status != 200]}")
    assert detected_at - killed_at < 10
    assert all(s.status == 200 and s.server == "a" for s in after), after
    assert all(s.status == 200 for s in log), [s for s in log if s.status != 200]  # retried, none lost


@pytest.mark.parametrize("kind", KINDS)
def test_add_and_remove_worker_at_run_time(kind, servers, make_router):
    a, b = servers["a"], servers["b"]
    router = make_router(kind, [a.url], "round_robin")
    rng = random.Random(2)
    assert {served_by(servers, generate(router.url, random_ids(6, rng))) for _ in range(3)} == {"a"}

    router.add_worker(b.url)
    assert healthy_urls(router) == {a.url, b.url}
    names = [served_by(servers, generate(router.url, random_ids(6, rng))) for _ in range(6)]
    assert Counter(names) == {"a": 3, "b": 3}, names

    router.remove_worker(a.url)
    assert [w["url"].rstrip("/") for w in router.workers()] == [b.url]
    assert {served_by(servers, generate(router.url, random_ids(6, rng))) for _ in range(3)} == {"b"}
    with pytest.raises(ValueError, match="not registered"):
        router.remove_worker(a.url)


@pytest.mark.parametrize("kind", KINDS)
def test_multi_turn_conversations_stick_to_their_worker(kind, servers, make_router):
    """cache_aware: each turn extends the previous prompt + response, so it must go where that prefix is cached."""
    a, b = servers["a"], servers["b"]
    router = make_router(kind, [a.url, b.url], "cache_aware")
    flushed = router.flush_cache()
    assert flushed["status"] == "success" and flushed["workers_flushed"] == 2, flushed
    rng = random.Random(3)
    prompts = [random_ids(24, rng) for _ in range(4)]
    history: list[list[tuple[str, int, int]]] = [[] for _ in prompts]  # (server, prompt_tokens, cached_tokens)
    with ThreadPoolExecutor(len(prompts)) as pool:
        for _turn in range(3):  # conversations interleaved: each round sends every conversation's next turn
            outs = list(pool.map(lambda p: generate(router.url, p, max_new_tokens=6), prompts))
            for i, out in enumerate(outs):
                meta = out["meta_info"]
                history[i].append((served_by(servers, out), meta["prompt_tokens"], meta["cached_tokens"]))
                prompts[i] = prompts[i] + out["output_ids"] + random_ids(8, rng)
    print(f"\n{kind}: (server, prompt_tokens, cached_tokens) per turn: {history}")
    for turns in history:
        assert len({server for server, _, _ in turns}) == 1, turns
        for (_, prev_prompt, _), (_, _, cached) in zip(turns, turns[1:]):
            assert cached >= prev_prompt, turns  # the whole previous prompt came from the radix cache


@pytest.mark.parametrize("kind", KINDS)
def test_routing_key_sticks_to_one_worker(kind, servers, make_router):
    """Header X-SMG-Routing-Key: the real router honours it under `manual`; the built-in one always."""
    a, b = servers["a"], servers["b"]
    router = make_router(kind, [a.url, b.url], "manual")
    rng = random.Random(4)
    for key in ("session-1", "session-2", "session-3"):
        names = set()
        for _ in range(4):
            body = json.dumps({"input_ids": random_ids(6, rng), "sampling_params": {"max_new_tokens": 2}}).encode()
            req = urllib.request.Request(router.url + "/generate", data=body, headers={
                "Content-Type": "application/json", "X-SMG-Routing-Key": key})
            with urllib.request.urlopen(req, timeout=60) as resp:
                names.add(served_by(servers, json.loads(resp.read())))
        assert len(names) == 1, (key, names)


@pytest.mark.parametrize("failure", ["module missing", "launch fails"])
def test_start_router_falls_back_to_builtin(failure, servers, monkeypatch, caplog):
    if failure == "module missing":
        monkeypatch.setattr(router_mod, "SGLANG_ROUTER_MODULE", "no_such_sglang_router_module")
        reason = "no_such_sglang_router_module"
    else:
        monkeypatch.setattr(SGLangRouter, "command", lambda self: [sys.executable, "-c", "raise SystemExit(3)"])
        reason = "exited with code 3"
    with caplog.at_level(logging.WARNING, logger="rollout.router"):
        router = start_router([servers["a"].url], prefer="sglang-router", start_timeout_s=START_TIMEOUT_S)
    try:
        assert isinstance(router, BuiltinRouter)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("falling back to the built-in router" in m and reason in m for m in warnings), warnings
        assert served_by(servers, generate(router.url, [5, 6, 7])) == "a"
    finally:
        router.stop()


# ---- built-in router pieces (no servers) ----------------------------------------------------


def test_routing_text_matches_the_real_router():
    assert routing_text("/generate", {"text": "hello"}) == "hello"
    assert routing_text("/generate", {"input_ids": [11, 12, 13]}) == "11 12 13"
    assert routing_text("/generate", {"input_ids": [[1, 2], [3]]}) == "1 2 3"
    assert routing_text("/v1/completions", {"prompt": ["ab", "cd"]}) == "ab cd"
    assert routing_text("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}) == "hi"


def test_prefix_index_follows_the_longest_live_prefix():
    index = PrefixIndex()
    index.insert("11 12 13 14 15 16 17 18", "A")
    index.insert("11 12 13 99", "B")
    url, matched = index.match("11 12 13 14 15 16 17 18 19 20", {"A", "B"})
    assert url == "A" and matched == 20  # whole 4-char blocks of "11 12 13 14 15 16 17 18"
    url, matched = index.match("11 12 13 14 15 16 17 18 19 20", {"B"})  # A is down
    assert url == "B" and matched == 8
    assert index.match("42 43 44 45", {"A", "B"}) == (None, 0)
    small = PrefixIndex(max_entries=3)
    small.insert("aaaabbbbccccdddd", "A")  # 4 blocks, the oldest evicted
    assert small.match("aaaabbbbccccdddd", {"A"}) == (None, 0)


class ToggleWorker:
    """An in-process stand-in whose GET /health answers 200 or 503 as the test says."""

    def __init__(self):
        from aiohttp import web

        self.healthy = True
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/health", self._health)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", 0).start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _health(self, request):
        from aiohttp import web

        return web.Response(status=200 if self.healthy else 503)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def wait_for_health(router, url: str, healthy: bool, timeout_s: float) -> float:
    start = time.monotonic()
    while (url in healthy_urls(router)) != healthy:
        assert time.monotonic() - start < timeout_s, f"{url} never became healthy={healthy}"
        time.sleep(0.02)
    return time.monotonic() - start


def test_builtin_health_checks_eject_and_readmit():
    worker = ToggleWorker()
    try:
        with BuiltinRouter([worker.url], health_check_interval_s=0.1, health_failure_threshold=3,
                           health_success_threshold=2).start(timeout_s=10) as router:
            assert healthy_urls(router) == {worker.url}
            worker.healthy = False
            assert wait_for_health(router, worker.url, False, 5) > 0.15  # 3 failed probes, >= 0.1 s apart
            assert http_json("GET", router.url + "/readiness")[0] == 503
            worker.healthy = True
            assert wait_for_health(router, worker.url, True, 5) > 0.05  # 2 good probes
    finally:
        worker.close()


def test_builtin_router_without_workers_answers_503():
    with BuiltinRouter([], min_healthy_workers=0, port=free_port()).start(timeout_s=10) as router:
        assert http_json("GET", router.url + "/readiness")[0] == 503
        status, body = http_json("POST", router.url + "/generate", {"input_ids": [1, 2]})
        assert status == 503 and body["error"]["code"] == "no_available_workers", body
        status, body = http_json("DELETE", router.url + "/workers/nope")
        assert status == 404 and body["code"] == "WORKER_NOT_FOUND"


def test_bad_policy_and_prefer_are_named():
    with pytest.raises(ValueError, match="round_robin"):
        SGLangRouter([], policy="fastest")
    with pytest.raises(ValueError, match="cache_aware"):
        BuiltinRouter([], policy="fastest")
    with pytest.raises(ValueError, match="prefer"):
        start_router([], prefer="nginx")
