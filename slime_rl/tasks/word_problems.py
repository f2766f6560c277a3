"""`--task word_problems`: generated math word problems for a chat model, answers checked by math-verify.

One- and two-step problems about people and things ("Mia has 7 pencils. She buys 5 more. How many pencils
does Mia have now?"), each asking for the final answer in `\\boxed{}`. The prompts are plain questions
(the chat template is applied when the data is loaded, `data.apply_chat_template`), the label is the
integer answer, and the `math_lenient` reward scores the answer (the boxed one, else the response's last
number; math-verify equality) and reports format (a boxed answer) apart: a small chat model answers in
prose before it learns to box.

Writes `train.jsonl` and `val.jsonl` under `<output_dir>/data`, disjoint, deterministic per
`data.task_seed`; `data.task_max_operand` bounds the numbers. Made for SmolLM2-135M-Instruct on a
laptop (examples/smollm2_135m_math.yaml): it starts with some answers right, and has much to learn.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

from slime_rl.data import write_jsonl
from slime_rl.tasks.base import VerifiedAnswers, register_task, user_files

NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ella", "Ben", "Lily", "Noah", "Emma", "Jack", "Ruby", "Omar",
         "Nina", "Tom")
THINGS = ("apples", "pencils", "stickers", "books", "marbles", "cookies", "stamps", "shells", "cards", "balloons",
          "candies", "toy cars")
INSTRUCTION = "Give the final answer as a number in \\boxed{}."


def _pronoun(name: str) -> str:
    return "She" if name in ("Mia", "Ava", "Zoe", "Ella", "Lily", "Emma", "Ruby", "Nina") else "He"


def _buy(rng: random.Random, hi: int) -> tuple[str, int]:
    n, a, b, t = rng.choice(NAMES), rng.randint(2, hi), rng.randint(2, hi), rng.choice(THINGS)
    return f"{n} has {a} {t}. {_pronoun(n)} buys {b} more. How many {t} does {n} have now?", a + b


def _give(rng: random.Random, hi: int) -> tuple[str, int]:
    n, m, t = rng.choice(NAMES), rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(3, hi)
    b = rng.randint(1, a - 1)
    while m == n:
        m = rng.choice(NAMES)
    return f"{n} has {a} {t}. {_pronoun(n)} gives {b} {t} to {m}. How many {t} does {n} have left?", a - b


def _boxes(rng: random.Random, hi: int) -> tuple[str, int]:
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, min(hi, 12))
    return f"{n} has {a} boxes with {b} {t} in each box. How many {t} does {n} have in total?", a * b


def _two_step(rng: random.Random, hi: int) -> tuple[str, int]:
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(5, hi), rng.randint(2, hi)
    c = rng.randint(1, a + b - 1)
    return (f"{n} has {a} {t}. {_pronoun(n)} gets {b} more and then loses {c}. How many {t} does {n} have?",
            a + b - c)


KINDS: tuple[Callable[[random.Random, int], tuple[str, int]], ...] = (_buy, _give, _boxes, _two_step)


def make_word_problems(out_dir: str | Path, num_train: int, num_val: int, seed: int,
                       max_operand: int = 20) -> dict[str, Path]:
    """Generate train.jsonl and val.jsonl (prompt, label); no question appears twice."""
    if max_operand < 5:
        raise ValueError(f"data.task_max_operand must be >= 5 for word problems, got {max_operand}")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    tries = 0
    while len(rows) < num_train + num_val:
        tries += 1
        if tries > 50 * (num_train + num_val) + 1000:
            raise ValueError(f"cannot make {num_train + num_val} distinct word problems with numbers up to "
                             f"{max_operand}: lower data.num_train / data.num_val or raise data.task_max_operand")
        question, answer = rng.choice(KINDS)(rng, max_operand)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"prompt": f"{question} {INSTRUCTION}", "label": str(answer)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"val": out / "val.jsonl", "train": out / "train.jsonl"}
    write_jsonl(paths["val"], rows[:num_val])
    write_jsonl(paths["train"], rows[num_val:])
    return paths


@register_task("word_problems")
class WordProblemsTask(VerifiedAnswers):
    """Generated word problems for chat models (see the module docstring); the user's files when
    data.train_path is set."""

    name = "word_problems"
    reward = "math_lenient"

    def preset(self, cfg: Any) -> dict[str, Any]:
        """A chat model's prompts: rendered with its template; numbers up to 20; no SFT stage."""
        return {"data.apply_chat_template": True, "data.max_prompt_tokens": 160, "data.task_max_operand": 20,
                "sft.enabled": False}

    def data(self, cfg: Any, out_dir: Path) -> dict[str, str | None]:
        d = cfg.data
        if (files := user_files(cfg)) is not None:
            return files
        paths = make_word_problems(out_dir / "data", d.num_train, d.num_val, d.task_seed, d.task_max_operand)
        print(f"[data] word problems: {d.num_train} RL / {d.num_val} val -> {out_dir / 'data'}")
        return {"train": str(paths["train"]), "val": str(paths["val"]), "sft": None}
