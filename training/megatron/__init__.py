"""Megatron-core trainer backend: GPTModel with tensor / pipeline / data parallelism.

Modules: `compat` (megatron-core on CPU), `conversion` (HF <-> Megatron table),
`model` (GPTModel from an HF config), `packing` (variable-length sequences
packed into micro-batches), `worker` (one trainer rank), `backend` (the
driver-side TrainerBackend that drives the ranks), `critic` (the value model:
a worker with a scalar head and its driver-side CriticBackend).
"""

from training.megatron.backend import MegatronBackend
from training.megatron.critic import MegatronCritic
from training.megatron.model import ModelSettings
from training.megatron.worker import MegatronSettings

__all__ = ["MegatronBackend", "MegatronCritic", "MegatronSettings", "ModelSettings"]
