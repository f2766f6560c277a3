"""Kernel API: each op runs a CUDA kernel, a C++ kernel or its pure-torch reference.

    from slime_rl import ops
    adv_GN = ops.group_normalize(rewards_GN, eps=1e-6, scale_by_std=True)
    logp_N, ent_N = ops.fused_linear_logprobs(hidden_NH, weight_VH, targets_N, temperature=0.7)
    adv, ret = ops.gae(rewards_BT, values_BT, mask_BT, gamma=1.0, lam=0.95)
    print(ops.describe())                 # which implementation each op uses, and why
    with ops.force_impl("reference"): ... # or SLIME_RL_OPS_IMPL=cuda|cpp|reference

The ops: advantages (group_normalize, loo_advantages, discounted_returns, gae), logprob and entropy
(fused_linear_logprobs from hidden states + output weight, never [T, V] logits; logprobs_from_logits and
vocab_parallel_logprobs from given logits) and weight buckets (copy_into, pack_bucket, unpack_bucket, bucket_views).
Importing this package compiles and loads nothing; the compiled library (slime_rl._C) is looked for on
first use. See _backend.py for the rules and csrc/README.md for building and adding kernels.
"""

from slime_rl.ops._backend import IMPLS, ImplUnavailableError, available_impls, describe, force_impl
from slime_rl.ops.advantages import discounted_returns, gae, group_normalize, loo_advantages
from slime_rl.ops.buckets import bucket_views, copy_into, pack_bucket, unpack_bucket
from slime_rl.ops.fused_logprob import fused_linear_logprobs
from slime_rl.ops.logprob import logprobs_from_logits
from slime_rl.ops.vocab_parallel import vocab_parallel_logprobs

__all__ = [
    "IMPLS",
    "ImplUnavailableError",
    "available_impls",
    "bucket_views",
    "copy_into",
    "describe",
    "discounted_returns",
    "force_impl",
    "fused_linear_logprobs",
    "gae",
    "group_normalize",
    "loo_advantages",
    "logprobs_from_logits",
    "pack_bucket",
    "unpack_bucket",
    "vocab_parallel_logprobs",
]
