"""HF <-> Megatron weight conversion: one declarative table per architecture, plus split / merge.

Used by (a) load: full HF tensors -> this rank's Megatron shard (`hf_to_megatron`), (b) export:
TP-gathered shards -> HF tensors (`rule_for(...).merge`, `megatron_to_hf` offline), and (c) weight sync.

Megatron names are *local*: PP stage p of P holds global layers [p*L/P, (p+1)*L/P) as
`decoder.layers.{i}` with i in 0..L/P-1. Rule kinds and their TP layouts (partition dim):
- replicated: every rank holds the full tensor (norms).                                  dim None
- tp_row / tp_col: plain `torch.chunk` along dim 0 / dim 1.                              dim 0 / 1
- qkv: q, k, v interleaved per query group: [group j: its nq/ng q heads, k head j, v head j],
  each head d rows; rank r holds a contiguous chunk of ng/TP groups.                      dim 0
- gate_up: rank r holds cat(chunk(gate)[r], chunk(up)[r]), so the TP-gathered fc1 is *not*
  cat(gate, up) when TP > 1.                                                             dim 0
- vocab: rows zero-padded from V to V_pad (a multiple of TP), then chunked.              dim 0
With tied embeddings and P > 1 the last stage holds an `output_layer.weight` copy of the embedding
(`ParamRule.tied_copy`); with P == 1 it has none. `*._extra_state` entries are skipped, never emitted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from slime_rl.hf_io import EMBED, LM_HEAD, is_tied

SPECS = ("local", "te")
KIND_DIM = {"replicated": None, "tp_row": 0, "tp_col": 1, "qkv": 0, "gate_up": 0, "vocab": 0}
OUTPUT_LAYER = "output_layer.weight"


class ConversionError(ValueError):
    """An HF config or state dict that this table cannot convert; the message names the field or tensor."""


@dataclass(frozen=True)
class Rule:
    """One table row: Megatron name template ({i}: local layer), HF template(s) ({g}: global layer)."""

    megatron: str
    hf: tuple[str, ...]
    kind: str
    stage: str = "layers"  # "first" (PP stage 0), "layers" (every stage), "last" (last PP stage)


_L = "decoder.layers.{i}."
_H = "model.layers.{g}."
LLAMA = (
    Rule("embedding.word_embeddings.weight", (EMBED,), "vocab", stage="first"),
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), "replicated"),
    Rule(_L + "self_attention.linear_qkv.weight",
         tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    Rule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), "tp_col"),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), "replicated"),
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), "gate_up"),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), "tp_col"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated", stage="last"),
    Rule(OUTPUT_LAYER, (LM_HEAD,), "vocab", stage="last"),
)
QWEN2 = LLAMA + (
    Rule(_L + "self_attention.linear_qkv.bias", tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),
)
TABLES = {"llama": LLAMA, "qwen2": QWEN2}
# The Transformer Engine spec fuses each norm into the linear that follows it.
TE_RENAMES = {
    _L + "input_layernorm.weight": _L + "self_attention.linear_qkv.layer_norm_weight",
    _L + "pre_mlp_layernorm.weight": _L + "mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class ModelDims:
    """The sizes conversion needs, read from an HF config (head_dim may differ from hidden/heads)."""

    hidden: int
    ffn: int
    vocab: int
    num_layers: int
    num_heads: int
    num_groups: int
    head_dim: int


def model_dims(hf_config: dict[str, Any]) -> ModelDims:
    """Sizes from an HF config; num_key_value_heads defaults to the heads, head_dim to hidden / heads."""
    heads = hf_config["num_attention_heads"]
    hidden = hf_config["hidden_size"]
    return ModelDims(hidden=hidden, ffn=hf_config["intermediate_size"], vocab=hf_config["vocab_size"],
                     num_layers=hf_config["num_hidden_layers"], num_heads=heads,
                     num_groups=hf_config.get("num_key_value_heads") or heads,
                     head_dim=hf_config.get("head_dim") or hidden // heads)


def table(hf_config: dict[str, Any], spec: str = "local") -> tuple[Rule, ...]:
    """The rules for `hf_config["model_type"]`, with Megatron names for `spec` ("local" or "te")."""
    model_type = hf_config.get("model_type")
    if model_type not in TABLES:
        raise ConversionError(f"hf_config['model_type']={model_type!r} not supported; supported: {sorted(TABLES)}")
    if spec not in SPECS:
        raise ConversionError(f"spec={spec!r} not supported; supported: {list(SPECS)}")
    rules = TABLES[model_type]
    if spec == "te":
        rules = tuple(Rule(TE_RENAMES.get(r.megatron, r.megatron), r.hf, r.kind, r.stage) for r in rules)
    return rules


def check_hf_config(hf_config: dict[str, Any], tp_size: int = 1, pp_size: int = 1) -> None:
    """Raise ConversionError naming the field for anything this table cannot convert at (TP, PP)."""
    table(hf_config)
    if tp_size < 1 or pp_size < 1:
        raise ConversionError(f"tp_size ({tp_size}) and pp_size ({pp_size}) must be >= 1")
    dims = model_dims(hf_config)
    divisible = [("num_attention_heads", dims.num_heads, tp_size, "tp_size"),
                 ("num_key_value_heads", dims.num_groups, tp_size, "tp_size"),
                 ("num_attention_heads", dims.num_heads, dims.num_groups, "num_key_value_heads"),
                 ("num_hidden_layers", dims.num_layers, pp_size, "pp_size")]
    for field, value, by, by_name in divisible:
        if value % by:
            raise ConversionError(f"hf_config['{field}']={value} is not divisible by {by_name}={by}")
    if not hf_config.get("head_dim") and dims.hidden % dims.num_heads:
        raise ConversionError(f"hf_config['hidden_size']={dims.hidden} is not divisible by num_attention_heads="
                              f"{dims.num_heads} and no explicit hf_config['head_dim'] is given")
    unsupported = {"mlp_bias": hf_config.get("mlp_bias"), "use_sliding_window": hf_config.get("use_sliding_window")}
    if hf_config["model_type"] == "llama":
        unsupported["attention_bias"] = hf_config.get("attention_bias")
    for field, value in unsupported.items():
        if value:
            raise ConversionError(f"hf_config['{field}']={value!r} is not supported (must be false)")
    for field in ("rope_scaling", "rope_parameters"):
        params = hf_config.get(field) or {}
        rope_type = params.get("rope_type", params.get("type"))
        if rope_type not in (None, "default"):
            raise ConversionError(f"hf_config['{field}'] rope_type={rope_type!r} is not supported "
                                  "(only plain RoPE: none or 'default')")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hf_config['hidden_act']={hf_config['hidden_act']!r} is not supported (only 'silu')")


def pad_vocab_size(vocab_size: int, tp_size: int, pad_multiple: int = 128) -> int:
    """V rounded up to a multiple of pad_multiple * TP (Megatron's make-vocab-size-divisible-by)."""
    step = pad_multiple * tp_size
    return math.ceil(vocab_size / step) * step


@dataclass(frozen=True)
class ParamRule:
    """How one local Megatron parameter relates to HF tensors, for one (TP size, PP rank).

    Exporters: gather the TP shards along `partition_dim` (None: replicated, use one) and call
    `merge`. Rules with `tied_copy` are the last stage's copy of the tied embedding: skip them when
    exporting (stage 0 exports the embedding).
    """

    megatron_name: str
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    kind: str
    tp_size: int
    dims: ModelDims
    tied_copy: bool = False

    @property
    def partition_dim(self) -> int | None:
        return KIND_DIM[self.kind]

    def shard(self, hf_tensors: Sequence[torch.Tensor], tp_rank: int, padded_vocab_size: int) -> torch.Tensor:
        """TP rank `tp_rank`'s Megatron tensor from the full HF tensors (in `hf_names` order)."""
        for name, shape, t in zip(self.hf_names, self.hf_shapes, hf_tensors, strict=True):
            if tuple(t.shape) != shape:
                raise ConversionError(f"{name}: expected shape {shape} from the config, got {tuple(t.shape)}")
        if self.kind == "replicated":
            out = hf_tensors[0]
        elif self.kind in ("tp_row", "tp_col"):
            out = hf_tensors[0].chunk(self.tp_size, dim=self.partition_dim)[tp_rank]
        elif self.kind == "qkv":
            q, k, v = (t.chunk(self.tp_size, dim=0)[tp_rank] for t in hf_tensors)
            out = _interleave_qkv(q, k, v, self.dims)
        elif self.kind == "gate_up":
            out = torch.cat([t.chunk(self.tp_size, dim=0)[tp_rank] for t in hf_tensors], dim=0)
        else:
            out = _vocab_shard(hf_tensors[0], tp_rank, self.tp_size, padded_vocab_size)
        return out.clone(memory_format=torch.contiguous_format)

    def merge(self, tp_shards: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """New HF tensors from the shards of all TP ranks in rank order (replicated: one or all)."""
        if self.kind != "replicated" and len(tp_shards) != self.tp_size:
            raise ConversionError(f"{self.megatron_name}: merge needs {self.tp_size} TP shards, got {len(tp_shards)}")
        shard_shapes = [tuple(s.shape) for s in tp_shards]
        try:
            out = self._merge(tp_shards)
        except RuntimeError as e:  # a reshape that cannot work: shards of the wrong shape
            raise ConversionError(f"{self.megatron_name}: cannot merge shards of shapes {shard_shapes}: {e}") from e
        if [tuple(t.shape) for t in out] != list(self.hf_shapes):
            raise ConversionError(f"{self.megatron_name}: shards of shapes {shard_shapes} merge to "
                                  f"{[tuple(t.shape) for t in out]}, expected {list(self.hf_shapes)}")
        return {name: t.contiguous() for name, t in zip(self.hf_names, out)}

    def _merge(self, tp_shards: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.kind == "replicated":
            return [tp_shards[0].clone()]  # never alias a live parameter
        if self.kind in ("tp_row", "tp_col"):
            return [torch.cat(list(tp_shards), dim=self.partition_dim)]
        if self.kind == "qkv":
            parts = [_deinterleave_qkv(s, self.dims) for s in tp_shards]
            return [torch.cat([p[n] for p in parts], dim=0) for n in range(3)]
        if self.kind == "gate_up":
            halves = [s.chunk(2, dim=0) for s in tp_shards]
            return [torch.cat([h[n] for h in halves], dim=0) for n in range(2)]
        return [torch.cat(list(tp_shards), dim=0)[: self.dims.vocab]]

    def placements(self, shard: torch.Tensor, tp_rank: int) -> list[tuple[int, tuple[slice, ...], torch.Tensor]]:
        """Where TP rank `tp_rank`'s shard lands in the full HF tensors, without gathering or copying.

        Returns (i, index, src): `src` is a view of `shard` that `merge` would put at
        `full[index]`, where `full` has shape `hf_shapes[i]`. Over all TP ranks the placements cover
        every element of every HF tensor exactly once. Replicated: rank 0 places it, others return
        []. Vocab: padding rows are dropped (a rank holding only padding returns []). qkv: one
        placement per (query group, q/k/v) because a group's q rows are not evenly strided across
        groups in the interleaved layout, so a multi-group q view would need a copy.
        """
        if not 0 <= tp_rank < self.tp_size:
            raise ConversionError(f"{self.megatron_name}: tp_rank={tp_rank} out of range for TP={self.tp_size}")
        out: list[tuple[int, tuple[slice, ...], torch.Tensor]] = []
        if self.kind == "replicated":
            out = [(0, _rows(self.hf_shapes[0], 0, self.hf_shapes[0][0]), shard)] if tp_rank == 0 else []
        elif self.kind in ("tp_row", "tp_col"):
            dim, full = self.partition_dim, self.hf_shapes[0]
            start = tp_rank * -(-full[dim] // self.tp_size)  # torch.chunk: ceil-sized chunks
            index = tuple(slice(start, start + shard.shape[dim]) if n == dim else slice(0, size)
                          for n, size in enumerate(full))
            out = [(0, index, shard)]
        elif self.kind == "qkv":
            rep, d = self.dims.num_heads // self.dims.num_groups, self.dims.head_dim
            if shard.dim() == 0 or shard.shape[0] % ((rep + 2) * d):
                raise ConversionError(f"{self.megatron_name}: qkv shard rows {tuple(shard.shape)[:1]} are not a "
                                      f"multiple of (heads per group + 2) * head_dim = {(rep + 2) * d}")
            x_GRD = shard.reshape(-1, rep + 2, d, *shard.shape[1:])  # a view of a contiguous shard
            first = tp_rank * x_GRD.shape[0]
            for n, (heads, lo, hi) in enumerate([(rep, 0, rep), (1, rep, rep + 1), (1, rep + 1, rep + 2)]):
                for j in range(x_GRD.shape[0]):
                    index = _rows(self.hf_shapes[n], (first + j) * heads * d, heads * d)
                    out.append((n, index, x_GRD[j, lo:hi].flatten(0, 1)))
        elif self.kind == "gate_up":
            half = shard.shape[0] // 2
            start = tp_rank * -(-self.hf_shapes[0][0] // self.tp_size)
            out = [(n, _rows(self.hf_shapes[n], start, half), shard[n * half:(n + 1) * half]) for n in range(2)]
        else:
            start = tp_rank * shard.shape[0]
            real = max(0, min(shard.shape[0], self.dims.vocab - start))
            out = [(0, _rows(self.hf_shapes[0], start, real), shard[:real])] if real else []
        for n, index, src in out:
            region = tuple(len(range(*s.indices(size))) for s, size in zip(index, self.hf_shapes[n]))
            if region != tuple(src.shape):
                raise ConversionError(f"{self.megatron_name}: TP rank {tp_rank}'s shard of shape "
                                      f"{tuple(shard.shape)} does not fit {self.hf_names[n]} {self.hf_shapes[n]}")
        return out


def _rows(shape: tuple[int, ...], start: int, count: int) -> tuple[slice, ...]:
    """Index of rows [start, start + count) of a tensor of `shape`, every other dim whole."""
    return (slice(start, start + count), *(slice(0, size) for size in shape[1:]))


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: ModelDims) -> torch.Tensor:
    """[g*rep*d, *], [g*d, *], [g*d, *] -> [g*(rep+2)*d, *], per group: rep q heads, k head, v head."""
    groups, d, rest = k.shape[0] // dims.head_dim, dims.head_dim, q.shape[1:]
    q_GRD = q.reshape(groups, -1, d, *rest)
    k_G1D, v_G1D = k.reshape(groups, 1, d, *rest), v.reshape(groups, 1, d, *rest)
    return torch.cat([q_GRD, k_G1D, v_G1D], dim=1).reshape(-1, *rest)


def _deinterleave_qkv(qkv: torch.Tensor, dims: ModelDims) -> tuple[torch.Tensor, ...]:
    """The inverse of `_interleave_qkv` for one TP shard: (q, k, v) of the groups it holds."""
    rep, d, rest = dims.num_heads // dims.num_groups, dims.head_dim, qkv.shape[1:]
    x_GRD = qkv.reshape(-1, rep + 2, d, *rest)
    return (x_GRD[:, :rep].reshape(-1, *rest), x_GRD[:, rep].reshape(-1, *rest),
            x_GRD[:, rep + 1].reshape(-1, *rest))


def _vocab_shard(weight_VH: torch.Tensor, tp_rank: int, tp_size: int, padded_vocab_size: int) -> torch.Tensor:
    """Rows [r*V_pad/TP, (r+1)*V_pad/TP) of the weight zero-padded to V_pad rows."""
    per_rank = padded_vocab_size // tp_size
    rows = weight_VH[tp_rank * per_rank: (tp_rank + 1) * per_rank]
    pad = weight_VH.new_zeros(per_rank - rows.shape[0], *weight_VH.shape[1:])
    return torch.cat([rows, pad], dim=0)


def _on_stage(rule: Rule, hf_config: dict[str, Any], pp_size: int, pp_rank: int) -> bool:
    if rule.stage == "first":
        return pp_rank == 0
    if rule.stage == "last":
        no_output_layer = rule.megatron == OUTPUT_LAYER and is_tied(hf_config) and pp_size == 1
        return pp_rank == pp_size - 1 and not no_output_layer
    return True


def megatron_names(hf_config: dict[str, Any], *, pp_size: int = 1, pp_rank: int = 0,
                   spec: str = "local") -> list[str]:
    """The Megatron parameter names (local, no _extra_state) that PP stage `pp_rank` holds."""
    rules = [r for r in table(hf_config, spec) if _on_stage(r, hf_config, pp_size, pp_rank)]
    layers = model_dims(hf_config).num_layers // pp_size
    names = [r.megatron for r in rules if r.stage == "first"]
    names += [r.megatron.format(i=i) for i in range(layers) for r in rules if r.stage == "layers"]
    return names + [r.megatron for r in rules if r.stage == "last"]


def rule_for(megatron_name: str, hf_config: dict[str, Any], *, tp_size: int = 1, pp_size: int = 1,
             pp_rank: int = 0, spec: str = "local") -> ParamRule | None:
    """The ParamRule of a local Megatron parameter on PP stage `pp_rank`; None for `_extra_state`."""
    if megatron_name.endswith("_extra_state"):
        return None
    dims = model_dims(hf_config)
    layers = dims.num_layers // pp_size
    match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", megatron_name)
    template, local = (_L + match.group(2), int(match.group(1))) if match else (megatron_name, None)
    rule = next((r for r in table(hf_config, spec) if r.megatron == template), None)
    if rule is None or not _on_stage(rule, hf_config, pp_size, pp_rank) or (local or 0) >= layers:
        raise ConversionError(f"{megatron_name}: not a parameter of PP stage {pp_rank}/{pp_size} of a "
                              f"{hf_config['model_type']} model with {layers} layers per stage (spec={spec!r})")
    global_layer = None if local is None else pp_rank * layers + local
    tied_copy = rule.megatron == OUTPUT_LAYER and is_tied(hf_config)
    hf_names = (EMBED,) if tied_copy else tuple(h.format(g=global_layer) for h in rule.hf)
    shapes = tuple(_hf_shape(name, dims) for name in hf_names)
    return ParamRule(megatron_name, hf_names, shapes, rule.kind, tp_size, dims, tied_copy)


def _hf_shape(hf_name: str, d: ModelDims) -> tuple[int, ...]:
    q, kv = d.num_heads * d.head_dim, d.num_groups * d.head_dim
    by_suffix = {"embed_tokens.weight": (d.vocab, d.hidden), "lm_head.weight": (d.vocab, d.hidden),
                 "norm.weight": (d.hidden,), "input_layernorm.weight": (d.hidden,),
                 "post_attention_layernorm.weight": (d.hidden,), "q_proj.weight": (q, d.hidden),
                 "k_proj.weight": (kv, d.hidden), "v_proj.weight": (kv, d.hidden), "q_proj.bias": (q,),
                 "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.weight": (d.hidden, q),
                 "gate_proj.weight": (d.ffn, d.hidden), "up_proj.weight": (d.ffn, d.hidden),
                 "down_proj.weight": (d.hidden, d.ffn)}
    return by_suffix[".".join(hf_name.split(".")[-2:])]


def hf_shapes(hf_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name a full checkpoint must hold (no lm_head when tied) -> its shape."""
    dims = model_dims(hf_config)
    shapes = {}
    for rule in table(hf_config):
        for template in rule.hf:
            if template == LM_HEAD and is_tied(hf_config):
                continue
            for g in range(dims.num_layers) if "{g}" in template else [None]:
                name = template.format(g=g)
                shapes[name] = _hf_shape(name, dims)
    return shapes


def _check_hf_state(hf_state: dict[str, torch.Tensor], hf_config: dict[str, Any]) -> None:
    expected = hf_shapes(hf_config)
    missing = sorted(set(expected) - set(hf_state))
    leftover = sorted(set(hf_state) - set(expected) - ({LM_HEAD} if is_tied(hf_config) else set()))
    if missing:
        raise ConversionError(f"HF state dict is missing {missing[0]} ({len(missing)} missing in all)")
    if leftover:
        raise ConversionError(f"HF state dict has unexpected tensor {leftover[0]} ({len(leftover)} in all)")
    for name, shape in expected.items():
        if tuple(hf_state[name].shape) != shape:
            raise ConversionError(f"{name}: expected shape {shape} from the config, got {tuple(hf_state[name].shape)}")


def hf_to_megatron(hf_state: dict[str, torch.Tensor], hf_config: dict[str, Any], *, tp_size: int = 1,
                   tp_rank: int = 0, pp_size: int = 1, pp_rank: int = 0, padded_vocab_size: int,
                   spec: str = "local") -> dict[str, torch.Tensor]:
    """This (TP, PP) rank's Megatron state dict (local names) from a full HF state dict."""
    check_hf_config(hf_config, tp_size, pp_size)
    if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
        raise ConversionError(f"tp_rank={tp_rank}, pp_rank={pp_rank} out of range for TP={tp_size}, PP={pp_size}")
    vocab = hf_config["vocab_size"]
    if padded_vocab_size < vocab or padded_vocab_size % tp_size:
        raise ConversionError(f"padded_vocab_size={padded_vocab_size} must be >= vocab_size={vocab} "
                              f"and divisible by tp_size={tp_size}")
    _check_hf_state(hf_state, hf_config)
    out = {}
    for name in megatron_names(hf_config, pp_size=pp_size, pp_rank=pp_rank, spec=spec):
        rule = rule_for(name, hf_config, tp_size=tp_size, pp_size=pp_size, pp_rank=pp_rank, spec=spec)
        out[name] = rule.shard([hf_state[h] for h in rule.hf_names], tp_rank, padded_vocab_size)
    return out


def megatron_to_hf(shards: dict[tuple[int, int], dict[str, torch.Tensor]], hf_config: dict[str, Any],
                   tp_size: int = 1, pp_size: int = 1, spec: str = "local") -> dict[str, torch.Tensor]:
    """One full HF state dict from every rank's Megatron state dict, keyed by (tp_rank, pp_rank).

    With tied embeddings and PP > 1, the last stage's output_layer copy must equal the embedding.
    """
    check_hf_config(hf_config, tp_size, pp_size)
    hf_state: dict[str, torch.Tensor] = {}
    tied_copies = []
    for pp_rank in range(pp_size):
        names = megatron_names(hf_config, pp_size=pp_size, pp_rank=pp_rank, spec=spec)
        _check_stage_names(shards, names, tp_size, pp_rank)
        for name in names:
            rule = rule_for(name, hf_config, tp_size=tp_size, pp_size=pp_size, pp_rank=pp_rank, spec=spec)
            merged = rule.merge([shards[(r, pp_rank)][name] for r in range(tp_size)])
            if rule.tied_copy:
                tied_copies.append(merged[EMBED])
            else:
                hf_state.update(merged)
    for copy in tied_copies:
        if not torch.equal(copy, hf_state[EMBED]):
            raise ConversionError(f"{OUTPUT_LAYER} on the last PP stage differs from the tied embedding {EMBED}")
    return hf_state


def _check_stage_names(shards: dict[tuple[int, int], dict[str, torch.Tensor]], names: list[str],
                       tp_size: int, pp_rank: int) -> None:
    for tp_rank in range(tp_size):
        if (tp_rank, pp_rank) not in shards:
            raise ConversionError(f"shards has no state dict for (tp_rank, pp_rank)=({tp_rank}, {pp_rank})")
        present = {n for n in shards[(tp_rank, pp_rank)] if not n.endswith("_extra_state")}
        for name in sorted(present.symmetric_difference(names)):
            kind = "unexpected" if name in present else "missing"
            raise ConversionError(f"(tp_rank, pp_rank)=({tp_rank}, {pp_rank}): {kind} parameter {name}")


def weight_layout(hf_config: dict[str, Any], *, tp_size: int, pp_size: int,
                  spec: str = "local") -> list[list[tuple[str, list[tuple[str, tuple[int, ...]]]]]]:
    """Per PP stage, the Megatron parameters it sends in a weight sync and the HF tensors each becomes
    (`weight_sync.plan.plan_from_layout`'s "stages"). Stage 0 sends the embedding; the last stage's
    tied `output_layer` copy is not sent."""
    check_hf_config(hf_config, tp_size, pp_size)
    stages = []
    for stage in range(pp_size):
        params = []
        for name in megatron_names(hf_config, pp_size=pp_size, pp_rank=stage, spec=spec):
            rule = rule_for(name, hf_config, tp_size=tp_size, pp_size=pp_size, pp_rank=stage, spec=spec)
            if not rule.tied_copy:
                params.append((name, list(zip(rule.hf_names, rule.hf_shapes, strict=True))))
        stages.append(params)
    return stages


def check_local_shards(sources: set[str], local: dict[str, tuple[int, ...]], hf_config: dict[str, Any], *,
                       tp_size: int, pp_size: int, stage: int, spec: str = "local") -> None:
    """ConversionError unless a rank's local params (name -> TP shard shape) are exactly the weight-sync
    sources of its stage (plus the tied output_layer copy, which is not sent), each shaped as a TP shard."""
    names = {n for n in local if not n.endswith("_extra_state")}
    rules = {name: rule_for(name, hf_config, tp_size=tp_size, pp_size=pp_size, pp_rank=stage, spec=spec)
             for name in megatron_names(hf_config, pp_size=pp_size, pp_rank=stage, spec=spec)}
    expected = set(sources) | {n for n, r in rules.items() if r.tied_copy}
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise ConversionError(f"stage {stage}: local params do not match the weight plan: missing {missing[:5]} "
                              f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    for name in sorted(names):
        rule = rules.get(name)
        if rule is None:
            raise ConversionError(f"stage {stage}: {name} is in the plan but not a parameter of this model/spec")
        if not _shard_shape_ok(rule, tuple(local[name])):
            raise ConversionError(f"stage {stage}: {name} has local shape {tuple(local[name])}, not a TP={tp_size} "
                                  f"shard of {dict(zip(rule.hf_names, rule.hf_shapes))}")


def _shard_shape_ok(rule: ParamRule, shape: tuple[int, ...]) -> bool:
    """Whether `shape` is the local shape of some TP rank of this rule (shapes only, on the meta device)."""
    full = [torch.empty(s, device="meta") for s in rule.hf_shapes]
    if rule.kind == "vocab":
        return len(shape) == 2 and shape[1] == rule.hf_shapes[0][1] and shape[0] * rule.tp_size >= rule.dims.vocab
    shapes = {tuple(rule.shard(full, r, padded_vocab_size=0).shape) for r in range(rule.tp_size)}
    return shape in shapes
