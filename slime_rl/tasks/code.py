"""`--task code`: a synthetic coding task, short Python functions from specs in words, scored in the sandbox.

Each problem is one of a dozen families of one-line functions with random parameters, phrased as text, e.g.

    prompt:   "Write f(x): x times 7 plus 3.\\n"
    response: "def f(x): return x*7+3"                       (the reference, in sft.jsonl only)
    label:    {"asserts": ["assert f(4) == 31", "assert f(-2) == -11", "assert f(0) == 3"]}

and two stdin/stdout families ("Write a program: read n, print n plus 4.") whose labels hold `tests` instead,
so both kinds of test case of the `code` reward (`slime_rl.rewards.code`) run end to end. Written under
<output_dir>/data like the arithmetic task: `sft.jsonl` (prompt, response, label), `train.jsonl` and `val.jsonl`
(prompt, label), prompts distinct across and within splits; or the user's files when data.train_path is set.

Validation: `reward_metrics` plus `accuracy` (every test passed), `pass_rate` (the mean fraction of tests
passed), `compile_error_rate`, `timeout_rate` and `crash_rate`. The preset sizes a tiny character-level model
for it (prompts up to ~55 characters, responses up to ~30) and a CPU-sized run: measured on 2 busy CPUs, the
warm-up (2000 references x 10 epochs, 6 min) gives 86.5% validation accuracy sampled at temperature 1 and 100%
greedy; 20 GRPO steps at the default learning rate after it left 83.0% (no gain measured yet).
"""

from __future__ import annotations

import math
import random
import string
from pathlib import Path
from typing import Any, Callable

from slime_rl.data import write_jsonl
from slime_rl.protocols import RewardFn
from slime_rl.tasks.base import register_task, reward_metrics, user_files
from slime_rl.types import Sample

# name -> (argument kind, spec in words, body, reference implementation); {a} is the family's parameter
_FUNCTION_FAMILIES: dict[str, tuple[str, str, str, Callable[[Any, int, int], Any]]] = {
    "affine": ("int", "x times {a} plus {b}", "x*{a}+{b}", lambda x, a, b: x * a + b),
    "square": ("int", "x squared plus {a}", "x*x+{a}", lambda x, a, b: x * x + a),
    "mod": ("int", "x modulo {a}", "x%{a}", lambda x, a, b: x % a),
    "max": ("int", "the larger of x and {a}", "max(x,{a})", lambda x, a, b: max(x, a)),
    "min": ("int", "the smaller of x and {a}", "min(x,{a})", lambda x, a, b: min(x, a)),
    "minus": ("int", "{a} minus x", "{a}-x", lambda x, a, b: a - x),
    "floordiv": ("int", "x floor-divided by {a}", "x//{a}", lambda x, a, b: x // a),
    "distance": ("int", "the distance from x to {a}", "abs(x-{a})", lambda x, a, b: abs(x - a)),
    "divisible": ("int", "True if x is divisible by {a}", "x%{a}==0", lambda x, a, b: x % a == 0),
    "repeat": ("str", "s repeated {a} times", "s*{a}", lambda s, a, b: s * a),
    "prefix": ("str", "the first {a} letters of s", "s[:{a}]", lambda s, a, b: s[:a]),
    "sum": ("list", "the sum of xs times {a}", "sum(xs)*{a}", lambda xs, a, b: sum(xs) * a),
}
_ARG = {"int": "x", "str": "s", "list": "xs"}
_PARAM_RANGE = {"repeat": (2, 4), "prefix": (1, 6)}  # small values keep strings short; others: 2..99
_STDIN_FAMILIES = ("stdin_add", "stdin_repeat")
FAMILIES = (*_FUNCTION_FAMILIES, *_STDIN_FAMILIES)
_NUM_TESTS = 3
_MAX_MISSES = 5000  # draws in a row finding no new prompt: the families are exhausted (~10,900 prompts)


def _arg(rng: random.Random, kind: str) -> Any:
    if kind == "int":
        return rng.randint(-20, 50)
    if kind == "str":
        return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 6)))
    return [rng.randint(-9, 9) for _ in range(rng.randint(0, 4))]


