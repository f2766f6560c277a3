"""`--task customer_support`: the support agent trained inside the simulator, multi-turn with tools.

Data (generated under <output_dir>/data unless data.train_path is set): one row per scenario,

    {"prompt": [{"role": "user", "content": <the customer's opening>}], "label": <seed>}

`train.jsonl` (data.num_train scenarios), `val.jsonl` (data.num_val, held out: other seeds) and `sft.jsonl`
(data.num_sft logged dialogues: `response` is the list of messages after the prompt — assistant turns, tool
results, customer replies — so the warm-up learns from whole conversations). The logs come from a team of
scripted agents: the oracle, and for a `data.warmup_hedging` share of them an agent that hedges twice before
acting (`hedging_policy`), a habit the reward table punishes and RL can unlearn.

A tiny model (no `model.path`) uses the task's word-level tokenizer (`vocab.py`): one token per word and
per two digits, so the warm-up can teach it to copy an order id into a tool call.

The preset puts the tools and the call format in `data.system_prompt`, for every model: a warm-up checkpoint
trained on the dialogues under that prompt must see the same prompt in RL and in validation.

Each sample is an episode (`rollout.episodes.MultiTurn`) against `SupportEnv` seeded by the row's label,
through the tokenizer's chat template (`ChatEnvironment`); its reward is the sum of the reward table's rows.
Validation metrics: the simulator's per-episode breakdown (`episode_metrics`), `accuracy` = resolution rate.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from rollout.episodes import EpisodeLimits, MultiTurn, episode_reward
from slime_rl.data import write_jsonl
from slime_rl.tasks.base import register_task, reward_metrics, user_files
from slime_rl.tasks.chat import ChatEnvironment, ChatRenderer
from slime_rl.types import Sample

from .env import SupportEnv, episode_metrics
from .policies import Policy, hedging_policy, oracle_policy

SYSTEM_PROMPT = ("You are a support agent. Tools: lookup_order(order_id) start_self_service_refund(order_id,reason) "
                 "create_replacement(order_id) change_address(order_id,new_address) check_delivery(order_id) "
                 "transfer_to_human(reason). Call one as "
                 '<tool_call>{"name": ..., "arguments": {...}}</tool_call>')
_SPLIT_OFFSET = {"train": 0, "val": 10_000_000, "sft": 20_000_000}  # disjoint seed ranges per split


def prompt_messages(seed: int) -> list[dict[str, str]]:
    """The customer's opening; the system prompt (the tools) comes from `data.system_prompt`."""
    return [{"role": "user", "content": SupportEnv().reset(seed)}]


def oracle_dialogue(seed: int, max_turns: int, policy: Policy = oracle_policy) -> list[dict[str, str]]:
    """A scripted agent's conversation after the prompt (the oracle's by default), up to its last turn (the
    customer's last reply, which ends the episode, is not part of it)."""
    env = SupportEnv(max_turns=max_turns)
    history = [env.reset(seed)]
    view, done, messages = env.scenario.view(), False, []
    while not done:
        text = policy(history, view)
        messages.append({"role": "assistant", "content": text})
        observation, _, done, _ = env.step(text)
        history.append(observation)
        if not done:
            messages.append({"role": _role(env), "content": observation})
    return messages


def warmup_agent(seed: int, hedging: float) -> Policy:
    """Who wrote the logged dialogue of `seed`: the hedging agent for a `hedging` share of the seeds (drawn
    from the seed, so the same files come back), the oracle otherwise."""
    return hedging_policy if random.Random(seed * 7919 + 3).random() < hedging else oracle_policy


def _role(env: SupportEnv) -> str:
    return "tool" if env.transcript[-1][0] == "tool" else "user"


class SupportChat:
    """SupportEnv as a text environment in chat messages (`slime_rl.tasks.chat.TextEnvironment`)."""

    def __init__(self, max_turns: int):
        self.env = SupportEnv(max_turns=max_turns)

    def reset(self, sample: Sample) -> list[dict[str, str]]:
        label = sample.label
        text = str(label).strip() if isinstance(label, (int, str)) and not isinstance(label, bool) else ""
        if not (text.isdigit() and len(text) <= 18):
            raise ValueError(f"customer_support: the label must be a scenario seed (an integer in [0, 1e18)), "
                             f"got {label!r:.40}")
        self.env.reset(int(text))
        return []  # the prompt holds the customer's opening

    def step(self, text: str) -> tuple[list[dict[str, str]], float, bool, dict[str, Any]]:
        observation, reward, done, info = self.env.step(text)
        return [{"role": _role(self.env), "content": observation}], reward, done, info


