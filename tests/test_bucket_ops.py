"""copy_into / pack_bucket / unpack_bucket: the kernels give exactly dst.copy_(src), entry by entry.

The spec is the copy_ loop (slime_rl/ops/buckets.py::_copy_loop). "Exactly" means the same
bits for every value that is not a NaN: rounding ties, subnormals, overflow to inf, signed
zeros, fp64 -> fp32 -> bf16 double rounding. NaNs must stay NaNs, but their payload bits are
not compared: torch's own paths disagree on them (its AVX2 fp32 -> bf16 loop writes 0xFFFF,
its scalar fp16 -> bf16 path 0x7FC0, for the same NaN), and the CPU kernel writes c10's 0x7FC0.
On the GPU both sides use the same CUDA intrinsics, so there the bits are compared as is.

Kernel tests skip without a C++ build (`_backend.describe()` says why); the reference
path and the Python-side checks run everywhere. tests/test_weight_plan.py covers the
callers (bucket layout, weight-sync placement).
"""

from __future__ import annotations

import struct

import pytest
import torch

from slime_rl import ops
from slime_rl.ops import _backend
from slime_rl.ops import buckets as bk

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PAIRS = [(s, d) for s in FLOATS for d in FLOATS]
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _has(impl: str) -> bool:
    return impl in _backend.available_impls("copy_into")


needs_cpp = pytest.mark.skipif(not _has("cpp"),
                               reason=f"no C++ copy_into kernel: {_backend._why_not('cpp', 'copy_into')}")


@pytest.fixture(autouse=True)
def _fresh_choice():
    _backend.reset()
    yield
    _backend.reset()


@pytest.fixture
def two_threads():
    """Two torch threads, so the kernel's parallel split is exercised (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _special_values() -> torch.Tensor:
    """float64 values that exercise every rounding rule of the fp32/fp16/bf16 casts."""
    f32_bits = [
        0x3F808000, 0x3F818000, 0xBF808000, 0x3F807FFF, 0x3F808001,  # bf16 ties (even, odd lsb) and near ties
        0x3F801000, 0x3F803000, 0x3F800FFF, 0x3F801001,  # fp16 ties and near ties at 1.0
        0x7F7FFFFF, 0x7F7F8000, 0x7F7FC000,  # fp32 max; bf16 rounding up to inf
        0x00000001, 0x80000001, 0x007FFFFF, 0x00400000,  # fp32 subnormals
        0x00808000, 0x00018000,  # bf16 ties among tiny and subnormal values
    ]
    values = [_f32(b) for b in f32_bits]
    values += [
        0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan"),
        65504.0, 65519.99, 65520.0, -65520.0, 1e5,  # fp16 max, last value rounding to it, first to inf
        2.0**-24, 2.0**-25, 3 * 2.0**-25, 2.0**-14, 2.0**-14 - 2.0**-24, 1e-8,  # fp16 subnormals and ties
        1 + 2.0**-24, 1 + 3 * 2.0**-24, 1 + 2.0**-24 + 2.0**-50,  # fp64 -> fp32 ties and just past
        1 + 2.0**-8 + 2.0**-40,  # fp64 -> bf16: rounds to the bf16 tie in fp32 first, then down (double rounding)
        1 + 2.0**-11 + 2.0**-40,  # the same for fp16
        5e-324, 1e-310, 1e300, -1e300, 3.4028235677973366e38,  # fp64 subnormal, out of fp32 range, fp32 max tie
    ]
    g = torch.Generator().manual_seed(0)
    n = 4000  # random values over every exponent the four dtypes have
    wide = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-150, 130, (n,), generator=g).double())
    return torch.cat([torch.tensor(values, dtype=torch.float64), wide])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str = "", nan_bits: bool = False) -> None:
    """got == want bit for bit, except that NaNs only need to be NaN (see module docstring)."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if got.is_floating_point() and not nan_bits:
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan), f"{what}: NaNs in different places"
        differ = (_bits(got) != _bits(want)) & ~nan.contiguous()
    else:
        differ = _bits(got) != _bits(want)
    if differ.any():
        i = int(differ.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int(differ.sum())} elements differ from copy_, first at flat index {i}: "
                             f"got {got.reshape(-1)[i].item()!r}, copy_ gives {want.reshape(-1)[i].item()!r}")


