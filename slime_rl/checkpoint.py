"""Resumable checkpoints of a whole run, written every `ckpt.save_every` RL steps.

    <output_dir>/checkpoints/step_000020/
        trainer/      the trainer's own save (weights, optimizer, scheduler; HF-loadable)
        critic/       the critic's, when the algorithm has one (PPO)
        state.pt      step, weight version, RNG states, rollout position and buffer,
                      the metrics and trained-group records so far

A checkpoint is written to `step_N.tmp` and renamed when complete, so a run
killed mid-save leaves the previous checkpoints intact and never a partial one
under a final name; only the newest `ckpt.keep` are kept. Resuming from step N
in sync mode replays steps N+1... bit for bit: the trainer state is exact, the
prompts come from the restored sampler, and every request seed is derived from
(seed, step, group, sample).
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
_NAME = re.compile(r"^step_(\d{6,})$")


def root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(trainer, output_dir: str | Path, step: int, state: dict[str, Any], keep: int, critic=None) -> Path:
    """Write checkpoint `step` (trainer, critic + `state` + RNG) atomically; prune to the newest `keep`."""
    final = root(output_dir) / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainer.save(str(tmp / "trainer"))
    if critic is not None:
        critic.save(str(tmp / "critic"))
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    base = root(output_dir)
    if not base.is_dir():
        return []
    found = [p for p in base.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve(resume: str, output_dir: str | Path) -> Path | None:
    """`ckpt.resume` -> a checkpoint directory: "auto" = the newest under output_dir (None if there is none)."""
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"ckpt.resume: {resume} is not a checkpoint directory (no {STATE_FILE}); "
                                f"checkpoints are written under <log.output_dir>/checkpoints/step_N")
    return path


def load(trainer, path: Path, critic=None) -> dict[str, Any]:
    """Restore the trainer (and critic) from checkpoint `path`, set the RNG states, and return its run state."""
    trainer.load(str(path / "trainer"))
    if critic is not None:
        if not (path / "critic").is_dir():
            raise FileNotFoundError(f"{path} has no critic/ checkpoint: it was written by a run without a critic")
        critic.load(str(path / "critic"))
    state = torch.load(path / STATE_FILE, weights_only=False)
    set_rng_state(state["rng"])
    return state
