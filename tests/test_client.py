"""EngineClient: against the real embedded server (tiny model) and against small aiohttp stubs.

Embedded server: parity with the in-process engine, response mapping,
streaming, abort, pause / weight update / continue, flush, health.
Stubs: retries (connection refused, 503), no retry on 4xx, timeouts, the
concurrency bound, auth / routing headers, control fan-out, payload formats.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import threading
from typing import Any, Awaitable, Callable

import pytest
import torch
from aiohttp import web

from rollout.client import EngineClient, EngineError
from rollout.wire import generate_payload, parse_generate_response
from server_procs import serving as serving_engine
from slime_rl.buckets import pack_bucket, unpack_bucket
from slime_rl.protocols import RolloutEngine
from slime_rl.types import BucketEntry, GenerateRequest, SampleStatus, SamplingParams, WeightBucket

FAST = dict(backoff_s=0.001, max_backoff_s=0.002)  # retries without waiting in tests


def req(ids, rid=None, **sampling) -> GenerateRequest:
    return GenerateRequest(list(ids), SamplingParams(**sampling), rid=rid)


def sglang_result(rid: str, ids: list[int], finish: dict | None, version: str = "3", **meta) -> dict[str, Any]:
    """A /generate result shaped like real SGLang's (logprob triples, string weight_version)."""
    return {
        "text": "", "output_ids": ids,
        "meta_info": {"id": rid, "finish_reason": finish, "prompt_tokens": 4, "completion_tokens": len(ids),
                      "cached_tokens": 2, "weight_version": version, "e2e_latency": 0.25,
                      "output_token_logprobs": [[-0.5 - i, t, None] for i, t in enumerate(ids)], **meta},
    }


# ---- stub servers ---------------------------------------------------------------------------


