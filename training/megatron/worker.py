"""One Megatron trainer rank: a pipeline stage of a TP shard of the policy, its optimizer and its data share.

Every method is SPMD: all ranks call it together (the driver in `backend.py`
sends each command to every rank), because each one runs collectives over the
tensor-, pipeline- and data-parallel groups. Results that only some ranks hold
(logprobs and loss statistics live on the last pipeline stage) come back as
None from the others.

The step: this DP rank's sequences are packed into micro-batches
(`packing.py`), run through megatron's forward-backward schedule (1F1B when
PP > 1), logprobs and entropy are computed vocab-parallel — by default from the
final hidden states and this TP rank's output-weight shard with the fused
linear+logprob op (`slime_rl.ops.fused_linear_logprobs`, no [tokens, vocab]
logits), or with settings.model.fused_logprob = False from the TP-sharded
logits (`slime_rl.ops.vocab_parallel_logprobs`) — and the loss from
`slime_rl.algorithms` sees them in the same [B, T] layout the reference
backend gives it. The loss is already normalized over the whole batch, so
micro-batches and DP ranks *sum* their gradients (megatron's per-token-loss
mode, with the final division by a token count switched off).

`training.megatron.critic.MegatronCriticWorker` subclasses this worker for the
value model through four hooks: `_build_module`, `_megatron_shard`, `_rule`
(HF <-> Megatron per parameter) and `_loss`.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from slime_rl.ops import vocab_parallel_logprobs
from slime_rl.ops.fused_logprob import fused_linear_logprobs
from slime_rl.protocols import LossFn
from slime_rl.types import TrainBatch
from training.hf.backend import OptimSettings, lr_lambda
from training.megatron import compat, conversion, packing
from training.megatron.model import ModelSettings, build_gpt_model, output_weight, resolve_spec, unwrap


@dataclass
class MegatronSettings:
    """Parallel layout and step shape of the Megatron backend."""

    model: ModelSettings = field(default_factory=ModelSettings)
    use_distributed_optimizer: bool = False
    max_tokens_per_micro_batch: int = 4096  # token budget of one packed micro-batch
    shared_prompt: bool = False  # a group's prompt packed once, its samples' continuations attending to it
    seed: int = 0
    threads: int | None = None  # torch threads of each spawned rank; None = this machine's cores / ranks
    cores: tuple[tuple[int, ...], ...] = ()  # the cores each spawned rank is pinned to (empty: not pinned)


class MegatronWorker:
    """The state of one rank; constructed inside an initialized torch.distributed process."""

    def __init__(self, hf_config: dict, hf_state: dict[str, torch.Tensor] | str, settings: MegatronSettings,
                 opt: OptimSettings, with_reference: bool = False):
        compat.apply()  # first: it also quiets megatron's import-time warnings
        from megatron.core import parallel_state as ps

        m = settings.model
        world = dist.get_world_size()
        if world % (m.tp * m.pp):
            raise ValueError(f"world size {world} is not a multiple of tp ({m.tp}) x pp ({m.pp})")
        conversion.check_hf_config(hf_config, m.tp, m.pp)
        ps.initialize_model_parallel(tensor_model_parallel_size=m.tp, pipeline_model_parallel_size=m.pp)
        compat.seed_model_parallel(settings.seed)
        self.ps = ps
        self.hf_config, self.settings, self.opt = dict(hf_config), settings, opt
        self.tp_rank, self.pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.first_stage, self.last_stage = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.vocab_size = hf_config["vocab_size"]
        self.padded_vocab = conversion.pad_vocab_size(self.vocab_size, m.tp, m.vocab_pad_multiple)
        self.spec = resolve_spec(m)
        module = self._build_module()
        self.load_hf(hf_state, module)
        self.model = self._wrap_ddp(module)
        self.ref_params = [p.detach().to("cpu", copy=True) for p in self._params()] if with_reference else None
        self.step = 0
        self._build_optimizer()
        self.weight_source = MegatronWeightSource(self)
        self._plan_digest = None

    # ------------------------------------------------------------------ setup
    def _build_module(self):
        """This rank's pipeline stage of the model, before weights are loaded and DDP wraps it."""
        return build_gpt_model(self.hf_config, self.settings.model, pre_process=self.first_stage,
                               post_process=self.last_stage)

    def _wrap_ddp(self, module):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        config = unwrap(module).config
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=self.settings.use_distributed_optimizer)
        model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)
        # The loss is normalized over the whole batch already: sum grads over micro-batches and DP ranks,
        # never divide by a token count (megatron would with calculate_per_token_loss).
        config.finalize_model_grads_func = lambda chunks, num_tokens=None, **kw: finalize_model_grads(chunks, None, **kw)
        config.no_sync_func = model.no_sync
        return model

    def _build_optimizer(self) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        o = self.opt
        config = OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                 adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_eps=o.eps,
                                 clip_grad=o.grad_clip if o.grad_clip > 0 else 0.0,
                                 bf16=self.settings.model.dtype == "bfloat16",
                                 use_distributed_optimizer=self.settings.use_distributed_optimizer)
        self.optimizer = get_megatron_optimizer(config, [self.model])
        self.lr_at = lr_lambda(o)

    def reset_optimizer(self, opt: OptimSettings) -> None:
        """Fresh optimizer state and schedule (e.g. between the SFT and RL stages)."""
        self.opt, self.step = opt, 0
        self._build_optimizer()

    def _params(self) -> list[torch.nn.Parameter]:
        return list(unwrap(self.model).parameters())

    # ------------------------------------------------------------------ weights in / out
    def load_hf(self, hf_state: dict[str, torch.Tensor] | str, module=None) -> None:
        """Load this rank's shard of HF weights (a state dict or an HF checkpoint directory)."""
        if isinstance(hf_state, str):
            from slime_rl.hf_io import load_hf_checkpoint

            _, hf_state = load_hf_checkpoint(hf_state)
        shard = self._megatron_shard(hf_state)
        target = unwrap(module if module is not None else self.model)
        missing, unexpected = target.load_state_dict(shard, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"rank {dist.get_rank()}: converted weights do not fit the Megatron model: "
                             f"missing {missing}, unexpected {unexpected}")

    def _megatron_shard(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's Megatron state dict (local names) from a full HF state dict."""
        m = self.settings.model
        return conversion.hf_to_megatron(hf_state, self.hf_config, tp_size=m.tp, tp_rank=self.tp_rank, pp_size=m.pp,
                                         pp_rank=self.pp_rank, padded_vocab_size=self.padded_vocab, spec=self.spec)

    def _rule(self, name: str) -> conversion.ParamRule | None:
        """How local parameter `name` maps to HF tensors (None for `_extra_state`)."""
        m = self.settings.model
        return conversion.rule_for(name, self.hf_config, tp_size=m.tp, pp_size=m.pp, pp_rank=self.pp_rank,
                                   spec=self.spec)

    def export_hf(self) -> dict[str, torch.Tensor] | None:
        """The full HF state dict on global rank 0 (None elsewhere): TP all-gather, then PP gather."""
        m = self.settings.model
        tp_group = self.ps.get_tensor_model_parallel_group()
        local: dict[str, torch.Tensor] = {}
        for name, param in unwrap(self.model).named_parameters():
            rule = self._rule(name)
            if rule is None or rule.tied_copy:  # the tied output-layer copy: stage 0 exports the embedding
                continue
            shards = [param.detach()]
            if rule.partition_dim is not None and m.tp > 1:
                shards = [torch.empty_like(param) for _ in range(m.tp)]
                dist.all_gather(shards, param.detach().contiguous(), group=tp_group)
            if self.tp_rank == 0 and self.dp_rank == 0:
                for hf_name, t in rule.merge([s.float().cpu() for s in shards]).items():
                    local[hf_name] = t
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(local if (self.tp_rank == 0 and self.dp_rank == 0) else None, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        out: dict[str, torch.Tensor] = {}
        for part in gathered:
            out.update(part or {})
        return out

    def send_weights(self, fn: Callable, spec: Any) -> Any:
        """weight_sync's rank half: `fn(weight_source, spec)`; the plan is checked against this rank once."""
        plan = getattr(spec, "plan", None)
        if plan is not None and plan.digest() != self._plan_digest:
            self._check_plan(plan)
        return fn(self.weight_source, spec)

    def _check_plan(self, plan) -> None:
        """Every rank must hold the same plan, and its sources must be this stage's parameters (as TP shards)."""
        m = self.settings.model
        local = {name: tuple(p.shape) for name, p in unwrap(self.model).named_parameters()}
        sources = {t.source for b in plan.stage_buckets(self.pp_rank) for t in b.tensors}
        conversion.check_local_shards(sources, local, self.hf_config, tp_size=m.tp, pp_size=m.pp, stage=self.pp_rank,
                                      spec=self.spec)
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, plan.digest())
        if len(set(digests)) != 1:
            raise ValueError(f"weight plans differ between ranks: {digests}")
        self._plan_digest = plan.digest()

    # ------------------------------------------------------------------ forward / backward
    def _micro_batches(self, batch: TrainBatch) -> tuple[list[packing.PackedMicroBatch], bool]:
        """This DP rank's packed micro-batches; a rank without rows runs one weightless micro-batch."""
        # Rows rounded up to a multiple of 8 tokens suit GPU kernels; on CPU they are only extra work (short
        # RL sequences: up to 45% more tokens), so rows there are exactly as long as the longest sequence.
        multiple = 8 if self.device.type == "cuda" else 1
        mbs = packing.micro_batches(batch, self.dp_rank, self.dp_size, self.settings.max_tokens_per_micro_batch,
                                    max(1, self.opt.micro_batch_size), pad_to_multiple=multiple,
                                    shared_prompt=self.settings.shared_prompt)
        if mbs:
            return mbs, False
        row_len = -(-packing.sequence_lengths(batch)[0] // multiple) * multiple
        return packing.pack(batch, [[[0]]], row_len), True

    def _forward_backward(self, batch: TrainBatch, loss_fn: LossFn | None) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        mbs, dummy = self._micro_batches(batch)
        forward_only = loss_fn is None

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            positions_bS = mb.position_ids_bS.to(self.device)
            unwrap(model).rotary_pos_emb.set_positions(positions_bS)
            out = model(mb.input_ids_bS.to(self.device), positions_bS, mb.attention_mask_b1SS.to(self.device))
            return out, partial(self._loss, mb, loss_fn, dummy)

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mbs), model=[self.model], num_microbatches=len(mbs),
            seq_length=mbs[0].input_ids_bS.shape[1], micro_batch_size=mbs[0].input_ids_bS.shape[0],
            forward_only=forward_only)

    def _loss(self, mb: packing.PackedMicroBatch, loss_fn: LossFn | None, dummy: bool, out_bSX: torch.Tensor):
        """One micro-batch's loss from the last stage's output: hidden states [b, S, H] or logits [b, S, V_local]."""
        b, S, _ = out_bSX.shape
        out_NX = out_bSX.reshape(b * S, -1)
        targets_N = torch.roll(mb.input_ids_bS, -1, dims=1).reshape(-1).to(self.device)  # s predicts token s+1
        if len(mb.extra_pos):  # shared prompts: the prompt's last position predicts the later continuations' too
            out_NX = torch.cat([out_NX, out_NX[mb.extra_pos.to(self.device)]])
            targets_N = torch.cat([targets_N, mb.extra_targets.to(self.device)])
        lp_N, ent_N = self._token_logprobs(out_NX, targets_N, mb.batch.temperature, with_entropy=loss_fn is not None)
        lp_bT = mb.unpack_flat(lp_N)
        one = torch.ones((), dtype=torch.int, device=self.device)
        if loss_fn is None:
            return lp_N.new_zeros(()), one, {"rows": mb.rows, "logprobs": lp_bT.detach().cpu(), "dummy": dummy}
        loss, stats = loss_fn(lp_bT, mb.unpack_flat(ent_N), _on(mb.batch, self.device))
        if dummy:
            return loss * 0.0, one, {"stats": {}}
        return loss, one, {"stats": {"loss": float(loss.detach()), **{k: float(v) for k, v in stats.items()}}}

    def _token_logprobs(self, out_NX: torch.Tensor, targets_N: torch.Tensor, temperature: float,
                        with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logprobs_N, entropy_N or None) over the whole vocabulary, identical on every TP rank.

        out_NX: hidden states [N, H] (fused path; already copied to the TP region by
        the output layer, so their gradient is all-reduced over TP in backward) or this
        rank's vocab slice of the logits [N, V_local].
        """
        group = self.ps.get_tensor_model_parallel_group()
        if not self.settings.model.fused_logprob:
            return vocab_parallel_logprobs(out_NX, targets_N, vocab_start=self.tp_rank * out_NX.shape[1],
                                           vocab_size=self.vocab_size, group=group, temperature=temperature,
                                           with_entropy=with_entropy)
        weight_VH = output_weight(self.model)  # this rank's shard of the padded vocab (the embedding when tied)
        # Float16Module hands the last stage's output back in fp32; the hidden states were bf16 already.
        return fused_linear_logprobs(out_NX.to(weight_VH.dtype), weight_VH, targets_N, temperature=temperature,
                                     with_entropy=with_entropy, vocab_start=self.tp_rank * weight_VH.shape[0],
                                     vocab_size=self.vocab_size, group=group)

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch) -> list | None:
        """(rows, logprobs_bT) pieces of this DP rank (last stage, TP rank 0), None elsewhere."""
        return self._forward_only(batch, "logprobs")

    def _forward_only(self, batch: TrainBatch, key: str) -> list | None:
        """(rows, out[key]) pieces of this DP rank's micro-batches (last stage, TP rank 0), None elsewhere."""
        self.model.eval()
        out = self._forward_backward(batch, None)
        if not (self.last_stage and self.tp_rank == 0):
            return None
        return [(o["rows"], o[key]) for o in out if not o["dummy"]]

    def update_reference(self) -> None:
        """The reference weights become a copy of this rank's policy shard as it is now."""
        if self.ref_params is None:
            raise RuntimeError("no reference model: build the backend with with_reference=True")
        self.ref_params = [p.detach().to("cpu", copy=True) for p in self._params()]

    @torch.no_grad()
    def load_reference(self, path: str) -> None:
        """The reference weights from an HF checkpoint directory (loaded through the model, which is restored)."""
        params = self._params()
        saved = [p.detach().to("cpu", copy=True) for p in params]
        self.load_hf(path)
        self.ref_params = [p.detach().to("cpu", copy=True) for p in params]
        for p, s in zip(params, saved):
            p.data.copy_(s)

    @torch.no_grad()
    def ref_logprobs(self, batch: TrainBatch) -> dict | None:
        """Logprobs under the reference weights, swapped in from their CPU copies and back."""
        if self.ref_params is None:
            raise RuntimeError("no reference model: build the backend with with_reference=True")
        params = self._params()
        saved = [p.detach().to("cpu", copy=True) for p in params]
        for p, r in zip(params, self.ref_params):
            p.data.copy_(r)
        try:
            return self.logprobs(batch)
        finally:
            for p, s in zip(params, saved):
                p.data.copy_(s)

    def train_step(self, batch: TrainBatch, loss_fn: LossFn) -> dict | None:
        """One optimizer step over the whole batch; loss statistics from the last stage (TP rank 0), with the
        seconds this rank spent in it (`rank_s`: the driver's train time less this is its own share)."""
        t0 = time.perf_counter()
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        out = self._forward_backward(batch, loss_fn)
        lr = self.opt.lr * self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        _, grad_norm, _ = self.optimizer.step()
        self.step += 1
        self.model.eval()
        if not (self.last_stage and self.tp_rank == 0):
            return None
        return {"micro_stats": [o["stats"] for o in out], "grad_norm": float(grad_norm if grad_norm is not None else math.nan),
                "lr": lr, "rank_s": time.perf_counter() - t0}

    # ------------------------------------------------------------------ checkpoints
    def _sharded_state(self, is_loading: bool) -> dict:
        model_sd = self.model.sharded_state_dict()
        return {"model": model_sd, "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)}

    def save_checkpoint(self, path: str) -> None:
        """Megatron distributed checkpoint (model + optimizer shards) + the step, for `load_checkpoint`."""
        from megatron.core import dist_checkpointing

        if dist.get_rank() == 0:
            Path(path).mkdir(parents=True, exist_ok=True)
        dist.barrier()
        state = self._sharded_state(is_loading=False)
        state["step"] = self.step
        dist_checkpointing.save(state, path)

    def load_checkpoint(self, path: str) -> None:
        """Restore weights, optimizer state and the schedule position from `save_checkpoint`."""
        from megatron.core import dist_checkpointing

        template = self._sharded_state(is_loading=True)
        template["step"] = 0
        state = dist_checkpointing.load(template, path)
        unwrap(self.model).load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def get_step(self) -> int:
        return self.step

    # ------------------------------------------------------------------ misc
    def layout(self) -> dict:
        return {"rank": dist.get_rank(), "tp_rank": self.tp_rank, "pp_rank": self.pp_rank, "dp_rank": self.dp_rank,
                "torch_threads": torch.get_num_threads(),
                "cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}

    def close(self) -> None:
        self.ps.destroy_model_parallel()


class MegatronWeightSource:
    """This rank's place in the layout for weight sync (weight_sync.sender.WeightSource)."""

    def __init__(self, worker: MegatronWorker):
        m = worker.settings.model
        self.stage, self.tp_rank, self.tp_size = worker.pp_rank, worker.tp_rank, m.tp
        self.tp_group = worker.ps.get_tensor_model_parallel_group() if m.tp > 1 else None
        self.active, self.device = worker.dp_rank == 0, worker.device
        self._params = dict(unwrap(worker.model).named_parameters())
        self._rules = {name: worker._rule(name) for name in self._params}

    def local(self, source: str) -> torch.Tensor:
        return self._params[source].detach()

    def placements(self, source: str, shard: torch.Tensor, tp_rank: int) -> list:
        return self._rules[source].placements(shard, tp_rank)

    def replicated(self, source: str) -> bool:
        return self._rules[source].partition_dim is None

    def export(self, source: str, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._rules[source].merge([s.cpu() for s in shards])


def _on(batch: TrainBatch, device: torch.device) -> TrainBatch:
    if device.type == "cpu":
        return batch
    return TrainBatch(**{k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.__dict__.items()})
