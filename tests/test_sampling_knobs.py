"""Issue 17: every sampling knob is implemented on /generate and /v1 alike, or refused with a 400 naming it.

One tiny Llama served in-process (`serving`); each knob's effect is checked
against a reference computed from the engine's own no-cache logits
(`EmbeddedEngine.model`), with SGLang's order (rollout/sampling.py).
"""

from __future__ import annotations

import base64
import struct

import pytest
import torch

from rollout.engine import EmbeddedEngine
from server_procs import post, serving
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.tokenizer import CharTokenizer
from slime_rl.types import GenerateRequest, SamplingParams

TOK = CharTokenizer()
CTX = 64
PROMPT = "1+2=3, 4+5="


@pytest.fixture(scope="module")
def server():
    cfg = tiny_hf_config(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                         max_position_embeddings=CTX, eos_token_id=TOK.eos_token_id)
    engine = EmbeddedEngine(cfg, init_tiny_model(cfg, seed=0), max_batch_size=8, tokenizer=TOK)
    with serving(engine, TOK) as url:
        yield engine, url


def _logits(engine: EmbeddedEngine, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return engine.model(torch.tensor([ids], device=engine.device)).float()[0, -1].cpu()


def reference_greedy(engine, prompt: list[int], n: int, freq=0.0, pres=0.0, rep=1.0, bias=None) -> tuple[list, list]:
    """Greedy decoding with SGLang's processors, one full forward per token; (ids, logprobs)."""
    out, lps = [], []
    for _ in range(n):
        x = _logits(engine, prompt + out)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=x.numel()).float()
        x = x - freq * counts - pres * (counts > 0)
        x = torch.where(counts > 0, torch.where(x < 0, x * rep, x / rep), x)
        for t, b in (bias or {}).items():
            x[t] += b
        tok = int(x.argmax())
        out.append(tok)
        lps.append(float(torch.log_softmax(x, -1)[tok]))
    return out, lps


def generate(url: str, sampling: dict, **top) -> dict:
    status, res = post(url + "/generate", {"text": PROMPT, "sampling_params": sampling, "return_logprob": True, **top})
    assert status == 200, res
    return res


def completion(url: str, **body) -> dict:
    status, res = post(url + "/v1/completions", {"model": "m", "prompt": PROMPT, **body})
    assert status == 200, res
    return res


KNOBS = [
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.5),
    dict(frequency_penalty=1.5),
    dict(presence_penalty=2.0),
    dict(frequency_penalty=-0.5, presence_penalty=1.0, repetition_penalty=1.3),
    dict(logit_bias={"7": 3.0, "9": -100.0}),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(k))
