"""HF checkpoints written here load in transformers, and back here, unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from slime_rl.hf_io import (
    init_tiny_model,
    load_hf_checkpoint,
    rope_theta,
    save_hf_checkpoint,
    tiny_hf_config,
)
from slime_rl.tokenizer import CharTokenizer, load_tokenizer


def _hf_logits(directory, input_ids):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, output_loading_info=True)
    assert all(not v for v in info.values()), info  # no missing / unexpected / mismatched keys
    model.eval()
    with torch.no_grad():
        return model, model(input_ids).logits


def _logits_from_state(config, state, input_ids):
    """Logits of a fresh transformers model filled from `state` (tied weights re-tied by transformers)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if not config["tie_word_embeddings"]:
        assert not missing
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [True, False])
def test_save_load_transformers_parity(tmp_path, arch, tied):
    tok = CharTokenizer()
    config = tiny_hf_config(
        arch, vocab_size=tok.vocab_size, tie_word_embeddings=tied, rope_theta=5000.0,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
    )
    assert config["model_type"] == arch and rope_theta(config) == 5000.0
    state = init_tiny_model(config, seed=0)
    assert ("lm_head.weight" in state) == (not tied)
    assert all(t.dtype == torch.float32 for t in state.values())

    save_hf_checkpoint(tmp_path, config, state, tokenizer=tok)
    assert isinstance(load_tokenizer(str(tmp_path)), CharTokenizer)
    config2, state2 = load_hf_checkpoint(tmp_path)
    assert config2 == json.loads(json.dumps(config))
    assert state2.keys() == state.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)

    input_ids = torch.tensor([tok.encode("12+34=46\nhello")])
    model, hf_logits = _hf_logits(tmp_path, input_ids)
    assert type(model).__name__ == ("LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM")
    assert model.config.eos_token_id == tok.eos_token_id
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    assert torch.equal(hf_logits, _logits_from_state(config2, state2, input_ids))
    assert hf_logits.shape == (1, input_ids.shape[1], tok.vocab_size)


def test_init_is_seeded_and_leaves_global_rng_alone():
    config = tiny_hf_config("llama", vocab_size=64, num_layers=1)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = init_tiny_model(config, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = init_tiny_model(config, seed=7)
    c = init_tiny_model(config, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


def test_sharded_and_tied_copy(tmp_path):
    config = tiny_hf_config("qwen2", vocab_size=64, num_layers=2)
    state = init_tiny_model(config, seed=1)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for shard, keys in shards.items():
        tensors = {k: state[k] for k in keys}
        if shard.startswith("model-00002"):
            tensors["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # a redundant tied copy
            weight_map["lm_head.weight"] = shard
        save_file(tensors, str(tmp_path / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, loaded = load_hf_checkpoint(tmp_path)
    assert sorted(loaded) == names  # tied: lm_head copy dropped
    assert all(torch.equal(loaded[k], state[k]) for k in names)


def test_saved_file_has_no_lm_head_when_tied(tmp_path):
    config = tiny_hf_config("llama", vocab_size=64, num_layers=1)
    state = init_tiny_model(config, seed=0)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # shared storage, as in a live tied model
    save_hf_checkpoint(tmp_path, config, state)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' not supported"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="arch must be one of"):
        tiny_hf_config("mistral", vocab_size=10)
    config = tiny_hf_config("llama", vocab_size=64, num_layers=1, tie_word_embeddings=False)
    state = init_tiny_model(config, seed=0)
    del state["lm_head.weight"]
    with pytest.raises(ValueError, match="lm_head.weight missing"):
        save_hf_checkpoint(tmp_path / "untied", config, state)
    config["model_type"] = "llama"
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_hf_checkpoint(tmp_path / "noweights")
