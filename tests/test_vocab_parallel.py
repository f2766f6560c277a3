"""slime_rl.ops.vocab_parallel_logprobs against logprobs_from_logits on the gathered, unpadded logits.

Single process (group=None) and 2 / 4 gloo ranks, each holding one slice of the
padded vocabulary. Padding columns get large logits, so forgetting the mask
moves the results far past the tolerances. fp32 tolerance is atol = rtol =
1e-6: both sides compute the same math in fp32 in a different order, a few ulps
apart (logprobs reach ~-15 here, where one ulp is ~1e-6).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import run_on_ranks
from slime_rl.ops import logprobs_from_logits, vocab_parallel_logprobs

N, V = 37, 101  # V is prime: no TP degree divides it
FP32 = dict(atol=1e-6, rtol=1e-6)


def make_case(v_padded: int, temperature: float, seed: int, with_entropy: bool = True,
              vocab_size: int = V, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, v_padded, generator=g) * 2
    logits[:, vocab_size:] += 20.0  # padding that would dominate if it were not masked
    return dict(logits=logits.to(dtype), targets=torch.randint(0, vocab_size, (N,), generator=g),
                w_logp=torch.randn(N, generator=g), w_ent=torch.randn(N, generator=g), vocab_size=vocab_size,
                temperature=temperature, with_entropy=with_entropy)


def reference(case: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Forward of logprobs_from_logits on the unpadded logits; grad of the weighted loss, zero on padding."""
    logits = case["logits"].float().clone().requires_grad_()
    vs = case["vocab_size"]
    logp, ent = logprobs_from_logits(logits[:, :vs], case["targets"], case["temperature"], case["with_entropy"])
    (grad,) = torch.autograd.grad(weighted_loss(logp, ent, case), logits)
    return logp.detach(), None if ent is None else ent.detach(), grad


def weighted_loss(logp: torch.Tensor, ent: torch.Tensor | None, case: dict) -> torch.Tensor:
    loss = (logp * case["w_logp"]).sum()
    return loss if ent is None else loss + (ent * case["w_ent"]).sum()


def run_slice(case: dict, rank: int, world: int, group) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """This rank's forward values and the gradient of its logits slice."""
    v_local = case["logits"].shape[1] // world
    logits = case["logits"][:, rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
    logp, ent = vocab_parallel_logprobs(logits, case["targets"], vocab_start=rank * v_local,
                                        vocab_size=case["vocab_size"], group=group,
                                        temperature=case["temperature"], with_entropy=case["with_entropy"])
    (grad,) = torch.autograd.grad(weighted_loss(logp, ent, case), logits)
    return logp.detach(), None if ent is None else ent.detach(), grad


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_single_device_matches_reference(pad, temperature):
    case = make_case(V + pad, temperature, seed=pad)
    logp, ent, grad = run_slice(case, 0, 1, None)
    ref_logp, ref_ent, ref_grad = reference(case)
    assert logp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, **FP32)
    torch.testing.assert_close(ent, ref_ent, **FP32)
    torch.testing.assert_close(grad, ref_grad, **FP32)
    assert grad[:, V:].eq(0).all()


def test_without_entropy_returns_none_and_logprob_grads():
    case = make_case(V + 3, 0.7, seed=1, with_entropy=False)
    logp, ent, grad = run_slice(case, 0, 1, None)
    ref_logp, _, ref_grad = reference(case)
    assert ent is None
    torch.testing.assert_close(logp, ref_logp, **FP32)
    torch.testing.assert_close(grad, ref_grad, **FP32)


def test_grad_through_entropy_alone():
    case = make_case(V + 3, 0.7, seed=2)
    logits = case["logits"].clone().requires_grad_()
    _, ent = vocab_parallel_logprobs(logits, case["targets"], vocab_start=0, vocab_size=V, temperature=0.7)
    (grad,) = torch.autograd.grad((ent * case["w_ent"]).sum(), logits)
    ref_logits = case["logits"][:, :V].clone().requires_grad_()
    _, ref_ent = logprobs_from_logits(ref_logits, case["targets"], 0.7)
    (ref_grad,) = torch.autograd.grad((ref_ent * case["w_ent"]).sum(), ref_logits)
    torch.testing.assert_close(grad[:, :V], ref_grad, **FP32)
    assert grad[:, V:].eq(0).all()


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 4, 2, 4])

    def fn(x):
        return vocab_parallel_logprobs(x, targets, vocab_start=0, vocab_size=5, temperature=0.7)

    assert fn(logits)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8)


