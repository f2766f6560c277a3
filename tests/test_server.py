"""The SGLang-protocol HTTP server (rollout/server.py) on a tiny Llama with the CharTokenizer.

Most tests run `BackgroundServer` in-process and wrap the engine in
`ObservedEngine`, which lets a test wait until a rid was submitted / produced
tokens / finished (no sleeps as synchronization). One test launches
`python -m slime_rl serve` as a subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from rollout.engine import EmbeddedEngine
from server_procs import http, post, serving, weight_group_with
from slime_rl.buckets import pack_bucket
from slime_rl.hf_io import init_tiny_model, save_hf_checkpoint, tiny_hf_config
from slime_rl.tokenizer import CharTokenizer
from slime_rl.types import GenerateRequest, SampleStatus, SamplingParams

TOK = CharTokenizer()
EOS = TOK.eos_token_id
CTX = 128
KV_TOKENS = 4096  # small KV pools: several engines live at once
LONG = 120  # max_new_tokens of a request that must still be running when aborted / paused
REPO = Path(__file__).resolve().parents[1]
META_KEYS = {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version",
             "weight_versions", "output_weight_versions", "e2e_latency"}


# ---- model, engines, servers ---------------------------------------------------------------


def random_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Weights scaled up so that distributions are peaked (greedy choices are far from ties)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.ones_like(t) if name.endswith("norm.weight") else torch.randn(t.shape, generator=gen) * 0.15)
            for name, t in init_tiny_model(cfg, seed=seed).items()}


@dataclass
class Tiny:
    cfg: dict
    weights: dict[str, torch.Tensor]  # what servers start with
    new_weights: dict[str, torch.Tensor]  # what weight updates push
    model_dir: str


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    cfg = tiny_hf_config(vocab_size=TOK.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                         max_position_embeddings=CTX, eos_token_id=EOS)
    weights = random_weights(cfg, 0)
    model_dir = save_hf_checkpoint(tmp_path_factory.mktemp("tiny"), cfg, weights, TOK)
    return Tiny(cfg, weights, random_weights(cfg, 1), str(model_dir))


def make_engine(tiny: Tiny, weights: dict[str, torch.Tensor] | None = None) -> EmbeddedEngine:
    return EmbeddedEngine(tiny.cfg, weights if weights is not None else tiny.weights, seed=0,
                          max_total_tokens=KV_TOKENS, tokenizer=TOK)


@pytest.fixture(scope="module")
def reference(tiny):
    engine = make_engine(tiny)
    yield engine
    engine.close()


class ObservedEngine:
    """Delegates to an engine; records per rid: submitted, tokens so far, final output."""

    def __init__(self, engine: EmbeddedEngine):
        self._engine = engine
        self._cv = threading.Condition()
        self.tokens: dict[str, int] = {}
        self.finals: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def submit(self, request: GenerateRequest, on_update=None):
        def hook(out):
            with self._cv:
                self.tokens[request.rid] = len(out.output_ids)
                if out.finish_reason is not None:
                    self.finals[request.rid] = out
                self._cv.notify_all()
            if on_update is not None:
                on_update(out)

        handle = self._engine.submit(request, hook)
        with self._cv:
            self.tokens.setdefault(request.rid, 0)
            self._cv.notify_all()
        return handle

    def wait_for(self, predicate, timeout: float = 60.0) -> None:
        with self._cv:
            assert self._cv.wait_for(predicate, timeout), "engine condition not reached in time"


@contextlib.contextmanager
def serve(tiny: Tiny, tokenizer: Any = TOK, **app_kwargs):
    engine = ObservedEngine(make_engine(tiny))
    with serving(engine, tokenizer, model_path=tiny.model_dir, **app_kwargs) as url:
        yield engine, url


@pytest.fixture
def served(tiny):
    with serve(tiny) as pair:
        yield pair


# ---- HTTP helpers ------------------------------------------------------------------------------


def events(raw: str) -> list[dict]:
    """SSE `data:` payloads of a complete stream (which must end with [DONE])."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    chunks = [c for c in raw.split("\n\n") if c]
    assert all(c.startswith("data: ") for c in chunks)
    return [json.loads(c[len("data: "):]) for c in chunks[:-1]]


def greedy(max_new: int, **extra) -> dict:
    return {"max_new_tokens": max_new, "temperature": 0, **extra}


def ref_generate(engine: EmbeddedEngine, ids: list[int], max_new: int, top: int = 0, **sampling):
    """What the server should produce for a greedy request (it adds EOS to the stop ids)."""
    sampling = {"temperature": 0.0, "max_new_tokens": max_new, "stop_token_ids": [EOS], **sampling}
    return engine.generate([GenerateRequest(list(ids), SamplingParams(**sampling), logprob_start_len=0,
                                            top_logprobs_num=top)])[0]


