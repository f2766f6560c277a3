"""The Megatron critic (PPO's value model): the policy's GPTModel with a scalar head, over its own SPMD ranks.

Rank side, `MegatronCriticWorker`: a `MegatronWorker` whose last pipeline stage holds a value
head `value_head.weight` [1, H] (HF `score.weight`, replicated over TP) inside the GPTModel, so
DDP reduces its gradient over DP and the optimizer and the distributed checkpoint own it. The
model returns its final hidden states (the fused-logprob path of `model.return_hidden_states`);
values are hidden @ w_head^T, unpacked like logprobs (position s of a packed row -> token s+1),
so position t of a row holds V of the state in which token t is sampled.

TP: the hidden states went through `_CopyToTensorParallelRegion` (identity forward, gradient
all-reduced over TP in backward). Every TP rank computes the same values and backpropagates the
same value loss, so the all-reduce would sum tp equal gradients; `_ScaleGrad` divides the
gradient entering the hidden states by tp first. The head's own gradient is computed identically
on every TP rank (it needs no reduction, and megatron counts a parameter without
`tensor_model_parallel` once in the grad norm), so the head stays identical across TP.

The critic's config is `training.hf.critic.critic_hf_config(policy)`: tie_word_embeddings is true
there, so on one pipeline stage there is no output weight at all, and on several the last
stage's output layer is megatron's synced copy of the embedding (unused: zero gradient; the
embedding all-reduce between the stages keeps the two equal).

Driver side, `MegatronCritic`: a CriticBackend like `training.hf.critic.HFCritic`, over spawned
ranks (or a `launcher`'s); not under torchrun, whose one job of processes is the policy's.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import torch

from slime_rl.protocols import ValueLossFn
from slime_rl.types import TrainBatch
from training.hf.backend import OptimSettings
from training.hf.critic import SCORE, critic_hf_config, init_critic_state
from training.megatron import conversion, packing
from training.megatron.backend import MegatronDriver
from training.megatron.model import unwrap
from training.megatron.worker import MegatronSettings, MegatronWorker, _on

if TYPE_CHECKING:
    from training.spmd import RankGroup

CRITIC_WORKER = "training.megatron.critic:MegatronCriticWorker"
VALUE_HEAD = "value_head.weight"


class ValueHead(torch.nn.Module):
    """The scalar head's weight [1, H] (no bias), filled from HF `score.weight`."""

    def __init__(self, hidden: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden, dtype=dtype, device=device))

    def forward(self, hidden_bSH: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden_bSH, self.weight.to(hidden_bSH.dtype)).squeeze(-1)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class MegatronCriticWorker(MegatronWorker):
    """One critic rank: a pipeline stage of a TP shard of the value model, its optimizer and its data share.

    hf_config: the critic's config (`critic_hf_config`, as MegatronCritic passes it); hf_state: a
    critic or policy state dict or HF checkpoint directory (a policy's gets a zero head).
    """

    def __init__(self, hf_config: dict, hf_state: dict[str, torch.Tensor] | str, settings: MegatronSettings,
                 opt: OptimSettings):
        if not settings.model.fused_logprob:
            raise ValueError("the Megatron critic needs settings.model.fused_logprob (the hidden-state output)")
        if not hf_config.get("tie_word_embeddings") or hf_config.get("num_labels") != 1:
            raise ValueError("MegatronCriticWorker needs the critic's config: training.hf.critic.critic_hf_config")
        super().__init__(hf_config, hf_state, settings, opt, with_reference=False)

    def _build_module(self):
        module = super()._build_module()
        if self.last_stage:
            from megatron.core.tensor_parallel import set_defaults_if_not_set_tensor_model_parallel_attributes

            gpt = unwrap(module)
            gpt.value_head = ValueHead(gpt.config.hidden_size, gpt.config.params_dtype, self.device)
            set_defaults_if_not_set_tensor_model_parallel_attributes(gpt.value_head.weight)  # replicated over TP
        return module

    def _megatron_shard(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hf_state = init_critic_state(hf_state, self.hf_config)  # a policy checkpoint: zero head
        shard = super()._megatron_shard({k: v for k, v in hf_state.items() if k != SCORE})
        if self.last_stage:
            shard[VALUE_HEAD] = self._rule(VALUE_HEAD).shard([hf_state[SCORE]], self.tp_rank, self.padded_vocab)
        return shard

    def _rule(self, name: str) -> conversion.ParamRule | None:
        if name != VALUE_HEAD:
            return super()._rule(name)
        dims = conversion.model_dims(self.hf_config)
        return conversion.ParamRule(VALUE_HEAD, (SCORE,), ((1, dims.hidden),), "replicated",
                                    self.settings.model.tp, dims)

    def _loss(self, mb: packing.PackedMicroBatch, loss_fn: ValueLossFn | None, dummy: bool, out_bSH: torch.Tensor):
        """One micro-batch's value loss from the last stage's hidden states [b, S, H]."""
        tp = self.settings.model.tp
        hidden_bSH = _ScaleGrad.apply(out_bSH, 1.0 / tp) if tp > 1 else out_bSH
        v_bT = mb.unpack(unwrap(self.model).value_head(hidden_bSH).float())
        one = torch.ones((), dtype=torch.int, device=self.device)
        if loss_fn is None:
            return v_bT.new_zeros(()), one, {"rows": mb.rows, "values": v_bT.detach().cpu(), "dummy": dummy}
        loss, stats = loss_fn(v_bT, _on(mb.batch, self.device))
        if dummy:
            return loss * 0.0, one, {"stats": {}}
        return loss, one, {"stats": {"loss": float(loss.detach()), **{k: float(v) for k, v in stats.items()}}}

    @torch.no_grad()
    def values(self, batch: TrainBatch) -> list | None:
        """(rows, values_bT) pieces of this DP rank (last stage, TP rank 0), None elsewhere."""
        return self._forward_only(batch, "values")

    def logprobs(self, batch: TrainBatch):
        raise NotImplementedError("a critic rank computes values, not logprobs")


class MegatronCritic(MegatronDriver):
    """CriticBackend over `num_ranks` = tp x pp x dp Megatron ranks of its own.

    hf_config: the policy's config.json dict (a critic's works too); state_dict: the policy's
    weights (the head starts at zero, see training.hf.critic), a critic's (with `score.weight`),
    or an HF checkpoint directory of either. settings.model.fused_logprob is forced on: a critic
    computes no logprobs, and the hidden-state output is what its head needs.
    """

    def __init__(self, hf_config: dict, state_dict: dict[str, torch.Tensor] | str, opt: OptimSettings,
                 settings: MegatronSettings, num_ranks: int | None = None, start_timeout: float = 600.0,
                 launcher: Callable[..., RankGroup] | None = None):
        from training.spmd import in_torchrun

        if in_torchrun():
            raise NotImplementedError("the Megatron critic under torchrun: the job's processes are the policy's ranks; "
                                      "run the critic on spawned ranks (no torchrun) or the hf backend")
        settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, fused_logprob=True))
        critic_config = critic_hf_config(hf_config)
        if isinstance(state_dict, dict):
            state_dict = init_critic_state(state_dict, critic_config)
        self._init_layout(critic_config, opt, settings, num_ranks)
        self.group = self._spawn(CRITIC_WORKER, state_dict, start_timeout, launcher)
        self.layouts = self.group.call("layout")

    def values(self, batch: TrainBatch) -> torch.Tensor:
        """Values [B, T] float32 (0 at position 0 and on padding), as HFCritic gives them."""
        return self._assemble(batch, self.group.call("values", batch))

    def train_step(self, batch: TrainBatch, loss_fn: ValueLossFn) -> dict[str, float]:
        """One optimizer step of the critic: `loss_fn(values_BT, micro_batch)` per micro-batch, gradients summed."""
        return super().train_step(batch, loss_fn)
