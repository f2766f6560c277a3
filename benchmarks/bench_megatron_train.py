"""Training tokens/s of the Megatron backend, side by side in one run.

    python benchmarks/bench_megatron_train.py                      # CPU: tiny shape, megatron TP1/TP2 vs reference
    python benchmarks/bench_megatron_train.py --shape 0.5b --runs megatron:1:bfloat16 megatron:1:float32   # GPU

Each run trains `--steps` GRPO steps (after `--warmup` untimed ones) on the same
random-init model and the same packed batch of ragged sequences, and reports
tokens/s (real tokens, padding excluded) and the ratio to the first run. A run
is `backend:tp:dtype`; the reference backend (`hf`) is CPU fp32 only.
Results go to benchmarks/results/megatron_train.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from slime_rl import algorithms
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.types import Sample

SHAPES = {  # (arch, hidden, layers, heads, kv heads, intermediate, vocab)
    "tiny": ("qwen2", 256, 4, 8, 2, 768, 4096),
    "0.5b": ("qwen2", 896, 24, 14, 2, 4864, 151936),  # Qwen2-0.5B's shape
}


def make_batch(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        split = max(1, length // 4)
        resp = ids[split:]
        samples.append(Sample(prompt_ids=ids[:split], response_ids=resp, rollout_logprobs=[0.0] * len(resp),
                              loss_mask=[1] * len(resp), reward=float(i % 2)))
    batch = algorithms.build_train_batch(samples, [float(i % 3) - 1 for i in range(n)], 0, loss_agg="token")
    batch.loss_weights_BT = algorithms.token_loss_weights(batch.response_mask_BT, "token")
    return batch


def build(backend: str, tp: int, dtype: str, hf_config: dict, weights: dict, args):
    from training.hf import HFTrainer, OptimSettings

    opt = OptimSettings(lr=1e-5, micro_batch_size=args.micro_batch_size)
    if backend == "hf":
        return HFTrainer(hf_config, weights, opt)
    from training.megatron import MegatronBackend, MegatronSettings, ModelSettings

    settings = MegatronSettings(model=ModelSettings(tp=tp, dtype=dtype),
                                max_tokens_per_micro_batch=args.max_tokens_per_micro_batch)
    return MegatronBackend(hf_config, weights, opt, settings, num_ranks=tp)


def measure(trainer, batch, steps: int, warmup: int) -> float:
    loss_fn = algorithms.make_policy_loss(0.2, 0.2)
    batch.old_logprobs_BT = trainer.logprobs(batch)
    for _ in range(warmup):
        trainer.train_step(batch, loss_fn)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch, loss_fn)
    return steps * int(batch.attention_mask_BT.sum()) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--runs", nargs="+", default=["hf:1:float32", "megatron:1:float32", "megatron:2:float32"])
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--max-tokens-per-micro-batch", type=int, default=4096)
    p.add_argument("--out", default="benchmarks/results/megatron_train.json")
    args = p.parse_args()

    arch, hidden, layers, heads, kv, inter, vocab = SHAPES[args.shape]
    hf_config = tiny_hf_config(arch, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                               num_kv_heads=kv, intermediate_size=inter, max_position_embeddings=4096,
                               tie_word_embeddings=True)
    weights = init_tiny_model(hf_config, seed=0)
    n_params = sum(t.numel() for t in weights.values())
    batch = make_batch(args.sequences, args.min_len, args.max_len, vocab)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{args.shape}: {n_params / 1e6:.1f}M params, {int(batch.attention_mask_BT.sum())} tokens/step on {device}")
    results = []
    for run in args.runs:
        backend, tp, dtype = run.split(":")
        trainer = build(backend, int(tp), dtype, hf_config, weights, args)
        try:
            tps = measure(trainer, batch, args.steps, args.warmup)
        finally:
            getattr(trainer, "close", lambda: None)()
        results.append({"run": run, "tokens_per_s": tps})
        print(f"  {run:22s} {tps:10.0f} tokens/s   x{tps / results[0]['tokens_per_s']:.2f} vs {results[0]['run']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": args.shape, "params": n_params, "device": device, "args": vars(args),
                               "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
