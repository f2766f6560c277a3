"""Math reward, the reward registry, and the fault-tolerant runner."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from slime_rl.rewards import (
    extract_answer,
    get_reward_fn,
    math_reward,
    register_reward,
    registered_rewards,
    score_samples,
)
from slime_rl.rewards.math import extract_boxed
from slime_rl.types import Sample


def _sample(response: str, label=None, group_id: int = 0, index: int = 0) -> Sample:
    return Sample(prompt_ids=[1], response_text=response, label=label, group_id=group_id, index=index)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\sqrt{\frac{a}{b^{2}}}} done", r"\sqrt{\frac{a}{b^{2}}}"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{7} and a truncated \boxed{\frac{1}{", "7"),  # last balanced one wins
        (r"\fbox{x+1}", "x+1"),
        ("<answer> 12 </answer>", "12"),
        ("<answer>1</answer> ... <answer>\nthe value is \\boxed{3}\n</answer>", "3"),
        (r"<answer>5</answer> \boxed{6}", "5"),  # an answer tag is the declared final answer
        ("no answer here 42", None),
        (r"\boxed{}", None),
        (r"\boxed{unclosed", None),
        ("<answer>  </answer>", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_boxed_nested():
    assert extract_boxed(r"x \boxed{{a}{b}} y") == "{a}{b}"


@pytest.mark.parametrize(
    "answer, label, correct",
    [
        ("42", "42", True),
        ("42", 42, True),
        ("-7", -7, True),
        ("0.5", "1/2", True),
        (r"\frac{1}{2}", "0.5", True),
        (r"\frac{1}{2}", 0.5, True),
        ("2.0", "2", True),
        (r"\sqrt{2}", "2^{1/2}", True),
        ("1+x", "x+1", True),
        ("41", "42", False),
        ("0.3", "1/3", False),
        (r"\frac{1}{3}", "0.5", False),
        ("x+2", "x+1", False),
    ],
)
def test_math_reward_equality(answer, label, correct):
    result = math_reward(_sample(rf"Thus \boxed{{{answer}}}", label))
    assert result == {"reward": float(correct), "format_correct": 1.0, "answer_correct": float(correct)}


def test_format_vs_answer_accuracy():
    assert math_reward(_sample("the answer is 5", "5")) == {"reward": 0.0, "format_correct": 0.0, "answer_correct": 0.0}
    assert math_reward(_sample("<answer>4</answer>", "5"))["format_correct"] == 1.0
    assert math_reward(_sample("<answer>4</answer>", "5"))["reward"] == 0.0
    assert math_reward(_sample("<answer>5</answer>", "5"))["reward"] == 1.0
    with pytest.raises(ValueError, match="needs sample.label"):
        math_reward(_sample(r"\boxed{5}", None))


def test_math_reward_many_is_fast():
    samples = [_sample(rf"{i}+{i} = \boxed{{{2 * i + (i % 2)}}}", str(2 * i), i // 8, i % 8) for i in range(4096)]
    stats = score_samples(samples, math_reward)
    assert stats.errors == stats.timeouts == 0
    assert stats.elapsed_s < 2.0, stats.elapsed_s
    assert sum(s.scalar_reward for s in samples) == 2048


# -- registry ---------------------------------------------------------------


def length_reward(sample: Sample) -> float:
    """A reward defined in this test module, loaded by dotted path."""
    return float(len(sample.response_text))


def test_registry_by_name_and_path():
    assert "math" in registered_rewards()
    assert get_reward_fn("math") is math_reward
    assert get_reward_fn(f"{__name__}:length_reward") is length_reward
    assert get_reward_fn(f"{__name__}.length_reward") is length_reward
    assert get_reward_fn("slime_rl.rewards.math:math_reward") is math_reward


def test_register_and_errors():
    @register_reward("test_constant")
    def constant(sample: Sample) -> float:
        return 0.25

    assert get_reward_fn("test_constant") is constant
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math")(constant)
    with pytest.raises(ValueError, match=r"unknown reward function 'nope'.*Registered: .*math"):
        get_reward_fn("nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        get_reward_fn("no_such_pkg.mod:fn")
    with pytest.raises(ValueError, match="has no attribute 'missing_fn'"):
        get_reward_fn(f"{__name__}:missing_fn")
    with pytest.raises(TypeError, match="non-callable"):
        get_reward_fn(f"{__name__}:MODULE_CONSTANT")


MODULE_CONSTANT = 3


# -- runner -----------------------------------------------------------------

_release = threading.Event()


def _flaky_reward(sample: Sample) -> dict[str, float]:
    if sample.response_text == "raise":
        raise RuntimeError("judge exploded")
    if sample.response_text == "hang":
        _release.wait(30)  # far past the time-out; released at test end
    if sample.response_text == "nan":
        return float("nan")
    if sample.response_text == "nokey":
        return {"score": 1.0}
    return {"reward": 1.0, "length": float(len(sample.response_text))}


def test_runner_isolates_failures_and_timeouts(caplog):
    texts = ["ok", "raise", "hang", "ok!", "nan", "nokey"] + ["fine"] * 50
    samples = [_sample(t, group_id=3, index=i) for i, t in enumerate(texts)]
    timeout_s = 0.5
    start = time.perf_counter()
    try:
        with caplog.at_level(logging.WARNING, logger="slime_rl.rewards.runner"):
            stats = score_samples(samples, _flaky_reward, timeout_s=timeout_s, failure_reward=-1.0, max_workers=2)
    finally:
        _release.set()
    elapsed = time.perf_counter() - start
    assert elapsed < timeout_s + 1.0, elapsed
    assert elapsed >= timeout_s  # the hung sample was waited for, not dropped early
    assert (stats.num_samples, stats.errors, stats.timeouts) == (len(texts), 3, 1)
    assert sorted(stats.failed_ids) == ["3/1", "3/2", "3/4", "3/5"]
    assert samples[0].reward == {"reward": 1.0, "length": 2.0}
    assert samples[3].reward == {"reward": 1.0, "length": 3.0}
    assert samples[1].reward == {"reward": -1.0, "reward_error": 1.0}
    assert samples[2].reward == {"reward": -1.0, "reward_error": 1.0, "reward_timeout": 1.0}
    assert all(s.reward == {"reward": 1.0, "length": 4.0} for s in samples[6:])
    assert "sample 3/1: RuntimeError: judge exploded" in caplog.text
    assert "sample 3/2: timed out" in caplog.text
    assert "no 'reward' key" in caplog.text and "not finite" in caplog.text


def test_runner_float_rewards_and_edge_cases():
    samples = [_sample("abc"), _sample("")]
    stats = score_samples(samples, length_reward, max_workers=1)
    assert [s.reward for s in samples] == [3.0, 0.0] and stats.errors == 0
    assert score_samples([], length_reward).num_samples == 0
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        score_samples(samples, length_reward, timeout_s=0)


def test_scoring_reuses_the_pools_threads_across_calls():
    """An RL run scores dozens of groups a second: starting `max_workers` threads per call cost hundreds of
    thread starts a second. Calls after the first start no thread; a hung reward's thread is replaced."""
    from slime_rl.rewards import runner

    def slow(sample):
        time.sleep(0.01)
        return 1.0

    score_samples([_sample("x") for _ in range(8)], slow, max_workers=8)  # the pool has its threads now
    before = runner._POOL.started
    for _ in range(20):
        stats = score_samples([_sample("x") for _ in range(8)], slow, max_workers=8)
        assert stats.errors == 0
    # A thread that has just finished a task may not be back at the queue when the next call submits (a loaded
    # machine): a few replacements are fine, a call's worth per call (160 here) is what this guards against.
    assert runner._POOL.started - before <= 8
    release = threading.Event()
    try:
        stats = score_samples([_sample("hang"), _sample("ok")], lambda s: release.wait(30) if s.response_text == "hang"
                              else 2.0, timeout_s=0.2, max_workers=2)
        assert stats.timeouts == 1
        samples = [_sample("x") for _ in range(8)]
        assert score_samples(samples, slow, max_workers=8).errors == 0  # served while the hung one still holds a thread
        assert [s.reward for s in samples] == [1.0] * 8
    finally:
        release.set()


def test_hung_reward_does_not_block_interpreter_exit():
    import subprocess
    import sys

    code = (
        "import time\n"
        "from slime_rl.rewards import score_samples\n"
        "from slime_rl.types import Sample\n"
        "stats = score_samples([Sample(prompt_ids=[1])], lambda s: time.sleep(3600), timeout_s=0.2)\n"
        "print('timeouts', stats.timeouts)\n"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "timeouts 1" in proc.stdout
    assert time.perf_counter() - start < 60
