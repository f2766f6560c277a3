"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

Built on the native protocol (`rollout.protocol`): the same sampling
validation, engine bridge and stop-trimming; shapes per the reference
(section 6). Our choices:

- Completions text prompts are tokenized with special tokens (as /generate);
  chat messages go through `tokenizer.apply_chat_template` and are tokenized
  without adding special tokens (the template carries them).
- `max_tokens` defaults to 16 for completions; for chat `max_completion_tokens`
  wins over `max_tokens` and, when neither is given, generation runs to the
  context limit. A prompt plus `max_tokens` beyond the context is a 400 with
  SGLang's message ("Requested token count exceeds the model's maximum
  context length ..."), not clamped. `seed` maps to SGLang's `sampling_seed`.
- Sampling knobs go to the same implementation as /generate's
  (rollout/sampling.py): `temperature, top_p, top_k, min_p, frequency_penalty,
  presence_penalty, repetition_penalty, logit_bias` (token id strings ->
  [-100, 100]), `min_tokens, stop, stop_token_ids, ignore_eos, no_stop_trim,
  skip_special_tokens, n, seed`.
- `echo=true` (completions): each choice's text starts with the prompt text
  (the prompt string, or the decoded ids); with `logprobs`, the prompt tokens'
  logprobs come first (the first one null), as SGLang's serving_completions.
- `continue_final_message=true` (chat): the last message must be the
  assistant's; the template is applied to the messages before it with the
  generation prompt, and that message's text is appended unclosed, so the
  model continues it (SGLang's serving_chat does the same).
- Refused with a 400 naming the key: `regex`, `json_schema`, `ebnf`,
  `stop_regex`, a `response_format` other than text (constrained decoding is
  not implemented), `tools`, `suffix`, `best_of` > 1, `chat_template_kwargs`,
  and any key not listed here. Ignored, because OpenAI clients routinely send
  them and they do not change the tokens: `user`, `metadata`, `store`,
  `service_tier`, `parallel_tool_calls`, `tool_choice` ("none" / "auto"
  without tools), `separate_reasoning`, `stream_reasoning`, `return_hidden_states`
  (false only), `lora_path` (null only).
- Streaming sends deltas; text that could be the start of a stop string (or an
  incomplete UTF-8 character) is held back until the next token decides.
- Both endpoints need a tokenizer (400 otherwise).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

from rollout.http_json import (
    INLINE_PARSE_BYTES,
    short,
    INLINE_SUBMIT,
    SSE_DONE,
    BadRequest,
    dumps_items,
    get_field,
    json_response,
    read_json,
    require,
    sse,
    start_sse,
)
from rollout.protocol import (
    GenItem,
    Submission,
    build_items,
    check_batch,
    encode_text,
    make_rids,
    output_text,
    token_text,
)
from slime_rl.types import GenerateOutput, SampleStatus

if TYPE_CHECKING:
    from rollout.server import ServerState

FINISH_REASONS = {SampleStatus.COMPLETED: "stop", SampleStatus.TRUNCATED: "length", SampleStatus.ABORTED: "abort"}
# OpenAI field -> native sampling_params key (SGLang extras keep their names).
_SAMPLING_FIELDS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "n": "n", "stop": "stop", "seed": "sampling_seed",
    "min_tokens": "min_new_tokens", "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos",
    "no_stop_trim": "no_stop_trim", "skip_special_tokens": "skip_special_tokens", "min_p": "min_p",
    "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty", "logit_bias": "logit_bias",
    # refused by the native parser (constrained decoding is not implemented), named there
    "regex": "regex", "json_schema": "json_schema", "ebnf": "ebnf", "stop_regex": "stop_regex",
}
_COMMON_KEYS = {*_SAMPLING_FIELDS, "model", "stream", "stream_options", "max_tokens", "logprobs", "rid",
                "response_format"}
