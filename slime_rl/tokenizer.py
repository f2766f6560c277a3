"""Tokenizers behind one small API: a character tokenizer and an HF wrapper.

`CharTokenizer` serves the synthetic tasks (tiny models, CPU runs): one id per
character of a fixed alphabet, no files needed. `HFTokenizer` wraps a
`transformers` tokenizer saved on disk (e.g. the converted SmolLM2). Both offer

    encode(text, add_special_tokens=False) -> list[int]
    decode(ids, skip_special_tokens=True) -> str
    eos_token_id / pad_token_id / bos_token_id / vocab_size
    apply_chat_template(messages, add_generation_prompt=True) -> str
    save(directory)

and `load_tokenizer(spec)` builds either from "char" or a directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

CHAR_TOKENIZER_FILE = "char_tokenizer.json"
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
DEFAULT_ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))


class CharTokenizer:
    """Character-level tokenizer: `<pad>`=0, `<bos>`=1, `<eos>`=2, then one id per character.

    Like HF tokenizers, the literal strings "<pad>", "<bos>" and "<eos>" in the
    input text encode to their special ids, so `decode(..., skip_special_tokens=False)`
    round-trips through `encode`. Characters outside the alphabet raise ValueError.
    Like Qwen2's tokenizer it puts no special token before plain text:
    `add_special_tokens` is accepted for the shared API and adds nothing (the tiny
    models trained from scratch on it never see a BOS they were not given).

    Chat template (one line per message, generation prompt "assistant: "):

        system: You are terse.
        user: 2+3=?
        assistant: 
    """

    def __init__(self, alphabet: str = DEFAULT_ALPHABET):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("CharTokenizer alphabet has duplicate characters")
        self.alphabet = alphabet
        self._id_of = {ch: i + len(SPECIAL_TOKENS) for i, ch in enumerate(alphabet)}
        self._id_of.update({tok: i for i, tok in enumerate(SPECIAL_TOKENS)})
        self._token_of = list(SPECIAL_TOKENS) + list(alphabet)
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    pad_token_id = property(lambda self: 0)
    bos_token_id = property(lambda self: 1)
    eos_token_id = property(lambda self: 2)
    vocab_size = property(lambda self: len(self._token_of))

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (the same with or without add_special_tokens: see the class docstring)."""
        ids = []
        for piece in self._special_re.split(text):
            if piece in SPECIAL_TOKENS:
                ids.append(self._id_of[piece])
                continue
            for pos, ch in enumerate(piece):
                tid = self._id_of.get(ch)
                if tid is None:
                    raise ValueError(
                        f"CharTokenizer cannot encode character {ch!r} (U+{ord(ch):04X}) "
                        f"at offset {pos} of {piece[:40]!r}: not in its alphabet"
                    )
                ids.append(tid)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless skip_special_tokens=False."""
        out = []
        for tid in ids:
            tid = int(tid)
            if not 0 <= tid < self.vocab_size:
                raise ValueError(f"token id {tid} out of range for CharTokenizer (vocab {self.vocab_size})")
            if tid < len(SPECIAL_TOKENS) and skip_special_tokens:
                continue
            out.append(self._token_of[tid])
        return "".join(out)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """`role: content` lines; ends with "assistant: " when add_generation_prompt."""
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")

    def save(self, directory: str | Path) -> Path:
        """Write `char_tokenizer.json` into `directory`; returns its path."""
        path = Path(directory) / CHAR_TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"type": "char", "special_tokens": list(SPECIAL_TOKENS), "alphabet": self.alphabet}
        path.write_text(json.dumps(payload, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        """Read a `char_tokenizer.json` file (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / CHAR_TOKENIZER_FILE
        payload = json.loads(path.read_text())
        if payload.get("type") != "char" or payload.get("special_tokens") != list(SPECIAL_TOKENS):
            raise ValueError(f"{path}: not a CharTokenizer file (expected type 'char' and tokens {SPECIAL_TOKENS})")
        return cls(payload["alphabet"])


class HFTokenizer:
    """A `transformers` tokenizer (loaded offline from a directory) behind the shared API.

    `pad_token_id` falls back to `eos_token_id` when the tokenizer defines no
    pad token (common for decoder-only models). The raw tokenizer is `.hf`.
    """

    def __init__(self, directory: str | Path):
        from transformers import AutoTokenizer

        self.path = Path(directory)
        self.hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

    eos_token_id = property(lambda self: self.hf.eos_token_id)
    bos_token_id = property(lambda self: self.hf.bos_token_id)
    vocab_size = property(lambda self: len(self.hf))

    @property
    def pad_token_id(self) -> int | None:
        pad = self.hf.pad_token_id
        return self.hf.eos_token_id if pad is None else pad

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.hf, "chat_template", None):
            raise ValueError(f"tokenizer at {self.path} has no chat_template; cannot format chat messages")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def save(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))


Tokenizer = CharTokenizer | HFTokenizer


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """"char" -> CharTokenizer; a directory with char_tokenizer.json -> CharTokenizer;
    a directory with HF tokenizer files -> HFTokenizer."""
    if str(spec) == "char":
        return CharTokenizer()
    path = Path(spec)
    if path.is_file() and path.name == CHAR_TOKENIZER_FILE:
        return CharTokenizer.load(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer spec {str(spec)!r}: expected 'char' or an existing directory")
    if (path / CHAR_TOKENIZER_FILE).is_file():
        return CharTokenizer.load(path)
    if any((path / name).is_file() for name in _HF_TOKENIZER_FILES):
        return HFTokenizer(path)
    raise ValueError(
        f"tokenizer directory {path} holds neither {CHAR_TOKENIZER_FILE} nor HF tokenizer files "
        f"({', '.join(_HF_TOKENIZER_FILES)})"
    )