def _garbage_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    """A tensor like t holding random bytes (so untouched or wrongly written elements show)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty_like(t)
    raw = out.view(torch.uint8) if out.is_contiguous() and out.dim() > 0 else None
    if raw is not None:
        raw.copy_(torch.randint(0, 256, raw.shape, generator=g, dtype=torch.uint8))
    else:
        out.fill_(7)
    return out


def _run_both(make_dsts, srcs, impl: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(dsts after ops.copy_into with impl, dsts after the copy_ loop); make_dsts() builds fresh equal ones."""
    got, want = make_dsts(), make_dsts()
    ops.copy_into(got, srcs, impl=impl)
    bk._copy_loop(want, srcs)
    return got, want


# --- the reference (runs everywhere) -------------------------------------------------------------


def test_reference_path_is_the_copy_loop_and_records_no_history():
    w = torch.nn.Parameter(torch.randn(3, 4))
    dst = torch.zeros(4, 3, dtype=torch.bfloat16)
    ops.copy_into([dst], [w.t()], impl="reference")
    assert not dst.requires_grad and dst.grad_fn is None
    assert_same(dst, w.detach().t().to(torch.bfloat16))
    with pytest.raises(bk.BucketEntryError) as info:
        ops.copy_into([dst, dst, torch.zeros(2)], [w.t(), w.t(), torch.zeros(3)], impl="reference")
    assert info.value.index == 2 and "entry 2 destination shape (2,) != source shape (3,)" in str(info.value)
    with pytest.raises(ValueError, match="2 destinations but 1 sources"):
        ops.copy_into([dst, dst], [w.t()])
    ops.copy_into([], [])  # nothing to do


def test_unpack_bucket_inverts_pack_bucket_at_odd_offsets():
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g).to(torch.bfloat16),
              torch.randn(2, 2, generator=g, dtype=torch.float64), torch.randn(3, generator=g).to(torch.float16)]
    offsets, dtypes = [2, 40, 64, 102], [torch.bfloat16, torch.bfloat16, torch.float64, torch.float16]
    buffer = torch.zeros(128, dtype=torch.uint8)
    bk.pack_bucket(params, offsets, dtypes, buffer)
    back = [torch.empty_like(p) for p in params]
    bk.unpack_bucket(buffer, offsets, back, dtypes)
    for p, b, d in zip(params, back, dtypes):
        assert_same(b, p.to(d).to(p.dtype))
    raw_offsets = [4, 64, 80, 112]
    bk.pack_bucket(params, raw_offsets, [p.dtype for p in params], buffer)  # no cast ...
    same = [torch.empty_like(p) for p in params]
    bk.unpack_bucket(buffer, raw_offsets, same)  # ... and dtypes default to the destinations' own
    for p, b in zip(params, same):
        assert_same(b, p)
    with pytest.raises(ValueError, match="unpack_bucket: 1 destinations but 2 offsets"):
        bk.unpack_bucket(buffer, [0, 8], back[:1])
    with pytest.raises(bk.BucketEntryError, match="entry 1 offset 41 is not a multiple"):
        bk.unpack_bucket(buffer, [0, 41], back[:2], dtypes[:2])


