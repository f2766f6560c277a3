"""Synthetic ranked-list task (ReFT's causal-gene example in miniature): symptoms in, a ranked gene list out.

A hidden rule ties symptoms to genes: a weight table `weight[symptom][gene]` (integers, drawn from
`data.task_seed`) scores every gene by the summed weights of the case's symptoms; the right gene is the one
with the highest score (cases with a tie at the top are never drawn) and the right ranking orders the genes
by score (ties below the top broken by gene index). The model never sees the table: it has to infer it
from examples, a few labelled ones (SFT) and many answer-only ones (RL, scored by `ranked_list`).

Each row is shaped like a ReFT gene row, plus what the data loader reads:

    {"case_report": "sx: fever,rash,ataxia,edema.", "instruction": "rank genes:",
     "answer": ["G3"], "ranking": ["G3", "G7", "G1"],
     "prompt": "sx: fever,rash,ataxia,edema. rank genes:", "label": ["G3"]}

`answer` (= `label`) holds the acceptable answers: the right gene, so the grader's top-1 is "the right gene
first"; `ranking` is the full right order, and the SFT rows' `response` is its first `RuleSpec.list_len`
genes as text ("G3,G7,G1"). The three files (`sft.jsonl`, `train.jsonl`, `val.jsonl` under <out>/data) hold
disjoint symptom sets; the symptom order in a prompt is shuffled.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slime_rl.data import write_jsonl
from slime_rl.tasks.base import register_task, reward_metrics, user_files
from slime_rl.types import Sample

SYMPTOMS = ("fever", "rash", "cough", "ataxia", "seizure", "ptosis", "anemia", "edema", "tremor", "apnea",
            "myalgia", "vertigo", "pallor", "chorea", "uveitis", "ascites", "goiter", "hypoxia", "stridor", "ileus")
INSTRUCTION = "rank genes:"


@dataclass(frozen=True)
class RuleSpec:
    """The hidden rule's shape: how many genes and symptoms, symptoms per case, weight range, list length."""

    num_genes: int = 10
    num_symptoms: int = 20  # the first ones of SYMPTOMS
    symptoms_per_case: int = 4
    max_weight: int = 9  # weights are integers in [0, max_weight]
    list_len: int = 3  # genes in an SFT response

    def __post_init__(self) -> None:
        checks = [("num_genes", 2 <= self.num_genes <= 100, "in [2, 100]"),
                  ("num_symptoms", 1 <= self.num_symptoms <= len(SYMPTOMS), f"in [1, {len(SYMPTOMS)}]"),
                  ("symptoms_per_case", 1 <= self.symptoms_per_case <= self.num_symptoms, "in [1, num_symptoms]"),
                  ("max_weight", self.max_weight >= 1, ">= 1"),
                  ("list_len", 1 <= self.list_len <= self.num_genes, "in [1, num_genes]")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"RuleSpec.{name} must be {rule}, got {getattr(self, name)!r}")

    @property
    def genes(self) -> list[str]:
        return [f"G{i}" for i in range(self.num_genes)]


def hidden_table(seed: int, spec: RuleSpec) -> dict[str, list[int]]:
    """The hidden rule: symptom -> one integer weight per gene; the same for every split of a seed."""
    rng = random.Random(f"ranked_list-table-{seed}")
    return {s: [rng.randint(0, spec.max_weight) for _ in range(spec.num_genes)]
            for s in SYMPTOMS[:spec.num_symptoms]}


def gene_scores(symptoms: list[str] | tuple[str, ...], table: dict[str, list[int]]) -> list[int]:
    """Each gene's score for a case: the summed weights of its symptoms."""
    return [sum(col) for col in zip(*(table[s] for s in symptoms))]


def rank_genes(symptoms: list[str] | tuple[str, ...], table: dict[str, list[int]], spec: RuleSpec) -> list[str]:
    """Every gene, best first: by score, ties broken by gene index."""
    scores = gene_scores(symptoms, table)
    order = sorted(range(spec.num_genes), key=lambda g: (-scores[g], g))
    return [spec.genes[g] for g in order]


def has_unique_top(symptoms: tuple[str, ...], table: dict[str, list[int]]) -> bool:
    top, second = sorted(gene_scores(symptoms, table), reverse=True)[:2]
    return top > second


def make_row(symptoms: list[str], table: dict[str, list[int]], spec: RuleSpec) -> dict[str, Any]:
    """One ReFT-shaped row (case report, instruction, answer) plus the loader's prompt and label."""
    ranking = rank_genes(symptoms, table, spec)
    case_report = f"sx: {','.join(symptoms)}."
    return {"case_report": case_report, "instruction": INSTRUCTION, "answer": ranking[:1], "ranking": ranking,
            "prompt": f"{case_report} {INSTRUCTION}", "label": ranking[:1]}


