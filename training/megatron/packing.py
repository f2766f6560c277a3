"""Variable-length sequences packed into micro-batches: no padding waste, a token budget per micro-batch.

A TrainBatch holds right-padded rows [B, T]. Here its sequences are split
across data-parallel ranks (balanced by tokens), then packed first-fit
decreasing into micro-batches of at most `max_tokens` tokens (and at most
`max_seqs` sequences). Each micro-batch is one packed row: the sequences
back to back, position ids restarting at 0 for each, and a block-diagonal
causal mask so no token attends across a sequence boundary. All micro-batches
of one step share the longest row's length (pipeline stages exchange
fixed-shape activations), so the only padding is at the end of rows.

Logprobs come back in the packed layout: `lp_S[s]` = log p(x[s+1] | x[<=s]).
`PackedMicroBatch.unpack` maps them to the [b, T] layout of the micro
TrainBatch (position t = log p(x_t | x_<t), 0 at t = 0 and on padding), so the
loss functions see exactly what the reference backend gives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slime_rl.types import TrainBatch


@dataclass
class PackedMicroBatch:
    rows: torch.Tensor  # [b] indices of these sequences in the step's TrainBatch
    batch: TrainBatch  # those rows, trimmed to their longest sequence: [b, T]
    input_ids_1S: torch.Tensor  # [1, S] packed tokens (0 after the last sequence)
    position_ids_1S: torch.Tensor  # [1, S]
    attention_mask_11SS: torch.Tensor  # [1, 1, S, S] bool, True = may NOT attend (megatron's convention)
    source_bT: torch.Tensor  # [b, T] packed position holding each token's logprob; -1 = none
    num_tokens: int  # real tokens in the row

    def unpack(self, values_S: torch.Tensor) -> torch.Tensor:
        """Packed per-position values [S] -> [b, T] (differentiable; 0 where source is -1)."""
        src_bT = self.source_bT
        out_bT = values_S[src_bT.clamp(min=0)]
        return torch.where(src_bT >= 0, out_bT, torch.zeros_like(out_bT))


def sequence_lengths(batch: TrainBatch) -> list[int]:
    return [int(n) for n in batch.attention_mask_BT.sum(dim=1).tolist()]


def split_for_data_parallel(lengths: list[int], dp_size: int) -> list[list[int]]:
    """Row indices per DP rank, longest first to the least-loaded rank (ties: lower rank)."""
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(dp_size), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += lengths[i]
    return [sorted(s) for s in shares]


def plan_micro_batches(lengths: list[int], rows: list[int], max_tokens: int, max_seqs: int) -> list[list[int]]:
    """First-fit decreasing: groups of rows with sum(lengths) <= max_tokens and <= max_seqs rows each."""
    too_long = [i for i in rows if lengths[i] > max_tokens]
    if too_long:
        i = too_long[0]
        raise ValueError(f"sequence {i} has {lengths[i]} tokens, more than the micro-batch token budget "
                         f"({max_tokens}); raise train.max_tokens_per_micro_batch")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(rows, key=lambda i: (-lengths[i], i)):
        for k, free in enumerate(room):
            if lengths[i] <= free and len(bins[k]) < max_seqs:
                bins[k].append(i)
                room[k] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


def pack(batch: TrainBatch, groups: list[list[int]], seq_len: int | None = None,
         pad_to_multiple: int = 8) -> list[PackedMicroBatch]:
    """One PackedMicroBatch per group of rows; every row padded to the same length S."""
    lengths = sequence_lengths(batch)
    longest = max((sum(lengths[i] for i in g) for g in groups), default=1)
    S = seq_len or -(-longest // pad_to_multiple) * pad_to_multiple
    return [_pack_one(batch, g, lengths, S) for g in groups]


def _pack_one(batch: TrainBatch, rows: list[int], lengths: list[int], S: int) -> PackedMicroBatch:
    T = max(lengths[i] for i in rows)
    mb = batch.select(torch.tensor(rows)).select((slice(None), slice(0, T)))
    ids_S = torch.zeros(S, dtype=torch.long)
    pos_S = torch.zeros(S, dtype=torch.long)
    seg_S = torch.full((S,), -1, dtype=torch.long)  # which sequence owns each position; -1 = padding
    source_bT = torch.full((len(rows), T), -1, dtype=torch.long)
    offset = 0
    for j, i in enumerate(rows):
        n = lengths[i]
        ids_S[offset:offset + n] = batch.input_ids_BT[i, :n]
        pos_S[offset:offset + n] = torch.arange(n)
        seg_S[offset:offset + n] = j
        source_bT[j, 1:n] = torch.arange(offset, offset + n - 1)  # token t is predicted at position t-1
        offset += n
    same_seq_SS = (seg_S[:, None] == seg_S[None, :]) & (seg_S[:, None] >= 0)
    causal_SS = torch.ones(S, S, dtype=torch.bool).tril()
    allowed_SS = (same_seq_SS & causal_SS) | torch.eye(S, dtype=torch.bool)  # padding attends to itself
    return PackedMicroBatch(rows=torch.tensor(rows), batch=mb, input_ids_1S=ids_S[None], position_ids_1S=pos_S[None],
                            attention_mask_11SS=~allowed_SS[None, None], source_bT=source_bT, num_tokens=offset)


def micro_batches(batch: TrainBatch, dp_rank: int, dp_size: int, max_tokens: int, max_seqs: int) -> list[PackedMicroBatch]:
    """This DP rank's share of the batch, packed (an empty list when it gets no rows)."""
    lengths = sequence_lengths(batch)
    rows = split_for_data_parallel(lengths, dp_size)[dp_rank]
    if not rows:
        return []
    return pack(batch, plan_micro_batches(lengths, rows, max_tokens, max_seqs))
