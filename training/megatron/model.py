"""megatron-core GPTModel for the Llama / Qwen2 family, built from an HF config.json.

The local layer spec (pure megatron-core modules) is the default and the only
one that runs on CPU; the Transformer-Engine spec can be chosen when TE is
installed and a GPU is present (it fuses the norms into the next linear, so
parameter names differ; `conversion` knows both).

One departure from stock GPTModel: RoPE angles come from per-token position
ids (`PackedRotaryEmbedding`). Megatron computes RoPE for positions 0..S-1 of
the whole row; with several sequences packed into one row, each sequence must
restart at position 0 to give exactly the logprobs of the same sequence alone
(mathematically RoPE is relative, numerically large absolute angles lose
precision), and THD packing that would handle it needs Transformer Engine.

With settings.fused_logprob (the default) the last stage's output layer returns
the final hidden states instead of logits (`return_hidden_states`): the trainer
computes logprobs and entropy from them and `output_weight(model)` with the
fused linear+logprob op, so the [tokens, vocab] logits are never formed.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from slime_rl.hf_io import rope_theta
from training.megatron.conversion import pad_vocab_size


@dataclass
class ModelSettings:
    """How the Megatron model is laid out and computed (not what it is: that is the HF config)."""

    tp: int = 1
    pp: int = 1
    spec: str = "auto"  # auto (= local for now) | local | te
    dtype: str = "float32"  # float32 | bfloat16
    sequence_parallel: bool = False  # needs the TE spec
    vocab_pad_multiple: int = 128  # padded vocab = multiple of this x tp (megatron's make-vocab-size-divisible-by)
    fused_logprob: bool = True  # the last stage returns hidden states [b, s, h], not logits (return_hidden_states)


def resolve_spec(settings: ModelSettings) -> str:
    """'local' or 'te' for settings.spec, checking that TE is usable when asked for.

    "auto" resolves to the local spec: packed micro-batches rely on an explicit
    block-diagonal mask, which the local attention honours; TE's fused
    attention needs THD packing (cu_seqlens) instead, not wired yet, so the TE
    spec is opt-in and untested here.
    """
    have_te = torch.cuda.is_available() and _te_installed()
    if settings.spec == "auto":
        return "local"
    if settings.spec == "te" and not have_te:
        raise ValueError("model spec 'te' needs Transformer Engine and a CUDA GPU; use spec 'local'")
    if settings.spec not in ("local", "te"):
        raise ValueError(f"model spec must be auto, local or te, got {settings.spec!r}")
    if settings.sequence_parallel and settings.spec != "te" and not have_te:
        raise ValueError("sequence_parallel needs the Transformer Engine spec (megatron's local norms assert)")
    return settings.spec


def _te_installed() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(hf_config: dict, settings: ModelSettings):
    """megatron TransformerConfig equivalent to the HF config (Llama / Qwen2 family)."""
    from megatron.core.transformer import TransformerConfig

    heads = hf_config["num_attention_heads"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[settings.dtype]
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        kv_channels=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        ffn_hidden_size=hf_config["intermediate_size"],
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=hf_config["model_type"] == "qwen2",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=settings.tp,
        pipeline_model_parallel_size=settings.pp,
        sequence_parallel=settings.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        # Weights are overwritten from the HF checkpoint, but initialization must run: on the CPU path it is
        # what marks parameters as tensor-parallel (without the mark, grad norms skip other ranks' shards).
        perform_initialization=True,
        calculate_per_token_loss=True,  # the loss is already normalized over the whole batch
        # fusions stay off: several need CUDA, the others only slow the first CPU forward
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )


class PackedRotaryEmbedding(torch.nn.Module):
    """RoPE from explicit position ids [B, S] (set before each forward), HF's angle arithmetic.

    Returns megatron's rotary layout [S, B, 1, dim] (cos/sin are taken by the
    attention layer), so rows of a micro-batch may hold differently packed
    sequences.
    """

    def __init__(self, kv_channels: int, base: float):
        super().__init__()
        self.inv_freq = 1.0 / (base ** (torch.arange(0, kv_channels, 2, dtype=torch.int64).float() / kv_channels))
        self.positions_BS: torch.Tensor | None = None

    def set_positions(self, positions_BS: torch.Tensor) -> None:
        self.positions_BS = positions_BS

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return int(self.positions_BS.shape[1])

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> torch.Tensor:
        if self.positions_BS is None:
            raise RuntimeError("PackedRotaryEmbedding: set_positions() must be called before the forward")
        pos_SB = self.positions_BS.t().to(self.inv_freq.device)
        freqs_SBD = pos_SB[..., None].float() * self.inv_freq
        return torch.cat([freqs_SBD, freqs_SBD], dim=-1)[:, :, None, :]


def build_gpt_model(hf_config: dict, settings: ModelSettings, pre_process: bool, post_process: bool):
    """One pipeline stage of the GPTModel (random weights: the caller loads the checkpoint)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    spec = resolve_spec(settings)
    config = transformer_config(hf_config, settings)
    layer_spec = (get_gpt_layer_with_transformer_engine_spec() if spec == "te"
                  else get_gpt_layer_local_spec(normalization="RMSNorm"))
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=pad_vocab_size(hf_config["vocab_size"], settings.tp, settings.vocab_pad_multiple),
        max_sequence_length=hf_config.get("max_position_embeddings", 4096),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # logits stay vocab-parallel; logprobs are computed across TP ranks
        share_embeddings_and_output_weights=bool(hf_config.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=int(rope_theta(hf_config)),
    )
    model.rotary_pos_emb = PackedRotaryEmbedding(config.kv_channels, rope_theta(hf_config))
    if post_process and settings.fused_logprob:
        return_hidden_states(model)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if config.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    return model


