"""SGLang's native /generate protocol on top of the embedded engine.

Three jobs, shared by the native and the OpenAI-compatible handlers:

- parse a request body into engine `GenerateRequest`s (`parse_generate`,
  `build_items`, `parse_sampling`), raising `BadRequest` with a message that
  names the offending field;
- bridge engine callbacks (scheduler thread) onto the event loop
  (`Submission`);
- shape `GenerateOutput`s into SGLang response objects (`generate_response`);

Field names and shapes follow SGLang's native HTTP API (/generate, the
weight-update and control endpoints, server and model info). Departures from SGLang, all deliberate:

- `n > 1`: every copy gets a fresh uuid rid (as SGLang); with a
  `sampling_seed` s, copy j samples with seed s + j so the n samples differ.
- Every sampling knob is implemented (rollout/sampling.py: SGLang's order and
  semantics of penalties, min_p, logit_bias) or refused with a 400 naming it:
  grammars (`regex`, `json_schema`, `ebnf`, `structural_tag`, a non-empty
  `stop_regex`) are not implemented; `custom_params` may hold only
  `return_top_p_token_ids` (there are no custom logit processors, so a
  top-level `custom_logit_processor` is refused too). Nothing is silently ignored.
- `custom_params: {"return_top_p_token_ids": true}` (slime's top-p replay)
  returns `meta_info.top_p_token_ids` and `meta_info.top_p_token_offsets` as
  slime's patched SGLang does: base64 of little-endian int32 arrays, the kept
  ids of output token i at ids[offsets[i]:offsets[i + 1]] (best first, the
  sampled one among them), len(offsets) = completion_tokens + 1.
- `max_new_tokens: 0` is prefill-only scoring (finish_reason length 0);
  `input_top_logprobs` come with `top_logprobs_num > 0` and `logprob_start_len >= 0`.
- `meta_info.output_weight_versions` (weight version per output token) is our
  extension.
- `text` prompts are tokenized with `add_special_tokens=True` (what SGLang's
  HF tokenizer call does); the tokenizer's EOS id joins `stop_token_ids`
  unless `ignore_eos`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import struct
import threading
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable


from rollout.http_json import BadRequest, get_field, short
from rollout.limits import ServerLimits
from rollout.versions import WeightVersions
from rollout.wire import finish_reason_json
from slime_rl.types import GenerateOutput, GenerateRequest, SamplingParams


# ---- sampling_params ----------------------------------------------------------------

SAMPLING_KEYS = (
    "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids",
    "ignore_eos", "n", "sampling_seed", "skip_special_tokens", "no_stop_trim", "min_p", "frequency_penalty",
    "presence_penalty", "repetition_penalty", "logit_bias", "custom_params",
)
# Known to SGLang, not implemented here: accepted only at these neutral values (None is always fine).
_NEUTRAL_ONLY: dict[str, Callable[[Any], bool]] = {
    "json_schema": lambda v: False,
    "regex": lambda v: False,
    "ebnf": lambda v: False,
    "structural_tag": lambda v: False,
    "stop_regex": lambda v: v == [] or v == "",
    "spaces_between_special_tokens": lambda v: isinstance(v, bool),  # detokenization detail
    "stream_interval": lambda v: isinstance(v, int),  # every step streams here
}
GRAMMAR_KEYS = ("json_schema", "regex", "ebnf", "structural_tag", "stop_regex")
CUSTOM_PARAMS = ("return_top_p_token_ids",)  # the only custom_params key (no custom logit processors)
MAX_LOGIT_BIAS = 1024  # entries of one logit_bias
DEFAULT_MAX_NEW_TOKENS = 128
MAX_TOP_LOGPROBS = 64  # top_logprobs_num: alternatives per position (responses grow with it)
MAX_STOP_CHARS = 1024  # length of one stop string
MAX_RID_CHARS = 256
MAX_SEED = 2**63 - 1
GREEDY_BELOW = 1e-6  # as SGLang: a temperature this small samples greedily (dividing by it overflows)


@dataclass
class SamplingExtras:
    """The sampling_params keys that shape the response rather than the sampling."""

    n: int = 1
    skip_special_tokens: bool = True
    no_stop_trim: bool = False


def _str_list(d: dict, key: str, where: str) -> list[str]:
    value = d.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise BadRequest(f"{where}.{key} must be a string or a list of strings, got {short(value)}")


def _int_list(d: dict, key: str, where: str) -> list[int]:
    value = d.get(key)
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return list(value)
    raise BadRequest(f"{where}.{key} must be a list of integers, got {short(value)}")


def parse_sampling(
    d: Any, eos_token_id: int | None, where: str = "sampling_params", limits: ServerLimits = ServerLimits()
) -> tuple[SamplingParams, SamplingExtras]:
    """One sampling_params dict -> engine SamplingParams + response options.

    The tokenizer's EOS id joins `stop_token_ids` unless `ignore_eos`. Numbers must be finite;
    `n`, stop strings and stop ids are capped by `limits`; token ids are checked by the engine.
    """
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise BadRequest(f"{where} must be an object, got {type(d).__name__}")
    for key, value in d.items():
        if key in SAMPLING_KEYS:
            continue
        if key in _NEUTRAL_ONLY:
            if value is not None and not _NEUTRAL_ONLY[key](value):
                why = " (constrained decoding is not implemented)" if key in GRAMMAR_KEYS else ""
                raise BadRequest(f"{where}.{key}={short(value)} is not supported by this server{why}")
            continue
        hint = " (use sampling_seed)" if key == "seed" else ""
        raise BadRequest(f"{where} has unknown key {short(key)}{hint}; known keys: {', '.join(SAMPLING_KEYS)}")
    max_new = get_field(d, "max_new_tokens", (int,), DEFAULT_MAX_NEW_TOKENS, where)
    min_new = get_field(d, "min_new_tokens", (int,), 0, where)
    temperature = float(get_field(d, "temperature", (int, float), 1.0, where))
    top_p = float(get_field(d, "top_p", (int, float), 1.0, where))
    top_k = get_field(d, "top_k", (int,), -1, where)
    n = get_field(d, "n", (int,), 1, where)
    seed = get_field(d, "sampling_seed", (int,), None, where)
    if max_new < 0:
        raise BadRequest(f"{where}.max_new_tokens must be >= 0, got {max_new}")
    if not 0 <= min_new <= max_new:
        raise BadRequest(f"{where}.min_new_tokens must be in [0, max_new_tokens={max_new}], got {min_new}")
    if temperature < 0:
        raise BadRequest(f"{where}.temperature must be >= 0, got {temperature}")
    if temperature < GREEDY_BELOW:
        temperature = 0.0
    if not 0 < top_p <= 1:
        raise BadRequest(f"{where}.top_p must be in (0, 1], got {top_p}")
    if top_k == 0 or top_k < -1:
        raise BadRequest(f"{where}.top_k must be -1 (off) or >= 1, got {top_k}")
    if not 1 <= n <= limits.max_n:
        raise BadRequest(f"{where}.n must be in [1, {limits.max_n}] (--max-n), got {n}")
    if seed is not None and not 0 <= seed <= MAX_SEED - (n - 1):
        raise BadRequest(f"{where}.sampling_seed must be in [0, 2**63 - n], got {seed}")
    stop_ids = _int_list(d, "stop_token_ids", where)
    stops = _str_list(d, "stop", where)
    for key, values in (("stop_token_ids", stop_ids), ("stop", stops)):
        if len(values) > limits.max_stop:
            raise BadRequest(f"{where}.{key} has {len(values)} entries; at most {limits.max_stop} (--max-stop)")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise BadRequest(f"{where}.stop strings must be at most {MAX_STOP_CHARS} characters")
    ignore_eos = get_field(d, "ignore_eos", (bool,), False, where)
    if eos_token_id is not None and not ignore_eos and eos_token_id not in stop_ids:
        stop_ids.append(eos_token_id)
    sampling = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new, min_new_tokens=min_new,
        stop_token_ids=stop_ids, stop=stops, seed=seed, logit_bias=_logit_bias(d, where),
        return_top_p_token_ids=_custom_params(d, where), **_processors(d, where),
    )
    extras = SamplingExtras(
        n=n,
        skip_special_tokens=get_field(d, "skip_special_tokens", (bool,), True, where),
        no_stop_trim=get_field(d, "no_stop_trim", (bool,), False, where),
    )
    return sampling, extras


def _processors(d: dict, where: str) -> dict[str, float]:
    """min_p and the penalties, range-checked (SGLang's ranges)."""
    out = {name: float(get_field(d, name, (int, float), default, where))
           for name, default in (("min_p", 0.0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0),
                                 ("repetition_penalty", 1.0))}
    if not 0 <= out["min_p"] <= 1:
        raise BadRequest(f"{where}.min_p must be in [0, 1], got {out['min_p']}")
    for name in ("frequency_penalty", "presence_penalty"):
        if not -2 <= out[name] <= 2:
            raise BadRequest(f"{where}.{name} must be in [-2, 2], got {out[name]}")
    if not 0 < out["repetition_penalty"] <= 2:
        raise BadRequest(f"{where}.repetition_penalty must be in (0, 2], got {out['repetition_penalty']}")
    return out


def _logit_bias(d: dict, where: str) -> dict[int, float]:
    """{"token id": bias} -> {id: bias}; ids are checked against the vocab by the engine."""
    bias = get_field(d, "logit_bias", (dict,), {}, where)
    if len(bias) > MAX_LOGIT_BIAS:
        raise BadRequest(f"{where}.logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}")
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.strip().lstrip("-").isdigit()):
            raise BadRequest(f"{where}.logit_bias keys must be token ids (strings of digits), got {short(key)}")
        out[int(key)] = float(get_field(bias, key, (int, float), 0.0, f"{where}.logit_bias"))
    return out


