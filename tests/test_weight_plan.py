"""Weight-sync building blocks: TP shard placements, bucket ops, and the param plan (CPU, tiny configs)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from slime_rl import ops
from slime_rl.buckets import ALIGN, pack_bucket, unpack_bucket
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.types import WeightBucket
from training.megatron.conversion import (
    ConversionError,
    hf_shapes,
    hf_to_megatron,
    megatron_names,
    check_local_shards,
    pad_vocab_size,
    rule_for,
    weight_layout,
)
from weight_sync.plan import PlanError, WeightPlan, plan_for_tensors, plan_from_layout

MiB = 1024 * 1024


def plan_for_megatron(config, *, tp_size, pp_size, dtype, bucket_bytes, spec="local") -> WeightPlan:
    """What the Megatron backend plans: its layout, checked to cover the HF checkpoint exactly."""
    try:
        stages = weight_layout(config, tp_size=tp_size, pp_size=pp_size, spec=spec)
    except ConversionError as e:
        raise PlanError(str(e)) from e
    return plan_from_layout({"tp_size": tp_size, "stages": stages}, dtype=dtype, bucket_bytes=bucket_bytes,
                            expected=hf_shapes(config))


def check_local_params(plan: WeightPlan, stage: int, local: dict, config: dict) -> None:
    sources = {t.source for b in plan.stage_buckets(stage) for t in b.tensors}
    try:
        check_local_shards(sources, local, config, tp_size=plan.tp_size, pp_size=plan.pp_size, stage=stage)
    except ConversionError as e:
        raise PlanError(str(e)) from e


def tiny(arch="qwen2", tied=False, heads=8, kv_heads=4, vocab=101, layers=4, **extra):
    config = tiny_hf_config(arch, vocab_size=vocab, hidden_size=64, num_layers=layers, num_heads=heads,
                            num_kv_heads=kv_heads, intermediate_size=96, tie_word_embeddings=tied)
    return {**config, **extra}


def smollm2_config():
    return tiny_hf_config("llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                          intermediate_size=1536, tie_word_embeddings=True)


def all_shards(state, config, tp, pp, padded, spec="local"):
    return {(t, p): hf_to_megatron(state, config, tp_size=tp, tp_rank=t, pp_size=pp, pp_rank=p,
                                   padded_vocab_size=padded, spec=spec)
            for t in range(tp) for p in range(pp)}


# qwen2: q/k/v biases, GQA rep 2; llama: rep 1 or 2. vocab 101 always needs padding.
CONFIGS = {"qwen2_untied": dict(arch="qwen2", tied=False, heads=8, kv_heads=4),
           "qwen2_tied": dict(arch="qwen2", tied=True, heads=8, kv_heads=4),
           "llama_tied_rep1": dict(arch="llama", tied=True, heads=4, kv_heads=4),
           "llama_untied_rep2": dict(arch="llama", tied=False, heads=8, kv_heads=4)}


# --- ParamRule.placements ------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CONFIGS))
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp, pad_multiple", [(1, 8), (2, 128)])  # 128 * TP: whole ranks of padding at TP 4
def test_placements_rebuild_merge_and_cover_every_element_once(case, tp, pp, pad_multiple):
    config = tiny(**CONFIGS[case])
    state = init_tiny_model(config, seed=tp + 10 * pp)
    shards = all_shards(state, config, tp, pp, pad_vocab_size(101, tp, pad_multiple))
    kinds = set()
    for p in range(pp):
        for name in megatron_names(config, pp_size=pp, pp_rank=p):
            rule = rule_for(name, config, tp_size=tp, pp_size=pp, pp_rank=p)
            kinds.add(rule.kind)
            out = [torch.zeros(s) for s in rule.hf_shapes]
            writes = [torch.zeros(s, dtype=torch.int32) for s in rule.hf_shapes]
            for t in range(tp):
                shard = shards[(t, p)][name]
                for i, index, src in rule.placements(shard, t):
                    assert src.untyped_storage().data_ptr() == shard.untyped_storage().data_ptr()  # a view
                    out[i][index] = src
                    writes[i][index] += 1
            merged = rule.merge([shards[(t, p)][name] for t in range(tp)])
            for i, hf_name in enumerate(rule.hf_names):
                assert torch.equal(out[i], merged[hf_name]), (name, hf_name)
                assert torch.all(writes[i] == 1), (name, hf_name, writes[i].unique())
    assert kinds == {"replicated", "tp_col", "qkv", "gate_up", "vocab"}  # no llama/qwen2 param is tp_row


@pytest.mark.parametrize("kind, shape", [("tp_row", (10, 6)), ("tp_col", (6, 10))])
@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_tp_row_and_col_placements_follow_torch_chunk(kind, shape, tp):
    o_proj = rule_for("decoder.layers.0.self_attention.linear_proj.weight", tiny("qwen2"), tp_size=tp)
    rule = dataclasses.replace(o_proj, kind=kind, hf_shapes=(shape,))  # 10 rows: uneven chunks (4, 4, 2) at TP 3
    full = torch.randn(shape)
    out, writes = torch.zeros(shape), torch.zeros(shape, dtype=torch.int32)
    for t in range(tp):
        for i, index, src in rule.placements(rule.shard([full], t, padded_vocab_size=0), t):
            out[index] = src
            writes[index] += 1
    assert torch.equal(out, full) and torch.all(writes == 1)


def test_placements_of_a_padding_only_rank_replicated_ranks_and_qkv_groups():
    config = tiny("qwen2", heads=8, kv_heads=4)  # 4 groups, rep 2, head_dim 8
    state = init_tiny_model(config, seed=1)
    tp = 4
    shards = all_shards(state, config, tp, 1, padded=512)  # 128 rows per rank: ranks 1..3 hold only padding
    embed = rule_for("embedding.word_embeddings.weight", config, tp_size=tp)
    (i, index, src), = embed.placements(shards[(0, 0)]["embedding.word_embeddings.weight"], 0)
    assert (i, index[0], src.shape) == (0, slice(0, 101), (101, 64))
    assert all(embed.placements(shards[(t, 0)]["embedding.word_embeddings.weight"], t) == [] for t in (1, 2, 3))
    norm = rule_for("decoder.final_layernorm.weight", config, tp_size=tp)
    assert len(norm.placements(shards[(0, 0)]["decoder.final_layernorm.weight"], 0)) == 1
    assert norm.placements(shards[(2, 0)]["decoder.final_layernorm.weight"], 2) == []
    qkv = rule_for("decoder.layers.0.self_attention.linear_qkv.weight", config, tp_size=2)
    shard = hf_to_megatron(state, config, tp_size=2, tp_rank=1, padded_vocab_size=104)[qkv.megatron_name]
    got = [(i, index[0]) for i, index, _ in qkv.placements(shard, 1)]  # rank 1 holds groups 2, 3
    assert got == [(0, slice(32, 48)), (0, slice(48, 64)), (1, slice(16, 24)), (1, slice(24, 32)),
                   (2, slice(16, 24)), (2, slice(24, 32))]


def test_placements_reject_a_shard_that_does_not_fit():
    config = tiny("qwen2")
    o_proj = rule_for("decoder.layers.0.self_attention.linear_proj.weight", config, tp_size=2)
    assert o_proj.placements(torch.zeros(64, 32), 1)[0][1] == (slice(0, 64), slice(32, 64))
    with pytest.raises(ConversionError, match="linear_proj.weight: TP rank 1's shard of shape \\(64, 40\\)"):
        o_proj.placements(torch.zeros(64, 40), 1)
    with pytest.raises(ConversionError, match="tp_rank=2 out of range for TP=2"):
        o_proj.placements(torch.zeros(64, 32), 2)
    qkv = rule_for("decoder.layers.0.self_attention.linear_qkv.bias", config, tp_size=2)
    with pytest.raises(ConversionError, match="linear_qkv.bias: qkv shard rows \\(30,\\) are not a multiple of"):
        qkv.placements(torch.zeros(30), 0)


# --- bucket ops ----------------------------------------------------------------------------------


def test_bucket_views_are_views_and_name_the_bad_entry():
    buffer = torch.zeros(256, dtype=torch.uint8)
    a, b, c = ops.bucket_views(buffer, [0, 64, 128], [torch.float32, torch.bfloat16, torch.int64], [(2, 3), (5,), ()])
    assert (a.shape, b.shape, c.shape, b.dtype) == ((2, 3), (5,), (), torch.bfloat16)
    a.fill_(1.0)
    c.fill_(7)
    assert buffer[:24].view(torch.float32).tolist() == [1.0] * 6 and buffer[128:136].view(torch.int64).item() == 7
    assert b.data_ptr() == buffer.data_ptr() + 64
    with pytest.raises(ValueError, match=r"entry 1 \(torch.float32, \(8, 8\)\) at bytes \[64, 320\) lies outside"):
        ops.bucket_views(buffer, [0, 64], [torch.float32] * 2, [(1,), (8, 8)])
    with pytest.raises(ValueError, match="entry 1 offset 66 is not a multiple of torch.float32's itemsize 4"):
        ops.bucket_views(buffer, [0, 66], [torch.float32] * 2, [(1,), (1,)])
    with pytest.raises(ValueError, match="entry 0 .* lies outside"):
        ops.bucket_views(buffer, [-4], [torch.float32], [(1,)])
    with pytest.raises(ValueError, match="contiguous 1-D uint8"):
        ops.bucket_views(buffer.view(torch.float32), [0], [torch.float32], [(1,)])


def test_copy_into_casts_strided_views_and_checks_shapes():
    src = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    dst = torch.zeros(8, 6, dtype=torch.bfloat16)
    ops.copy_into([dst[0:6:2, 1:5], dst[7, :3]], [src, src.t()[1, :3]])  # strided on both sides, fp32 -> bf16
    assert torch.equal(dst[0:6:2, 1:5].float(), src) and dst[7, :3].tolist() == [1.0, 5.0, 9.0]
    assert dst.count_nonzero() == 11 + 3
    w = torch.nn.Parameter(torch.ones(4))
    out = torch.zeros(4)
    ops.copy_into([out], [w])  # a live parameter: no autograd history on the buffer
    assert not out.requires_grad and out.tolist() == [1.0] * 4
    with pytest.raises(ValueError, match=r"entry 1 destination shape \(4,\) != source shape \(2, 2\)"):
        ops.copy_into([out, out], [w, torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="2 destinations but 1 sources"):
        ops.copy_into([out, out], [w])


def test_ops_pack_bucket_and_slime_buckets_round_trip_strided_tensors():
    named = [("w", torch.randn(5, 7).t()), ("b", torch.arange(3, dtype=torch.bfloat16)), ("i", torch.tensor(9))]
    bucket = pack_bucket(named, weight_version=3)
    assert [e.offset for e in bucket.entries] == [0, 192, 256] and bucket.buffer.numel() == 320
    for (name, want), (got_name, got) in zip(named, unpack_bucket(bucket)):
        assert name == got_name and got.dtype == want.dtype and torch.equal(got, want)
    buffer = torch.zeros(128, dtype=torch.uint8)
    ops.pack_bucket([torch.ones(2, 3, dtype=torch.float64), torch.full((4,), 2.5)], [0, 64],
                    [torch.bfloat16, torch.float16], buffer)  # cast on the way in
    assert buffer[:12].view(torch.bfloat16).tolist() == [1.0] * 6
    assert buffer[64:72].view(torch.float16).tolist() == [2.5] * 4
    bad = WeightBucket(bucket.buffer[:260], bucket.entries)
    with pytest.raises(ValueError, match=r"bucket entry 'i': .*lies outside the 260-byte buffer"):
        unpack_bucket(bad)


def test_bucket_copy_is_a_dispatched_op():
    # pack_bucket / unpack_bucket are Python over the one compiled op, copy_into
    assert "copy_into[" in ops.describe() and "pack_bucket" not in ops.describe()
    assert ops.available_impls()[-1] == "reference"


# --- the plan ------------------------------------------------------------------------------------


def check_invariants(plan: WeightPlan) -> None:
    plan.validate()
    singles = 0
    for b in plan.buckets:
        assert len({t.stage for t in b.tensors}) == 1 and b.stage == b.tensors[0].stage
        if b.nbytes > plan.bucket_bytes:  # oversized: a single Megatron param, or a single plain tensor
            assert len(b.sources()) == 1 if b.tensors[0].source else len(b.tensors) == 1
        singles += b.nbytes > plan.bucket_bytes
        end = 0
        for t in b.tensors:
            assert t.offset % ALIGN == 0 and t.offset >= end
            end = t.offset + t.nbytes
        assert b.nbytes == -(-end // ALIGN) * ALIGN
    stages = [b.stage for b in plan.buckets]
    assert stages == sorted(stages) and set(stages) == set(range(plan.pp_size))
    params = [(b.stage, s) for b in plan.buckets for s in b.sources()]
    assert len(set(params)) == len(params)  # all outputs of a Megatron param share one bucket
    assert ("oversized" in plan.summary()) == (singles > 0)


@pytest.mark.parametrize("case", sorted(CONFIGS))
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("pp", [1, 2, 4])
@pytest.mark.parametrize("bucket_bytes", [1, 20_000, 1 << 30])
def test_megatron_plan_names_shapes_and_bucket_rules(case, tp, pp, bucket_bytes):
    config = tiny(**CONFIGS[case])
    plan = plan_for_megatron(config, tp_size=tp, pp_size=pp, dtype="bfloat16", bucket_bytes=bucket_bytes)
    assert {t.name: t.shape for t in plan.tensors} == hf_shapes(config) and len(plan.names) == len(set(plan.names))
    check_invariants(plan)
    assert all(t.dtype == "bfloat16" for t in plan.tensors)
    assert plan.nbytes == 2 * sum(torch.Size(s).numel() for s in hf_shapes(config).values())
    if bucket_bytes == 1 << 30:
        assert len(plan.buckets) == pp
    if bucket_bytes == 1:
        assert len(plan.buckets) == sum(len(megatron_names(config, pp_size=pp, pp_rank=p)) for p in range(pp)) - (
            CONFIGS[case]["tied"] and pp > 1)
    first = plan.stage_buckets(0)[0].tensors[0]
    assert (first.name, first.source, first.stage) == ("model.embed_tokens.weight",
                                                      "embedding.word_embeddings.weight", 0)
    for t in plan.tensors:
        rule = rule_for(t.source, config, tp_size=tp, pp_size=pp, pp_rank=t.stage)
        assert rule.hf_names[t.source_index] == t.name and not rule.tied_copy


def test_smollm2_135m_plan_counts():
    config = smollm2_config()
    big = plan_for_megatron(config, tp_size=1, pp_size=1, dtype="bfloat16", bucket_bytes=512 * MiB)
    assert (len(big.tensors), len(big.buckets), big.nbytes) == (272, 1, 2 * 134_515_008)
    assert big.buckets[0].nbytes == 269_030_016  # every SmolLM2 tensor is a multiple of 64 bytes: no padding
    small = plan_for_megatron(config, tp_size=1, pp_size=1, dtype="bfloat16", bucket_bytes=16 * MiB)
    check_invariants(small)
    # embedding alone (54 MiB, oversized); then 2 layers + the next layer's norms/qkv/o (24 tensors);
    # then 18 tensors (2 layers' worth) per bucket; the last 13 include model.norm.
    assert [len(b.tensors) for b in small.buckets] == [1, 24] + [18] * 13 + [13]
    assert small.buckets[0].sources() == ["embedding.word_embeddings.weight"] and len(small.oversized()) == 1
    assert small.buckets[1].nbytes == 15_932_160 and small.buckets[2].nbytes == 14_160_384
    assert "272 tensors, 16 buckets" in small.summary() and "1 oversized" in small.summary()
    two = plan_for_megatron(config, tp_size=1, pp_size=2, dtype="bfloat16", bucket_bytes=16 * MiB)
    assert [len(two.stage_buckets(s)) for s in (0, 1)] == [9, 8] and len(two.tensors) == 272
    assert two.stage_buckets(1)[-1].tensors[-1].name == "model.norm.weight"


def test_plan_digest_and_json_round_trip():
    config = tiny("qwen2", tied=True)
    plan = plan_for_megatron(config, tp_size=2, pp_size=2, dtype="bfloat16", bucket_bytes=30_000)
    same = plan_for_megatron(config, tp_size=2, pp_size=2, dtype="torch.bfloat16", bucket_bytes=30_000)
    assert plan == same and plan.digest() == same.digest() and len(plan.digest()) == 64
    others = [plan_for_megatron(config, tp_size=2, pp_size=2, dtype="float32", bucket_bytes=30_000),
              plan_for_megatron(config, tp_size=2, pp_size=2, dtype="bfloat16", bucket_bytes=30_001),
              plan_for_megatron(config, tp_size=1, pp_size=2, dtype="bfloat16", bucket_bytes=30_000)]
    assert len({plan.digest(), *(o.digest() for o in others)}) == 4
    restored = WeightPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert restored == plan and restored.digest() == plan.digest()
    d = plan.to_dict()
    del d["buckets"][0]["tensors"][0]["offset"]
    with pytest.raises(PlanError, match="missing field 'offset'"):
        WeightPlan.from_dict(d)
    d = plan.to_dict()
    d["buckets"][1]["tensors"][1]["offset"] = 8
    with pytest.raises(PlanError, match="offset=8 do not fit bucket 1"):
        WeightPlan.from_dict(d)


def test_plan_entries_match_pack_bucket_and_tp_ranks_write_placements_straight_in():
    config = tiny("qwen2", tied=True, heads=8, kv_heads=4)
    state = init_tiny_model(config, seed=7)
    tp, pp = 2, 2
    shards = all_shards(state, config, tp, pp, padded=pad_vocab_size(101, tp, 8))
    plan = plan_for_megatron(config, tp_size=tp, pp_size=pp, dtype="bfloat16", bucket_bytes=40_000)
    assert len(plan.buckets) > pp
    received = {}
    for b in plan.buckets:
        buffer = torch.full((b.nbytes,), 255, dtype=torch.uint8)  # e.g. a shared-memory file
        views = ops.bucket_views(buffer, [t.offset for t in b.tensors], [torch.bfloat16] * len(b.tensors),
                                 [t.shape for t in b.tensors])
        position = {(t.source, t.source_index): n for n, t in enumerate(b.tensors)}
        for rank in range(tp):  # each TP rank of stage b.stage writes its own pieces
            for source in b.sources():
                rule = rule_for(source, config, tp_size=tp, pp_size=pp, pp_rank=b.stage)
                pieces = rule.placements(shards[(rank, b.stage)][source], rank)
                ops.copy_into([views[position[(source, i)]][index] for i, index, _ in pieces], [p[2] for p in pieces])
        packed = pack_bucket([(t.name, state[t.name].to(torch.bfloat16)) for t in b.tensors])
        assert packed.entries == b.entries() and packed.buffer.numel() == b.nbytes
        received.update(unpack_bucket(WeightBucket(buffer, b.entries())))
    assert sorted(received) == sorted(hf_shapes(config))
    for name, t in received.items():
        assert torch.equal(t, state[name].to(torch.bfloat16)), name


def test_plan_for_tensors():
    named = [("a", (10, 10)), ("b", (3,)), ("c", (100, 10)), ("d", ()), ("e", (0, 4))]
    plan = plan_for_tensors(named, dtype="float32", bucket_bytes=512)
    assert plan.names == ["a", "b", "c", "d", "e"] and (plan.tp_size, plan.pp_size) == (1, 1)
    assert [[t.name for t in b.tensors] for b in plan.buckets] == [["a", "b"], ["c"], ["d", "e"]]
    assert [t.offset for t in plan.tensors] == [0, 448, 0, 0, 64]
    assert [b.nbytes for b in plan.buckets] == [512, 4032, 64] and plan.nbytes == 4416
    assert all(t.source is None and t.source_index == 0 and t.stage == 0 for t in plan.tensors)
    assert plan.buckets[0].sources() == [] and "1 oversized" in plan.summary()
    check_invariants(plan)
    tensors = {n: torch.randn(s) for n, s in named}
    for b in plan.buckets:
        assert pack_bucket([(t.name, tensors[t.name]) for t in b.tensors]).entries == b.entries()


@pytest.mark.parametrize("call, message", [
    (lambda: plan_for_tensors([("a", (2,))], dtype="int32", bucket_bytes=64), "dtype='int32' is not a torch floating"),
    (lambda: plan_for_tensors([("a", (2,))], dtype="bf16", bucket_bytes=64), "dtype='bf16' is not a torch floating"),
    (lambda: plan_for_tensors([("a", (2,))], dtype="float32", bucket_bytes=0), "bucket_bytes=0 must be a positive"),
    (lambda: plan_for_tensors([("a", (2,)), ("a", (3,))], dtype="float32", bucket_bytes=64), "a: listed twice"),
    (lambda: plan_for_tensors([("a", (2, -1))], dtype="float32", bucket_bytes=64), r"a: shape \(2, -1\)"),
    (lambda: plan_for_megatron(tiny(), tp_size=3, pp_size=1, dtype="float32", bucket_bytes=64),
     "num_attention_heads'\\]=8 is not divisible by tp_size=3"),
    (lambda: plan_for_megatron(tiny(), tp_size=1, pp_size=3, dtype="float32", bucket_bytes=64),
     "num_hidden_layers'\\]=4 is not divisible by pp_size=3"),
    (lambda: plan_for_megatron(tiny(), tp_size=1, pp_size=1, spec="xx", dtype="float32", bucket_bytes=64),
     "spec='xx' not supported"),
    (lambda: plan_for_megatron(tiny(), tp_size=1, pp_size=1, dtype="float32", bucket_bytes=64).stage_buckets(1),
     "stage=1 out of range for pp_size=1"),
])
def test_plan_errors_name_the_field(call, message):
    with pytest.raises(PlanError, match=message):
        call()


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2), (4, 4)])
@pytest.mark.parametrize("tied", [False, True])
def test_check_local_params(tp, pp, tied):
    config = tiny("qwen2", tied=tied)
    state = init_tiny_model(config, seed=0)
    plan = plan_for_megatron(config, tp_size=tp, pp_size=pp, dtype="bfloat16", bucket_bytes=50_000)
    for (t, p), local in all_shards(state, config, tp, pp, padded=pad_vocab_size(101, tp)).items():
        shapes = {name: tuple(x.shape) for name, x in local.items()}
        check_local_params(plan, p, {**shapes, "decoder.layers.0.mlp.linear_fc1._extra_state": ()}, config)
    last = {name: tuple(x.shape) for name, x in hf_to_megatron(state, config, tp_size=tp, tp_rank=tp - 1,
                                                               pp_size=pp, pp_rank=pp - 1,
                                                               padded_vocab_size=pad_vocab_size(101, tp)).items()}
    missing = dict(last)
    del missing["decoder.final_layernorm.weight"]
    with pytest.raises(PlanError, match=rf"stage {pp - 1}: .*missing \['decoder.final_layernorm.weight'\] \(1 in all\)"
                                        r", unexpected \[\]"):
        check_local_params(plan, pp - 1, missing, config)
    with pytest.raises(PlanError, match=r"missing \[\] \(0 in all\), unexpected \['decoder.layers.9.foo'\]"):
        check_local_params(plan, pp - 1, {**last, "decoder.layers.9.foo": (1,)}, config)
    wrong = {**last, "decoder.layers.0.mlp.linear_fc1.weight": (95, 64)}
    with pytest.raises(PlanError, match="linear_fc1.weight has local shape \\(95, 64\\), not a TP="):
        check_local_params(plan, pp - 1, wrong, config)
