"""Trainer -> engine weight sync: param plan, resharded buckets, transports, versioned commit.

- `plan.py`: which rank sends which HF tensor in which bucket (computed once, checked on every rank);
- `sender.py`: the rank side, filling buckets from local TP/PP shards;
- `transports.py`: shared memory, broadcast (gloo/NCCL), disk, CUDA IPC, in process;
- `endpoints.py`: in-process engines and SGLang-protocol servers behind one interface;
- `sync.py`: `WeightSync`, the stage -> pause -> commit -> verify -> continue protocol and check mode.
"""

from weight_sync.endpoints import SyncError
from weight_sync.sync import WeightSync

__all__ = ["SyncError", "WeightSync"]
