"""Policy-gradient algorithms: advantages, losses and batch preparation.

`get_algorithm(name)` returns the module-level pieces the loop needs; GRPO is
implemented here, the other names are accepted by the config and fail with a
clear "not yet implemented" until their issue lands.
"""

from slime_rl.algorithms.batch import build_train_batch, token_loss_weights
from slime_rl.algorithms.grpo import (
    grpo_advantages,
    kl_penalty,
    make_policy_loss,
    policy_loss,
)

IMPLEMENTED = ("GRPO",)


def check_implemented(name: str) -> None:
    """Raise NotImplementedError for algorithms whose issue has not landed."""
    if name not in IMPLEMENTED:
        raise NotImplementedError(
            f"algorithm {name!r} is not yet implemented; implemented: {', '.join(IMPLEMENTED)}"
        )


__all__ = [
    "IMPLEMENTED",
    "build_train_batch",
    "check_implemented",
    "grpo_advantages",
    "kl_penalty",
    "make_policy_loss",
    "policy_loss",
    "token_loss_weights",
]
