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

Shared prompts (`shared_prompt=True`, where it saves at least `MIN_SAVED_SHARE` of the tokens): the sequences
that begin with the same prompt (the tokens before their first response token: a GRPO group's samples) are
packed as one unit, the prompt once and then each sequence's continuation, every continuation at the
positions it has in its own sequence and attending to the prompt and to itself only. The prompt's last
position predicts every continuation's first token: the first continuation's through the packed row's next
token as usual, the others through extra (position, target) pairs (`extra_pos`, `extra_targets`), which the
logprob computation appends after the b x S positions. The same logprobs as the sequences packed one by one,
for the prompt's tokens computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slime_rl.types import TrainBatch
from training.prompts import prompt_lengths


@dataclass
class PackedMicroBatch:
    rows: torch.Tensor  # [n] indices of these sequences in the step's TrainBatch
    batch: TrainBatch  # those sequences, trimmed to their longest: [n, T]
    input_ids_bS: torch.Tensor  # [b, S] packed tokens (0 on padding)
    position_ids_bS: torch.Tensor  # [b, S]
    attention_mask_b1SS: torch.Tensor  # [b, 1, S, S] bool, True = may NOT attend (megatron's convention)
    source_nT: torch.Tensor  # [n, T] flat index into [b * S + E] holding each token's logprob; -1 = none
    num_tokens: int  # real tokens in the micro-batch (a shared prompt counted once)
    extra_pos: torch.Tensor = None  # [E] flat positions in [b * S] that also predict `extra_targets`
    extra_targets: torch.Tensor = None  # [E] (shared prompts: the first tokens of a unit's later continuations)

    def __post_init__(self):
        if self.extra_pos is None:
            self.extra_pos = torch.zeros(0, dtype=torch.long)
            self.extra_targets = torch.zeros(0, dtype=torch.long)

    def unpack(self, values_bS: torch.Tensor) -> torch.Tensor:
        """Packed per-position values [b, S] (or [b, S, 1]) -> [n, T] (differentiable; 0 where source is -1);
        an extra slot takes its position's value."""
        flat = values_bS.reshape(-1)
        if len(self.extra_pos):
            flat = torch.cat([flat, flat[self.extra_pos.to(flat.device)]])
        return self.unpack_flat(flat)

    def unpack_flat(self, values_N: torch.Tensor) -> torch.Tensor:
        """Per-slot values [b * S + E] (the b x S positions, then the extra slots) -> [n, T]."""
        src_nT = self.source_nT.to(values_N.device)
        out_nT = values_N[src_nT.clamp(min=0)]
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


def first_fit_decreasing(lengths: list[int], items: list[int], capacity: int, max_items: int,
                         sizes: list[int] | None = None) -> list[list[int]]:
    """Bins of at most max_items items (each counting sizes[i], default 1) with sum(lengths) <= capacity,
    longest items placed first."""
    bins: list[list[int]] = []
    room: list[int] = []
    count: list[int] = []
    for i in sorted(items, key=lambda i: (-lengths[i], i)):
        size = 1 if sizes is None else sizes[i]
        for k, free in enumerate(room):
            if lengths[i] <= free and count[k] + size <= max_items:
                bins[k].append(i)
                room[k] -= lengths[i]
                count[k] += size
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
            count.append(size)
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


@dataclass(frozen=True)
class Unit:
    """Sequences packed together: their first `prefix` tokens (the same in each) once, then each one's rest.
    prefix 0: the sequences back to back, each on its own (a plain row item is a Unit(0, (i,)))."""

    prefix: int
    seqs: tuple[int, ...]

    def length(self, lengths: list[int]) -> int:
        return self.prefix + sum(lengths[i] - self.prefix for i in self.seqs)


def _as_unit(item: "int | Unit") -> Unit:
    return item if isinstance(item, Unit) else Unit(0, (item,))


def pack(batch: TrainBatch, plan: list[list[list["int | Unit"]]], row_len: int) -> list[PackedMicroBatch]:
    """One PackedMicroBatch per planned micro-batch (rows of sequence indices or Units), all of shape
    [max rows, row_len]."""
    lengths = sequence_lengths(batch)
    b = max(len(mb) for mb in plan)
    return [_pack_one(batch, [[_as_unit(u) for u in row] for row in mb], lengths, b, row_len) for mb in plan]


def _pack_one(batch: TrainBatch, packed_rows: list[list[Unit]], lengths: list[int], b: int,
              S: int) -> PackedMicroBatch:
    seqs = [i for row in packed_rows for unit in row for i in unit.seqs]
    T = max(lengths[i] for i in seqs)
    mb = batch.select(torch.tensor(seqs)).select((slice(None), slice(0, T)))
    ids_bS = torch.zeros(b, S, dtype=torch.long)
    pos_bS = torch.zeros(b, S, dtype=torch.long)
    seg_bS = torch.full((b, S), -1, dtype=torch.long)  # the segment (a prompt, a sequence's rest) of each position
    prompt_bS = torch.full((b, S), -1, dtype=torch.long)  # a continuation's prompt segment; -1 = none
    source_nT = torch.full((len(seqs), T), -1, dtype=torch.long)
    extra_pos: list[int] = []
    extra_targets: list[int] = []
    j = seg = 0
    for r, row in enumerate(packed_rows):
        offset = 0
        for unit in row:
            P = unit.prefix
            last = r * S + offset + P - 1  # the prompt's last position (P > 0)
            if P:
                ids_bS[r, offset:offset + P] = batch.input_ids_BT[unit.seqs[0], :P]
                pos_bS[r, offset:offset + P] = torch.arange(P)
                seg_bS[r, offset:offset + P] = prompt_seg = seg
                prompt_start, offset, seg = r * S + offset, offset + P, seg + 1
            for k, i in enumerate(unit.seqs):
                n = lengths[i]
                ids_bS[r, offset:offset + n - P] = batch.input_ids_BT[i, P:n]
                pos_bS[r, offset:offset + n - P] = torch.arange(P, n)
                seg_bS[r, offset:offset + n - P] = seg
                if not P:
                    source_nT[j, 1:n] = r * S + torch.arange(offset, offset + n - 1)  # token t is predicted at t-1
                else:
                    prompt_bS[r, offset:offset + n - P] = prompt_seg
                    source_nT[j, 1:P] = prompt_start + torch.arange(P - 1)
                    if k == 0:  # right after the prompt: the row's next token is this one's first
                        source_nT[j, P] = last
                    else:
                        source_nT[j, P] = b * S + len(extra_pos)
                        extra_pos.append(last)
                        extra_targets.append(int(batch.input_ids_BT[i, P]))
                    source_nT[j, P + 1:n] = r * S + torch.arange(offset, offset + n - P - 1)
                offset += n - P
                j, seg = j + 1, seg + 1
    real_bS = seg_bS >= 0
    own = (seg_bS[:, :, None] == seg_bS[:, None, :]) & real_bS[:, :, None] & torch.ones(S, S, dtype=torch.bool).tril()
    to_prompt = (prompt_bS[:, :, None] == seg_bS[:, None, :]) & (prompt_bS[:, :, None] >= 0)
    allowed = own | to_prompt | torch.eye(S, dtype=torch.bool)
    return PackedMicroBatch(rows=torch.tensor(seqs), batch=mb, input_ids_bS=ids_bS, position_ids_bS=pos_bS,
                            attention_mask_b1SS=~allowed[:, None], source_nT=source_nT,
                            num_tokens=sum(unit.length(lengths) for row in packed_rows for unit in row),
                            extra_pos=torch.tensor(extra_pos, dtype=torch.long),
                            extra_targets=torch.tensor(extra_targets, dtype=torch.long))


MIN_SAVED_SHARE = 0.1  # shared prompts are packed once where that saves at least this share of the tokens


def shared_prompt_units(batch: TrainBatch, lengths: list[int], items: list[int], max_tokens: int,
                        max_seqs: int) -> list[Unit]:
    """`items` as Units: the sequences with the same prompt (tokens before their first response token) together,
    in chunks of at most `max_tokens` tokens and `max_seqs` sequences; the others alone."""
    groups: dict[tuple[int, ...], list[int]] = {}
    units: list[Unit] = []
    prompt_len = prompt_lengths(batch.response_mask_BT).tolist()
    for i in items:
        if not prompt_len[i]:
            units.append(Unit(0, (i,)))
            continue
        groups.setdefault(tuple(batch.input_ids_BT[i, :prompt_len[i]].tolist()), []).append(i)
    for prompt, members in groups.items():
        P, chunk = len(prompt), []
        for i in sorted(members, key=lambda i: (-lengths[i], i)):
            if chunk and (len(chunk) == max_seqs or Unit(P, (*chunk, i)).length(lengths) > max_tokens):
                units.append(Unit(P, tuple(chunk)) if len(chunk) > 1 else Unit(0, (chunk[0],)))
                chunk = []
            chunk.append(i)
        units.append(Unit(P, tuple(chunk)) if len(chunk) > 1 else Unit(0, (chunk[0],)))
    return units


def plan_shared_prompts(batch: TrainBatch, lengths: list[int], items: list[int], max_tokens: int, max_seqs: int,
                        pad_to_multiple: int) -> tuple[list[list[list[Unit]]], int] | None:
    """(micro-batches of rows of Units, row length) packing shared prompts once, or None when that saves less
    than MIN_SAVED_SHARE of the tokens. Rows are as long as the longest unit (dense attention over a row costs
    its length per token, so no longer)."""
    if max(lengths[i] for i in items) > max_tokens:
        return None  # plan_micro_batches says which sequence
    units = shared_prompt_units(batch, lengths, items, max_tokens, max_seqs)
    unit_len = [u.length(lengths) for u in units]
    total = sum(lengths[i] for i in items)
    if total - sum(unit_len) < MIN_SAVED_SHARE * total:
        return None
    row_len = -(-max(unit_len) // pad_to_multiple) * pad_to_multiple
    rows_per_mb = max(1, max_tokens // row_len)
    plan: list[list[list[Unit]]] = [[]]
    sizes = [len(u.seqs) for u in units]
    for row in first_fit_decreasing(unit_len, list(range(len(units))), row_len, max_seqs, sizes):
        row_seqs = sum(sizes[k] for k in row)
        if plan[-1] and (len(plan[-1]) == rows_per_mb
                         or sum(len(u.seqs) for r in plan[-1] for u in r) + row_seqs > max_seqs):
            plan.append([])
        plan[-1].append([units[k] for k in row])
    return plan, row_len


def micro_batches(batch: TrainBatch, dp_rank: int, dp_size: int, max_tokens: int,
                  max_seqs: int, pad_to_multiple: int = 8, shared_prompt: bool = False) -> list[PackedMicroBatch]:
    """This DP rank's share of the batch, packed (an empty list when it gets no rows); with `shared_prompt`,
    each prompt once per unit where that pays (module docstring)."""
    lengths = sequence_lengths(batch)
    row_len = -(-max(lengths) // pad_to_multiple) * pad_to_multiple
    items = split_for_data_parallel(lengths, dp_size)[dp_rank]
    if not items:
        return []
    if shared_prompt:
        shared = plan_shared_prompts(batch, lengths, items, max_tokens, max_seqs, pad_to_multiple)
        if shared is not None:
            return pack(batch, *shared)
    return pack(batch, plan_micro_batches(lengths, items, row_len, max_tokens, max_seqs), row_len)