_COMPLETION_KEYS = _COMMON_KEYS | {"prompt", "echo", "suffix", "best_of"}
_CHAT_KEYS = _COMMON_KEYS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                             "continue_final_message", "chat_template_kwargs"}
# Sent routinely by OpenAI clients, no effect on the tokens: ignored when they hold these values.
_IGNORED: dict[str, Callable[[Any], bool]] = {
    "user": lambda v: True, "metadata": lambda v: True, "store": lambda v: True, "service_tier": lambda v: True,
    "parallel_tool_calls": lambda v: True, "separate_reasoning": lambda v: True, "stream_reasoning": lambda v: True,
    "return_hidden_states": lambda v: v is False, "lora_path": lambda v: False,
}
MAX_LOGIT_BIAS_VALUE = 100.0  # OpenAI's range for logit_bias values


def _check_keys(body: dict, known: set[str]) -> None:
    for key, value in body.items():
        if key in known or value is None:
            continue
        if key in _IGNORED and _IGNORED[key](value):
            continue
        if key in _IGNORED:
            raise BadRequest(f"{key}={short(value)} is not supported by this server")
        raise BadRequest(f"unknown key {short(key)}; this server knows: {', '.join(sorted(known | set(_IGNORED)))}")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise BadRequest(f"response_format={short(response_format)} is not supported by this server (only text; "
                         f"constrained decoding is not implemented)")
    bias = body.get("logit_bias")
    if isinstance(bias, dict):
        for key, value in bias.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_LOGIT_BIAS_VALUE:
                raise BadRequest(f"logit_bias[{short(key)}] must be in [-100, 100], got {value}")


def _check_context(state: ServerState, prompts: list[list[int]], max_tokens: int) -> None:
    """SGLang's refusal (tokenizer_manager) of a prompt + max_tokens beyond the context."""
    context = state.engine.context_len
    for ids in prompts:
        if len(ids) + max_tokens > context:
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of {context} tokens. "
                f"You requested a total of {len(ids) + max_tokens} tokens: {len(ids)} tokens from the input "
                f"messages and {max_tokens} tokens for the completion. Please reduce the number of tokens in "
                f"the input messages or the completion to fit within the limit.")


@dataclass
class OpenAICall:
    """One parsed completions / chat request."""

    chat: bool
    items: list[GenItem]  # choice order: prompt0 x n, prompt1 x n, ...
    n: int
    model: str
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None  # None = no logprobs
    echo: list[str] | None = None  # completions echo: the prompt text of each prompt
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def envelope(self, choices: list[dict], chunk: bool = False) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": prefix + self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}


def _build(state: ServerState, body: dict, chat: bool, prompts: list[list[int]], is_batch: bool,
           max_tokens: int | None, top_logprobs: int | None, echo: list[str] | None = None) -> OpenAICall:
    sampling = {native: body[key] for key, native in _SAMPLING_FIELDS.items() if body.get(key) is not None}
    if max_tokens is not None:
        _check_context(state, prompts, max_tokens)
    sampling["max_new_tokens"] = state.engine.context_len if max_tokens is None else max_tokens
    batch = len(prompts)
    prompt_logprobs = echo is not None and top_logprobs is not None
    items = build_items(
        prompts, [sampling], make_rids(body.get("rid"), batch, is_batch), state.eos_token_id,
        return_logprob=[top_logprobs is not None] * batch, logprob_start_len=[0 if prompt_logprobs else -1] * batch,
        top_logprobs_num=[top_logprobs or 0] * batch, where="request", limits=state.limits,
    )
    options = get_field(body, "stream_options", (dict,), {}, "request")
    model = body.get("model") if isinstance(body.get("model"), str) else state.served_model_name
    return OpenAICall(chat, items, len(items) // batch, model, get_field(body, "stream", (bool,), False, "request"),
                      bool(options.get("include_usage")), top_logprobs, echo)


