"""`ChatEnvironment`: a token-level environment (`slime_rl.protocols.Environment`) over a text-level one,
rendered with the tokenizer's chat template.

A text environment speaks in chat messages:

    reset(sample) -> list[dict]          messages appended after the prompt (often none: the prompt opens it)
    step(text) -> (messages, reward, done, info)

`text` is the model's turn decoded (special tokens dropped); `messages` are what comes back — a `tool` role
message for tool results, `user` for the other side of the dialogue. Each reply is rendered once, as the
chat template renders those messages after an assistant turn, ending with the template's generation prompt;
nothing rendered before is ever re-rendered or re-tokenised.

The rendering is found by probing the template once: it renders a dummy exchange with and without the new
messages, and the difference is what follows an assistant turn. A model turn that ended on the EOS token
gets only what the template puts after EOS (e.g. a newline after `<|im_end|>`); a turn cut off by the token
budget gets the EOS text first, so the conversation keeps its shape.
"""

from __future__ import annotations

from typing import Any, Protocol

from slime_rl.types import Sample

_U, _A = "\x01probe-user\x01", "\x01probe-assistant\x01"


class TextEnvironment(Protocol):
    def reset(self, sample: Sample) -> list[dict[str, str]]: ...

    def step(self, text: str) -> tuple[list[dict[str, str]], float, bool, dict[str, Any]]: ...


class ChatRenderer:
    """Renders messages that follow an assistant turn, as the tokenizer's chat template does."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._probe = [{"role": "user", "content": _U}, {"role": "assistant", "content": _A}]
        closed = self._template(self._probe, add_generation_prompt=False)
        if _A not in closed:
            raise ValueError("the chat template does not render assistant messages' content; cannot run episodes")
        self._closed = closed
        after = closed[closed.index(_A) + len(_A):]  # what the template puts after an assistant message
        self.eos_text = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
        self._after_eos = after[len(self.eos_text):] if after.startswith(self.eos_text) else after

    def _template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def text(self, messages: list[dict[str, str]], ended_with_eos: bool = True) -> str:
        full = self._template(self._probe + list(messages), add_generation_prompt=True)
        if not full.startswith(self._closed):
            raise ValueError("the chat template renders earlier messages differently once more follow; "
                             "its turns cannot be appended token by token")
        head = self._after_eos if ended_with_eos else self.eos_text + self._after_eos
        return head + full[len(self._closed):]

    def ids(self, messages: list[dict[str, str]], ended_with_eos: bool = True) -> list[int]:
        return self.tokenizer.encode(self.text(messages, ended_with_eos), add_special_tokens=False)


class ChatEnvironment:
    """Token-level Environment over `text_env` (see the module docstring)."""

    def __init__(self, text_env: TextEnvironment, tokenizer, renderer: ChatRenderer | None = None):
        self.text_env, self.tokenizer = text_env, tokenizer
        self.renderer = renderer or ChatRenderer(tokenizer)

    def reset(self, sample: Sample) -> list[int]:
        messages = self.text_env.reset(sample)
        if not messages:
            return []
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def step(self, action_ids: list[int]) -> tuple[list[int], float, bool, dict[str, Any]]:
        eos = self.tokenizer.eos_token_id
        ended = bool(action_ids) and action_ids[-1] == eos
        text = self.tokenizer.decode(action_ids, skip_special_tokens=True)
        messages, reward, done, info = self.text_env.step(text)
        ids = [] if done else self.renderer.ids(messages, ended_with_eos=ended)
        return ids, reward, done, info
