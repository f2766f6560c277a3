"""Where a run's wall time goes: one timer for every phase, and the table each RL run ends with.

`PhaseTimer` adds up wall seconds per named phase and counts per name (tokens):

- `phase(name)`: the training loop's phases. On one thread they nest exclusively: entering `logprobs`
  inside `train` pauses `train`, so the loop's phases never count a second twice and, with `other`
  (whatever no phase covers), add up to its wall time.
- `busy(name)`: work that runs concurrently (groups generated as coroutines, rewards scored on threads).
  A busy phase counts the wall time during which at least one of them runs: four rewards scored during
  the same second are one second of `reward`, so it stays a share of wall time.

`TimeTable` turns the loop's totals into rows (seconds, % of wall time, tokens/s). In sync mode the loop
waits for generation and scoring, so both are shares of the loop's time. In the asynchronous modes the
producer generates and scores while the trainer trains: the loop's `rollout` row is the time it waited
for a batch, and the producer's busy time is shown apart, overlapped, outside the sum.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

# The loop's phases, in table order: (key, label, the token count its tokens/s divides).
LOOP_PHASES = [
    ("rollout", "rollout (generation)", "generated_tokens"),
    ("reward", "reward", None),
    ("logprobs", "old/ref logprobs", "logprob_tokens"),
    ("train", "train", "trained_tokens"),
    ("sync", "weight sync", None),
    ("eval", "evaluation", None),
    ("ckpt", "checkpoint", None),
]
PRODUCER_PHASES = [("generation", "generation (producer busy)", "generated_tokens"),
                   ("reward", "reward (producer busy)", None)]


@dataclass(frozen=True)
class Snapshot:
    seconds: dict[str, float]
    counts: dict[str, float]

    def since(self, before: "Snapshot") -> "Snapshot":
        """What accrued between `before` and this snapshot."""
        return Snapshot({k: v - before.seconds.get(k, 0.0) for k, v in self.seconds.items()},
                        {k: v - before.counts.get(k, 0.0) for k, v in self.counts.items()})


class PhaseTimer:
    """Wall seconds per phase (see the module docstring); thread-safe."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = defaultdict(float)
        self._counts: dict[str, float] = defaultdict(float)
        self._running: dict[str, int] = defaultdict(int)  # how many are inside each phase now
        self._since: dict[str, float] = {}  # when each running phase's current interval began
        self._local = threading.local()  # this thread's stack of open `phase`s

    def _start(self, name: str, now: float) -> None:
        if self._running[name] == 0:
            self._since[name] = now
        self._running[name] += 1

    def _stop(self, name: str, now: float) -> None:
        self._running[name] -= 1
        if self._running[name] == 0:
            self._seconds[name] += now - self._since.pop(name)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time `name` on this thread; the phase it interrupts is paused meanwhile."""
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        with self._lock:
            now = self.clock()
            if stack:
                self._stop(stack[-1], now)
            self._start(name, now)
        stack.append(name)
        try:
            yield
        finally:
            stack.pop()
            with self._lock:
                now = self.clock()
                self._stop(name, now)
                if stack:
                    self._start(stack[-1], now)

    @contextlib.contextmanager
    def busy(self, name: str) -> Iterator[None]:
        """Time `name` while any caller is inside it (coroutines, threads); nothing is paused."""
        with self._lock:
            self._start(name, self.clock())
        try:
            yield
        finally:
            with self._lock:
                self._stop(name, self.clock())

    def count(self, name: str, n: float) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> Snapshot:
        """Totals so far; a running phase counts up to now."""
        with self._lock:
            now = self.clock()
            seconds = dict(self._seconds)
            for name, since in self._since.items():
                seconds[name] = seconds.get(name, 0.0) + now - since
            return Snapshot(seconds, dict(self._counts))


@dataclass
class Row:
    phase: str  # the key: rollout, reward, ..., other; producer rows: generation, reward
    label: str
    seconds: float
    share: float  # of the wall time
    tokens: float | None = None
    tokens_per_s: float | None = None
    overlapped: bool = False  # the producer's busy time: concurrent with the loop, not part of the sum


@dataclass
class TimeTable:
    """The loop's wall time by phase; `rows` without `overlapped` add up to `wall_s`."""

    wall_s: float
    mode: str
    rows: list[Row]

    @classmethod
    def build(cls, totals: Snapshot, wall_s: float, mode: str, overlapped: bool) -> "TimeTable":
        """Rows from the loop's totals. `overlapped`: generation ran beside training (async modes), so the
        loop's rollout time is its wait and the producer's busy time goes below the sum; otherwise rewards
        were scored while the loop waited, and the rollout row is that wait less the reward time."""
        sec, counts = dict(totals.seconds), totals.counts
        if overlapped:
            producer = {k: sec.pop(k, 0.0) for k in ("generation", "reward")}
        else:
            sec.pop("generation", None)  # inside the loop's rollout wait
            sec["reward"] = min(sec.get("reward", 0.0), sec.get("rollout", 0.0))
            sec["rollout"] = sec.get("rollout", 0.0) - sec["reward"]
        rows = []
        for key, label, count in LOOP_PHASES:
            if overlapped and key == "reward":
                continue
            if overlapped and key == "rollout":
                label, count = "rollout (waiting for a batch)", None
            rows.append(_row(key, label, sec.get(key, 0.0), wall_s, counts.get(count) if count else None))
        rows.append(_row("other", "idle/other", max(0.0, wall_s - sum(r.seconds for r in rows)), wall_s, None))
        if overlapped:
            rows += [_row(key, label, producer[key], wall_s, counts.get(count) if count else None, overlapped=True)
                     for key, label, count in PRODUCER_PHASES]
        return cls(wall_s, mode, rows)

    def header(self) -> str:
        head = f"where the time went ({self.mode}): {self.wall_s:.2f}s of RL loop wall time"
        if not any(r.overlapped for r in self.rows):
            return head + "\n  (rollout = generation while the loop waited for it; reward scoring apart)"
        return head + ("\n  (seen from the training loop: generation overlaps training, so rollout = the time the "
                       "loop waited for a batch,\n   and in one-step-off for the groups in flight before a push; "
                       "the producer's busy time is listed below the total)")

    def format(self) -> str:
        def line(label: str, seconds: float, share: float, tps: float | None) -> str:
            return f"  {label:30s} {seconds:9.2f} {100 * share:6.1f}% " + (f"{tps:10.1f}" if tps is not None else "")

        lines = [self.header(), f"  {'phase':30s} {'seconds':>9s} {'% wall':>7s} {'tokens/s':>10s}"]
        lines += [line(r.label, r.seconds, r.share, r.tokens_per_s) for r in self.rows if not r.overlapped]
        lines.append(line("total", self.wall_s, 1.0, None))
        producer = [r for r in self.rows if r.overlapped]
        if producer:
            lines.append("  -- concurrent with the loop (not in the total):")
            lines += [line(r.label, r.seconds, r.share, r.tokens_per_s) for r in producer]
        lines.append("  tokens/s: generated tokens per second of generation; train, logprobs: prompt + response tokens "
                     "per pass")
        return "\n".join(text.rstrip() for text in lines)

    def metrics(self) -> dict[str, float]:
        """The table as flat metrics: time/table/<phase>_s, _share, _tokens_per_s (producer rows: producer_)."""
        out = {"time/table/wall_s": self.wall_s}
        for r in self.rows:
            key = f"time/table/{'producer_' if r.overlapped else ''}{r.phase}"
            out[f"{key}_s"], out[f"{key}_share"] = r.seconds, r.share
            if r.tokens_per_s is not None:
                out[f"{key}_tokens_per_s"] = r.tokens_per_s
        return out

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"wall_s": self.wall_s, "mode": self.mode, "header": self.header(),
                                    "rows": [asdict(r) for r in self.rows]}, indent=1) + "\n")
        return path


def _row(key: str, label: str, seconds: float, wall_s: float, tokens: float | None, overlapped: bool = False) -> Row:
    tps = tokens / seconds if tokens and seconds > 0 else None
    return Row(key, label, seconds, seconds / wall_s if wall_s > 0 else 0.0, tokens, tps, overlapped)


def step_times(d: Snapshot) -> dict[str, float]:
    """One step's finer times for its metrics record (`d`: what the step accrued)."""
    s, c = d.seconds, d.counts
    out = {f"time/{k}_s": s.get(k, 0.0) for k in ("generation", "reward", "logprobs", "eval")}
    for key, count, phase in (("gen", "generated_tokens", "generation"), ("train", "trained_tokens", "train")):
        if c.get(count) and s.get(phase, 0.0) > 0:
            out[f"time/{key}_tokens_per_s"] = c[count] / s[phase]
    if c.get("rank_seconds"):  # the trainer ranks' own share of time/train_s; the rest is the driver's
        out["time/rank_s"] = c["rank_seconds"]
    return out
