"""Workloads behind one seam (`base.Task`): prompts, reward and validation metrics. Built in: `arithmetic`
(synthetic, generated; the default job) and `math` (the user's files)."""

from slime_rl.tasks.base import Task, VerifiedAnswers, get_task, register_task, registered_tasks, reward_metrics

__all__ = ["Task", "VerifiedAnswers", "get_task", "register_task", "registered_tasks", "reward_metrics"]
