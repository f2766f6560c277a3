"""Inference side: the embedded engine, its SGLang-protocol server, the HTTP
client for any SGLang-protocol URL, the SGLang launcher, routing and generation
strategies. Import the submodules directly (`rollout.server`, `rollout.router`,
...); only the two entry points most callers need are re-exported here."""

from rollout.client import EngineClient
from rollout.engine import EmbeddedEngine

__all__ = ["EmbeddedEngine", "EngineClient"]