def test_bf16_logits():
    """The op adds no bf16 error: it upcasts and matches fp32 on the same values; the rest is input rounding.

    Against the fp32 logits before rounding, with d = max |rounding error| of z = logits / T:
    logprob = z_t - lse moves by at most 2d (lse is 1-Lipschitz in the max norm); entropy moves by
    E_p|log p + H| * d to first order (its gradient is -p (log p + H)), given 2x room for higher orders.
    """
    case = make_case(V + 3, 0.7, seed=4)
    bf16_case = {**case, "logits": case["logits"].bfloat16()}
    logp, ent, grad = run_slice(bf16_case, 0, 1, None)
    assert logp.dtype == ent.dtype == torch.float32 and grad.dtype == torch.bfloat16
    upcast_logp, upcast_ent, _ = reference(bf16_case)  # fp32 reference on the bf16-rounded values
    torch.testing.assert_close(logp, upcast_logp, **FP32)
    torch.testing.assert_close(ent, upcast_ent, **FP32)

    ref_logp, ref_ent, _ = reference(case)
    z = case["logits"][:, :V] / 0.7
    d = (bf16_case["logits"][:, :V].float() / 0.7 - z).abs().amax(1)
    logp_ref_NV = torch.log_softmax(z, -1)
    spread = (logp_ref_NV.exp() * (logp_ref_NV + ref_ent.unsqueeze(1)).abs()).sum(1)
    assert d.max() > 0  # the rounding is real, so the bounds below are not vacuous
    assert ((logp - ref_logp).abs() <= 2 * d + 1e-6).all()
    assert ((ent - ref_ent).abs() <= 2 * spread * d + 1e-6).all()


@pytest.mark.parametrize("kwargs,error,needle", [
    (dict(targets=torch.tensor([0, V])), ValueError, r"targets must lie in \[0, vocab_size=101\)"),
    (dict(targets=torch.tensor([0, -1])), ValueError, "targets must lie"),
    (dict(targets=torch.tensor([0])), ValueError, "targets_N must have shape"),
    (dict(targets=torch.tensor([0.0, 1.0])), TypeError, "int64 or int32"),
    (dict(logits=torch.zeros(2, 3, V)), ValueError, "2-D"),
    (dict(temperature=-1.0), ValueError, "temperature"),
])
def test_bad_input_fails_loudly(kwargs, error, needle):
    args = dict(logits=torch.zeros(2, V), targets=torch.tensor([0, 1]), temperature=1.0)
    args.update(kwargs)
    with pytest.raises(error, match=needle):
        vocab_parallel_logprobs(args["logits"], args["targets"], vocab_start=0, vocab_size=V,
                                temperature=args["temperature"])


# ---- multi-process: one spawn per world size, every case inside it ----

def _run_cases(rank: int, world: int, cases: list[dict]) -> list[tuple]:
    return [run_slice(case, rank, world, dist.group.WORLD) for case in cases]


@pytest.mark.parametrize("world,layouts", [
    (2, [(102, V)]),
    (4, [(104, V), (128, 90)]),  # (padded, real) vocab; with 128/90 the last rank holds only padding
])
def test_tensor_parallel_ranks_match_single_device(world, layouts, tmp_path):
    cases = [make_case(v_padded, temperature, seed=i, with_entropy=with_entropy, vocab_size=vocab_size)
             for i, (v_padded, vocab_size) in enumerate(layouts)
             for temperature in (1.0, 0.7) for with_entropy in (True, False)]
    per_rank = run_on_ranks(_run_cases, world, cases, tmp_path)
    for i, case in enumerate(cases):
        ref_logp, ref_ent, ref_grad = reference(case)
        for rank in range(world):
            logp, ent, _ = per_rank[rank][i]
            torch.testing.assert_close(logp, ref_logp, **FP32)
            if case["with_entropy"]:
                torch.testing.assert_close(ent, ref_ent, **FP32)
            else:
                assert ent is None
        grad = torch.cat([per_rank[rank][i][2] for rank in range(world)], dim=1)
        torch.testing.assert_close(grad, ref_grad, **FP32)
        assert grad[:, case["vocab_size"]:].eq(0).all()
