"""Supervised fine-tuning: (prompt, response) pairs, loss on response tokens only."""

from __future__ import annotations

import random
from typing import Callable, Sequence

import torch

from slime_rl.algorithms import build_train_batch
from slime_rl.types import Sample, TrainBatch


def sft_loss(logprobs_BT: torch.Tensor, entropy_BT: torch.Tensor, batch: TrainBatch):
    """Token-mean negative log-likelihood of the response tokens."""
    nll = -(logprobs_BT * batch.loss_weights_BT).sum()
    return nll, {"nll": nll.detach()}


def sft_samples(records: Sequence, tokenizer) -> list[Sample]:
    """Prompt ids + tokenized response + EOS, as samples with a full loss mask. A conversation (a message
    list) becomes the tokens a multi-turn episode would hold: each assistant message + EOS with loss, the other
    messages between them rendered as the episode's environment renders them (`ChatRenderer`), without."""
    samples, renderer = [], None
    for r in records:
        if r.response_text is None:
            raise ValueError(f"{r.source}: SFT needs a response (set data.response_key)")
        if isinstance(r.response_text, str):
            resp = tokenizer.encode(r.response_text) + [tokenizer.eos_token_id]
            samples.append(Sample(prompt_ids=list(r.prompt_ids), response_ids=resp, loss_mask=[1] * len(resp)))
            continue
        if renderer is None:
            from slime_rl.tasks.chat import ChatRenderer

            renderer = ChatRenderer(tokenizer)
        ids, mask = conversation_tokens(r.response_text, tokenizer, renderer)
        samples.append(Sample(prompt_ids=list(r.prompt_ids), response_ids=ids, loss_mask=mask))
    return samples


def conversation_tokens(messages: list[dict[str, str]], tokenizer, renderer) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of the messages after a prompt that ends with the generation prompt (the first message
    is the assistant's; messages after the last assistant message are left out: they teach nothing)."""
    ids, mask, pending = [], [], []
    for m in messages:
        if m["role"] != "assistant":
            pending.append(m)
            continue
        if pending:
            env = renderer.ids(pending)
            ids, mask, pending = ids + env, mask + [0] * len(env), []
        turn = tokenizer.encode(m["content"]) + [tokenizer.eos_token_id]
        ids, mask = ids + turn, mask + [1] * len(turn)
    return ids, mask


def run_sft(trainer, records: Sequence, tokenizer, epochs: int, batch_size: int, seed: int = 0,
            on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Shuffled mini-batches for `epochs`; returns per-step metrics."""
    samples = sft_samples(records, tokenizer)
    rng = random.Random(seed)
    history = []
    step = 0
    for epoch in range(epochs):
        order = list(range(len(samples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = [samples[i] for i in order[start:start + batch_size]]
            batch = build_train_batch(chunk, [0.0] * len(chunk), tokenizer.pad_token_id, loss_agg="token")
            stats = trainer.train_step(batch, sft_loss)
            stats["epoch"] = epoch
            history.append(stats)
            if on_step:
                on_step(step, stats)
            step += 1
    return history
