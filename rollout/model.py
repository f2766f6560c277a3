"""The embedded engine's own Llama / Qwen2-family decoder, in plain torch.

Built from an HF `config.json` dict and loaded with HF parameter names
(`model.layers.{i}.self_attn.q_proj.weight`, ...), so weight sync can send
trainer tensors straight in. It is not transformers' implementation but
follows its numerics: RMSNorm in fp32, RoPE inv_freq / cos / sin computed in
fp32 the way transformers does, attention through torch SDPA.

Two forward modes:
- no cache (`forward(ids_BT)`): right-padded full sequences with a plain causal
  mask; used for prompt / sequence logprobs and parity tests;
- with a cache view (`hidden(ids_BQ, pos_BQ, cache, mask)`): the view's
  `update(layer, k, v)` stores this call's keys/values and returns every key
  and value the queries may attend to (see rollout/kv_cache.py); the caller
  supplies positions and the attention mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """The subset of an HF Llama / Qwen2 config the decoder needs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v bias
    o_proj_bias: bool
    mlp_bias: bool
    rope_theta: float
    rope_parameters: dict

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type not in ("llama", "qwen2"):
            raise ValueError(f"config.json model_type must be 'llama' or 'qwen2', got {model_type!r}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act must be 'silu', got {cfg['hidden_act']!r}")
        if model_type == "qwen2" and cfg.get("use_sliding_window", False):
            raise ValueError("config.json use_sliding_window=true is not supported by the embedded engine")
        heads = cfg["num_attention_heads"]
        is_llama = model_type == "llama"
        rope_params, theta = _rope_parameters(cfg)
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v bias and never o_proj bias; Llama's
            # `attention_bias` covers q/k/v/o alike.
            attention_bias=cfg.get("attention_bias", False) if is_llama else True,
            o_proj_bias=cfg.get("attention_bias", False) if is_llama else False,
            mlp_bias=cfg.get("mlp_bias", False) if is_llama else False,
            rope_theta=theta,
            rope_parameters=rope_params,
        )


def _rope_parameters(cfg: dict) -> tuple[dict, float]:
    """Read RoPE settings from either transformers-5 `rope_parameters` or the
    older top-level `rope_theta` + `rope_scaling`; returns (params, theta)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config.json rope_type {rope_type!r} is not supported by the embedded engine "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config.json partial_rotary_factor != 1 is not supported")
    params["rope_type"] = rope_type
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    return params, theta


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """fp32 inverse frequencies [head_dim/2], computed as transformers does."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    p = cfg.rope_parameters
    if p["rope_type"] == "linear":
        inv_freq = inv_freq / p["factor"]
    elif p["rope_type"] == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_ctx = p["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Linear(nn.Module):
    """nn.Linear without the init cost (weights arrive from a checkpoint).

    `weight` / `bias` may be given as views into a fused tensor (see
    `_fused`): the HF-named parameter then shares storage with it.
    """

    def __init__(self, d_in: int, d_out: int, bias: bool, device, dtype, weight=None, bias_view=None):
        super().__init__()
        w = torch.empty(d_out, d_in, device=device, dtype=dtype) if weight is None else weight
        self.weight = nn.Parameter(w, requires_grad=False)
        b = torch.empty(d_out, device=device, dtype=dtype) if bias_view is None else bias_view
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _fused(d_in: int, d_outs: list[int], bias: bool, device, dtype) -> tuple[torch.Tensor, torch.Tensor | None, list[Linear]]:
    """One [sum(d_outs), d_in] weight (+ bias) and a Linear per part viewing it.

    The HF parameters (q/k/v_proj, gate/up_proj) stay separate names for
    loading and weight sync, while the forward runs one matmul for all parts.
    """
    w = torch.empty(sum(d_outs), d_in, device=device, dtype=dtype)
    b = torch.zeros(sum(d_outs), device=device, dtype=dtype) if bias else None
    parts, lo = [], 0
    for d in d_outs:
        parts.append(Linear(d_in, d, bias, device, dtype, w[lo : lo + d], b[lo : lo + d] if bias else None))
        lo += d
    return w, b, parts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, device, dtype):
        super().__init__()
        h, d, nq, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.n_heads, self.n_kv, self.head_dim = nq, nkv, d
        self.qkv_weight, self.qkv_bias, (self.q_proj, self.k_proj, self.v_proj) = _fused(
            h, [nq * d, nkv * d, nkv * d], cfg.attention_bias, device, dtype)
        self.o_proj = Linear(nq * d, h, cfg.o_proj_bias, device, dtype)

    def forward(self, x_BTH, cos_BTD, sin_BTD, cache, layer: int, mask):
        B, T, _ = x_BTH.shape
        nq, nkv, d = self.n_heads, self.n_kv, self.head_dim
        qkv_BTX = F.linear(x_BTH, self.qkv_weight, self.qkv_bias)
        # RoPE on the q and k heads together: elementwise, so the same values as one at a time, in half the ops
        qk_BTND = qkv_BTX[..., : (nq + nkv) * d].view(B, T, nq + nkv, d)
        cos, sin = cos_BTD.unsqueeze(2), sin_BTD.unsqueeze(2)
        qk_BTND = qk_BTND * cos + _rotate_half(qk_BTND) * sin
        q_BNTD = qk_BTND[:, :, :nq].transpose(1, 2)
        k_BKTD = qk_BTND[:, :, nq:].transpose(1, 2)
        v_BKTD = qkv_BTX[..., (nq + nkv) * d :].view(B, T, nkv, d).transpose(1, 2)
        if cache is not None:
            k_BKTD, v_BKTD = cache.update(layer, k_BKTD, v_BKTD)
        out_BNTD = F.scaled_dot_product_attention(
            q_BNTD, k_BKTD, v_BKTD, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(out_BNTD.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, device, dtype):
        super().__init__()
        h, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.f = f
        self.gate_up_weight, self.gate_up_bias, (self.gate_proj, self.up_proj) = _fused(h, [f, f], b, device, dtype)
        self.down_proj = Linear(f, h, b, device, dtype)

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        gate_up_BTF = F.linear(x_BTH, self.gate_up_weight, self.gate_up_bias)
        return self.down_proj(F.silu(gate_up_BTF[..., : self.f]) * gate_up_BTF[..., self.f :])


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, device, dtype):
        super().__init__()
        self.self_attn = Attention(cfg, device, dtype)
        self.mlp = MLP(cfg, device, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)

    def forward(self, x_BTH, cos, sin, cache, layer, mask):
        x_BTH = x_BTH + self.self_attn(self.input_layernorm(x_BTH), cos, sin, cache, layer, mask)
        return x_BTH + self.mlp(self.post_attention_layernorm(x_BTH))


