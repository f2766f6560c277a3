"""What the API shows of a job: its row from the store plus what its run wrote (progress, metrics, the
time-share table, the evaluation, the gate report, the final checkpoint)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from slime_rl.service import procs

MAX_METRIC_ROWS = 20000


def out_dir(job: dict) -> Path:
    return Path(job["config"]["log"]["output_dir"])


def metrics_rows(job: dict) -> list[dict[str, Any]]:
    """The run's metrics.jsonl rows (numbers only; a line being written or broken is skipped)."""
    path = out_dir(job) / "metrics.jsonl"
    rows = []
    try:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    row = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append({k: v for k, v in row.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
    except OSError:
        return []
    return rows[-MAX_METRIC_ROWS:]


def _last_step(rows: list[dict[str, Any]]) -> int:
    return next((int(r["step"]) for r in reversed(rows) if "step" in r), 0)


def _tail_rows(job: dict) -> list[dict[str, Any]]:
    """The metrics' last lines parsed (what the job list needs), without reading the whole file."""
    rows = []
    for line in procs.tail(out_dir(job) / "metrics.jsonl", 50):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def time_table(job: dict) -> dict | None:
    table = _read_json(out_dir(job) / "time_table.json")
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
        return None
    return {"wall_s": table.get("wall_s"), "mode": table.get("mode"),
            "phases": [{k: row.get(k) for k in ("phase", "label", "seconds", "share", "tokens_per_s")}
                       for row in table["rows"] if isinstance(row, dict)]}


def final_checkpoint(job: dict) -> Path | None:
    path = out_dir(job) / "checkpoint"
    return path if (path / "config.json").is_file() else None


def job_view(job: dict, deployment: dict | None = None, detail: bool = True) -> dict[str, Any]:
    request = job["request"]
    rows = metrics_rows(job) if detail else _tail_rows(job)
    view = {
        "id": job["id"], "name": job["name"], "status": job["status"],
        "created_at": job["created_at"], "started_at": job["started_at"], "ended_at": job["ended_at"],
        "model": request["model"], "algorithm": request["algorithm"], "task": request["task"],
        "hyperparameters": request["hyperparameters"], "attempts": job["attempts"],
        "progress": {"step": _last_step(rows), "total_steps": job["config"].get("train", {}).get("num_steps")},
        "error": job["error"],
    }
    if detail:
        ckpt = final_checkpoint(job)
        evals = [r for r in rows if any(k.startswith("val/") for k in r)]
        view.update({
            "config": job["config"], "output_dir": str(out_dir(job)),
            "checkpoint": str(ckpt) if ckpt else None,
            "eval": evals[-1] if evals else None,
            "gate": _read_json(out_dir(job) / "gate.json"),
            "time_table": time_table(job),
            "deployment": deployment_view(deployment) if deployment else None,
        })
    return view


def deployment_view(dep: dict, api_key: str | None = None) -> dict[str, Any]:
    """A deployment; with `api_key`, the key its server wants (`Authorization: Bearer KEY` on its /v1 routes),
    shown to whoever holds the service's token."""
    view = {k: dep[k] for k in ("id", "job_id", "status", "url", "model", "error", "created_at")}
    return {**view, "api_key": api_key} if api_key else view
