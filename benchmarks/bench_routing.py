"""Benchmark: cache-aware vs round-robin routing across embedded servers, by prefix-cache reuse.

    .venv/bin/python benchmarks/bench_routing.py [--servers 3 --conversations 96 --turns 4 --out PATH]

Starts `--servers` `slime_rl serve` subprocesses (one tiny random model, char
tokenizer), then runs the same multi-turn workload through sglang-router 0.3.2
and through the built-in router, each with `cache_aware` and with
`round_robin`, side by side in one process (worker caches flushed before every
run). A conversation starts from its own random prompt; each turn appends the
previous response and a new user message, so a turn's prompt is cached only on
the worker that served the previous turn. Conversations are interleaved: each
round sends every conversation's next turn at once, in a shuffled order (the
same order for every run; without the shuffle, round robin with conversations
a multiple of the servers would stick by accident).

Reported per run: cached-token ratio = sum(meta_info.cached_tokens) /
sum(meta_info.prompt_tokens), and affinity = the share of turns after the
first served by the same worker as the turn before (each server carries its
own weight version, so `meta_info.weight_version` names it). The headline is
the ratio cache_aware / round_robin of the cached-token ratios (target >= 2x).

What to expect: round robin puts a turn on the previous turn's worker 1/N of
the time (N servers), and otherwise often on a worker that holds an older turn
(a partial hit), so the ratio stays below N. For N = 3 and 4 turns the
expectation runs from ~1.9x (first prompt long, turns add little) to ~2.45x
(first prompt short, turns add a lot). But cache_aware only knows the prompts
it routed, not the responses, and follows a prefix only when it covers more
than --cache-threshold (0.3) of the new prompt: a turn that adds more than
~2.3x the previous prompt loses its worker (with 32-token first prompts and
64-token user messages, affinity fell to 0.72). The defaults (32-token first
prompt, 16-token responses, 40-token user messages) stay inside that bound;
`expected_ratio` below gives ~2.16x for them (printed beside the measurement);
96 conversations keep the round-robin placement noise to about +-0.07.
Wall times are recorded for context only (tiny model, CPU). Writes JSON to
--out (default benchmarks/results/routing.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rollout.client import ROUTING_KEY_HEADER  # noqa: E402
from rollout.router import free_port, http_json, start_router  # noqa: E402
from slime_rl.hf_io import init_tiny_model, save_hf_checkpoint, tiny_hf_config  # noqa: E402
from slime_rl.tokenizer import CharTokenizer  # noqa: E402

ROUTERS = ("sglang-router", "builtin")
POLICIES = ("cache_aware", "round_robin")


def make_model(directory: Path, max_positions: int) -> None:
    config = tiny_hf_config(vocab_size=CharTokenizer().vocab_size, hidden_size=64, intermediate_size=128,
                            num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=max_positions)
    save_hf_checkpoint(directory, config, init_tiny_model(config, seed=0), tokenizer=CharTokenizer())


def launch_servers(n: int, model_dir: Path, log_dir: Path, timeout_s: float = 120) -> list[tuple[str, subprocess.Popen]]:
    """n `slime_rl serve` processes, each stamped with weight version i+1; returns (url, process) pairs."""
    servers = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for i in range(n):
        port = free_port()
        with open(log_dir / f"server{i}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "slime_rl", "serve", "--model", str(model_dir),
                                     "--host", "127.0.0.1", "--port", str(port)], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        servers.append((f"http://127.0.0.1:{port}", proc))
    deadline = time.monotonic() + timeout_s
    for i, (url, proc) in enumerate(servers):
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {url} did not come up; see {log_dir / f'server{i}.log'}")
            time.sleep(0.2)
        status, body = http_json("POST", url + "/update_weight_version", {"new_version": str(i + 1)})
        if status != 200:
            raise RuntimeError(f"{url}/update_weight_version -> {status}: {body}")
    return servers


@contextlib.contextmanager
def serving(n: int, longest: int, prefix: str):
    """`n` servers of a fresh tiny model (positions for `longest` tokens) in a temp dir; stopped on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        make_model(Path(tmp) / "model", max_positions=max(512, 1 << longest.bit_length()))
        servers = launch_servers(n, Path(tmp) / "model", Path(tmp))
        try:
            yield servers
        finally:
            stop_servers(servers)


def _healthy(url: str) -> bool:
    try:
        return http_json("GET", url + "/health", timeout_s=2)[0] == 200
    except OSError:
        return False


