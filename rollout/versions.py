"""Weight versions as SGLang names them (any string) over the engine's integer versions.

SGLang's `weight_version` is a free string ("default", "endpoint-v1", "17");
the embedded engine stamps every token with an integer so that staleness is
arithmetic (trainer version - token version). `WeightVersions` keeps both: an
integer-like label is its own ordinal ("17" -> 17); any other label gets the
next ordinal after every version seen so far and keeps it (a label sent again
maps to the same ordinal). Responses show the label; `output_weight_versions`
(our extension) keeps the ordinals, and `weight_versions` (newer SGLang) lists
spans of output tokens with their label.
"""

from __future__ import annotations

import itertools
import re
import threading
from typing import Any

_INT_RE = re.compile(r"^[+-]?\d{1,18}$")
MAX_LABEL_CHARS = 256


def check(value: Any, key: str = "weight_version") -> int | str:
    """`value` as an int (an int, or an integer-like string) or a stripped string label; ValueError
    naming `key` otherwise. Nothing is recorded: a request is checked before its work starts."""
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= 10**18:
            raise ValueError(f"{key} must be below 10**18 in magnitude, got {value}")
        return value
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_LABEL_CHARS:
        raise ValueError(f"{key} must be an integer or a non-empty string of at most {MAX_LABEL_CHARS} "
                         f"characters, got {value!r:.80}")
    label = value.strip()
    return int(label) if _INT_RE.match(label) else label


class WeightVersions:
    """Labels <-> integer ordinals (thread-safe; one per server)."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._ordinal: dict[str, int] = {}
        self._label: dict[int, str] = {}
        self._newest = 0

    def ordinal(self, value: Any, key: str = "weight_version") -> int:
        """The ordinal of a version given as an int or a string (a new string label gets the next one);
        ValueError naming `key` when `value` is neither."""
        value = check(value, key)
        if isinstance(value, int):
            return self._note(value)
        label = value
        with self._mu:
            if label not in self._ordinal:
                self._newest += 1
                self._ordinal[label], self._label[self._newest] = self._newest, label
            return self._ordinal[label]

    def _note(self, ordinal: int) -> int:
        """An integer version: its own ordinal (it now names that ordinal, over any earlier string label)."""
        with self._mu:
            self._newest = max(self._newest, ordinal)
            self._label.pop(ordinal, None)
            return ordinal

    def label(self, ordinal: int) -> str:
        """How a response names `ordinal`: its string label, or the integer itself."""
        return self._label.get(ordinal, str(ordinal))

    def spans(self, ordinals: list[int]) -> list[dict[str, Any]]:
        """Runs of equal versions over output positions: [{"version", "start", "end" (exclusive)}]."""
        spans, start = [], 0
        for ordinal, run in itertools.groupby(ordinals):
            end = start + sum(1 for _ in run)
            spans.append({"version": self.label(ordinal), "start": start, "end": end})
            start = end
        return spans
