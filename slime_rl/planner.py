"""`slime-rl plan CONFIG`: what a job will do on GPUs, decided before anything runs.

Only config.json-level facts about the model are read (hidden size, layers, heads, KV heads, FFN size,
vocab, tied embeddings): from `<model.path>/config.json` when it exists, else from `KNOWN_MODELS` by
the path's basename (or `--model-name`). Nothing is loaded, nothing needs a GPU. The plan says:

- placement: which GPU (node, index) holds which trainer rank (TP/PP/DP coordinates) and which
  rollout engine, colocated or disaggregated, as `slime_rl/launch` would place them;
- the Megatron layout: TP, PP, DP, layers per pipeline stage;
- the weight-sync plan: `weight_sync.plan` over the trainer's layout (`training.megatron.conversion`),
  buckets, bytes per sync and the transport `auto` picks;
- per-GPU memory: weights, gradients, optimizer state, activations of one micro-batch, the engine's
  weights and KV cache; `PlanRefused` (exit code 2) names the setting to change when a GPU overflows.

Not to be confused with `weight_sync/plan.py` (the bucket plan of one sync), which this module calls.
The memory model is an estimate with stated assumptions (`ASSUMPTIONS`); benchmarks/bench_plan_memory.py
checks it against measured peaks of CPU training steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slime_rl import algorithms
from slime_rl.config import ConfigError, JobConfig

GIB = 2**30
MIB = 2**20

# Published config.json values (huggingface.co/<org>/<name>/config.json); "-Instruct" variants share them.
_QWEN = dict(model_type="qwen2", rope_theta=1000000.0, hidden_act="silu", use_sliding_window=False)
_QWEN3 = dict(model_type="qwen3", rope_theta=1000000.0, hidden_act="silu", head_dim=128, vocab_size=151936)
_LLAMA32 = dict(model_type="llama", rope_theta=500000.0, hidden_act="silu", vocab_size=128256,
                tie_word_embeddings=True,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "Qwen2.5-0.5B": {**_QWEN, "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "Qwen2.5-1.5B": {**_QWEN, "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "Qwen2.5-3B": {**_QWEN, "hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
                   "num_key_value_heads": 2, "intermediate_size": 11008, "vocab_size": 151936,
                   "tie_word_embeddings": True},
    "Qwen2.5-7B": {**_QWEN, "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                   "tie_word_embeddings": False},
    "Qwen3-4B": {**_QWEN3, "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "intermediate_size": 9728, "tie_word_embeddings": True},
    "Qwen3-8B": {**_QWEN3, "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "intermediate_size": 12288, "tie_word_embeddings": False},
    "Llama-3.2-1B": {**_LLAMA32, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192},
    "Llama-3.2-3B": {**_LLAMA32, "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
                     "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192},
    "Llama-3.1-8B": {**_LLAMA32, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "intermediate_size": 14336, "tie_word_embeddings": False,
                     "rope_scaling": {**_LLAMA32["rope_scaling"], "factor": 8.0}},
    "SmolLM2-135M": {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                     "tie_word_embeddings": True, "rope_theta": 100000.0, "hidden_act": "silu"},
}

ASSUMPTIONS = (
    "bytes per parameter: float32 training = 4 weights + 4 gradients + 8 AdamW moments (the fp32 weights are "
    "the master copy); bfloat16 = 2 weights + 4 gradients (megatron reduces gradients in fp32) + 12 optimizer "
    "(fp32 master + 2 fp32 moments), the optimizer part divided by DP with train.use_distributed_optimizer",
    "activations of one micro-batch of T tokens (train.max_tokens_per_micro_batch, or fewer when "
    "micro_batch_size rows of data.max_prompt_tokens + rollout.max_new_tokens are shorter), per layer per token, "
    "the tensors each implementation's layer saves for backward (counted with saved-tensor hooks), in the "
    "training dtype: transformers (train.backend hf) 6h (each RMSNorm's input, normalized and scaled output) + "
    "3q + 2kv (q, k, v after RoPE, the attention output twice) + 4 ffn; megatron's local spec (megatron_spec "
    "local, or auto: counted as local) 6h + 4q/tp (o_proj input; q and GQA-expanded k, v of the unfused "
    "attention) + 5 ffn/tp + 4 head_dim (RoPE) + seq x heads/tp (attention probabilities); te as local without "
    "the expansion and the probabilities (flash attention). No activation recompute (the project has no such "
    "setting); a pipeline's first stage holds min(pp, micro-batches) of them (1F1B); full rows are counted "
    "even where the hf backend runs a group's shared prompt once (an upper bound there)",
    "the output layer's logprobs (train.fused_logprob): chunk workspace of 3 x chunk_tokens x chunk_vocab fp32 "
    "plus the response tokens' hidden states; without it 3 x [response tokens x vocab/tp] fp32 logits",
    "embedded engines (Ray actors) hold fp32 weights and a KV pool of rollout.max_total_tokens tokens, else "
    "rollout.kv_cache_mb; SGLang servers (rollout.engine_urls) hold bf16 weights / tp-size and a KV pool up to "
    "mem-fraction-static of the GPU (rollout.sglang_args; 0.85 assumed when unset)",
    "peak = the sum of the parts, except: the hf backend frees its gradients before each step and backward "
    "frees each layer's activations as it makes its gradients (max(activations, gradients) on top of the rest); "
    "a colocated engine frees its KV cache while the trainer steps (weights stay): max(activations, KV cache)",
    "Ray's PACK strategy is assumed to fill nodes in bundle order (node = bundle // gpus_per_node)",
)


class PlanRefused(Exception):
    """A plan that cannot fit; the one-line message names the setting to change."""


@dataclass(frozen=True)
class ModelFacts:
    """The model's config.json-level sizes and where they came from."""

    name: str
    source: str
    hf_config: dict[str, Any]
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf(cls, name: str, source: str, c: dict[str, Any]) -> ModelFacts:
        """Sizes from a config.json dict (KeyError / TypeError on a config without them)."""
        heads = int(c["num_attention_heads"])
        return cls(name, source, c, hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]), heads=heads,
                   kv_heads=int(c.get("num_key_value_heads") or heads),
                   head_dim=int(c.get("head_dim") or c["hidden_size"] // heads), ffn=int(c["intermediate_size"]),
                   vocab=int(c["vocab_size"]), tied=bool(c.get("tie_word_embeddings", False)))

    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = q + 2 * kv if self.hf_config.get("model_type") == "qwen2" else 0
        qk_norm = 2 * self.head_dim if self.hf_config.get("model_type") == "qwen3" else 0
        return h * (q + 2 * kv) + q * h + bias + qk_norm + 3 * h * self.ffn + 2 * h

    def params(self) -> int:
        return self.layers * self.layer_params() + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


