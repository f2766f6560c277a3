"""Reference trainer backend: a transformers model trained with plain torch.

The same math as the Megatron backend (training/megatron) on one process: logprobs
of packed right-padded batches, micro-batching with gradient accumulation,
AdamW with gradient clipping and an LR schedule, HF-format checkpoints. It is
the parity baseline: engine logprobs and Megatron logprobs are tested against
this backend.

Logprobs and entropy come from the final hidden states and the lm_head weight
through `slime_rl.ops.fused_linear_logprobs`, which never materializes the
[B, T, V] logits (fused_logprob=True, the default), or from the model's logits
through `logprobs_from_logits` (fused_logprob=False). Both give the same numbers
to float rounding (tests/test_fused_wiring.py).

`HFModelTrainer` is what this trainer shares with the critic (training/hf/critic.py):
the optimizer, the schedule, the micro-batched step and the checkpoints.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from slime_rl.ops import logprobs_from_logits
from slime_rl.ops.fused_logprob import fused_linear_logprobs
from slime_rl.protocols import LossFn
from slime_rl.types import TrainBatch
from training.hf.shared_prefix import (SharedPrefixPlan, plan_shared_prefix, shared_prefix_hidden,
                                       supports_shared_prefix)


_FUSED_ADAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class OptimSettings:
    """Optimizer + schedule; built from TrainConfig or SFTConfig."""

    lr: float = 1e-4
    min_lr: float = 0.0
    schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    total_steps: int = 1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    micro_batch_size: int = 64
    max_tokens_per_micro_batch: int = 4096  # padded tokens (rows x the longest) per micro-batch; one row may exceed it


def lr_lambda(opt: OptimSettings):
    """Multiplier on opt.lr at a given step: linear warm-up, then the schedule."""

    def fn(step: int) -> float:
        if opt.warmup_steps and step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        if opt.schedule == "constant":
            return 1.0
        span = max(1, opt.total_steps - opt.warmup_steps)
        progress = min(1.0, (step - opt.warmup_steps) / span)
        floor = opt.min_lr / opt.lr
        if opt.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def merge_step_stats(micro_stats: list[dict[str, float]]) -> dict[str, float]:
    """One step's metrics from its micro-batches': sums, except max for *_max and min for *_min keys."""
    out: dict[str, float] = {}
    for stats in micro_stats:
        for k, v in stats.items():
            if k.endswith("_max"):
                out[k] = max(out.get(k, -math.inf), v)
            elif k.endswith("_min"):
                out[k] = min(out.get(k, math.inf), v)
            else:
                out[k] = out.get(k, 0.0) + v
    return out


def causal_mask_arg(attention_mask_BT: torch.Tensor) -> torch.Tensor | None:
    """The attention mask to give the model: None when every row is right-padded (ones, then zeros).

    Causal attention alone is then exact for every real token, which sees only earlier positions, all
    real; padding positions get finite values nobody reads (their logprobs are zeroed). Without a mask,
    SDPA runs its causal kernel instead of adding a [B, 1, T, T] mask, which transformers also skips
    building: 8% of the tiny GRPO job's train step at 2 threads on CPU; about even on SmolLM2-135M.
    """
    if attention_mask_BT.shape[1] < 2 or bool((attention_mask_BT[:, 1:] <= attention_mask_BT[:, :-1]).all()):
        return None
    return attention_mask_BT


def micro_batch_rows(lengths: list[int], max_rows: int, max_tokens: int) -> list[torch.Tensor]:
    """Row indices per micro-batch: longest first, cut where another row would pass `max_rows` rows or
    `max_tokens` padded tokens (rows x the micro-batch's longest row, which is its first)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        last = groups[-1] if groups else []
        if last and len(last) < max(1, max_rows) and (len(last) + 1) * lengths[last[0]] <= max_tokens:
            last.append(i)
        else:
            groups.append([i])
    return [torch.tensor(g) for g in groups]


def build_hf_model(hf_config: dict, state_dict: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """A transformers CausalLM from a config.json dict (+ weights), fp32, eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[hf_config["model_type"]].from_dict(dict(hf_config))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    # The pad token is a token the policy can sample like any other; transformers' embedding freezes the
    # gradient of its row (padding_idx), Megatron's does not. Padding positions never reach the loss.
    model.get_input_embeddings().padding_idx = None
    return model.eval()


def check_plain_lm_head(model: torch.nn.Module) -> None:
    """Raise unless logits are exactly lm_head(final hidden states): a bias-free linear, no scaling or capping.

    The fused path computes logprobs from the decoder's last hidden state and
    lm_head.weight, so a model that does anything more to its logits would be
    computed wrongly; it must run with fused_logprob=False.
    """
    head = model.get_output_embeddings()
    config = model.config
    problems = []
    if not isinstance(head, torch.nn.Linear):
        problems.append(f"output embeddings are {type(head).__name__}, not a torch.nn.Linear")
    elif head.bias is not None:
        problems.append("lm_head has a bias")
    for field in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, field, None) not in (None, 1, 1.0):
            problems.append(f"config.{field} = {getattr(config, field)}")
    if problems:
        raise ValueError(f"HFTrainer(fused_logprob=True) needs logits = lm_head(last hidden state) for "
                         f"{config.model_type}: {'; '.join(problems)}; use fused_logprob=False "
                         "(--train.fused_logprob false)")


class HFModelTrainer:
    """What the policy (HFTrainer) and the critic (training.hf.critic.HFCritic) share: AdamW with
    clipping and an LR schedule over `self.model`, micro-batching with gradient accumulation, and
    HF checkpoints with the optimizer state beside them.

    A subclass sets `hf_config`, `model` and `opt`, calls `_build_optimizer`, and provides
    `hf_state_dict()` (what `save` writes) and `_load_weights(state_dict)` (what `load` restores).
    """

    hf_config: dict
    model: torch.nn.Module
    opt: OptimSettings
    step: int = 0

    def _build_optimizer(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        # torch's fused AdamW: one kernel over all tensors instead of a Python loop of small ops per tensor
        # (2x faster on a 1M-parameter model on CPU, where that loop was 5% of a step); same update rule.
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_ADAM_DTYPES for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=self.opt.lr, betas=self.opt.betas,
                                           weight_decay=self.opt.weight_decay, eps=self.opt.eps, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.opt))

    def reset_optimizer(self, opt: OptimSettings) -> None:
        """Fresh optimizer state and schedule (e.g. between the SFT and RL stages)."""
        self.opt = opt
        self.step = 0
        self._build_optimizer()

    def _micro_batches(self, batch: TrainBatch) -> Iterator[tuple[torch.Tensor, TrainBatch]]:
        """(rows, micro-batch) pairs: rows longest first, at most `micro_batch_size` of them and at most
        `max_tokens_per_micro_batch` padded tokens per micro-batch, each trimmed to its longest row, so
        similar lengths share a micro-batch and little of the compute goes to padding."""
        for rows in micro_batch_rows(batch.attention_mask_BT.sum(dim=1).tolist(), self.opt.micro_batch_size,
                                     self.opt.max_tokens_per_micro_batch):
            mb = batch.select(rows)
            T = int(mb.attention_mask_BT.sum(dim=1).max())  # trim right padding of this micro-batch
            yield rows, mb.select((slice(None), slice(0, T)))

    def _step(self, batch: TrainBatch,
              micro_loss: Callable[[TrainBatch], tuple[torch.Tensor, dict[str, float]]]) -> dict[str, float]:
        """One optimizer step over the whole batch, accumulated over micro-batches.

        The loss function returns an already-normalized sum (per-token weights
        are global to the batch), so accumulation needs no rescaling.
        """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro_stats = []
        for _, mb in self._micro_batches(batch):
            loss, stats = micro_loss(mb)
            loss.backward()
            micro_stats.append({"loss": float(loss.detach()), **{k: float(v) for k, v in stats.items()}})
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.opt.grad_clip if self.opt.grad_clip > 0 else math.inf)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.model.eval()
        return {**merge_step_stats(micro_stats), "grad_norm": float(grad_norm), "lr": lr}

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def save(self, path: str) -> None:
        """HF checkpoint (config.json + model.safetensors) + optimizer/scheduler state."""
        from slime_rl.hf_io import save_hf_checkpoint

        out = Path(path)
        save_hf_checkpoint(out, self.hf_config, self.hf_state_dict())
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   out / "optimizer.pt")
        (out / "trainer_state.json").write_text(json.dumps({"step": self.step}))

    def load(self, path: str) -> None:
        """Restore weights and, when present, optimizer/scheduler state from `save`."""
        from slime_rl.hf_io import load_hf_checkpoint

        _, state_dict = load_hf_checkpoint(path)
        self._load_weights(state_dict)
        opt_file = Path(path) / "optimizer.pt"
        if opt_file.exists():
            state = torch.load(opt_file, weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        state_file = Path(path) / "trainer_state.json"
        if state_file.exists():
            self.step = json.loads(state_file.read_text())["step"]


class HFTrainer(HFModelTrainer):
    """TrainerBackend on a transformers model (single process).

    fused_logprob: compute logprobs/entropy with the fused linear+logprob op from the
    hidden states (never forming [B, T, V] logits); False = from the model's logits.
    response_tokens_only: (fused path) logprobs and entropy on response tokens only, 0 elsewhere, in
    `train_step` and `logprobs` / `ref_logprobs` alike (the same rows, so an unchanged policy's ratio is
    exactly 1): no loss reads the others. False = every position, as transformers gives them.
    shared_prefix: (with response_tokens_only) each distinct prompt of a micro-batch runs through the model
    once and its samples' responses attend to its cached keys/values (training/hf/shared_prefix.py), where
    that saves at least `shared_prefix_min_saved` of the micro-batch's tokens; same logprobs and gradient.
    """

    response_tokens_only: bool = True
    shared_prefix: bool = True
    shared_prefix_min_saved: float = 0.1

    def __init__(self, hf_config: dict, state_dict: dict[str, torch.Tensor], opt: OptimSettings,
                 with_reference: bool = False, fused_logprob: bool = True):
        self.hf_config = dict(hf_config)
        self.model = build_hf_model(hf_config, state_dict)
        self.ref_model = build_hf_model(hf_config, state_dict).requires_grad_(False) if with_reference else None
        self.fused_logprob = fused_logprob
        if fused_logprob:
            check_plain_lm_head(self.model)
        self.opt = opt
        self.step = 0
        self._build_optimizer()

    # ------------------------------------------------------------------ forward
    def _next_token_logprobs(self, model: torch.nn.Module, mb: TrainBatch, with_entropy: bool):
        """(logprobs_BT1, entropy_BT1 or None) of token t+1 given tokens <= t, for t < T - 1; with
        `response_tokens_only` (fused path) only where token t+1 is a response token, 0 elsewhere: the output
        layer, a fifth of a small model's compute, then skips the prompt and the padding."""
        targets_BT1 = mb.input_ids_BT[:, 1:]
        mask_BT = causal_mask_arg(mb.attention_mask_BT)
        if not self.fused_logprob:
            logits_BTV = model(input_ids=mb.input_ids_BT, attention_mask=mask_BT).logits
            return logprobs_from_logits(logits_BTV[:, :-1], targets_BT1, mb.temperature, with_entropy)
        B, T1 = targets_BT1.shape
        plan = self._shared_prefix_plan(model, mb)
        keep_K = None
        if plan is not None:
            hidden_RSH, pos_RS = shared_prefix_hidden(model.get_decoder(), mb.input_ids_BT, plan)
            target_RS = (pos_RS + 1).clamp(max=T1)  # the token each hidden state predicts
            keep_RS = (pos_RS + 1 < plan.length_R[:, None]) & (mb.response_mask_BT[plan.rows].gather(1, target_RS) != 0)
            hidden_NH, targets_N = hidden_RSH[keep_RS], mb.input_ids_BT[plan.rows].gather(1, target_RS)[keep_RS]
            keep_K = (plan.rows[:, None] * T1 + pos_RS)[keep_RS]
        else:
            hidden_BTH = model.get_decoder()(input_ids=mb.input_ids_BT, attention_mask=mask_BT,
                                             use_cache=False).last_hidden_state
            hidden_NH, targets_N = hidden_BTH[:, :-1].reshape(B * T1, -1), targets_BT1.reshape(-1)
            if self.response_tokens_only:
                keep_K = (mb.response_mask_BT[:, 1:].reshape(-1) != 0).nonzero().squeeze(1)
                hidden_NH, targets_N = hidden_NH[keep_K], targets_N[keep_K]
        weight_VH = model.get_output_embeddings().weight  # the embedding itself when tied
        lp_N, ent_N = fused_linear_logprobs(hidden_NH, weight_VH, targets_N, temperature=mb.temperature,
                                            with_entropy=with_entropy)
        if keep_K is not None:
            lp_N = lp_N.new_zeros(B * T1).index_put((keep_K,), lp_N)
            ent_N = ent_N.new_zeros(B * T1).index_put((keep_K,), ent_N) if ent_N is not None else None
        return lp_N.view(B, T1), ent_N.view(B, T1) if ent_N is not None else None

    def _shared_prefix_plan(self, model: torch.nn.Module, mb: TrainBatch) -> SharedPrefixPlan | None:
        """Deduplicated prompts for this micro-batch's forward (training/hf/shared_prefix.py), or None for the
        plain one: off, outputs wanted at every position, a decoder it does not cover, or too little saved."""
        if not (self.shared_prefix and self.fused_logprob and self.response_tokens_only):
            return None
        if not supports_shared_prefix(model):
            return None
        return plan_shared_prefix(mb.input_ids_BT, mb.attention_mask_BT, mb.response_mask_BT,
                                  self.shared_prefix_min_saved)

    def _forward(self, model: torch.nn.Module, mb: TrainBatch, with_entropy: bool):
        lp_BT1, ent_BT1 = self._next_token_logprobs(model, mb, with_entropy)
        pad = lp_BT1.new_zeros(lp_BT1.shape[0], 1)
        real_BT = mb.attention_mask_BT.to(lp_BT1.dtype)  # padding positions hold 0, as documented
        lp_BT = torch.cat([pad, lp_BT1], dim=1) * real_BT  # position t = log p(x_t | x_<t); t = 0 has none
        ent_BT = torch.cat([pad, ent_BT1], dim=1) * real_BT if ent_BT1 is not None else None
        return lp_BT, ent_BT

    @torch.no_grad()
    def _logprobs_with(self, model: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
        out_BT = torch.zeros(batch.input_ids_BT.shape, dtype=torch.float32)
        for rows, mb in self._micro_batches(batch):
            lp_BT, _ = self._forward(model, mb, with_entropy=False)
            out_BT[rows, : lp_BT.shape[1]] = lp_BT
        return out_BT

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Policy logprobs [B, T] (0 at position 0 and on padding; also on the prompt with `response_tokens_only`)."""
        return self._logprobs_with(self.model, batch)

    def update_reference(self) -> None:
        """The reference model becomes a copy of the policy as it is now (algorithm.ref_update_every)."""
        if self.ref_model is None:
            raise RuntimeError("no reference model: construct HFTrainer(with_reference=True)")
        self.ref_model.load_state_dict(self.model.state_dict())

    def load_reference(self, path: str) -> None:
        """The reference model from an HF checkpoint directory (see slime_rl.loop.save_reference)."""
        from slime_rl.hf_io import load_hf_checkpoint

        if self.ref_model is None:
            raise RuntimeError("no reference model: construct HFTrainer(with_reference=True)")
        self.ref_model.load_state_dict(load_hf_checkpoint(path)[1], strict=False)
        if self.hf_config.get("tie_word_embeddings", False):
            self.ref_model.tie_weights()

    def ref_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        if self.ref_model is None:
            raise RuntimeError("no reference model: construct HFTrainer(with_reference=True)")
        return self._logprobs_with(self.ref_model, batch)

    # ------------------------------------------------------------------ update
    def train_step(self, batch: TrainBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over the whole batch, accumulated over micro-batches (see `_step`)."""
        return self._step(batch, lambda mb: loss_fn(*self._forward(self.model, mb, with_entropy=True), mb))

    # ------------------------------------------------------------------ weights
    def named_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named weights (lm_head omitted when tied to the embedding)."""
        tied = self.hf_config.get("tie_word_embeddings", False)
        for name, tensor in self.model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            yield name, tensor.detach()

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy weights in HF naming (views of the live parameters: copy before changing them)."""
        return dict(self.named_hf_weights())

    def weight_layout(self) -> dict:
        """For weight-sync plans: one stage, each HF tensor its own source (see weight_sync.plan)."""
        return {"tp_size": 1, "stages": [[(name, [(name, tuple(t.shape))]) for name, t in self.named_hf_weights()]]}

    def _load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=False)
        if self.hf_config.get("tie_word_embeddings", False):
            self.model.tie_weights()
