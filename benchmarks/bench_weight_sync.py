"""Weight sync from a Megatron trainer into two engine servers, as a fraction of one plain memcpy, in one run.

    python benchmarks/bench_weight_sync.py --shape tiny        # smoke run (a few MB, under a minute)
    python benchmarks/bench_weight_sync.py                     # CPU: 0.5B-shaped, TP2 -> 2 servers, shm vs gloo
    python benchmarks/bench_weight_sync.py --shape 7b --transports cuda_ipc --sweep-transports ''   # GPU, colocated

Trainer: `MegatronBackend` TP=2 on CPU/gloo (fp32 params). Engines: two `slime_rl serve --dtype bfloat16`
processes started from a bf16 checkpoint of the same random weights. "The bytes" are the engine-dtype payload
of the weight plan (~0.99 GB for the 0.5B shape). Every rank and server runs with OMP_NUM_THREADS=1.

The reference is ONE `dst.copy_(src)` of the same byte count at the engines' thread setting (1 thread);
a 2-thread copy is reported beside it. Rounds are interleaved (memcpy, then one push per transport, each a
new version; nothing is trained in between). Rounds 0-1 are warm-up (page faults of the two sets of
shared-memory files, broadcast group setup) and is reported on its own; the medians are over the other rounds. Headline:
ratio = memcpy_1thread_s / sync_total_s (1.0 would be a sync as fast as a single local copy).

Then, per transport, the smallest tensor of every bucket is overwritten on the engines, one more push runs
and `WeightSync.check()` compares every engine tensor with the trainer's export (so the check can fail; the
trainer hashes its tensors one Megatron parameter at a time on the sending ranks).
Last, a bucket-size sweep (a new WeightSync per size, 2 warm-up pushes — shared memory alternates two file sets,
each faulted in on its first write — + `--sweep-rounds` timed pushes, a memcpy before each) plotted to `--png`.
Results: `--out` (JSON).

GPU path (`--transports cuda_ipc`, untested here): the servers run `--device cuda` on the trainer's GPU and
the trainer is Megatron TP1 bf16; 7B needs ~75 GB for Megatron's bf16 params, fp32 main params and fp32 grad
buffer plus 15 GB for the engine, i.e. an H200-class GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_procs import launch_server, wait_healthy  # noqa: E402

from rollout.client import EngineClient  # noqa: E402
from slime_rl import ops  # noqa: E402
from slime_rl.config import SyncConfig  # noqa: E402
from slime_rl.hf_io import init_tiny_model, save_hf_checkpoint, tiny_hf_config  # noqa: E402
from weight_sync import WeightSync  # noqa: E402

SHAPES = {  # (arch, hidden, layers, heads, kv heads, intermediate, vocab, tied)
    "tiny": ("qwen2", 256, 4, 8, 2, 768, 4096, True),
    "0.5b": ("qwen2", 896, 24, 14, 2, 4864, 151936, True),  # Qwen2-0.5B's shape
    "7b": ("qwen2", 3584, 28, 28, 4, 18944, 152064, False),  # Qwen2-7B's shape
}
WARMUP_PUSHES = 2  # the two shared-memory file sets are each faulted in on their first write
PHASES = ("gather", "pack", "ranks", "transfer", "stage", "load", "verify", "paused", "total")
GB = 1e9


# ---------------------------------------------------------------------------------------------- measurement
class MemoryWatch:
    """Samples, every `every_s`: the anonymous RSS of this process and its descendants plus what /dev/shm holds
    (the shared-memory buckets, counted once), and the system's used memory (MemTotal - MemAvailable, which
    includes other jobs). Reads /proc/*/status counters only: walking page tables (smaps) would stall the
    processes being timed."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.peak_tree, self.peak_used, self._stop = every_s, 0, 0, threading.Event()
        self.base_used = self.used()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def used() -> int:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024

    @staticmethod
    def tree() -> int:
        pids, total = [os.getpid()], 0
        while pids:
            pid = pids.pop()
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1]) * 1024
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # the process exited meanwhile
                pass
        if os.path.isdir("/dev/shm"):
            st = os.statvfs("/dev/shm")
            total += (st.f_blocks - st.f_bfree) * st.f_frsize
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def sample(self) -> None:
        self.peak_tree = max(self.peak_tree, self.tree())
        self.peak_used = max(self.peak_used, self.used())

    @staticmethod
    def snapshot(trainer, servers: list) -> dict:
        """Anonymous RSS (GB) of the driver, each trainer rank and each server, and what /dev/shm holds, now."""
        def anon(pid: int) -> float:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return round(int(line.split()[1]) * 1024 / GB, 3)
            return 0.0

        st = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
        return {"driver": anon(os.getpid()), "ranks": [anon(p.pid) for p in getattr(trainer.group, "processes", [])],
                "servers": [anon(s.proc.pid) for s in servers],
                "dev_shm": round((st.f_blocks - st.f_bfree) * st.f_frsize / GB, 3) if st else 0.0}

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_tree_gb": self.peak_tree / GB, "peak_system_used_gb": self.peak_used / GB,
                "system_used_at_start_gb": self.base_used / GB}


class Memcpy:
    """One `dst.copy_(src)` of `nbytes`, both buffers allocated and pre-touched once."""

    def __init__(self, nbytes: int, device: str):
        self.device = device
        self.src = torch.ones(nbytes, dtype=torch.uint8, device=device)
        self.dst = torch.zeros(nbytes, dtype=torch.uint8, device=device)

    def seconds(self, threads: int) -> float:
        torch.set_num_threads(threads)
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        self.dst.copy_(self.src)
        sync()
        out = time.perf_counter() - t0
        torch.set_num_threads(1)
        return out


def phases(metrics: dict) -> dict[str, float]:
    return {p: metrics.get(f"sync/{p}_s", 0.0) for p in PHASES}


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def _rank_threads(source, spec) -> dict:
    """Runs on every trainer rank (via send_weights): the thread setting the rank really has."""
    return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


# ---------------------------------------------------------------------------------------------- setup
def build_config(shape: str) -> dict:
    arch, hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    return tiny_hf_config(arch, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                          num_kv_heads=kv, intermediate_size=inter, max_position_embeddings=4096,
                          tie_word_embeddings=tied)


def start(args, hf_config: dict, work: Path, log=print):
    """Random weights -> bf16 checkpoint -> engine servers + Megatron trainer; the fp32 dict is dropped."""
    from training.hf import OptimSettings
    from training.megatron import MegatronBackend, MegatronSettings, ModelSettings

    t0 = time.perf_counter()
    weights = init_tiny_model(hf_config, seed=0)
    n_params = sum(t.numel() for t in weights.values())
    dtype = getattr(torch, args.dtype)
    save_hf_checkpoint(work / "model", hf_config, {k: v.to(dtype) for k, v in weights.items()})
    log(f"{n_params / 1e6:.1f}M params; {args.dtype} checkpoint written in {time.perf_counter() - t0:.0f}s")
    extra = ["--dtype", args.dtype, "--max-total-tokens", "256"] + (["--device", "cuda"] if args.cuda else [])
    servers = [launch_server(f"engine{i}", work / "model", work, *extra) for i in range(args.engines)]
    trainer = None
    try:
        tp, trainer_dtype = (1, "bfloat16") if args.cuda else (args.tp, "float32")
        settings = MegatronSettings(model=ModelSettings(tp=tp, dtype=trainer_dtype))
        trainer = MegatronBackend(hf_config, weights, OptimSettings(), settings, num_ranks=tp)
        del weights
        gc.collect()
        deadline = time.monotonic() + args.start_timeout
        for s in servers:
            wait_healthy(s, deadline)
    except BaseException:
        for s in servers:
            s.stop()
        if trainer is not None:
            trainer.close()
        raise
    log(f"trainer (Megatron TP{tp}, {trainer_dtype}) and {len(servers)} servers up in {time.perf_counter() - t0:.0f}s")
    return n_params, trainer, servers


def poison(clients: list, plan) -> list[str]:
    """Overwrite the smallest tensor of every bucket on every engine (weights only the next push restores)."""
    dtype = getattr(torch, plan.dtype)
    named = [(t.name, torch.full(t.shape, 0.123, dtype=dtype)) for b in plan.buckets
             for t in [min(b.tensors, key=lambda t: t.nbytes)]]
    for c in clients:
        c.update_weights_from_tensors(named, 0)
    return [n for n, _ in named]


# ---------------------------------------------------------------------------------------------- the runs
class Versions:
    def __init__(self):
        self.v = 0

    def __call__(self) -> int:
        self.v += 1
        return self.v


def interleaved(syncs: dict, memcpy: Memcpy, rounds: int, version: Versions, log=print) -> dict:
    """WARMUP_PUSHES warm-up rounds, then `rounds` timed rounds of memcpy (1 and 2 threads) + one push per
    transport."""
    copies = {1: [], 2: []}
    pushes = {kind: [] for kind in syncs}
    w = WARMUP_PUSHES
    for r in range(rounds + w):
        for threads in copies:
            copies[threads].append(memcpy.seconds(threads))
        for kind, sync in syncs.items():
            pushes[kind].append(phases(sync.push(version())))
        row = "  ".join(f"{k} {p[-1]['total']:.2f}s" for k, p in pushes.items())
        log(f"  round {r}{' (warm-up)' if r < w else ''}: memcpy {copies[1][-1]:.3f}s / {copies[2][-1]:.3f}s "
            f"(1/2 threads)  {row}")
    memcpy_s = {f"{t}thread": statistics.median(s[w:]) for t, s in copies.items()}
    out = {"memcpy_s": memcpy_s, "memcpy_warmup_s": {f"{t}thread": s[0] for t, s in copies.items()},
           "memcpy_all_s": {f"{t}thread": s for t, s in copies.items()}, "transports": {}}
    for kind, rows in pushes.items():
        med = medians(rows[w:])
        out["transports"][kind] = {
            "plan": syncs[kind].plan.summary(), "buckets": len(syncs[kind].plan.buckets),
            "warmup_s": rows[0], "median_s": med, "rounds_s": rows,
            "gbps": syncs[kind].plan.nbytes / med["total"] / GB,
            "ratio_vs_memcpy_1thread": memcpy_s["1thread"] / med["total"],
            "ratio_vs_memcpy_2thread": memcpy_s["2thread"] / med["total"]}
    return out


def checked(syncs: dict, clients: list, version: Versions, log=print) -> dict:
    """Per transport: poison one tensor per bucket on the engines, push, `check()`. {kind: result}."""
    out = {}
    for kind, sync in syncs.items():
        names = poison(clients, sync.plan)
        sync.push(version())
        bad = sync.check()
        out[kind] = {"poisoned_before_push": len(names), "mismatches": {u: len(v) for u, v in bad.items()},
                     "equal": not bad}
        log(f"  check {kind}: {names[:2]}... overwritten on the engines, pushed, check() -> {bad or '{} (equal)'}")
    return out


def sweep(trainer, clients: list, kinds: list[str], sizes: list[int], rounds: int, memcpy: Memcpy,
          version: Versions, log=print) -> list[dict]:
    """A new WeightSync per (transport, bucket MiB): 2 warm-up + `rounds` timed pushes, a memcpy before each."""
    table = []
    for kind in kinds:
        for mb in sizes:
            sync = WeightSync(trainer, clients, SyncConfig(transport=kind, bucket_mb=mb),
                              log=lambda *a: None)
            try:
                copies, rows = [], []
                for _ in range(rounds + WARMUP_PUSHES):
                    copies.append(memcpy.seconds(1))
                    rows.append(phases(sync.push(version())))
                med, plan = medians(rows[WARMUP_PUSHES:]), sync.plan
            finally:
                sync.close()
            memcpy_s = statistics.median(copies[WARMUP_PUSHES:])
            table.append({"transport": kind, "bucket_mb": mb, "buckets": len(plan.buckets),
                          "oversized": len(plan.oversized()),
                          "largest_bucket_mb": max(b.nbytes for b in plan.buckets) / 2**20,
                          "warmup_total_s": rows[0]["total"], "median_s": med,
                          "all_total_s": [r["total"] for r in rows], "gbps": plan.nbytes / med["total"] / GB,
                          "memcpy_1thread_s": memcpy_s, "memcpy_gbps": plan.nbytes / memcpy_s / GB,
                          "ratio_vs_memcpy_1thread": memcpy_s / med["total"], "plan": plan.summary()})
            r = table[-1]
            log(f"  {kind:9s} {mb:5d} MiB: {r['buckets']:3d} buckets ({r['oversized']} oversized)  "
                f"total {med['total']:.2f}s  {r['gbps']:.2f} GB/s  x{r['ratio_vs_memcpy_1thread']:.2f} of memcpy")
    return table


# ---------------------------------------------------------------------------------------------- report
def plot(table: list[dict], memcpy_gbps: dict[str, float], largest_tensor_mb: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in dict.fromkeys(r["transport"] for r in table):
        rows = [r for r in table if r["transport"] == kind]
        (line,) = ax.plot([r["bucket_mb"] for r in rows], [r["gbps"] for r in rows], "o-", label=f"{kind} sync")
        for r in rows:
            if r["oversized"]:
                ax.plot(r["bucket_mb"], r["gbps"], "o", mfc="white", color=line.get_color())
                ax.annotate(str(r["oversized"]), (r["bucket_mb"], r["gbps"]), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=7, color=line.get_color())
    styles = {"1thread": ":", "2thread": "--"}
    for name, gbps in memcpy_gbps.items():
        ax.axhline(gbps, color="gray", ls=styles.get(name, "-"), label=f"memcpy, {name.replace('thread', ' thread')}")
    ax.set_xscale("log", base=2)
    sizes = sorted({r["bucket_mb"] for r in table})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("bucket size limit (MiB)")
    ax.set_ylabel("effective GB/s (engine-dtype bytes / sync total)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.text(0.01, 0.66, "hollow: the plan has buckets past the limit (number: how many), each holding one\n"
            f"parameter larger than the limit; the largest tensor is {largest_tensor_mb:.0f} MiB",
            transform=ax.transAxes, fontsize=7, va="top")
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(res: dict) -> None:
    m = res["memcpy_s"]
    nbytes = res["bytes"]
    print(f"\n{res['shape']}: {res['params'] / 1e6:.1f}M params, {nbytes / GB:.3f} GB {res['dtype']} to "
          f"{res['engines']} engines; {res['threads']}")
    print(f"memcpy of {nbytes / GB:.3f} GB: 1 thread {m['1thread']:.3f}s ({nbytes / m['1thread'] / GB:.2f} GB/s), "
          f"2 threads {m['2thread']:.3f}s ({nbytes / m['2thread'] / GB:.2f} GB/s)")
    print(f"{'transport':10s} " + " ".join(f"{p + '_s':>10s}" for p in PHASES) + f" {'GB/s':>7s} {'x memcpy1':>9s}"
          f" {'x memcpy2':>9s} {'warm-up_s':>9s}")
    for kind, t in res["transports"].items():
        print(f"{kind:10s} " + " ".join(f"{t['median_s'][p]:10.3f}" for p in PHASES) + f" {t['gbps']:7.2f}"
              f" {t['ratio_vs_memcpy_1thread']:9.2f} {t['ratio_vs_memcpy_2thread']:9.2f} {t['warmup_s']['total']:9.2f}")
    if res["sweep"]:
        print(f"\nbucket sweep ({res['args']['sweep_rounds']} timed pushes each):")
        print(f"{'transport':10s} {'MiB':>5s} {'buckets':>7s} {'oversz':>6s} {'total_s':>8s} {'GB/s':>6s}"
              f" {'x memcpy1':>9s} {'warm-up_s':>9s}")
        for r in res["sweep"]:
            print(f"{r['transport']:10s} {r['bucket_mb']:5d} {r['buckets']:7d} {r['oversized']:6d}"
                  f" {r['median_s']['total']:8.2f} {r['gbps']:6.2f} {r['ratio_vs_memcpy_1thread']:9.2f}"
                  f" {r['warmup_total_s']:9.2f}")
    mem = res["memory"]
    print(f"\nmemory: peak {mem['peak_tree_gb']:.1f} GB (anon RSS of this process tree + /dev/shm), system used peak "
          f"{mem['peak_system_used_gb']:.1f} GB (was {mem['system_used_at_start_gb']:.1f} GB at start); "
          f"wall {res['wall_s']:.0f}s")


# ---------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    p.add_argument("--transports", default="shm,broadcast", help="comma-separated; cuda_ipc = the GPU path")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up round")
    p.add_argument("--bucket-mb", type=int, default=int(SyncConfig.bucket_mb))
    p.add_argument("--sweep-transports", default="shm,broadcast", help="comma-separated; '' skips the sweep")
    p.add_argument("--sweep-mb", default="16,32,64,128,256,512,1024")
    p.add_argument("--sweep-rounds", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", help="what the engines serve (and the bytes that move)")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out", default="benchmarks/results/weight_sync.json")
    p.add_argument("--png", default="benchmarks/results/weight_sync_buckets.png")
    args = p.parse_args()
    args.transports = [t for t in args.transports.split(",") if t]
    args.sweep_transports = [t for t in args.sweep_transports.split(",") if t]
    args.sweep_mb = [int(s) for s in args.sweep_mb.split(",") if s]
    args.cuda = "cuda_ipc" in args.transports + args.sweep_transports
    if args.cuda and not torch.cuda.is_available():
        p.error("cuda_ipc needs a CUDA GPU")
    return args


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    watch = MemoryWatch()
    loadavg_start = os.getloadavg()
    hf_config = build_config(args.shape)
    work = Path(tempfile.mkdtemp(prefix="bench_wsync_"))
    clients, syncs, trainer, servers = [], {}, None, []
    try:
        n_params, trainer, servers = start(args, hf_config, work)
        clients = [EngineClient(s.url, max_retries=0) for s in servers]
        rank_threads = trainer.send_weights(_rank_threads, None)
        threads = (f"servers OMP_NUM_THREADS=1; trainer ranks {[r['torch_threads'] for r in rank_threads]} torch "
                   f"threads; memcpy and driver 1 thread (plus a 2-thread memcpy); {os.cpu_count()} CPUs")
        print(threads)
        version = Versions()
        syncs = {kind: WeightSync(trainer, clients,
                                  SyncConfig(transport=kind, bucket_mb=args.bucket_mb)) for kind in args.transports}
        nbytes = next(iter(syncs.values())).plan.nbytes
        largest_mb = max(t.nbytes for t in next(iter(syncs.values())).plan.tensors) / 2**20
        memcpy = Memcpy(nbytes, "cuda" if args.cuda else "cpu")
        print(f"interleaved rounds ({args.rounds} timed + {WARMUP_PUSHES} warm-up), bucket limit {args.bucket_mb} MiB:")
        res = interleaved(syncs, memcpy, args.rounds, version)
        res["memory_after_rounds_gb"] = MemoryWatch.snapshot(trainer, servers)
        print(f"  memory now (GB, anon RSS): {json.dumps(res['memory_after_rounds_gb'])}")
        del memcpy  # hold nothing extra during the checks
        gc.collect()
        print("checks:")
        checks = checked(syncs, clients, version)
        for kind in list(syncs):
            syncs.pop(kind).close()
        table = []
        if args.sweep_transports:
            print(f"bucket sweep ({args.sweep_rounds} timed + {WARMUP_PUSHES} warm-up per size):")
            memcpy = Memcpy(nbytes, "cuda" if args.cuda else "cpu")
            table = sweep(trainer, clients, args.sweep_transports, args.sweep_mb, args.sweep_rounds, memcpy, version)
            del memcpy
    finally:
        for sync in syncs.values():
            sync.close()
        for c in clients:
            c.close()
        for s in servers:
            s.stop()
        if trainer is not None:
            trainer.close()
        shutil.rmtree(work, ignore_errors=True)
    watch.sample()
    res.update({"shape": args.shape, "params": n_params, "bytes": nbytes, "dtype": args.dtype,
                "engines": args.engines, "trainer": f"Megatron TP{1 if args.cuda else args.tp}",
                "device": torch.cuda.get_device_name() if args.cuda else "CPU", "threads": threads,
                "rank_threads": rank_threads, "torch": torch.__version__, "cpu_count": os.cpu_count(),
                "ops": ops.describe(), "hf_config": hf_config, "args": vars(args), "checks": checks,
                "largest_tensor_mb": largest_mb, "sweep": table, "memory": watch.stop(),
                "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg(),
                "wall_s": time.perf_counter() - t_start})
    print_table(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {out}")
    if table:
        gbps = {k: nbytes / s / GB for k, s in res["memcpy_s"].items()}
        title = (f"weight sync, {args.shape} ({nbytes / GB:.2f} GB {args.dtype}), {res['trainer']} -> "
                 f"{args.engines} servers, 1 thread each, {os.cpu_count()} CPUs")
        plot(table, gbps, largest_mb, title, Path(args.png))
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
