"""Ranked-list reward (ReFT's gene-ranking grader): where does the right answer sit in the model's list?

The response is free text holding a ranked list; `parse_ranked_list` reads it in any of the usual forms:

    G3, G7, G1            comma- (or semicolon-) separated
    G3\\nG7\\nG1            one per line
    1. G3  /  1) G3  /  (1) G3   numbered, one per line or inline ("1. G3 2. G7")
    - G3  /  * G3  /  • G3      bulleted

and mixes of them (numbered lines holding comma lists). When the text carries an answer marker ("Answer:",
"Final answer:"), only what follows the last one is read, so reasoning before it lists nothing. Items are
normalized (casefolded, inner whitespace collapsed, surrounding punctuation, quotes and markdown emphasis
stripped); an item listed twice keeps its first rank; empty items are dropped; only the first `max_items`
count, so listing every candidate earns nothing past them.

Scoring (`RankedListReward`): 1 when the first item is a right answer, `decay ** (rank - 1)` for the first
right item lower down, 0 when none is in the list. The label is one answer or several acceptable ones
(a string, a list of strings, `{"answer": [...]}`, or a JSON string of these). Besides "reward" the result
reports top1 / top5 / topmax (right answer within the first 1, 5, `max_items` items), the rank (0 when
absent) and `answer_correct` (= top1, so the generic answer-accuracy metric is top-1).
"""

from __future__ import annotations

import json
import re
from typing import Any

from slime_rl.rewards.config import RankedListConfig
from slime_rl.types import Sample

_ANSWER_MARKER_RE = re.compile(r"\b(?:final\s+)?answers?\s*[:：]", re.IGNORECASE)
# a numbered marker at the start of a line: "1. ", "1) ", "(1) ", "1: " (the dot and colon need a space after
# them so "3.5" and "10:30" stay items)
_NUMBER_RE = re.compile(r"^\s*(?:\(\d{1,3}\)|\d{1,3}\)|\d{1,3}[.:](?=\s|$))\s*")
# the same marker inside a line, after whitespace: where an inline numbered list ("1. a 2. b") is cut
_INLINE_NUMBER_RE = re.compile(r"\s+(?:\(\d{1,3}\)|\d{1,3}\)|\d{1,3}\.(?=\s))\s*")
_BULLET_RE = re.compile(r"^\s*(?:[-*+–—](?:\s+|$)|[•·▪●◦]\s*)")
_SEPARATOR_RE = re.compile(r"[,;，；]")
_STRIP = " \t'\"`.,;:!?()[]{}<>*_‘’“”«»"
_WHITESPACE_RE = re.compile(r"\s+")


def normalize_item(text: str) -> str:
    """Casefolded, inner whitespace collapsed to one space, surrounding punctuation/quotes/emphasis stripped."""
    return _WHITESPACE_RE.sub(" ", text).strip(_STRIP).casefold()


def parse_ranked_list(text: str, max_items: int) -> list[str]:
    """The normalized items of the list in `text`, best first: duplicates kept once at their first rank,
    empty items dropped, at most `max_items` of them."""
    markers = list(_ANSWER_MARKER_RE.finditer(text))
    if markers:  # what follows the last marker; a marker with nothing after it only drops out
        tail = text[markers[-1].end():]
        text = tail if tail.strip(_STRIP + "\n") else _ANSWER_MARKER_RE.sub("\n", text)
    items: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        for piece in _line_items(line):
            item = normalize_item(piece)
            if item and item not in seen:
                seen.add(item)
                items.append(item)
                if len(items) == max_items:
                    return items
    return items


def _line_items(line: str) -> list[str]:
    """The raw items of one line: its bullet or number marker removed, inline numbered entries and comma /
    semicolon lists split."""
    numbered = _NUMBER_RE.match(line)
    if numbered:
        line = line[numbered.end():]
        entries = _INLINE_NUMBER_RE.split(line)  # "1. a 2. b": only a line that starts numbered is cut here
    else:
        entries = [line[m.end():] if (m := _BULLET_RE.match(line)) else line]
    return [piece for entry in entries for piece in _SEPARATOR_RE.split(entry)]


def rank_of(items: list[str], answers: set[str] | list[str]) -> int:
    """1-based rank of the first item that is a right answer (both normalized), 0 when none is."""
    wanted = {normalize_item(a) for a in answers}
    return next((rank for rank, item in enumerate(items, start=1) if normalize_item(item) in wanted), 0)


def parse_label(label: Any) -> list[str]:
    """The acceptable answers (normalized) of a label: a string, a list of strings, {"answer": ...}, or a JSON
    string of these. ValueError naming the problem for anything else."""
    if isinstance(label, str):
        stripped = label.strip()
        if stripped[:1] in ("[", "{", '"'):
            try:
                decoded = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise ValueError(f"ranked_list label looks like JSON but does not parse ({e.msg}): {label[:80]!r}") \
                    from None
            return parse_label(decoded)
        answers = [label]
    elif isinstance(label, dict):
        if "answer" not in label:
            raise ValueError(f"ranked_list label dict needs an 'answer' key, got keys {sorted(label)}")
        if isinstance(label["answer"], dict):
            raise ValueError("ranked_list label: 'answer' must be a string or a list of strings, got a dict")
        return parse_label(label["answer"])
    elif isinstance(label, (list, tuple)):
        bad = [a for a in label if not isinstance(a, str)]
        if bad:
            raise ValueError(f"ranked_list label: every answer must be a string, got {type(bad[0]).__name__} "
                             f"{bad[0]!r}")
        answers = list(label)
    else:
        raise ValueError(f"ranked_list label must be a string, a list of strings or {{'answer': ...}}, got "
                         f"{type(label).__name__} {label!r}"[:200])
    normalized = [a for a in (normalize_item(a) for a in answers) if a]
    if not normalized:
        raise ValueError(f"ranked_list label holds no answer: {label!r}"[:200])
    return normalized


class RankedListReward:
    """The `ranked_list` reward: `decay ** (rank - 1)` of the first right item of the response's list.

    Stateless after construction, so the runner's worker threads may share one instance."""

    __name__ = "ranked_list"

    def __init__(self, cfg: RankedListConfig | None = None):
        self.cfg = cfg or RankedListConfig()

    def score(self, response: str, label: Any) -> dict[str, float]:
        """The reward dict of one response against one label (ValueError for a malformed label)."""
        answers = parse_label(label)
        items = parse_ranked_list(response, self.cfg.max_items)
        rank = rank_of(items, answers)
        top1 = float(rank == 1)
        return {"reward": self.cfg.decay ** (rank - 1) if rank else 0.0, "top1": top1,
                "top5": float(0 < rank <= 5), "topmax": float(rank > 0), "rank": float(rank),
                "num_items": float(len(items)), "answer_correct": top1}

    def __call__(self, sample: Sample) -> dict[str, float]:
        return self.score(sample.response_text, sample.label)