ALIASES = {"smollm2": "SmolLM2-135M"}  # the directory README's `slime-rl convert-gguf --out models/smollm2` writes


def _lookup(name: str) -> tuple[str, dict[str, Any]] | None:
    key = name.lower().removesuffix("-instruct").removesuffix("-base")
    key = ALIASES.get(key, key).lower()
    return next(((n, c) for n, c in KNOWN_MODELS.items() if n.lower() == key), None)


def resolve_model(cfg: JobConfig, model_name: str | None = None) -> ModelFacts:
    """The policy's sizes: the tiny model from cfg.model; else config.json; else the KNOWN_MODELS entry."""
    m = cfg.model
    if m.path is None and model_name is None:
        from slime_rl.tasks import get_task, task_tokenizer
        from slime_rl.tokenizer import load_tokenizer

        vocab = load_tokenizer(m.tokenizer or task_tokenizer(get_task(cfg.task), cfg)).vocab_size
        hf = {"model_type": m.arch, "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
              "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
              "intermediate_size": m.intermediate_size, "vocab_size": vocab, "tie_word_embeddings": True}
        return ModelFacts.from_hf(f"tiny {m.arch}", "model.* fields (model.path unset)", hf)
    if m.path is not None and model_name is None:
        config_file = Path(m.path).expanduser() / "config.json"
        if config_file.is_file():
            try:
                return ModelFacts.from_hf(Path(m.path).name, str(config_file), json.loads(config_file.read_text()))
            except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
                raise ConfigError(f"model.path: cannot read the model sizes from {config_file}: {exc!r}") from None
    name = model_name or Path(str(m.path).rstrip("/")).name
    known = _lookup(name)
    if known is None:
        raise ConfigError(f"model.path: {m.path} has no config.json and {name!r} is not a known model "
                          f"(--model-name one of {', '.join(KNOWN_MODELS)})")
    return ModelFacts.from_hf(known[0], f"published config.json values ({known[0]})", dict(known[1]))