def assert_logprobs_match(meta: dict, ref, tol: float = 1e-5) -> None:
    out_lp = [t[0] for t in meta["output_token_logprobs"]]
    assert out_lp == pytest.approx(ref.output_logprobs, abs=tol)
    in_lp = [t[0] for t in meta["input_token_logprobs"]]
    assert in_lp[0] is None and ref.input_logprobs[0] is None
    assert in_lp[1:] == pytest.approx(ref.input_logprobs[1:], abs=tol)


def payload_b64(obj: Any) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode()


async def apost(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body) as resp:
        text = await resp.text()
        if resp.content_type == "application/json":
            return resp.status, json.loads(text)
        return resp.status, text


# ---- /generate shapes and parity -------------------------------------------------------------


def test_generate_single_prompt_shape_and_engine_parity(served, reference):
    engine, url = served
    # Router-added top-level fields are ignored.
    body = {"text": "12+34=", "sampling_params": greedy(8), "return_logprob": True, "logprob_start_len": 0,
            "top_logprobs_num": 2, "return_text_in_logprobs": True, "model": None, "log_metrics": True,
            "background": False, "data_parallel_rank": None, "rid": "one"}
    status, res = post(url + "/generate", body)
    assert status == 200 and isinstance(res, dict), res
    assert set(res) == {"text", "output_ids", "meta_info"}
    meta = res["meta_info"]
    assert set(meta) == META_KEYS | {"output_token_logprobs", "input_token_logprobs", "output_top_logprobs",
                            "input_top_logprobs"}
    prompt = TOK.encode("12+34=", add_special_tokens=True)
    ref = ref_generate(reference, prompt, 8, top=2)
    ids = res["output_ids"]
    assert ids == ref.output_ids
    assert meta["id"] == "one"
    if ref.finish_reason == SampleStatus.COMPLETED:
        assert meta["finish_reason"] == {"type": "stop", "matched": EOS}
        assert res["text"] == TOK.decode(ids[:-1])
    else:
        assert meta["finish_reason"] == {"type": "length", "length": 8}
        assert res["text"] == TOK.decode(ids)
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (len(prompt), len(ids))
    assert meta["weight_version"] == "0" and meta["output_weight_versions"] == [0] * len(ids)
    assert isinstance(meta["e2e_latency"], float) and isinstance(meta["cached_tokens"], int)
    assert [t[1:] for t in meta["output_token_logprobs"]] == [[t, TOK.decode([t], False)] for t in ids]
    assert [t[1:] for t in meta["input_token_logprobs"]] == [[t, TOK.decode([t], False)] for t in prompt]
    assert_logprobs_match(meta, ref)
    tops = meta["output_top_logprobs"]
    assert len(tops) == len(ids) and all(len(pos) == 2 for pos in tops)
    for pos, chosen in zip(tops, ids):
        assert pos[0][1] == chosen and pos[0][0] >= pos[1][0]  # greedy picks the top token
        assert pos[0][2] == TOK.decode([chosen], False)


def test_batch_matches_single_requests_under_fixed_seed(served):
    _, url = served
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    sampling = {"max_new_tokens": 10, "temperature": 1.0, "sampling_seed": 7, "ignore_eos": True}
    status, batch = post(url + "/generate", {"input_ids": prompts, "sampling_params": sampling, "rid": "job",
                                             "return_logprob": True})
    assert status == 200 and isinstance(batch, list) and len(batch) == 3
    assert [r["meta_info"]["id"] for r in batch] == ["job_0", "job_1", "job_2"]
    for prompt, res in zip(prompts, batch):
        status, single = post(url + "/generate", {"input_ids": prompt, "sampling_params": sampling,
                                                  "return_logprob": True})
        assert status == 200 and isinstance(single, dict)
        assert single["output_ids"] == res["output_ids"] and len(res["output_ids"]) == 10
        assert [t[0] for t in single["meta_info"]["output_token_logprobs"]] == pytest.approx(
            [t[0] for t in res["meta_info"]["output_token_logprobs"]], abs=1e-5)
    status, listed = post(url + "/generate", {"input_ids": prompts[:2], "rid": ["a", "b"], "sampling_params": [
        greedy(2), greedy(3)]})
    assert [r["meta_info"]["id"] for r in listed] == ["a", "b"]
    assert len(listed[0]["output_ids"]) <= 2 and len(listed[1]["output_ids"]) <= 3  # per-item sampling_params