def _custom_params(d: dict, where: str) -> bool:
    """custom_params may only ask for the top-p kept ids (slime's top-p replay)."""
    params = get_field(d, "custom_params", (dict,), {}, where)
    for key in params:
        if key not in CUSTOM_PARAMS:
            raise BadRequest(f"{where}.custom_params key {short(key)} is not supported by this server "
                             f"(no custom logit processors); supported: {', '.join(CUSTOM_PARAMS)}")
    return bool(get_field(params, "return_top_p_token_ids", (bool,), False, f"{where}.custom_params"))


# ---- /generate request -----------------------------------------------------------------


@dataclass
class GenItem:
    """One engine request of an HTTP call, plus what its response needs."""

    request: GenerateRequest
    return_logprob: bool = False
    return_text_in_logprobs: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False

    @property
    def rid(self) -> str:
        return self.request.rid  # always set by build_items


@dataclass
class ParsedGenerate:
    items: list[GenItem]  # response order: prompt0 x n, prompt1 x n, ...
    single: bool  # respond with one object (one prompt, n=1), else an array
    stream: bool


def new_rid() -> str:
    return uuid.uuid4().hex


def _per_item(body: dict, key: str, kinds: tuple[type, ...], default: Any, batch: int) -> list[Any]:
    """A top-level field given once or as a list with one value per prompt."""
    value = body.get(key)
    if isinstance(value, list):
        if len(value) != batch:
            raise BadRequest(f"{key} is a list of {len(value)} values but the batch has {batch} prompts")
        return [get_field({key: v}, key, kinds, default, "request") for v in value]
    return [get_field(body, key, kinds, default, "request")] * batch


