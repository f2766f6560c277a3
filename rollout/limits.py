"""What one request may ask of the HTTP server (`slime-rl serve` flags of the same names).

Every limit is checked before a request reaches the engine's queue, so one
client cannot stall or starve the others: a body too large is refused before
it is read (413), a compressed body is refused (415), a batch or `n` above the
cap is a 400 naming the field, and requests beyond `max_queued_requests`
engine requests in flight get 429.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class ServerLimits:
    """Per-request and per-server limits of the HTTP server."""

    max_body_mb: float = 8.0  # request body of generation, info and control routes
    max_weight_body_mb: float = 2048.0  # request body of the weight-update routes (serialized tensors)
    max_n: int = 256  # sampling_params.n
    max_batch_size: int = 1024  # prompts in one /generate or completions request
    max_stop: int = 64  # stop strings, and stop token ids, per request
    max_queued_requests: int = 4096  # engine requests (prompts x n) in flight over all clients; 429 beyond
    header_timeout_s: float = 10.0  # a connection must send complete request headers within this
    body_timeout_s: float = 60.0  # a request must send its whole body within this once its headers arrived
    group_init_timeout_s: float = 60.0  # /init_weights_update_group gives up (and frees the weight lock) after this

    def validate(self) -> "ServerLimits":
        """Raise ValueError naming the first limit that is not > 0."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"--{f.name.replace('_', '-')} must be > 0, got {value!r}")
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MIB)

    @property
    def max_weight_body_bytes(self) -> int:
        return int(self.max_weight_body_mb * MIB)
