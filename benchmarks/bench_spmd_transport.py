"""Driver <-> trainer-rank transport: tensors through shared memory (`training.shm_channel`) vs pickled
through the pipe, side by side.

    python benchmarks/bench_spmd_transport.py                 # -> benchmarks/results/spmd_transport.json

One spawned rank (`training.spmd.spawn_ranks`, as the Megatron backend starts them) twice: with
`shared_memory=True` (the default) and `False` (every tensor pickled through the pipe, as before). For each
payload the two groups take turns call by call (A B B A ...), so drifts in the machine's speed hit both; the
median seconds per call of each, and their ratio, are reported:
- `batch`: a command carrying the default job's train batch (256 sequences x 48 tokens: ids, masks,
  logprobs, advantages, loss weights: the fields a `TrainBatch` sends), the rank replying with a small dict;
- `tiny_export`: the reply of a weight export of the default 0.4M-parameter Llama (every tensor of its HF
  state dict, fp32);
- `smollm2_export`: the same for a SmolLM2-135M-shaped state dict (random values, fp32: 538 MB).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.spmd import spawn_ranks  # noqa: E402


def llama_state_dict(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int,
                     tied: bool) -> dict[str, torch.Tensor]:
    head = hidden // heads
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden), "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": torch.randn(hidden, hidden),
               p + "self_attn.k_proj.weight": torch.randn(kv_heads * head, hidden),
               p + "self_attn.v_proj.weight": torch.randn(kv_heads * head, hidden),
               p + "self_attn.o_proj.weight": torch.randn(hidden, hidden),
               p + "mlp.gate_proj.weight": torch.randn(inter, hidden),
               p + "mlp.up_proj.weight": torch.randn(inter, hidden),
               p + "mlp.down_proj.weight": torch.randn(hidden, inter),
               p + "input_layernorm.weight": torch.ones(hidden),
               p + "post_attention_layernorm.weight": torch.ones(hidden)}
    if not tied:
        sd["lm_head.weight"] = torch.randn(vocab, hidden)
    return sd


SHAPES = {  # (vocab, hidden, intermediate, layers, heads, kv heads, tied)
    "tiny_export": (32, 128, 384, 2, 4, 2, False),
    "smollm2_export": (49152, 576, 1536, 30, 9, 3, True),
}


def train_batch(rows: int = 256, tokens: int = 48) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(rows, tokens, generator=g) < 0.7
    return {"input_ids_BT": torch.randint(0, 32, (rows, tokens), generator=g), "attention_mask_BT": mask,
            "response_mask_BT": mask.clone(), "rollout_logprobs_BT": torch.randn(rows, tokens, generator=g),
            "old_logprobs_BT": torch.randn(rows, tokens, generator=g),
            "advantages_BT": torch.randn(rows, tokens, generator=g),
            "loss_weights_BT": torch.rand(rows, tokens, generator=g), "rewards_B": torch.rand(rows, generator=g),
            "group_B": torch.arange(rows) // 8, "positions_BT": torch.arange(tokens).expand(rows, tokens).clone()}


class Worker:
    """The rank: takes a batch, or hands out a state dict of a given shape (built once)."""

    def __init__(self) -> None:
        self.exports: dict[str, dict[str, torch.Tensor]] = {}

    def take(self, batch: dict) -> dict:
        return {"loss": float(batch["advantages_BT"][0, 0]), "rows": len(batch["input_ids_BT"])}

    def export(self, shape: str) -> dict[str, torch.Tensor]:
        if shape not in self.exports:
            self.exports[shape] = llama_state_dict(*SHAPES[shape])
        return self.exports[shape]


def time_call(group, method: str, *args) -> float:
    t0 = time.perf_counter()
    group.call(method, *args)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=40, help="calls per group and payload (a fifth for smollm2)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "spmd_transport.json"))
    args = p.parse_args()
    env = {"OMP_NUM_THREADS": "1"}
    groups = {name: spawn_ranks(1, Worker, {}, env=env, timeout=600, shared_memory=name == "shared_memory")
              for name in ("shared_memory", "pickle")}
    batch = train_batch()
    payloads = {"batch": ("take", batch), "tiny_export": ("export", "tiny_export"),
                "smollm2_export": ("export", "smollm2_export")}
    results = {}
    try:
        for payload, (method, arg) in payloads.items():
            reps = max(3, args.reps // 5) if payload == "smollm2_export" else args.reps
            times = {name: [] for name in groups}
            for name, group in groups.items():  # warm-up: the rank builds the export, arenas grow
                time_call(group, method, arg)
            for i in range(reps):
                order = list(groups) if i % 2 == 0 else list(groups)[::-1]
                for name in order:
                    times[name].append(time_call(groups[name], method, arg))
            med = {name: statistics.median(t) for name, t in times.items()}
            results[payload] = {"reps": reps, "median_s": med, "times_s": times,
                                "pickle_over_shared_memory": med["pickle"] / med["shared_memory"]}
            print(f"{payload:15s} shared memory {med['shared_memory'] * 1e3:9.2f} ms | pickle "
                  f"{med['pickle'] * 1e3:9.2f} ms | pickle / shared memory "
                  f"{results[payload]['pickle_over_shared_memory']:.2f}x", flush=True)
    finally:
        for group in groups.values():
            group.close()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {"benchmark": "spmd_transport", "machine": {"cpu": platform.processor() or platform.machine(),
                                                      "torch": torch.__version__},
           "commit": commit, "batch_bytes": sum(t.numel() * t.element_size() for t in batch.values()),
           "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
