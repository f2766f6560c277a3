"""training.megatron.conversion: HF <-> Megatron round trips are bit-exact; shard layouts match Megatron's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from training.megatron.conversion import (
    ConversionError,
    check_hf_config,
    hf_shapes,
    hf_to_megatron,
    megatron_names,
    megatron_to_hf,
    pad_vocab_size,
    rule_for,
)

REPO = Path(__file__).resolve().parents[1]
QKV = "decoder.layers.{}.self_attention.linear_qkv.{}"


def tiny(arch="qwen2", tied=False, heads=8, kv_heads=4, vocab=101, layers=4, **extra):
    config = tiny_hf_config(arch, vocab_size=vocab, hidden_size=64, num_layers=layers, num_heads=heads,
                            num_kv_heads=kv_heads, intermediate_size=96, tie_word_embeddings=tied)
    return {**config, **extra}


def all_shards(state, config, tp, pp, padded=None, spec="local"):
    padded = padded or pad_vocab_size(config["vocab_size"], tp, pad_multiple=8)
    return {(t, p): hf_to_megatron(state, config, tp_size=tp, tp_rank=t, pp_size=pp, pp_rank=p,
                                   padded_vocab_size=padded, spec=spec)
            for t in range(tp) for p in range(pp)}


def assert_same_state(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


# qwen2: q/k/v biases, untied, GQA rep 2; llama: tied, rep 1 (kv_heads == heads).
CASES = {"qwen2_untied_rep2": dict(arch="qwen2", tied=False, heads=8, kv_heads=4),
         "llama_tied_rep1": dict(arch="llama", tied=True, heads=4, kv_heads=4)}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 2])
def test_round_trip_is_bit_exact(case, tp, pp):
    config = tiny(**CASES[case])
    state = init_tiny_model(config, seed=tp * 10 + pp)
    shards = all_shards(state, config, tp, pp)
    assert_same_state(megatron_to_hf(shards, config, tp, pp), state)


def test_round_trip_te_spec_bf16_and_explicit_head_dim():
    config = tiny("qwen2", heads=4, kv_heads=2, head_dim=24)  # head_dim != hidden / heads
    state = {k: v.to(torch.bfloat16) for k, v in init_tiny_model(config, seed=3).items()}
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (96, 64)
    shards = all_shards(state, config, tp=2, pp=2, spec="te")
    names = set(shards[(0, 0)])
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)
    assert shards[(1, 0)][QKV.format(0, "weight")].shape == (1 * (2 + 2) * 24, 64)
    assert_same_state(megatron_to_hf(shards, config, 2, 2, spec="te"), state)


def smollm2_config():
    return tiny_hf_config("llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                          intermediate_size=1536, tie_word_embeddings=True)


@pytest.mark.parametrize("pp", [1, 2])
def test_smollm2_135m_shapes_round_trip(pp):
    config = smollm2_config()
    gen = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=gen) for name, shape in hf_shapes(config).items()}
    assert sum(t.numel() for t in state.values()) == 134_515_008  # SmolLM2-135M's published parameter count
    shards = all_shards(state, config, tp=1, pp=pp, padded=49152)
    assert shards[(0, pp - 1)][QKV.format(14, "weight")].shape == (3 * (3 + 2) * 64, 576)
    assert_same_state(megatron_to_hf(shards, config, 1, pp), state)


def test_smollm2_rejects_tp2_naming_num_attention_heads():
    with pytest.raises(ConversionError, match=r"num_attention_heads'\]=9 is not divisible by tp_size=2"):
        check_hf_config(smollm2_config(), tp_size=2, pp_size=1)


def test_qkv_shard_holds_the_groups_of_its_rank_in_megatron_order():
    config = tiny("qwen2", heads=8, kv_heads=4)  # rep = 2, d = 8
    state = init_tiny_model(config, seed=1)
    rep, d, tp = 2, 8, 2
    for kind in ("weight", "bias"):
        q, k, v = (state[f"model.layers.3.self_attn.{p}_proj.{kind}"] for p in "qkv")
        for r in range(tp):
            rows = []
            for j in (2 * r, 2 * r + 1):  # 4 groups / 2 ranks: rank r owns groups 2r, 2r+1
                rows += [q[h * d:(h + 1) * d] for h in range(j * rep, (j + 1) * rep)]
                rows += [k[j * d:(j + 1) * d], v[j * d:(j + 1) * d]]
            shard = hf_to_megatron(state, config, tp_size=tp, tp_rank=r, pp_size=2, pp_rank=1,
                                   padded_vocab_size=104)[QKV.format(1, kind)]
            assert torch.equal(shard, torch.cat(rows))


def test_fc1_o_proj_and_vocab_shards():
    config = tiny("qwen2", heads=8, kv_heads=4)
    state = init_tiny_model(config, seed=2)
    gate, up = state["model.layers.0.mlp.gate_proj.weight"], state["model.layers.0.mlp.up_proj.weight"]
    o_proj = state["model.layers.0.self_attn.o_proj.weight"]
    for r in range(4):
        shard = hf_to_megatron(state, config, tp_size=4, tp_rank=r, padded_vocab_size=128)
        assert torch.equal(shard["decoder.layers.0.mlp.linear_fc1.weight"],
                           torch.cat([gate.chunk(4)[r], up.chunk(4)[r]]))
        assert torch.equal(shard["decoder.layers.0.self_attention.linear_proj.weight"], o_proj.chunk(4, dim=1)[r])
        for mname, hname in [("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                             ("output_layer.weight", "lm_head.weight")]:
            rows = shard[mname]  # V_pad = 128: rank r holds rows [32r, 32r+32) of the padded matrix
            real = state[hname][32 * r:32 * r + 32]
            assert rows.shape == (32, 64) and torch.equal(rows[:len(real)], real)
            assert torch.all(rows[len(real):] == 0) and (len(real) == 32) == (r < 3)


def test_pipeline_stages_hold_local_layers_and_the_tied_copy():
    config = tiny("llama", tied=True, heads=4, kv_heads=2)
    state = init_tiny_model(config, seed=4)
    one_stage = megatron_names(config, pp_size=1)
    assert "output_layer.weight" not in one_stage and "embedding.word_embeddings.weight" in one_stage
    first, last = (hf_to_megatron(state, config, pp_size=2, pp_rank=p, padded_vocab_size=104) for p in (0, 1))
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" not in first
    assert "decoder.final_layernorm.weight" in last and "embedding.word_embeddings.weight" not in last
    assert not any(n.startswith("decoder.layers.2.") for n in {**first, **last})
    assert torch.equal(last["output_layer.weight"], first["embedding.word_embeddings.weight"])
    assert torch.equal(last["decoder.layers.1.input_layernorm.weight"], state["model.layers.3.input_layernorm.weight"])


def test_rule_for_drives_a_gather_and_merge_export():
    config = tiny("qwen2", tied=True, heads=8, kv_heads=4)
    state = init_tiny_model(config, seed=5)
    tp, pp = 2, 2
    shards = all_shards(state, config, tp, pp)
    exported = {}
    for p in range(pp):
        for name, local in shards[(0, p)].items():
            rule = rule_for(name, config, tp_size=tp, pp_size=pp, pp_rank=p)
            assert rule.partition_dim == {"replicated": None, "tp_col": 1}.get(rule.kind, 0)
            if rule.tied_copy:
                assert rule.hf_names == ("model.embed_tokens.weight",) and p == pp - 1
                continue
            gathered = [local] if rule.partition_dim is None else [shards[(r, p)][name] for r in range(tp)]
            exported.update(rule.merge(gathered))
    assert_same_state(exported, state)
    rule = rule_for("decoder.layers.1.mlp.linear_fc1.weight", config, tp_size=tp, pp_size=pp, pp_rank=1)
    assert rule.hf_names == ("model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight")
    assert rule_for("decoder.layers.0.mlp.linear_fc1._extra_state", config) is None
    with pytest.raises(ConversionError, match="merge needs 2 TP shards, got 1"):
        rule.merge([shards[(0, 1)]["decoder.layers.1.mlp.linear_fc1.weight"]])
    with pytest.raises(ConversionError, match=r"linear_fc1.weight: .*expected \[\(96, 64\), \(96, 64\)\]"):
        rule.merge([torch.zeros(96, 64), torch.zeros(98, 64)])
    for bad in ("decoder.layers.2.mlp.linear_fc1.weight", "embedding.word_embeddings.weight", "decoder.foo"):
        with pytest.raises(ConversionError, match=f"{bad}: not a parameter of PP stage 1/2"):
            rule_for(bad, config, tp_size=tp, pp_size=pp, pp_rank=1)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, r"model_type'\]='mistral' not supported; supported: \['llama', 'qwen2'\]"),
    ({"num_attention_heads": 6}, r"num_attention_heads'\]=6 is not divisible by tp_size=4"),
    ({"num_key_value_heads": 2}, r"num_key_value_heads'\]=2 is not divisible by tp_size=4"),
    ({"num_hidden_layers": 3}, r"num_hidden_layers'\]=3 is not divisible by pp_size=2"),
    ({"head_dim": None, "num_attention_heads": 12, "num_key_value_heads": 4}, r"hidden_size'\]=64 is not divisible"),
    ({"attention_bias": True}, r"attention_bias'\]=True is not supported"),
    ({"mlp_bias": True}, r"mlp_bias'\]=True is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, r"rope_parameters'\] rope_type='llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling'\] rope_type='linear'"),
    ({"hidden_act": "gelu"}, r"hidden_act'\]='gelu' is not supported"),
])
def test_check_hf_config_names_the_field(change, message):
    config = {**tiny("llama", heads=8, kv_heads=4), **change}
    with pytest.raises(ConversionError, match=message):
        check_hf_config(config, tp_size=4, pp_size=2)


def test_check_hf_config_accepts_what_it_supports():
    check_hf_config(tiny("llama", heads=8, kv_heads=4, head_dim=24, rope_scaling=None), tp_size=4, pp_size=2)
    check_hf_config({**tiny("qwen2"), "num_attention_heads": 12, "head_dim": 16}, tp_size=4, pp_size=4)
    with pytest.raises(ConversionError, match=r"num_attention_heads'\]=8 is not divisible by num_key_value_heads=3"):
        check_hf_config(tiny("qwen2", heads=8, kv_heads=4, num_key_value_heads=3), 1, 1)
    with pytest.raises(ConversionError, match=r"spec='fused' not supported"):
        megatron_names(tiny(), spec="fused")


def test_hf_to_megatron_names_the_bad_tensor():
    config = tiny("qwen2", tied=True, heads=8, kv_heads=4)
    state = init_tiny_model(config, seed=6)
    convert = lambda s, **kw: hf_to_megatron(s, config, **{"tp_size": 2, "padded_vocab_size": 104, **kw})  # noqa: E731
    assert "output_layer.weight" not in convert({**state, "lm_head.weight": torch.zeros(3)})  # tied: ignored
    missing = {k: v for k, v in state.items() if k != "model.layers.2.self_attn.k_proj.bias"}
    with pytest.raises(ConversionError, match=r"missing model.layers.2.self_attn.k_proj.bias \(1 missing"):
        convert(missing)
    with pytest.raises(ConversionError, match="unexpected tensor model.layers.9.mlp.up_proj.weight"):
        convert({**state, "model.layers.9.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"model.norm.weight: expected shape \(64,\) .*got \(63,\)"):
        convert({**state, "model.norm.weight": torch.zeros(63)})
    with pytest.raises(ConversionError, match="padded_vocab_size=103 must be >= vocab_size=101 and divisible"):
        convert(state, padded_vocab_size=103)
    with pytest.raises(ConversionError, match="tp_rank=2, pp_rank=0 out of range"):
        convert(state, tp_rank=2)


def test_megatron_to_hf_names_the_bad_shard():
    config = tiny("llama", tied=True, heads=4, kv_heads=2)
    shards = all_shards(init_tiny_model(config, seed=7), config, tp=2, pp=2)
    with pytest.raises(ConversionError, match=r"no state dict for \(tp_rank, pp_rank\)=\(1, 1\)"):
        megatron_to_hf({k: v for k, v in shards.items() if k != (1, 1)}, config, 2, 2)
    drop = {**shards, (1, 0): {k: v for k, v in shards[(1, 0)].items() if "layers.1.mlp.linear_fc2" not in k}}
    with pytest.raises(ConversionError, match=r"=\(1, 0\): missing parameter decoder.layers.1.mlp.linear_fc2"):
        megatron_to_hf(drop, config, 2, 2)
    extra = {**shards, (0, 0): {**shards[(0, 0)], "decoder.final_layernorm.weight": torch.ones(64),
                                "decoder.layers.0.mlp.linear_fc1._extra_state": None}}
    with pytest.raises(ConversionError, match=r"=\(0, 0\): unexpected parameter decoder.final_layernorm.weight"):
        megatron_to_hf(extra, config, 2, 2)
    drifted = {**shards, (1, 1): {**shards[(1, 1)], "output_layer.weight": shards[(1, 1)]["output_layer.weight"] + 1}}
    with pytest.raises(ConversionError, match="output_layer.weight on the last PP stage differs from the tied"):
        megatron_to_hf(drifted, config, 2, 2)


MEGATRON_SCRIPT = textwrap.dedent("""
    import contextlib, json, os, sys
    import torch, torch.distributed as dist
    from slime_rl.hf_io import tiny_hf_config, init_tiny_model, _config_object
    from training.megatron.conversion import hf_to_megatron

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps, tensor_parallel
    ps.initialize_model_parallel(1, 1)
    from megatron.core.transformer import TransformerConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from transformers import AutoModelForCausalLM

    results = {}
    for arch, tied in [("qwen2", True), ("llama", False)]:
        hf_config = tiny_hf_config(arch, vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=96, tie_word_embeddings=tied)
        state = init_tiny_model(hf_config, seed=0)
        cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=96, normalization="RMSNorm", gated_linear_unit=True,
            activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=arch == "qwen2",
            use_cpu_initialization=True, pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
            layernorm_epsilon=1e-6)
        model = GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=128,
            max_sequence_length=64, position_embedding_type="rope", rotary_base=10000,
            share_embeddings_and_output_weights=tied)
        missing, unexpected = model.load_state_dict(hf_to_megatron(state, hf_config, padded_vocab_size=128),
                                                    strict=False)
        # Megatron's forward assumes CUDA in two places (RoPE frequencies' device, the attention-dropout RNG
        # fork); these CPU shims only exist so the layouts can be checked against HF logits here.
        torch.cuda.current_device = lambda: "cpu"
        tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
        hf = AutoModelForCausalLM.from_config(_config_object(hf_config), dtype=torch.float32)
        hf.load_state_dict(state, strict=not tied)
        ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
        causal = torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=1)[None, None]
        with torch.no_grad():
            logits = model.eval()(ids, torch.arange(12).expand(2, 12), causal)[..., :101]
            diff = (logits - hf.eval()(ids).logits).abs().max().item()
        results[arch] = {"missing": list(missing), "unexpected": list(unexpected), "logits_max_diff": diff}
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    print(json.dumps(results))
""")


def test_megatron_gpt_model_accepts_the_names_and_matches_hf_logits():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", MEGATRON_SCRIPT, str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    for arch, result in json.loads(out.strip().splitlines()[-1]).items():
        assert all(k.endswith("_extra_state") for k in result["missing"]), (arch, result)
        assert result["unexpected"] == [], (arch, result)
        assert result["logits_max_diff"] < 1e-5, (arch, result)