def test_bucket_views_are_the_slices_they_stand_for():
    buffer = torch.arange(64, dtype=torch.int32).view(torch.uint8)
    shapes = [(), (0,), (3, 0, 2), (2, 3), (5,), (1, 1, 4), (0,), (7,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.float16, torch.uint8, torch.bool,
              torch.bfloat16]
    offsets = [0, 8, 16, 40, 96, 131, 200, 242]
    for view, offset, dtype, shape in zip(bk.bucket_views(buffer, offsets, dtypes, shapes), offsets, dtypes, shapes):
        nbytes = dtype.itemsize * torch.Size(shape).numel()
        want = buffer[offset:offset + nbytes].view(dtype).view(shape)
        assert (view.shape, view.stride(), view.dtype, view.data_ptr()) == \
            (want.shape, want.stride(), want.dtype, want.data_ptr())
        assert torch.equal(_bits(view) if view.numel() else view, _bits(want) if want.numel() else want)


def test_copy_into_moves_devices_with_copy_in_list_order():
    # "meta" stands in for another device: an entry crossing devices takes copy_, the rest the kernel
    # (when built), and the list is still processed in order.
    src = torch.arange(6, dtype=torch.float32)
    a, b = torch.zeros(6, dtype=torch.bfloat16), torch.zeros(6, dtype=torch.float16)
    ops.copy_into([a, torch.empty(6, device="meta"), b], [src, src, src])
    assert a.tolist() == b.tolist() == src.tolist()


# --- the C++ kernel: bit-identical to copy_ ------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("src_dtype,dst_dtype", PAIRS, ids=[f"{s}-{d}".replace("torch.", "") for s, d in PAIRS])
def test_every_float_pair_is_bit_identical_to_copy(src_dtype, dst_dtype):
    values = _special_values().to(src_dtype)
    sizes = [0, 1, 7, 33, 1000, values.numel()]
    srcs = [values[:n] for n in sizes] + [values.flip(0)]
    got, want = _run_both(lambda: [_garbage_like(torch.empty(s.shape, dtype=dst_dtype), i)
                                   for i, s in enumerate(srcs)], srcs, "cpp")
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same(g, w, f"{src_dtype} -> {dst_dtype}, entry {i} ({srcs[i].numel()} elements)")


@needs_cpp
@pytest.mark.parametrize("src_dtype,dst_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                 (torch.float32, torch.float16), (torch.float64, torch.bfloat16),
                                                 (torch.float16, torch.float16)])
def test_big_entries_split_over_threads(two_threads, src_dtype, dst_dtype):
    g = torch.Generator().manual_seed(2)
    big = (torch.randn(3_000_001, generator=g) * 100).to(src_dtype)  # ~3M: thousands of 256 KiB units
    smalls = [torch.randn(n, generator=g).to(src_dtype) for n in (1, 5, 129, 4097)]
    srcs = smalls[:2] + [big] + smalls[2:]  # a huge entry between small ones
    got, want = _run_both(lambda: [torch.zeros(s.shape, dtype=dst_dtype) for s in srcs], srcs, "cpp")
    for g_, w in zip(got, want):
        assert_same(g_, w, f"{src_dtype} -> {dst_dtype}, {w.numel()} elements")