def parse_completion(state: ServerState, body: dict) -> OpenAICall:
    _check_keys(body, _COMPLETION_KEYS)
    if body.get("suffix"):
        raise BadRequest("suffix is not supported by this server")
    best_of = get_field(body, "best_of", (int,), 1, "request")
    if best_of != 1:
        raise BadRequest(f"best_of={best_of} is not supported by this server (use n)")
    echo = get_field(body, "echo", (bool,), False, "request")
    prompt = require(body, "prompt", (str, list), "completions")
    is_batch = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
    if isinstance(prompt, str):
        prompts = [encode_text(state.tokenizer, prompt, "prompt")]
    elif is_batch:
        check_batch(len(prompt), "prompt", state.limits)
        prompts = [encode_text(state.tokenizer, p, f"prompt[{i}]") if isinstance(p, str)
                   else _ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    else:
        prompts = [_ids(prompt, "prompt")]
    logprobs = get_field(body, "logprobs", (int,), None, "request")
    if logprobs is not None and logprobs < 0:
        raise BadRequest(f"logprobs must be >= 0, got {logprobs}")
    max_tokens = get_field(body, "max_tokens", (int,), 16, "request")
    texts = None
    if echo:
        raw = prompt if is_batch else [prompt]
        texts = [p if isinstance(p, str) else state.tokenizer.decode(ids) for p, ids in zip(raw, prompts)]
    return _build(state, body, False, prompts, is_batch, max_tokens, logprobs, texts)


def _ids(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(type(i) is int for i in value):
        raise BadRequest(f"{where} must be a string or a non-empty list of token ids")
    return value


def _message_text(message: Any, i: int) -> dict[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequest(f"messages[{i}] must be an object with a string 'role'")
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{i}].content: only text parts are supported, got {part!r}")
            parts.append(part["text"])
        content = "".join(parts)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")
    return {"role": message["role"], "content": content}


def parse_chat(state: ServerState, body: dict) -> OpenAICall:
    _check_keys(body, _CHAT_KEYS)
    if body.get("tools"):
        raise BadRequest("tools are not supported by this server")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise BadRequest(f"tool_choice={short(body.get('tool_choice'))} is not supported by this server (no tools)")
    if body.get("chat_template_kwargs"):
        raise BadRequest("chat_template_kwargs is not supported by this server")
    messages = require(body, "messages", (list,), "chat")
    if not messages:
        raise BadRequest("messages must not be empty")
    messages = [_message_text(m, i) for i, m in enumerate(messages)]
    prefix = ""
    if get_field(body, "continue_final_message", (bool,), False, "request"):
        if messages[-1]["role"] != "assistant":
            raise BadRequest(f"continue_final_message needs the last message to be the assistant's, "
                             f"got role {short(messages[-1]['role'])}")
        prefix, messages = messages[-1]["content"], messages[:-1]
    try:
        text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as exc:
        raise BadRequest(f"messages: cannot apply the chat template: {exc}") from exc
    prompt = encode_text(state.tokenizer, text, "messages", add_special_tokens=False)
    if prefix:  # the final assistant message, unclosed: the model continues it
        prompt += encode_text(state.tokenizer, prefix, "messages[-1].content", add_special_tokens=False)
    max_tokens = get_field(body, "max_completion_tokens", (int,), None, "request")
    if max_tokens is None:
        max_tokens = get_field(body, "max_tokens", (int,), None, "request")
    top = get_field(body, "top_logprobs", (int,), 0, "request")
    want = get_field(body, "logprobs", (bool,), False, "request")
    if top < 0 or (top and not want):
        raise BadRequest(f"top_logprobs must be >= 0 and needs logprobs=true, got {top}")
    return _build(state, body, True, [prompt], False, max_tokens, top if want else None)


# ---- response shaping -------------------------------------------------------------------


def completion_logprobs(call: OpenAICall, index: int, out: GenerateOutput, tok: Any, start: int) -> dict[str, Any]:
    """Legacy completions logprobs for output tokens [start:] (with echo and start 0, the prompt
    tokens first); text offsets follow the visible text (a skipped special token adds nothing)."""
    item = call.items[index]
    echo = call.echo[index // call.n] if call.echo is not None and start == 0 else None
    ids = out.output_ids[start:]
    lps = list(out.output_logprobs[start:])
    tops = (out.output_top_logprobs or [])[start:] if call.top_logprobs else [None] * len(ids)
    offset = len(tok.decode(out.output_ids[:start], skip_special_tokens=item.skip_special_tokens))
    offsets = []
    if echo is not None:
        prompt = item.request.input_ids
        offsets, at = [], 0
        for t in prompt:
            offsets.append(at)
            at += len(tok.decode([t], skip_special_tokens=item.skip_special_tokens))
        offset = len(echo)
        ids, lps = prompt + ids, list(out.input_logprobs or [None] * len(prompt)) + lps
        in_tops = out.input_top_logprobs if call.top_logprobs else None
        tops = list(in_tops or [None] * len(prompt)) + list(tops)
    for t in ids[len(offsets):]:
        offsets.append(offset)
        offset += len(tok.decode([t], skip_special_tokens=item.skip_special_tokens))
    return {
        "text_offset": offsets, "token_logprobs": lps, "tokens": [token_text(tok, t) for t in ids],
        "top_logprobs": [None if pos is None else {token_text(tok, t): lp for t, lp in pos} for pos in tops],
    }


def _token_entry(tok: Any, token_id: int, logprob: float) -> dict[str, Any]:
    s = token_text(tok, token_id)
    return {"token": s, "bytes": list(s.encode("utf-8")), "logprob": logprob}


def chat_logprobs(call: OpenAICall, out: GenerateOutput, tok: Any, start: int) -> dict[str, Any]:
    tops = (out.output_top_logprobs or [])[start:] if call.top_logprobs else []
    content = []
    for k, (t, lp) in enumerate(zip(out.output_ids[start:], out.output_logprobs[start:])):
        entry = _token_entry(tok, t, lp)
        entry["top_logprobs"] = [_token_entry(tok, tt, tlp) for tt, tlp in tops[k]] if k < len(tops) else []
        content.append(entry)
    return {"content": content}


def _logprobs(call: OpenAICall, index: int, out: GenerateOutput, tok: Any, start: int = 0) -> dict | None:
    if call.top_logprobs is None:
        return None
    if call.chat:
        return chat_logprobs(call, out, tok, start)
    return completion_logprobs(call, index, out, tok, start)


def final_choice(call: OpenAICall, index: int, out: GenerateOutput, tok: Any) -> dict[str, Any]:
    text = output_text(call.items[index], out, tok)
    if call.echo is not None:
        text = call.echo[index // call.n] + text
    choice: dict[str, Any] = {"index": index}
    if call.chat:
        choice["message"] = {"role": "assistant", "content": text, "reasoning_content": None, "tool_calls": None}
    else:
        choice["text"] = text
    choice.update(logprobs=_logprobs(call, index, out, tok), finish_reason=FINISH_REASONS[out.finish_reason],
                  matched_stop=out.matched_stop)
    return choice


def usage(call: OpenAICall, outs: list[GenerateOutput]) -> dict[str, Any]:
    firsts = outs[:: call.n]  # the prompt is counted once per prompt, not once per sample
    prompt = sum(o.prompt_tokens or len(item.request.input_ids) for o, item in zip(firsts, call.items[:: call.n]))
    completion = sum(len(o.output_ids) for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in firsts)}}


def held_back(text: str, stops: list[str]) -> str:
    """`text` minus a tail that may still become a stop string or a whole UTF-8 character."""
    cut = len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                cut = min(cut, len(text) - k)
                break
    return text[:cut]


@dataclass
class DeltaState:
    """What one streamed choice has sent so far."""

    text: str = ""
    tokens: int = 0
    started: bool = False

    def choice(self, call: OpenAICall, index: int, out: GenerateOutput, tok: Any) -> dict[str, Any] | None:
        item, final = call.items[index], out.finish_reason is not None
        if final:
            text = output_text(item, out, tok)
        else:
            text = held_back(tok.decode(out.output_ids, skip_special_tokens=item.skip_special_tokens),
                             item.request.sampling.stop)
        delta_text = text[len(self.text):] if text.startswith(self.text) else ""
        if not final and not delta_text and self.started and len(out.output_ids) == self.tokens:
            return None
        logprobs = _logprobs(call, index, out, tok, self.tokens)
        choice: dict[str, Any] = {"index": index}
        if call.chat:
            choice["delta"] = {"content": delta_text} if self.started else {"role": "assistant", "content": delta_text}
        else:
            echo = call.echo[index // call.n] if call.echo is not None and not self.started else ""
            choice["text"] = echo + delta_text
        choice.update(logprobs=logprobs, finish_reason=FINISH_REASONS[out.finish_reason] if final else None,
                      matched_stop=out.matched_stop if final else None)
        self.text, self.tokens, self.started = self.text + delta_text, len(out.output_ids), True
        return choice


# ---- handlers ---------------------------------------------------------------------------


async def _stream(resp: web.StreamResponse, call: OpenAICall, sub: Submission, tok: Any) -> None:
    deltas = [DeltaState() for _ in call.items]
    async for updates in sub.updates():
        for index, out in updates:
            choice = deltas[index].choice(call, index, out, tok)
            if choice is not None:
                await resp.write(sse(call.envelope([choice], chunk=True)))
    if call.include_usage:
        outs = [sub.final[i] for i in range(len(call.items))]
        await resp.write(sse({**call.envelope([], chunk=True), "usage": usage(call, outs)}))
    await resp.write(SSE_DONE)


async def _run(request: web.Request, state: ServerState, call: OpenAICall) -> web.StreamResponse:
    tok = state.tokenizer
    async with state.admit(len(call.items)):
        sub = Submission(state.engine, [item.request for item in call.items], stream=call.stream)
        try:
            try:
                await state.off_loop(sub.start, heavy=len(call.items) > INLINE_SUBMIT)
            except ValueError as exc:
                raise BadRequest(str(exc)) from exc
            if call.stream:
                resp = await start_sse(request)
                try:
                    await _stream(resp, call, sub, tok)
                except ConnectionResetError:  # the client went away mid-stream; `finally` aborts
                    pass
                return resp
            outs = await sub.results()
        finally:
            sub.abort_unfinished()

    def shape() -> str:
        choices = [final_choice(call, i, out, tok) for i, out in enumerate(outs)]
        return dumps_items(choices, {**call.envelope([]), "usage": usage(call, outs)}, "choices")

    return web.Response(text=await state.off_loop(shape), content_type="application/json")


def _handler(parse: Callable[[ServerState, dict], OpenAICall], get_state: Callable[[web.Request], ServerState]):
    async def handler(request: web.Request) -> web.StreamResponse:
        state = get_state(request)
        if state.tokenizer is None:
            raise BadRequest(f"{request.path} needs a tokenizer and this server has none; use /generate with input_ids")
        body = await read_json(request)
        heavy = request.content_length is None or request.content_length > INLINE_PARSE_BYTES
        return await _run(request, state, await state.off_loop(parse, state, body, heavy=heavy))

    return handler


def model_card(state: ServerState) -> dict[str, Any]:
    name = state.served_model_name
    return {"id": name, "object": "model", "created": state.created, "owned_by": "sglang", "root": name,
            "parent": None, "max_model_len": state.engine.context_len}


def add_routes(app: web.Application, get_state: Callable[[web.Request], ServerState]) -> None:
    async def list_models(request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [model_card(get_state(request))]})

    async def get_model(request: web.Request) -> web.Response:
        state = get_state(request)
        # A served name that is an absolute path loses its leading "/" inside the URL path.
        if request.match_info["model_id"].lstrip("/") != state.served_model_name.lstrip("/"):
            return json_response({"error": {"message": f"model {request.match_info['model_id']!r} not found; "
                                                           f"this server serves {state.served_model_name!r}",
                                                "type": "NotFoundError", "code": 404}}, status=404)
        return json_response(model_card(state))

    app.router.add_post("/v1/completions", _handler(parse_completion, get_state))
    app.router.add_post("/v1/chat/completions", _handler(parse_chat, get_state))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
