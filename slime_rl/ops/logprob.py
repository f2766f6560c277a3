"""Per-token logprob and entropy from logits (the torch reference).

The fused linear+logprob+entropy kernel (csrc/, a later issue) replaces this
behind the same signature. Logits are divided by the sampling temperature, as
the engine does, so engine and trainer logprobs describe the same distribution.
"""

from __future__ import annotations

import torch


def logprobs_from_logits(
    logits_BTV: torch.Tensor, targets_BT: torch.Tensor, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) and the entropy at every position, in fp32.

    Returns (logprobs_BT, entropy_BT or None).
    """
    logits_BTV = logits_BTV.float()
    if temperature not in (0.0, 1.0):
        logits_BTV = logits_BTV / temperature
    logp_BTV = torch.log_softmax(logits_BTV, dim=-1)
    logprobs_BT = logp_BTV.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)
    entropy_BT = None
    if with_entropy:
        entropy_BT = -(logp_BTV.exp() * logp_BTV).sum(-1)
    return logprobs_BT, entropy_BT