@register_task("customer_support")
class CustomerSupportTask:
    name = "customer_support"

    def data(self, cfg: Any, out_dir: Path) -> dict[str, str | None]:
        d = cfg.data
        if (files := user_files(cfg)) is not None:
            return files
        out = out_dir / "data"
        base = d.task_seed * 100_000_000

        def seeds(split: str, n: int) -> range:
            start = base + _SPLIT_OFFSET[split]
            return range(start, start + n)

        paths = {"train": out / "train.jsonl", "val": out / "val.jsonl", "sft": out / "sft.jsonl"}
        write_jsonl(paths["train"], ({"prompt": prompt_messages(s), "label": s} for s in seeds("train", d.num_train)))
        write_jsonl(paths["val"], ({"prompt": prompt_messages(s), "label": s} for s in seeds("val", d.num_val)))
        turns, hedging = cfg.episode.max_turns, d.warmup_hedging
        write_jsonl(paths["sft"], ({"prompt": prompt_messages(s), "label": s,
                                    "response": oracle_dialogue(s, turns, warmup_agent(s, hedging))}
                                   for s in seeds("sft", d.num_sft)))
        team = f"{hedging:.0%} from the hedging agent" if hedging else "all from the oracle"
        print(f"[data] customer-support scenarios: {d.num_sft} logged dialogues (SFT, {team}) / {d.num_train} RL / "
              f"{d.num_val} val -> {out}")
        return {k: str(v) for k, v in paths.items()}

    def preset(self, cfg: Any) -> dict[str, Any]:
        """Defaults: the tools in the system prompt; contexts long enough for a conversation."""
        return {"data.system_prompt": SYSTEM_PROMPT, "model.max_position_embeddings": 1280, "data.max_prompt_tokens": 600,
                "rollout.max_new_tokens": 160, "episode.max_total_tokens": 1200, "episode.max_turns": 8,
                "data.num_sft": 8000, "sft.epochs": 3, "sft.batch_size": 16, "sft.lr": 3e-3,
                "data.num_train": 4000, "data.num_val": 64,
                "train.backend": "hf", "train.num_steps": 60, "rollout.prompts_per_step": 16,
                "rollout.n_samples_per_prompt": 4, "eval.every_n_steps": 20, "eval.n_samples": 2}

    def tokenizer(self, cfg: Any) -> Path:
        """A tiny model's tokenizer: word-level (`vocab`), built once under the output directory."""
        from .vocab import ensure_tokenizer

        return ensure_tokenizer(Path(cfg.log.output_dir) / "tokenizer")

    def reward_fn(self, cfg: Any):
        return episode_reward

    def episode(self, cfg: Any, tokenizer) -> MultiTurn:
        renderer = ChatRenderer(tokenizer)
        e = cfg.episode
        return MultiTurn(lambda sample: ChatEnvironment(SupportChat(e.max_turns), tokenizer, renderer),
                         EpisodeLimits(max_turns=e.max_turns, max_total_tokens=e.max_total_tokens))

    def eval_metrics(self, samples: list[Sample], prefix: str) -> dict[str, float]:
        metrics = reward_metrics(samples, prefix)
        infos = [_info(s) for s in samples]
        metrics.update({f"{prefix}/{k}": v for k, v in episode_metrics(infos).items()} if infos else {})
        metrics[f"{prefix}/accuracy"] = metrics.get(f"{prefix}/resolution_rate", math.nan)
        metrics[f"{prefix}/env_errors"] = float(sum(s.metadata.get("episode", {}).get("env_error", 0) for s in samples))
        return metrics


_BLANK = {"resolved": False, "refund_completed": False, "transferred": False, "asked_human": False,
          "complaint": False, "evasive_turns": 0, "turns": 0, "minutes": 0.0, "tool_calls": 0, "tool_valid": 0,
          "tool_correct": 0, "tool_missed": 1, "total_reward": 0.0}


def _info(s: Sample) -> dict[str, Any]:
    """The episode's final info; an episode that never reached the simulator (cut at its first turn, or a
    failed environment) counts as unresolved with its needed tool missed."""
    info = s.metadata.get("episode_info") or {}
    return {**_BLANK, **{k: info[k] for k in _BLANK if k in info}}
