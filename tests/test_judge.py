"""`judge`: an LLM grades responses (`slime_rl.rewards.judge`).

A tiny random causal model is served by `slime-rl serve` (a subprocess); in logprobs mode the judge's score
equals the same model's next-token distribution computed here, through the OpenAI and the SGLang protocol.
Stub servers give canned answers for text-mode parsing, count requests for the cache, and play the
failures (down, slow, garbage): each is the sample's failure reward, counted.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from http_stub import StubServer
from rollout.router import free_port
from server_procs import START_TIMEOUT_S, launch_server, wait_healthy
from slime_rl.rewards import score_samples
from slime_rl.rewards.config import JudgeConfig
from slime_rl.rewards.judge import LLMJudge, parse_score
from slime_rl.types import Sample

RUBRIC = "Q: {prompt}\nA: {response}\nRate 0-9. Score: "
PAIRS = [("2+3=", "5"), ("hi", "hello"), ("color?", "blue"), ("x", "y"), ("7*6=", "42")]
TOP = 20


def _samples(pairs=PAIRS, labels=None) -> list[Sample]:
    labels = labels or [None] * len(pairs)
    return [Sample(prompt_ids=[1], group_id=0, index=i, prompt_text=p, response_text=r, label=lab)
            for i, ((p, r), lab) in enumerate(zip(pairs, labels))]


def _judge(url: str, **kw) -> LLMJudge:
    kw = {"timeout_s": 5.0, "retries": 0, "backoff_s": 0.01, **kw}
    return LLMJudge(JudgeConfig(url=url, **kw))


# ---- logprobs mode against a served model --------------------------------------------------------


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A tiny random Llama with the char tokenizer; initialised wide enough that its top tokens are well apart."""
    from slime_rl.hf_io import init_tiny_model, save_hf_checkpoint, tiny_hf_config
    from slime_rl.tokenizer import CharTokenizer

    tok = CharTokenizer()
    config = tiny_hf_config(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=64, max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                            bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    config["initializer_range"] = 0.3
    path = tmp_path_factory.mktemp("judge") / "model"
    save_hf_checkpoint(path, config, init_tiny_model(config, seed=0), tok)
    return path


@pytest.fixture(scope="module")
def judge_server(judge_dir, tmp_path_factory):
    server = launch_server("judge", judge_dir, tmp_path_factory.mktemp("judge_log"))
    try:
        wait_healthy(server, time.monotonic() + START_TIMEOUT_S)
        yield server
    finally:
        server.stop()


def _direct_score(model, tok, rendered: str, api: str, lo: int, hi: int) -> float | None:
    """The expected score from this process's forward pass over the prompt the server sees: the chat
    template (openai) or the raw text with the tokenizer's special tokens (sglang); None when no score token is
    among the top 20."""
    if api == "openai":
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": rendered}]), add_special_tokens=False)
    else:
        ids = tok.encode(rendered, add_special_tokens=True)
    with torch.no_grad():
        logprobs_V = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
    values, token_ids = logprobs_V.topk(TOP + 1)
    assert values[TOP - 1] - values[TOP] > 1e-4  # the top-20 set is not decided by rounding
    votes = {}
    for lp, t in zip(values[:TOP].tolist(), token_ids[:TOP].tolist()):
        text = tok.decode([t], skip_special_tokens=False)
        if text.isdigit() and lo <= int(text) <= hi:
            votes[int(text)] = votes.get(int(text), 0.0) + math.exp(lp)
    if not votes:
        return None
    return sum(s * p for s, p in votes.items()) / sum(votes.values())


@pytest.mark.parametrize("rubric", [RUBRIC, None], ids=["rubric", "default_rubric"])
@pytest.mark.parametrize("api", ["openai", "sglang"])
def test_logprobs_score_equals_a_direct_call(judge_server, judge_dir, api, rubric):
    from transformers import AutoModelForCausalLM

    from slime_rl.tokenizer import CharTokenizer

    model = AutoModelForCausalLM.from_pretrained(judge_dir, dtype=torch.float32).eval()
    tok = CharTokenizer.load(judge_dir)
    judge = _judge(judge_server.url, api=api, score_mode="logprobs", rubric=rubric, min_score=0, max_score=9)
    samples = _samples(labels=["5", None, {"a": 1}, None, 42])
    expected = [_direct_score(model, tok, judge.render(s), api, 0, 9) for s in samples]
    stats = score_samples(samples, judge, failure_reward=-1.0)
    scored = [(s.scalar_reward, e) for s, e in zip(samples, expected) if e is not None]
    assert len(scored) >= 3 and len({round(e, 6) for _, e in scored}) >= 2  # scores that say something
    for reward, e in scored:
        assert reward == pytest.approx(e / 9, abs=1e-4)
    failed = [s for s, e in zip(samples, expected) if e is None]
    assert stats.errors == len(failed) and all(s.scalar_reward == -1.0 for s in failed)


# ---- text mode: canned answers -------------------------------------------------------------------

# (the judge's answer, the reward with scores 0..10, or None = no score: the sample fails)
ANSWERS = [
    ("Score: 7", 0.7),
    ("First Score: 3\nOn reflection, Score: 8", 0.8),
    ("**Score:** 9", 0.9),
    ("score = 4.5", 0.45),
    ("I would rate it 8/10.", 0.8),
    ("Steps 1 and 2 are right: 3 out of 10", 0.3),
    ("It has 2 mistakes; overall 6", 0.6),
    ("Score: 0", 0.0),
    ("Score: 10", 1.0),
    ("Score: 11", None),
    ("Score: -2", None),
    ("I cannot judge this.", None),
    ("", None),
    ("42 apples, 15 pears", None),
]


def _canned(request, stub):
    """Answers the rendered rubric ("{response}": the case's answer) in the protocol of the path."""
    if request.path == "/generate":
        return 200, {"text": request.body["text"], "meta_info": {"finish_reason": {"type": "stop"}}}
    text = request.body["messages"][0]["content"]
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


@pytest.mark.parametrize("api", ["openai", "sglang"])
def test_text_mode_parses_the_score(api):
    samples = _samples([("p", answer) for answer, _ in ANSWERS])
    with StubServer(_canned) as stub:
        judge = _judge(stub.url, api=api, rubric="{response}", max_new_tokens=16, model="judge-model")
        stats = score_samples(samples, judge, failure_reward=-1.0, max_workers=3)
    for sample, (answer, want) in zip(samples, ANSWERS):
        assert sample.scalar_reward == pytest.approx(-1.0 if want is None else want), answer
    assert stats.errors == sum(want is None for _, want in ANSWERS)
    body = stub.requests[0].body
    if api == "openai":
        assert stub.requests[0].path == "/v1/chat/completions" and body["model"] == "judge-model"
        assert body["temperature"] == 0 and body["max_tokens"] == 16 and body["messages"][0]["role"] == "user"
    else:
        assert stub.requests[0].path == "/generate"
        assert body["sampling_params"] == {"temperature": 0, "max_new_tokens": 16}


def test_parse_score_other_ranges():
    assert parse_score("4/5", 1, 5) == 4.0
    assert parse_score("7/10 but Score: 2", 1, 5) == 2.0
    assert parse_score("rated 9/10, so 4", 1, 5) == 4.0  # 9/10 is another scale; the last in-range number wins
    with pytest.raises(ValueError, match="no score"):
        parse_score("6 and 7", 1, 5)


def test_rubric_rendering_and_sources(tmp_path):
    judge = _judge("http://127.0.0.1:1", rubric="{prompt}|{response}|{label}|{min_score}-{max_score}|{other}",
                   min_score=1, max_score=7.5)
    sample = _samples([("P", "R {label}")], labels=[None])[0]
    assert judge.render(sample) == "P|R {label}||1-7.5|{other}"  # one pass; unknown braces stay
    sample.label = {"answer": 3}
    assert judge.render(sample) == 'P|R {label}|{"answer": 3}|1-7.5|{other}'
    path = tmp_path / "rubric.txt"
    path.write_text("Grade {response}.")
    assert _judge("http://127.0.0.1:1", rubric=str(path)).render(sample) == "Grade R {label}."
    default = _judge("http://127.0.0.1:1").render(sample)
    assert "R {label}" in default and "Score: N" in default and "from 0 (worst) to 10 (best)" in default
    with pytest.raises(ValueError, match="reward.judge.rubric"):
        _judge("http://127.0.0.1:1", rubric=str(tmp_path / "missing.txt"))
    path.write_text("no placeholder")
    with pytest.raises(ValueError, match="reward.judge.rubric.*placeholder"):
        _judge("http://127.0.0.1:1", rubric=str(path))
    with pytest.raises(ValueError, match="reward.judge.url"):
        LLMJudge(JudgeConfig())


def test_config_needs_a_url_when_judge_is_used():
    from slime_rl.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"reward\.judge\.url must be an http\(s\) URL"):
        build_config(overrides=[("reward.weights", {"task": 1.0, "judge": 0.2}), ("reward.judge.url", "host:1")])
    build_config(overrides=[("reward.name", "judge"), ("reward.judge.url", "https://judge.example/v1")])


