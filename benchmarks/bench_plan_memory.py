"""The planner's memory estimate (`slime-rl plan`) against measured peaks of CPU training steps.

For (a) the default tiny model and (b) the SmolLM2-135M shape (random init from its published config:
the weights do not change the memory), one training step of each trainer backend, float32 on the CPU (4 B
weights + 4 B gradients + 8 B AdamW moments per parameter), runs on a batch of full-length rows
(data.max_prompt_tokens + rollout.max_new_tokens each) filling one micro-batch of the planner's size:
the reference backend (`training.hf.HFTrainer`) and the Megatron backend (`training.megatron.worker.
MegatronWorker`, TP 1, local spec, in this process over a one-rank gloo group). Each run is a fresh
subprocess and is measured two ways:

- allocator peak: torch's memory profiler records every CPU tensor allocation and free during a
  steady-state step (the third: the optimizer state exists, the previous step's gradients are still live
  when it starts); the peak is the most bytes live at once: the tensors that existed before the step and
  that it touches (parameters, gradients, optimizer state, the batch) plus what it allocates, minus what
  it frees. This is what the estimate models: tensor bytes.
- RSS peak: the process's peak resident set (getrusage ru_maxrss) over the first two steps (no profiler
  running) minus its resident set before the trainer was built (after a throwaway step of a one-layer
  model, so the libraries' pages and thread pools are already resident); it adds what the estimate does
  not model: allocator slack and scratch buffers.

    python benchmarks/bench_plan_memory.py            # every run, writes benchmarks/results/plan_memory.json
    python benchmarks/bench_plan_memory.py --shape tiny --backend megatron --no-save
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The planner's settings for each shape (flags as `slime-rl plan` takes them).
SHAPES = {
    "tiny": {"overrides": [], "model_name": None},
    "smollm2_135m": {"overrides": [("data.max_prompt_tokens", 64), ("rollout.max_new_tokens", 64),
                                   ("train.max_tokens_per_micro_batch", 1024), ("train.micro_batch_size", 8)],
                     "model_name": "SmolLM2-135M"},
}
BACKENDS = {"hf": [("train.backend", "hf")], "megatron": [("train.backend", "megatron"),
                                                         ("train.megatron_spec", "local")]}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_bytes(params, optimizer_state, batch) -> int:
    """Bytes of the distinct tensor storages of the parameters, their gradients, the optimizer state and the
    batch."""
    import torch

    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    for p in params:
        add(p)
        add(p.grad)
        add(getattr(p, "main_grad", None))  # megatron's gradient buffer
    for state in optimizer_state.values():
        for v in state.values():
            add(v)
    for v in vars(batch).values():
        add(v)
    return sum(seen.values())


def _allocator_peak(step) -> int:
    """The most tensor bytes live at once while `step()` runs, from torch's memory profiler: the tensors the
    step touches that existed before it (parameters, gradients, optimizer state, the batch) plus every CPU
    allocation it makes, minus its frees, in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    live = peak = 0
    for _, action, _, size in sorted(prof._memory_profile().timeline, key=lambda r: r[0]):
        if action.name in ("PREEXISTING", "CREATE"):
            live += size
        elif action.name == "DESTROY":
            live -= size
        peak = max(peak, live)
    return peak


def _warm_up(hf_config: dict, opt, loss_fn, batch) -> None:
    """A throwaway step of a one-layer model on two rows, so the libraries' pages and thread pools are
    resident before the RSS baseline is taken (they are not the trainer's memory)."""
    from training.hf import HFTrainer

    small = {**hf_config, "num_hidden_layers": 1}
    trainer = HFTrainer(small, None, opt)
    trainer.train_step(batch.select(slice(0, 2)), loss_fn)


def _megatron_runtime() -> None:
    """The one-rank gloo group, and megatron's modules imported, before the RSS baseline: they are the
    runtime's memory, not the trainer's."""
    import importlib

    import torch.distributed as dist

    from training.megatron import compat

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    compat.apply()
    for module in ("megatron.core.parallel_state", "megatron.core.models.gpt", "megatron.core.optimizer",
                   "megatron.core.distributed", "megatron.core.pipeline_parallel",
                   "megatron.core.models.gpt.gpt_layer_specs", "megatron.core.transformer.module"):
        importlib.import_module(module)


def _build(backend: str, cfg, hf_config: dict, opt):
    """(train_step(batch, loss), params, optimizer state) of a random-init trainer of `backend`."""
    import torch

    torch.manual_seed(0)
    if backend == "hf":
        from training.hf import HFTrainer

        trainer = HFTrainer(hf_config, None, opt, fused_logprob=cfg.train.fused_logprob)
        trainer.shared_prefix = False  # the plain forward (rows here share no prompt anyway)
        return trainer.train_step, list(trainer.model.parameters()), trainer.optimizer.state
    from training.hf.backend import build_hf_model
    from training.megatron.model import ModelSettings
    from training.megatron.worker import MegatronSettings, MegatronWorker

    t = cfg.train
    hf_state = build_hf_model(hf_config, None).state_dict()
    settings = MegatronSettings(model=ModelSettings(spec=t.megatron_spec, dtype=t.dtype,
                                                    vocab_pad_multiple=t.vocab_pad_multiple,
                                                    fused_logprob=t.fused_logprob),
                                max_tokens_per_micro_batch=t.max_tokens_per_micro_batch)
    worker = MegatronWorker(hf_config, hf_state, settings, opt)
    del hf_state
    optimizer = worker.optimizer
    state = getattr(getattr(optimizer, "optimizer", optimizer), "state", {})
    return worker.train_step, worker._params(), state


