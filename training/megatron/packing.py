"""Variable-length sequences packed into micro-batches: little padding, a token budget per micro-batch.

A TrainBatch holds right-padded rows [B, T]. Here its sequences are split
across data-parallel ranks (balanced by tokens), then packed first-fit
decreasing into rows as long as the step's longest sequence: several short
sequences share a row, back to back, with position ids restarting at 0 for
each and a block-diagonal causal mask so no token attends across a boundary.
Rows are grouped into micro-batches of at most `max_tokens` tokens (and
`max_seqs` sequences). All micro-batches of a step have the same [b, S]
shape (pipeline stages exchange fixed-shape activations), so the only
padding is at row ends and in the odd empty row.

Rows stay as long as the longest sequence, not the whole token budget,
because the local (non-Transformer-Engine) attention is dense: its cost grows
with the square of the row length, so one 4k-token row of 25-token
sequences would cost 160x the attention of the same tokens in 25-token rows.

Logprobs come back in the packed layout: `lp_bS[r, s]` = log p(x[r, s+1] |
x[r, <=s]). `PackedMicroBatch.unpack` maps them to the [b, T] layout of the
micro TrainBatch (position t = log p(x_t | x_<t), 0 at t = 0 and on padding),
so the loss functions see exactly what the reference backend gives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slime_rl.types import TrainBatch


@dataclass
class PackedMicroBatch:
    rows: torch.Tensor  # [n] indices of these sequences in the step's TrainBatch
    batch: TrainBatch  # those sequences, trimmed to their longest: [n, T]
    input_ids_bS: torch.Tensor  # [b, S] packed tokens (0 on padding)
    position_ids_bS: torch.Tensor  # [b, S]
    attention_mask_b1SS: torch.Tensor  # [b, 1, S, S] bool, True = may NOT attend (megatron's convention)
    source_nT: torch.Tensor  # [n, T] flat index into [b * S] holding each token's logprob; -1 = none
    num_tokens: int  # real tokens in the micro-batch

    def unpack(self, values_bS: torch.Tensor) -> torch.Tensor:
        """Packed per-position values [b, S] -> [n, T] (differentiable; 0 where source is -1)."""
        src_nT = self.source_nT.to(values_bS.device)
        out_nT = values_bS.reshape(-1)[src_nT.clamp(min=0)]
        return torch.where(src_nT >= 0, out_nT, torch.zeros_like(out_nT))


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


def first_fit_decreasing(lengths: list[int], items: list[int], capacity: int, max_items: int) -> list[list[int]]:
    """Bins of at most max_items items with sum(lengths) <= capacity, longest items placed first."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(items, key=lambda i: (-lengths[i], i)):
        for k, free in enumerate(room):
            if lengths[i] <= free and len(bins[k]) < max_items:
                bins[k].append(i)
                room[k] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def plan_micro_batches(lengths: list[int], items: list[int], row_len: int, max_tokens: int,
                       max_seqs: int) -> list[list[list[int]]]:
    """Micro-batches of rows of sequences: rows <= row_len tokens, micro-batches <= max_tokens and <= max_seqs."""
    too_long = [i for i in items if lengths[i] > max_tokens]
    if too_long:
        i = too_long[0]
        raise ValueError(f"sequence {i} has {lengths[i]} tokens, more than the micro-batch token budget "
                         f"({max_tokens}); raise train.max_tokens_per_micro_batch")
    rows_per_mb = max(1, max_tokens // row_len)
    plan: list[list[list[int]]] = [[]]
    for row in first_fit_decreasing(lengths, items, row_len, max_seqs):
        if plan[-1] and (len(plan[-1]) == rows_per_mb or sum(map(len, plan[-1])) + len(row) > max_seqs):
            plan.append([])
        plan[-1].append(row)
    return plan


def pack(batch: TrainBatch, plan: list[list[list[int]]], row_len: int) -> list[PackedMicroBatch]:
    """One PackedMicroBatch per planned micro-batch, all of shape [max rows, row_len]."""
    lengths = sequence_lengths(batch)
    b = max(len(mb) for mb in plan)
    return [_pack_one(batch, mb, lengths, b, row_len) for mb in plan]


def _pack_one(batch: TrainBatch, packed_rows: list[list[int]], lengths: list[int], b: int,
              S: int) -> PackedMicroBatch:
    seqs = [i for row in packed_rows for i in row]
    T = max(lengths[i] for i in seqs)
    mb = batch.select(torch.tensor(seqs)).select((slice(None), slice(0, T)))
    ids_bS = torch.zeros(b, S, dtype=torch.long)
    pos_bS = torch.zeros(b, S, dtype=torch.long)
    seg_bS = torch.full((b, S), -1, dtype=torch.long)  # which sequence owns each position; -1 = padding
    source_nT = torch.full((len(seqs), T), -1, dtype=torch.long)
    j = 0
    for r, row in enumerate(packed_rows):
        offset = 0
        for i in row:
            n = lengths[i]
            ids_bS[r, offset:offset + n] = batch.input_ids_BT[i, :n]
            pos_bS[r, offset:offset + n] = torch.arange(n)
            seg_bS[r, offset:offset + n] = j
            source_nT[j, 1:n] = r * S + torch.arange(offset, offset + n - 1)  # token t is predicted at t-1
            offset += n
            j += 1
    same_seq = (seg_bS[:, :, None] == seg_bS[:, None, :]) & (seg_bS[:, :, None] >= 0)
    allowed = (same_seq & torch.ones(S, S, dtype=torch.bool).tril()) | torch.eye(S, dtype=torch.bool)
    return PackedMicroBatch(rows=torch.tensor(seqs), batch=mb, input_ids_bS=ids_bS, position_ids_bS=pos_bS,
                            attention_mask_b1SS=~allowed[:, None], source_nT=source_nT,
                            num_tokens=sum(lengths[i] for i in seqs))


def micro_batches(batch: TrainBatch, dp_rank: int, dp_size: int, max_tokens: int,
                  max_seqs: int, pad_to_multiple: int = 8) -> list[PackedMicroBatch]:
    """This DP rank's share of the batch, packed (an empty list when it gets no rows)."""
    lengths = sequence_lengths(batch)
    row_len = -(-max(lengths) // pad_to_multiple) * pad_to_multiple
    items = split_for_data_parallel(lengths, dp_size)[dp_rank]
    if not items:
        return []
    return pack(batch, plan_micro_batches(lengths, items, row_len, max_tokens, max_seqs), row_len)
