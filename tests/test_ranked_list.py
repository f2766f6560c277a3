"""The ranked-list grader (parsing forms, scores, labels) and the synthetic ranked-list task (files, hidden
rule, splits, and a short `slime-rl train --task ranked_list` run)."""

from __future__ import annotations

import json
import math

import pytest

from slime_rl.rewards import get_reward_fn
from slime_rl.rewards.config import RankedListConfig, RewardConfig
from slime_rl.rewards.ranked_list import RankedListReward, parse_label, parse_ranked_list, rank_of
from slime_rl.tasks import get_task
from slime_rl.tasks.ranked_list import (INSTRUCTION, RuleSpec, gene_scores, hidden_table, make_ranked_list_task,
                                        rank_genes)
from slime_rl.types import Sample

PARSE_CASES = [
    # (id, text, max_items, expected items)
    ("comma", "G3, G7, G1", 10, ["g3", "g7", "g1"]),
    ("comma_no_space", "G3,G7,G1", 10, ["g3", "g7", "g1"]),
    ("semicolon", "BRCA1; TP53 ;KIF1A", 10, ["brca1", "tp53", "kif1a"]),
    ("newline", "G3\nG7\r\nG1\n", 10, ["g3", "g7", "g1"]),
    ("numbered_dot", "1. G3\n2. G7\n3. G1", 10, ["g3", "g7", "g1"]),
    ("numbered_paren", "1) G3\n2) G7\n10) G1", 10, ["g3", "g7", "g1"]),
    ("numbered_parens", "(1) G3\n(2)G7\n(3) G1", 10, ["g3", "g7", "g1"]),
    ("numbered_colon", "1: G3\n2: G7", 10, ["g3", "g7"]),
    ("numbered_inline", "1. G3 2. G7 3) G1", 10, ["g3", "g7", "g1"]),
    ("bullet_dash", "- G3\n- G7\n- G1", 10, ["g3", "g7", "g1"]),
    ("bullet_star", "* G3\n  * G7", 10, ["g3", "g7"]),
    ("bullet_dot", "• G3\n•G7\n+ G1", 10, ["g3", "g7", "g1"]),
    ("mixed", "1. G3, G7\n- G1; G2\nG4", 10, ["g3", "g7", "g1", "g2", "g4"]),
    ("case", "brca1, BRCA1, Brca1, tp53", 10, ["brca1", "tp53"]),
    ("whitespace", "  SCN1A  ,\tKCNQ   2 ,\n\n", 10, ["scn1a", "kcnq 2"]),
    ("punctuation_quotes", "\"G3\", 'G7', **G1**, (G2).", 10, ["g3", "g7", "g1", "g2"]),
    ("duplicates_first_rank", "G7, G3, G7, g3, G1", 10, ["g7", "g3", "g1"]),
    ("empty_items_dropped", "G3,, ,;G7,\n\n-\n", 10, ["g3", "g7"]),
    ("empty_text", "", 10, []),
    ("only_separators", " , ;\n- ", 10, []),
    ("max_items_cut", "a, b, c, d, e, f", 3, ["a", "b", "c"]),
    ("max_items_after_dedup", "a, a, b, a, c, d", 3, ["a", "b", "c"]),
    ("answer_marker", "G1 looks likely, but\nAnswer: G3, G7", 10, ["g3", "g7"]),
    ("final_answer_marker", "Final answer: 1. G3\n2. G7", 10, ["g3", "g7"]),
    ("last_marker_wins", "answer: G1\nAnswer: G3", 10, ["g3"]),
    ("empty_trailing_marker", "G3, G7\nAnswer:", 10, ["g3", "g7"]),
    ("decimal_not_a_marker", "3.5 mg, 2.0 mg", 10, ["3.5 mg", "2.0 mg"]),
    ("dash_inside_item", "HLA-B, COL4A1", 10, ["hla-b", "col4a1"]),
]


@pytest.mark.parametrize("text,max_items,expected", [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES])
def test_parse_ranked_list(text, max_items, expected):
    assert parse_ranked_list(text, max_items) == expected


def test_rank_of_is_one_based_and_zero_when_absent():
    items = ["g3", "g7", "g1"]
    assert rank_of(items, {"g3"}) == 1
    assert rank_of(items, ["G1"]) == 3  # answers are normalized too
    assert rank_of(items, ["g1", "g7"]) == 2  # the first right item counts
    assert rank_of(items, ["g9"]) == 0
    assert rank_of([], ["g3"]) == 0


def _sample(response: str, label) -> Sample:
    return Sample(prompt_ids=[1], response_text=response, label=label)


