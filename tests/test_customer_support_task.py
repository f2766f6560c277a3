"""The customer-support task on the Task and Episode seams: chat-template rendering turn by turn, the oracle's
dialogues as SFT tokens equal to what an episode holds, hostile labels, and the deploy gate."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from rollout.episodes import play
from rollout.groups import new_group
from slime_rl.cli import main
from slime_rl.config import build_config
from slime_rl.data import load_prompts
from slime_rl.gate import Gate, wilson_interval
from slime_rl.sft import conversation_tokens, sft_samples
from slime_rl.tasks import get_task
from slime_rl.tasks.arithmetic import ArithmeticTask
from slime_rl.tasks.chat import ChatRenderer
from slime_rl.tasks.customer_support import SupportEnv
from slime_rl.tasks.customer_support.task import oracle_dialogue, prompt_messages
from slime_rl.tokenizer import CharTokenizer, HFTokenizer
from slime_rl.types import GenerateOutput, SampleStatus, SamplingParams

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """A small byte-level BPE tokenizer with a ChatML template whose EOS is <|im_end|> (as SmolLM2's and Qwen's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    corpus = [json.dumps(prompt_messages(s)) + json.dumps(oracle_dialogue(s, 8)) for s in range(40)]
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", unk_token="<unk>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("chatml")
    tok.save_pretrained(str(out))
    return HFTokenizer(out)


@pytest.mark.parametrize("which", ["char", "chatml"])
def test_turns_appended_token_by_token_read_as_the_template_renders_the_whole_dialogue(which, chatml):
    tok = CharTokenizer() if which == "char" else chatml
    renderer = ChatRenderer(tok)
    prompt = prompt_messages(3)
    dialogue = oracle_dialogue(3, 8) + [{"role": "user", "content": "Thanks!"}]
    prompt_ids = tok.encode(tok.apply_chat_template(prompt), add_special_tokens=False)
    ids, mask = conversation_tokens(dialogue + [{"role": "assistant", "content": "Bye."}], tok, renderer)
    text = tok.decode(prompt_ids + ids, skip_special_tokens=False)
    whole = tok.apply_chat_template(prompt + dialogue + [{"role": "assistant", "content": "Bye."}],
                                    add_generation_prompt=False)
    eos = renderer.eos_text
    # the template closes an assistant turn with EOS (ChatML) or a newline after it (char): the same dialogue
    assert text.replace(eos + "\n", "\n").replace(eos, "\n") == whole.replace(eos + "\n", "\n")
    model_text = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
    assert model_text == "".join(m["content"] for m in dialogue + [{"role": "assistant", "content": "Bye."}]
                                 if m["role"] == "assistant")


class ScriptedEngine:
    """Plays the oracle: each request gets the next assistant message of its scenario's dialogue, as tokens."""

    def __init__(self, tokenizer, dialogues: dict[tuple, list[str]]):
        self.tok, self.dialogues, self.calls = tokenizer, dialogues, []

    async def agenerate(self, requests):
        outs = []
        for r in requests:
            key = r.rid.split("-")[1:3]  # step-group-index-len
            text = self.dialogues[tuple(key)].pop(0)
            ids = self.tok.encode(text) + [self.tok.eos_token_id]
            self.calls.append(list(r.input_ids))
            outs.append(GenerateOutput(rid=r.rid, output_ids=ids, output_logprobs=[-0.5] * len(ids),
                                       finish_reason=SampleStatus.COMPLETED, weight_version=4))
        return outs


def test_oracle_episodes_hold_the_sft_tokens_and_resolve_every_case(tmp_path):
    cfg = build_config(overrides=[("task", "customer_support"), ("data.num_sft", 6), ("data.num_train", 4),
                                  ("data.num_val", 4)])
    task = get_task("customer_support")
    tok = CharTokenizer()
    paths = task.data(cfg, tmp_path)
    records, _ = load_prompts(paths["sft"], tok, response_key="response", max_prompt_tokens=2000)
    sft = sft_samples(records, tok)
    scripts = {(str(g), "0"): [m["content"] for m in r.response_text if m["role"] == "assistant"]
               for g, r in enumerate(records)}
    engine = ScriptedEngine(tok, scripts)
    groups = [new_group(r, g, 1) for g, r in enumerate(records)]
    asyncio.run(play(engine, groups, task.episode(cfg, tok), SamplingParams(max_new_tokens=400)))
    for (s,), ref in zip(groups, sft):
        assert s.prompt_ids == ref.prompt_ids and s.response_ids == ref.response_ids  # token for token
        assert s.loss_mask == ref.loss_mask and s.status == SampleStatus.COMPLETED
        assert set(s.weight_versions) == {4}
    samples = [g[0] for g in groups]
    rewards = [task.reward_fn(cfg)(s)["reward"] for s in samples]
    for s, r in zip(samples, rewards):
        s.reward = {"reward": r}
    metrics = task.eval_metrics(samples, "val")
    assert metrics["val/resolution_rate"] == 1.0 and metrics["val/accuracy"] == 1.0
    assert metrics["val/tool_call_accuracy"] == 1.0 and metrics["val/complaint_rate"] == 0.0
    assert metrics["val/mean_reward"] == pytest.approx(sum(rewards) / len(rewards)) and min(rewards) >= 3  # routine cases: speed bonus only
    rows = {split: [json.loads(line)["label"] for line in open(paths[split])] for split in ("train", "val", "sft")}
    assert not set(rows["train"]) & set(rows["val"]) and not set(rows["val"]) & set(rows["sft"])


@pytest.mark.parametrize("label", [None, "seven", -3, 2.5, True, {"seed": 1}, "9" * 5000])
def test_a_hostile_label_fails_its_episode_not_the_batch(label):
    cfg = build_config(overrides=[("task", "customer_support")])
    task, tok = get_task("customer_support"), CharTokenizer()

    class P:
        prompt_ids, prompt_text, metadata = tok.encode("user: hi\nassistant: "), "", {}

    P.label = label
    logs = []
    episode = task.episode(cfg, tok)
    episode.log = logs.append
    engine = ScriptedEngine(tok, {("0", "0"): ["hello"] * 8})
    (group,) = asyncio.run(play(engine, [new_group(P, 0, 1)], episode, SamplingParams(max_new_tokens=8)))
    s = group[0]
    assert s.metadata["episode"]["env_error"] == 1 and "label must be a scenario seed" in logs[0]
    with pytest.raises(RuntimeError):
        task.reward_fn(cfg)(s)


def test_wilson_interval_and_gate_checks(tmp_path):
    lo, hi = wilson_interval(0.99, 1000)
    assert 0.98 < lo < 0.99 < hi < 0.996
    assert wilson_interval(1.0, 50)[1] == 1.0 and math.isnan(wilson_interval(0.5, 0)[0])
    gate = Gate("tool_call_accuracy", 0.99, tmp_path)
    assert gate.check({"rollout/x": 1.0}, 3) is None  # no validation in these metrics
    report = gate.check({"val/tool_call_accuracy": 0.995, "val/tool_call_accuracy_n": 400.0}, 7)
    assert report.passed and report.n == 400 and report.ci95[0] < 0.995 < report.ci95[1]
    assert not gate.check({"val/tool_call_accuracy": float("nan"), "val/num_samples": 8.0}, 8).passed
    with pytest.raises(KeyError, match="it reports: accuracy, num_samples, reward_mean"):
        gate.check({"val/accuracy": 0.5, "val/reward_mean": 1.0, "val/num_samples": 4.0}, 1)
    gate.write(report)
    assert json.loads((tmp_path / "gate.json").read_text())["passed"] is True


class CountingTask(ArithmeticTask):
    """Arithmetic whose validation also reports how many evaluations ran: a metric that rises predictably."""

    evals = 0

    def eval_metrics(self, samples, prefix):
        CountingTask.evals += prefix == "val"
        return {**super().eval_metrics(samples, prefix), f"{prefix}/evaluations": float(CountingTask.evals)}


def make_counting_task():
    CountingTask.evals = 0
    return CountingTask()


GATE_JOB = ["--model.hidden_size", "32", "--model.intermediate_size", "64", "--data.task_max_operand", "19",
            "--data.num_train", "64", "--data.num_val", "8", "--data.num_sft", "16", "--rollout.max_new_tokens", "6",
            "--log.progress", "false", "--sft.enabled", "false", "--rollout.prompts_per_step", "4",
            "--rollout.n_samples_per_prompt", "2", "--eval.every_n_steps", "1", "--eval.n_samples", "1", "-b", "hf",
            "--log.plot", "false", "--task", "test_customer_support_task:make_counting_task"]


def test_the_gate_stops_a_run_once_passed_and_reports_failure_otherwise(tmp_path, capsys):
    # evaluations: step 0 (before RL) -> 1, after step 1 -> 2 (the greedy one counts too), ...
    out = tmp_path / "pass"
    assert main(["train", *GATE_JOB, "--train.num_steps", "10", "--gate.metric", "evaluations",
                 "--gate.threshold", "4", "--log.output_dir", str(out)]) == 0
    report = json.loads((out / "gate.json").read_text())
    assert report["passed"] and 0 < report["step"] < 10 and report["value"] >= 4
    assert (out / "checkpoint" / "config.json").exists() and report["checkpoint"] == str(out / "checkpoint")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == report["step"]  # stopped there, not at step 10
    assert "[gate] gate evaluations >= 4.0: PASSED" in capsys.readouterr().out

    out = tmp_path / "fail"
    assert main(["train", *GATE_JOB, "--train.num_steps", "1", "--gate.metric", "evaluations",
                 "--gate.threshold", "100", "--log.output_dir", str(out)]) == 3
    assert json.loads((out / "gate.json").read_text())["passed"] is False
    assert "was NOT passed" in capsys.readouterr().err

    out = tmp_path / "typo"
    assert main(["train", *GATE_JOB, "--train.num_steps", "1", "--gate.metric", "tool_acuracy",
                 "--log.output_dir", str(out)]) == 2
    assert "gate.metric 'tool_acuracy' is not a validation metric" in capsys.readouterr().err


def test_fully_async_episodes_interrupted_by_pushes_resume_and_are_trained_once(tmp_path):
    out, saved = tmp_path / "run", tmp_path / "rollouts"
    steps, per_step, n = 4, 4, 2
    assert main(["train", "--task", "customer_support", "--model.hidden_size", "32", "--model.intermediate_size", "64",
                 "--data.num_train", "64", "--data.num_val", "4", "--data.num_sft", "4", "--sft.enabled", "false", "--log.progress", "false",
                 "--rollout.max_new_tokens", "24", "--episode.max_turns", "3", "--rollout.prompts_per_step",
                 str(per_step), "--rollout.n_samples_per_prompt", str(n), "--train.num_steps", str(steps),
                 "--eval.every_n_steps", "0", "--eval.n_samples", "1", "--async", "fully_async",
                 "--async_rl.max_staleness", "1", "--debug.save_rollouts", str(saved), "--log.plot", "false",
                 "--log.save_checkpoint", "false", "--log.output_dir", str(out)]) == 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()  # a tiny model on this task: the word tokenizer
    ledger = [json.loads(line) for line in (out / "trained_groups.jsonl").read_text().splitlines()]
    uids = [g["uid"] for rec in ledger for g in rec["groups"]]
    assert len(ledger) == steps and len(uids) == steps * per_step == len(set(uids))  # none lost, none twice
    metrics = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/pg_loss" in r]
    assert metrics[-1]["rollout/resumed_samples"] > 0  # pushes interrupted episodes
    from slime_rl.producer import load_groups

    mid_turn = 0
    for path in sorted(saved.glob("step_*.pt")):
        for group in load_groups(path):
            assert len(group) == n
            for s in group:
                assert s.status in (SampleStatus.COMPLETED, SampleStatus.TRUNCATED) and "episode" in s.metadata
                assert len(s.response_ids) == len(s.loss_mask) == len(s.rollout_logprobs) == len(s.weight_versions)
                turn: set[int] = set()
                for m, v in zip(s.loss_mask + [0], s.weight_versions + [-1]):
                    if m:
                        turn.add(v)
                    elif turn:
                        mid_turn += len(turn) > 1  # one model turn sampled under two weight versions
                        turn = set()
    assert mid_turn > 0, "no episode was interrupted in the middle of a model turn"


def test_episodes_train_on_megatron_with_a_critic(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--task", "customer_support", "--model.hidden_size", "32", "--model.intermediate_size", "64",
                 "--data.num_train", "32", "--data.num_val", "2", "--data.num_sft", "8", "--sft.epochs", "1",
                 "--sft.batch_size", "8", "--log.progress", "false", "--rollout.max_new_tokens", "16",
                 "--episode.max_turns", "2", "--rollout.prompts_per_step", "2", "--rollout.n_samples_per_prompt", "2",
                 "--train.num_steps", "2", "--eval.every_n_steps", "0", "--eval.n_samples", "1", "--algo", "PPO",
                 "-b", "megatron", "--log.plot", "false", "--log.save_checkpoint", "false",
                 "--log.output_dir", str(out)]) == 0
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/pg_loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["train/pg_loss"]) and math.isfinite(r["train/critic_value_loss"])
                                   for r in steps)