def make_ranked_list_task(out_dir: str | Path, num_train: int, num_val: int, num_sft: int, seed: int,
                          spec: RuleSpec = RuleSpec()) -> dict[str, Path]:
    """Write sft / train / val jsonl under `out_dir`: disjoint symptom sets, the same hidden rule."""
    table = hidden_table(seed, spec)
    cases = [c for c in itertools.combinations(SYMPTOMS[:spec.num_symptoms], spec.symptoms_per_case)
             if has_unique_top(c, table)]
    total = num_train + num_val + num_sft
    if total > len(cases):
        raise ValueError(f"data.num_train + data.num_val + data.num_sft = {total} cases requested but the hidden "
                         f"rule has {len(cases)} distinct ones (sets of {spec.symptoms_per_case} of "
                         f"{spec.num_symptoms} symptoms with a unique best gene)")
    rng = random.Random(f"ranked_list-cases-{seed}")
    rng.shuffle(cases)
    rows = []
    for case in cases[:total]:
        symptoms = list(case)
        rng.shuffle(symptoms)
        rows.append(make_row(symptoms, table, spec))
    sft, val, train = rows[:num_sft], rows[num_sft:num_sft + num_val], rows[num_sft + num_val:]
    for row in sft:
        row["response"] = ",".join(row["ranking"][:spec.list_len])
    out = Path(out_dir)
    paths = {"sft": out / "sft.jsonl", "val": out / "val.jsonl", "train": out / "train.jsonl"}
    for split, split_rows in (("sft", sft), ("val", val), ("train", train)):
        write_jsonl(paths[split], split_rows)
    return paths


def ranked_list_metrics(samples: list[Sample], prefix: str) -> dict[str, float]:
    """`reward_metrics` plus the top-1 / top-5 / top-max rates and the mean list length; accuracy = top-1.
    A sample whose reward failed counts as a miss."""
    metrics = reward_metrics(samples, prefix)
    n = max(1, len(samples))
    for key in ("top1", "top5", "topmax", "num_items"):
        metrics[f"{prefix}/{key}"] = sum(float(s.reward.get(key, 0.0)) for s in samples
                                         if isinstance(s.reward, dict)) / n
    ranks = [s.reward["rank"] for s in samples if isinstance(s.reward, dict) and s.reward.get("rank", 0) > 0]
    metrics[f"{prefix}/mean_rank_found"] = sum(ranks) / len(ranks) if ranks else math.nan
    metrics[f"{prefix}/accuracy"] = metrics[f"{prefix}/top1"]
    return metrics


@register_task("ranked_list")
class RankedListTask:
    """Symptoms -> ranked genes under a hidden rule; generated under <output_dir>/data (data.num_* and
    data.task_seed size and seed it), or the user's ReFT-shaped files when data.train_path is set; scored by
    the `ranked_list` reward (reward.ranked_list.*)."""

    name = "ranked_list"
    spec = RuleSpec()

    def data(self, cfg: Any, out_dir: Path) -> dict[str, str | None]:
        d = cfg.data
        if (files := user_files(cfg)) is not None:
            return files
        paths = make_ranked_list_task(out_dir / "data", d.num_train, d.num_val, d.num_sft, d.task_seed, self.spec)
        print(f"[data] synthetic ranked-list task: {d.num_sft} SFT / {d.num_train} RL / {d.num_val} val -> "
              f"{out_dir / 'data'}")
        return {k: str(v) for k, v in paths.items()}

    def reward_fn(self, cfg: Any):
        from slime_rl.rewards import get_reward_fn

        return get_reward_fn("ranked_list", cfg.reward)

    def eval_metrics(self, samples: list[Sample], prefix: str) -> dict[str, float]:
        return ranked_list_metrics(samples, prefix)

    def preset(self, cfg: Any) -> dict[str, Any]:
        """Defaults for the tiny character-level model on CPU: short lists, a small SFT warm-up (200 labelled
        cases: ~30% top-1, so RL has room), 2,500 answer-only RL cases, 200 RL steps on the single-process
        trainer (~6 minutes on two CPU cores)."""
        return {"data.num_sft": 200, "data.num_train": 2500, "data.num_val": 200, "rollout.max_new_tokens": 16,
                "train.backend": "hf", "train.num_steps": 200, "eval.every_n_steps": 50}
