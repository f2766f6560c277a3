"""Turn scored groups of samples into a padded `TrainBatch`.

Layout: row b holds prompt + response tokens, right-padded. Position t of a
per-token tensor refers to token t (predicted from positions < t), so the
response mask is 1 exactly on the response tokens whose loss mask is 1.
"""

from __future__ import annotations

import torch

from slime_rl.types import Sample, TrainBatch


def token_loss_weights(response_mask_BT: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Per-token weights whose sum over a batch is the aggregated loss.

    token: every response token weighs 1 / (response tokens in the batch).
    sequence: each sequence weighs 1 / B, spread evenly over its tokens.
    Computed once per batch, so splitting into micro-batches leaves the sum unchanged.
    """
    mask_BT = response_mask_BT.to(torch.float32)
    if loss_agg == "token":
        return mask_BT / mask_BT.sum().clamp(min=1.0)
    if loss_agg == "sequence":
        per_seq_B = mask_BT.sum(dim=1, keepdim=True).clamp(min=1.0)
        return mask_BT / per_seq_B / mask_BT.shape[0]
    raise ValueError(f"unknown loss_agg {loss_agg!r}; allowed values: token, sequence")


def build_train_batch(
    samples: list[Sample],
    advantages: list[float],
    pad_id: int,
    loss_agg: str = "token",
    temperature: float = 1.0,
) -> TrainBatch:
    """Pack samples (with one scalar advantage each) into right-padded tensors."""
    if len(samples) != len(advantages):
        raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
    if not samples:
        raise ValueError("cannot build a train batch from zero samples")
    T = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    B = len(samples)
    ids_BT = torch.full((B, T), pad_id, dtype=torch.long)
    attn_BT = torch.zeros((B, T), dtype=torch.long)
    resp_BT = torch.zeros((B, T), dtype=torch.float32)
    adv_BT = torch.zeros((B, T), dtype=torch.float32)
    rollout_lp_BT = torch.zeros((B, T), dtype=torch.float32)
    for b, (s, adv) in enumerate(zip(samples, advantages)):
        P, R = len(s.prompt_ids), len(s.response_ids)
        ids_BT[b, : P + R] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        attn_BT[b, : P + R] = 1
        loss_mask = s.loss_mask if s.loss_mask else [1] * R
        resp_BT[b, P : P + R] = torch.tensor(loss_mask, dtype=torch.float32)
        adv_BT[b, P : P + R] = adv
        if s.rollout_logprobs:
            rollout_lp_BT[b, P : P + R] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
    adv_BT *= resp_BT
    return TrainBatch(
        input_ids_BT=ids_BT,
        attention_mask_BT=attn_BT,
        response_mask_BT=resp_BT,
        advantages_BT=adv_BT,
        rollout_logprobs_BT=rollout_lp_BT,
        loss_weights_BT=token_loss_weights(resp_BT, loss_agg),
        temperature=temperature,
    )