def stop_servers(servers: list[tuple[str, subprocess.Popen]]) -> None:
    for _, proc in servers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for _, proc in servers:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def run_workload(router_url: str, args: argparse.Namespace, vocab: int, keyed: bool = False) -> dict:
    """Every conversation's turns through the router; returns per-turn (server, prompt, cached) records.

    With `args.system_len` > 0 every first prompt starts with the same system prompt of that many tokens;
    `keyed` sends a routing key per conversation (`X-SMG-Routing-Key`, as EngineClient does per group)."""
    rng = random.Random(args.seed)
    system = [rng.randrange(3, vocab) for _ in range(getattr(args, "system_len", 0))]
    prompts = [system + [rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(args.conversations)]
    users = [[[rng.randrange(3, vocab) for _ in range(args.user_len)] for _ in range(args.turns)]
             for _ in range(args.conversations)]
    orders = [rng.sample(range(args.conversations), args.conversations) for _ in range(args.turns)]
    history: list[list[tuple[str, int, int]]] = [[] for _ in prompts]
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def one(conv: int) -> None:
            headers = {ROUTING_KEY_HEADER: f"conversation-{conv}"} if keyed else {}
            async with session.post(router_url + "/generate", headers=headers,
                                    json={"input_ids": prompts[conv], "sampling_params": sampling}) as resp:
                out = await resp.json(content_type=None)
                if resp.status != 200:
                    raise RuntimeError(f"conversation {conv}: POST {router_url}/generate -> {resp.status}: {out}")
            meta = out["meta_info"]
            history[conv].append((meta["weight_version"], meta["prompt_tokens"], meta["cached_tokens"]))
            prompts[conv] = prompts[conv] + out["output_ids"] + users[conv][len(history[conv]) - 1]

        t0 = time.perf_counter()
        for order in orders:
            await asyncio.gather(*(one(conv) for conv in order))
        wall_s = time.perf_counter() - t0
    prompt = sum(p for turns in history for _, p, _ in turns)
    cached = sum(c for turns in history for _, _, c in turns)
    pairs = [(a[0], b[0]) for turns in history for a, b in zip(turns, turns[1:])]
    served = Counter(server for turns in history for server, _, _ in turns)
    requests = sum(served.values())
    return {"cached_tokens": cached, "prompt_tokens": prompt, "cached_ratio": cached / prompt,
            "affinity": sum(a == b for a, b in pairs) / len(pairs) if pairs else 1.0,
            "first_turn_servers": sorted({turns[0][0] for turns in history}), "wall_s": wall_s,
            "requests": requests, "requests_per_worker": dict(sorted(served.items())),
            "max_worker_share": max(served.values()) / requests}


def run_routed(servers: list[tuple[str, subprocess.Popen]], args: argparse.Namespace, vocab: int, *, policy: str,
               prefer: str = "sglang-router", extra_args: dict | None = None, keyed: bool = False) -> dict:
    """`run_workload` through a fresh router over `servers` (their caches flushed first); the run fails when
    sglang-router was asked for and the built-in router stood in."""
    with start_router([url for url, _ in servers], policy=policy, prefer=prefer, extra_args=extra_args) as router:
        if prefer == "sglang-router" and type(router).__name__ != "SGLangRouter":
            raise RuntimeError("sglang-router did not start (see the warning above)")
        flushed = router.flush_cache()
        if flushed.get("workers_flushed") != args.servers:
            raise RuntimeError(f"flush_cache through {router.url} failed: {flushed}")
        return asyncio.run(run_workload(router.url, args, vocab, keyed))


def expected_ratio(args: argparse.Namespace) -> float:
    """cache_aware / round_robin cached tokens if round robin placed each turn on a uniformly random worker.

    A turn's prompt is cached up to the prompt + response of the latest earlier
    turn on its worker (minus the last response token, which has no KV yet).
    """
    n, out = args.servers, args.max_new_tokens
    hit = [args.prompt_len + k * (out + args.user_len) + out - 1 for k in range(args.turns)]  # turn k's worker
    affine = sum(hit[t - 1] for t in range(1, args.turns))
    rr = sum(hit[k] * (1 / n) * (1 - 1 / n) ** (t - 1 - k) for t in range(1, args.turns) for k in range(t))
    return affine / rr if rr else float("inf")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--conversations", type=int, default=96)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32, help="tokens in each conversation's first prompt")
    p.add_argument("--user-len", type=int, default=40, help="tokens in each later user message")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=ROUTERS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "routing.json"))
    args = p.parse_args(argv)
    longest = args.prompt_len + (args.turns - 1) * (args.max_new_tokens + args.user_len) + args.max_new_tokens
    vocab = CharTokenizer().vocab_size

    runs = []
    with serving(args.servers, longest, "bench_routing_") as servers:
        for kind in args.routers:
            for policy in POLICIES:
                result = run_routed(servers, args, vocab, policy=policy, prefer=kind)
                runs.append({"router": kind, "policy": policy, **result})
                print(f"  {kind:14s} {policy:12s} cached/prompt {result['cached_ratio']:.3f}  "
                      f"affinity {result['affinity']:.2f}", flush=True)

    speedups = {}
    for kind in args.routers:
        by_policy = {r["policy"]: r["cached_ratio"] for r in runs if r["router"] == kind}
        rr = by_policy["round_robin"]
        speedups[kind] = by_policy["cache_aware"] / rr if rr > 0 else float("inf")
    print(f"\n{'router':14s} {'policy':12s} {'cached/prompt':>13s} {'affinity':>9s} {'cached':>7s} "
          f"{'prompt':>7s} {'wall_s':>7s}")
    for r in runs:
        print(f"{r['router']:14s} {r['policy']:12s} {r['cached_ratio']:13.3f} {r['affinity']:9.2f} "
              f"{r['cached_tokens']:7d} {r['prompt_tokens']:7d} {r['wall_s']:7.2f}")
    expected = expected_ratio(args)
    for kind, ratio in speedups.items():
        print(f"{kind}: cache_aware / round_robin cached-token ratio = {ratio:.2f}x "
              f"(target >= 2x; {expected:.2f}x expected from random round-robin placement)")

    result = {
        "benchmark": "routing", "args": {k: v for k, v in vars(args).items() if k != "out"}, "runs": runs,
        "cache_aware_over_round_robin": speedups, "expected_with_random_placement": expected, "target": 2.0,
        "target_met": all(v >= 2.0 for v in speedups.values()),
        "env": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                "sglang_router": _version("sglang-router"), "aiohttp": aiohttp.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
