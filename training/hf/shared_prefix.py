"""Shared-prompt forward: each distinct prompt of a micro-batch runs through the decoder once.

A GRPO group is n samples of one prompt, so a micro-batch of right-padded rows computes every prompt n
times. Here the rows' prompts (the tokens before each row's first response token) are deduplicated, run
once as a batch of distinct prompts with the key/value cache kept, and every row's continuation runs on
its prompt's cached keys and values (indexed per row, so gradients of all n continuations flow back into
the one prompt computation). Causal attention is unchanged: a continuation token sees its row's prompt and
its own earlier tokens, at the same positions as in the full-row forward, so logprobs, loss and gradients
are those of the full-row forward up to float rounding (tests/test_shared_prefix.py).

Only the positions that predict response tokens come out, which is what the trainer's output layer reads
with `response_tokens_only`. `plan_shared_prefix` decides per micro-batch: sharing must save at least
`min_saved_share` of the micro-batch's real tokens, else the plain forward (one call, causal kernel) runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.prompts import prompt_lengths

# decoders whose forward takes (input_ids, position_ids, a 4D mask, past_key_values) as llama's does
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class SharedPrefixPlan:
    rows: torch.Tensor  # [R] the micro-batch rows it computes: those with a response token (the rest need nothing)
    prefix_len_R: torch.Tensor  # [R] tokens before the row's first response token
    length_R: torch.Tensor  # [R] real tokens of the row
    prefix_of_R: torch.Tensor  # [R] index of the row's prompt among the distinct ones
    prefixes: list[list[int]]  # the distinct prompts' token ids
    saved_tokens: int  # tokens the plain forward would compute and this one does not


def supports_shared_prefix(model: torch.nn.Module) -> bool:
    """Whether `model`'s decoder can run continuations on a cache of deduplicated prompts here: a llama-style
    decoder, full attention in every layer (a 4D mask carries no sliding window), SDPA or eager attention."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return False
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return False
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        return False
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager")


def plan_shared_prefix(input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, response_mask_BT: torch.Tensor,
                       min_saved_share: float) -> SharedPrefixPlan | None:
    """The deduplicated prompts of a right-padded micro-batch, or None when sharing would save less than
    `min_saved_share` of its real tokens (one prompt per row, short prompts, no response token at all)."""
    length_B = attention_mask_BT.sum(dim=1)
    prompt_len_B = prompt_lengths(response_mask_BT)
    rows = prompt_len_B.nonzero().squeeze(1)
    if len(rows) == 0:
        return None
    prefix_len_R = prompt_len_B[rows]
    index: dict[tuple[int, ...], int] = {}
    prefix_of = [index.setdefault(tuple(ids[:p]), len(index))
                 for ids, p in zip(input_ids_BT[rows].tolist(), prefix_len_R.tolist())]
    saved = int(length_B.sum()) - int(length_B[rows].sum() - prefix_len_R.sum()) - sum(len(k) for k in index)
    if saved <= 0 or saved < min_saved_share * int(length_B.sum()):
        return None
    return SharedPrefixPlan(rows=rows, prefix_len_R=prefix_len_R, length_R=length_B[rows],
                            prefix_of_R=torch.tensor(prefix_of), prefixes=[list(k) for k in index],
                            saved_tokens=saved)


def _continuation_mask(plan: SharedPrefixPlan, P: int, S: int, attn_implementation: str,
                       dtype: torch.dtype) -> torch.Tensor:
    """[R, 1, S, P + S] attention of each continuation token: its row's prompt (the first prefix_len of the
    P cached positions, the rest being other prompts' padding) and its own continuation up to itself."""
    R = len(plan.rows)
    prompt_RSP = (torch.arange(P) < plan.prefix_len_R[:, None]).unsqueeze(1).expand(-1, S, -1)
    causal_RSS = torch.ones(S, S, dtype=torch.bool).tril().expand(R, -1, -1)
    allowed = torch.cat([prompt_RSP, causal_RSS], dim=2).unsqueeze(1)
    if attn_implementation == "sdpa":
        return allowed  # True = attend
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def shared_prefix_hidden(decoder: torch.nn.Module, input_ids_BT: torch.Tensor,
                         plan: SharedPrefixPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_RSH, positions_RS) for the plan's rows: the final hidden state at each position that predicts a
    continuation token, and that position in the row (hidden_RSH[r, j] is the state at position
    prefix_len[r] - 1 + j, which predicts token prefix_len[r] + j); j runs over the longest continuation,
    shorter rows' tail being padding."""
    U, P = len(plan.prefixes), max(len(p) for p in plan.prefixes)
    S = int((plan.length_R - plan.prefix_len_R).max())
    prefix_ids_UP = torch.zeros(U, P, dtype=input_ids_BT.dtype)
    for u, ids in enumerate(plan.prefixes):
        prefix_ids_UP[u, : len(ids)] = torch.tensor(ids, dtype=input_ids_BT.dtype)
    # the distinct prompts, right-padded and causal: padding after a prompt changes nothing before it
    out = decoder(input_ids=prefix_ids_UP, use_cache=True)
    last_UH = out.last_hidden_state[torch.arange(U), torch.tensor([len(p) - 1 for p in plan.prefixes])]
    cache = out.past_key_values
    cache.batch_select_indices(plan.prefix_of_R)  # each row's prompt K/V (indexing: gradients add up per prompt)
    cols_RS = plan.prefix_len_R[:, None] + torch.arange(S)
    rows_ids_RT = input_ids_BT[plan.rows]
    cont_ids_RS = rows_ids_RT.gather(1, cols_RS.clamp(max=rows_ids_RT.shape[1] - 1))
    mask = _continuation_mask(plan, P, S, decoder.config._attn_implementation, out.last_hidden_state.dtype)
    cont_RSH = decoder(input_ids=cont_ids_RS, position_ids=cols_RS, attention_mask=mask, past_key_values=cache,
                       use_cache=True).last_hidden_state
    hidden_RSH = torch.cat([last_UH[plan.prefix_of_R].unsqueeze(1), cont_RSH[:, :-1]], dim=1)
    return hidden_RSH, cols_RS - 1
