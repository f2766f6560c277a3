"""Metrics: stdout lines, a JSONL file, and a PNG plot at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends one JSON object per logged step to `path`; keeps history for plots."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.history: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (v if isinstance(v, (bool, int, str, list, dict)) else float(v)) for k, v in record.items()}
        self.history.append(clean)
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")

    def restore(self, history: list[dict[str, Any]]) -> None:
        """Start over from these records (a resumed run: what was logged up to its checkpoint)."""
        self.history = [dict(r) for r in history]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def series(self, key: str, x_key: str = "step") -> tuple[list[float], list[float]]:
        pts = [(r[x_key], r[key]) for r in self.history if key in r and x_key in r and _finite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def format_line(step: int, record: dict[str, Any], keys: list[str]) -> str:
    parts = [f"step {step:4d}"]
    for k in keys:
        if k in record and _finite(record[k]):
            parts.append(f"{k.split('/')[-1]}={record[k]:.3f}")
    return "  ".join(parts)


def plot_curves(logger: MetricsLogger, out_png: str | Path, title: str = "slime_rl") -> Path:
    """Reward mean, format/answer accuracy, response length and validation accuracy vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("rollout/reward_mean", "reward mean"),
        ("rollout/answer_accuracy", "answer accuracy (train)"),
        ("rollout/format_accuracy", "format accuracy (train)"),
        ("rollout/response_length", "response length"),
        ("val/accuracy", "validation accuracy"),
        ("train/entropy", "entropy"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, label) in zip(axes.flat, panels):
        xs, ys = logger.series(key)
        ax.plot(xs, ys, marker="o" if key.startswith("val/") else None, markersize=3)
        ax.set_title(label)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
