"""Workloads behind one seam (`base.Task`): prompts, reward, validation metrics and episode. Built in:
`arithmetic` (synthetic, generated; the default job), `math` (the user's files) and `customer_support`
(multi-turn with tools, in the simulator)."""

from slime_rl.tasks.base import (Task, VerifiedAnswers, get_task, register_task, registered_tasks, reward_metrics,
                                 task_episode, task_tokenizer)

__all__ = ["Task", "VerifiedAnswers", "get_task", "register_task", "registered_tasks", "reward_metrics",
           "task_episode", "task_tokenizer"]