class Stub:
    """An aiohttp app on 127.0.0.1 that records what it receives and answers via `handler`."""

    def __init__(self, handler: Callable[["Stub", web.Request, Any], Awaitable[web.StreamResponse]] | None = None):
        self.handler = handler or ok_handler
        self.calls: list[tuple[str, Any, dict[str, str]]] = []  # (path, json body, headers)
        self.in_flight = self.max_in_flight = 0
        self.release = asyncio.Event()  # set at teardown so blocked handlers return
        self.url = ""

    def count(self, path: str) -> int:
        return sum(1 for p, _, _ in self.calls if p == path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.calls.append((request.path, body, dict(request.headers)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.handler(self, request, body)
        finally:
            self.in_flight -= 1

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app


async def ok_handler(stub: Stub, request: web.Request, body: Any) -> web.StreamResponse:
    if request.path == "/generate":
        return web.json_response(sglang_result(body["rid"], [5, 6], {"type": "length", "length": 2}))
    if request.path.startswith("/update_weights") or request.path.endswith("weights_update_group"):
        return web.json_response({"success": True, "message": "ok"})
    if request.path in ("/model_info", "/get_model_info"):
        return web.json_response({"model_path": "m", "weight_version": "4"})
    return web.json_response({"status": "ok"})


@contextlib.asynccontextmanager
async def serving(stub: Stub, sock: socket.socket | None = None):
    runner = web.AppRunner(stub.app(), shutdown_timeout=0.5)
    await runner.setup()
    site = web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, "127.0.0.1", 0)
    if sock is None:
        await site.start()
        stub.url = f"http://127.0.0.1:{site.port}"
    try:
        yield site
    finally:
        stub.release.set()
        await runner.cleanup()


def run(coro):
    return asyncio.run(coro)


# ---- response / request mapping (no server) --------------------------------------------------


def test_payload_uses_sglang_field_names():
    r = GenerateRequest([3, 4], SamplingParams(temperature=0.5, top_k=7, max_new_tokens=9, seed=11,
                                               stop_token_ids=[2]), top_logprobs_num=3, logprob_start_len=0)
    p = generate_payload(r, "r1")
    assert p["input_ids"] == [3, 4] and p["rid"] == "r1" and p["return_logprob"] is True
    assert p["sampling_params"] == {"temperature": 0.5, "top_p": 1.0, "top_k": 7, "max_new_tokens": 9,
                                    "min_new_tokens": 0, "stop_token_ids": [2], "sampling_seed": 11}
    assert p["top_logprobs_num"] == 3 and p["logprob_start_len"] == 0 and "stream" not in p
    bare = generate_payload(req([1], max_new_tokens=2), "r2", stream=True)
    assert "sampling_seed" not in bare["sampling_params"] and "stop" not in bare["sampling_params"]
    assert "stop_token_ids" not in bare["sampling_params"] and bare["stream"] is True
    assert "top_logprobs_num" not in bare and "logprob_start_len" not in bare


@pytest.mark.parametrize("finish, status, matched", [
    ({"type": "length", "length": 2}, SampleStatus.TRUNCATED, None),
    ({"type": "stop", "matched": 6}, SampleStatus.COMPLETED, 6),
    ({"type": "stop", "matched": "##"}, SampleStatus.COMPLETED, "##"),
    ({"type": "abort", "message": "aborted", "status_code": None, "err_type": None}, SampleStatus.ABORTED, None),
])
def test_response_mapping(finish, status, matched):
    out = parse_generate_response(sglang_result("r", [5, 6], finish), req([1, 2, 3, 4]), "r")
    assert out.finish_reason is status and out.matched_stop == matched
    assert out.output_ids == [5, 6] and out.output_logprobs == [-0.5, -1.5]
    assert out.weight_version == 3 and out.output_versions == [3, 3]
    assert (out.rid, out.prompt_tokens, out.cached_tokens, out.e2e_latency) == ("r", 4, 2, 0.25)
    assert out.output_top_logprobs is None and out.input_logprobs is None


def test_response_mapping_extras():
    body = sglang_result("r", [5, 6], {"type": "length"}, version="default", output_weight_versions=[1, 2],
                         output_top_logprobs=[[[-0.1, 5, None], [-2.0, 9, None]], [[-0.3, 6, None]]],
                         input_token_logprobs=[[None, 1, None], [-1.25, 2, None]])
    r = GenerateRequest([1, 2], top_logprobs_num=2, logprob_start_len=0)
    out = parse_generate_response(body, r, "r")
    assert out.weight_version == 0  # SGLang's "default" version
    assert out.output_versions == [1, 2]
    assert out.output_top_logprobs == [[(5, -0.1), (9, -2.0)], [(6, -0.3)]]
    assert out.input_logprobs == [None, -1.25]
    with pytest.raises(ValueError, match="unknown finish_reason"):
        parse_generate_response(sglang_result("r", [5], {"type": "weird"}), r, "r")
    with pytest.raises(ValueError, match="no meta_info.finish_reason"):
        parse_generate_response(sglang_result("r", [5], None), r, "r")


# ---- robustness against stubs ----------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 429])  # 429: a server at its in-flight limit, nothing was queued
def test_503_is_retried_then_succeeds(status):
    async def flaky(stub, request, body):
        if stub.count("/generate") <= 2:
            return web.json_response({"error": {"message": "warming up"}}, status=status)
        return await ok_handler(stub, request, body)

    async def main():
        stub = Stub(flaky)
        async with serving(stub):
            async with EngineClient(stub.url, max_retries=3, **FAST) as client:
                out = await client.agenerate_one(req([1, 2], rid="a"))
        assert stub.count("/generate") == 3
        assert [b["rid"] for _, b, _ in stub.calls] == ["a"] * 3  # same body, same rid on every attempt
        assert out.output_ids == [5, 6] and out.finish_reason is SampleStatus.TRUNCATED

    run(main())


def test_retries_exhausted_names_url_rid_and_attempts():
    async def down(stub, request, body):
        return web.json_response({"error": {"message": "overloaded"}}, status=503)

    async def main():
        stub = Stub(down)
        async with serving(stub):
            async with EngineClient(stub.url, max_retries=2, **FAST) as client:
                with pytest.raises(EngineError) as info:
                    await client.agenerate_one(req([1], rid="rid-x"))
        assert stub.count("/generate") == 3
        msg = str(info.value)
        assert stub.url in msg and "/generate" in msg and "rid-x" in msg and "3 attempts" in msg
        assert "HTTP 503" in msg and "overloaded" in msg
        assert info.value.attempts == 3 and info.value.status == 503

    run(main())


def test_connection_refused_is_retried_until_the_server_listens():
    """The port is bound but not listening (refused); the stub starts listening at the 2nd backoff."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    async def main():
        stub = Stub()
        async with serving(stub, sock) as site:
            client = EngineClient(f"http://127.0.0.1:{port}", max_retries=5, **FAST)
            backoffs = []

            def backoff(n: int) -> float:
                backoffs.append(n)
                if n == 2:
                    sock.listen(8)  # from now on connects succeed and wait in the backlog
                    asyncio.get_running_loop().create_task(site.start())
                return 0.0

            client._backoff = backoff
            try:
                out = await client.agenerate_one(req([1], rid="late"))
            finally:
                await client.aclose()
        assert backoffs == [1, 2]  # two refused attempts, the third got through
        assert stub.count("/generate") == 1 and out.rid == "late"

    run(main())


def test_connection_refused_error_after_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"

        async def main():
            async with EngineClient(url, max_retries=1, **FAST) as client:
                with pytest.raises(EngineError) as info:
                    await client.agenerate_one(req([1], rid="nobody"))
                assert await client.ahealth() is False
            return str(info.value)

        msg = run(main())
    assert url in msg and "nobody" in msg and "2 attempts" in msg and "Connect" in msg


@pytest.mark.parametrize("status, body, content_type, expected", [
    (400, '{"error": {"message": "prompt too long"}}', "application/json", "prompt too long"),
    (400, '{"object": "error", "message": "bad field", "code": 400}', "application/json", "bad field"),
    (422, "Failed to deserialize the JSON body into the target type", "text/plain", "Failed to deserialize"),
    (500, '{"error": {"message": "boom"}}', "application/json", "boom"),
])
def test_client_errors_are_not_retried(status, body, content_type, expected):
    async def reject(stub, request, _):
        return web.Response(status=status, text=body, content_type=content_type)

    async def main():
        stub = Stub(reject)
        async with serving(stub):
            async with EngineClient(stub.url, max_retries=3, **FAST) as client:
                with pytest.raises(EngineError) as info:
                    await client.agenerate_one(req([1], rid="bad-1"))
        assert stub.count("/generate") == 1
        msg = str(info.value)
        assert stub.url in msg and "bad-1" in msg and expected in msg and f"HTTP {status}" in msg
        assert info.value.status == status

    run(main())


def test_timeout_names_url_and_rid():
    async def hang(stub, request, body):
        await stub.release.wait()
        return web.json_response({})

    async def main():
        stub = Stub(hang)
        async with serving(stub):
            async with EngineClient(stub.url, timeout_s=0.3, **FAST) as client:
                with pytest.raises(EngineError, match="timed out") as info:
                    await client.agenerate_one(req([1], rid="slow-1"))
        assert stub.count("/generate") == 1  # a timeout is not retried
        assert stub.url in str(info.value) and "slow-1" in str(info.value)

    run(main())


def test_concurrency_is_bounded():
    async def hold(stub, request, body):
        await asyncio.sleep(0.02)  # keep requests in flight so they overlap
        return await ok_handler(stub, request, body)

    async def main():
        stub = Stub(hold)
        async with serving(stub):
            async with EngineClient(stub.url, max_concurrency=3) as client:
                outs = await client.agenerate([req([i], rid=f"r{i}") for i in range(15)])
        assert [o.rid for o in outs] == [f"r{i}" for i in range(15)]
        assert stub.max_in_flight == 3

    run(main())


def test_api_key_and_routing_key_headers():
    async def main():
        stub = Stub()
        async with serving(stub):
            async with EngineClient(stub.url, api_key="sk-test", routing_key="default-key") as client:
                await client.agenerate([req([1], rid="a"), req([2], rid="b")], routing_keys=["group-7", None])
                await client.aabort("a")
        headers = {b["rid"]: h for p, b, h in stub.calls if p == "/generate"}
        assert headers["a"]["X-SMG-Routing-Key"] == "group-7"
        assert headers["b"]["X-SMG-Routing-Key"] == "default-key"
        assert all(h["Authorization"] == "Bearer sk-test" for _, _, h in stub.calls)
        abort_headers = [h for p, _, h in stub.calls if p == "/abort_request"][0]
        assert "X-SMG-Routing-Key" not in abort_headers

    run(main())


def test_control_calls_fan_out_to_workers_not_the_router():
    async def main():
        router, w0, w1 = Stub(), Stub(), Stub()
        async with serving(router), serving(w0), serving(w1):
            async with EngineClient(router.url, control_urls=[w0.url, w1.url]) as client:
                await client.agenerate_one(req([1], rid="g"))
                await client.aabort()
                await client.aabort("g")
                await client.apause_generation("retract")
                await client.acontinue_generation()
                assert await client.aflush_cache() is True
                await client.ainit_weights_update_group("10.0.0.1", 29500, rank_offset=1, world_size=5)
                await client.aupdate_weights_from_distributed(
                    ["w"], [torch.bfloat16], [(2, 3)], weight_version=9, load_format="flattened_bucket")
                with pytest.raises(ValueError, match="pause mode"):
                    await client.apause_generation("sleep")
        assert [p for p, _, _ in router.calls] == ["/generate"]
        for w in (w0, w1):
            bodies = {p: b for p, b, _ in w.calls}
            assert [p for p, _, _ in w.calls] == [
                "/abort_request", "/abort_request", "/pause_generation", "/continue_generation", "/flush_cache",
                "/init_weights_update_group", "/update_weights_from_distributed"]
            assert [b for p, b, _ in w.calls if p == "/abort_request"] == [{"rid": "", "abort_all": True}, {"rid": "g"}]
            assert bodies["/pause_generation"] == {"mode": "retract"}
            dist = bodies["/update_weights_from_distributed"]
            assert dist["dtypes"] == ["bfloat16"] and dist["shapes"] == [[2, 3]] and dist["weight_version"] == "9"
            assert dist["load_format"] == "flattened_bucket"
        # 4 inference ranks over 2 workers: 2 ranks each, after the trainer's rank 0
        assert [b["rank_offset"] for w in (w0, w1) for p, b, _ in w.calls if p == "/init_weights_update_group"] == [1, 3]

    run(main())


def test_flush_refused_while_busy_and_version_fallback():
    async def busy(stub, request, body):
        if request.path == "/flush_cache":
            return web.Response(status=400, text="Cache not flushed: requests are running")
        if request.path == "/model_info":
            return web.Response(status=404, text="Not Found")
        return await ok_handler(stub, request, body)

    async def main():
        stub = Stub(busy)
        async with serving(stub):
            async with EngineClient(stub.url) as client:
                assert await client.aflush_cache() is False
                assert await client.aget_weight_version() == 4  # from /get_model_info after the 404
        assert [p for p, _, _ in stub.calls] == ["/flush_cache", "/model_info", "/get_model_info"]

    run(main())


def test_weight_update_payloads_and_failures():
    named = [("a.weight", torch.arange(6, dtype=torch.float32).view(2, 3)), ("b.bias", torch.ones(4))]

    async def decode(stub, request, body):
        if request.path == "/update_weights_from_disk":
            return web.json_response({"success": False, "message": "no such dir /nope"}, status=400)
        return await ok_handler(stub, request, body)

    async def main():
        stub = Stub(decode)
        async with serving(stub):
            async with EngineClient(stub.url) as client:
                await client.aupdate_weights_from_tensors(named, weight_version=5)
                await client.aupdate_weights_from_bucket(pack_bucket(named), weight_version=6, flush_cache=False)
                with pytest.raises(EngineError, match="no such dir /nope"):
                    await client.aupdate_weights_from_disk("/nope", weight_version=7)
        return {p: b for p, b, _ in stub.calls if p != "/update_weights_from_tensor"}, \
            [b for p, b, _ in stub.calls if p == "/update_weights_from_tensor"]

    others, (plain, bucket) = run(main())
    assert plain["weight_version"] == "5" and plain["flush_cache"] is True and "load_format" not in plain
    [blob] = plain["serialized_named_tensors"]
    pairs = torch.load(io.BytesIO(base64.b64decode(blob)), weights_only=True)
    assert [n for n, _ in pairs] == ["a.weight", "b.bias"] and torch.equal(pairs[0][1], named[0][1])
    assert bucket["load_format"] == "flattened_bucket" and bucket["flush_cache"] is False
    obj = torch.load(io.BytesIO(base64.b64decode(bucket["serialized_named_tensors"][0])), weights_only=True)
    assert obj["metadata"][0] == {"name": "a.weight", "dtype": "float32", "shape": [2, 3], "offset": 0}
    entries = [BucketEntry(m["name"], m["dtype"], tuple(m["shape"]), m["offset"]) for m in obj["metadata"]]
    restored = unpack_bucket(WeightBucket(obj["flattened_tensor"], entries))
    assert all(torch.equal(t, ref) for (_, t), (_, ref) in zip(restored, named))
    assert others["/update_weights_from_disk"] == {"model_path": "/nope", "weight_version": "7", "flush_cache": True}


def test_stream_against_stub():
    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj)}\n\n".encode()

    async def stream(stub, request, body):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        rid = body["rid"]
        if body["input_ids"] == [0]:
            await resp.write(sse(sglang_result(rid, [7], None)))
            await resp.write(sse({"error": {"message": "engine crashed"}}))
        elif body["input_ids"] == [2] or body["input_ids"] == [3] and sum(b["rid"] == rid
                                                                          for _, b, _ in stub.calls) < 3:
            await resp.write(sse(sglang_result(rid, [7], None)))
            return resp  # the stream ends without a final chunk or [DONE] (a worker died behind a router)
        else:
            for n in (1, 2, 3):
                finish = {"type": "stop", "matched": 9} if n == 3 else None
                await resp.write(sse(sglang_result(rid, [7, 8, 9][:n], finish)))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def main():
        stub = Stub(stream)
        async with serving(stub):
            async with EngineClient(stub.url) as client:
                snaps = [o async for o in client.astream(req([1], rid="s"))]
                with pytest.raises(EngineError, match="engine crashed"):
                    async for _ in client.astream(req([0], rid="e")):
                        pass
            async with EngineClient(stub.url, max_retries=2, **FAST) as client:
                with pytest.raises(EngineError, match=r"rid=cut\).*without a finish_reason \(3 attempts\)"):
                    async for _ in client.astream(req([2], rid="cut")):
                        pass
                cut_calls = stub.count("/generate")
                # cut twice, then whole: one growing sequence, each snapshot passed on once
                healed = [o async for o in client.astream(req([3], rid="heal"))]
        assert cut_calls == 2 + 3 and stub.count("/generate") == cut_calls + 3
        assert [o.output_ids for o in healed] == [[7], [7, 8], [7, 8, 9]] and healed[-1].finish_reason is not None
        assert [o.output_ids for o in snaps] == [[7], [7, 8], [7, 8, 9]]
        assert [o.finish_reason for o in snaps] == [None, None, SampleStatus.COMPLETED]
        assert snaps[-1].matched_stop == 9 and stub.calls[0][1]["stream"] is True

    run(main())


@contextlib.contextmanager
def stub_in_thread(stub: Stub):
    """Serve a stub on its own event loop thread (for the sync API)."""
    loop = asyncio.new_event_loop()
    started, done = threading.Event(), asyncio.Event()

    async def main():
        async with serving(stub):
            started.set()
            await done.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        assert started.wait(10), "stub server did not start"
        yield stub
    finally:
        loop.call_soon_threadsafe(done.set)
        thread.join(10)
        loop.close()


def test_sync_wrappers_from_threads_and_not_from_own_loop():
    with stub_in_thread(Stub()) as stub, EngineClient(stub.url) as client:
        assert isinstance(client, RolloutEngine)
        results: list = []
        workers = [threading.Thread(target=lambda i=i: results.append(client.generate([req([i], rid=f"t{i}")])[0]))
                   for i in range(4)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert sorted(o.rid for o in results) == ["t0", "t1", "t2", "t3"]
        assert client.get_weight_version() == 4 and client.health() is True and client.flush_cache() is True

        async def nested():
            return client.health()  # a sync wrapper called on the client's own loop

        with pytest.raises(RuntimeError, match="own event loop"):
            asyncio.run_coroutine_threadsafe(nested(), client._loop).result()


# ---- against the embedded server (tiny model) -----------------------------------------------

LONG = 120  # max_new_tokens of requests that must still be running when aborted / paused


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny Llama with the CharTokenizer; weights scaled up so that distributions are peaked."""
    from slime_rl.hf_io import init_tiny_model, save_hf_checkpoint, tiny_hf_config
    from slime_rl.tokenizer import CharTokenizer

    tok = CharTokenizer()
    cfg = tiny_hf_config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                         max_position_embeddings=256, eos_token_id=tok.eos_token_id)
    gen = torch.Generator().manual_seed(0)
    state = {name: (torch.ones_like(t) if name.endswith("norm.weight") else torch.randn(t.shape, generator=gen) * 0.15)
             for name, t in init_tiny_model(cfg, seed=0).items()}
    return str(save_hf_checkpoint(tmp_path_factory.mktemp("tiny"), cfg, state, tok))


@pytest.fixture(scope="module")
def reference(model_dir):
    """An in-process engine on the same weights (the server adds EOS to stop_token_ids; requests here do too)."""
    from rollout import EmbeddedEngine

    engine = EmbeddedEngine.from_pretrained(model_dir, seed=0)
    yield engine
    engine.close()


@contextlib.contextmanager
def embedded_server(model_dir: str, **app_kwargs):
    from rollout import EmbeddedEngine
    from slime_rl.tokenizer import CharTokenizer

    engine = EmbeddedEngine.from_pretrained(model_dir, seed=0, tokenizer=CharTokenizer())
    with serving_engine(engine, CharTokenizer(), model_path=model_dir, **app_kwargs) as url:
        yield engine, url


@pytest.fixture
def served(model_dir):
    with embedded_server(model_dir) as (engine, url):
        yield engine, url


EOS = 2


def with_eos(r: GenerateRequest) -> GenerateRequest:
    s = r.sampling
    return GenerateRequest(r.input_ids, SamplingParams(**{**s.__dict__, "stop_token_ids": [*s.stop_token_ids, EOS]}),
                           rid=r.rid, top_logprobs_num=r.top_logprobs_num, logprob_start_len=r.logprob_start_len)


@pytest.fixture(scope="module")
def long_request(reference) -> GenerateRequest:
    """A seeded request that runs all LONG tokens without sampling EOS (found on the reference engine)."""
    prompt = [10, 11, 12, 13]
    candidates = [req(prompt, rid=f"probe{s}", max_new_tokens=LONG, seed=s) for s in range(48)]
    outs = reference.generate([with_eos(r) for r in candidates])
    for r, o in zip(candidates, outs):
        if o.finish_reason is SampleStatus.TRUNCATED:
            return req(prompt, max_new_tokens=LONG, seed=r.sampling.seed)
    pytest.fail("no seed in 0..47 generates LONG tokens without EOS on the tiny model")


def assert_same(out, ref, tol: float = 1e-6):
    assert out.output_ids == ref.output_ids
    assert out.finish_reason is ref.finish_reason and out.matched_stop == ref.matched_stop
    assert max((abs(a - b) for a, b in zip(out.output_logprobs, ref.output_logprobs)), default=0.0) <= tol


def test_generate_matches_in_process_engine(served, reference):
    """Requests one at a time give the in-process engine's tokens and logprobs (1e-6); sent
    concurrently (batched differently by the server) the same tokens, logprobs to fp32 rounding."""
    _, url = served
    requests = [req([5 + i, 20, 30 + i], rid=f"p{i}", max_new_tokens=10 + i, seed=100 + i) for i in range(4)]
    requests.append(req([40, 41, 42], rid="greedy", temperature=0.0, max_new_tokens=12))
    requests.append(req([7, 8], rid="topk", temperature=0.8, top_k=5, top_p=0.9, max_new_tokens=9, seed=3))
    expected = [reference.generate([with_eos(r)])[0] for r in requests]

    async def main():
        async with EngineClient(url) as client:
            one_by_one = [await client.agenerate_one(r) for r in requests]
            await client.aflush_cache()  # the concurrent pass recomputes prompts instead of reusing their KV
            together = await client.agenerate([GenerateRequest(r.input_ids, r.sampling, rid=f"{r.rid}-b")
                                               for r in requests])
            return one_by_one, together

    one_by_one, together = run(main())
    for r, out, batched, ref in zip(requests, one_by_one, together, expected):
        assert out.rid == r.rid and batched.rid == f"{r.rid}-b" and out.prompt_tokens == len(r.input_ids)
        assert_same(out, ref, tol=1e-6)
        assert_same(batched, ref, tol=1e-5)
        assert len(out.output_logprobs) == len(out.output_ids) > 0
        assert out.weight_version == 0 and out.output_versions == [0] * len(out.output_ids)
        assert out.e2e_latency > 0


def test_response_mapping_against_server(served, reference):
    _, url = served
    prompt = [30, 31, 32, 33, 34]
    [greedy] = reference.generate([with_eos(req(prompt, temperature=0.0, max_new_tokens=8))])
    stop_at = greedy.output_ids[3]
    stop = greedy.output_ids.index(stop_at)  # the first occurrence ends generation
    detailed = GenerateRequest(prompt, SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=[stop_at]),
                               rid="detail", top_logprobs_num=3, logprob_start_len=0)
    [ref] = reference.generate([with_eos(detailed)])

    async def main():
        async with EngineClient(url) as client:
            first = await client.agenerate_one(detailed)
            again = await client.agenerate_one(req(prompt, rid="again", temperature=0.0, max_new_tokens=2))
            return first, again

    out, again = run(main())
    assert out.output_ids == greedy.output_ids[: stop + 1]
    assert out.finish_reason is SampleStatus.COMPLETED and out.matched_stop == stop_at
    assert len(out.output_top_logprobs) == len(out.output_ids)
    for tok, lp, top in zip(out.output_ids, out.output_logprobs, out.output_top_logprobs):
        assert len(top) == 3 and top[0][0] == tok and abs(top[0][1] - lp) < 1e-6  # greedy: best = chosen
    assert out.input_logprobs[0] is None and len(out.input_logprobs) == len(prompt)
    assert all(abs(a - b) < 1e-5 for a, b in zip(out.input_logprobs[1:], ref.input_logprobs[1:]))
    assert again.finish_reason is SampleStatus.TRUNCATED and len(again.output_ids) == 2
    assert again.cached_tokens > 0  # the prompt's KV came from the prefix cache