def test_the_word_tokenizer_round_trips_the_simulators_text_and_splits_order_ids_in_two_digit_chunks(tmp_path):
    from slime_rl.tasks.customer_support.vocab import build_tokenizer
    from slime_rl.tokenizer import load_tokenizer

    tok = load_tokenizer(build_tokenizer(tmp_path / "tok", seeds=40))
    renderer = ChatRenderer(tok)
    for seed in (1000, 1001):  # scenarios the vocabulary was not read from
        prompt = tok.apply_chat_template(prompt_messages(seed))
        ids, _ = conversation_tokens(oracle_dialogue(seed, 8), tok, renderer)
        text = tok.decode(tok.encode(prompt) + ids, skip_special_tokens=False)
        assert text.startswith(prompt) and "<unk>" not in text
    errors = SupportEnv()
    errors.reset(1002)
    for bad in ('<tool_call>{"name": "refund", "arguments": {}}</tool_call>', "<tool_call>{oops</tool_call>",
                '<tool_call>{"name": "lookup_order", "arguments": {"order_id": 7}}</tool_call>'):
        observation = errors.step(bad)[0]
        assert "<unk>" not in tok.decode(tok.encode(observation), skip_special_tokens=False), observation
    call = '{"order_id": "A9268"}'
    assert [tok.decode([i]) for i in tok.encode(call)][7:11] == ["A", "92", "68", '"']


def test_the_task_builds_its_tokenizer_once_under_the_output_dir_and_a_configured_one_wins(tmp_path):
    from slime_rl.job import _tokenizer
    from slime_rl.tasks.customer_support.vocab import ensure_tokenizer

    cfg = build_config(overrides=[("task", "customer_support"), ("log.output_dir", str(tmp_path / "run"))])
    tok = _tokenizer(cfg)
    built = tmp_path / "run" / "tokenizer" / "tokenizer.json"
    assert isinstance(tok, HFTokenizer) and built.is_file() and tok.vocab_size < 600
    stamp = built.stat().st_mtime_ns
    assert ensure_tokenizer(built.parent) == built.parent and built.stat().st_mtime_ns == stamp  # reused
    assert isinstance(_tokenizer(build_config(overrides=[("task", "customer_support"), ("model.tokenizer", "char")])),
                      CharTokenizer)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(ValueError, match="holds no tokenizer.json"):
        ensure_tokenizer(tmp_path / "other")
    assert not list(tmp_path.glob(".tokenizer-*"))  # the losing build is cleaned up
