"""Trainer backends: the reference HF/torch backend (training.hf); Megatron lands in its own issue."""
