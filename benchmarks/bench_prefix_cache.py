"""Benchmark: prefill work with the radix prefix cache vs without, GRPO-style workload, one run.

    python benchmarks/bench_prefix_cache.py [--prompts 16 --n 8 --system 256 --question 24]

Workload: `--prompts` prompts, each = one shared system prompt (`--system`
tokens) + its own question (`--question` tokens), each sampled `--n` times
(a GRPO group), max_new_tokens `--new`. Both engines get the same requests in
one `generate` call; the only difference is `enable_prefix_cache`.

Reports prefill tokens computed (the engine's own count of tokens run through
prefill forwards), cached prompt tokens, and wall / CPU time for each, and the
ratio of prefill tokens without / with the cache (target >= 4x). Outputs are
checked to be identical between the two engines (same seeds). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rollout.engine import EmbeddedEngine
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.types import GenerateRequest, SamplingParams


def requests(args) -> list[GenerateRequest]:
    g = torch.Generator().manual_seed(0)
    system = torch.randint(3, args.vocab, (args.system,), generator=g).tolist()
    out = []
    for p in range(args.prompts):
        prompt = system + torch.randint(3, args.vocab, (args.question,), generator=g).tolist()
        for i in range(args.n):
            out.append(GenerateRequest(prompt, SamplingParams(max_new_tokens=args.new, seed=p * args.n + i)))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--system", type=int, default=256, help="shared system-prompt tokens")
    ap.add_argument("--question", type=int, default=24, help="per-prompt tokens")
    ap.add_argument("--new", type=int, default=32, help="max_new_tokens")
    ap.add_argument("--vocab", type=int, default=99)
    ap.add_argument("--out", default="benchmarks/results/prefix_cache.json")
    args = ap.parse_args(argv)

    cfg = tiny_hf_config(vocab_size=args.vocab, intermediate_size=384, max_position_embeddings=1024)
    sd = init_tiny_model(cfg, seed=0)
    reqs = requests(args)
    rows, outputs = {}, {}
    for name, cached in (("radix_cache", True), ("no_cache", False)):
        engine = EmbeddedEngine(cfg, sd, max_batch_size=len(reqs), enable_prefix_cache=cached)
        t0, c0 = time.perf_counter(), time.process_time()
        outputs[name] = [o.output_ids for o in engine.generate(reqs)]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        s = engine.stats()
        rows[name] = {"prefill_tokens": s["prefill_tokens"], "prompt_tokens": s["prompt_tokens"],
                      "cached_tokens": s["cached_tokens"], "prefill_steps": s["prefill_steps"],
                      "wall_s": wall, "cpu_s": cpu}
        engine.close()
    same = outputs["radix_cache"] == outputs["no_cache"]
    ratio = rows["no_cache"]["prefill_tokens"] / rows["radix_cache"]["prefill_tokens"]
    result = {"benchmark": "prefix_cache", "workload": vars(args), "rows": rows,
              "prefill_token_reduction": ratio,
              "cpu_speedup": rows["no_cache"]["cpu_s"] / rows["radix_cache"]["cpu_s"],
              "identical_outputs": same}
    print(f"{'engine':<13}{'prompt tok':>12}{'cached':>10}{'prefilled':>11}{'steps':>7}{'CPU s':>8}")
    for name, r in rows.items():
        print(f"{name:<13}{r['prompt_tokens']:>12}{r['cached_tokens']:>10}{r['prefill_tokens']:>11}"
              f"{r['prefill_steps']:>7}{r['cpu_s']:>8.2f}")
    print(f"\nprefill tokens without / with the radix cache: {ratio:.1f}x (target >= 4x); "
          f"CPU time {result['cpu_speedup']:.2f}x; identical outputs: {same}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
