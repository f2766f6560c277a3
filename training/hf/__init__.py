"""Reference trainer backend on transformers models."""

from training.hf.backend import HFTrainer, OptimSettings, build_hf_model

__all__ = ["HFTrainer", "OptimSettings", "build_hf_model"]
