"""A pytest plugin for a dry run of the GPU tests on the CPU: `cuda` tensors land on the CPU and the
slime_rl op path "cuda" runs the C++ CPU kernel (scripts/gpu_dry_run.sh loads it with `-p fake_cuda`).

It executes the Python of the `gpu`-marked tests and of the benchmarks' GPU paths: names, shapes,
tolerance logic, parametrization, whether a test would silently test nothing. It checks no CUDA
kernel: results come from the CPU kernels, and timings and memory figures are meaningless. Known
artefacts (each needs a real device): a tensor on "another device" is on the CPU like the rest, NaN
payload bits of the CPU casts differ from copy_'s, bandwidth targets are CPU speeds, and CUDA IPC
handles cannot be opened.
"""

from __future__ import annotations

import time

import torch


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


# --- torch.cuda: a device that is there, with timers and no memory accounting ----------------------

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_name = lambda *a, **k: "FakeCUDA(cpu)"
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.empty_cache = lambda: None
torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
torch.cuda.memory_allocated = lambda *a, **k: 0
torch.cuda.max_memory_allocated = lambda *a, **k: 1
torch.cuda.manual_seed = lambda *a, **k: None
torch.cuda.manual_seed_all = lambda *a, **k: None


class _Event:
    def __init__(self, enable_timing: bool = False, **_):
        self.enable_timing, self.t = enable_timing, None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        assert self.t is not None, "Event.synchronize before record"

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_Event") -> float:
        assert self.enable_timing and end.enable_timing, "elapsed_time needs enable_timing=True on both events"
        assert self.t is not None and end.t is not None, "elapsed_time before record"
        return (end.t - self.t) * 1e3


torch.cuda.Event = _Event

# --- tensors "on cuda" are CPU tensors ---------------------------------------------------------------

_to = torch.Tensor.to


def _fake_to(self, *args, **kwargs):
    args, moved = list(args), False
    if args and _is_cuda(args[0]):
        args[0], moved = "cpu", True
    if _is_cuda(kwargs.get("device")):
        kwargs["device"], moved = "cpu", True
    if moved and len(args) < 4:
        kwargs.setdefault("copy", True)  # a real move makes a new tensor
    return _to(self, *args, **kwargs)


torch.Tensor.to = _fake_to
torch.Tensor.cuda = lambda self, device=None, non_blocking=False, memory_format=torch.preserve_format: \
    self.clone(memory_format=memory_format)
torch.Tensor.pin_memory = lambda self, *a, **k: self
torch.Tensor.is_pinned = lambda self, *a, **k: False


def _cpu_factory(fn):
    def wrapped(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    wrapped.__wrapped__, wrapped.__name__ = fn, fn.__name__
    return wrapped


for _name in ("zeros", "ones", "empty", "full", "randn", "rand", "randint", "randperm", "arange", "tensor",
              "as_tensor", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
              "randint_like", "linspace", "eye", "empty_strided", "normal"):
    setattr(torch, _name, _cpu_factory(getattr(torch, _name)))

_Generator = torch.Generator


class _GeneratorMeta(type):
    def __instancecheck__(cls, obj):
        return isinstance(obj, _Generator)

    def __call__(cls, device="cpu"):
        return _Generator("cpu" if _is_cuda(device) else device)


class _FakeGenerator(metaclass=_GeneratorMeta):
    pass


torch.Generator = _FakeGenerator

# --- slime_rl: the "cuda" path is the C++ CPU kernel -------------------------------------------------

from slime_rl.ops import _backend  # noqa: E402

_find_why_not, _choose = _backend._find_why_not, _backend.choose


def _fake_find_why_not(impl: str, op: str):
    return _find_why_not("cpp" if impl == "cuda" else impl, op)


def _fake_choose(op: str, x: torch.Tensor, impl: str | None = None) -> str:
    state = _backend._state
    forced = _backend._check_impl(impl, f"{op}(impl=...)") if impl else (state.forced or _backend._env_forced())
    if forced == "cuda":
        _choose(op, x, "cpp")  # raises where the C++ path could not run
        return "cuda"
    chosen = _choose(op, x, impl)
    return "cuda" if chosen == "cpp" else chosen


_backend._find_why_not = _fake_find_why_not
_backend.choose = _fake_choose
