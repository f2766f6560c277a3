"""`remote_rm`: a reward model behind HTTP (`slime_rl.rewards.remote`) and `slime-rl serve-rm`.

A tiny random sequence-classification model is served by `slime-rl serve-rm` (a subprocess); its scores
through HTTP equal a direct call of the same model. Stub servers play the failures: down, slow, 5xx, 4xx,
garbage. Every failure is the sample's failure reward, counted; nothing stops the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from http_stub import StubServer
from rollout.router import free_port
from server_procs import START_TIMEOUT_S, ServerProc, http, post, wait_healthy
from slime_rl.rewards import score_samples
from slime_rl.rewards.config import RemoteRewardConfig
from slime_rl.rewards.remote import RemoteRewardModel
from slime_rl.types import Sample

KEY_ENV = "TEST_REMOTE_RM_KEY"
KEY = "rm-secret-123"
MAX_BATCH = 8
TEXTS = [("What is 2+3? ", "5"), ("Name a color: ", "blue, I think"), ("", "just a response"),
         ("Say hi.\n", "hi"), ("12*4=", "48"), ("Why? ", "Because the sky is blue and the sea reflects it."),
         ("x", "")]


def _samples(pairs=TEXTS, labels=None) -> list[Sample]:
    labels = labels or [None] * len(pairs)
    return [Sample(prompt_ids=[1], group_id=0, index=i, prompt_text=p, response_text=r, label=lab)
            for i, ((p, r), lab) in enumerate(zip(pairs, labels))]


def _model(url: str, **kw) -> RemoteRewardModel:
    kw = {"timeout_s": 5.0, "retries": 0, "backoff_s": 0.01, **kw}
    return RemoteRewardModel(RemoteRewardConfig(url=url, **kw))


# ---- the served model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny random LlamaForSequenceClassification (one logit) with the char tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from slime_rl.tokenizer import CharTokenizer

    tok = CharTokenizer()
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tok.pad_token_id, initializer_range=0.3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config)
    path = tmp_path_factory.mktemp("rm") / "model"
    model.save_pretrained(path)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def rm_server(rm_dir, tmp_path_factory):
    """`slime-rl serve-rm` on a free port, its api key from $SLIME_RL_RM_API_KEY."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("rm_log") / "serve_rm.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIME_RL_RM_API_KEY": KEY}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "slime_rl", "serve-rm", "--model", str(rm_dir), "--port",
                                 str(port), "--max-batch-size", str(MAX_BATCH)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    server = ServerProc("serve-rm", f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_healthy(server, time.monotonic() + START_TIMEOUT_S)
        yield server
    finally:
        server.stop()


def _direct_scores(rm_dir, pairs) -> list[float]:
    """The same model called in this process, one unpadded sequence at a time."""
    from transformers import AutoModelForSequenceClassification

    from slime_rl.tokenizer import CharTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    tok = CharTokenizer.load(rm_dir)
    with torch.no_grad():
        return [float(model(input_ids=torch.tensor([tok.encode(p + r, add_special_tokens=True)])).logits[0, 0])
                for p, r in pairs]


def test_served_scores_equal_a_direct_call(rm_server, rm_dir, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    samples = _samples(labels=[{1, 2}, None, 3.5, "x", ["a"], {"k": 1}, float("nan")])  # labels: any type
    stats = score_samples(samples, _model(rm_server.url + "/score", batch_size=3, api_key_env=KEY_ENV))
    assert stats.errors == 0 and stats.timeouts == 0
    expected = _direct_scores(rm_dir, TEXTS)
    got = [s.scalar_reward for s in samples]
    assert max(expected) - min(expected) > 0.05  # the scores differ between texts: the comparison means something
    assert got == pytest.approx(expected, abs=1e-5, rel=1e-5)


def test_server_refuses_bad_bodies_naming_the_field(rm_server):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = rm_server.url + "/score"
    assert http("GET", rm_server.url + "/health")[0] == 200  # no key needed
    status, body = post(url, {"prompts": ["a"], "responses": ["b"]})
    assert status == 401 and "Bearer" in body["message"]
    status, body = post(url, {"prompts": ["a"], "responses": ["b"]}, headers={"Authorization": "Bearer wrong"})
    assert status == 401
    cases = [
        (None, b"{not json", "malformed JSON"),
        ({"responses": ["b"]}, None, "'prompts'"),
        ({"prompts": ["a", "b"], "responses": ["x", 3]}, None, "responses[1]"),
        ({"prompts": ["a", "b"], "responses": ["x"]}, None, "pair up"),
        ({"prompts": ["a"], "responses": ["b"], "labels": [1, 2]}, None, "'labels'"),
        ({"prompts": [], "responses": []}, None, "empty"),
        ({"prompts": ["a"] * (MAX_BATCH + 1), "responses": ["b"] * (MAX_BATCH + 1)}, None, "--max-batch-size"),
        ({"prompts": ["a"], "responses": ["b"], "extra": 1}, None, "'extra'"),
        ({"prompts": ["caf\u00e9"], "responses": ["b"]}, None, "prompts[0] + responses[0]"),  # not in the alphabet
        ([1, 2], None, "JSON object"),
    ]
    for body, raw, words in cases:
        status, answer = post(url, body, raw=raw, headers=auth)
        assert status == 400, (body, status, answer)
        assert words in answer["message"] and "Traceback" not in answer["message"], (body, answer)
    status, answer = post(url, {"prompts": ["1+1="], "responses": ["2"]}, headers=auth)
    assert status == 200 and len(answer["rewards"]) == 1 and math.isfinite(answer["rewards"][0])


def test_serve_rm_bad_settings_are_one_line(tmp_path, capsys):
    from slime_rl.cli import main

    assert main(["serve-rm", "--model", str(tmp_path)]) == 2
    assert "slime-rl serve-rm: --model" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["serve-rm", "--model", str(tmp_path), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be >= 1" in capsys.readouterr().err
    assert main(["serve-rm", "--model", str(tmp_path)]) == 2  # a config.json that is no checkpoint
    err = capsys.readouterr().err
    assert "--model" in err and "cannot load" in err and "Traceback" not in err


# ---- the client: batching, concurrency, retries ------------------------------------------------


def _lengths(request, stub):
    return 200, {"rewards": [float(len(r)) for r in request.body["responses"]]}


def test_requests_are_batched_and_labels_sent_json_safe(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    samples = _samples(labels=[{1, 2}, 5, None, "s", [1, 2], {"a": 1}, float("inf")])
    with StubServer(_lengths) as stub:
        stats = score_samples(samples, _model(stub.url + "/score", batch_size=3, api_key_env=KEY_ENV), max_workers=4)
    assert stats.errors == 0
    assert [s.scalar_reward for s in samples] == [float(len(r)) for _, r in TEXTS]
    assert sorted(len(r.body["prompts"]) for r in stub.requests) == [1, 3, 3]  # 7 samples, batch_size 3
    assert all(r.path == "/score" and r.headers["Authorization"] == f"Bearer {KEY}" for r in stub.requests)
    labels = [lab for r in sorted(stub.requests, key=lambda r: r.body["prompts"][0] != TEXTS[0][0])
              for lab in r.body["labels"]]
    assert labels[0] == "{1, 2}" and labels[1] == 5 and labels[2] is None and "inf" in map(str, labels)


def test_score_batch_splits_a_large_list_into_batches():
    with StubServer(_lengths) as stub:
        values = _model(stub.url, batch_size=2).score_batch(_samples())
    assert values == [float(len(r)) for _, r in TEXTS] and len(stub.requests) == 4


def test_concurrency_limit_is_shared_by_all_threads():
    """Four worker threads, max_concurrency 2: the stub holds requests until released, sees exactly two."""
    def held(request, stub):
        stub.release.wait(30)
        return _lengths(request, stub)

    samples = _samples(TEXTS[:4])
    with StubServer(held) as stub:
        model = _model(stub.url, batch_size=1, max_concurrency=2)
        runner = threading.Thread(target=score_samples, args=(samples, model), kwargs={"max_workers": 4})
        runner.start()
        assert stub.wait_for(lambda s: s.in_flight == 2, timeout=30)
        assert not stub.wait_for(lambda s: s.in_flight > 2, timeout=0.3)  # the other two wait for a slot
        stub.release.set()
        runner.join(30)
    assert stub.max_in_flight == 2 and len(stub.requests) == 4
    assert [s.scalar_reward for s in samples] == [float(len(r)) for _, r in TEXTS[:4]]


@pytest.mark.parametrize("status", [503, 429, 500])
def test_retries_with_exponential_backoff_then_success(status):
    def flaky(request, stub):
        return (status, {"error": "busy"}) if len(stub.requests) <= 2 else _lengths(request, stub)

    with StubServer(flaky) as stub:
        model = _model(stub.url, retries=3, backoff_s=0.25)
        delays: list[float] = []
        model.poster.sleep = delays.append
        assert model(_samples()[0]) == float(len(TEXTS[0][1]))
    assert len(stub.requests) == 3 and delays == [0.25, 0.5]


def test_backoff_really_waits():
    with StubServer(lambda req, stub: (503, b"busy")) as stub:
        model = _model(stub.url, retries=2, backoff_s=0.1)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="3 attempt"):
            model(_samples()[0])
    assert time.monotonic() - start >= 0.3 and len(stub.requests) == 3


def test_client_errors_are_not_retried():
    with StubServer(lambda req, stub: (400, {"message": "prompts: bad"})) as stub:
        model = _model(stub.url, retries=3, backoff_s=0.01)
        with pytest.raises(RuntimeError, match="HTTP 400.*not retried"):
            model(_samples()[0])
    assert len(stub.requests) == 1


def test_config_needs_a_url_when_remote_rm_is_used():
    from slime_rl.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"reward\.remote\.url must be an http\(s\) URL"):
        build_config(overrides=[("reward.weights", {"task": 1.0, "remote_rm": 0.5})])
    build_config(overrides=[("reward.name", "remote_rm"), ("reward.remote.url", "http://127.0.0.1:8000/score")])
    build_config()  # not used: no URL needed


def test_missing_api_key_env_is_named():
    with pytest.raises(ValueError, match="reward.remote.api_key_env.*NO_SUCH_VAR_XYZ"):
        _model("http://127.0.0.1:1/score", api_key_env="NO_SUCH_VAR_XYZ")
    with pytest.raises(ValueError, match="reward.remote.url"):
        RemoteRewardModel(RemoteRewardConfig())


# ---- failures: failure rewards, counted, the run goes on ----------------------------------------


def _slow(request, stub):
    stub.release.wait(30)  # far past the client's timeout; released when the stub closes
    return _lengths(request, stub)


GARBAGE = {
    "not_json": lambda req, stub: (200, b"<html>oops</html>"),
    "no_rewards": lambda req, stub: (200, {"scores": [1.0]}),
    "not_a_list": lambda req, stub: (200, {"rewards": 1.0}),
    "wrong_length": lambda req, stub: (200, {"rewards": [1.0]}),
    "server_error": lambda req, stub: (500, b"Internal Server Error"),
    "slow": _slow,
}


@pytest.mark.parametrize("kind", ["down", *GARBAGE])
def test_broken_endpoint_gives_failure_rewards_and_counts(kind, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, KEY)
    samples = _samples()
    caplog.set_level(logging.WARNING)
    if kind == "down":
        model = _model(f"http://127.0.0.1:{free_port()}/score", retries=1, api_key_env=KEY_ENV)
        stats = score_samples(samples, model, failure_reward=-1.0)
    else:
        with StubServer(GARBAGE[kind]) as stub:
            model = _model(stub.url, batch_size=4, timeout_s=0.3, retries=1, api_key_env=KEY_ENV)
            stats = score_samples(samples, model, failure_reward=-1.0, timeout_s=10.0)
        assert len(stub.requests) == (4 if kind in ("server_error", "slow") else 2)  # retried only when worth it
    assert stats.errors == len(samples) and stats.timeouts == 0
    assert all(s.reward == {"reward": -1.0, "reward_error": 1.0} for s in samples)
    assert KEY not in caplog.text  # the token never reaches a log line


def test_bad_entries_fail_only_their_sample():
    with StubServer(lambda req, stub: (200, b'{"rewards": [1.5, NaN, "x", null, true, Infinity, 2]}')) as stub:
        samples = _samples()
        stats = score_samples(samples, _model(stub.url, batch_size=8), failure_reward=-1.0)
    assert [s.scalar_reward for s in samples] == [1.5, -1.0, -1.0, -1.0, -1.0, -1.0, 2.0]
    assert stats.errors == 5 and stats.failed_ids == ["0/1", "0/2", "0/3", "0/4", "0/5"]


# ---- end to end: slime-rl train with a weighted remote reward -------------------------------------

TINY_TRAIN = ["--model.hidden_size", "32", "--model.intermediate_size", "64", "--data.task_max_operand", "29",
              "--data.num_train", "32", "--data.num_val", "4", "--data.num_sft", "8", "--rollout.max_new_tokens", "4",
              "--rollout.prompts_per_step", "2", "--rollout.n_samples_per_prompt", "4", "--eval.n_samples", "1",
              "--sft.enabled", "false", "--train.num_steps", "2", "--log.progress", "false", "--log.plot", "false",
              "--log.save_checkpoint", "false", "--reward.weights", '{"task": 1.0, "remote_rm": 0.5}',
              "--reward.remote.retries", "0"]


def _train(tmp_path, url: str, *extra: str) -> list[dict]:
    from slime_rl.cli import main

    out = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--reward.remote.url", url, *extra, "--log.output_dir", str(out)]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_with_a_down_reward_model_finishes_and_counts_errors(tmp_path):
    records = [r for r in _train(tmp_path, f"http://127.0.0.1:{free_port()}/score") if "rollout/reward_mean" in r]
    assert len(records) == 2
    assert records[-1]["reward/errors"] >= 16  # 2 steps x 8 samples, every one failed
    assert all(r["rollout/reward_mean"] == 0.0 for r in records)  # reward.failure_reward


def test_train_with_the_served_reward_model_logs_its_reward(tmp_path, rm_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    records = _train(tmp_path, rm_server.url + "/score", "--reward.remote.api_key_env", KEY_ENV)
    steps = [r for r in records if "rollout/reward_mean" in r]
    assert len(steps) == 2 and all(r["reward/errors"] == 0 for r in steps)
    assert all(math.isfinite(r["rollout/reward/remote_rm"]) and r["rollout/reward/remote_rm"] != 0 for r in steps)
