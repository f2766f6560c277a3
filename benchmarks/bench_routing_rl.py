"""Benchmark: router settings for RL rollouts — multi-turn conversations that share a long system prompt.

    .venv/bin/python benchmarks/bench_routing_rl.py [--servers 3 --conversations 24 --turns 4 --out PATH]

The RL case sglang-router's defaults get wrong: every conversation starts with
the same 200-token system prompt. `cache_aware` follows the longest cached
prefix when it covers more than `--cache-threshold` (0.3) of the prompt, and
the shared system prompt always does, so every first turn — and with it every
conversation — goes to the worker that saw the system prompt first; load
balancing only starts once a worker has `--balance-abs-threshold` (64) more
requests in flight than another, which a rollout of this size never reaches.

Settings compared side by side (same servers, caches flushed before each run):

- `cache_aware (defaults)`: what `rollout/router.py` passed before (policy
  cache_aware, sglang-router's default thresholds);
- `cache_aware (rl)`: `ROUTER_SETTINGS["cache_aware_rl"]` — balance as soon as
  loads differ by 2 requests and 10 %;
- `manual (rl)`: `ROUTER_SETTINGS["rl"]`, what jobs use — session affinity on
  the `X-SMG-Routing-Key` header that `EngineClient` sends per conversation
  (group), new keys placed on the least-loaded worker (`--assignment-mode
  min_load`): a conversation stays where its KV is, and conversations spread;
- `round_robin`, the no-affinity reference.

Reported per run: cached/prompt tokens (sum of meta_info.cached_tokens over
prompt_tokens), the largest share of requests one worker served, affinity
(the share of later turns served by the same worker as the turn before).
Target for the RL settings: cached/prompt >= 0.8 and no worker above half of
the requests. Writes JSON to --out (default benchmarks/results/routing_rl.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_routing import _version, run_routed, serving  # noqa: E402
from rollout.router import ROUTER_SETTINGS  # noqa: E402
from slime_rl.tokenizer import CharTokenizer  # noqa: E402

CONFIGS = {  # name: (policy, sglang-router flags, send a routing key per conversation)
    "cache_aware (defaults)": ("cache_aware", {}, False),
    "cache_aware (rl)": (ROUTER_SETTINGS["cache_aware_rl"]["policy"], ROUTER_SETTINGS["cache_aware_rl"]["flags"],
                         False),
    "manual (rl)": (ROUTER_SETTINGS["rl"]["policy"], ROUTER_SETTINGS["rl"]["flags"], True),
    "round_robin": ("round_robin", {}, False),
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--conversations", type=int, default=24)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-len", type=int, default=200, help="tokens of the system prompt every conversation shares")
    p.add_argument("--user-len", type=int, default=24, help="tokens in each user message")
    p.add_argument("--prompt-len", type=int, default=24, help="tokens of the first user message (after the system "
                   "prompt)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "routing_rl.json"))
    args = p.parse_args(argv)
    longest = args.system_len + args.prompt_len + args.turns * (args.max_new_tokens + args.user_len)
    vocab = CharTokenizer().vocab_size

    runs = []
    with serving(args.servers, longest, "bench_routing_rl_") as servers:
        for name in args.configs:
            policy, flags, keyed = CONFIGS[name]
            result = run_routed(servers, args, vocab, policy=policy, extra_args=flags, keyed=keyed)
            runs.append({"config": name, "policy": policy, "flags": flags, "routing_key": keyed, **result})
            print(f"  {name:24s} cached/prompt {result['cached_ratio']:.3f}  max worker share "
                  f"{result['max_worker_share']:.2f}  affinity {result['affinity']:.2f}", flush=True)

    print(f"\n{'settings':24s} {'cached/prompt':>13s} {'max share':>9s} {'affinity':>8s}  requests per worker")
    for r in runs:
        print(f"{r['config']:24s} {r['cached_ratio']:13.3f} {r['max_worker_share']:9.2f} {r['affinity']:8.2f}  "
              f"{list(r['requests_per_worker'].values())}")
    rl = next((r for r in runs if r["config"] == "manual (rl)"), None)
    met = rl is not None and rl["cached_ratio"] >= 0.8 and rl["max_worker_share"] <= 0.5
    print(f"target (RL settings: cached/prompt >= 0.8, no worker above 0.5 of the requests): "
          f"{'met' if met else 'NOT met'}")
    result = {
        "benchmark": "routing_rl", "args": {k: v for k, v in vars(args).items() if k != "out"}, "runs": runs,
        "target": {"cached_ratio_min": 0.8, "max_worker_share_max": 0.5}, "target_met": met,
        "env": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                "sglang_router": _version("sglang-router"), "aiohttp": aiohttp.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
