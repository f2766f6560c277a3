"""Training and validation files uploaded to the service: checked whole before anything is stored.

A file is JSONL (one JSON object per line) with the prompt and label keys of the data section (`prompt`,
`label`); the prompt is a non-empty string or a list of chat messages. The first bad line is the answer
(`train.jsonl:3: invalid JSON ...`), and nothing is kept. Tokenisation against the chosen model happens in the
job itself, which names the file and line the same way when a prompt is too long for it.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from pathlib import Path

from slime_rl.config import JobConfig
from slime_rl.data import _BadRow, _check_keys, _check_prompt, _iter_jsonl
from slime_rl.service.forms import TASKS, RequestError

MAX_BYTES = 64 << 20
KINDS = ("train", "val")


def safe_filename(name: str) -> str:
    """The uploaded file's name, reduced to a harmless base name ending in .jsonl."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name or "data.jsonl").name).strip("._") or "data"
    base = base[:100]
    return base if base.lower().endswith(".jsonl") else base + ".jsonl"


def check_rows(path: Path, shown: str) -> int:
    """Rows of a JSONL file, or a RequestError naming `shown`:line and the problem."""
    d = JobConfig().data
    rows = 0
    for line_no, row in _iter_jsonl(path):
        try:
            if isinstance(row, _BadRow):
                raise row
            _check_keys(row, (d.prompt_key, d.label_key))
            _check_prompt(row[d.prompt_key])
        except _BadRow as bad:
            raise RequestError("file", f"{shown}:{line_no}: {bad}", file=shown, line=line_no) from None
        rows += 1
    if rows == 0:
        raise RequestError("file", f"{shown}: no rows (expected JSON objects, one per line)", file=shown)
    return rows


def store_upload(root: Path, body: bytes, kind: str, task: str, filename: str) -> dict:
    """Check `body` and keep it under root/<id>/; returns the upload's record."""
    if kind not in KINDS:
        raise RequestError("kind", f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if task not in TASKS:
        raise RequestError("task", f"task: unknown {task!r}; one of {', '.join(TASKS)}")
    if len(body) > MAX_BYTES:
        raise RequestError("file", f"file: {len(body)} bytes, more than {MAX_BYTES}", status=413)
    name = safe_filename(filename)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        rows = check_rows(Path(tmp), name)
        upload_id = "u_" + secrets.token_hex(6)
        (root / upload_id).mkdir()
        path = root / upload_id / name
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"id": upload_id, "kind": kind, "task": task, "filename": name, "path": str(path), "rows": rows}
