"""Policy-gradient algorithms behind one seam (`base.Algorithm`): the loop calls `get(name)` and never
names an algorithm. Implemented: GRPO (grpo.py); the other names the config accepts raise
NotImplementedError from `get` until their issue lands.
"""

from slime_rl.algorithms.base import Algorithm, Needs, get, implemented, register
from slime_rl.algorithms.batch import build_train_batch, token_loss_weights
from slime_rl.algorithms.grpo import (
    grpo_advantages,
    kl_penalty,
    make_policy_loss,
    policy_loss,
)


def check_implemented(name: str) -> None:
    """Raise NotImplementedError for algorithms whose issue has not landed."""
    get(name)


__all__ = [
    "Algorithm",
    "Needs",
    "build_train_batch",
    "check_implemented",
    "get",
    "grpo_advantages",
    "implemented",
    "kl_penalty",
    "make_policy_loss",
    "policy_loss",
    "register",
    "token_loss_weights",
]