# ---- cache, retries, key ---------------------------------------------------------------------------


def test_cache_answers_a_repeated_prompt_without_a_request(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "judge-secret")
    with StubServer(_canned) as stub:
        judge = _judge(stub.url + "/v1", rubric="{response}", cache_size=2, api_key_env="TEST_JUDGE_KEY")
        a, b, c, bad = _samples([("p", "Score: 1"), ("p", "Score: 2"), ("p", "Score: 3"), ("p", "none")])
        assert judge(a) == pytest.approx(0.1) and len(stub.requests) == 1
        assert judge(a) == pytest.approx(0.1) and len(stub.requests) == 1  # from the cache
        assert (judge.cache.hits, judge.cache.misses) == (1, 1)
        judge(b), judge(c)  # a is the least recently used: evicted (cache_size 2)
        assert len(stub.requests) == 3 and len(judge.cache) == 2
        judge(c)
        assert len(stub.requests) == 3
        judge(a)
        assert len(stub.requests) == 4
        for _ in range(2):  # failures are not cached
            with pytest.raises(ValueError):
                judge(bad)
        assert len(stub.requests) == 6
    assert all(r.path == "/v1/chat/completions" for r in stub.requests)  # a URL ending in /v1 is the API root
    assert all(r.headers["Authorization"] == "Bearer judge-secret" for r in stub.requests)


