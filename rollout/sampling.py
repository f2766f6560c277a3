"""Batched sampling as SGLang does it: penalties and logit bias, temperature,
then top-k / top-p / min-p, with per-request seeds.

Order (SGLang's `SamplingBatchInfo.apply_logits_bias`, then its sampler):
1. frequency / presence penalties, subtracted: `freq * count + presence * (count > 0)`,
   counts over the request's OUTPUT tokens (penaltylib/frequency_penalty.py,
   presence_penalty.py);
2. repetition penalty on the tokens already in the OUTPUT (SGLang's
   penaltylib/repetition_penalty.py counts output tokens only, not the
   prompt, unlike HF): a logit < 0 is multiplied by it, any other divided;
3. logit_bias added; the min_new_tokens mask of stop tokens (-inf);
4. division by the temperature (greedy rows: argmax of the processed logits);
5. top-k, then top-p on the untruncated cumulative mass (a token is dropped
   when the mass before it already exceeds top_p), then min-p: tokens whose
   probability is below min_p * the largest probability are dropped
   (`top_k_top_p_min_p_sampling_from_probs_torch`).

Reproducibility: every row draws its randomness from its own
`torch.Generator` seeded from `SamplingParams.seed` (or, when the seed is None,
from a seed drawn off the engine's generator). All uniforms a row will need
are drawn up front, on the CPU, in fixed blocks, so a request gets the same
tokens alone or in any batch, at any batch position, on any device (up to
floating-point near-ties in the logits). Penalties and bias of a row depend
on its own params and output only. Sampling itself is vectorized over the
batch: a token is picked by inverse CDF with the row's uniform.

Rows that use top-k / top-p / min-p pick from their probabilities sorted in
descending order; rows without truncation pick in vocabulary order. Which
order a row uses depends on its own params only, so batch composition never
changes a row's draw.

Logprob reported for each token (a deliberate choice, SGLang's default in
layers/sampler.py without SGLANG_RETURN_ORIGINAL_LOGPROB):
- temperature > 0: log_softmax(processed_logits / temperature)[token], where
  processed_logits are the logits after steps 1-3 (penalties, bias), NOT
  renormalized after top-k / top-p / min-p truncation.
- temperature == 0 (greedy, argmax): log_softmax(processed_logits)[token].
Without penalties and bias, trainers compute the same logprobs from the raw
logits and the same temperature. With a penalty or a logit_bias, the rollout
logprobs are those of the penalized distribution and a trainer that works
from raw logits gets different ones (use them for importance ratios only
when the trainer applies the same processing). Top logprobs come from the
same processed distribution; prompt (input) logprobs are never penalized.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from slime_rl.types import SamplingParams

FAST_CANDIDATES = 64  # top-k / top-p first look among this many most likely tokens
UNIFORM_BLOCK = 64  # uniforms are drawn in blocks so a longer request's stream extends a shorter one's


def request_uniforms(seed: int, num_steps: int) -> list[float]:
    """One request's uniforms in [0, 1) (float64 values), from generator(seed) in blocks of UNIFORM_BLOCK."""
    gen = torch.Generator().manual_seed(seed)
    out: list[float] = []
    for _ in range(-(-num_steps // UNIFORM_BLOCK)):
        out += torch.rand(UNIFORM_BLOCK, generator=gen, dtype=torch.float64).tolist()
    return out[:num_steps]


def row_uniforms(seeds: list[int], num_steps: int) -> torch.Tensor:
    """Uniforms [B, num_steps], float64: row b is `request_uniforms(seeds[b], num_steps)`."""
    return torch.tensor([request_uniforms(seed, num_steps) for seed in seeds], dtype=torch.float64).view(
        len(seeds), num_steps)


@dataclass
class SamplingTensors:
    """Per-row sampling settings as [B] tensors on the logits' device."""

    temperature_B: torch.Tensor  # float32; 1.0 stands in for greedy rows
    greedy_B: torch.Tensor  # bool
    top_p_B: torch.Tensor  # float32
    top_k_B: torch.Tensor  # int64, vocab size when disabled
    min_p_B: torch.Tensor  # float32, 0 when disabled
    truncate_B: torch.Tensor  # bool: top-k, top-p or min-p active

    @classmethod
    def from_params(cls, params: list[SamplingParams], vocab_size: int, device) -> "SamplingTensors":
        greedy = [p.temperature == 0 for p in params]
        top_k = [vocab_size if p.top_k == -1 else min(p.top_k, vocab_size) for p in params]
        truncate = [k < vocab_size or p.top_p < 1.0 or p.min_p > 0 for k, p in zip(top_k, params)]
        return cls(
            temperature_B=torch.tensor([p.temperature or 1.0 for p in params], dtype=torch.float32, device=device),
            greedy_B=torch.tensor(greedy, dtype=torch.bool, device=device),
            top_p_B=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            top_k_B=torch.tensor(top_k, dtype=torch.int64, device=device),
            min_p_B=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
            truncate_B=torch.tensor(truncate, dtype=torch.bool, device=device),
        )

    def select(self, idx_B: torch.Tensor) -> "SamplingTensors":
        """The rows `idx_B` (used when finished rows leave the batch)."""
        return SamplingTensors(*(t.index_select(0, idx_B) for t in vars(self).values()))


def process_logits(logits_BV: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]]) -> torch.Tensor:
    """Steps 1-3 of the module docstring on float32 logits [B, V] (in place); `outputs[b]` are row b's
    output tokens so far. Rows without penalties or bias are left untouched."""
    B, V = logits_BV.shape
    dev = logits_BV.device
    rows = [b for b, p in enumerate(params) if p.penalized and outputs[b]]
    if rows:
        n_max = max(len(outputs[b]) for b in rows)
        ids_RN = torch.zeros(len(rows), n_max, dtype=torch.long)
        valid_RN = torch.zeros(len(rows), n_max, dtype=torch.float32)
        for i, b in enumerate(rows):
            ids_RN[i, : len(outputs[b])] = torch.tensor(outputs[b], dtype=torch.long)
            valid_RN[i, : len(outputs[b])] = 1.0
        counts_RV = torch.zeros(len(rows), V, dtype=torch.float32, device=dev)
        counts_RV.scatter_add_(1, ids_RN.to(dev), valid_RN.to(dev))
        idx_R = torch.tensor(rows, device=dev)
        freq_R1, pres_R1, rep_R1 = (
            torch.tensor([getattr(params[b], name) for b in rows], dtype=torch.float32, device=dev).unsqueeze(1)
            for name in ("frequency_penalty", "presence_penalty", "repetition_penalty"))
        seen_RV = counts_RV > 0
        x_RV = logits_BV[idx_R] - freq_R1 * counts_RV - pres_R1 * seen_RV
        scaled_RV = torch.where(x_RV < 0, x_RV * rep_R1, x_RV / rep_R1)
        logits_BV[idx_R] = torch.where(seen_RV, scaled_RV, x_RV)
    for b, p in enumerate(params):
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias.keys()), dtype=torch.long, device=dev)
            logits_BV[b, ids] += torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=dev)
    return logits_BV