SCORE_CASES = [
    # (id, decay, max_items, response, label, reward, rank)
    ("first", 0.5, 10, "G3, G7, G1", "G3", 1.0, 1),
    ("second_decay", 0.5, 10, "G7, G3, G1", "G3", 0.5, 2),
    ("third_decay", 0.5, 10, "G7, G1, G3", "G3", 0.25, 3),
    ("other_decay", 0.8, 10, "a, b, c, d, e, G3", "G3", 0.8 ** 5, 6),
    ("decay_zero_only_first", 0.0, 10, "G7, G3", "G3", 0.0, 2),
    ("decay_zero_first", 0.0, 10, "G3, G7", "G3", 1.0, 1),
    ("decay_one_anywhere", 1.0, 10, "a, b, G3", "G3", 1.0, 3),
    ("absent", 0.5, 10, "G7, G1", "G3", 0.0, 0),
    ("empty_response", 0.5, 10, "", "G3", 0.0, 0),
    ("past_max_items", 0.5, 2, "G7, G1, G3", "G3", 0.0, 0),
    ("duplicate_does_not_push_rank", 0.5, 10, "G7, G7, g7, G3", "G3", 0.5, 2),
    ("several_answers_first_found", 0.5, 10, "G7, G1, G3", ["G3", "G1"], 0.5, 2),
    ("list_label", 0.5, 10, "G3", ["G3"], 1.0, 1),
    ("dict_label", 0.5, 10, "G1, G3", {"answer": ["G3"]}, 0.5, 2),
    ("dict_label_string", 0.5, 10, "G3", {"answer": "g3"}, 1.0, 1),
    ("json_list_label", 0.5, 10, "G1, G3", '["G3", "G9"]', 0.5, 2),
    ("json_dict_label", 0.5, 10, "G3", '{"answer": ["G3"]}', 1.0, 1),
    ("json_string_label", 0.5, 10, "G3", '"G3"', 1.0, 1),
    ("label_case_whitespace", 0.5, 10, "brca 1", "  BRCA   1 ", 1.0, 1),
]


@pytest.mark.parametrize("decay,max_items,response,label,reward,rank", [c[1:] for c in SCORE_CASES],
                         ids=[c[0] for c in SCORE_CASES])
def test_score(decay, max_items, response, label, reward, rank):
    out = RankedListReward(RankedListConfig(decay=decay, max_items=max_items))(_sample(response, label))
    assert out["reward"] == pytest.approx(reward)
    assert out["rank"] == rank
    assert out["top1"] == out["answer_correct"] == float(rank == 1)
    assert out["top5"] == float(0 < rank <= 5)
    assert out["topmax"] == float(rank > 0)


MALFORMED_LABELS = [
    ("none", None, "must be a string, a list of strings"),
    ("int", 3, "must be a string, a list of strings"),
    ("empty_string", "", "holds no answer"),
    ("blank_string", "  ", "holds no answer"),
    ("empty_list", [], "holds no answer"),
    ("list_of_blanks", ["", " . "], "holds no answer"),
    ("non_string_item", ["G3", 7], "every answer must be a string, got int"),
    ("dict_without_answer", {"answers": ["G3"]}, "needs an 'answer' key"),
    ("nested_dict", {"answer": {"answer": "G3"}}, "got a dict"),
    ("bad_json", '["G3", ', "looks like JSON but does not parse"),
    ("json_number_list", "[1, 2]", "every answer must be a string"),
]


@pytest.mark.parametrize("label,message", [c[1:] for c in MALFORMED_LABELS], ids=[c[0] for c in MALFORMED_LABELS])
def test_malformed_labels_raise_naming_the_problem(label, message):
    with pytest.raises(ValueError, match=message):
        RankedListReward()(_sample("G3", label))


def test_parse_label_normalizes():
    assert parse_label(["G3", " g3 ", "BRCA1"]) == ["g3", "g3", "brca1"]


def test_registered_factory_reads_the_config():
    rc = RewardConfig()
    rc.ranked_list = RankedListConfig(decay=0.25, max_items=2)
    fn = get_reward_fn("ranked_list", rc)
    assert isinstance(fn, RankedListReward) and fn.__name__ == "ranked_list"
    assert fn(_sample("G1, G3", "G3"))["reward"] == 0.25
    assert fn(_sample("G1, G2, G3", "G3"))["reward"] == 0.0  # past max_items


# --------------------------------------------------------------------------- #
# The synthetic task


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    return make_ranked_list_task(tmp_path_factory.mktemp("rl_data"), num_train=60, num_val=20, num_sft=30, seed=7)