def test_n_samples_are_grouped_by_prompt_with_fresh_rids_and_seeds_s_plus_j(served):
    _, url = served
    prompts = [[5, 6, 7], [20, 21]]
    sampling = {"max_new_tokens": 8, "temperature": 1.0, "sampling_seed": 100, "ignore_eos": True}
    status, res = post(url + "/generate", {"input_ids": prompts, "rid": "grp", "sampling_params": {**sampling, "n": 2}})
    assert status == 200 and isinstance(res, list) and len(res) == 4
    rids = [r["meta_info"]["id"] for r in res]
    assert len(set(rids)) == 4 and not any(r.startswith("grp") for r in rids)
    for k, r in enumerate(res):  # prompt0 x 2, prompt1 x 2; copy j samples with seed 100 + j
        prompt, j = prompts[k // 2], k % 2
        _, single = post(url + "/generate", {"input_ids": prompt, "sampling_params": {**sampling,
                                                                                      "sampling_seed": 100 + j}})
        assert r["output_ids"] == single["output_ids"]
    assert res[0]["output_ids"] != res[1]["output_ids"]  # the samples of a group differ
    status, one_prompt = post(url + "/generate", {"text": "ab", "sampling_params": {**sampling, "n": 3}})
    assert status == 200 and isinstance(one_prompt, list) and len(one_prompt) == 3


def test_stop_token_stop_string_and_length(served):
    _, url = served
    _, base = post(url + "/generate", {"input_ids": [30, 31, 32], "sampling_params": greedy(12, ignore_eos=True)})
    ids = base["output_ids"]
    assert base["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    printable = [t for t in ids if t > EOS]
    assert printable, ids
    stop = printable[-1]
    k = ids.index(stop)
    body = {"input_ids": [30, 31, 32], "sampling_params": greedy(12, ignore_eos=True, stop_token_ids=[stop])}
    _, res = post(url + "/generate", body)
    assert res["output_ids"] == ids[: k + 1]
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert res["text"] == TOK.decode(ids[:k])  # the stop token is trimmed from the text ...
    body["sampling_params"]["no_stop_trim"] = True
    assert post(url + "/generate", body)[1]["text"] == TOK.decode(ids[: k + 1])  # ... unless no_stop_trim
    stop_str = TOK.decode([stop])
    body = {"input_ids": [30, 31, 32], "sampling_params": greedy(12, ignore_eos=True, stop=stop_str)}
    _, res = post(url + "/generate", body)
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_str}
    assert res["output_ids"] == ids[: k + 1] and res["text"] == TOK.decode(ids[:k])
    body["sampling_params"]["no_stop_trim"] = True
    assert post(url + "/generate", body)[1]["text"] == TOK.decode(ids[: k + 1])


def test_cached_tokens_on_a_repeated_prompt_and_after_flush(served):
    _, url = served
    body = {"input_ids": list(range(10, 50)), "sampling_params": greedy(2, ignore_eos=True)}
    first = post(url + "/generate", body)[1]["meta_info"]
    second = post(url + "/generate", body)[1]["meta_info"]
    assert first["cached_tokens"] == 0
    assert 0 < second["cached_tokens"] < second["prompt_tokens"] == 40
    assert post(url + "/flush_cache")[0] == 200
    assert post(url + "/generate", body)[1]["meta_info"]["cached_tokens"] == 0


# ---- streaming ---------------------------------------------------------------------------------


def test_streaming_chunks_are_cumulative_and_end_with_done(served):
    engine, url = served
    body = {"input_ids": [40, 41, 42], "sampling_params": greedy(10, ignore_eos=True), "return_logprob": True}
    _, plain = post(url + "/generate", body)
    status, raw = post(url + "/generate", {**body, "stream": True})
    assert status == 200
    chunks = events(raw)
    assert len(chunks) >= 2 and all("index" not in c for c in chunks)
    for prev, cur in zip(chunks, chunks[1:]):
        assert cur["output_ids"][: len(prev["output_ids"])] == prev["output_ids"]
        assert cur["text"].startswith(prev["text"])
        assert len(cur["meta_info"]["output_token_logprobs"]) == len(cur["output_ids"])
    assert all(c["meta_info"]["finish_reason"] is None and "e2e_latency" not in c["meta_info"] for c in chunks[:-1])
    last = chunks[-1]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
    assert last["output_ids"] == plain["output_ids"] and last["text"] == plain["text"]
    assert "e2e_latency" in last["meta_info"]

    body = {"input_ids": [[40, 41], [50, 51]], "sampling_params": greedy(6, ignore_eos=True)}
    _, batch = post(url + "/generate", body)
    status, raw = post(url + "/generate", {**body, "stream": True})
    finals = {c["index"]: c for c in events(raw) if c["meta_info"]["finish_reason"] is not None}
    assert sorted(finals) == [0, 1]
    assert [finals[i]["output_ids"] for i in (0, 1)] == [r["output_ids"] for r in batch]


# ---- abort, disconnect, pause + weight update -------------------------------------------------


def test_abort_by_rid_returns_partial_output_while_another_request_completes(served):
    engine, url = served

    async def main():
        async with aiohttp.ClientSession() as session:
            long = asyncio.create_task(apost(session, url + "/generate", {
                "input_ids": [5, 6, 7], "rid": "long",
                "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True}}))
            await asyncio.to_thread(engine.wait_for, lambda: engine.tokens.get("long", 0) >= 1)
            short, aborted = await asyncio.gather(
                apost(session, url + "/generate", {"input_ids": [8, 9], "sampling_params": greedy(5, ignore_eos=True)}),
                apost(session, url + "/abort_request", {"rid": "long"}))
            return await long, short, aborted

    (status, long), (short_status, short), (abort_status, _) = asyncio.run(main())
    assert (status, short_status, abort_status) == (200, 200, 200)
    reason = long["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and isinstance(reason["message"], str)
    assert reason["status_code"] is None and reason["err_type"] is None
    assert 1 <= len(long["output_ids"]) < LONG
    assert short["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert post(url + "/abort_request", {"rid": "no-such-rid"})[0] == 200  # unknown rids are ignored


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_the_request(served, stream):
    engine, url = served
    rid = f"gone-{stream}"

    async def main():
        async with aiohttp.ClientSession() as session:
            body = {"input_ids": [5, 6, 7], "rid": rid, "stream": stream,
                    "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True}}
            task = asyncio.create_task(apost(session, url + "/generate", body))
            await asyncio.to_thread(engine.wait_for, lambda: engine.tokens.get(rid, 0) >= 1)
            task.cancel()  # closes the connection
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())
    engine.wait_for(lambda: rid in engine.finals)
    assert engine.finals[rid].finish_reason == SampleStatus.ABORTED
    assert len(engine.finals[rid].output_ids) < LONG


def tensor_update_body(tiny: Tiny, load_format: str | None, version: Any) -> dict:
    pairs = sorted(tiny.new_weights.items())
    if load_format == "flattened_bucket":
        bucket = pack_bucket(pairs)
        obj: Any = {"flattened_tensor": bucket.buffer, "metadata": [
            {"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "offset": e.offset} for e in bucket.entries]}
    else:
        obj = pairs
    return {"serialized_named_tensors": [payload_b64(obj)], "load_format": load_format, "weight_version": version,
            "flush_cache": True}


def assert_serves_weights(url: str, tiny: Tiny, weights: dict, version: str) -> None:
    """A greedy request with logprobs matches a freshly built engine on `weights`."""
    prompt = [33, 34, 35, 36]
    _, res = post(url + "/generate", {"input_ids": prompt, "sampling_params": greedy(8), "return_logprob": True,
                                      "logprob_start_len": 0})
    fresh = make_engine(tiny, weights)
    try:
        ref = ref_generate(fresh, prompt, 8)
    finally:
        fresh.close()
    assert res["output_ids"] == ref.output_ids
    assert res["meta_info"]["weight_version"] == version
    assert_logprobs_match(res["meta_info"], ref)


@pytest.mark.parametrize("load_format", [None, "flattened_bucket"])
def test_pause_in_place_update_from_tensor_continue(served, tiny, load_format):
    engine, url = served

    async def main():
        async with aiohttp.ClientSession() as session:
            stream = asyncio.create_task(apost(session, url + "/generate", {
                "input_ids": [5, 6, 7], "rid": "partial", "stream": True,
                "sampling_params": greedy(LONG, ignore_eos=True)}))
            await asyncio.to_thread(engine.wait_for, lambda: engine.tokens.get("partial", 0) >= 1)
            paused = await apost(session, url + "/pause_generation", {"mode": "in_place"})
            updated = await apost(session, url + "/update_weights_from_tensor",
                                  tensor_update_body(tiny, load_format, "1"))
            continued = await apost(session, url + "/continue_generation", {})
            return paused, updated, continued, await stream

    paused, updated, continued, (status, raw) = asyncio.run(main())
    assert paused == (200, {"message": "Generation paused successfully.", "status": "ok"})
    assert updated[0] == 200 and updated[1]["success"] is True and "1" in updated[1]["message"]
    assert continued == (200, {"message": "Generation continued successfully.", "status": "ok"})
    final = events(raw)[-1]["meta_info"]
    versions = final["output_weight_versions"]
    assert final["finish_reason"]["type"] == "length" and final["weight_version"] == "1"
    assert versions[0] == 0 and versions[-1] == 1 and versions == sorted(versions)  # tokens after the update: v1
    assert_serves_weights(url, tiny, tiny.new_weights, "1")


def test_update_weights_from_disk(served, tiny, tmp_path):
    _, url = served
    status, res = post(url + "/update_weights_from_disk", {"model_path": str(tmp_path / "missing")})
    assert status == 400 and res["success"] is False and "missing" in res["message"]
    status, res = post(url + "/update_weights_from_disk", {"model_path": tiny.model_dir, "weight_version": ["v5"]})
    assert status == 400 and res["success"] is False and "weight_version" in res["message"]
    assert http("GET", url + "/get_weight_version")[1] == {"weight_version": "0"}  # failures change nothing
    new_dir = save_hf_checkpoint(tmp_path / "new", tiny.cfg, tiny.new_weights, TOK)
    status, res = post(url + "/update_weights_from_disk", {"model_path": str(new_dir), "weight_version": 5})
    assert status == 200 and res["success"] is True and res["message"].endswith("Weight version updated to 5.")
    info = http("GET", url + "/get_model_info")[1]
    assert info["weight_version"] == "5" and info["model_path"] == str(new_dir)  # names what is served now
    assert_serves_weights(url, tiny, tiny.new_weights, "5")


def test_update_weights_from_distributed(served, tiny):
    """The test process is rank 0 of a gloo group with the server (rank 1)."""
    _, url = served
    with weight_group_with(url, post) as (group, call, results):
        names = sorted(tiny.new_weights)
        meta = {"names": names, "dtypes": ["float32"] * len(names), "group_name": "g",
                "shapes": [list(tiny.new_weights[n].shape) for n in names]}
        thread = call("/update_weights_from_distributed", {**meta, "weight_version": "2"})
        for name in names:  # one broadcast per tensor, in order
            group.broadcast(tiny.new_weights[name].clone(), src=0)
        thread.join(60)
        assert results["/update_weights_from_distributed"][1]["success"] is True, results
        assert_serves_weights(url, tiny, tiny.new_weights, "2")

        bucket = pack_bucket([(n, tiny.weights[n]) for n in names])  # back to the original weights, one buffer
        thread = call("/update_weights_from_distributed",
                      {**meta, "weight_version": 3, "load_format": "flattened_bucket"})
        group.broadcast(bucket.buffer, src=0)
        thread.join(60)
        assert results["/update_weights_from_distributed"][1]["success"] is True, results
        assert_serves_weights(url, tiny, tiny.weights, "3")

        status, res = post(url + "/update_weights_from_distributed", {**meta, "group_name": "nope"})
        assert status == 400 and "nope" in res["message"]
        assert post(url + "/destroy_weights_update_group", {"group_name": "g"})[1]["success"] is True
        assert post(url + "/destroy_weights_update_group", {"group_name": "g"})[0] == 400


def test_flush_cache_refused_while_a_request_waits(served):
    engine, url = served
    assert post(url + "/pause_generation", {"mode": "in_place"})[0] == 200
    result = {}
    thread = threading.Thread(target=lambda: result.update(res=post(url + "/generate", {
        "input_ids": [5, 6], "rid": "queued", "sampling_params": greedy(3)})))
    thread.start()
    try:
        engine.wait_for(lambda: "queued" in engine.tokens)
        status, text = post(url + "/flush_cache")
        assert status == 400 and "not flushed" in text
        assert http("GET", url + "/flush_cache")[0] == 400
    finally:
        post(url + "/continue_generation")
        thread.join(60)
    assert result["res"][0] == 200
    status, text = post(url + "/flush_cache")
    assert status == 200 and text.startswith("Cache flushed.")
    assert http("GET", url + "/flush_cache")[0] == 200


# ---- OpenAI-compatible -------------------------------------------------------------------------


def test_openai_completions(served, tiny):
    _, url = served
    _, native = post(url + "/generate", {"text": "7+8=", "sampling_params": greedy(6), "return_logprob": True})
    status, res = post(url + "/v1/completions", {"model": "x", "prompt": "7+8=", "max_tokens": 6, "temperature": 0,
                                                "logprobs": 2})
    assert status == 200
    assert res["id"].startswith("cmpl-") and res["object"] == "text_completion" and res["model"] == "x"
    choice = res["choices"][0]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason", "matched_stop"}
    assert choice["text"] == native["text"]
    assert choice["finish_reason"] == {"length": "length", "stop": "stop"}[native["meta_info"]["finish_reason"]["type"]]
    lp = choice["logprobs"]
    assert lp["tokens"] == [TOK.decode([t], False) for t in native["output_ids"]]
    assert lp["token_logprobs"] == pytest.approx([t[0] for t in native["meta_info"]["output_token_logprobs"]], abs=1e-5)
    assert len(lp["text_offset"]) == len(lp["top_logprobs"]) == len(native["output_ids"])
    assert all(len(top) <= 2 for top in lp["top_logprobs"])
    usage = res["usage"]
    assert usage["completion_tokens"] == len(native["output_ids"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    status, res = post(url + "/v1/completions", {"model": "x", "prompt": ["1+", "2+3"], "n": 2, "max_tokens": 3,
                                                "seed": 4})
    assert status == 200 and [c["index"] for c in res["choices"]] == [0, 1, 2, 3]
    assert res["usage"]["prompt_tokens"] == len(TOK.encode("1+", True)) + len(TOK.encode("2+3", True))
    # (echo works: test_sampling_knobs)
    assert post(url + "/v1/completions", {"model": "x", "prompt": "1", "suffix": "x"})[0] == 400


def test_openai_chat_completions_and_models(served, tiny):
    _, url = served
    messages = [{"role": "system", "content": "be terse"},
                {"role": "user", "content": [{"type": "text", "text": "2+2"}]}]
    flat = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "2+2"}]
    prompt = TOK.encode(TOK.apply_chat_template(flat), add_special_tokens=False)
    _, native = post(url + "/generate", {"input_ids": prompt, "sampling_params": greedy(5)})
    body = {"model": "m", "messages": messages, "max_tokens": 50, "max_completion_tokens": 5, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    status, res = post(url + "/v1/chat/completions", body)
    assert status == 200 and res["object"] == "chat.completion" and res["id"].startswith("chatcmpl-")
    choice = res["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == native["text"]
    content = choice["logprobs"]["content"]
    assert len(content) == res["usage"]["completion_tokens"] == len(native["output_ids"]) <= 5
    assert all(set(c) == {"token", "bytes", "logprob", "top_logprobs"} and len(c["top_logprobs"]) == 2
               for c in content)
    assert [c["token"] for c in content] == [TOK.decode([t], False) for t in native["output_ids"]]

    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    status, raw = post(url + "/v1/chat/completions", stream_body)
    chunks = events(raw)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == native["text"]
    assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == res["usage"]

    assert post(url + "/v1/chat/completions", {**body, "tools": [{"type": "function"}]})[0] == 400
    status, models = http("GET", url + "/v1/models")
    assert status == 200 and models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == tiny.model_dir and card["object"] == "model" and card["max_model_len"] == CTX
    assert http("GET", url + "/v1/models" + tiny.model_dir)[1] == card
    assert http("GET", url + "/v1/models/nope")[0] == 404


# ---- errors ------------------------------------------------------------------------------------

BAD = [
    ("malformed json", b"{not json", "malformed JSON"),
    ("not an object", ["a"], "JSON object"),
    ("text and input_ids", {"text": "a", "input_ids": [5]}, "exactly one of text and input_ids"),
    ("neither", {"sampling_params": {}}, "exactly one of text and input_ids"),
    ("empty input_ids", {"input_ids": []}, "input_ids"),
    ("unknown sampling key", {"input_ids": [5], "sampling_params": {"seed": 3}}, "'seed'"),
    ("negative max_new_tokens", {"input_ids": [5], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ("wrong type", {"input_ids": [5], "sampling_params": {"temperature": "hot"}}, "temperature"),
    ("bool as int", {"input_ids": [5], "sampling_params": {"top_k": True}}, "top_k"),
    ("unsupported", {"input_ids": [5], "sampling_params": {"regex": "a+"}}, "not supported"),
    ("rid list length", {"input_ids": [[5], [6]], "rid": ["a"]}, "rid"),
    ("logprob_start_len", {"input_ids": [5, 6], "return_logprob": True, "logprob_start_len": 2}, "logprob_start_len"),
    ("stream wrong type", {"input_ids": [5], "stream": "yes"}, "stream"),
]


@pytest.mark.parametrize("name,body,needle", BAD, ids=[b[0] for b in BAD])
def test_malformed_requests_are_400_with_sglang_error_body(served, name, body, needle):
    _, url = served
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, res = post(url + "/generate", raw=raw)
    assert status == 400
    assert res["object"] == "error" and res["code"] == 400 and res["type"] == "Bad Request"
    assert needle in res["message"]


def test_engine_rejections_are_400_error_message_and_the_server_survives(served):
    engine, url = served
    status, res = post(url + "/generate", {"input_ids": list(range(3, 3 + 130))})
    assert status == 400 and "130" in res["error"]["message"] and "128" in res["error"]["message"]
    status, res = post(url + "/generate", {"input_ids": [5, 999]})
    assert status == 400 and "999" in res["error"]["message"]
    engine.load = lambda: 1 / 0  # an unexpected failure inside a handler
    status, res = http("GET", url + "/get_load")
    assert status == 500 and "see the server log" in res["message"]
    assert "ZeroDivisionError" not in res["message"] and "division" not in res["message"]  # no internals leak
    del engine.load
    assert http("GET", url + "/get_load")[0] == 200
    assert http("GET", url + "/health")[0] == 200
    assert post(url + "/generate", {"input_ids": [5], "sampling_params": greedy(1)})[0] == 200


def test_text_prompts_need_a_tokenizer(tiny):
    with serve(tiny, tokenizer=None) as (_, url):
        status, res = post(url + "/generate", {"text": "abc"})
        assert status == 400 and "tokenizer" in res["message"]
        status, res = post(url + "/generate", {"input_ids": [5, 6], "sampling_params": greedy(2)})
        assert status == 200 and res["text"] == "" and len(res["output_ids"]) == 2  # no EOS without a tokenizer
        assert post(url + "/v1/completions", {"model": "m", "prompt": [5, 6]})[0] == 400


# ---- API key, control, info ---------------------------------------------------------------------


def test_api_key_guards_state_changing_endpoints(tiny):
    key = "s3cret"
    with serve(tiny, api_key=key) as (engine, url):
        guarded = [("/pause_generation", {"mode": "in_place"}), ("/continue_generation", {}), ("/flush_cache", None),
                   ("/abort_request", {"abort_all": True}), ("/update_weight_version", {"new_version": "3"}),
                   ("/update_weights_from_disk", {"model_path": tiny.model_dir, "weight_version": 4})]
        for path, body in guarded:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
                status, res = post(url + path, body, headers=headers)
                assert status == 401 and res["code"] == 401 and path in res["message"], (path, headers)
        assert not engine.is_paused() and engine.get_weight_version() == 0  # nothing happened
        for path, body in guarded:
            assert post(url + path, body, headers={"Authorization": f"Bearer {key}"})[0] == 200, path
        assert engine.get_weight_version() == 4 and not engine.is_paused()
        # With a key, every route but /health needs it (as SGLang).
        for path in ("/generate", "/v1/completions"):
            status, res = post(url + path, {"input_ids": [5], "prompt": "5", "sampling_params": greedy(1)})
            assert status == 401 and path in res["message"], path
        auth = {"Authorization": f"Bearer {key}"}
        status, res = post(url + "/generate", {"input_ids": [5], "sampling_params": greedy(1)}, headers=auth)
        assert status == 200 and res["meta_info"]["weight_version"] == "4"
        assert http("GET", url + "/get_model_info")[0] == 401
        assert http("GET", url + "/health")[0] == 200 and http("GET", url + "/get_model_info", headers=auth)[0] == 200


def test_info_health_and_version_endpoints(served, tiny):
    engine, url = served
    assert http("GET", url + "/health") == (200, "")
    assert http("GET", url + "/health_generate") == (200, "")
    status, info = http("GET", url + "/model_info")
    assert status == 200 and info == http("GET", url + "/get_model_info")[1]
    assert info["model_path"] == tiny.model_dir and info["weight_version"] == "0" and info["is_generation"] is True
    assert info["model_type"] == "llama" and info["architectures"] == ["LlamaForCausalLM"]
    status, server = http("GET", url + "/server_info")
    assert status == 200 and server == http("GET", url + "/get_server_info")[1]
    for key in ("model_path", "tokenizer_path", "served_model_name", "tp_size", "dp_size", "max_total_num_tokens",
                "max_running_requests", "page_size", "enable_prefix_cache", "weight_version", "version"):
        assert key in server, key
    assert server["dp_size"] == 1 and server["max_total_num_tokens"] == KV_TOKENS
    assert server["internal_states"][0]["num_running_reqs"] == 0 and "cached_tokens" in server["internal_states"][0]
    status, load = http("GET", url + "/get_load")
    assert status == 200 and load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
    for path in ("/release_memory_occupation", "/resume_memory_occupation"):
        assert post(url + path, {"tags": None}) == (200, None)
    status, res = post(url + "/update_weight_version", {"new_version": 4})
    assert status == 200 and res["success"] is True and res["new_version"] == "4"
    assert http("GET", url + "/get_weight_version")[1] == {"weight_version": "4"}
    _, res = post(url + "/generate", {"input_ids": [5], "sampling_params": greedy(1)})
    assert res["meta_info"]["weight_version"] == "4"
    status, res = post(url + "/pause_generation", {"mode": "sideways"})
    assert status == 400 and "sideways" in res["message"]
    assert post(url + "/pause_generation")[0] == 200 and engine.is_paused()  # no body: mode "abort"
    assert post(url + "/continue_generation")[0] == 200 and not engine.is_paused()
    engine.close()
    assert http("GET", url + "/health")[0] == 503


# ---- the `slime-rl serve` process -------------------------------------------------------------


def test_serve_subprocess(tiny):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "slime_rl", "serve", "--model", tiny.model_dir, "--port", "0",
           "--max-total-tokens", str(KV_TOKENS)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        seen = []
        while True:
            line = lines.get(timeout=60)
            seen.append(line)
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+) \(model (\S+), (\d+) parameters", line)
            if match:
                break
        url = match.group(1)
        assert match.group(2).rstrip(",") == tiny.model_dir and int(match.group(3)) > 0
        assert http("GET", url + "/health")[0] == 200
        assert http("GET", url + "/get_model_info")[1]["model_path"] == tiny.model_dir
        status, res = post(url + "/generate", {"text": "1+1=", "sampling_params": greedy(4)})
        assert status == 200 and res["meta_info"]["completion_tokens"] <= 4 and isinstance(res["text"], str)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    bad = subprocess.run([sys.executable, "-m", "slime_rl", "serve", "--model", str(Path(tiny.model_dir) / "nope")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--model" in bad.stderr and "not a directory" in bad.stderr


def test_string_weight_versions_keep_integer_ordinals_and_report_spans(served, tiny):
    """SGLang's versions are strings ("endpoint-v1"); tokens keep integer ordinals for staleness arithmetic."""
    engine, url = served
    gen = {"input_ids": [5, 6], "sampling_params": greedy(3, ignore_eos=True)}
    _, before = post(url + "/generate", gen)
    assert before["meta_info"]["weight_versions"] == [{"version": "0", "start": 0, "end": 3}]
    for label, ordinal in (("endpoint-v1", 1), ("7", 7), ("endpoint-v2", 8), ("endpoint-v1", 1)):
        status, res = post(url + "/update_weight_version", {"new_version": label})
        assert status == 200 and res["new_version"] == label and engine.get_weight_version() == ordinal
        assert http("GET", url + "/get_model_info")[1]["weight_version"] == label
        _, out = post(url + "/generate", gen)
        meta = out["meta_info"]
        assert meta["weight_version"] == label and meta["output_weight_versions"] == [ordinal] * 3
        assert meta["weight_versions"] == [{"version": label, "start": 0, "end": 3}]
    status, res = post(url + "/update_weights_from_disk", {"model_path": tiny.model_dir, "weight_version": "disk-v3"})
    assert status == 200 and res["message"].endswith("Weight version updated to disk-v3.")
    assert engine.get_weight_version() == 9
    assert http("GET", url + "/get_weight_version")[1] == {"weight_version": "disk-v3"}
    for bad in ("", " ", "x" * 300, 10**20, True):
        status, res = post(url + "/update_weight_version", {"new_version": bad})
        assert status == 400 and "new_version" in res["message"], bad


def test_v1_loads_reports_idle_after_abort_all(served):
    """slime polls GET /v1/loads?include=core after abort_request{abort_all} until the worker is idle."""
    engine, url = served

    async def main():
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(apost(session, url + "/generate",
                                             {"input_ids": [5], "sampling_params": greedy(LONG, ignore_eos=True)}))
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: engine.wait_for(lambda: any(n > 0 for n in engine.tokens.values())))
            async with session.get(url + "/v1/loads?include=core") as resp:
                busy = await resp.json()
            await apost(session, url + "/abort_request", {"abort_all": True})
            await task
            async with session.get(url + "/v1/loads", params={"include": "core,memory"}) as resp:
                idle = await resp.json()
            return busy, idle

    busy, idle = asyncio.run(main())
    assert busy["dp_rank_count"] == 1 and len(busy["loads"]) == 1
    snap = busy["loads"][0]
    assert snap["dp_rank"] == 0 and snap["num_running_reqs"] + snap["num_waiting_reqs"] == 1
    assert snap["max_total_num_tokens"] == KV_TOKENS and 0 <= snap["token_usage"] <= 1 and "memory" not in snap
    snap = idle["loads"][0]
    assert snap["num_running_reqs"] == snap["num_waiting_reqs"] == 0 and snap["memory"]["kv_cache_released"] is False
    assert http("GET", url + "/v1/loads?dp_rank=1")[1]["loads"] == []
    for query in ("include=everything", "dp_rank=-1", "dp_rank=x"):
        status, res = http("GET", url + "/v1/loads?" + query)
        assert status == 400 and "/v1/loads" in res["message"], query
