"""Synthetic arithmetic: "a+b=" / "a-b=" prompts with verifiable answers.

Writes three disjoint jsonl files: `sft.jsonl` (prompt, response, label: the
labelled warm-up subset), `train.jsonl` (prompt, label: what RL sees — the
verifier needs only the answer) and `val.jsonl`. The response format is
`\\boxed{N}`, so the math reward measures format and answer accuracy apart.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from slime_rl.data import write_jsonl
from slime_rl.tasks.base import VerifiedAnswers, register_task, user_files


def _problem(rng: random.Random, max_operand: int) -> tuple[str, int]:
    """Operands zero-padded to a fixed width, so every digit sits at a fixed offset."""
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    w = len(str(max_operand))
    if rng.random() < 0.5:
        return f"{a:0{w}d}+{b:0{w}d}=", a + b
    a, b = max(a, b), min(a, b)  # keep answers non-negative
    return f"{a:0{w}d}-{b:0{w}d}=", a - b


def make_arithmetic_task(out_dir: str | Path, num_train: int, num_val: int, num_sft: int, seed: int,
                         max_operand: int = 99) -> dict[str, Path]:
    """Generate the task files; problems never repeat across (or within) splits."""
    rng = random.Random(seed)
    m = max_operand + 1
    capacity = m * m + m * (m + 1) // 2  # distinct a+b (ordered) and a-b (a >= b) problems
    total = num_train + num_val + num_sft
    if total > capacity:
        raise ValueError(f"{total} distinct problems requested but operands up to {max_operand} allow {capacity}")
    seen: set[str] = set()
    problems: list[tuple[str, int]] = []
    while len(problems) < total:
        prompt, answer = _problem(rng, max_operand)
        if prompt not in seen:
            seen.add(prompt)
            problems.append((prompt, answer))
    sft, val, train = problems[:num_sft], problems[num_sft:num_sft + num_val], problems[num_sft + num_val:]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"sft": out / "sft.jsonl", "val": out / "val.jsonl", "train": out / "train.jsonl"}
    aw = len(str(2 * max_operand))  # answers zero-padded too (the verifier compares values: 085 == 85)
    write_jsonl(paths["sft"], [{"prompt": p, "response": f"\\boxed{{{a:0{aw}d}}}", "label": str(a)} for p, a in sft])
    write_jsonl(paths["val"], [{"prompt": p, "label": str(a)} for p, a in val])
    write_jsonl(paths["train"], [{"prompt": p, "label": str(a)} for p, a in train])
    return paths


@register_task("arithmetic")
class ArithmeticTask(VerifiedAnswers):
    """The default job's task: generated under <output_dir>/data (data.num_* and data.task_* size it), or the
    user's files when data.train_path is set; scored by the math verifier."""

    name = "arithmetic"

    def data(self, cfg: Any, out_dir: Path) -> dict[str, str | None]:
        d = cfg.data
        if (files := user_files(cfg)) is not None:
            return files
        paths = make_arithmetic_task(out_dir / "data", d.num_train, d.num_val, d.num_sft, d.task_seed,
                                     max_operand=d.task_max_operand)
        print(f"[data] synthetic arithmetic task: {d.num_sft} SFT / {d.num_train} RL / {d.num_val} val -> "
              f"{out_dir / 'data'}")
        return {k: str(v) for k, v in paths.items()}
