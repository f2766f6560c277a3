"""megatron-core on a machine without CUDA: the few call sites that assume a GPU.

megatron-core 0.16.1 runs on CPU over gloo with the local layer spec in fp32,
except for a handful of places that hard-code CUDA. `apply()` redirects them,
once per process, before any model is built; it does nothing when CUDA is
available. Everything it changes is listed here, call site by call site:

1. `torch.cuda.current_device()` used as an allocation device (GlobalMemoryBuffer
   in `core/utils.py`, which core attention uses on every forward; the p2p
   shape exchange and `torch.cuda.synchronize()` in `pipeline_parallel/
   p2p_communication.py`; the grad buffers of `distributed/param_and_grad_buffer.py`;
   the distributed optimizer's shard buffers) and `device="cuda"` literals (the
   token counter in `pipeline_parallel/schedules.py`, the norm all-reduce in
   `optimizer/clip_grads.py`), and the same in distributed checkpointing (the
   synchronize before writing in `strategies/filesystem_async.py`, the
   validation all-reduce in `strategies/state_dict_saver.py`). Fix: those modules see a stand-in for the name
   `torch` whose `cuda.current_device()` answers "cpu", whose
   `cuda.synchronize()` does nothing, and whose tensor factories map
   device "cuda" to "cpu". Nothing outside these modules is affected.
2. The tensor-parallel RNG tracker (`tensor_parallel/random.py`) saves and
   restores CUDA generator states around dropout. Fix: a tracker that keeps
   CPU generator states, installed as megatron's global tracker.
3. Type-name checks `param.type() == 'torch.cuda.FloatTensor'` in
   `optimizer/clip_grads.py` (grad clipping) and the distributed optimizer's
   parameter-group builder. Fix: `Tensor.type()` reports CUDA type names only
   while those two functions run (a scoped patch, not a process-wide one).
4. `weight.data.cuda()` before the all-reduce that copies tied embeddings to
   the last pipeline stage (`LanguageModule.setup_embeddings_and_output_layer`).
   Fix: `Tensor.cuda()` returns the tensor itself while that method runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
import warnings

import torch

_APPLIED = False

# Modules whose `torch` global is replaced by the CPU stand-in (item 1).
_CUDA_DEVICE_MODULES = (
    "megatron.core.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.attention",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.exchange_utils",
)


def _cpu_device(device):
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda:"):
        return "cpu"
    return device


class _CpuCuda:
    """`torch.cuda` as megatron's CUDA-assuming modules should see it on a CPU machine."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs) -> None:
        return None


class _CpuTorch(types.ModuleType):
    """`torch` with CUDA allocations sent to the CPU; every other name is torch's own."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in ("tensor", "zeros", "ones", "empty", "empty_like", "full", "arange"):
            setattr(self, name, self._on_cpu(getattr(torch, name)))

    @staticmethod
    def _on_cpu(factory):
        @functools.wraps(factory)
        def wrapper(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            kwargs.pop("pin_memory", None)
            return factory(*args, **kwargs)

        return wrapper

    def __getattr__(self, name):
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """Named CPU generator states, with megatron's CudaRNGStatesTracker interface."""

    def __init__(self) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"cuda rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


@contextlib.contextmanager
def _cuda_type_names():
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = original(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _scoped(patch, fn):
    """fn, running under the context manager `patch` (and only while it runs)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with patch():
            return fn(*args, **kwargs)

    return wrapper


def seed_model_parallel(seed: int) -> None:
    """megatron's `model_parallel_cuda_manual_seed` on either device: default, TP and expert states."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(seed)
        return
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)


def apply() -> None:
    """Install the CPU redirections (idempotent; a no-op when CUDA is available)."""
    global _APPLIED
    # megatron warns at import about optional GPU packages, and about a CUDA env var, in every rank
    for message in (".*(Apex|Transformer Engine).*not installed.*", ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
                    ".*cuda_graph_scope.*"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    if _APPLIED or torch.cuda.is_available():
        return
    stand_in = _CpuTorch()
    for name in _CUDA_DEVICE_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = stand_in

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _scoped(_cuda_type_names, clip_grads.clip_grad_by_total_norm_fp32)
    for module_name in ("megatron.core.optimizer.optimizer", "megatron.core.optimizer"):
        module = importlib.import_module(module_name)
        if hasattr(module, "clip_grad_by_total_norm_fp32"):
            module.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
    build = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"]  # a classmethod
    DistributedOptimizer._build_model_and_main_param_groups = classmethod(_scoped(_cuda_type_names, build.__func__))

    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _scoped(
        _tensor_cuda_is_identity, LanguageModule.setup_embeddings_and_output_layer)
    _APPLIED = True
