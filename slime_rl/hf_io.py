"""HF-format checkpoints (config.json + safetensors) for the Llama / Qwen2 families.

The on-disk format is exactly what `transformers` writes and reads, so a
checkpoint saved here loads with `AutoModelForCausalLM.from_pretrained` and
vice versa.

Tied embeddings: when `tie_word_embeddings` is true, state dicts handled here
never carry `lm_head.weight` (the output projection *is*
`model.embed_tokens.weight`). `save_hf_checkpoint` drops it, and
`load_hf_checkpoint` drops it if a file carries a copy anyway.

Note for readers of the config: transformers >= 5 stores the RoPE base under
`config["rope_parameters"]["rope_theta"]`; use `rope_theta(config)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"


def tiny_hf_config(
    arch: str = "llama",
    vocab_size: int = 128,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    rope_theta: float = 10000.0,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """A config.json dict for a small Llama or Qwen2 model, built by transformers' config class."""
    from transformers import LlamaConfig, Qwen2Config

    classes = {"llama": (LlamaConfig, "LlamaForCausalLM"), "qwen2": (Qwen2Config, "Qwen2ForCausalLM")}
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}) "
            f"and num_heads by num_kv_heads ({num_kv_heads})"
        )
    config_cls, architecture = classes[arch]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=rope_theta,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        pad_token_id=pad_token_id,
        architectures=[architecture],
        dtype="float32",
    )
    return config.to_dict()


def rope_theta(hf_config: dict[str, Any]) -> float:
    """The RoPE base of a config dict (transformers 5 `rope_parameters` or the older top-level key)."""
    params = hf_config.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(hf_config.get("rope_theta", 10000.0))


def is_tied(hf_config: dict[str, Any]) -> bool:
    """Whether the output projection shares the input embedding (transformers' default: False)."""
    return bool(hf_config.get("tie_word_embeddings", False))


def _config_object(hf_config: dict[str, Any]):
    from transformers import AutoConfig

    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    kwargs = {k: v for k, v in hf_config.items() if k != "model_type"}
    return AutoConfig.for_model(model_type, **kwargs)


def init_tiny_model(hf_config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 weights (transformers' own init) as an HF-named state dict.

    The global RNG state is restored afterwards, so the caller's randomness is untouched.
    """
    from transformers import AutoModelForCausalLM

    config = _config_object(hf_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    if is_tied(hf_config):
        state.pop(LM_HEAD, None)
    return state


def save_hf_checkpoint(
    directory: str | Path,
    hf_config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    tokenizer: Any = None,
) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) into `directory`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    _check_model_type(hf_config, directory)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()}
    if is_tied(hf_config):
        tensors.pop(LM_HEAD, None)
    elif LM_HEAD not in tensors:
        raise ValueError(f"{LM_HEAD} missing from the state dict and tie_word_embeddings is false")
    if EMBED not in tensors:
        raise ValueError(f"{EMBED} missing from the state dict")
    _unshare_storage(tensors)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        if hasattr(tokenizer, "save"):
            tokenizer.save(directory)
        else:
            tokenizer.save_pretrained(str(directory))
    return directory


def _unshare_storage(tensors: dict[str, torch.Tensor]) -> None:
    """safetensors refuses tensors that share memory; clone all but the first of each storage."""
    seen: set[int] = set()
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            tensors[name] = t.clone()
        seen.add(ptr)


def load_hf_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, HF-named state dict) from a directory; sharded checkpoints are supported."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; not an HF checkpoint directory")
    config = json.loads(config_path.read_text())
    _check_model_type(config, directory)
    if (directory / WEIGHTS_INDEX_FILE).is_file():
        index = json.loads((directory / WEIGHTS_INDEX_FILE).read_text())
        shards = sorted(set(index["weight_map"].values()))
    elif (directory / WEIGHTS_FILE).is_file():
        shards = [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"{directory}: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} found")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        shard_path = directory / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{shard_path}: shard listed in {WEIGHTS_INDEX_FILE} is missing")
        state.update(load_file(str(shard_path)))
    if is_tied(config):
        state.pop(LM_HEAD, None)
    if EMBED not in state:
        raise ValueError(f"{directory}: checkpoint has no {EMBED}")
    return config, state


def _check_model_type(config: dict[str, Any], directory: Path) -> None:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{directory / CONFIG_FILE}: model_type {model_type!r} not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
