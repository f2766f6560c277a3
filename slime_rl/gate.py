"""The deploy gate: `--gate.metric NAME --gate.threshold X` stops a run once validation `val/NAME` >= X.

Any metric the task reports can be gated (customer_support: tool_call_accuracy, resolution_rate, ...). The
evaluation size is `val/NAME_n` when the task reports one (tool_call_accuracy: the graded calls), else the
number of validation samples; the report gives a 95% Wilson interval for a rate in [0, 1]. The report is
written to <output_dir>/gate.json at every check (the last check is what it holds) and printed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

GATE_FILE = "gate.json"


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion `p` observed over `n` trials (NaN for n = 0 or NaN p)."""
    if n <= 0 or math.isnan(p):
        return math.nan, math.nan
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class GateReport:
    metric: str
    threshold: float
    value: float
    passed: bool
    step: int  # RL steps done when it was measured (0: before RL)
    n: int  # evaluation size
    ci95: tuple[float, float] | None  # for rates only
    checkpoint: str | None = None  # the model that passed

    def line(self) -> str:
        ci = f", 95% CI [{self.ci95[0]:.4f}, {self.ci95[1]:.4f}]" if self.ci95 else ""
        verdict = "PASSED" if self.passed else "not passed"
        return (f"gate {self.metric} >= {self.threshold}: {verdict} at step {self.step}: {self.value:.4f} over "
                f"{self.n} graded{ci}" + (f"; model: {self.checkpoint}" if self.checkpoint else ""))


class Gate:
    def __init__(self, metric: str, threshold: float, out_dir: Path):
        self.metric, self.threshold = metric, threshold
        self.path = Path(out_dir) / GATE_FILE
        self.last: GateReport | None = None

    def check(self, metrics: dict[str, float], step: int) -> GateReport | None:
        """The report for these validation metrics (None when they hold no validation); KeyError naming the
        metrics there are when the gated one is not among them."""
        if not any(k.startswith("val/") for k in metrics):
            return None
        key = f"val/{self.metric}"
        if key not in metrics:
            names = sorted(k[4:] for k in metrics if k.startswith("val/") and not k.endswith("_n"))
            raise KeyError(f"gate.metric {self.metric!r} is not a validation metric of this task; it reports: "
                           f"{', '.join(names)}")
        value = float(metrics[key])
        n = int(metrics.get(f"{key}_n", metrics.get("val/num_samples", 0)))
        is_rate = 0.0 <= value <= 1.0
        ci = wilson_interval(value, n) if is_rate and n else None
        passed = not math.isnan(value) and value >= self.threshold
        self.last = GateReport(self.metric, self.threshold, value, passed, step, n, ci)
        return self.last

    def write(self, report: GateReport) -> Path:
        self.path.write_text(json.dumps(asdict(report), indent=1) + "\n")
        return self.path
