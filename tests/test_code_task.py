"""`--task code`: the generated problems (distinct, sized for the preset, references passing their own tests),
its validation metrics, and a whole `slime-rl train --task code` run (SFT warm-up then GRPO) on CPU."""

from __future__ import annotations

import json
import random

import pytest

from slime_rl.cli import main
from slime_rl.config import JobConfig
from slime_rl.rewards import score_samples
from slime_rl.rewards.code import CodeReward
from slime_rl.rewards.config import CodeRewardConfig, SandboxConfig
from slime_rl.sandbox import find_bwrap
from slime_rl.tasks import get_task
from slime_rl.tasks.code import FAMILIES, make_code_task, make_problem
from slime_rl.tokenizer import CharTokenizer
from slime_rl.types import Sample

needs_bwrap = pytest.mark.skipif(find_bwrap() is None, reason="bubblewrap (bwrap) is not installed")


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_splits_are_distinct_and_fit_the_presets_contexts(tmp_path, monkeypatch):
    paths = make_code_task(tmp_path, num_train=300, num_val=50, num_sft=200, seed=3)
    rows = {split: _rows(path) for split, path in paths.items()}
    assert {k: len(v) for k, v in rows.items()} == {"train": 300, "val": 50, "sft": 200}
    prompts = [r["prompt"] for split in rows.values() for r in split]
    assert len(set(prompts)) == len(prompts)
    assert all("response" in r for r in rows["sft"]) and not any("response" in r for r in rows["train"])
    preset = get_task("code").preset(JobConfig())
    tok = CharTokenizer()
    assert max(len(tok.encode(p)) for p in prompts) <= preset["data.max_prompt_tokens"]
    longest_response = max(len(tok.encode(r["response"])) + 1 for r in rows["sft"])  # + EOS
    assert longest_response <= preset["rollout.max_new_tokens"]
    context = preset["data.max_prompt_tokens"] + preset["rollout.max_new_tokens"]
    assert context <= preset["model.max_position_embeddings"]
    monkeypatch.setattr("slime_rl.tasks.code.make_problem", lambda rng: {"prompt": "the only one", "label": {}})
    with pytest.raises(ValueError, match=r"found only 1 distinct problems for the 3 asked \(data.num_train"):
        make_code_task(tmp_path / "too_many", num_train=1, num_val=1, num_sft=1, seed=0)


@needs_bwrap
def test_every_familys_reference_passes_its_tests_and_a_wrong_answer_does_not():
    rng = random.Random(0)
    problems = [make_problem(rng, family) for family in FAMILIES for _ in range(2)]
    samples = [Sample(prompt_ids=[], response_text=p["response"], label=p["label"], index=i)
               for i, p in enumerate(problems)]
    samples.append(Sample(prompt_ids=[], response_text="def f(x): return 0", label=problems[0]["label"],
                          index=len(samples)))
    reward = CodeReward(CodeRewardConfig(sandbox=SandboxConfig(cpu_s=2, wall_s=10, max_parallel=2)))
    try:
        stats = score_samples(samples, reward, timeout_s=120, max_workers=4)
    finally:
        reward.close()
    assert stats.errors == 0 and stats.timeouts == 0
    assert [s.reward["reward"] for s in samples[:-1]] == [1.0] * len(problems), \
        [(p["response"], s.reward) for p, s in zip(problems, samples) if s.reward["reward"] != 1.0]
    assert samples[-1].reward["reward"] < 1.0


def test_validation_metrics_report_pass_rate_and_all_passed_accuracy():
    def scored(passed, total, compile_error=0.0):
        return Sample(prompt_ids=[], response_ids=[1, 2], reward={
            "reward": passed / total, "passed": float(passed), "total": float(total), "compile_error": compile_error,
            "timeouts": 0.0, "crashes": 0.0, "answer_correct": float(passed == total)})

    metrics = get_task("code").eval_metrics([scored(3, 3), scored(1, 3), scored(0, 3, 1.0), scored(3, 3)], "val")
    assert metrics["val/accuracy"] == 0.5
    assert metrics["val/pass_rate"] == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)
    assert metrics["val/compile_error_rate"] == 0.25


@needs_bwrap
def test_train_task_code_runs_sft_then_grpo_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--task", "code", "--train.num_steps", "2", "--log.output_dir", str(out),
               "--data.num_sft", "32", "--data.num_train", "32", "--data.num_val", "4", "--sft.epochs", "1",
               "--rollout.prompts_per_step", "2", "--rollout.n_samples_per_prompt", "2", "--eval.n_samples", "1",
               "--log.progress", "false", "--log.plot", "false"])
    assert rc == 0
    records = _rows(out / "metrics.jsonl")
    steps = [r for r in records if "rollout/pass_rate" in r]
    assert len(steps) == 2
    assert all(0.0 <= r["rollout/pass_rate"] <= 1.0 for r in steps)
    assert any("val/pass_rate" in r for r in records)
    assert "after RL:" in capsys.readouterr().out