def test_stream_snapshots_are_cumulative(served, reference):
    _, url = served
    r = req([50, 51, 52], rid="stream", max_new_tokens=16, seed=5)
    [ref] = reference.generate([with_eos(r)])

    async def main():
        async with EngineClient(url) as client:
            return [o async for o in client.astream(r)]

    snaps = run(main())
    assert len(snaps) >= 2
    for prev, cur in zip(snaps, snaps[1:]):
        assert cur.output_ids[: len(prev.output_ids)] == prev.output_ids and len(cur.output_ids) >= len(prev.output_ids)
    assert all(s.finish_reason is None for s in snaps[:-1])
    assert_same(snaps[-1], ref)


def test_abort_running_request_returns_partial_output(served, reference, long_request):
    engine, url = served
    [ref] = reference.generate([with_eos(long_request)])

    async def main():
        async with EngineClient(url) as client:
            snaps = []
            async for out in client.astream(GenerateRequest(long_request.input_ids, long_request.sampling, rid="long")):
                snaps.append(out)
                if len(snaps) == 1:
                    await client.aabort("long")
            # the same without streaming, aborted by abort-all once the engine runs it
            task = asyncio.create_task(client.agenerate_one(GenerateRequest(
                long_request.input_ids, long_request.sampling, rid="long2")))
            for _ in range(2000):
                if engine.load()["num_running_reqs"] > 0 or task.done():
                    break
                await asyncio.sleep(0.005)
            await client.aabort()
            return snaps[-1], await task

    streamed, plain = run(main())
    for out in (streamed, plain):
        assert out.finish_reason is SampleStatus.ABORTED
        assert len(out.output_ids) < LONG and out.output_ids == ref.output_ids[: len(out.output_ids)]
    assert len(streamed.output_ids) >= 1


