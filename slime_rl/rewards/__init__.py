"""Reward functions: a registry, built-in rewards, and a fault-tolerant runner.

    from slime_rl.rewards import get_reward_fn, score_samples
    stats = score_samples(samples, get_reward_fn("math"), timeout_s=10.0)
"""

from slime_rl.rewards.math import extract_answer, math_reward  # registers "math"
from slime_rl.rewards.registry import get_reward_fn, register_reward, registered_rewards
from slime_rl.rewards.runner import RewardStats, score_samples

__all__ = [
    "RewardStats",
    "extract_answer",
    "get_reward_fn",
    "math_reward",
    "register_reward",
    "registered_rewards",
    "score_samples",
]