def test_no_cache_when_cache_size_is_zero():
    with StubServer(_canned) as stub:
        judge = _judge(stub.url, rubric="{response}", cache_size=0)
        sample = _samples([("p", "Score: 5")])[0]
        assert judge(sample) == judge(sample) == pytest.approx(0.5)
    assert len(stub.requests) == 2


def test_retries_with_backoff_then_success():
    def flaky(request, stub):
        return (503, b"loading") if len(stub.requests) <= 2 else _canned(request, stub)

    with StubServer(flaky) as stub:
        judge = _judge(stub.url, api="sglang", rubric="{response}", retries=2, backoff_s=0.5)
        delays: list[float] = []
        judge.poster.sleep = delays.append
        assert judge(_samples([("p", "Score: 6")])[0]) == pytest.approx(0.6)
    assert len(stub.requests) == 3 and delays == [0.5, 1.0]


# ---- failures: failure rewards, counted -------------------------------------------------------------


def _slow(request, stub):
    stub.release.wait(30)  # far past the client's timeout; released when the stub closes
    return _canned(request, stub)


def _no_text_in_logprobs(request, stub):  # a server that ignored return_text_in_logprobs
    return 200, {"text": "7", "meta_info": {"output_top_logprobs": [[[-0.1, 9, None], [-2.0, 10, None]]]}}


BROKEN = {
    "not_json": ("openai", "text", lambda req, stub: (200, b"<html>502 Bad Gateway</html>")),
    "no_choices": ("openai", "text", lambda req, stub: (200, {"object": "error", "message": "overloaded"})),
    "no_text": ("sglang", "text", lambda req, stub: (200, {"meta_info": {}})),
    "server_error": ("sglang", "text", lambda req, stub: (500, b"Internal Server Error")),
    "bad_request": ("openai", "text", lambda req, stub: (400, {"message": "unknown key"})),
    "no_logprobs": ("openai", "logprobs", _canned),
    "logprob_tokens_without_text": ("sglang", "logprobs", _no_text_in_logprobs),
    "slow": ("openai", "text", _slow),
}


@pytest.mark.parametrize("kind", ["down", *BROKEN])
def test_broken_judge_gives_failure_rewards_and_counts(kind):
    samples = _samples()
    if kind == "down":
        judge = _judge(f"http://127.0.0.1:{free_port()}", retries=1)
        stats = score_samples(samples, judge, failure_reward=-1.0)
    else:
        api, mode, respond = BROKEN[kind]
        with StubServer(respond) as stub:
            judge = _judge(stub.url, api=api, score_mode=mode, timeout_s=0.3, retries=1)
            stats = score_samples(samples, judge, failure_reward=-1.0)
        retried = kind in ("server_error", "slow")
        assert len(stub.requests) == len(samples) * (2 if retried else 1)
    assert stats.errors == len(samples) and stats.timeouts == 0
    assert all(s.reward == {"reward": -1.0, "reward_error": 1.0} for s in samples)
    assert judge.cache.hits == 0 and len(judge.cache) == 0


# ---- end to end: slime-rl train with the judge in a weighted reward ---------------------------------


def test_train_with_a_served_judge_finishes(judge_server, tmp_path):
    import json

    from slime_rl.cli import main

    out = tmp_path / "run"
    argv = ["train", "--model.hidden_size", "32", "--model.intermediate_size", "64", "--data.task_max_operand", "29",
            "--data.num_train", "32", "--data.num_val", "4", "--data.num_sft", "8", "--rollout.max_new_tokens", "4",
            "--rollout.prompts_per_step", "2", "--rollout.n_samples_per_prompt", "4", "--eval.n_samples", "1",
            "--sft.enabled", "false", "--train.num_steps", "2", "--log.progress", "false", "--log.plot", "false",
            "--log.save_checkpoint", "false", "--reward.weights", '{"task": 1.0, "judge": 0.2}',
            "--reward.judge.url", judge_server.url, "--reward.judge.api", "sglang", "--reward.judge.score_mode",
            "logprobs", "--reward.judge.rubric", RUBRIC, "--reward.judge.max_score", "9", "--log.output_dir", str(out)]
    assert main(argv) == 0
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "rollout/reward_mean" in r]
    assert len(steps) == 2
    judged = [r for r in steps if "rollout/reward/judge" in r]
    assert judged and all(0.0 <= r["rollout/reward/judge"] <= 1.0 for r in judged)  # some samples were judged
    assert steps[-1]["reward/errors"] < 16  # a sample fails only when no score token is among the top 20