def test_pause_update_continue_and_versions(served, reference, model_dir, long_request):
    """A rollout paused in place keeps going under the new weights (its tokens carry both versions);
    disk / bucket / tensor updates stamp versions; restoring the checkpoint restores the outputs."""
    _, url = served
    from rollout.engine import load_safetensors_dir

    weights = load_safetensors_dir(model_dir)
    perturbed = [(n, t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1)))
                 for n, t in weights.items()]
    probe = req([60, 61, 62], rid="probe", max_new_tokens=10, seed=9)
    [ref] = reference.generate([with_eos(probe)])

    async def main():
        async with EngineClient(url) as client:
            got: dict[str, Any] = {"v0": await client.aget_weight_version()}
            snaps = []
            async for out in client.astream(GenerateRequest(long_request.input_ids, long_request.sampling, rid="pr")):
                snaps.append(out)
                if len(snaps) == 1:
                    await client.apause_generation("in_place")
                    await client.aupdate_weights_from_tensors(perturbed, weight_version=1)
                    got["v1"] = await client.aget_weight_version()
                    await client.acontinue_generation()
            got["partial"] = snaps[-1]
            got["perturbed"] = await client.agenerate_one(GenerateRequest(probe.input_ids, probe.sampling, rid="q1"))
            with pytest.raises(EngineError, match="nope.weight"):
                await client.aupdate_weights_from_tensors([("nope.weight", torch.zeros(2))], weight_version=5)
            got["after_bad"] = await client.aget_weight_version()
            await client.aupdate_weights_from_bucket(pack_bucket(weights.items()), weight_version=2)
            got["bucket"] = await client.agenerate_one(GenerateRequest(probe.input_ids, probe.sampling, rid="q2"))
            await client.aupdate_weights_from_tensors(perturbed, weight_version=3)
            await client.aupdate_weights_from_disk(model_dir, weight_version=4)
            got["disk"] = await client.agenerate_one(GenerateRequest(probe.input_ids, probe.sampling, rid="q3"))
            got["v4"] = await client.aget_weight_version()
            got["flushed"] = await client.aflush_cache()
            got["healthy"] = await client.ahealth()
            return got

    got = run(main())
    assert (got["v0"], got["v1"], got["after_bad"], got["v4"]) == (0, 1, 1, 4)
    partial, [long_ref] = got["partial"], reference.generate([with_eos(long_request)])
    versions, n_old = partial.output_versions, partial.output_versions.count(0)
    assert partial.finish_reason in (SampleStatus.TRUNCATED, SampleStatus.COMPLETED)  # new weights may hit EOS
    assert len(versions) == len(partial.output_ids) and versions == [0] * n_old + [1] * (len(versions) - n_old)
    assert 0 < n_old < len(versions) and partial.output_ids[:n_old] == long_ref.output_ids[:n_old]
    assert got["perturbed"].output_versions == [1] * len(got["perturbed"].output_ids)
    assert got["perturbed"].output_logprobs != ref.output_logprobs  # the update changed the policy
    assert_same(got["bucket"], ref) and got["bucket"].weight_version == 2
    assert_same(got["disk"], ref) and got["disk"].output_versions == [4] * len(ref.output_ids)
    assert got["flushed"] is True and got["healthy"] is True