def return_hidden_states(model) -> None:
    """Make this last-stage GPTModel return its final hidden states [b, s, h] in place of logits [b, s, v].

    For the fused linear+logprob op (slime_rl.ops.fused_linear_logprobs), which
    takes the hidden states and the output weight (`output_weight`) and never
    forms the logits. Only the output layer's forward is replaced: its
    parameters, names, sharded state dict, DDP buckets and the tied-embedding
    sync stay as they are. GPTModel's [s, b, .] -> [b, s, .] transpose after the
    layer still applies.

    The layer keeps ColumnParallelLinear's input-side communication, which
    makes the hidden states the op's TP-replicated input: copy to the TP region
    (identity forward, all-reduce backward: the op gives each TP rank only its
    vocab slice's part of the gradient for hidden), or under sequence
    parallelism the all-gather of the sequence shards (reduce-scatter backward).
    """
    model.output_layer.forward = types.MethodType(_hidden_states_forward, model.output_layer)


def _hidden_states_forward(layer, input_sbh: torch.Tensor, weight: torch.Tensor | None = None,
                           runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, None]:
    """ColumnParallelLinear.forward's signature and input communication, without the matmul."""
    if layer.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        return gather_from_sequence_parallel_region(input_sbh, tensor_parallel_output_grad=True,
                                                    group=layer.tp_group), None
    return _CopyToTensorParallelRegion.apply(input_sbh, layer.tp_group), None


class _CopyToTensorParallelRegion(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over the TP group.

    megatron's copy_to_tensor_model_parallel_region means the same, but it
    all-reduces `grad.contiguous()` and returns `grad`, so a non-contiguous
    gradient comes back unreduced — and GPTModel's [s, b] -> [b, s] transpose
    after the output layer makes this one non-contiguous.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)  # all-reduced in place: never the caller's buffer
        if ctx.group.size() > 1:
            torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def output_weight(model) -> torch.Tensor:
    """The output layer's [V_local, H] weight shard as GPTModel's forward picks it (the embedding when tied).

    With tied embeddings on one stage this is the word embedding itself; on the
    last of several stages, the output layer's copy, whose gradient megatron
    all-reduces with the first stage's embedding.
    """
    gpt = unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
