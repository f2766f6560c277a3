"""The trainer's typed configuration (composed into `slime_rl.config.JobConfig` as `train`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainConfig:
    """Trainer backend, parallel layout, optimizer and schedule for the RL stage."""

    backend: Literal["megatron", "hf"] = "megatron"  # hf = the single-process reference backend
    num_trainers: int | None = None  # trainer ranks = tp x pp x dp; None = tp x pp (dp = 1)
    tp: int = 1  # tensor parallel (megatron)
    pp: int = 1  # pipeline parallel (megatron)
    megatron_spec: Literal["auto", "local", "te"] = "auto"  # auto = Transformer Engine when installed + GPU
    dtype: Literal["float32", "bfloat16"] = "float32"  # megatron params/compute (bf16 needs a GPU to be useful)
    use_distributed_optimizer: bool = False  # shard optimizer state over DP ranks
    max_tokens_per_micro_batch: int = 4096  # token budget of one micro-batch (megatron: packed; hf: rows x longest)
    vocab_pad_multiple: int = 128  # megatron pads the vocab to a multiple of this x tp
    fused_logprob: bool = True  # logprob/entropy from hidden states + output weight in chunks, never [T, V] logits
    # each distinct prompt of a micro-batch runs through the model once, its n samples' responses attending to it
    # (hf: training/hf/shared_prefix.py; megatron: packed once, training/megatron/packing.py); same loss and
    # gradient, less compute for GRPO groups
    shared_prompt_forward: bool = True
    num_steps: int = 300
    lr: float = 2e-4
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    # AdamW's eps (policy and critic). Above the typical gradient entry (~1e-3 for a tiny model's RL batch) the
    # update becomes momentum SGD with lr / eps: entries that are mostly noise move in proportion instead of a
    # full lr step each
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    micro_batch_size: int = 64
    num_threads: int | None = None  # torch threads of each trainer rank; None = a plan that fits the cores
    seed: int = 0
