"""Policy-gradient algorithms behind one seam (`base.Algorithm`): the loop calls `get(name)` and never
names an algorithm. suite.py registers GRPO, DR_GRPO, DAPO, RLOO, REINFORCE_PP, REINFORCE_PPB, PPO, GSPO and
CISPO; advantages.py holds the estimators, losses.py the policy and value losses, batch.py the packing.
"""

from slime_rl.algorithms import suite  # noqa: F401 - registers the algorithms
from slime_rl.algorithms.base import Algorithm, Needs, get, implemented, needs, register
from slime_rl.algorithms.batch import build_train_batch, overlong_penalty, token_loss_weights
from slime_rl.algorithms.config import AlgorithmConfig, CriticConfig
from slime_rl.algorithms.grpo import grpo_advantages
from slime_rl.algorithms.losses import (
    K3_MAX,
    LOG_RATIO_CLAMP,
    PolicyLoss,
    ValueLoss,
    kl_penalty,
    make_policy_loss,
    policy_loss,
)

__all__ = [
    "K3_MAX",
    "LOG_RATIO_CLAMP",
    "Algorithm",
    "AlgorithmConfig",
    "CriticConfig",
    "Needs",
    "PolicyLoss",
    "ValueLoss",
    "build_train_batch",
    "get",
    "grpo_advantages",
    "implemented",
    "kl_penalty",
    "make_policy_loss",
    "needs",
    "overlong_penalty",
    "policy_loss",
    "register",
    "token_loss_weights",
]
