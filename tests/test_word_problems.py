"""`--task word_problems` and the `math_lenient` reward."""

import json

from slime_rl.rewards import get_reward_fn
from slime_rl.tasks import get_task, registered_tasks
from slime_rl.tasks.word_problems import make_word_problems
from slime_rl.types import Sample


def test_word_problems_are_deterministic_distinct_and_answered(tmp_path):
    a = make_word_problems(tmp_path / "a", num_train=300, num_val=50, seed=3)
    b = make_word_problems(tmp_path / "b", num_train=300, num_val=50, seed=3)
    train = [json.loads(line) for line in a["train"].read_text().splitlines()]
    val = [json.loads(line) for line in a["val"].read_text().splitlines()]
    assert a["train"].read_text() == b["train"].read_text()
    assert len(train) == 300 and len(val) == 50
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    for row in train + val:
        assert row["prompt"].endswith("\\boxed{}.") and int(row["label"]) >= 0


def test_the_task_is_registered_with_the_lenient_reward_and_chat_preset():
    assert "word_problems" in registered_tasks()
    task = get_task("word_problems")
    assert task.reward == "math_lenient" and task.preset(None)["data.apply_chat_template"] is True


def test_math_lenient_takes_the_boxed_answer_else_the_last_number():
    reward = get_reward_fn("math_lenient")

    def score(text, label):
        sample = Sample(prompt_ids=[1], label=label)
        sample.response_text = text
        return reward(sample)

    assert score("11 - 9 = 2 pencils.", "2") == {"reward": 1.0, "format_correct": 0.0, "answer_correct": 1.0}
    assert score("so \\boxed{7}, not 3", "7")["format_correct"] == 1.0
    assert score("\\boxed{4} then 5", "5")["reward"] == 0.0  # a boxed answer is the answer
    assert score("1,200 stamps", "1200")["reward"] == 1.0
    assert score("no idea", "3") == {"reward": 0.0, "format_correct": 0.0, "answer_correct": 0.0}
