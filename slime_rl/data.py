"""Prompt datasets: JSONL / Parquet rows -> tokenized `PromptRecord`s.

Each row holds a prompt (a string, or a chat message list
`[{"role": ..., "content": ...}, ...]`), a label for the reward function, and
optionally a reference response (SFT data: a string, or the messages of a
multi-turn conversation after the prompt) and metadata fields. A message list
always goes through the tokenizer's chat template; a string does when
`apply_chat_template=True` (as one user message after the optional system
prompt). A plain string is encoded as `tokenizer(prompt).input_ids` are, with
the tokenizer's own special tokens (`<bos>` for Llama's; none for Qwen2's or the
character tokenizer): a checkpoint trained on BOS-led text sees BOS-led prompts. A
chat-templated prompt gets exactly the template's tokens (the template writes
its own BOS where it has one; the tokenizer's would double it). When an HF
tokenizer and its chat template disagree about BOS (one puts it first, the
other does not), loading chat-templated prompts logs a warning once.

Bad rows fail loudly with `file:line: problem` (line = 1-based line of a JSONL
file, 1-based row of a Parquet file); `skip_bad_lines=True` skips them instead
and counts each reason in `DataStats`.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

logger = logging.getLogger(__name__)

_MAX_SKIP_WARNINGS = 20  # per file; a summary line follows


class DataError(ValueError):
    """Bad dataset input; the message names the file (and line) and the problem."""


class _BadRow(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class PromptRecord:
    prompt_text: str  # after chat templating
    prompt_ids: list[int]
    label: Any
    metadata: dict[str, Any]
    source: str  # "file:line"
    response_text: str | list[dict[str, str]] | None = None  # SFT: text, or the messages after the prompt


@dataclass
class DataStats:
    loaded: int = 0
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)


def load_prompts(
    path: str | Path,
    tokenizer: Any,
    prompt_key: str = "prompt",
    label_key: str | None = "label",
    response_key: str | None = None,
    metadata_keys: Iterable[str] = (),
    apply_chat_template: bool = False,
    system_prompt: str | None = None,
    max_prompt_tokens: int = 512,
    skip_bad_lines: bool = False,
) -> tuple[list[PromptRecord], DataStats]:
    """Load and tokenize a prompt dataset (`.jsonl` or `.parquet`).

    Required per row: `prompt_key`, `label_key` (unless None), `response_key`
    (when given) and every `metadata_keys` entry. Raises DataError on the first
    bad row unless `skip_bad_lines`, and when no row is loaded.
    """
    path = Path(path)
    metadata_keys = tuple(metadata_keys)
    stats = DataStats()
    skipped: Counter[str] = Counter()
    records: list[PromptRecord] = []
    for line_no, row in _iter_rows(path):
        source = f"{path}:{line_no}"
        try:
            if isinstance(row, _BadRow):
                raise row
            records.append(
                _make_record(
                    row, source, tokenizer, prompt_key, label_key, response_key,
                    metadata_keys, apply_chat_template, system_prompt, max_prompt_tokens,
                )
            )
        except _BadRow as bad:
            if not skip_bad_lines:
                raise DataError(f"{source}: {bad}") from None
            skipped[bad.reason] += 1
            if sum(skipped.values()) <= _MAX_SKIP_WARNINGS:
                logger.warning("skipping %s: %s", source, bad)
    stats.loaded = len(records)
    stats.skipped = sum(skipped.values())
    stats.skipped_by_reason = dict(skipped)
    if stats.skipped:
        logger.warning("%s: skipped %d bad line(s): %s", path, stats.skipped, stats.skipped_by_reason)
    if not records:
        detail = f" ({stats.skipped} bad line(s) skipped: {stats.skipped_by_reason})" if stats.skipped else ""
        raise DataError(f"{path}: no records{detail}")
    return records, stats


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line (UTF-8), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | _BadRow]]:
    """(1-based line/row number, parsed row or the parse problem)."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise DataError(f"{path}: unsupported extension {path.suffix!r} (expected .jsonl or .parquet)")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | _BadRow]]:
    # Bytes, decoded line by line: a stray non-UTF-8 byte is one bad line, not an error for the whole file.
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = f"not UTF-8 text: byte {raw[e.start]:#04x} at offset {e.start} of the line"
                yield line_no, _BadRow("not_utf8", problem)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, _BadRow("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            except RecursionError:
                yield line_no, _BadRow("invalid_json", "invalid JSON: nested too deeply")
                continue
            if not isinstance(row, dict):
                yield line_no, _BadRow("not_an_object", f"expected a JSON object, got {type(row).__name__}")
                continue
            yield line_no, row


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file: {e}") from e
    for row_no, row in enumerate(table.to_pylist(), start=1):
        yield row_no, row


def _make_record(
    row: dict[str, Any],
    source: str,
    tokenizer: Any,
    prompt_key: str,
    label_key: str | None,
    response_key: str | None,
    metadata_keys: tuple[str, ...],
    apply_chat_template: bool,
    system_prompt: str | None,
    max_prompt_tokens: int,
) -> PromptRecord:
    _check_keys(row, [prompt_key] + [k for k in (label_key, response_key) if k is not None] + list(metadata_keys))
    prompt_text, templated = _format_prompt(row[prompt_key], tokenizer, apply_chat_template, system_prompt)
    try:
        prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=not templated)
    except ValueError as e:
        raise _BadRow("untokenizable", f"cannot tokenize prompt: {e}") from None
    if len(prompt_ids) > max_prompt_tokens:
        raise _BadRow(
            "prompt_too_long", f"prompt is {len(prompt_ids)} tokens, longer than max_prompt_tokens={max_prompt_tokens}"
        )
    response = None
    if response_key is not None:
        response = row[response_key]
        if isinstance(response, list):  # a multi-turn conversation after the prompt
            response = _check_messages(response)
            if response[0]["role"] != "assistant":
                raise _BadRow("bad_response", f"{response_key!r}: a message list starts with the assistant's turn "
                              f"(the prompt ends where the model speaks), got role {response[0]['role']!r}")
        elif not isinstance(response, str):
            raise _BadRow("bad_response", f"{response_key!r} must be a string or a message list, "
                          f"got {type(response).__name__}")
    return PromptRecord(
        prompt_text=prompt_text,
        prompt_ids=prompt_ids,
        label=row[label_key] if label_key is not None else None,
        metadata={k: row[k] for k in metadata_keys},
        source=source,
        response_text=response,
    )


