"""A word-level tokenizer for tiny models on the support task: one token per word, per two digits of a number
(order id "A9268" = "A", "92", "68") and per other character, decoded by plain concatenation.

A character model must copy a 4-digit order id digit by digit from the customer's message into a tool call,
which a 0.4M-parameter model does not learn on a CPU budget. One token per number is no better: each of the
9,000 ids is seen about once in the warm-up, so its embedding stays near its random start and a 1.7M model
copied 20% of them after 2,250 steps. Two-digit chunks are 110 tokens, each seen thousands of times, and the
copy is two steps of the pattern "the token after the one I just wrote": after the default warm-up the most
likely token is the right first chunk in 90% of held-out cases and the right second one in 93%.

It is the task's tokenizer for a tiny model (`CustomerSupportTask.tokenizer`, built once under the run's
output directory); `--model.tokenizer char` goes back to characters. It is an ordinary HF tokenizer
directory (WordLevel model, a split pre-tokenizer that keeps every space, the "role: content" chat template
of `CharTokenizer`); to build one elsewhere:

    python -m slime_rl.tasks.customer_support.vocab DIR

Its vocabulary is read off the simulator: the conversations of the oracle, an evasive agent and one that
fumbles its tool calls over many seeds (every customer template, tool result and tool error), plus the
printable ASCII characters; anything else is `<unk>`.
"""

from __future__ import annotations

import re
import string
import sys
from pathlib import Path

from .env import SupportEnv
from .policies import evasive_policy, oracle_policy
from .task import SYSTEM_PROMPT

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PATTERN = r"\d{1,2}|[A-Za-z_]+|\s|[^\sA-Za-z\d_]"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def _fumbling(history: list[str], view: dict) -> str:
    """An agent that gets every kind of tool call wrong in turn, so the error observations are in the corpus."""
    bad = ('<tool_call>{"name": "lookup_order", "arguments": {"order_id": "A0000"}}</tool_call>',
           '<tool_call>{"name": "lookup_order", "arguments": {"order": 5}}</tool_call>',
           '<tool_call>{"name": "refund_everything", "arguments": {}}</tool_call>',
           '<tool_call>{"name": "lookup_order", "arguments": </tool_call>',
           '<tool_call>{"name": "change_address", "arguments": {"order_id": "A0000", "new_address": ""}}</tool_call>',
           '<tool_call>{"name": "start_self_service_refund", "arguments": {"order_id": "A0000", "reason": "x"}}'
           '</tool_call>') + tuple(f'<tool_call>{{"name": "check_delivery", "arguments": {{"order_id": {v}}}}}</tool_call>'
                                   for v in ("7", "1.5", "true", "null", '["A1"]', '{"a": 1}', '"' + "A" * 40 + '"'))
    turn = len(history) - 1
    if turn >= 3:
        return oracle_policy(history, view)
    return bad[(len(history[0]) + turn) % len(bad)]  # the opening's length varies the start: all kinds get tried


def _json_errors() -> list[str]:
    """The messages Python's JSON parser gives for broken calls (they reach the model in error observations)."""
    import json

    out = []
    for broken in ("{oops", "{", '{"a" 1}', '{"a": }', '{"a": 1,}', '{"a": "x', '{"a": 1} x', "[1 2]", '{"a":\x01}'):
        try:
            json.loads(broken)
        except ValueError as exc:
            out.append(str(exc))
    return out


def _corpus(seeds: int) -> list[str]:
    texts = [SYSTEM_PROMPT, "system user assistant tool", *_json_errors()]
    env = SupportEnv()
    for policy in (oracle_policy, evasive_policy, _fumbling):
        for seed in range(seeds):
            history = [env.reset(seed)]
            view, done = env.scenario.view(), False
            while not done:
                action = policy(history, view)
                observation, _, done, _ = env.step(action)
                texts += [action, observation]
                history.append(observation)
            texts.append(history[0])
    return texts


def build_tokenizer(out_dir: str | Path, seeds: int = 500) -> Path:
    """Write the tokenizer to `out_dir` (an HF tokenizer directory); returns it. The vocabulary is complete by
    ~300 seeds (every template, product, street and city); more only take longer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: set[str] = set()
    for text in _corpus(seeds):
        words.update(re.findall(PATTERN, text))
    words.update(str(i) for i in range(100))
    words.update(f"{i:02d}" for i in range(10))
    words.update(string.printable)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in sorted(words - set(SPECIALS)):
        vocab[word] = len(vocab)
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(PATTERN), behavior="isolated")
    raw.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


def ensure_tokenizer(out_dir: str | Path) -> Path:
    """`out_dir` holding the tokenizer, built there unless it already is. Safe when several processes of one
    job (torchrun ranks) call it at once: each builds in its own temporary folder, the first rename wins."""
    import shutil
    import tempfile

    out = Path(out_dir)
    if (out / "tokenizer.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out.parent))
    build_tokenizer(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process got there first (or out exists without a tokenizer: reported below)
        shutil.rmtree(tmp, ignore_errors=True)
    if not (out / "tokenizer.json").is_file():
        raise ValueError(f"customer_support: {out} exists but holds no tokenizer.json; remove it or set model.tokenizer")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m slime_rl.tasks.customer_support.vocab OUT_DIR")
    print(f"wrote {build_tokenizer(sys.argv[1])}")
