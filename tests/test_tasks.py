"""The Task seam: registry, a user's task by dotted path, the built-in tasks, and errors naming the field."""

from __future__ import annotations

import json

import pytest

from slime_rl.cli import main
from slime_rl.tasks import VerifiedAnswers, get_task, registered_tasks
from slime_rl.types import Sample

TINY = ["--model.hidden_size", "32", "--model.intermediate_size", "64", "--data.num_train", "40", "--data.num_val", "8",
        "--data.num_sft", "8", "--rollout.max_new_tokens", "6", "--rollout.prompts_per_step", "4",
        "--rollout.n_samples_per_prompt", "2", "--backend", "hf", "--sft.epochs", "1", "--train.num_steps", "1",
        "--eval.every_n_steps", "0", "--log.progress", "false", "--log.plot", "false"]


class Shout(VerifiedAnswers):
    """A user's task: prompts written by itself, reward = the share of '!' in the response, accuracy its own."""

    name = "shout"

    def data(self, cfg, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = [json.dumps({"prompt": f"{i}+{i}=", "label": "!"}) for i in range(12)]
        for split in ("train", "val"):
            (out_dir / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
        return {"train": str(out_dir / "train.jsonl"), "val": str(out_dir / "val.jsonl"), "sft": None}

    def reward_fn(self, cfg):
        return lambda s: s.response_text.count("!") / max(1, len(s.response_text))

    def eval_metrics(self, samples, prefix):
        return {f"{prefix}/accuracy": 0.25, f"{prefix}/reward_mean": sum(s.scalar_reward for s in samples)}


def make_shout():
    return Shout()


def test_registry_and_dotted_paths():
    assert {"arithmetic", "math"} <= set(registered_tasks())
    assert get_task("arithmetic").name == "arithmetic"
    assert isinstance(get_task("test_tasks:make_shout"), Shout)
    with pytest.raises(ValueError, match="registered: arithmetic, code, customer_support, math, ranked_list"):
        get_task("chess")
    with pytest.raises(ValueError, match="cannot load 'nope'"):
        get_task("test_tasks:nope")
    with pytest.raises(ValueError, match="lacks data, reward_fn, eval_metrics"):
        get_task("builtins:object")
    with pytest.raises(ValueError, match="the factory raised TypeError"):
        get_task("json:dumps")


def test_verified_answers_metrics_headline_is_answer_accuracy():
    scored = [Sample(prompt_ids=[1], response_ids=[2, 3], reward={"reward": 1.0, "answer_correct": 1.0}),
              Sample(prompt_ids=[1], response_ids=[2], reward={"reward": 0.0, "answer_correct": 0.0})]
    m = VerifiedAnswers().eval_metrics(scored, "val")
    assert m["val/accuracy"] == 0.5 and m["val/response_length"] == 1.5
    plain = [Sample(prompt_ids=[1], reward=0.25)]
    assert VerifiedAnswers().eval_metrics(plain, "val")["val/accuracy"] == 0.25  # no answer key: mean reward


def test_a_users_task_runs_the_job_with_its_data_reward_and_metrics(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--task", "test_tasks:make_shout", "--sft.enabled", "false",
                 "--log.output_dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["val/accuracy"] == 0.25  # the task's own validation metric
    assert any("rollout/accuracy" in r for r in records)


def test_task_errors_name_the_field(tmp_path, capsys):
    assert main(["train", *TINY, "--task", "chess", "--log.output_dir", str(tmp_path / "a")]) == 2
    assert "task: unknown task 'chess'" in capsys.readouterr().err
    assert main(["train", *TINY, "--task", "math", "--log.output_dir", str(tmp_path / "b")]) == 2
    assert "task math needs data.train_path" in capsys.readouterr().err