def test_greedy_knob_matches_reference_on_both_apis(server, knobs):
    engine, url = server
    prompt = TOK.encode(PROMPT, add_special_tokens=True)
    n = 12
    ref_ids, ref_lps = reference_greedy(
        engine, prompt, n, knobs.get("frequency_penalty", 0.0), knobs.get("presence_penalty", 0.0),
        knobs.get("repetition_penalty", 1.0), {int(k): v for k, v in knobs.get("logit_bias", {}).items()})
    plain, plain_lps = reference_greedy(engine, prompt, n)
    assert ref_ids != plain or max(abs(a - b) for a, b in zip(ref_lps, plain_lps)) > 1e-2  # the knob acts
    native = generate(url, {"max_new_tokens": n, "temperature": 0, "ignore_eos": True, **knobs})
    got = native["meta_info"]["output_token_logprobs"]
    assert [t[1] for t in got] == ref_ids
    assert [t[0] for t in got] == pytest.approx(ref_lps, abs=1e-4)  # logprobs of the processed logits
    res = completion(url, max_tokens=n, temperature=0, ignore_eos=True, logprobs=0, **knobs)
    assert res["choices"][0]["text"] == TOK.decode(ref_ids)
    assert res["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(ref_lps, abs=1e-4)


def test_min_p_keeps_only_tokens_above_the_threshold(server):
    engine, url = server
    prompt = TOK.encode(PROMPT, add_special_tokens=True)
    probs = torch.softmax(_logits(engine, prompt) / 1.5, -1)
    top = probs.sort(descending=True).values
    min_p = float(top[2] + top[3]) / 2 / float(top[0])  # keeps the 3 most likely tokens
    allowed = set((probs >= min_p * probs.max()).nonzero().squeeze(1).tolist())
    assert len(allowed) == 3
    firsts = set()
    for seed in range(12):
        sampling = {"max_new_tokens": 1, "temperature": 1.5, "min_p": min_p, "sampling_seed": seed, "ignore_eos": True}
        firsts.add(generate(url, sampling)["output_ids"][0])
        chat = completion(url, max_tokens=1, temperature=1.5, min_p=min_p, seed=seed, ignore_eos=True, logprobs=0)
        assert chat["choices"][0]["logprobs"]["tokens"][0] == TOK.decode([generate(url, sampling)["output_ids"][0]])
    assert firsts <= allowed and len(firsts) > 1


def test_top_p_kept_ids_for_slime(server):
    engine, url = server
    sampling = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.7, "sampling_seed": 3, "ignore_eos": True,
                "custom_params": {"return_top_p_token_ids": True}}
    meta = generate(url, sampling)["meta_info"]
    decode = lambda s: list(struct.unpack(f"<{len(base64.b64decode(s)) // 4}i", base64.b64decode(s)))  # noqa: E731
    ids, offsets = decode(meta["top_p_token_ids"]), decode(meta["top_p_token_offsets"])
    out = [t[1] for t in meta["output_token_logprobs"]]
    assert len(offsets) == len(out) + 1 and offsets[0] == 0 and offsets[-1] == len(ids)
    prompt = TOK.encode(PROMPT, add_special_tokens=True)
    for i, tok in enumerate(out):
        kept = ids[offsets[i]: offsets[i + 1]]
        probs = torch.softmax(_logits(engine, prompt + out[:i]), -1)
        order = probs.argsort(descending=True).tolist()
        mass_before = probs[order].cumsum(0) - probs[order]
        assert kept == [t for t, m in zip(order, mass_before.tolist()) if m <= 0.7]
        assert tok in kept


def test_same_tokens_alone_and_in_a_batch_with_penalties(server):
    engine, _ = server
    knobs = dict(temperature=0.9, top_p=0.9, min_p=0.05, frequency_penalty=0.7, presence_penalty=0.3,
                 repetition_penalty=1.4, logit_bias={5: 1.0}, max_new_tokens=16, seed=11)
    target = GenerateRequest([3, 4, 5, 6], SamplingParams(**knobs))
    alone = engine.generate([target])[0]
    others = [GenerateRequest([7 + i, 8, 9], SamplingParams(temperature=1.0, max_new_tokens=20, seed=i,
                                                            repetition_penalty=1.0 + 0.2 * i)) for i in range(4)]
    batched = engine.generate(others[:2] + [GenerateRequest([3, 4, 5, 6], SamplingParams(**knobs))] + others[2:])
    assert batched[2].output_ids == alone.output_ids
    assert batched[2].output_logprobs == pytest.approx(alone.output_logprobs, abs=1e-5)


REFUSED = [
    ("regex", "a+"), ("json_schema", "{}"), ("ebnf", "root ::= 'a'"), ("stop_regex", "x"),
]


@pytest.mark.parametrize("key,value", REFUSED)
def test_grammar_keys_are_400_on_both_apis(server, key, value):
    _, url = server
    status, res = post(url + "/generate", {"text": "1", "sampling_params": {key: value}})
    assert status == 400 and key in str(res), res
    for path, body in (("/v1/completions", {"prompt": "1"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "1"}]})):
        status, res = post(url + path, {**body, key: value, "max_tokens": 2})
        assert status == 400 and key in str(res), res


