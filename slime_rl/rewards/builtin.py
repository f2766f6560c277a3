"""The built-in rewards that need settings: registered as factories of the `RewardConfig`.

Each module is imported when its reward is asked for, so a job that scores math never loads a sandbox
or an HTTP client.
"""

from __future__ import annotations

from typing import Any

from slime_rl.protocols import RewardFn
from slime_rl.rewards.registry import register_reward_factory


@register_reward_factory("code")
def _code(rc: Any) -> RewardFn:
    from slime_rl.rewards.code import CodeReward

    return CodeReward(rc.code)


@register_reward_factory("ranked_list")
def _ranked_list(rc: Any) -> RewardFn:
    from slime_rl.rewards.ranked_list import RankedListReward

    return RankedListReward(rc.ranked_list)


@register_reward_factory("remote_rm")
def _remote_rm(rc: Any) -> RewardFn:
    from slime_rl.rewards.remote import RemoteRewardModel

    return RemoteRewardModel(rc.remote)


@register_reward_factory("judge")
def _judge(rc: Any) -> RewardFn:
    from slime_rl.rewards.judge import LLMJudge

    return LLMJudge(rc.judge)