def test_rows_are_reft_shaped_and_follow_the_hidden_rule(task_files):
    spec = RuleSpec()
    table = hidden_table(7, spec)
    for split in ("sft", "train", "val"):
        rows = _rows(task_files[split])
        assert len(rows) == {"sft": 30, "train": 60, "val": 20}[split]
        for row in rows:
            keys = {"case_report", "instruction", "answer", "ranking", "prompt", "label"}
            assert set(row) == keys | ({"response"} if split == "sft" else set())
            assert row["instruction"] == INSTRUCTION
            assert row["prompt"] == f"{row['case_report']} {row['instruction']}"
            symptoms = row["case_report"].removeprefix("sx: ").removesuffix(".").split(",")
            assert len(symptoms) == len(set(symptoms)) == spec.symptoms_per_case
            scores = gene_scores(symptoms, table)
            best = max(range(spec.num_genes), key=lambda g: scores[g])
            assert sorted(scores, reverse=True)[0] > sorted(scores, reverse=True)[1]  # a unique right gene
            assert row["answer"] == row["label"] == [f"G{best}"]
            assert row["ranking"] == rank_genes(symptoms, table, spec)
            assert len(row["prompt"]) <= 64  # fits the tiny model's prompt budget
            if split == "sft":
                assert row["response"] == ",".join(row["ranking"][:spec.list_len])
                assert RankedListReward()(_sample(row["response"], row["label"]))["reward"] == 1.0


def test_splits_are_disjoint_symptom_sets(task_files):
    sets = {split: {frozenset(r["case_report"][4:-1].split(",")) for r in _rows(task_files[split])}
            for split in ("sft", "train", "val")}
    assert sum(len(s) for s in sets.values()) == 110  # no repeats within a split either
    assert not sets["sft"] & sets["train"] and not sets["sft"] & sets["val"] and not sets["train"] & sets["val"]


def test_data_is_deterministic_per_seed(tmp_path, task_files):
    again = make_ranked_list_task(tmp_path / "a", num_train=60, num_val=20, num_sft=30, seed=7)
    other = make_ranked_list_task(tmp_path / "b", num_train=60, num_val=20, num_sft=30, seed=8)
    for split in ("sft", "train", "val"):
        assert again[split].read_text() == task_files[split].read_text()
        assert other[split].read_text() != task_files[split].read_text()
    assert hidden_table(7, RuleSpec()) != hidden_table(8, RuleSpec())


def test_too_many_cases_is_an_error_naming_the_fields(tmp_path):
    with pytest.raises(ValueError, match=r"data.num_train \+ data.num_val \+ data.num_sft = 100000"):
        make_ranked_list_task(tmp_path, num_train=99_000, num_val=500, num_sft=500, seed=0)
    with pytest.raises(ValueError, match="RuleSpec.symptoms_per_case must be"):
        RuleSpec(num_symptoms=3, symptoms_per_case=4)


def test_eval_metrics_headline_is_top1():
    task = get_task("ranked_list")
    fn = RankedListReward()
    samples = [_sample(r, "G3") for r in ("G3, G1", "G1, G3", "G1, G2", "")]
    for s in samples:
        s.reward = fn(s)
    failed = _sample("G3", "G3")
    failed.reward = {"reward": 0.0, "reward_error": 1.0}  # a failed reward counts as a miss
    m = task.eval_metrics(samples + [failed], "val")
    assert m["val/accuracy"] == m["val/top1"] == pytest.approx(1 / 5)
    assert m["val/top5"] == m["val/topmax"] == pytest.approx(2 / 5)
    assert m["val/mean_rank_found"] == 1.5
    assert m["val/reward_mean"] == pytest.approx(1.5 / 5)
    assert math.isclose(m["val/answer_accuracy"], 1 / 4)  # reward_metrics' own: scored samples only


def test_train_job_runs_and_logs_top1(tmp_path):
    from slime_rl.cli import main

    out = tmp_path / "run"
    tiny = ["--task", "ranked_list", "--model.hidden_size", "32", "--model.intermediate_size", "64",
            "--data.num_train", "16", "--data.num_val", "4", "--data.num_sft", "8", "--sft.epochs", "1",
            "--rollout.prompts_per_step", "4", "--rollout.n_samples_per_prompt", "2", "--backend", "hf",
            "--train.num_steps", "2", "--eval.every_n_steps", "2", "--eval.n_samples", "1",
            "--log.progress", "false", "--log.plot", "false", "--log.save_checkpoint", "false",
            "--log.output_dir", str(out)]
    assert main(["train", *tiny]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and 0 <= records[0]["val/top1"] <= 1
    assert records[0]["val/accuracy"] == records[0]["val/top1"]
    steps = [r for r in records if "rollout/top1" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0 <= r["rollout/reward_mean"] <= 1 and "rollout/topmax" in r for r in steps)
    assert 0 <= steps[-1]["val/top1"] <= steps[-1]["val/top5"] <= steps[-1]["val/topmax"] <= 1  # after RL
