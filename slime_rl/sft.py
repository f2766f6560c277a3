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
    """Prompt ids + tokenized response + EOS, as samples with a full loss mask."""
    samples = []
    for r in records:
        if r.response_text is None:
            raise ValueError(f"{r.source}: SFT needs a response (set data.response_key)")
        resp = tokenizer.encode(r.response_text) + [tokenizer.eos_token_id]
        samples.append(Sample(prompt_ids=list(r.prompt_ids), response_ids=resp, loss_mask=[1] * len(resp)))
    return samples


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
