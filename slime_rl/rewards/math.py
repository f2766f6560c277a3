"""Math answer reward: extract the final answer, compare it with the label.

The answer is the content of the last `<answer>...</answer>` block (and the
`\\boxed{...}` inside it, if any), else of the last balanced `\\boxed{...}` /
`\\fbox{...}` (nested braces allowed); `math_lenient` falls back to the last
number of the response when neither is there (a chat model that answers in
prose) and reports the tagged/boxed form as format accuracy. Equality is
decided by `math-verify` ("0.5" == "1/2" == "\\frac{1}{2}"), with a fast path: when the answer and the
label are both plain decimal numbers they are compared exactly with
`fractions.Fraction`, and two unequal integers are decided without sympy.
That keeps scoring thousands of synthetic-arithmetic samples cheap.

math-verify's own time-outs use SIGALRM, which only works on the main thread;
rewards run in worker threads, so they are disabled here (`parsing_timeout=None`,
`timeout_seconds=None`) and `slime_rl.rewards.runner` enforces the time-out.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from slime_rl.rewards.registry import register_reward
from slime_rl.types import Sample

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def extract_boxed(text: str) -> str | None:
    """Content of the last balanced `\\boxed{...}` (nested braces allowed), or None."""
    for match in reversed(list(_BOXED_RE.finditer(text))):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:pos]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a response: `<answer>` block (boxed inside wins), else last boxed."""
    tags = _ANSWER_TAG_RE.findall(text)
    if tags:
        content = tags[-1]
        boxed = extract_boxed(content)
        answer = boxed if boxed is not None else content
    else:
        answer = extract_boxed(text)
    if answer is None or not answer.strip():
        return None
    return answer.strip()


def _as_fraction(text: str) -> Fraction | None:
    text = text.strip().strip("$").strip()
    if _NUMBER_RE.fullmatch(text) is None:
        return None
    return Fraction(text)


def answers_equal(answer: str, label: Any) -> bool:
    """Whether `answer` equals the gold `label` (string or number) mathematically."""
    gold = label if isinstance(label, str) else str(label)
    a, b = _as_fraction(answer), _as_fraction(gold)
    if a is not None and b is not None:
        if a == b:
            return True
        if a.denominator == 1 and b.denominator == 1:
            return False
        # non-integer decimals: defer to math-verify's rounding tolerance
    return _math_verify_equal(answer, gold)


def _math_verify_equal(answer: str, gold: str) -> bool:
    from math_verify import parse, verify  # imports sympy (~1 s): only when needed

    _silence_timeout_warning()
    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    answer_parsed = parse(f"${answer}$", parsing_timeout=None)
    if not gold_parsed or not answer_parsed:
        return gold.strip() == answer.strip()
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


def _silence_timeout_warning() -> None:
    """math-verify warns once that its time-out is off; the runner provides one, so skip the noise."""
    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True


@register_reward("math")
def math_reward(sample: Sample) -> dict[str, float]:
    """1.0 for a correct final answer; also reports whether an answer could be extracted."""
    if sample.label is None:
        raise ValueError("math reward needs sample.label (the gold answer); got None")
    answer = extract_answer(sample.response_text)
    correct = answer is not None and answers_equal(answer, sample.label)
    return {
        "reward": float(correct),
        "format_correct": float(answer is not None),
        "answer_correct": float(correct),
    }


def extract_last_number(text: str) -> str | None:
    """The last number written in `text` (thousands separators dropped), or None."""
    numbers = _NUMBER_RE.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


@register_reward("math_lenient")
def math_lenient_reward(sample: Sample) -> dict[str, float]:
    """1.0 for a correct final answer: the tagged/boxed one, else the response's last number;
    format_correct = the answer was tagged or boxed."""
    if sample.label is None:
        raise ValueError("math_lenient reward needs sample.label (the gold answer); got None")
    tagged = extract_answer(sample.response_text)
    answer = tagged if tagged is not None else extract_last_number(sample.response_text)
    correct = answer is not None and answers_equal(answer, sample.label)
    return {"reward": float(correct), "format_correct": float(tagged is not None), "answer_correct": float(correct)}
