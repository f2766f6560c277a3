"""`code`: run the model's Python program against test cases in the sandbox (`slime_rl.sandbox`).

The program is the last ```python (or ```py / ```python3) fenced block of `sample.response_text`, else the last
untagged ``` block, else the whole text; a block left open at the end of the response (generation cut off) runs to
the end. The test cases are `sample.label`, a dict or its JSON string:

    {"tests": [{"input": "1 2\\n", "output": "3\\n"}, ...],   # stdin / stdout, as in competitive programming
     "asserts": ["assert f(1) == 2", ...]}                    # each appended to the program, run on its own

either key or both. A stdin case passes when the program exits 0 and its stdout equals `output` line by line,
trailing whitespace of each line and trailing blank lines ignored; an assert case passes when the program with
the assert appended exits 0 (it runs as __main__ on an empty stdin: a program reading stdin at the top level
fails its assert cases). The program is compiled once inside the sandbox first (never in this process): a
syntax error fails every case (`compile_error` 1). Cases run in parallel on the reward's `SandboxPool`, shared by
every thread that scores samples.

Reward: the fraction of cases passed (`scoring: fraction`) or 1 only when all pass (`scoring: all`), with
`passed`, `total`, `compile_error`, `timeouts` (wall or CPU limit), `crashes` (non-zero exit, memory, output
limit, a signal) and `answer_correct` (1 when all pass). A malformed label raises ValueError naming the problem,
which the runner turns into that sample's failure; so does a sandbox that failed to start.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from slime_rl.rewards.config import CodeRewardConfig
from slime_rl.sandbox import RunResult, RunStatus, SandboxPool
from slime_rl.types import Sample

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3")
_CRASHES = (RunStatus.RUNTIME_ERROR, RunStatus.MEMORY, RunStatus.OUTPUT_LIMIT, RunStatus.KILLED)


@dataclass(frozen=True)
class TestCase:
    """One run: the program to run (the solution, or the solution plus one assert), its stdin, and the stdout
    expected (None: exiting 0 is enough)."""

    program: str
    stdin: str
    expected: str | None

    __test__ = False  # not a pytest class

    def passed(self, result: RunResult) -> bool:
        if result.status is not RunStatus.OK:
            return False
        return self.expected is None or _lines(result.stdout) == _lines(self.expected)


def extract_program(text: str) -> str:
    """The last python-tagged fenced block, else the last untagged one, else the whole text."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    for wanted in (lambda tag: tag in _PYTHON_TAGS, lambda tag: tag == ""):
        chosen = [body for tag, body in blocks if wanted(tag)]
        if chosen:
            return chosen[-1]
    return text


def parse_cases(label: Any, program: str) -> list[TestCase]:
    """The label's test cases for `program`; ValueError naming what is wrong with the label."""
    if isinstance(label, str):
        try:
            label = json.loads(label)
        except json.JSONDecodeError as e:
            raise ValueError(f"code reward: the label is a string but not JSON ({e})") from None
    if not isinstance(label, dict):
        raise ValueError(f"code reward: the label must be a dict with 'tests' and/or 'asserts', got "
                         f"{type(label).__name__}")
    unknown = sorted(set(label) - {"tests", "asserts"})
    if unknown or not ({"tests", "asserts"} & set(label)):
        raise ValueError(f"code reward: the label needs 'tests' and/or 'asserts' and nothing else, got keys "
                         f"{sorted(label)}")
    cases = []
    tests = label.get("tests", [])
    if not isinstance(tests, list):
        raise ValueError(f"code reward: label 'tests' must be a list, got {type(tests).__name__}")
    for i, test in enumerate(tests):
        if not (isinstance(test, dict) and isinstance(test.get("input"), str) and isinstance(test.get("output"), str)):
            raise ValueError(f"code reward: label tests[{i}] must be {{'input': str, 'output': str}}, got {test!r:.80}")
        cases.append(TestCase(program, test["input"], test["output"]))
    asserts = label.get("asserts", [])
    if not isinstance(asserts, list):
        raise ValueError(f"code reward: label 'asserts' must be a list, got {type(asserts).__name__}")
    for i, statement in enumerate(asserts):
        if not isinstance(statement, str) or not statement.strip():
            raise ValueError(f"code reward: label asserts[{i}] must be a non-empty string, got {statement!r:.80}")
        cases.append(TestCase(f"{program}\n\n{statement}\n", "", None))
    if not cases:
        raise ValueError("code reward: the label holds no test case")
    return cases


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]


class CodeReward:
    """The `code` reward (see the module docstring). Builds its sandbox pool at once: a host that cannot run the
    sandbox fails when the job starts, naming `reward.code.sandbox.allow_unsandboxed`."""

    __name__ = "code"

    def __init__(self, cfg: CodeRewardConfig):
        self.cfg = cfg
        self.pool = SandboxPool(cfg.sandbox)

    @property
    def min_timeout_s(self) -> float:
        """The runner gives a sample at least this long (`slime_rl.rewards.runner`): the compile check and one
        wave of cases, each at the wall limit. More cases than free slots need a longer `reward.timeout_s`."""
        return 2 * self.cfg.sandbox.wall_s

    def __call__(self, sample: Sample) -> dict[str, float]:
        program = extract_program(sample.response_text)
        cases = parse_cases(sample.label, program)
        check = self.pool.check(program)
        _raise_on_sandbox_error(check)
        if check.status is not RunStatus.OK:  # a syntax error (or a compile too big for the limits)
            return self._score(0, len(cases), compile_error=True, timeouts=0, crashes=0)
        results = self.pool.run_many([(case.program, case.stdin) for case in cases])
        for result in results:
            _raise_on_sandbox_error(result)
        passed = sum(case.passed(result) for case, result in zip(cases, results))
        return self._score(passed, len(cases), compile_error=False,
                           timeouts=sum(r.status is RunStatus.TIMEOUT for r in results),
                           crashes=sum(r.status in _CRASHES for r in results))

    def _score(self, passed: int, total: int, *, compile_error: bool, timeouts: int, crashes: int) -> dict[str, float]:
        all_passed = passed == total
        reward = float(all_passed) if self.cfg.scoring == "all" else passed / total
        return {"reward": reward, "passed": float(passed), "total": float(total),
                "compile_error": float(compile_error), "timeouts": float(timeouts), "crashes": float(crashes),
                "answer_correct": float(all_passed)}

    def close(self) -> None:
        self.pool.close()


def _raise_on_sandbox_error(result: RunResult) -> None:
    if result.status is RunStatus.SANDBOX_ERROR:
        raise RuntimeError(f"code reward: the sandbox did not start (exit {result.returncode}): "
                           f"{result.stderr.strip()[-300:]}")