# --------------------------------------------------------------------------- #
# Layout and placement


@dataclass
class Slot:
    """One device's occupants: node/gpu (-1 = host CPU), the trainer ranks and engines on it."""

    node: int
    gpu: int
    trainer_ranks: list[dict[str, int]] = field(default_factory=list)  # {"rank", "tp", "pp", "dp"}
    engines: list[int] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"node {self.node} gpu {self.gpu}" if self.gpu >= 0 else "host CPU"


def megatron_layout(cfg: JobConfig, facts: ModelFacts) -> dict[str, Any]:
    """TP, PP, DP, layers per stage and every rank's coordinates (megatron's tp-dp-pp order: TP fastest)."""
    t = cfg.train
    tp, pp = (t.tp, t.pp) if t.backend == "megatron" else (1, 1)
    world = cfg.trainer_ranks
    dp = world // (tp * pp)
    for name, value, by, by_name in (("num_attention_heads", facts.heads, tp, "train.tp"),
                                     ("num_key_value_heads", facts.kv_heads, tp, "train.tp"),
                                     ("num_hidden_layers", facts.layers, pp, "train.pp")):
        if value % by:
            raise ConfigError(f"{by_name}={by} must divide the model's {name} ({value})")
    ranks = [{"rank": r, "tp": r % tp, "dp": (r // tp) % dp, "pp": r // (tp * dp)} for r in range(world)]
    return {"backend": t.backend, "tp": tp, "pp": pp, "dp": dp, "world_size": world,
            "layers_per_stage": [facts.layers // pp] * pp, "ranks": ranks}


def _sglang_tp(cfg: JobConfig) -> int:
    args = {k.replace("-", "_").lstrip("_"): v for k, v in cfg.rollout.sglang_args.items()}
    return int(args.get("tp_size", args.get("tp", 1)))


def engine_kind(cfg: JobConfig) -> str:
    if cfg.debug.load_rollouts:
        return "none"
    if cfg.launch.launcher == "ray":
        return "embedded-ray"
    return "external" if cfg.rollout.engine_urls else "embedded-driver"


def placement(cfg: JobConfig, layout: dict[str, Any], gpus_per_node: int) -> dict[str, Any]:
    """Which device holds which trainer rank and engine, as slime_rl/launch places them."""
    kind, engines = engine_kind(cfg), cfg.rollout.num_inferencers
    megatron = cfg.train.backend == "megatron"
    notes: list[str] = []
    slots: list[Slot] = []

    def gpu(index: int) -> Slot:
        while len(slots) <= index:
            slots.append(Slot(len(slots) // gpus_per_node, len(slots) % gpus_per_node))
        return slots[index]

    host = Slot(0, -1)
    if kind == "embedded-ray":
        from slime_rl.launch.ray_launch import plan_placement

        placed = layout["world_size"] if megatron else 0
        p = plan_placement(cfg.launch, placed, engines, gpus=True)
        for rank, s in zip(layout["ranks"], p.trainer_slots):
            gpu(s.bundle).trainer_ranks.append(rank)
        for i, s in enumerate(p.engine_slots):
            gpu(s.bundle).engines.append(i)
        notes.append(f"Ray placement group of {len(p.bundles)} bundle(s), one GPU each (PACK)")
    else:
        if megatron:
            for rank in layout["ranks"]:
                gpu(rank["rank"]).trainer_ranks.append(rank)
            if layout["world_size"] > gpus_per_node:
                notes.append(f"{layout['world_size']} ranks > {gpus_per_node} GPUs per node: launch them with "
                             "torchrun over several nodes (the local launcher spawns on this machine only)")
        if kind == "embedded-driver":
            host.engines.append(0)
            notes.append("the embedded engine runs in the driver process on the CPU (host memory)")
        elif kind == "external":
            notes.append(f"{len(cfg.rollout.engine_urls)} external SGLang-protocol engine(s) "
                         f"{cfg.rollout.engine_urls}, each on {_sglang_tp(cfg)} GPU(s) (tp-size): not placed by "
                         "this job, started by you on GPUs of their own")
    if not megatron:
        host.trainer_ranks.append({"rank": 0, "tp": 0, "pp": 0, "dp": 0})
        notes.append("train.backend hf: the reference trainer runs in the driver process on the CPU")
    colocated = any(s.trainer_ranks and s.engines for s in slots)
    if host.trainer_ranks or host.engines:
        slots.append(host)
    return {"mode": "colocated" if colocated else "disaggregated", "engine_kind": kind,
            "gpus": sum(s.gpu >= 0 for s in slots), "slots": slots, "notes": notes}


# --------------------------------------------------------------------------- #
# Weight sync


def weight_sync_plan(cfg: JobConfig, facts: ModelFacts, layout: dict[str, Any]) -> dict[str, Any]:
    """`weight_sync.plan` over the trainer's layout: buckets, bytes per sync, transport."""
    from training.megatron import conversion
    from weight_sync.plan import plan_from_layout

    kind = engine_kind(cfg)
    if kind == "none":
        return {"transport": None, "note": "debug.load_rollouts: no engines, no weight sync"}
    hf = dict(facts.hf_config)
    notes = []
    try:
        conversion.check_hf_config(hf, layout["tp"], layout["pp"])
    except conversion.ConversionError as exc:
        if cfg.train.backend == "megatron":
            notes.append(f"training/megatron/conversion.py cannot convert this model yet ({exc}); "
                         "buckets planned with the Llama table"
                         + (" (without Qwen3's q/k norm weights, 2 x head_dim per layer)"
                            if hf.get("model_type") == "qwen3" else ""))
        hf = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_parameters")}
        hf["model_type"] = "qwen2" if hf.get("model_type") == "qwen2" else "llama"
    if cfg.train.backend == "megatron":
        stages = conversion.weight_layout(hf, tp_size=layout["tp"], pp_size=layout["pp"])
    else:  # the reference trainer sends every HF tensor as it is
        stages = [[(name, [(name, shape)]) for name, shape in conversion.hf_shapes(hf).items()]]
    dtype = "bfloat16" if kind == "external" else "float32"
    plan = plan_from_layout({"tp_size": layout["tp"], "stages": stages}, dtype=dtype,
                            bucket_bytes=int(cfg.sync.bucket_mb * MIB))
    transport = cfg.sync.transport
    if transport == "auto":
        if kind == "embedded-driver":
            transport = "local" if cfg.train.backend == "hf" else "shm"
        elif kind == "embedded-ray":
            transport = "shm" if cfg.launch.ray_address is None else "broadcast"
        else:
            local = all(any(h in u for h in ("127.0.0.1", "localhost", "[::1]")) for u in cfg.rollout.engine_urls)
            transport = "shm" if local else "broadcast"
    engines = cfg.rollout.num_inferencers if kind != "external" else len(cfg.rollout.engine_urls)
    return {"transport": transport, "dtype": dtype, "buckets": len(plan.buckets), "tensors": len(plan.tensors),
            "bytes_per_sync": plan.nbytes, "largest_bucket": max(b.nbytes for b in plan.buckets),
            "bucket_limit": plan.bucket_bytes, "stages": layout["pp"], "engines": engines, "notes": notes}


# --------------------------------------------------------------------------- #
# Memory


def micro_batch_tokens(cfg: JobConfig) -> tuple[int, int]:
    """(tokens T of one micro-batch, the longest sequence S) under the trainer's micro-batch settings."""
    seq = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    t = cfg.train
    return max(seq, min(t.max_tokens_per_micro_batch, t.micro_batch_size * seq)), seq


def _stage_params(facts: ModelFacts, tp: int, pp: int, stage: int, vocab_pad_multiple: int) -> int:
    """Parameters one TP rank of PP stage `stage` holds (norms are replicated, counted whole)."""
    h = facts.hidden
    norms = 2 * h
    per_layer = (facts.layer_params() - norms) // tp + norms
    n = facts.layers // pp * per_layer
    padded = math.ceil(facts.vocab / (vocab_pad_multiple * tp)) * vocab_pad_multiple * tp
    if stage == 0:
        n += padded * h // tp
    if stage == pp - 1:
        n += h + (padded * h // tp if (not facts.tied or pp > 1) else 0)
    return n


def layer_activations(facts: ModelFacts, tp: int, impl: str, seq: int) -> int:
    """Elements one decoder layer saves for backward per token (sequences of `seq` tokens), as counted on
    each implementation's layers (saved-tensor hooks): `hf` = transformers' Llama/Qwen2 with SDPA; `local` =
    megatron's local spec, whose unfused attention multiplies GQA-expanded q, k, v and keeps the
    probabilities; `te` = Transformer Engine's flash attention, counted as local without those two."""
    h, d, f = facts.hidden, facts.head_dim, facts.ffn
    q, kv = facts.heads * d, facts.kv_heads * d
    norms = 6 * h  # each RMSNorm's input, normalized and scaled output
    if impl == "hf":  # q, k, v after RoPE, SDPA's output, o_proj's contiguous input; gate, up, silu, product
        return norms + (3 * q + 2 * kv) // tp + 4 * f // tp
    mlp = 5 * f // tp  # fc1's fused gate|up output, silu(gate), up, their product
    rope = 4 * d  # cos and sin for q and k
    if impl == "local":  # o_proj input, q and expanded k, v for the batched matmuls, probabilities
        return norms + 4 * q // tp + mlp + rope + seq * facts.heads // tp
    return norms + (2 * q + 2 * kv) // tp + mlp + rope


def trainer_memory(cfg: JobConfig, facts: ModelFacts, layout: dict[str, Any], stage: int,
                   device: str = "cuda") -> dict[str, int]:
    """Bytes of one trainer rank of PP stage `stage`: weights, gradients, optimizer, activations (+ reference).
    `device` picks the fused logprob op's chunk sizes (the trainer's device)."""
    t = cfg.train
    tp, pp, dp = layout["tp"], layout["pp"], layout["dp"]
    megatron = t.backend == "megatron"
    bf16 = megatron and t.dtype == "bfloat16"
    n = _stage_params(facts, tp, pp, stage, t.vocab_pad_multiple) if megatron else facts.params()
    w, g, o = (2, 4, 12) if bf16 else (4, 4, 8)
    optimizer = n * o // (dp if megatron and t.use_distributed_optimizer else 1)
    T, S = micro_batch_tokens(cfg)
    act_bytes = 2 if bf16 else 4
    h = facts.hidden
    impl = "hf" if not megatron else "te" if t.megatron_spec == "te" else "local"
    per_token = facts.layers // pp * layer_activations(facts, tp, impl, S) + (2 * h if megatron else 0)
    acts = T * per_token * act_bytes  # megatron: + the embedding output and the final norm's input
    samples = cfg.rollout.prompts_per_step * cfg.rollout.n_samples_per_prompt
    micro_batches = max(1, math.ceil(samples * S / dp / cfg.algorithm.mini_batches / T))
    acts *= min(pp - stage, micro_batches) if megatron else 1
    if stage == pp - 1:
        resp = min(T, (T // S) * cfg.rollout.max_new_tokens) or cfg.rollout.max_new_tokens
        if t.fused_logprob:
            chunk_t, chunk_v = (4096, 16384) if device == "cuda" else (1024, 8192)  # ops.fused_logprob's
            acts += 3 * min(chunk_t, resp) * min(chunk_v, facts.vocab // tp) * 4 + resp * h * 4
        else:
            acts += 3 * resp * (facts.vocab // tp) * 4
    out = {"weights": n * w, "gradients": n * g, "optimizer": optimizer, "activations": acts}
    if not megatron and algorithms.needs(cfg.algorithm).reference:
        out["reference_weights"] = facts.params() * 4  # megatron keeps its reference copy in host memory
    return out


def engine_memory(cfg: JobConfig, facts: ModelFacts, gpu_bytes: int) -> dict[str, int]:
    """Bytes of one rollout engine on its device: weights and KV cache."""
    kv_per_token = 2 * facts.layers * facts.kv_heads * facts.head_dim
    ro = cfg.rollout
    if engine_kind(cfg) == "external":
        tp = _sglang_tp(cfg)
        args = {k.replace("-", "_").lstrip("_"): v for k, v in ro.sglang_args.items()}
        fraction = float(args.get("mem_fraction_static", 0.85))
        weights = facts.params() * 2 // tp
        pool = int(fraction * gpu_bytes)  # SGLang's static pool: weights + KV cache
        return {"engine_weights": weights, "kv_cache": max(0, pool - weights), "pool": pool,
                "kv_bytes_per_token": kv_per_token * 2 // tp}
    per_token = kv_per_token * 4
    kv = ro.max_total_tokens * per_token if ro.max_total_tokens else int(ro.kv_cache_mb * MIB) // per_token * per_token
    return {"engine_weights": facts.params() * 4, "kv_cache": kv, "kv_bytes_per_token": per_token}


def _device_total(parts: dict[str, int], shared: bool, grads_resident: bool = True) -> int:
    """Peak bytes of one device from its parts. Megatron's gradient buffer is allocated once and stays, so
    gradients add to everything else; the hf backend frees its gradients before each step (set_to_none) and
    backward frees a layer's activations as it makes the layer's gradients, so it peaks at max(activations,
    gradients) on top of the rest. A colocated engine frees its KV cache while the trainer steps."""
    grads, acts = parts.get("gradients", 0), parts.get("activations", 0)
    static = sum(parts.get(k, 0) for k in ("weights", "optimizer", "reference_weights", "engine_weights"))
    if grads_resident:
        static, step = static + grads, acts
    else:
        step = max(acts, grads)
    kv = parts.get("kv_cache", 0)
    return static + (max(step, kv) if shared else step + kv)


def trainer_total(cfg: JobConfig, parts: dict[str, int]) -> int:
    """The peak of one trainer rank alone (see _device_total)."""
    return _device_total(parts, shared=False, grads_resident=cfg.train.backend == "megatron")


def memory(cfg: JobConfig, facts: ModelFacts, layout: dict[str, Any], slots: list[Slot],
           gpu_bytes: int) -> list[dict[str, Any]]:
    """Per device: who is on it, the parts (bytes), the total and whether it fits `gpu_bytes` (host CPU: no
    limit); external SGLang engines add one entry for each of their GPUs."""
    out = []
    engine = engine_memory(cfg, facts, gpu_bytes)
    for slot in slots:
        parts: dict[str, int] = {}
        for rank in slot.trainer_ranks:
            for k, v in trainer_memory(cfg, facts, layout, rank["pp"]).items():
                parts[k] = parts.get(k, 0) + v
        for _ in slot.engines:
            parts["engine_weights"] = parts.get("engine_weights", 0) + engine["engine_weights"]
            parts["kv_cache"] = parts.get("kv_cache", 0) + engine["kv_cache"]
        total = _device_total(parts, shared=slot.gpu >= 0 and bool(slot.trainer_ranks and slot.engines),
                              grads_resident=cfg.train.backend == "megatron" or not slot.trainer_ranks)
        out.append({"where": slot.where, "holds": _occupants(slot), "trainer": bool(slot.trainer_ranks),
                    "engines": len(slot.engines), "parts": parts, "total": total,
                    "capacity": gpu_bytes if slot.gpu >= 0 else None, "fits": slot.gpu < 0 or total <= gpu_bytes})
    if engine_kind(cfg) == "external":
        parts = {k: engine[k] for k in ("engine_weights", "kv_cache")}
        total = sum(parts.values())
        holds = f"an SGLang server's share (tp-size {_sglang_tp(cfg)}; capacity: mem-fraction-static of the GPU)"
        out.append({"where": "each external engine GPU", "holds": holds, "trainer": False, "engines": 1,
                    "parts": parts, "total": max(total, parts["engine_weights"]), "capacity": engine["pool"],
                    "fits": parts["engine_weights"] < engine["pool"]})
    return out


def _advice(cfg: JobConfig, device: dict[str, Any], capacity: int) -> str:
    """The setting to change for a device that does not fit."""
    p = device["parts"]
    static = sum(p.get(k, 0) for k in ("weights", "gradients", "optimizer"))
    if device["trainer"] and static > capacity * 0.8:
        t = cfg.train
        if t.backend == "hf":
            return "train.backend megatron with train.tp / train.pp (the hf backend is one process)"
        if t.dtype == "float32":
            return "train.dtype bfloat16, or raise train.tp / train.pp (shard the model over more GPUs)"
        if cfg.trainer_ranks > t.tp * t.pp and not t.use_distributed_optimizer:
            return "train.use_distributed_optimizer true, or raise train.tp / train.pp"
        return "raise train.tp / train.pp (shard the model over more GPUs)"
    if device["trainer"] and device["engines"]:
        if p.get("kv_cache", 0) > p.get("activations", 0):
            return "lower rollout.kv_cache_mb / rollout.max_total_tokens, or launch.colocate false (more GPUs)"
        return "launch.colocate false (engines on GPUs of their own), or raise train.tp / train.pp"
    if device["trainer"]:
        return "lower train.max_tokens_per_micro_batch (activations of one micro-batch)"
    if engine_kind(cfg) == "external":
        return "a larger tp-size (or mem-fraction-static) in rollout.sglang_args and for the servers"
    if p.get("engine_weights", 0) > capacity * 0.8:
        return "external SGLang engines in bf16 (rollout.engine_urls) with a larger tp-size in rollout.sglang_args"
    return "lower rollout.kv_cache_mb / rollout.max_total_tokens"


# --------------------------------------------------------------------------- #
# The plan


def build_plan(cfg: JobConfig, *, gpu_memory_gb: float = 80.0, gpus_per_node: int = 8,
               model_name: str | None = None) -> dict[str, Any]:
    """The whole plan as a JSON-safe dict; when a device overflows, its "refused" entry is the one line that
    names the setting to change (the CLI raises PlanRefused with it). ConfigError for a bad config or model."""
    if gpu_memory_gb <= 0 or gpus_per_node < 1:
        raise ConfigError(f"--gpu-memory-gb ({gpu_memory_gb}) must be > 0 and --gpus-per-node ({gpus_per_node}) >= 1")
    from slime_rl.job import _check_supported

    _check_supported(cfg)  # what `train` refuses before building anything, the plan refuses too
    facts = resolve_model(cfg, model_name)
    layout = megatron_layout(cfg, facts)
    place = placement(cfg, layout, gpus_per_node)
    gpu_bytes = int(gpu_memory_gb * GIB)
    devices = memory(cfg, facts, layout, place["slots"], gpu_bytes)
    T, S = micro_batch_tokens(cfg)
    warnings = _warnings(cfg, facts, layout, place["engine_kind"])
    plan = {
        "model": {"name": facts.name, "source": facts.source, "params": facts.params(),
                  **{k: getattr(facts, k) for k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "ffn",
                                                    "vocab", "tied")}},
        "placement": {**{k: v for k, v in place.items() if k != "slots"},
                      "slots": [{**dataclasses.asdict(s), "where": s.where} for s in place["slots"]]},
        "layout": layout,
        "weight_sync": weight_sync_plan(cfg, facts, layout),
        "micro_batch": {"tokens": T, "longest_sequence": S, "rows": T // S,
                        "dtype": cfg.train.dtype if cfg.train.backend == "megatron" else "float32"},
        "memory": devices, "gpu_memory_gb": gpu_memory_gb, "assumptions": list(ASSUMPTIONS),
        "warnings": warnings,
    }
    worst = max((d for d in devices if not d["fits"]), key=lambda d: d["total"], default=None)
    if worst is not None:
        plan["refused"] = (f"does not fit: {worst['where']} holds {worst['holds']} and needs "
                           f"{_size(worst['total'])} of {_size(worst['capacity'])} ({_parts_line(worst['parts'])}); "
                           f"setting to change: {_advice(cfg, worst, gpu_bytes)}")
    return plan


def _warnings(cfg: JobConfig, facts: ModelFacts, layout: dict[str, Any], engine: str) -> list[str]:
    """What the plan cannot promise: a model the backends cannot load yet, parts it does not plan."""
    warnings = []
    if cfg.train.backend == "megatron":
        from training.megatron import conversion

        try:
            conversion.check_hf_config(facts.hf_config, layout["tp"], layout["pp"])
        except conversion.ConversionError as exc:
            warnings.append(f"train.backend megatron cannot load this model yet: {exc}")
    needs = algorithms.needs(cfg.algorithm)
    if needs.critic:
        warnings.append(f"algorithm.name {cfg.algorithm.name} trains a critic: its ranks and memory are not planned")
    if needs.reference and cfg.train.backend == "megatron":
        per_rank = max(_stage_params(facts, layout["tp"], layout["pp"], s, cfg.train.vocab_pad_multiple)
                       for s in range(layout["pp"]))
        warnings.append(f"algorithm.kl_coef > 0: every trainer rank keeps a reference copy of its weights in host "
                        f"memory ({_size(per_rank * (2 if cfg.train.dtype == 'bfloat16' else 4))}), not on its GPU")
    if engine.startswith("embedded") and facts.hf_config.get("model_type") not in ("llama", "qwen2"):
        warnings.append(f"the embedded engine serves llama / qwen2 models only, not "
                        f"{facts.hf_config.get('model_type')!r}: use SGLang servers (rollout.engine_urls)")
    return warnings


def _occupants(slot: Slot | dict[str, Any]) -> str:
    s = dataclasses.asdict(slot) if isinstance(slot, Slot) else slot
    who = [f"trainer rank {r['rank']} (tp {r['tp']}, pp {r['pp']}, dp {r['dp']})" for r in s["trainer_ranks"]]
    return ", ".join(who + [f"engine {e}" for e in s["engines"]]) or "idle"


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _parts_line(parts: dict[str, int]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {_size(v)}" for k, v in parts.items())


def render(plan: dict[str, Any]) -> str:
    """The plan as text."""
    m, lay, ws, mb, pl = plan["model"], plan["layout"], plan["weight_sync"], plan["micro_batch"], plan["placement"]
    count = f"{m['params'] / 1e9:.2f}B" if m["params"] >= 1e9 else f"{m['params'] / 1e6:.2f}M"
    lines = [f"model: {m['name']} ({count} params; hidden {m['hidden']}, {m['layers']} layers, "
             f"{m['heads']} heads / {m['kv_heads']} kv, head_dim {m['head_dim']}, ffn {m['ffn']}, vocab {m['vocab']}"
             f"{', tied embeddings' if m['tied'] else ''}) from {m['source']}",
             f"placement: {pl['mode']}, {pl['gpus']} GPU(s), engines: {pl['engine_kind']}"]
    lines += [f"  {s['where']}: {_occupants(s)}" for s in pl["slots"]]
    lines += [f"  note: {n}" for n in pl["notes"]]
    lines.append(f"layout: backend {lay['backend']}, TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']} = "
                 f"{lay['world_size']} rank(s), layers per stage {lay['layers_per_stage']}")
    if ws.get("transport") is None:
        lines.append(f"weight sync: {ws['note']}")
    else:
        lines.append(f"weight sync: {ws['transport']} to {ws['engines']} engine(s), {ws['bytes_per_sync'] / MIB:.1f} "
                     f"MiB {ws['dtype']} per sync in {ws['buckets']} bucket(s) of <= {ws['bucket_limit'] / MIB:g} "
                     f"MiB (largest {ws['largest_bucket'] / MIB:.1f} MiB), {ws['tensors']} tensors, "
                     f"{ws['stages']} sending stage(s)")
        lines += [f"  note: {n}" for n in ws["notes"]]
    lines.append(f"micro-batch: {mb['tokens']} tokens ({mb['rows']} rows of <= {mb['longest_sequence']}), "
                 f"training dtype {mb['dtype']}")
    lines.append(f"memory per device (GPU {plan['gpu_memory_gb']:g} GiB):")
    for d in plan["memory"]:
        cap = "" if d["capacity"] is None else f" of {_size(d['capacity'])}"
        verdict = "" if d["capacity"] is None else ("  ok" if d["fits"] else "  DOES NOT FIT")
        lines.append(f"  {d['where']}: total {_size(d['total'])}{cap}{verdict}  [{_parts_line(d['parts'])}]")
    lines += [f"warning: {w}" for w in plan["warnings"]]
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in plan["assumptions"]]
    if "refused" in plan:
        lines.append(f"REFUSED: {plan['refused']}")
    return "\n".join(lines)