def test_distributed_weight_update(served, reference, model_dir):
    """The trainer (this process, rank 0) broadcasts over a gloo group the server joined via the client."""
    from rollout.engine import load_safetensors_dir
    from slime_rl.dist_group import init_weight_group

    _, url = served
    weights = load_safetensors_dir(model_dir)
    perturbed = {n: t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(2)) for n, t in weights.items()}
    probe = req([80, 81, 82], rid="dprobe", max_new_tokens=10, seed=11)
    [ref] = reference.generate([with_eos(probe)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def push(client, group, named: dict, version: int, flat: bool):
        names = list(named)
        update = asyncio.create_task(client.aupdate_weights_from_distributed(
            names, [t.dtype for t in named.values()], [t.shape for t in named.values()], weight_version=version,
            load_format="flattened_bucket" if flat else None))
        tensors = [pack_bucket(named.items()).buffer] if flat else list(named.values())
        await asyncio.to_thread(lambda: [group.broadcast(t, src=0) for t in tensors])
        await update

    async def main():
        async with EngineClient(url) as client:
            joined = asyncio.create_task(client.ainit_weights_update_group("127.0.0.1", port, 1, 2, backend="gloo"))
            group = await asyncio.to_thread(init_weight_group, "127.0.0.1", port, 0, 2, "gloo")
            await joined
            try:
                await push(client, group, perturbed, 5, flat=False)
                changed = await client.agenerate_one(GenerateRequest(probe.input_ids, probe.sampling, rid="d1"))
                await push(client, group, weights, 6, flat=True)
                restored = await client.agenerate_one(GenerateRequest(probe.input_ids, probe.sampling, rid="d2"))
                await client.adestroy_weights_update_group()
            finally:
                group.destroy()
            return changed, restored, await client.aget_weight_version()

    changed, restored, version = run(main())
    assert changed.weight_version == 5 and changed.output_logprobs != ref.output_logprobs
    assert_same(restored, ref) and restored.output_versions == [6] * len(ref.output_ids) and version == 6


def test_flush_refused_while_busy_then_accepted(served, long_request):
    engine, url = served

    async def main():
        async with EngineClient(url) as client:
            await client.apause_generation("in_place")
            task = asyncio.create_task(client.agenerate_one(GenerateRequest(long_request.input_ids,
                                                                            long_request.sampling, rid="busy")))
            for _ in range(2000):  # wait until the engine holds the request
                if sum(engine.load()[k] for k in ("num_running_reqs", "num_waiting_reqs")) > 0:
                    break
                await asyncio.sleep(0.005)
            busy = await client.aflush_cache()
            await client.aabort("busy")
            await client.acontinue_generation()
            out = await task
            return busy, out, await client.aflush_cache()

    busy, out, idle = run(main())
    assert busy is False and out.finish_reason is SampleStatus.ABORTED and idle is True


def test_api_key_is_sent_to_protected_endpoints(model_dir):
    """With a key, our server guards every route but /health (as SGLang); the client sends it everywhere."""
    with embedded_server(model_dir, api_key="sk-local") as (_, url):
        async def main():
            async with EngineClient(url, api_key="sk-local") as good, EngineClient(url, max_retries=3) as bad:
                await good.apause_generation("abort")
                await good.acontinue_generation()
                flushed = await good.aflush_cache()
                out = await good.agenerate_one(req([1, 2, 3], rid="open", max_new_tokens=2, seed=0))
                errors = []
                for call in (bad.apause_generation("abort"), bad.agenerate_one(req([1, 2, 3], max_new_tokens=2))):
                    with pytest.raises(EngineError) as info:
                        await call
                    errors.append(info.value)
                return flushed, errors, out, await bad.ahealth()

        flushed, errors, out, healthy = run(main())
    assert flushed is True and len(out.output_ids) >= 1 and healthy
    for err, path in zip(errors, ("/pause_generation", "/generate")):
        assert err.status == 401 and err.attempts == 1 and f"{url}{path}" in str(err)


def test_sync_client_against_server(served, reference, model_dir):
    _, url = served
    r = req([70, 71], rid="sync", max_new_tokens=6, seed=4)
    [ref] = reference.generate([with_eos(r)])
    with EngineClient(url) as client:
        assert isinstance(client, RolloutEngine)
        [out] = client.generate([r])
        assert client.health() and client.get_weight_version() == 0
        client.pause_generation("abort")
        client.update_weights_from_disk(model_dir, 7)
        client.continue_generation()
        client.abort("unknown-rid")  # ignored by the server
        assert client.get_weight_version() == 7 and client.flush_cache() is True
    assert_same(out, ref)
