"""Megatron packing with shared prompts: each sequence gets the logprobs it has alone (checked with a
transformers model driven by the packed ids, position ids and mask), the prompt is packed once."""

import pytest
import torch

from slime_rl.algorithms import build_train_batch
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.types import Sample
from training.hf.backend import build_hf_model
from training.megatron.packing import micro_batches, sequence_lengths

CFG = tiny_hf_config("llama", vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, max_position_embeddings=256)


def group_batch(seed=0, groups=3, n=4):
    """Groups of n samples sharing a prompt, one sample with observation tokens (loss mask 0) inside its
    response, one without any loss token, and one prompt used once."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for k in range(groups + 1):
        prompt = torch.randint(3, 40, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n if k < groups else 1):
            R = int(torch.randint(1, 9, (1,), generator=g))
            samples.append(Sample(prompt_ids=prompt, response_ids=torch.randint(3, 40, (R,), generator=g).tolist(),
                                  rollout_logprobs=[0.0] * R, loss_mask=[1] * R))
    long = max(samples, key=lambda s: len(s.response_ids))
    long.loss_mask[1:3] = [0, 0]
    if len(samples) > 1:
        samples[1].loss_mask = [0] * len(samples[1].response_ids)
    return build_train_batch(samples, [0.0] * len(samples), pad_id=0, loss_agg="token")


@torch.no_grad()
def packed_logprobs(model, mb):
    hidden = model.model(input_ids=mb.input_ids_bS, position_ids=mb.position_ids_bS,
                         attention_mask=~mb.attention_mask_b1SS).last_hidden_state
    b, S, _ = hidden.shape
    out = hidden.reshape(b * S, -1)
    targets = torch.roll(mb.input_ids_bS, -1, dims=1).reshape(-1)
    out, targets = torch.cat([out, out[mb.extra_pos]]), torch.cat([targets, mb.extra_targets])
    lp = torch.log_softmax(model.lm_head(out), -1).gather(-1, targets[:, None])[:, 0]
    return mb.unpack_flat(lp)


@pytest.mark.parametrize("max_tokens,max_seqs", [(4096, 64), (30, 3)])
def test_shared_prompt_packing_gives_each_sequence_its_own_logprobs(max_tokens, max_seqs):
    model = build_hf_model(CFG, init_tiny_model(CFG, seed=0))
    model.config._attn_implementation = "sdpa"
    batch = group_batch()
    lengths = sequence_lengths(batch)
    mbs = micro_batches(batch, 0, 1, max_tokens, max_seqs, pad_to_multiple=1, shared_prompt=True)
    assert sorted(int(i) for mb in mbs for i in mb.rows) == list(range(len(lengths)))
    assert sum(mb.num_tokens for mb in mbs) < sum(lengths)  # prompts packed once
    assert sum(len(mb.extra_pos) for mb in mbs) > 0  # later continuations predicted from the prompt's end
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=batch.input_ids_BT).logits, -1)
    for mb in mbs:
        got_nT = packed_logprobs(model, mb)
        for j, i in enumerate(mb.rows.tolist()):
            n = lengths[i]
            want = full[i, : n - 1].gather(-1, batch.input_ids_BT[i, 1:n, None])[:, 0]
            assert (got_nT[j, 1:n] - want).abs().max() < 1e-5, (i, got_nT[j, 1:n], want)
            assert got_nT[j, 0] == 0 and (got_nT[j, n:] == 0).all()


def test_without_shared_prompts_packing_is_unchanged():
    batch = group_batch()
    plain = micro_batches(batch, 0, 1, 4096, 64, pad_to_multiple=1)
    assert all(len(mb.extra_pos) == 0 for mb in plain)
    assert sum(mb.num_tokens for mb in plain) == sum(sequence_lengths(batch))
    distinct = group_batch(groups=0)  # one sample, its own prompt: nothing to share
    only = micro_batches(distinct, 0, 1, 4096, 64, pad_to_multiple=1, shared_prompt=True)
    assert all(len(mb.extra_pos) == 0 for mb in only)
