"""The Megatron backend as the loop sees it: a TrainerBackend that drives SPMD trainer ranks.

The driver (the process running the RL loop) holds no weights. It sends each
command to every rank (`training.spmd`): ranks it spawned itself (the
default: `slime-rl train --backend megatron --tp 2`) or, under `torchrun`, the
other processes of the job with rank 0 doubling as driver. Ranks return their
pieces (per-DP-rank logprobs, per-micro-batch loss statistics); this class
assembles them into what the reference backend returns, so the loop cannot
tell the two apart. `MegatronDriver` is the part the critic's driver
(`training.megatron.critic.MegatronCritic`) shares.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from slime_rl.types import TrainBatch
from training.hf.backend import OptimSettings, merge_step_stats
from training.megatron import conversion
from training.megatron.model import resolve_spec
from training.megatron.worker import MegatronSettings

if TYPE_CHECKING:
    from training.spmd import RankGroup

WORKER = "training.megatron.worker:MegatronWorker"


def worker_kwargs(hf_config: dict, state_dict, opt: OptimSettings, settings: MegatronSettings,
                  with_reference: bool) -> dict:
    return dict(hf_config=dict(hf_config), hf_state=state_dict, settings=settings, opt=opt,
                with_reference=with_reference)


def _check_torchrun_world(num_ranks: int) -> None:
    world = int(os.environ["WORLD_SIZE"])
    if world != num_ranks:
        raise ValueError(f"torchrun started {world} processes but the config asks for {num_ranks} trainer ranks "
                         f"(train.num_trainers / tp x pp); pass --nproc-per-node {num_ranks}")


def serve_torchrun_rank(hf_config: dict, state_dict, opt: OptimSettings, settings: MegatronSettings,
                        num_ranks: int, with_reference: bool = False) -> None:
    """Ranks > 0 under torchrun: build this rank's worker and run rank 0's commands until it closes the group."""
    from training.spmd import torchrun_group

    _check_torchrun_world(num_ranks)
    group = torchrun_group(WORKER, worker_kwargs(hf_config, state_dict, opt, settings, with_reference),
                           backend="nccl" if torch.cuda.is_available() else "gloo")
    if group is not None:
        raise RuntimeError("serve_torchrun_rank is for ranks > 0; rank 0 builds a MegatronBackend")


class MegatronDriver:
    """The driver half that the policy (MegatronBackend) and the critic (training.megatron.critic)
    share: rank layout, spawned ranks, per-row pieces assembled, the step's metrics, checkpoints."""

    def _init_layout(self, hf_config: dict, opt: OptimSettings, settings: MegatronSettings,
                     num_ranks: int | None) -> None:
        m = settings.model
        self.hf_config, self.settings, self.opt = dict(hf_config), settings, opt
        self.num_ranks = num_ranks or m.tp * m.pp
        if self.num_ranks % (m.tp * m.pp):
            raise ValueError(f"{self.num_ranks} trainer ranks cannot be laid out as tp={m.tp} x pp={m.pp} x dp")
        self._tmp = None
        self.step = 0

    def _spawn(self, worker: str, state_dict: dict[str, torch.Tensor] | str, start_timeout: float,
               launcher: Callable[..., RankGroup] | None, **worker_extra: Any) -> RankGroup:
        """`num_ranks` ranks of `worker(hf_config, hf_state, settings, opt, **worker_extra)`."""
        from training.spmd import spawn_ranks

        if isinstance(state_dict, dict):  # ranks read weights from disk: one file, not a pickle per rank
            from slime_rl.hf_io import save_hf_checkpoint

            self._tmp = tempfile.mkdtemp(prefix="slime_rl_init_")
            save_hf_checkpoint(Path(self._tmp), self.hf_config, state_dict)
            state_dict = self._tmp
        threads = self.settings.threads or max(1, (os.cpu_count() or 1) // self.num_ranks)
        kwargs = dict(hf_config=dict(self.hf_config), hf_state=state_dict, settings=self.settings, opt=self.opt,
                      **worker_extra)
        env = {"OMP_NUM_THREADS": str(threads)}
        if launcher is not None:
            return launcher(self.num_ranks, worker, kwargs, env=env, backend=_dist_backend(),
                            start_timeout=start_timeout)
        return spawn_ranks(self.num_ranks, worker, kwargs, env=env, backend=_dist_backend(),
                           start_timeout=start_timeout, rank_cores=self.settings.cores or None)

    def _assemble(self, batch: TrainBatch, pieces_per_rank: list) -> torch.Tensor:
        """[B, T] float32 from the ranks' (rows, values_bT) pieces (logprobs or values)."""
        out_BT = torch.zeros(batch.input_ids_BT.shape, dtype=torch.float32)
        seen = torch.zeros(batch.num_sequences, dtype=torch.bool)
        for pieces in pieces_per_rank:
            for rows, lp_bT in pieces or []:
                out_BT[rows, : lp_bT.shape[1]] = lp_bT
                seen[rows] = True
        if not bool(seen.all()):
            raise RuntimeError(f"Megatron ranks returned nothing for rows {(~seen).nonzero().flatten().tolist()}")
        return out_BT

    # ------------------------------------------------------------------ update
    def train_step(self, batch: TrainBatch, loss_fn: Callable) -> dict[str, float]:
        """One optimizer step; metrics summed over micro-batches and DP ranks (max/min for *_max/*_min)."""
        results = [r for r in self.group.call("train_step", batch, loss_fn) if r is not None]
        self.step += 1
        stats = merge_step_stats([s for r in results for s in r["micro_stats"]])
        return {**stats, "grad_norm": results[0]["grad_norm"], "lr": results[0]["lr"], "rank_s": results[0]["rank_s"]}

    def reset_optimizer(self, opt: OptimSettings) -> None:
        self.opt = opt
        self.step = 0
        self.group.call("reset_optimizer", opt)

    # ------------------------------------------------------------------ weights and checkpoints
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model in HF naming (gathered across TP and PP on rank 0)."""
        return self.group.call("export_hf")[0]

    def save(self, path: str) -> None:
        """HF export at `path` (loadable by transformers) + Megatron distributed checkpoint under path/megatron."""
        from slime_rl.hf_io import save_hf_checkpoint

        self.group.call("save_checkpoint", str(Path(path) / "megatron"))
        save_hf_checkpoint(Path(path), self.hf_config, self.hf_state_dict())

    def load(self, path: str) -> None:
        """Resume from `save` (weights, optimizer, schedule); an HF directory alone restores weights only."""
        mdir = Path(path) / "megatron"
        if mdir.exists():
            self.group.call("load_checkpoint", str(mdir))
        else:
            self.group.call("load_hf", str(path))
        self.step = self.group.call("get_step")[0]

    def close(self) -> None:
        if getattr(self, "group", None) is not None:
            self.group.close()
            self.group = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _dist_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


class MegatronBackend(MegatronDriver):
    """TrainerBackend over `num_ranks` = tp x pp x dp Megatron ranks."""

    def __init__(self, hf_config: dict, state_dict: dict[str, torch.Tensor] | str, opt: OptimSettings,
                 settings: MegatronSettings, num_ranks: int | None = None, with_reference: bool = False,
                 start_timeout: float = 600.0, launcher: Callable[..., RankGroup] | None = None):
        """`launcher` creates the ranks in place of `spawn_ranks` (e.g. Ray actors), called with the same
        arguments; ranks read `state_dict` from one HF checkpoint directory (written to a temp dir when
        given as tensors), which a launcher placing ranks on other machines needs on shared storage."""
        from training.spmd import in_torchrun, torchrun_group

        self._init_layout(hf_config, opt, settings, num_ranks)
        if in_torchrun():  # this process is rank 0 of the job; the other ranks run serve_torchrun_rank
            _check_torchrun_world(self.num_ranks)
            self.group = torchrun_group(WORKER, worker_kwargs(hf_config, state_dict, opt, settings, with_reference),
                                        backend=_dist_backend())
        else:
            self.group = self._spawn(WORKER, state_dict, start_timeout, launcher, with_reference=with_reference)
        self.layouts = self.group.call("layout")

    # ------------------------------------------------------------------ logprobs
    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Policy logprobs [B, T] (0 at position 0 and on padding), as the reference backend gives them."""
        return self._assemble(batch, self.group.call("logprobs", batch))

    def update_reference(self) -> None:
        """Every rank copies its policy shard into its reference weights."""
        self.group.call("update_reference")

    def load_reference(self, path: str) -> None:
        """Every rank loads its shard of the reference weights from an HF checkpoint directory."""
        self.group.call("load_reference", str(path))

    def ref_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        return self._assemble(batch, self.group.call("ref_logprobs", batch))

    # ------------------------------------------------------------------ weights
    def named_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.hf_state_dict().items()

    def weight_layout(self) -> dict:
        """For weight-sync plans: per PP stage, each Megatron parameter and the HF tensors it becomes."""
        m = self.settings.model
        return {"tp_size": m.tp, "stages": conversion.weight_layout(self.hf_config, tp_size=m.tp, pp_size=m.pp,
                                                                    spec=resolve_spec(m))}

    def send_weights(self, fn: Callable, spec: Any) -> list[Any]:
        """Run `fn(weight_source, spec)` on every rank (weight_sync's rank half); one result per rank."""
        return self.group.call("send_weights", fn, spec)