class Backbone(nn.Module):
    """Holds `embed_tokens`, `layers`, `norm` so parameter names match HF's `model.*`."""

    def __init__(self, cfg: ModelConfig, device, dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, device, dtype) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)


class DecoderLM(nn.Module):
    """Llama / Qwen2 causal LM. `state_dict()` keys are exactly HF's (no
    `lm_head.weight` when embeddings are tied)."""

    def __init__(self, cfg: ModelConfig, device="cpu", dtype=torch.float32):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, device, dtype)
        self.lm_head = None
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, device, dtype)
        # A plain attribute, not a buffer: it must stay fp32 whatever the weight dtype.
        self.inv_freq = rope_inv_freq(cfg).to(device)
        self._rope_tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def init_random(self, seed: int, std: float = 0.02) -> None:
        """HF-style init (normal(0, std) weights, zero biases, unit norms)."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                val = torch.ones(p.shape)
            elif name.endswith(".bias"):
                val = torch.zeros(p.shape)
            else:
                val = torch.randn(p.shape, generator=gen) * std
            p.data.copy_(val)

    def rope(self, pos_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, D] looked up from a per-dtype table over all positions
        (element for element the same fp32 math as computing them per call)."""
        table = self._rope_tables.get(dtype)
        if table is None:
            pos_S = torch.arange(self.config.max_position_embeddings, device=self.inv_freq.device)
            freqs_Sd = pos_S[:, None].float() * self.inv_freq
            emb_SD = torch.cat((freqs_Sd, freqs_Sd), dim=-1)
            table = self._rope_tables[dtype] = (emb_SD.cos().to(dtype), emb_SD.sin().to(dtype))
        flat_N = pos_BT.reshape(-1)  # index_select: cheaper than advanced indexing on CPU
        cos, sin = (t.index_select(0, flat_N).view(*pos_BT.shape, -1) for t in table)
        return cos, sin

    def hidden(self, ids_BT: torch.Tensor, pos_BT: torch.Tensor | None = None, cache=None, mask=None) -> torch.Tensor:
        """Final hidden states [B, T, H] before the last norm.

        Without `mask`, attention is plainly causal (right-padded input). With
        `cache`, `mask` [B, 1, T, K] (bool, True = attend) selects which of the
        K keys returned by `cache.update` each query sees.
        """
        B, T = ids_BT.shape
        if pos_BT is None:
            pos_BT = torch.arange(T, device=ids_BT.device).expand(B, T)
        x_BTH = self.model.embed_tokens(ids_BT)
        cos, sin = self.rope(pos_BT, x_BTH.dtype)
        for i, layer in enumerate(self.model.layers):
            x_BTH = layer(x_BTH, cos, sin, cache, i, mask)
        return x_BTH

    def logits(self, x_NH: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of hidden states [..., H] (final norm + LM head)."""
        w_VH = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.model.norm(x_NH), w_VH)

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of right-padded sequences (causal, no cache)."""
        return self.logits(self.hidden(ids_BT))
