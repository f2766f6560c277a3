"""Kernel API: each op runs a CUDA kernel, a C++ kernel or its pure-torch reference.

    from slime_rl import ops
    adv_GN = ops.group_normalize(rewards_GN, eps=1e-6, scale_by_std=True)
    print(ops.describe())                 # which implementation each op uses, and why
    with ops.force_impl("reference"): ... # or SLIME_RL_OPS_IMPL=cuda|cpp|reference

Importing this package compiles and loads nothing; the compiled library
(slime_rl._C) is looked for on first use. See _backend.py for the rules and
csrc/README.md for building and adding kernels. The bucket ops (bucket_views,
copy_into, pack_bucket) are torch references only for now (csrc kernel: issue 7)
and are not listed by describe().
"""

from slime_rl.ops._backend import IMPLS, ImplUnavailableError, available_impls, describe, force_impl
from slime_rl.ops.advantages import group_normalize
from slime_rl.ops.buckets import bucket_views, copy_into, pack_bucket
from slime_rl.ops.logprob import logprobs_from_logits
from slime_rl.ops.vocab_parallel import vocab_parallel_logprobs

__all__ = [
    "IMPLS",
    "ImplUnavailableError",
    "available_impls",
    "bucket_views",
    "copy_into",
    "describe",
    "force_impl",
    "group_normalize",
    "logprobs_from_logits",
    "pack_bucket",
    "vocab_parallel_logprobs",
]