def _token_ids(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{where} must be a non-empty list of token ids")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise BadRequest(f"{where} must hold integers only")
    return value


def encode_text(tokenizer: Any, text: Any, where: str, add_special_tokens: bool = True) -> list[int]:
    if tokenizer is None:
        raise BadRequest(f"{where}: text prompts need a tokenizer and this server has none; send input_ids")
    if not isinstance(text, str):
        raise BadRequest(f"{where} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{where} is not valid Unicode (it holds a lone surrogate)") from None
    try:
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except Exception as exc:  # noqa: BLE001 - a tokenizer's own error type; the text is the client's
        raise BadRequest(f"{where}: cannot tokenize this text") from exc
    if not ids:
        raise BadRequest(f"{where} tokenizes to an empty prompt")
    return list(ids)


def parse_prompts(body: dict, tokenizer: Any, limits: ServerLimits = ServerLimits()) -> tuple[list[list[int]], bool]:
    """`text` or `input_ids` (exactly one) -> (token ids per prompt, is_batch)."""
    if body.get("input_embeds") is not None:
        raise BadRequest("input_embeds is not supported by this server; send text or input_ids")
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise BadRequest("give exactly one of text and input_ids" + (" (both were given)" if text is not None else ""))
    if text is not None:
        if isinstance(text, list):
            if not text:
                raise BadRequest("text must not be an empty list")
            check_batch(len(text), "text", limits)
            return [encode_text(tokenizer, t, f"text[{i}]") for i, t in enumerate(text)], True
        return [encode_text(tokenizer, text, "text")], False
    if isinstance(ids, list) and ids and all(isinstance(p, list) for p in ids):
        check_batch(len(ids), "input_ids", limits)
        return [_token_ids(p, f"input_ids[{i}]") for i, p in enumerate(ids)], True
    return [_token_ids(ids, "input_ids")], False


def check_batch(batch: int, key: str, limits: ServerLimits) -> None:
    if batch > limits.max_batch_size:
        raise BadRequest(f"{key} holds {batch} prompts; at most {limits.max_batch_size} per request "
                         f"(--max-batch-size)")


def make_rids(rid: Any, batch: int, is_batch: bool) -> list[str]:
    if rid is None:
        return [new_rid() for _ in range(batch)]
    if isinstance(rid, str):
        if not 0 < len(rid) <= MAX_RID_CHARS:
            raise BadRequest(f"rid must be a non-empty string of at most {MAX_RID_CHARS} characters")
        return [f"{rid}_{i}" for i in range(batch)] if is_batch else [rid]
    if isinstance(rid, list) and all(isinstance(r, str) and 0 < len(r) <= MAX_RID_CHARS for r in rid):
        if len(rid) != batch:
            raise BadRequest(f"rid is a list of {len(rid)} ids but the batch has {batch} prompts")
        if len(set(rid)) != len(rid):
            raise BadRequest(f"rid list has duplicates: {short(rid)}")
        return list(rid)
    raise BadRequest(f"rid must be a string or a list of strings (each 1..{MAX_RID_CHARS} characters), "
                     f"got {short(rid)}")


def build_items(
    prompts: list[list[int]],
    sampling: list[Any],
    rids: list[str],
    eos_token_id: int | None,
    *,
    return_logprob: list[bool],
    logprob_start_len: list[int],
    top_logprobs_num: list[int],
    return_text_in_logprobs: bool = False,
    where: str = "sampling_params",
    limits: ServerLimits = ServerLimits(),
) -> list[GenItem]:
    """Engine requests for each prompt, expanded n times (fresh rids, seeds s + j)."""
    parsed = [parse_sampling(s, eos_token_id, where if len(sampling) == 1 else f"{where}[{i}]", limits)
              for i, s in enumerate(sampling)]
    if len(parsed) == 1:
        parsed = parsed * len(prompts)
    ns = {extras.n for _, extras in parsed}
    if len(ns) > 1:
        raise BadRequest(f"all sampling_params of a batch must share the same n, got {sorted(ns)}")
    n = ns.pop()
    if len(prompts) * n > limits.max_queued_requests:
        raise BadRequest(f"{len(prompts)} prompts x n={n} = {len(prompts) * n} generations; at most "
                         f"{limits.max_queued_requests} per request (--max-queued-requests)")
    items = []
    for i, (ids, (params, extras)) in enumerate(zip(prompts, parsed)):
        start, top = logprob_start_len[i], top_logprobs_num[i]
        if return_logprob[i] and not -1 <= start < len(ids):
            raise BadRequest(f"logprob_start_len must be -1 or in [0, {len(ids)}) for a {len(ids)}-token prompt, "
                             f"got {start}")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
        for j in range(n):
            seed = params.seed + j if n > 1 and params.seed is not None else params.seed
            copy = dataclasses.replace(params, stop_token_ids=list(params.stop_token_ids), stop=list(params.stop),
                                       logit_bias=dict(params.logit_bias), seed=seed)
            request = GenerateRequest(
                list(ids), copy, rid=rids[i] if n == 1 else new_rid(),
                top_logprobs_num=top if return_logprob[i] else 0,
                logprob_start_len=start if return_logprob[i] else -1,
            )
            items.append(GenItem(request, return_logprob[i], return_text_in_logprobs,
                                 extras.skip_special_tokens, extras.no_stop_trim))
    return items


def parse_generate(body: Any, tokenizer: Any, eos_token_id: int | None,
                   limits: ServerLimits = ServerLimits()) -> ParsedGenerate:
    """A /generate body -> engine requests. Unknown top-level fields are ignored (the router adds some)."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    if body.get("token_ids_logprob") is not None:
        raise BadRequest("token_ids_logprob is not supported by this server")
    if body.get("custom_logit_processor") is not None:
        raise BadRequest("custom_logit_processor is not supported by this server (no custom logit processors)")
    prompts, is_batch = parse_prompts(body, tokenizer, limits)
    batch = len(prompts)
    sampling = body.get("sampling_params")
    if isinstance(sampling, list):
        if len(sampling) != batch:
            raise BadRequest(f"sampling_params is a list of {len(sampling)} but the batch has {batch} prompts")
    else:
        sampling = [sampling]
    stream = get_field(body, "stream", (bool,), False, "request")
    items = build_items(
        prompts, sampling, make_rids(body.get("rid"), batch, is_batch), eos_token_id,
        return_logprob=_per_item(body, "return_logprob", (bool,), False, batch),
        logprob_start_len=_per_item(body, "logprob_start_len", (int,), -1, batch),
        top_logprobs_num=_per_item(body, "top_logprobs_num", (int,), 0, batch),
        return_text_in_logprobs=get_field(body, "return_text_in_logprobs", (bool,), False, "request"),
        limits=limits,
    )
    return ParsedGenerate(items, single=not is_batch and len(items) == 1, stream=stream)


# ---- engine -> event loop ---------------------------------------------------------------


class Submission:
    """The engine requests of one HTTP call, with their updates delivered on the event loop.

    The engine calls `on_update` from its scheduler thread; we hop onto the
    loop with `call_soon_threadsafe`. Without `stream`, only final outputs are
    forwarded. Use `abort_unfinished` in a `finally` so a disconnected client
    (aiohttp cancels the handler) frees its requests.
    """

    def __init__(self, engine: Any, requests: list[GenerateRequest], stream: bool = False):
        self.engine = engine
        self.requests = requests
        self.stream = stream
        self.final: dict[int, GenerateOutput] = {}
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, GenerateOutput]] = asyncio.Queue()
        self._submitted: list[str] = []
        self._mu = threading.Lock()  # `start` may run on a worker thread while the loop aborts
        self._closed = False

    def _on_update(self, index: int, out: GenerateOutput) -> None:  # scheduler thread
        if not self.stream and out.finish_reason is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, out))
        except RuntimeError:  # the loop is closed: the server stopped and nobody waits any more
            pass

    def start(self) -> None:
        """Submit every request (from any thread); on a rejected one (ValueError), abort the others and
        re-raise. After `abort_unfinished` nothing more is submitted."""
        try:
            for i, req in enumerate(self.requests):
                with self._mu:
                    if self._closed:
                        return
                    self.engine.submit(req, on_update=functools.partial(self._on_update, i))
                    self._submitted.append(req.rid)
        except BaseException:
            self.abort_unfinished()
            raise

    def _take(self, index: int, out: GenerateOutput) -> None:
        if out.finish_reason is not None:
            self.final[index] = out

    async def results(self) -> list[GenerateOutput]:
        """Final outputs in request order."""
        while len(self.final) < len(self.requests):
            self._take(*await self._queue.get())
        return [self.final[i] for i in range(len(self.requests))]

    async def updates(self) -> AsyncIterator[list[tuple[int, GenerateOutput]]]:
        """Batches of (index, newest snapshot) until every request finished; a final is never skipped."""
        while len(self.final) < len(self.requests):
            newest = dict([await self._queue.get()])
            while not self._queue.empty():
                index, out = self._queue.get_nowait()
                newest[index] = out  # a request's final output is its last update
            for index, out in newest.items():
                self._take(index, out)
            yield sorted(newest.items())

    def abort_unfinished(self) -> None:
        with self._mu:
            self._closed = True
            submitted = list(self._submitted)
        for i, rid in enumerate(submitted):
            if i not in self.final:
                self.engine.abort(rid)


# ---- response shaping ------------------------------------------------------------------

def token_text(tokenizer: Any, token_id: int) -> str | None:
    return None if tokenizer is None else tokenizer.decode([token_id], skip_special_tokens=False)


def output_text(item: GenItem, out: GenerateOutput, tokenizer: Any) -> str:
    """Decoded completion; a matched stop token / string is trimmed unless no_stop_trim."""
    if tokenizer is None:
        return ""
    ids, trim = out.output_ids, out.finish_reason is not None and not item.no_stop_trim
    if trim and isinstance(out.matched_stop, int) and ids and ids[-1] == out.matched_stop:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=item.skip_special_tokens)
    if trim and isinstance(out.matched_stop, str) and out.matched_stop:
        pos = text.find(out.matched_stop)  # as SGLang: the engine stops at the first occurrence
        text = text[:pos] if pos >= 0 else text
    return text


def _triples(logprobs: list, ids: list[int], tokenizer: Any) -> list[list]:
    return [[lp, int(t), token_text(tokenizer, t)] for lp, t in zip(logprobs, ids)]


_INTEGER_VERSIONS = WeightVersions()  # no labels: every version is its integer


def meta_info(item: GenItem, out: GenerateOutput, tokenizer: Any = None,
              versions: WeightVersions | None = None) -> dict[str, Any]:
    """SGLang meta_info (+ output_weight_versions, the integer version of each token); e2e_latency only
    once finished. `versions` names the versions (string labels; integers when None)."""
    versions = versions or _INTEGER_VERSIONS
    meta = {
        "id": item.rid,
        "finish_reason": finish_reason_json(out),
        "prompt_tokens": out.prompt_tokens or len(item.request.input_ids),
        "completion_tokens": len(out.output_ids),
        "cached_tokens": out.cached_tokens,
        "weight_version": versions.label(out.weight_version),
        "weight_versions": versions.spans(out.output_versions),
        "output_weight_versions": list(out.output_versions),
    }
    if out.finish_reason is not None:
        meta["e2e_latency"] = out.e2e_latency
    if item.return_logprob:
        tok = tokenizer if item.return_text_in_logprobs else None
        meta["output_token_logprobs"] = _triples(out.output_logprobs, out.output_ids, tok)
        start = item.request.logprob_start_len
        if start >= 0:
            meta["input_token_logprobs"] = _triples(out.input_logprobs or [], item.request.input_ids[start:], tok)
        if item.request.top_logprobs_num > 0:
            meta["output_top_logprobs"] = _top_lists(out.output_top_logprobs or [], tok)
            if start >= 0:
                meta["input_top_logprobs"] = _top_lists(out.input_top_logprobs or [], tok)
    if out.top_p_token_ids is not None:
        meta["top_p_token_ids"], meta["top_p_token_offsets"] = top_p_arrays(out.top_p_token_ids)
    return meta


def _top_lists(positions: list, tok: Any) -> list:
    return [None if position is None else [[lp, int(t), token_text(tok, t)] for t, lp in position]
            for position in positions]


def top_p_arrays(kept: list[list[int]]) -> tuple[str, str]:
    """Kept ids per output token -> (ids, offsets) as base64 little-endian int32 (slime's patched SGLang)."""
    ids = [t for position in kept for t in position]
    offsets = [0]
    for position in kept:
        offsets.append(offsets[-1] + len(position))
    return (base64.b64encode(struct.pack(f"<{len(ids)}i", *ids)).decode("ascii"),
            base64.b64encode(struct.pack(f"<{len(offsets)}i", *offsets)).decode("ascii"))


def generate_response(item: GenItem, out: GenerateOutput, tokenizer: Any = None,
                      versions: WeightVersions | None = None) -> dict[str, Any]:
    """One /generate result object (also one streaming chunk: cumulative, finish_reason null until the end)."""
    return {
        "text": output_text(item, out, tokenizer),
        "output_ids": list(out.output_ids),
        "meta_info": meta_info(item, out, tokenizer, versions),
    }


