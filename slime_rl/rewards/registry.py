"""Reward-function registry: built-ins by name, user functions by dotted path.

A reward function takes one `Sample` and returns a float or a dict holding a
"reward" key (extra keys are logged as metrics). Register one with
`@register_reward("name")`, or point the config at any importable function:
"package.module:function" or "package.module.function".

A reward that needs settings (a sandbox, an endpoint) registers a factory instead:
`@register_reward_factory("name")` on a function taking the `RewardConfig` and returning the reward.
A reward may also score a list at once: an object with `score_batch(samples) -> list[value | Exception]`
(and a `batch_size`), which the runner calls on chunks (`slime_rl.rewards.runner`).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from slime_rl.protocols import RewardFn

_REGISTRY: dict[str, RewardFn] = {}
_FACTORIES: dict[str, Callable[[Any], RewardFn]] = {}
_BUILTIN_MODULES = ("slime_rl.rewards.math", "slime_rl.rewards.builtin")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available as `get_reward_fn(name)`."""
    return _registrar(_REGISTRY, name)


def register_reward_factory(name: str) -> Callable:
    """Decorator: `get_reward_fn(name, reward_cfg)` returns `factory(reward_cfg)`."""
    return _registrar(_FACTORIES, name)


def _registrar(table: dict[str, Callable], name: str) -> Callable:
    def decorator(obj: Callable) -> Callable:
        existing = table.get(name)
        if existing is not None and _qualname(existing) != _qualname(obj):
            raise ValueError(f"reward name {name!r} already registered to {_qualname(existing)}")
        table[name] = obj
        return obj

    return decorator


def registered_rewards() -> list[str]:
    """Names of all registered reward functions (built-ins included)."""
    _load_builtins()
    return sorted({*_REGISTRY, *_FACTORIES})


def get_reward_fn(name_or_path: str, reward_cfg: Any = None) -> RewardFn:
    """A registered reward by name, or a function by "pkg.mod:fn" / "pkg.mod.fn" path. Factories get
    `reward_cfg` (the job's `RewardConfig`; its defaults when None)."""
    _load_builtins()
    if name_or_path in _REGISTRY:
        return _REGISTRY[name_or_path]
    if name_or_path in _FACTORIES:
        if reward_cfg is None:
            from slime_rl.rewards.config import RewardConfig

            reward_cfg = RewardConfig()
        return _FACTORIES[name_or_path](reward_cfg)
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
        f"unknown reward function {name!r}: {why}. "
        f"Registered: {', '.join(sorted({*_REGISTRY, *_FACTORIES})) or '(none)'}; "
        "or give a dotted path 'package.module:function'"
    )


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