def test_other_refusals_name_the_key(server):
    _, url = server
    cases = [
        ("/generate", {"text": "1", "sampling_params": {"custom_params": {"my_processor_arg": 1}}}, "my_processor_arg"),
        ("/generate", {"text": "1", "custom_logit_processor": "{}"}, "custom_logit_processor"),
        ("/generate", {"text": "1", "sampling_params": {"logit_bias": {"100000": 1.0}}}, "logit_bias"),
        ("/generate", {"text": "1", "sampling_params": {"repetition_penalty": 0}}, "repetition_penalty"),
        ("/generate", {"text": "1", "sampling_params": {"min_p": 1.5}}, "min_p"),
        ("/v1/completions", {"prompt": "1", "frequency_penalty": 3}, "frequency_penalty"),
        ("/v1/completions", {"prompt": "1", "logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/completions", {"prompt": "1", "frobnicate": 1}, "frobnicate"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "1"}],
                                  "response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "1"}], "continue_final_message": True},
         "continue_final_message"),
    ]
    for path, body, key in cases:
        status, res = post(url + path, body)
        assert status == 400 and key in str(res), (path, body, res)
    status, _ = post(url + "/v1/completions", {"prompt": "1", "max_tokens": 1, "user": "u", "metadata": {"a": 1}})
    assert status == 200  # routinely sent by OpenAI clients, no effect on the tokens


def test_max_tokens_beyond_the_context_is_sglangs_400(server):
    _, url = server
    status, res = post(url + "/v1/completions", {"prompt": PROMPT, "max_tokens": CTX})
    assert status == 400 and "Requested token count exceeds the model's maximum context length" in str(res)
    status, res = post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "1"}],
                                                      "max_completion_tokens": CTX})
    assert status == 400 and "maximum context length" in str(res)


def test_max_new_tokens_zero_scores_the_prompt(server):
    engine, url = server
    res = generate(url, {"max_new_tokens": 0}, logprob_start_len=0, top_logprobs_num=3)
    meta = res["meta_info"]
    assert res["output_ids"] == [] and meta["finish_reason"] == {"type": "length", "length": 0}
    prompt = TOK.encode(PROMPT, add_special_tokens=True)
    ref = engine.compute_logprobs([prompt])[0].tolist()
    assert meta["input_token_logprobs"][0][0] is None
    assert [t[0] for t in meta["input_token_logprobs"][1:]] == pytest.approx(ref, abs=1e-4)
    tops = meta["input_top_logprobs"]
    assert tops[0] is None and len(tops) == len(prompt)
    with torch.inference_mode():
        lp_TV = torch.log_softmax(engine.model(torch.tensor([prompt])).float()[0], -1)
    for t in range(1, len(prompt)):
        val, ids = lp_TV[t - 1].topk(3)
        assert [e[1] for e in tops[t]] == ids.tolist()
        assert [e[0] for e in tops[t]] == pytest.approx(val.tolist(), abs=1e-4)


def test_echo_prepends_the_prompt_and_its_logprobs(server):
    engine, url = server
    plain = completion(url, max_tokens=4, temperature=0, logprobs=2)["choices"][0]
    echoed = completion(url, max_tokens=4, temperature=0, logprobs=2, echo=True)["choices"][0]
    assert echoed["text"] == PROMPT + plain["text"]
    prompt = TOK.encode(PROMPT, add_special_tokens=True)
    lp = echoed["logprobs"]
    assert len(lp["tokens"]) == len(prompt) + 4
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = engine.compute_logprobs([prompt])[0].tolist()
    assert lp["token_logprobs"][1:len(prompt)] == pytest.approx(ref, abs=1e-4)
    assert lp["token_logprobs"][len(prompt):] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-5)
    no_lp = completion(url, max_tokens=2, temperature=0, echo=True, prompt=[5, 6, 7])["choices"][0]
    assert no_lp["text"].startswith(TOK.decode([5, 6, 7]))


def test_continue_final_message(server):
    _, url = server
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "12"}]
    status, res = post(url + "/v1/chat/completions", {"messages": messages, "continue_final_message": True,
                                                      "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert status == 200, res
    text = TOK.apply_chat_template(messages[:1], add_generation_prompt=True) + "12"
    native = generate(url, {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True})  # warm, different prompt
    assert native["output_ids"]
    status, ref = post(url + "/generate", {"input_ids": TOK.encode(text, add_special_tokens=False),
                                           "sampling_params": {"max_new_tokens": 3, "temperature": 0,
                                                               "ignore_eos": True}})
    assert res["choices"][0]["message"]["content"] == ref["text"]
    assert res["usage"]["prompt_tokens"] == len(TOK.encode(text, add_special_tokens=False))
