"""Reward-function registry: built-ins by name, user functions by dotted path.

A reward function takes one `Sample` and returns a float or a dict holding a
"reward" key (extra keys are logged as metrics). Register one with
`@register_reward("name")`, or point the config at any importable function:
"package.module:function" or "package.module.function".
"""

from __future__ import annotations

import importlib
from typing import Callable

from slime_rl.protocols import RewardFn

_REGISTRY: dict[str, RewardFn] = {}
_BUILTIN_MODULES = ("slime_rl.rewards.math",)


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available as `get_reward_fn(name)`."""

    def decorator(fn: RewardFn) -> RewardFn:
        existing = _REGISTRY.get(name)
        if existing is not None and _qualname(existing) != _qualname(fn):
            raise ValueError(f"reward name {name!r} already registered to {_qualname(existing)}")
        _REGISTRY[name] = fn
        return fn

    return decorator


def registered_rewards() -> list[str]:
    """Names of all registered reward functions (built-ins included)."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_reward_fn(name_or_path: str) -> RewardFn:
    """A registered reward by name, or a function by "pkg.mod:fn" / "pkg.mod.fn" path."""
    _load_builtins()
    if name_or_path in _REGISTRY:
        return _REGISTRY[name_or_path]
    if ":" in name_or_path:
        module_name, _, attr_path = name_or_path.partition(":")
    elif "." in name_or_path:
        module_name, _, attr_path = name_or_path.rpartition(".")
    else:
        raise ValueError(_not_found(name_or_path, "not a registered name and not a dotted path"))
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(_not_found(name_or_path, f"cannot import module {module_name!r} ({e})")) from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(_not_found(name_or_path, f"{module_name!r} has no attribute {attr_path!r}"))
        obj = getattr(obj, attr)
    if not callable(obj):
        raise TypeError(f"reward function {name_or_path!r} resolves to a non-callable {type(obj).__name__}")
    return obj


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def _not_found(name: str, why: str) -> str:
    return (
        f"unknown reward function {name!r}: {why}. Registered: {', '.join(sorted(_REGISTRY)) or '(none)'}; "
        "or give a dotted path 'package.module:function'"
    )


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
