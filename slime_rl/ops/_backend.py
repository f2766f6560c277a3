"""Which implementation each op runs: CUDA kernel, C++ kernel, or torch reference.

The compiled kernels are torch custom ops, `torch.ops.slime_rl.<name>`,
registered by loading the extension `slime_rl._C` (built by setup.py). The
choice per call, for a tensor on device D:

    cuda tensor  -> "cuda"  if the library is loaded and has a CUDA kernel, else "reference"
    cpu tensor   -> "cpp"   if the library is loaded and has a CPU kernel,  else "reference"
    input needing grad -> "reference" (the kernels are forward-only)

The library is looked for once, lazily, on the first op call (or
available_impls()/describe()): the shared library named by
SLIME_RL_OPS_LIBRARY when set (a development build; slime_rl._C is then not
imported); else import slime_rl._C; failing that, and only when
SLIME_RL_JIT=1, build it with torch.utils.cpp_extension.load (~1 min, cached in
torch's extension dir). Importing slime_rl.ops loads and compiles nothing.

Forcing a path: SLIME_RL_OPS_IMPL=cuda|cpp|reference (read on first use),
force_impl("reference") (a function and a context manager), or impl= on a
call. Forcing a path that cannot run raises ImplUnavailableError saying what
was tried and why each attempt failed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

IMPLS = ("cuda", "cpp", "reference")
_DISPATCH_KEY = {"cuda": "CUDA", "cpp": "CPU"}
_NATURAL_IMPL = {"cuda": "cuda", "cpu": "cpp"}  # tensor device type -> compiled impl
_REPO_ROOT = Path(__file__).resolve().parents[2]
JIT_NAME = "slime_rl_jit"


class ImplUnavailableError(RuntimeError):
    """A forced implementation cannot run; the message lists what was tried."""


class _State:
    def __init__(self) -> None:
        self.loaded: bool | None = None  # None: not looked for yet
        self.source = ""  # where the library came from, or why it is missing
        self.forced: str | None = None
        self.env_forced: str | None = None
        self.env_read = False
        self.ops: dict[str, Callable] = {}  # public op name -> its fake (shape) function
        self.fakes_registered: set[str] = set()
        # (impl, op) -> None if it can run, else why not. Plain-dict lookups keep
        # choose() traceable by torch.compile without graph breaks.
        self.why_not: dict[tuple[str, str], str | None] = {}


_state = _State()


def _check_impl(name: str, where: str) -> str:
    if name not in IMPLS:
        raise ValueError(f"{where}: unknown impl {name!r}; allowed values: {', '.join(IMPLS)}")
    return name


def _env_forced() -> str | None:
    if not _state.env_read:
        value = os.environ.get("SLIME_RL_OPS_IMPL", "").strip()
        _state.env_forced = _check_impl(value, "SLIME_RL_OPS_IMPL") if value else None
        _state.env_read = True
    return _state.env_forced


def reset() -> None:
    """Forget forcing and re-read SLIME_RL_OPS_IMPL on next use (tests). A loaded library stays loaded."""
    _state.forced = None
    _state.env_read = False
    _state.why_not.clear()
    if not _state.loaded:
        _state.loaded = None


# --- loading the compiled library ----------------------------------------------------------------


def csrc_sources(with_cuda: bool) -> list[str]:
    """The sources setup.py compiles, as absolute paths (needs a source checkout)."""
    csrc = _REPO_ROOT / "csrc"
    sources = [csrc / "registration.cpp", *sorted((csrc / "cpu").glob("*.cpp"))]
    if with_cuda:
        sources += [*sorted((csrc / "cuda").glob("*.cu")), *sorted((csrc / "cuda").glob("*.cpp"))]
    return [str(p) for p in sources]


def jit_load(build_directory: str | None = None, verbose: bool = False):
    """Build and load the kernels with torch.utils.cpp_extension.load; returns the module.

    Loading registers torch.ops.slime_rl.*. Only one copy of the library may be
    loaded per process (TORCH_LIBRARY registers the namespace once), so call
    this only where slime_rl._C is not imported. CUDA sources are included
    when torch has CUDA and a toolkit is found. 30-70 s on 2 cores; rebuilt only
    when a source changes (cached in build_directory or torch's extension dir).
    """
    from torch.utils import cpp_extension

    if not (_REPO_ROOT / "csrc" / "registration.cpp").exists():
        raise FileNotFoundError(f"csrc/ sources not found under {_REPO_ROOT} (JIT needs a source checkout)")
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if build_directory is not None:
        os.makedirs(build_directory, exist_ok=True)
    return cpp_extension.load(
        name=JIT_NAME,
        sources=csrc_sources(with_cuda),
        extra_cflags=["-O3", "-fopenmp"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        extra_ldflags=["-fopenmp"],
        with_cuda=with_cuda,
        build_directory=build_directory,
        verbose=verbose,
    )


def _short(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


def _load_library() -> bool:
    """Look for the compiled library once; record where it came from or why it is missing."""
    if _state.loaded is not None:
        return _state.loaded
    library = os.environ.get("SLIME_RL_OPS_LIBRARY", "").strip()
    if library:  # a development build of the kernels, instead of slime_rl._C
        try:
            torch.ops.load_library(library)
            _state.loaded, _state.source = True, f"SLIME_RL_OPS_LIBRARY={library}"
        except Exception as e:
            _state.loaded, _state.source = False, f"SLIME_RL_OPS_LIBRARY={library} failed to load ({_short(e)})"
        if _state.loaded:
            _register_fakes()
        return _state.loaded
    try:
        from slime_rl import _C

        _state.loaded, _state.source = True, f"slime_rl._C ({Path(_C.__file__).name})"
    except Exception as e:  # ImportError, or an OSError/undefined symbol from a stale build
        why = f"slime_rl._C not importable ({_short(e)})"
        if os.environ.get("SLIME_RL_JIT") == "1":
            try:
                jit_load()
                _state.loaded, _state.source = True, f"JIT build ({why})"
            except Exception as e2:
                _state.loaded, _state.source = False, f"{why}; JIT build failed ({_short(e2)})"
        else:
            _state.loaded, _state.source = False, (
                f"{why}; JIT off (pip install -e . --no-build-isolation builds it, "
                "or SLIME_RL_JIT=1 compiles it on first use, ~1 min)"
            )
    if _state.loaded:
        _register_fakes()
    else:  # once per process: every op now runs its torch reference
        log.warning("slime_rl.ops: no compiled kernels, every op uses its torch reference: %s", _state.source)
    return _state.loaded


def _register_fakes() -> None:
    """Give torch.compile a shape function for every loaded op that declared one."""
    for name, fn in _state.ops.items():
        if name in _state.fakes_registered or not hasattr(torch.ops.slime_rl, name):
            continue
        torch.library.register_fake(f"slime_rl::{name}")(fn)
        _state.fakes_registered.add(name)


def fake(op: str) -> Callable[[Callable], Callable]:
    """Decorator: the fake (meta) implementation of torch.ops.slime_rl.<op>, registered when it loads."""

    def deco(fn: Callable) -> Callable:
        _state.ops[op] = fn
        if _state.loaded:
            _register_fakes()
        return fn

    return deco


# --- choosing an implementation ------------------------------------------------------------------


@torch.compiler.assume_constant_result
def _why_not(impl: str, op: str) -> str | None:
    """None if `impl` can run `op` here, else the reason it cannot (worked out once).

    A constant for torch.compile: a trace that meets a cold cache runs this eagerly (loading
    the library, asking the dispatcher) and bakes the answer in, so no warm-up call is needed.
    """
    key = (impl, op)
    if key not in _state.why_not:
        _state.why_not[key] = _find_why_not(impl, op)
    return _state.why_not[key]


def _find_why_not(impl: str, op: str) -> str | None:
    if impl == "reference":
        return None
    if impl == "cuda" and not torch.cuda.is_available():
        return "torch has no CUDA" if torch.version.cuda is None else "no CUDA device"
    if not _load_library():
        return _state.source
    if not hasattr(torch.ops.slime_rl, op):
        return f"{_state.source} has no op slime_rl::{op} (stale build? rebuild the extension)"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"slime_rl::{op}", _DISPATCH_KEY[impl]):
        return f"{_state.source} was built without a {_DISPATCH_KEY[impl]} kernel for slime_rl::{op}"
    return None


def _unavailable(op: str, impl: str, reason: str) -> ImplUnavailableError:
    tried = "; ".join(f"{i}: {_why_not(i, op) or 'available'}" for i in IMPLS)
    return ImplUnavailableError(f"slime_rl.ops.{op}: impl {impl!r} cannot run: {reason}. Tried -> {tried}")


def choose(op: str, x: torch.Tensor, impl: str | None = None) -> str:
    """The implementation that runs `op` on tensor x (see the module docstring)."""
    forced = _check_impl(impl, f"{op}(impl=...)") if impl else (_state.forced or _env_forced())
    natural = _NATURAL_IMPL.get(x.device.type)
    needs_grad = x.requires_grad and torch.is_grad_enabled()
    if forced is None:
        if natural is None or needs_grad or _why_not(natural, op) is not None:
            return "reference"
        return natural
    if forced == "reference":
        return forced
    if needs_grad:
        raise _unavailable(op, forced, "the input requires grad and the compiled kernels are forward-only")
    if forced != natural:
        takes = "cpu" if forced == "cpp" else forced
        raise _unavailable(op, forced, f"the tensor is on {x.device} (the {forced} impl takes {takes} tensors)")
    reason = _why_not(forced, op)
    if reason is not None:
        raise _unavailable(op, forced, reason)
    return forced


class force_impl:
    """Force every op to one implementation; None restores automatic choice.

        ops.force_impl("reference")            # from now on
        with ops.force_impl("cpp"): ...        # inside the block only

    Forcing "cpp" or "cuda" checks now that the library has such kernels (for
    every op it knows) and raises ImplUnavailableError otherwise.
    """

    def __init__(self, impl: str | None) -> None:
        if impl is not None:
            _check_impl(impl, "force_impl")
            if impl != "reference":
                for op in _state.ops:  # every public op declares its fake
                    reason = _why_not(impl, op)
                    if reason is not None:
                        raise _unavailable(op, impl, reason)
        self._previous = _state.forced
        _state.forced = impl

    def __enter__(self) -> "force_impl":
        return self

    def __exit__(self, *exc) -> None:
        _state.forced = self._previous


def available_impls(op: str | None = None) -> list[str]:
    """Implementations that can run `op` (default: every op) on this machine, best first."""
    ops = [op] if op else list(_state.ops)
    return [impl for impl in IMPLS if all(_why_not(impl, o) is None for o in ops)]


def describe() -> str:
    """One line for logs: which implementation each op uses on CPU and CUDA tensors, and why."""
    forced = _state.forced or _env_forced()
    parts = []
    for op in sorted(_state.ops):
        picks = []
        for device, impl in (("cpu", "cpp"), ("cuda", "cuda")):
            reason = _why_not(impl, op)
            picks.append(f"{device}={impl}" if reason is None else f"{device}=reference ({impl}: {reason})")
        parts.append(f"{op}[{', '.join(picks)}]")
    head = f"slime_rl.ops: forced={forced}; " if forced else "slime_rl.ops: "
    source = f"; library: {_state.source}" if _state.loaded else ""
    return head + "; ".join(parts) + source
