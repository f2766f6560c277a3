"""Prompt loading: formats, chat templating, and errors that name file:line."""

from __future__ import annotations

import json
import logging
import re

import pytest

from slime_rl.data import DataError, load_prompts, write_jsonl
from slime_rl.tokenizer import CharTokenizer

TOK = CharTokenizer()


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_basic(tmp_path):
    path = write_jsonl(
        tmp_path / "d" / "train.jsonl",
        [
            {"prompt": "1+2=", "label": "3", "level": 1},
            {"prompt": "10+20=", "label": 30, "level": 2, "extra": "ignored"},
        ],
    )
    records, stats = load_prompts(path, TOK, metadata_keys=("level",))
    assert (stats.loaded, stats.skipped, stats.skipped_by_reason) == (2, 0, {})
    r0, r1 = records
    assert r0.prompt_text == "1+2=" and r0.prompt_ids == TOK.encode("1+2=")
    assert r0.label == "3" and r1.label == 30
    assert r0.metadata == {"level": 1} and r1.metadata == {"level": 2}
    assert r0.source == f"{path}:1" and r1.source == f"{path}:2"
    assert r0.response_text is None


def test_blank_lines_keep_line_numbers(tmp_path):
    path = _write_lines(tmp_path / "a.jsonl", ['{"prompt": "a", "label": 1}', "", "  ", '{"prompt": "b", "label": 2}'])
    records, _ = load_prompts(path, TOK)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:4"]


def test_chat_template_string_and_messages(tmp_path):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "2+2=", "label": 4}, {"prompt": msgs, "label": 0}])
    plain, _ = load_prompts(path, TOK)
    assert plain[0].prompt_text == "2+2="  # string untouched without apply_chat_template
    assert plain[1].prompt_text == "system: S\nuser: hi\nassistant: "  # message list always templated
    templ, _ = load_prompts(path, TOK, apply_chat_template=True, system_prompt="Be brief.")
    assert templ[0].prompt_text == "system: Be brief.\nuser: 2+2=\nassistant: "
    assert templ[0].prompt_ids == TOK.encode(templ[0].prompt_text)
    assert templ[1].prompt_text == "system: S\nuser: hi\nassistant: "  # own system message kept


def test_response_key(tmp_path):
    rows = [{"prompt": "1+1=", "label": 2, "response": "2"}, {"prompt": "x", "label": 1}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: missing key 'response'$"):
        load_prompts(path, TOK, response_key="response")
    records, stats = load_prompts(path, TOK, response_key="response", skip_bad_lines=True)
    assert records[0].response_text == "2" and stats.skipped_by_reason == {"missing_key": 1}


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    table = pa.table({"question": ["3*3=", "", "4*4="], "answer": ["9", "0", "16"]})
    pq.write_table(table, path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: empty prompt$"):
        load_prompts(path, TOK, prompt_key="question", label_key="answer")
    records, stats = load_prompts(path, TOK, prompt_key="question", label_key="answer", skip_bad_lines=True)
    assert [r.label for r in records] == ["9", "16"]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3"]
    assert stats.skipped_by_reason == {"empty_prompt": 1}


BAD_LINES = [
    ('{"prompt": "ok", "label": 1}', None, None),
    ('{"prompt": "x", ', "invalid_json", "invalid JSON"),
    ("[1, 2]", "not_an_object", "expected a JSON object, got list"),
    ('{"prompt": "x"}', "missing_key", "missing key 'label'"),
    ('{"label": 1}', "missing_key", "missing key 'prompt'"),
    ('{"prompt": "   ", "label": 1}', "empty_prompt", "empty prompt"),
    ('{"prompt": [], "label": 1}', "empty_prompt", "empty prompt"),
    ('{"prompt": [{"role": "user"}], "label": 1}', "malformed_messages", "message 0 needs a string 'content'"),
    ('{"prompt": ["hi"], "label": 1}', "malformed_messages", "message 0 must be an object, got str"),
    ('{"prompt": 5, "label": 1}', "bad_prompt_type", "prompt must be a string or a message list, got int"),
    (
        json.dumps({"prompt": "y" * 40, "label": 1}),
        "prompt_too_long",
        "prompt is 40 tokens, longer than max_prompt_tokens=32",
    ),
    (
        '{"prompt": "caf\\u00e9", "label": 1}',
        "untokenizable",
        "cannot tokenize prompt: CharTokenizer cannot encode character 'é'",
    ),
]


@pytest.mark.parametrize("line_no", range(2, len(BAD_LINES) + 1))
def test_each_error_names_file_and_line(tmp_path, line_no):
    lines = [line for line, _, _ in BAD_LINES]
    # put one bad line at a time after a good one, plus trailing good lines
    good = BAD_LINES[0][0]
    path = _write_lines(tmp_path / "bad.jsonl", [good] * (line_no - 1) + [lines[line_no - 1], good])
    with pytest.raises(DataError) as info:
        load_prompts(path, TOK, max_prompt_tokens=32)
    message = str(info.value)
    assert message.startswith(f"{path}:{line_no}: "), message
    assert BAD_LINES[line_no - 1][2] in message


def test_skip_bad_lines_counts_reasons(tmp_path, caplog):
    path = _write_lines(tmp_path / "mixed.jsonl", [line for line, _, _ in BAD_LINES])
    with caplog.at_level(logging.WARNING, logger="slime_rl.data"):
        records, stats = load_prompts(path, TOK, max_prompt_tokens=32, skip_bad_lines=True)
    assert len(records) == 1 and records[0].source == f"{path}:1"
    expected: dict[str, int] = {}
    for _, reason, _ in BAD_LINES[1:]:
        expected[reason] = expected.get(reason, 0) + 1
    assert stats.loaded == 1 and stats.skipped == len(BAD_LINES) - 1
    assert stats.skipped_by_reason == expected
    assert f"{path}:4" in caplog.text and "missing key 'label'" in caplog.text


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_prompts(tmp_path / "nope.jsonl", TOK)
    (tmp_path / "data.csv").write_text("prompt,label\n")
    with pytest.raises(DataError, match=r"unsupported extension '\.csv'"):
        load_prompts(tmp_path / "data.csv", TOK)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no records$"):
        load_prompts(tmp_path / "empty.jsonl", TOK)
    _write_lines(tmp_path / "allbad.jsonl", ["{", "{"])
    with pytest.raises(DataError, match=r"allbad.jsonl: no records \(2 bad line\(s\) skipped"):
        load_prompts(tmp_path / "allbad.jsonl", TOK, skip_bad_lines=True)
