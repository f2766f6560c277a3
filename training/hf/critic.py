"""Reference critic (PPO's value model) on transformers: the policy's architecture with a scalar head.

The critic is `AutoModelForTokenClassification` with one label (LlamaForTokenClassification /
Qwen2ForTokenClassification): the trunk `model.*` and a head `score.weight` [1, H] without bias.
It is the parity baseline of the Megatron critic (training.megatron.critic).

Values are aligned with the policy's logprobs (`HFTrainer.logprobs`): position t holds V(x_<t),
the head's output at hidden state t - 1, i.e. the value of the state in which token t is
sampled; 0 at t = 0 and on padding.

Initialisation from a policy: `lm_head.weight` is dropped and the head starts at zero, so the
first values are exactly 0 (PPO's advantages then start as plain discounted returns, and no
random head makes the first value loss depend on a seed). OpenRLHF and verl initialise a fresh
head randomly instead; a critic checkpoint (with `score.weight`) keeps its head.

The critic's config departs from the policy's in four fields (`critic_hf_config`):
architectures, num_labels 1, `token_classification_bias` false (transformers' default head has
a bias) and `classifier_dropout` 0 (transformers applies 0.1 before the head in train mode);
and `tie_word_embeddings` is true: a critic has no output projection, and hf_io's convention
for tied models (state dicts carry no `lm_head.weight`) is what a critic needs; Megatron then
builds no separate output weight either.
"""

from __future__ import annotations

import torch

from slime_rl.hf_io import EMBED, LM_HEAD
from slime_rl.protocols import ValueLossFn
from slime_rl.types import TrainBatch
from training.hf.backend import HFModelTrainer, OptimSettings, causal_mask_arg

SCORE = "score.weight"


def critic_hf_config(policy_hf_config: dict) -> dict:
    """The critic's config.json dict from the policy's (idempotent: a critic config comes back unchanged)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES

    model_type = policy_hf_config.get("model_type")
    if model_type not in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES:
        raise ValueError(f"hf_config['model_type']={model_type!r} has no token-classification model in transformers")
    config = {k: v for k, v in policy_hf_config.items() if k not in ("id2label", "label2id")}
    config.update(architectures=[MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES[model_type]], num_labels=1,
                  token_classification_bias=False, classifier_dropout=0.0, tie_word_embeddings=True)
    return config


def init_critic_state(state_dict: dict[str, torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """Critic weights from a policy state dict: the trunk, and `score.weight` zeros [1, H].

    A state dict that already holds `score.weight` (a critic) keeps it; `lm_head.weight` is
    always dropped. Tensors are shared with `state_dict`, not copied.
    """
    out = {k: v for k, v in state_dict.items() if k != LM_HEAD}
    if SCORE not in out:
        if EMBED not in out:
            raise ValueError(f"state dict has no {EMBED}: not a Llama / Qwen2 checkpoint")
        out[SCORE] = torch.zeros(1, hf_config["hidden_size"], dtype=out[EMBED].dtype)
    return out


def build_critic_model(critic_config: dict, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A transformers *ForTokenClassification (num_labels 1) from a critic config and weights, fp32, eval mode."""
    from transformers import AutoModelForTokenClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[critic_config["model_type"]].from_dict(dict(critic_config))
    model = AutoModelForTokenClassification.from_config(config, dtype=torch.float32)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


class HFCritic(HFModelTrainer):
    """CriticBackend on a transformers token-classification model (single process).

    hf_config: the policy's config.json dict (a critic's works too); state_dict: the policy's
    weights (head starts at zero) or a critic's (with `score.weight`).
    """

    def __init__(self, hf_config: dict, state_dict: dict[str, torch.Tensor], opt: OptimSettings):
        self.hf_config = critic_hf_config(hf_config)
        self.model = build_critic_model(self.hf_config, init_critic_state(state_dict, self.hf_config))
        self.opt = opt
        self.step = 0
        self._build_optimizer()

    def _values(self, mb: TrainBatch) -> torch.Tensor:
        """Values [b, T] of one micro-batch: position t from the hidden state at t - 1; 0 at t = 0 and on padding."""
        mask_BT = causal_mask_arg(mb.attention_mask_BT)
        hidden_BTH = self.model.base_model(input_ids=mb.input_ids_BT, attention_mask=mask_BT,
                                           use_cache=False).last_hidden_state
        v_BT1 = torch.nn.functional.linear(hidden_BTH[:, :-1], self.model.score.weight).squeeze(-1)
        v_BT = torch.cat([v_BT1.new_zeros(v_BT1.shape[0], 1), v_BT1], dim=1)
        return v_BT * mb.attention_mask_BT.to(v_BT.dtype)

    @torch.no_grad()
    def values(self, batch: TrainBatch) -> torch.Tensor:
        """Values [B, T] float32, aligned with the policy's logprobs."""
        out_BT = torch.zeros(batch.input_ids_BT.shape, dtype=torch.float32)
        for rows, mb in self._micro_batches(batch):
            v_BT = self._values(mb)
            out_BT[rows, : v_BT.shape[1]] = v_BT
        return out_BT

    def train_step(self, batch: TrainBatch, loss_fn: ValueLossFn) -> dict[str, float]:
        """One optimizer step: `loss_fn(values_BT, micro_batch)` per micro-batch, gradients summed."""
        return self._step(batch, lambda mb: loss_fn(self._values(mb), mb))

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The critic in HF naming (trunk + `score.weight`; views of the live parameters)."""
        return {name: t.detach() for name, t in self.model.state_dict().items()}

    def _load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(init_critic_state(state_dict, self.hf_config), strict=True)
