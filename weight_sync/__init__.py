"""Trainer -> engine weight transfer.

This first version moves HF-named tensors in process (the trainer and the
embedded engine share one address space). Buckets, resharding from Megatron
layouts and the IPC / broadcast / shared-memory / disk transports come with
the weight-sync issue behind the same `WeightTransport` protocol.
"""

from weight_sync.in_process import InProcessTransport, push_weights

__all__ = ["InProcessTransport", "push_weights"]
