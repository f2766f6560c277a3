"""Batched temperature / top-k / top-p sampling with per-request seeds.

Reproducibility: every row draws its randomness from its own
`torch.Generator` seeded from `SamplingParams.seed` (or, when the seed is None,
from a seed drawn off the engine's generator). All uniforms a row will need
are drawn up front, on the CPU, in fixed blocks, so a request gets the same
tokens alone or in any batch, at any batch position, on any device (up to
floating-point near-ties in the logits). Sampling itself is vectorized over
the batch: a token is picked by inverse CDF with the row's uniform.

Rows that use top-k / top-p pick from their probabilities sorted in
descending order; rows without truncation pick in vocabulary order. Which
order a row uses depends on its own params only, so batch composition never
changes a row's draw. Truncation follows SGLang: top-k
first, then top-p drops the tokens whose preceding cumulative probability
(of the untruncated distribution) already exceeds top_p.

Logprob reported for each token (a deliberate choice):
- temperature > 0: log_softmax(logits / temperature)[token], NOT renormalized
  after top-k / top-p truncation. Trainers compute logprobs of the same tokens
  with the same temperature, so rollout and trainer logprobs agree.
- temperature == 0 (greedy, argmax): log_softmax(logits)[token].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slime_rl.types import SamplingParams

FAST_CANDIDATES = 64  # top-k / top-p first look among this many most likely tokens
UNIFORM_BLOCK = 64  # uniforms are drawn in blocks so a longer request's stream extends a shorter one's


def row_uniforms(seeds: list[int], num_steps: int) -> torch.Tensor:
    """Uniforms [B, num_steps] in [0, 1), float64, row b from generator(seeds[b])."""
    n_blocks = -(-num_steps // UNIFORM_BLOCK)
    out = torch.empty(len(seeds), n_blocks * UNIFORM_BLOCK, dtype=torch.float64)
    for b, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed)
        for k in range(n_blocks):
            out[b, k * UNIFORM_BLOCK : (k + 1) * UNIFORM_BLOCK] = torch.rand(
                UNIFORM_BLOCK, generator=gen, dtype=torch.float64
            )
    return out[:, :num_steps]


@dataclass
class SamplingTensors:
    """Per-row sampling settings as [B] tensors on the logits' device."""

    temperature_B: torch.Tensor  # float32; 1.0 stands in for greedy rows
    greedy_B: torch.Tensor  # bool
    top_p_B: torch.Tensor  # float32
    top_k_B: torch.Tensor  # int64, vocab size when disabled
    truncate_B: torch.Tensor  # bool: top-k or top-p active

    @classmethod
    def from_params(cls, params: list[SamplingParams], vocab_size: int, device) -> "SamplingTensors":
        greedy = [p.temperature == 0 for p in params]
        top_k = [vocab_size if p.top_k == -1 else min(p.top_k, vocab_size) for p in params]
        truncate = [k < vocab_size or p.top_p < 1.0 for k, p in zip(top_k, params)]
        return cls(
            temperature_B=torch.tensor([p.temperature or 1.0 for p in params], dtype=torch.float32, device=device),
            greedy_B=torch.tensor(greedy, dtype=torch.bool, device=device),
            top_p_B=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            top_k_B=torch.tensor(top_k, dtype=torch.int64, device=device),
            truncate_B=torch.tensor(truncate, dtype=torch.bool, device=device),
        )

    def select(self, idx_B: torch.Tensor) -> "SamplingTensors":
        """The rows `idx_B` (used when finished rows leave the batch)."""
        return SamplingTensors(*(t.index_select(0, idx_B) for t in vars(self).values()))


def _inverse_cdf(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Index [B] of the first token whose cumulative mass exceeds u * total."""
    cdf_BV = probs_BV.double().cumsum(-1)
    target_B1 = (u_B.to(cdf_BV.device) * cdf_BV[:, -1]).unsqueeze(1)
    idx_B = torch.searchsorted(cdf_BV, target_B1, right=True).squeeze(1)
    return idx_B.clamp_(max=probs_BV.shape[-1] - 1)


def _pick_sorted(sorted_BK: torch.Tensor, order_BK: torch.Tensor, st: SamplingTensors, u_B) -> torch.Tensor:
    """Top-k then top-p over probs sorted descending (a prefix of the vocab is
    enough when it holds the whole nucleus); token ids [B]."""
    rank_K = torch.arange(sorted_BK.shape[-1], device=sorted_BK.device)
    drop_BK = rank_K.unsqueeze(0) >= st.top_k_B.unsqueeze(1)
    drop_BK |= (sorted_BK.cumsum(-1) - sorted_BK) > st.top_p_B.unsqueeze(1)
    drop_BK[:, 0] = False  # the most likely token always survives
    idx_B = _inverse_cdf(sorted_BK.masked_fill(drop_BK, 0.0), u_B)
    return order_BK.gather(1, idx_B.unsqueeze(1)).squeeze(1)


def _sample_truncated(probs_BV: torch.Tensor, st: SamplingTensors, u_B: torch.Tensor) -> torch.Tensor:
    """Top-k / top-p sampling; token ids [B].

    A full vocabulary sort is slow on CPU, so rows whose kept set provably lies
    in their top FAST_CANDIDATES tokens (top_k that small, or that prefix
    already holding more than top_p of the mass) pick from `topk` only; the
    others sort everything. The choice depends on the row alone.
    """
    k = min(FAST_CANDIDATES, probs_BV.shape[-1])
    top_BK, idx_BK = probs_BV.topk(k, dim=-1)
    fits_B = (st.top_k_B <= k) | (top_BK.sum(-1) > st.top_p_B)
    tokens_B = _pick_sorted(top_BK, idx_BK, st, u_B)
    if not bool(fits_B.all()):
        rows = (~fits_B).nonzero().squeeze(1)
        sorted_BV, order_BV = probs_BV[rows].sort(dim=-1, descending=True, stable=True)
        tokens_B = tokens_B.index_put((rows,), _pick_sorted(sorted_BV, order_BV, st.select(rows), u_B[rows]))
    return tokens_B


def sample(logits_BV: torch.Tensor, st: SamplingTensors, u_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; returns (tokens [B] int64, logprobs [B] float32).

    `u_B` holds each row's uniform for this step (from `row_uniforms`).
    """
    logits_BV = logits_BV.float()
    u_B = u_B.to(logits_BV.device)
    logprobs_BV = torch.log_softmax(logits_BV / st.temperature_B.unsqueeze(1), dim=-1)
    tokens_B = torch.argmax(logits_BV, dim=-1)
    sampled_B = ~st.greedy_B
    if bool(sampled_B.any()):
        probs_BV = logprobs_BV.exp()
        plain_B = sampled_B & ~st.truncate_B
        trunc_B = sampled_B & st.truncate_B
        if bool(plain_B.any()):
            tokens_B = torch.where(plain_B, _inverse_cdf(probs_BV, u_B), tokens_B)
        if bool(trunc_B.any()):
            rows = trunc_B.nonzero().squeeze(1)
            picked = _sample_truncated(probs_BV[rows], st.select(rows), u_B[rows])
            tokens_B = tokens_B.index_put((rows,), picked)
    logprob_B = logprobs_BV.gather(1, tokens_B.unsqueeze(1)).squeeze(1)
    return tokens_B, logprob_B