def measure(shape: str, backend: str = "hf", rss: bool = True) -> dict:
    """One shape and backend, in this process: the planner's estimate and the measured peaks (the RSS one
    only when `rss` and this process has run nothing bigger before: ru_maxrss is a lifetime peak)."""
    import torch

    from slime_rl.algorithms import build_train_batch, make_policy_loss
    from slime_rl.config import build_config
    from slime_rl.planner import megatron_layout, micro_batch_tokens, resolve_model, trainer_memory, trainer_total
    from slime_rl.types import Sample
    from training.hf import OptimSettings

    spec = SHAPES[shape]
    cfg = build_config(overrides=spec["overrides"] + BACKENDS[backend])
    facts = resolve_model(cfg, spec["model_name"])
    estimate = trainer_memory(cfg, facts, megatron_layout(cfg, facts), stage=0, device="cpu")
    T, S = micro_batch_tokens(cfg)
    rows, P = T // S, cfg.data.max_prompt_tokens
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(rows):
        ids = torch.randint(3, facts.vocab, (S,), generator=g).tolist()
        samples.append(Sample(prompt_ids=ids[:P], response_ids=ids[P:], rollout_logprobs=[0.0] * (S - P)))
    batch = build_train_batch(samples, torch.randn(rows, generator=g).tolist(), pad_id=0, loss_agg="token")
    batch.old_logprobs_BT = batch.rollout_logprobs_BT.clone()  # the ratio's reference (its values do not matter)
    hf_config = {**facts.hf_config, "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32",
                 "max_position_embeddings": max(S, 128)}
    t = cfg.train
    opt = OptimSettings(lr=1e-5, micro_batch_size=t.micro_batch_size,
                        max_tokens_per_micro_batch=t.max_tokens_per_micro_batch)
    loss_fn = make_policy_loss(0.2, 0.2)
    if backend == "megatron":
        _megatron_runtime()
    if rss:
        _warm_up(hf_config, opt, loss_fn, batch)
    rss_before = _rss_bytes()
    train_step, params, optimizer_state = _build(backend, cfg, hf_config, opt)
    seconds = []
    for _ in range(2 if rss else 1):
        start = time.perf_counter()
        train_step(batch, loss_fn)
        seconds.append(time.perf_counter() - start)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before if rss else None
    live = _live_bytes(params, optimizer_state, batch)
    alloc_peak = _allocator_peak(lambda: train_step(batch, loss_fn))
    total = trainer_total(cfg, estimate)
    return {"shape": shape, "backend": backend + (" (local spec, TP 1)" if backend == "megatron" else ""),
            "model": facts.name, "params": facts.params(), "dtype": "float32 (CPU)",
            "micro_batch": {"rows": rows, "tokens": rows * S, "longest_sequence": S, "planner_tokens": T},
            "estimate_bytes": {**estimate, "total": total},
            "measured": {"allocator_peak_bytes": alloc_peak, "live_at_step_start_bytes": live,
                         "rss_peak_bytes": rss_peak},
            "estimate_over_allocator_peak": round(total / alloc_peak, 4),
            "estimate_over_rss_peak": round(total / rss_peak, 4) if rss else None,
            "step_seconds": [round(s, 2) for s in seconds], "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append", help="default: every shape")
    parser.add_argument("--backend", choices=sorted(BACKENDS), action="append", help="default: every backend")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()
    shapes, backends = args.shape or list(SHAPES), args.backend or list(BACKENDS)
    if args.child:
        print(json.dumps(measure(shapes[0], backends[0])))
        return
    results = []
    for shape in shapes:
        for backend in backends:  # one fresh process per run: ru_maxrss is a lifetime peak
            out = subprocess.run([sys.executable, __file__, "--child", "--shape", shape, "--backend", backend],
                                 check=True, capture_output=True, text=True, cwd=ROOT)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            mib, m = 2**20, r["measured"]
            print(f"{shape} {backend}: estimate {r['estimate_bytes']['total'] / mib:.1f} MiB, allocator peak "
                  f"{m['allocator_peak_bytes'] / mib:.1f} MiB (x{r['estimate_over_allocator_peak']}), "
                  f"RSS peak {m['rss_peak_bytes'] / mib:.1f} MiB (x{r['estimate_over_rss_peak']})", flush=True)
            results.append(r)
    if not args.no_save:
        from benchmarks.machine_info import cpu_model

        path = ROOT / "benchmarks" / "results" / "plan_memory.json"
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        machine = {"cpu": cpu_model(), "cores": os.cpu_count()}
        path.write_text(json.dumps({"commit": commit, "machine": machine, "results": results}, indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