def make_problem(rng: random.Random, family: str | None = None) -> dict[str, Any]:
    """One problem of `family` (one of FAMILIES; None: drawn at random): {"prompt", "response" (a reference
    solution), "label" (its tests)}."""
    family = family or rng.choice(FAMILIES)
    lo, hi = _PARAM_RANGE.get(family, (2, 99))
    a, b = rng.randint(lo, hi), rng.randint(0, 99)
    if family == "stdin_add":
        ns = [rng.randint(-99, 999) for _ in range(_NUM_TESTS)]
        return {"prompt": f"Write a program: read n, print n plus {a}.\n", "response": f"print(int(input())+{a})",
                "label": {"tests": [{"input": f"{n}\n", "output": f"{n + a}\n"} for n in ns]}}
    if family == "stdin_repeat":
        a = rng.randint(2, 4)
        words = [_arg(rng, "str") for _ in range(_NUM_TESTS)]
        return {"prompt": f"Write a program: read a line, print it {a} times joined.\n",
                "response": f"print(input()*{a})",
                "label": {"tests": [{"input": f"{w}\n", "output": f"{w * a}\n"} for w in words]}}
    kind, spec, body, reference = _FUNCTION_FAMILIES[family]
    name = _ARG[kind]
    args = [_arg(rng, kind) for _ in range(_NUM_TESTS)]
    if family == "divisible":  # one multiple of a at least, so "return False" does not pass
        args[0] = a * rng.randint(-1, 1)
    return {"prompt": f"Write f({name}): {spec.format(a=a, b=b)}.\n",
            "response": f"def f({name}): return {body.format(a=a, b=b)}",
            "label": {"asserts": [f"assert f({x!r}) == {reference(x, a, b)!r}" for x in args]}}


def make_code_task(out_dir: str | Path, num_train: int, num_val: int, num_sft: int, seed: int) -> dict[str, Path]:
    """Write the three splits; prompts never repeat across (or within) them."""
    rng = random.Random(seed)
    total = num_train + num_val + num_sft
    seen: set[str] = set()
    problems: list[dict[str, Any]] = []
    misses = 0
    while len(problems) < total and misses < _MAX_MISSES:
        problem = make_problem(rng)
        misses = misses + 1 if problem["prompt"] in seen else 0
        if not misses:
            seen.add(problem["prompt"])
            problems.append(problem)
    if len(problems) < total:
        raise ValueError(f"the code task found only {len(problems)} distinct problems for the {total} asked "
                         "(data.num_train + data.num_val + data.num_sft); ask for fewer")
    sft, val, train = problems[:num_sft], problems[num_sft:num_sft + num_val], problems[num_sft + num_val:]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"sft": out / "sft.jsonl", "val": out / "val.jsonl", "train": out / "train.jsonl"}
    write_jsonl(paths["sft"], sft)
    write_jsonl(paths["val"], [{"prompt": p["prompt"], "label": p["label"]} for p in val])
    write_jsonl(paths["train"], [{"prompt": p["prompt"], "label": p["label"]} for p in train])
    return paths


@register_task("code")
class CodeTask:
    """Generated under <output_dir>/data (data.num_* and data.task_seed size it), or the user's files when
    data.train_path is set (rows with a prompt and a `code` label); scored by the sandboxed `code` reward."""

    name = "code"

    def data(self, cfg: Any, out_dir: Path) -> dict[str, str | None]:
        d = cfg.data
        if (files := user_files(cfg)) is not None:
            return files
        paths = make_code_task(out_dir / "data", d.num_train, d.num_val, d.num_sft, d.task_seed)
        print(f"[data] synthetic code task: {d.num_sft} SFT / {d.num_train} RL / {d.num_val} val -> {out_dir / 'data'}")
        return {k: str(v) for k, v in paths.items()}

    def reward_fn(self, cfg: Any) -> RewardFn:
        from slime_rl.rewards import get_reward_fn

        return get_reward_fn("code", cfg.reward)

    def preset(self, cfg: Any) -> dict[str, Any]:
        """A tiny character-level model: prompts <= 64 characters, responses <= 48, both in 128 positions; a
        warm-up that reaches ~87% sampled (100% greedy) validation accuracy in ~6 CPU minutes; RL steps of 64
        samples (~4 sandboxed runs each: ~9 s a step on 2 CPUs); a per-sample reward time-out covering 3 cases
        at the sandbox's wall limit."""
        return {"data.max_prompt_tokens": 64, "rollout.max_new_tokens": 48, "model.max_position_embeddings": 128,
                "data.num_sft": 2000, "data.num_train": 2000, "data.num_val": 100, "sft.epochs": 10,
                "train.num_steps": 50, "rollout.prompts_per_step": 16, "rollout.n_samples_per_prompt": 4,
                "eval.every_n_steps": 25, "eval.n_samples": 2, "reward.timeout_s": 30.0}

    def eval_metrics(self, samples: list[Sample], prefix: str) -> dict[str, float]:
        metrics = reward_metrics(samples, prefix)
        metrics[f"{prefix}/accuracy"] = metrics[f"{prefix}/answer_accuracy"]
        scored = [s.reward for s in samples if isinstance(s.reward, dict) and s.reward.get("total")]
        n = len(scored)
        metrics[f"{prefix}/pass_rate"] = sum(r["passed"] / r["total"] for r in scored) / n if n else math.nan
        for key, name in (("compile_error", "compile_error_rate"), ("timeouts", "timeout_rate"),
                          ("crashes", "crash_rate")):
            metrics[f"{prefix}/{name}"] = sum(r[key] > 0 for r in scored) / n if n else math.nan
        return metrics
