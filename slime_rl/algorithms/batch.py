"""Turn scored groups of samples into a padded `TrainBatch`.

Layout: row b holds prompt + response tokens, right-padded. Position t of a
per-token tensor refers to token t (predicted from positions < t), so the
response mask is 1 exactly on the response tokens whose loss mask is 1.
"""

from __future__ import annotations

import torch

from slime_rl.types import Sample, SampleStatus, TrainBatch


LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant")
LOSS_AGG_ALIASES = {"token": "token_mean", "sequence": "seq_mean_token_mean"}


def token_loss_weights(response_mask_BT: torch.Tensor, loss_agg: str, constant_len: int | None = None) -> torch.Tensor:
    """Per-token weights whose sum over a batch is the aggregated loss.

    - token_mean ("token"): every loss token weighs 1 / (loss tokens in the batch);
    - seq_mean_token_mean ("sequence"): each sequence weighs 1 / S, spread evenly over its tokens;
    - seq_mean_token_sum: each token weighs 1 / S (a sequence's terms are summed);
    - constant (Dr. GRPO): each token weighs 1 / (S * constant_len), constant_len being the generation
      budget, so a response's length never rescales its tokens.
    S counts the sequences that have loss tokens: a row with none (every token masked, e.g. an aborted
    sample or environment tokens only) never dilutes a sequence mean. verl's seq-mean-* modes divide by
    every row of the micro-batch; OpenRLHF's sequence mode averages over all rows too.
    Computed once per batch (or mini-batch), so splitting it into micro-batches or DP ranks leaves the
    sum unchanged.
    """
    mode = LOSS_AGG_ALIASES.get(loss_agg, loss_agg)
    mask_BT = response_mask_BT.to(torch.float32)
    tokens_B1 = mask_BT.sum(dim=1, keepdim=True)
    sequences = (tokens_B1 > 0).sum().clamp(min=1)
    if mode == "token_mean":
        return mask_BT / mask_BT.sum().clamp(min=1.0)
    if mode == "seq_mean_token_mean":
        return mask_BT / tokens_B1.clamp(min=1.0) / sequences
    if mode == "seq_mean_token_sum":
        return mask_BT / sequences
    if mode == "constant":
        if constant_len is None or constant_len < 1:
            raise ValueError(f"loss_agg 'constant' needs constant_len >= 1 (the generation budget), got {constant_len}")
        return mask_BT / sequences / constant_len
    raise ValueError(f"unknown loss_agg {loss_agg!r}; allowed values: {', '.join(LOSS_AGG_MODES)} "
                     f"(or {', '.join(LOSS_AGG_ALIASES)})")


def build_train_batch(
    samples: list[Sample],
    advantages: list[float] | None,
    pad_id: int,
    loss_agg: str = "token",
    temperature: float = 1.0,
    constant_len: int | None = None,
    group_index: list[int] | None = None,
    rewards: list[float] | None = None,
    mask_truncated: bool = False,
) -> TrainBatch:
    """Pack samples into right-padded tensors.

    `advantages`: one scalar per sample broadcast over its loss tokens (None: zeros, for an algorithm to fill
    in from the batch). `group_index`: the group of each sample (default: its `group_id`). `rewards`: each
    sample's scalar reward after shaping (default: `scalar_reward` of scored samples, else 0).
    `mask_truncated`: samples cut by the token budget get no loss (DAPO's option).
    """
    if advantages is not None and len(samples) != len(advantages):
        raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
    if not samples:
        raise ValueError("cannot build a train batch from zero samples")
    T = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    B = len(samples)
    # padded Python rows, then one tensor per field: a loop of per-sample tensor ops costs 4-5x more (256
    # samples), and more still beside an in-process engine thread (each op a turn at the GIL)
    ids, resp, lps, lengths = [], [], [], []
    for s in samples:
        P, R = len(s.prompt_ids), len(s.response_ids)
        pad = T - P - R
        lengths.append(P + R)
        ids.append(s.prompt_ids + s.response_ids + [pad_id] * pad)
        if mask_truncated and s.status == SampleStatus.TRUNCATED:  # no loss: no mask, no logprobs
            resp.append([0] * T)
            lps.append([0.0] * T)
        else:
            resp.append([0] * P + (s.loss_mask or [1] * R) + [0] * pad)
            lps.append([0.0] * P + (s.rollout_logprobs or [0.0] * R) + [0.0] * pad)
    ids_BT = torch.tensor(ids, dtype=torch.long)
    attn_BT = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    resp_BT = torch.tensor(resp, dtype=torch.float32)
    rollout_lp_BT = torch.tensor(lps, dtype=torch.float32)
    adv_B = torch.tensor(advantages if advantages is not None else [0.0] * B, dtype=torch.float32)
    if rewards is None:
        rewards = [s.scalar_reward if s.reward is not None else 0.0 for s in samples]
    return TrainBatch(
        input_ids_BT=ids_BT,
        attention_mask_BT=attn_BT,
        response_mask_BT=resp_BT,
        advantages_BT=adv_B[:, None] * resp_BT,
        rollout_logprobs_BT=rollout_lp_BT,
        loss_weights_BT=token_loss_weights(resp_BT, loss_agg, constant_len),
        temperature=temperature,
        rewards_B=torch.tensor(rewards, dtype=torch.float32),
        group_B=torch.tensor(group_index if group_index is not None else [s.group_id for s in samples],
                             dtype=torch.long),
    )


def overlong_penalty(length: int, budget: int, buffer_len: int, penalty: float) -> float:
    """DAPO's soft overlong punishment: 0 up to budget - L tokens, then falling linearly to -penalty at the
    budget (and below it past the budget)."""
    if buffer_len <= 0 or length <= budget - buffer_len:
        return 0.0
    return -penalty * min(1.0, (length - (budget - buffer_len)) / buffer_len)