def _inverse_cdf(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Index [B] of the first token whose cumulative mass exceeds u * total."""
    cdf_BV = probs_BV.double().cumsum(-1)
    target_B1 = (u_B.to(cdf_BV.device) * cdf_BV[:, -1]).unsqueeze(1)
    idx_B = torch.searchsorted(cdf_BV, target_B1, right=True).squeeze(1)
    return idx_B.clamp_(max=probs_BV.shape[-1] - 1)


def _pick_sorted(sorted_BK: torch.Tensor, order_BK: torch.Tensor, st: SamplingTensors, u_B,
                 kept: dict[int, list[int]] | None = None, rows: list[int] | None = None) -> torch.Tensor:
    """Top-k, top-p, then min-p over probs sorted descending (a prefix of the vocab is
    enough when it holds every kept token); token ids [B]. With `kept`, the kept ids of
    row i (best first) go to kept[rows[i]]."""
    rank_K = torch.arange(sorted_BK.shape[-1], device=sorted_BK.device)
    drop_BK = rank_K.unsqueeze(0) >= st.top_k_B.unsqueeze(1)
    drop_BK |= (sorted_BK.cumsum(-1) - sorted_BK) > st.top_p_B.unsqueeze(1)
    drop_BK |= sorted_BK < (sorted_BK[:, :1] * st.min_p_B.unsqueeze(1))
    drop_BK[:, 0] = False  # the most likely token always survives
    idx_B = _inverse_cdf(sorted_BK.masked_fill(drop_BK, 0.0), u_B)
    if kept is not None:
        keep_BK = ~drop_BK & (sorted_BK > 0)
        keep_BK[:, 0] = True
        for i, (ids, keep) in enumerate(zip(order_BK.tolist(), keep_BK.tolist())):
            kept[rows[i]] = [t for t, k in zip(ids, keep) if k]
    return order_BK.gather(1, idx_B.unsqueeze(1)).squeeze(1)


def _sample_truncated(probs_BV: torch.Tensor, st: SamplingTensors, u_B: torch.Tensor,
                      want_B: list[bool], kept: dict[int, list[int]]) -> torch.Tensor:
    """Top-k / top-p / min-p sampling; token ids [B]; kept sets of the rows in `want_B` into `kept`.

    A full vocabulary sort is slow on CPU, so rows whose kept set provably lies
    in their top FAST_CANDIDATES tokens (top_k that small, that prefix already
    holding more than top_p of the mass, or its last token already below
    min_p) pick from `topk` only; the others sort everything. The choice
    depends on the row alone.
    """
    k = min(FAST_CANDIDATES, probs_BV.shape[-1])
    top_BK, idx_BK = probs_BV.topk(k, dim=-1)
    fits_B = (st.top_k_B <= k) | (top_BK.sum(-1) > st.top_p_B) | (top_BK[:, -1] < st.min_p_B * top_BK[:, 0])
    fits = fits_B.tolist()
    tokens_B = _pick_sorted(top_BK, idx_BK, st, u_B)
    want_fit = [b for b, (w, f) in enumerate(zip(want_B, fits)) if w and f]
    if want_fit:
        sel = torch.tensor(want_fit, device=probs_BV.device)
        _pick_sorted(top_BK[sel], idx_BK[sel], st.select(sel), u_B[sel], kept, want_fit)
    if not all(fits):
        rows = [b for b, f in enumerate(fits) if not f]
        rows_t = torch.tensor(rows, device=probs_BV.device)
        sorted_BV, order_BV = probs_BV[rows_t].sort(dim=-1, descending=True, stable=True)
        want = [i for i, b in enumerate(rows) if want_B[b]]
        picked = _pick_sorted(sorted_BV, order_BV, st.select(rows_t), u_B[rows_t])
        if want:
            sel = torch.tensor(want, device=probs_BV.device)
            _pick_sorted(sorted_BV[sel], order_BV[sel], st.select(rows_t[sel]), u_B[rows_t[sel]], kept,
                         [rows[i] for i in want])
        tokens_B = tokens_B.index_put((rows_t,), picked)
    return tokens_B


def sample(logits_BV: torch.Tensor, st: SamplingTensors, u_B: torch.Tensor, want_kept: list[bool] | None = None,
           kept: dict[int, list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of the processed logits; returns (tokens [B] int64, logprobs [B] float32).

    For every row b with want_kept[b], kept[b] gets the ids it was sampled among, best first
    (a greedy row keeps its argmax only, an untruncated row every token of nonzero probability).

    `u_B` holds each row's uniform for this step (from `row_uniforms`).
    """
    logits_BV = logits_BV.float()
    u_B = u_B.to(logits_BV.device)
    any_want = bool(want_kept) and any(want_kept)  # without, skip the per-row loops below
    want = want_kept if any_want else [False] * logits_BV.shape[0]
    kept = {} if kept is None else kept
    logprobs_BV = torch.log_softmax(logits_BV / st.temperature_B.unsqueeze(1), dim=-1)
    tokens_B = torch.argmax(logits_BV, dim=-1)
    sampled_B = ~st.greedy_B
    if bool(sampled_B.any()):
        probs_BV = logprobs_BV.exp()
        plain_B = sampled_B & ~st.truncate_B
        trunc_B = sampled_B & st.truncate_B
        if bool(plain_B.any()):
            tokens_B = torch.where(plain_B, _inverse_cdf(probs_BV, u_B), tokens_B)
            for b in plain_B.nonzero().squeeze(1).tolist() if any_want else []:
                if want[b]:
                    order = probs_BV[b].sort(descending=True, stable=True)
                    kept[b] = order.indices[order.values > 0].tolist()
        if bool(trunc_B.any()):
            rows = trunc_B.nonzero().squeeze(1)
            sub_want = [want[b] for b in rows.tolist()]
            sub_kept: dict[int, list[int]] = {}
            picked = _sample_truncated(probs_BV[rows], st.select(rows), u_B[rows], sub_want, sub_kept)
            kept.update({int(rows[i]): ids for i, ids in sub_kept.items()})
            tokens_B = tokens_B.index_put((rows,), picked)
    for b in st.greedy_B.nonzero().squeeze(1).tolist() if any_want else []:
        if want[b]:
            kept[b] = [int(tokens_B[b])]
    logprob_B = logprobs_BV.gather(1, tokens_B.unsqueeze(1)).squeeze(1)
    return tokens_B, logprob_B
