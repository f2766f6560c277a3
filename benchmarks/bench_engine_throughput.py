"""Benchmark: embedded engine vs transformers `generate`, same model, same prompts, one run.

    python benchmarks/bench_engine_throughput.py [--prompts 64 --rounds 3 --out PATH]

Workload: `--prompts` prompts of mixed lengths (8..96 tokens) with mixed
max_new_tokens, sampled at temperature 1 with no stop token, so every request
produces exactly its own max_new_tokens in every system. `--lengths longtail`
(default) draws max_new_tokens like RL response lengths: log-normal, median
~32, clipped to [8, 256], so a few requests run far longer than most;
`--lengths uniform` draws them uniformly from [8, 64]. The model is
a random-init Llama (the default job's shape unless flags say otherwise),
loaded with the same weights into both systems.

Systems, timed round-robin so machine noise hits them alike:
- `engine`: EmbeddedEngine.generate on all requests at once (continuous batching);
- `hf_batched`: one `model.generate` call over the left-padded batch with
  max_new_tokens = the largest request's (transformers cannot mix per-request
  lengths in one call); only each request's own tokens count as useful;
- `hf_sequential`: one `model.generate` call per request, its own max_new_tokens.

Reports useful tokens/s per system and engine / best-HF as the headline ratio
(target >= 3x). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from rollout.engine import EmbeddedEngine
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.types import GenerateRequest, SamplingParams


def workload(n: int, vocab: int, seed: int, lengths: str = "longtail") -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(8, 97, (n,), generator=g).tolist()
    if lengths == "uniform":
        news = torch.randint(8, 65, (n,), generator=g).tolist()
    else:
        news = (torch.randn(n, generator=g) * 0.8 + 3.5).exp().clamp(8, 256).long().tolist()
    return [(torch.randint(3, vocab, (p,), generator=g).tolist(), m) for p, m in zip(lens, news)]


def run_engine(engine: EmbeddedEngine, work) -> int:
    engine.flush_cache()  # earlier rounds ran the same prompts: no cross-round prefix reuse
    reqs = [GenerateRequest(p, SamplingParams(temperature=1.0, max_new_tokens=m, seed=i)) for i, (p, m) in enumerate(work)]
    outs = engine.generate(reqs)
    assert all(len(o.output_ids) == m for o, (_, m) in zip(outs, work)), "engine stopped early"
    return sum(len(o.output_ids) for o in outs)


def _hf_generate(model, ids_BT, attn_BT, max_new: int):
    return model.generate(input_ids=ids_BT, attention_mask=attn_BT, max_new_tokens=max_new, min_new_tokens=max_new,
                          do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0)


def run_hf_batched(model, work) -> int:
    P = max(len(p) for p, _ in work)
    ids = torch.zeros(len(work), P, dtype=torch.long)
    attn = torch.zeros(len(work), P, dtype=torch.long)
    for b, (p, _) in enumerate(work):
        ids[b, P - len(p):] = torch.tensor(p)
        attn[b, P - len(p):] = 1
    with torch.inference_mode():
        out = _hf_generate(model, ids, attn, max(m for _, m in work))
    assert out.shape[1] == P + max(m for _, m in work)
    return sum(m for _, m in work)


def run_hf_sequential(model, work) -> int:
    total = 0
    with torch.inference_mode():
        for p, m in work:
            ids = torch.tensor([p])
            out = _hf_generate(model, ids, torch.ones_like(ids), m)
            total += out.shape[1] - len(p)
    return total


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs every system once)")
    ap.add_argument("--lengths", choices=("longtail", "uniform"), default="longtail",
                    help="distribution of max_new_tokens (see module docstring)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=99)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--out", default="benchmarks/results/engine_throughput.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = tiny_hf_config(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                         intermediate_size=3 * args.hidden, max_position_embeddings=512)
    sd = init_tiny_model(cfg, seed=0)
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})).eval()
    hf.load_state_dict(sd, strict=False)
    hf.tie_weights()
    engine = EmbeddedEngine(cfg, sd, max_batch_size=args.prompts)
    work = workload(args.prompts, args.vocab, seed=1, lengths=args.lengths)
    systems = {"engine": lambda: run_engine(engine, work), "hf_batched": lambda: run_hf_batched(hf, work),
               "hf_sequential": lambda: run_hf_sequential(hf, work)}
    for fn in systems.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in systems}
    cpu: dict[str, list[float]] = {k: [] for k in systems}
    tokens: dict[str, int] = {}
    for r in range(args.rounds):
        for name, fn in systems.items():
            t0, c0 = time.perf_counter(), time.process_time()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    tps = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
    cpu_tps = {k: tokens[k] / statistics.median(v) for k, v in cpu.items()}
    best_hf = max(tps["hf_batched"], tps["hf_sequential"])
    result = {
        "benchmark": "engine_throughput",
        "workload": {"prompts": args.prompts, "prompt_len": "8..96", "max_new_tokens": args.lengths,
                     "max_new_tokens_sum": sum(m for _, m in work), "max_new_tokens_max": max(m for _, m in work),
                     "useful_tokens": tokens["engine"]},
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                  "params": sum(t.numel() for t in sd.values())},
        "tokens_per_s": tps,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "tokens_per_cpu_s": cpu_tps,
        "cpu_speedup_vs_best_hf": cpu_tps["engine"] / max(cpu_tps["hf_batched"], cpu_tps["hf_sequential"]),
        "speedup_vs_hf_batched": tps["engine"] / tps["hf_batched"],
        "speedup_vs_hf_sequential": tps["engine"] / tps["hf_sequential"],
        "speedup_vs_best_hf": tps["engine"] / best_hf,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    print(f"\n{'system':<15}{'useful tok/s':>14}{'engine speedup':>16}{'tok/CPU-s':>12}{'CPU speedup':>13}")
    for k, v in tps.items():
        print(f"{k:<15}{v:>14.0f}{tps['engine'] / v:>15.2f}x{cpu_tps[k]:>12.0f}{cpu_tps['engine'] / cpu_tps[k]:>12.2f}x")
    print(f"\nengine vs best transformers generate: {result['speedup_vs_best_hf']:.2f}x wall, "
          f"{result['cpu_speedup_vs_best_hf']:.2f}x CPU time (target >= 3x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    engine.close()
    return result


if __name__ == "__main__":
    main()
