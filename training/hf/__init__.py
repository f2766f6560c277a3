"""Reference trainer backend and critic on transformers models."""

from training.hf.backend import HFTrainer, OptimSettings, build_hf_model
from training.hf.critic import HFCritic, critic_hf_config, init_critic_state

__all__ = ["HFCritic", "HFTrainer", "OptimSettings", "build_hf_model", "critic_hf_config", "init_critic_state"]
