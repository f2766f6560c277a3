"""Metrics: one record per step, written to every sink the run asked for; stdout lines; a PNG plot at the end.

`MetricsLogger` keeps the records and hands each one to its sinks, with the same names everywhere
(`rollout/reward_mean`, `val/accuracy`, `time/rollout_s`, ...): the JSONL file always
(<output_dir>/metrics.jsonl), TensorBoard (`log.tensorboard`: event files under <output_dir>/tensorboard)
and Weights & Biases (`log.wandb`: offline by default, run files under <output_dir>/wandb) when asked. The
x axis is the record's `step` (the RL step; 0 = before RL), so a resumed run continues the same axis:
the JSONL keeps the records up to the checkpoint, TensorBoard hides the points a crashed run logged after
it (its restart marker), wandb goes on in the same run id (kept in <output_dir>/wandb/run_id).
wandb and TensorBoard are imported only when enabled.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from slime_rl.config import ConfigError, LogConfig


class Sink(Protocol):
    """Where records go. `restore` starts a resumed run over from the records up to its checkpoint."""

    def write(self, record: dict[str, Any]) -> None: ...

    def restore(self, history: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class MetricsLogger:
    """Appends one JSON object per logged record to `path`, hands it to `sinks`; keeps history for plots."""

    def __init__(self, path: str | Path, sinks: list[Sink] = ()):
        self.path = Path(path)
        self.sinks: list[Sink] = [JsonlSink(self.path), *sinks]
        self.history: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (v if isinstance(v, (bool, int, str, list, dict)) else float(v)) for k, v in record.items()}
        self.history.append(clean)
        for sink in self.sinks:
            sink.write(clean)

    def restore(self, history: list[dict[str, Any]]) -> None:
        """Start over from these records (a resumed run: what was logged up to its checkpoint)."""
        self.history = [dict(r) for r in history]
        for sink in self.sinks:
            sink.restore(self.history)

    def close(self) -> None:
        """Flush and close every sink (wandb: finish the run, stop its service process)."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - one sink failing to close must not lose the others
                print(f"[metrics] closing {type(sink).__name__}: {type(exc).__name__}: {exc}", file=sys.stderr)
        self.sinks = self.sinks[:1]

    def series(self, key: str, x_key: str = "step") -> tuple[list[float], list[float]]:
        pts = [(r[x_key], r[key]) for r in self.history if key in r and x_key in r and _finite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]


class JsonlSink:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def restore(self, history: list[dict[str, Any]]) -> None:
        self.path.write_text("".join(json.dumps(r) + "\n" for r in history))

    def close(self) -> None:
        pass


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers (bools as 0/1) but its `step`: what TensorBoard and wandb plot against it."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (bool, int, float))}


class TensorBoardSink:
    """Scalars at global step = the record's `step`. The writer opens at the first record: a resumed run's
    writer starts with a restart marker at the step after its checkpoint, which hides what the interrupted
    run logged past it."""

    def __init__(self, log_dir: Path):
        _require("tensorboard", "log.tensorboard")
        self.log_dir, self.writer, self.step = log_dir, None, 0

    def _open(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step, flush_secs=30)
        return self.writer

    def write(self, record: dict[str, Any]) -> None:
        writer = self.writer or self._open()
        self.step = int(record.get("step", self.step))
        for key, value in scalars(record).items():
            writer.add_scalar(key, value, global_step=self.step)

    def restore(self, history: list[dict[str, Any]]) -> None:
        if self.writer is None and any(self.log_dir.glob("events.out.tfevents.*")):
            last = max((int(r["step"]) for r in history if "step" in r), default=-1)
            self._open(purge_step=last + 1)  # the interrupted run's files hold the records up to `last`
            self.step = max(last, 0)
            return
        for record in history:  # nothing was written here before: the records up to the checkpoint
            self.write(record)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbSink:
    """A wandb run: the resolved job config as its config, every record logged with `step` as the x axis
    (`define_metric`), files under <output_dir>/wandb. Offline mode never touches the network; nothing
    prompts (online without credentials is an error naming what to set). The run starts at the first
    record, or at `restore`: a resumed run goes on in the run id its output directory recorded."""

    def __init__(self, log: LogConfig, out_dir: Path, run_config: dict):
        _require("wandb", "log.wandb")
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")  # also read by wandb-core, the service process it starts
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        if log.wandb_mode == "online" and not wandb.login(prompt=False, verify=False):
            raise ConfigError("log.wandb_mode online needs W&B credentials (WANDB_API_KEY or `wandb login`); "
                              "or use log.wandb_mode offline and `wandb sync` the run later")
        self.wandb, self.log, self.out_dir, self.run_config = wandb, log, out_dir, run_config
        self.id_file = out_dir / "wandb" / "run_id"
        self.run = None

    def _open(self, run_id: str | None = None):
        wandb, log = self.wandb, self.log
        self.id_file.parent.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode=log.wandb_mode, project=log.wandb_project, entity=log.wandb_entity,
            name=log.wandb_name or self.out_dir.resolve().name, dir=str(self.out_dir),
            id=run_id, resume="allow" if run_id else None, config=self.run_config,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=log.wandb_mode == "offline"))
        self.id_file.write_text(self.run.id + "\n")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        return self.run

    def write(self, record: dict[str, Any]) -> None:
        row = scalars(record)
        if "step" in record:
            row["step"] = record["step"]
        (self.run or self._open()).log(row)

    def restore(self, history: list[dict[str, Any]]) -> None:
        if self.run is None and self.id_file.exists():  # the interrupted run holds the records up to here
            self._open(self.id_file.read_text().strip())
            return
        for record in history:  # a run of its own: the records up to the checkpoint first
            self.write(record)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
            self.wandb.teardown()  # stops wandb-core, the service process


def _require(module: str, flag: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{flag} true needs the `{module}` package, which is not installed "
                          f"(pip install -r requirements.txt, or set {flag} false)")


def open_logger(log: LogConfig, out_dir: str | Path, run_config: dict) -> MetricsLogger:
    """The job's metrics: <out_dir>/metrics.jsonl, plus TensorBoard and wandb (with `run_config` as the run's
    config) when `log` asks for them."""
    out_dir = Path(out_dir)
    sinks: list[Sink] = []
    if log.tensorboard:
        sinks.append(TensorBoardSink(out_dir / "tensorboard"))
    if log.wandb:
        sinks.append(WandbSink(log, out_dir, run_config))
    return MetricsLogger(out_dir / "metrics.jsonl", sinks)


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
