"""`--task math`: math word problems from the user's files (`data.train_path`, `val_path`, `sft_path`),
scored by the math verifier (`\\boxed{}` / `<answer>` answers, math-verify equality)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slime_rl.tasks.base import VerifiedAnswers, register_task


@register_task("math")
class MathTask(VerifiedAnswers):
    name = "math"

    def data(self, cfg: Any, out_dir: Path) -> dict[str, str | None]:
        d = cfg.data
        if d.train_path is None:
            raise ValueError("task math needs data.train_path (jsonl/parquet rows with a prompt and a label); "
                             "the synthetic arithmetic task is --task arithmetic")
        return {"train": d.train_path, "val": d.val_path, "sft": d.sft_path}