def _check_keys(row: dict[str, Any], required: Iterable[str]) -> None:
    for key in required:
        if key not in row:
            raise _BadRow("missing_key", f"missing key {key!r}")


def _check_prompt(prompt: Any) -> list[dict[str, str]] | None:
    """A row's prompt as written, checked without a tokenizer: None for a non-empty string, the messages of a
    valid message list."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _BadRow("empty_prompt", "empty prompt")
        return None
    if isinstance(prompt, list):
        if not prompt:
            raise _BadRow("empty_prompt", "empty prompt (empty message list)")
        return _check_messages(prompt)
    raise _BadRow("bad_prompt_type", f"prompt must be a string or a message list, got {type(prompt).__name__}")


def _format_prompt(prompt: Any, tokenizer: Any, apply_chat_template: bool,
                   system_prompt: str | None) -> tuple[str, bool]:
    """The prompt text the model sees (raw string or chat-templated messages), and whether it is templated."""
    messages = _check_prompt(prompt)
    if messages is None:
        if not apply_chat_template:
            return prompt, False
        messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    warn_bos_disagreement(tokenizer)
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True), True
    except Exception as e:  # template errors (jinja raise_exception) are data problems
        raise _BadRow("chat_template_error", f"chat template failed: {e}") from None


_BOS_CHECKED: "weakref.WeakSet" = weakref.WeakSet()  # tokenizers checked (a dead one's id may be reused)


def bos_disagreement(tokenizer: Any) -> str | None:
    """How an HF tokenizer and its chat template disagree about BOS, or None (also for the character tokenizer,
    whose built-in template is a stand-in for models trained from scratch)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or not hasattr(tokenizer, "hf"):
        return None
    try:
        plain = tokenizer.encode("x", add_special_tokens=True)[:1] == [bos]
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
        templated = tokenizer.encode(text, add_special_tokens=False)[:1] == [bos]
    except Exception:  # no template, or one that rejects this message: the rows will say so
        return None
    if plain == templated:
        return None
    token = tokenizer.decode([bos], skip_special_tokens=False)
    if plain:
        return (f"the tokenizer puts {token} before plain text but its chat template does not write it: chat "
                f"prompts start without {token}, plain-string prompts with it; check which the checkpoint expects")
    return (f"the chat template writes {token} but the tokenizer does not add it to plain text: plain-string "
            f"prompts (data.apply_chat_template false) start without {token}; check which the checkpoint expects")


def warn_bos_disagreement(tokenizer: Any) -> None:
    """`bos_disagreement` logged once per tokenizer."""
    if tokenizer in _BOS_CHECKED:
        return
    _BOS_CHECKED.add(tokenizer)
    problem = bos_disagreement(tokenizer)
    if problem:
        logger.warning("BOS: %s", problem)


def _check_messages(messages: list[Any]) -> list[dict[str, str]]:
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _BadRow("malformed_messages", f"message {i} must be an object, got {type(msg).__name__}")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                raise _BadRow("malformed_messages", f"message {i} needs a string {key!r}")
    if not any(msg["content"].strip() for msg in messages):
        raise _BadRow("empty_prompt", "empty prompt (all messages empty)")
    return [dict(m) for m in messages]  # extra keys (name, tool_calls) reach the template