def _strided_cases(device="cpu"):
    """(make_dst, src) pairs with a non-contiguous side, as weight sync produces them. The bases are made
    on `device` and sliced there: moving a view to another device makes it contiguous."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 40, generator=g).to(device)
    qkv = torch.randn(96, 40, generator=g).to(device)  # a fused QKV weight: entries are row slices of it

    def zeros(*shape, dtype):
        return lambda: torch.zeros(shape, dtype=dtype, device=device)

    return [
        (zeros(40, 48, dtype=torch.bfloat16), w.t()),  # transposed source
        (zeros(48, 40, dtype=torch.bfloat16), w),  # contiguous, for contrast
        (zeros(32, 40, dtype=torch.float16), qkv[32:64]),  # contiguous row slice
        (zeros(96, 20, dtype=torch.bfloat16), qkv[:, ::2]),  # step slice
        (lambda: torch.zeros(20, 96, dtype=torch.float32, device=device).t(), qkv[:, 10:30]),  # strided on both
        (zeros(40, dtype=torch.float64), w[3]),  # a row
        (zeros(48, dtype=torch.float32), w[:, 3]),  # a column, same dtype
        (zeros(5, 40, dtype=torch.bfloat16), w[7:8].expand(5, 40)),  # zero stride
        (zeros(dtype=torch.float16), w[1, 2]),  # 0-d
    ]


@needs_cpp
def test_strided_sources_and_destinations():
    cases = _strided_cases()
    srcs = [src for _, src in cases]
    got, want = _run_both(lambda: [make() for make, _ in cases], srcs, "cpp")
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same(g, w, f"case {i}")
    # Views of one destination written by several entries (TP shards placed into one tensor).
    full_got, full_want = torch.zeros(8, 12, dtype=torch.bfloat16), torch.zeros(8, 12, dtype=torch.bfloat16)
    shards = [torch.randn(8, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    ops.copy_into([full_got[:, 4 * r:4 * r + 4] for r in range(3)], shards, impl="cpp")
    bk._copy_loop([full_want[:, 4 * r:4 * r + 4] for r in range(3)], shards)
    assert_same(full_got, full_want, "column shards")


@needs_cpp
def test_mixed_list_with_other_dtypes_matches_the_loop(two_threads):
    g = torch.Generator().manual_seed(4)
    srcs, dst_dtypes = [], []
    for i in range(60):
        n = int(torch.randint(0, 3000, (1,), generator=g))
        s_dt, d_dt = PAIRS[i % len(PAIRS)]
        srcs.append((torch.randn(n, generator=g) * 10).to(s_dt))
        dst_dtypes.append(d_dt)
    srcs += [torch.arange(10), torch.arange(10, dtype=torch.int32), torch.tensor([True, False]),
             torch.randn(6, generator=g), torch.arange(4, dtype=torch.float64), torch.randn(3, 3, generator=g)]
    dst_dtypes += [torch.float32, torch.int32, torch.bool, torch.int64, torch.int8, torch.complex64]
    got, want = _run_both(lambda: [_garbage_like(torch.empty(s.shape, dtype=d), 100 + i)
                                   for i, (s, d) in enumerate(zip(srcs, dst_dtypes))], srcs, "cpp")
    for i, (g_, w) in enumerate(zip(got, want)):
        assert_same(g_, w, f"entry {i}: {srcs[i].dtype} -> {dst_dtypes[i]}")


@needs_cpp
@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_pack_bucket_at_odd_byte_offsets_writes_only_its_bytes(impl):
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g), torch.randn(2, 3, generator=g).t(),
              torch.randn(1, generator=g), torch.randn(4, generator=g, dtype=torch.float64),
              torch.randn(9, generator=g)]
    dtypes = [torch.bfloat16, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float32]
    offsets = [2, 34, 50, 68, 72, 108]  # multiples of each itemsize, not of 64
    got, want = (_garbage_like(torch.empty(160, dtype=torch.uint8), 6) for _ in range(2))
    bk.pack_bucket(params, offsets, dtypes, got, impl=impl)
    views = bk.bucket_views(want, offsets, dtypes, [p.shape for p in params])
    for v, p in zip(views, params):
        v.copy_(p)
    assert torch.equal(got, want)  # every byte, including the gaps it must not touch


@needs_cpp
def test_round_trip_fp32_through_a_bf16_bucket(two_threads):
    g = torch.Generator().manual_seed(7)
    params = [torch.randn(300, 17, generator=g), torch.randn(17, generator=g), torch.randn(40, 300, generator=g).t()]
    offsets, dtypes = [0, 300 * 17 * 2, 300 * 17 * 2 + 64], [torch.bfloat16] * 3
    buffer = torch.empty(offsets[-1] + 40 * 300 * 2, dtype=torch.uint8)
    bk.pack_bucket(params, offsets, dtypes, buffer, impl="cpp")
    back = [torch.full(p.shape, float("nan")) for p in params[:2]] + [torch.full((40, 300), float("nan")).t()]
    bk.unpack_bucket(buffer, offsets, back, dtypes, impl="cpp")
    for p, b in zip(params, back):
        assert_same(b, p.to(torch.bfloat16).to(torch.float32))


@needs_cpp
def test_overlapping_entries_behave_like_the_loop():
    base = torch.arange(16, dtype=torch.float32)

    def fresh():
        return torch.zeros(16, dtype=torch.float32), torch.zeros(16, dtype=torch.bfloat16)

    def lists(x, y):
        # entry 1 reads what entry 0 wrote; entries 2 and 3 write the same bytes (the later wins);
        # entry 4 writes into the source of entry 5.
        return ([x[:8], y[:8], x[8:], x[8:], x[:4], y[8:12]],
                [base[:8], x[:8], base[8:], base[:8] * -1, base[12:], x[:4]])

    got, want = fresh(), fresh()
    ops.copy_into(*lists(*got), impl="cpp")
    bk._copy_loop(*lists(*want))
    assert_same(got[0], want[0], "fp32 buffer")
    assert_same(got[1], want[1], "bf16 buffer")
    shifted = torch.arange(10.0)  # a source overlapping its own destination: copy_'s error, from either path
    for impl in ("cpp", "reference"):
        with pytest.raises(RuntimeError, match="refer to a single memory location"):
            ops.copy_into([shifted[1:]], [shifted[:-1]], impl=impl)


@needs_cpp
def test_kernel_op_checks_name_the_entry():
    copy_into = torch.ops.slime_rl.copy_into
    with pytest.raises(RuntimeError, match=r"copy_into: entry 1 destination shape \[2\] != source shape \[3\]"):
        copy_into([torch.zeros(3), torch.zeros(2)], [torch.zeros(3), torch.zeros(3)])
    with pytest.raises(RuntimeError, match="slime_rl::copy_into: 2 destinations but 1 sources"):
        copy_into([torch.zeros(3), torch.zeros(3)], [torch.zeros(3)])
    # Different devices reach the CPU kernel only when dispatched there explicitly ("meta" as the other device).
    with pytest.raises(RuntimeError, match="slime_rl::copy_into: entry 0 copies from meta to cpu"):
        copy_into.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
                                     [torch.zeros(3)], [torch.zeros(3, device="meta")])
    with pytest.raises(bk.BucketEntryError) as info:  # the public entry checks shapes before any copy
        ops.copy_into([torch.zeros(3), torch.zeros(2, 2)], [torch.ones(3), torch.ones(4)], impl="cpp")
    assert info.value.index == 1


@needs_cpp
def test_parameters_on_either_side_get_no_history_and_a_version_bump():
    w = torch.nn.Parameter(torch.randn(4, 5))
    buffer = torch.zeros(4 * 5 * 2, dtype=torch.uint8)
    bk.pack_bucket([w], [0], [torch.bfloat16], buffer, impl="cpp")
    assert not buffer.requires_grad and buffer.grad_fn is None
    q = torch.nn.Parameter(torch.zeros(4, 5))
    version = q._version
    bk.unpack_bucket(buffer, [0], [q], [torch.bfloat16], impl="cpp")
    assert q.is_leaf and q.grad_fn is None and q._version == version + 1  # as copy_ bumps it
    assert_same(q.detach(), w.detach().to(torch.bfloat16).float())


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_inference_tensors_follow_copy_rules(impl):
    if impl == "cpp" and not _has("cpp"):
        pytest.skip("no C++ copy_into kernel")
    with torch.inference_mode():
        weight = torch.zeros(3)
        ops.copy_into([weight], [torch.ones(3)], impl=impl)  # inside inference mode: allowed
    assert weight.tolist() == [1.0] * 3
    with pytest.raises(RuntimeError, match="inference tensor"):  # outside: refused, as copy_ refuses it
        ops.copy_into([torch.zeros(2), weight], [torch.ones(2), torch.ones(3)], impl=impl)


@needs_cpp
def test_forcing_a_path(monkeypatch):
    calls = []
    loop = bk._copy_loop
    monkeypatch.setattr(bk, "_copy_loop", lambda d, s: (calls.append(len(d)), loop(d, s)))
    src = torch.randn(5)
    out = torch.zeros(5, dtype=torch.bfloat16)
    ops.copy_into([out], [src])  # automatic: the C++ kernel for CPU tensors
    assert calls == []
    ops.copy_into([out], [src], impl="reference")
    with ops.force_impl("reference"):
        ops.copy_into([out], [src])
        ops.copy_into([out], [src], impl="cpp")  # impl= beats the forced default
    assert calls == [1, 1]
    with pytest.raises(ops.ImplUnavailableError, match="copy_into: impl 'cuda' cannot run"):
        ops.copy_into([out], [src], impl="cuda")
    assert "copy_into[cpu=cpp" in ops.describe()


@needs_cpp
def test_torch_compile_traces_the_op_without_graph_breaks():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    def pack(buffer, a, b):
        bk.pack_bucket([a, b], [0, 32], [torch.bfloat16, torch.float16], buffer)
        return buffer.sum()

    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(3, 4, generator=g), torch.randn(5, generator=g).t()
    eager, traced, lowered = (torch.zeros(64, dtype=torch.uint8) for _ in range(3))
    total = pack(eager, a, b)
    assert torch.equal(torch.compile(pack, backend=capture, fullgraph=True)(traced, a, b), total)
    assert "torch.ops.slime_rl.copy_into" in graphs[0]
    torch.compile(pack, backend="aot_eager", fullgraph=True)(lowered, a, b)  # through the fake implementation
    assert torch.equal(traced, eager) and torch.equal(lowered, eager)


# --- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_kernel_is_bit_identical_to_copy():
    if not _has("cuda"):
        pytest.skip(f"no CUDA copy_into kernel: {_backend._why_not('cuda', 'copy_into')}")
    dev = torch.device("cuda")
    values = _special_values().to(dev)
    for src_dtype, dst_dtype in PAIRS:
        src_full = values.to(src_dtype)
        srcs = [src_full[:n] for n in (0, 1, 7, 33, 1000)] + [src_full, src_full[1:]]  # [1:]: misaligned for vectors
        got, want = _run_both(lambda: [torch.zeros(s.shape, dtype=dst_dtype, device=dev) for s in srcs], srcs, "cuda")
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g.cpu(), w.cpu(), f"cuda {src_dtype} -> {dst_dtype} entry {i}", nan_bits=True)
    cases = _strided_cases(dev)  # strided entries (copy_) and contiguous ones in one call
    srcs = [src for _, src in cases]
    assert sum(not src.is_contiguous() for src in srcs) >= 5, "the strided cases must stay strided on the GPU"
    got, want = _run_both(lambda: [make() for make, _ in cases], srcs, "cuda")
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same(g.cpu(), w.cpu(), f"cuda strided case {i}", nan_bits=True)


@pytest.mark.gpu
def test_cuda_pack_unpack_big_bucket_and_host_buffer():
    if not _has("cuda"):
        pytest.skip(f"no CUDA copy_into kernel: {_backend._why_not('cuda', 'copy_into')}")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(9)
    params = [torch.randn(3_000_001, generator=g, device=dev), torch.randn(17, generator=g, device=dev),
              torch.randn(256, 96, generator=g, device=dev).t(), torch.randn(5, generator=g, device=dev).half()]
    dtypes = [torch.bfloat16, torch.bfloat16, torch.float16, torch.float32]
    offsets, at = [], 2
    for p, d in zip(params, dtypes):
        at = -(-at // d.itemsize) * d.itemsize
        offsets.append(at)
        at += p.numel() * d.itemsize
    for device in (dev, torch.device("cpu")):  # a device bucket, and a host one (transfers take copy_)
        got = torch.zeros(at, dtype=torch.uint8, device=device)
        want = torch.zeros(at, dtype=torch.uint8, device=device)
        bk.pack_bucket(params, offsets, dtypes, got, impl="cuda" if device.type == "cuda" else None)
        bk.pack_bucket(params, offsets, dtypes, want, impl="reference")
        assert torch.equal(got, want), device
    back = [torch.empty_like(p) for p in params]
    bk.unpack_bucket(got.to(dev), offsets, back, dtypes, impl="cuda")
    for p, b, d in zip(params, back, dtypes):
        assert_same(b.cpu(), p.to(d).to(p.dtype).cpu(), nan_bits=True)
