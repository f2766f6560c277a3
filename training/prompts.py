"""What both trainer backends call a row's prompt when they compute shared prompts once."""

from __future__ import annotations

import torch


def prompt_lengths(response_mask_BT: torch.Tensor) -> torch.Tensor:
    """[B] tokens before each row's first response token (its prompt: >= 1, position 0 predicts nothing);
    0 for a row without any response token (nothing of it is shared)."""
    has_response_B = response_mask_BT[:, 1:].ne(0).any(dim=1)
    first_B = response_mask_BT[:, 1:].ne(0).int().argmax(dim=1) + 1
    return torch.where(has_response_B, first_B, torch.zeros_like(first_B))
