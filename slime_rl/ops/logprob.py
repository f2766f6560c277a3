"""Per-token logprob and entropy from logits.

Logits are divided by the sampling temperature, as the engine does, so engine
and trainer logprobs describe the same distribution. Where a compiled kernel
for logits_logprob_forward exists (csrc/cpu/fused_logprob.cpp, csrc/cuda/), the
logits go through it via `vocab_parallel_logprobs` (one rank, no padding),
which keeps no [B, T, V] fp32 intermediates; otherwise the torch reference
below runs. A model that can hand over its final hidden states and output
weight should call `fused_linear_logprobs` instead and never form the logits.
"""

from __future__ import annotations

import torch

from slime_rl.ops import _backend
from slime_rl.ops.fused_logprob import LOGITS_FORWARD_OP
from slime_rl.ops.vocab_parallel import vocab_parallel_logprobs


def logprobs_from_logits(
    logits_BTV: torch.Tensor, targets_BT: torch.Tensor, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) and the entropy at every position, in fp32.

    Returns (logprobs_BT, entropy_BT or None). Differentiable w.r.t. logits_BTV.
    """
    impl = _backend.choose(LOGITS_FORWARD_OP, logits_BTV.detach())
    if impl != "reference":
        vocab = logits_BTV.shape[-1]
        logprobs_N, entropy_N = vocab_parallel_logprobs(
            logits_BTV.reshape(-1, vocab), targets_BT.reshape(-1), vocab_start=0, vocab_size=vocab,
            temperature=temperature, with_entropy=with_entropy, impl=impl)
        entropy_BT = None if entropy_N is None else entropy_N.float().view(targets_BT.shape)
        return logprobs_N.float().view(targets_BT.shape), entropy_BT
    return logprobs_from_logits_reference(logits_BTV, targets_BT, temperature, with_entropy)


def logprobs_from_logits_reference(
    logits_BTV: torch.Tensor, targets_BT: torch.Tensor, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch reference of `logprobs_from_logits` (autograd through log_softmax)."""
    logits_BTV = logits_BTV.float()
    if temperature not in (0.0, 1.0):
        logits_BTV = logits_BTV / temperature
    logp_BTV = torch.log_softmax(logits_BTV, dim=-1)
    logprobs_BT = logp_BTV.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)
    entropy_BT = None
    if with_entropy:
        entropy_BT = -(logp_BTV.exp() * logp_BTV).sum(-1)
    return logprobs_BT, entropy_BT
