"""The weights side of the EmbeddedEngine: full and partial updates, staged
(transactional) transfers with adoption of the sender's buffers, and checksums.

`EngineWeights` is a mixin of `rollout.engine.EmbeddedEngine` (module docstring
there: the step lock, staging under its own lock, what a failed transfer
leaves). It needs from its host: `config` (ModelConfig), `device`, `model`
(DecoderLM), `_lock` (the step lock), `_sched` (version, running, retract), `_apply_pending()` and
`_invalidate_cache()`; the host calls `_init_weights()` once its model exists.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from glob import escape as glob_escape, glob
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from slime_rl.buckets import tensor_sha256, unpack_bucket
from slime_rl.types import WeightBucket

log = logging.getLogger(__name__)


def load_safetensors_dir(model_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single file or sharded).

    Anything wrong with the directory is a ValueError naming the file: a missing directory, an
    index that is not JSON or has no `weight_map` of tensor name -> shard file, a shard named
    outside the directory (absolute, `..`, or through a directory symlink that leads out), a file
    that is not safetensors. A shard file itself may be a symlink (the HF hub cache links every
    file of a snapshot to its blob store).
    """
    if not os.path.isdir(model_dir):
        raise ValueError(f"model directory {model_dir!r} does not exist or is not a directory")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.lexists(index):
        files = [_shard_path(model_dir, s) for s in _index_shards(index)]
    else:
        files = sorted(glob(os.path.join(glob_escape(model_dir), "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir!r}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(load_file(path, device="cpu"))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"cannot load {path!r} as safetensors: {exc}") from exc
    # Old checkpoints carry RoPE buffers; the engine computes its own.
    return {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}


def _index_shards(index: str) -> list[str]:
    """The shard file names of `model.safetensors.index.json`, checked to be a weight_map of str -> str."""
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {index!r} as JSON: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{index!r} has no 'weight_map' object of tensor name -> shard file name")
    return sorted(set(weight_map.values()))


def _shard_path(model_dir: str, shard: str) -> str:
    """model_dir/shard, refused (ValueError naming the shard) unless it lies inside model_dir."""
    parts = shard.replace("\\", "/").split("/")
    if not shard or os.path.isabs(shard) or ".." in parts or "\0" in shard:
        raise ValueError(f"shard {shard!r} in the index of {model_dir!r} must be a file name relative "
                         f"to the model directory, without '..'")
    path = os.path.join(model_dir, shard)
    root = os.path.realpath(model_dir)
    parent = os.path.realpath(os.path.dirname(path))
    if os.path.commonpath([root, parent]) != root:
        raise ValueError(f"shard {shard!r} in the index of {model_dir!r} resolves outside the model directory "
                         f"(to {parent!r})")
    if not os.path.isfile(path):
        raise ValueError(f"shard {shard!r} named in the index of {model_dir!r} is not a file there")
    return path


class EngineWeights:
    """Weight updates of an engine (see the module docstring for what the host provides)."""

    def _init_weights(self, reject_nonfinite: bool = True) -> None:
        self.reject_nonfinite_weights = reject_nonfinite  # refuse NaN / inf in every update path
        self._params = dict(self.model.named_parameters())
        self._fused = _fused_groups(self.model)  # (module, fused attribute, HF names of its parts in order)
        self._key_of = {id(p): name for name, p in self._params.items()}
        self._adopted: set[str] = set()  # parameters that live in adopted buffers (maybe shared, read-only)
        self._stage_lock = threading.Lock()  # guards the staged transfer only (see rollout/engine.py)
        self._staged_id: str | None = None
        self._staged: dict[str, torch.Tensor] = {}  # parameter key -> tensor to copy in at commit

    def _param_key(self, name: str, src: torch.Tensor) -> str:
        """The parameter key an HF-named tensor updates, after checking name, shape and dtype."""
        key = name
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            key = "model.embed_tokens.weight"  # tied: the same tensor
        if key not in self._params:
            raise ValueError(f"weight update: unknown tensor {name!r} for {self.config.model_type} model")
        dst = self._params[key]
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"weight update: tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        if not src.is_floating_point():
            raise ValueError(f"weight update: tensor {name!r} has non-float dtype {src.dtype}")
        return key

    def _check_complete(self, keys: Iterable[str], where: str) -> None:
        missing = sorted(self._params.keys() - set(keys))
        if missing:
            raise ValueError(f"{where}: missing {len(missing)} tensors, e.g. {missing[:5]}")

    def _check_tensors(
        self, named: Iterable[tuple[str, torch.Tensor]], full: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Validate names and shapes of every tensor; (destination, source) pairs."""
        named = list(named)
        keyed = [(self._param_key(name, src), src) for name, src in named]
        if full:
            self._check_complete((key for key, _ in keyed), "weight update")
        self._check_finite(named)
        return [(self._params[key], src) for key, src in keyed]

    def _check_finite(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """ValueError naming the first tensor with a NaN or inf (when `reject_nonfinite_weights`).

        One read of each tensor (aminmax propagates NaN and shows +-inf; no mask as big as the
        tensor) and one host sync per device, so a GPU update does not wait tensor by tensor."""
        if not self.reject_nonfinite_weights:
            return
        flags: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
        for name, src in named:
            if src.is_floating_point() and src.numel():
                flags.setdefault(src.device, []).append((name, _all_finite(src)))
        for items in flags.values():
            ok = torch.stack([flag for _, flag in items]).tolist()
            bad = [name for (name, _), good in zip(items, ok) if not good]
            if bad:
                raise ValueError(f"weight update: tensor {bad[0]!r} has NaN or inf values"
                                 + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else "")
                                 + "; refused (reject_nonfinite_weights=True)")

    def _apply(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with self._lock, torch.no_grad():
            for dst, src in pairs:
                dst.copy_(src)
            if self.device.type == "cuda":  # sources (IPC, staged views) may be released once this returns
                torch.cuda.synchronize(self.device)

    def _update(self, pairs, weight_version: int, flush_cache: bool, own: bool = True) -> None:
        with self._lock:
            self._apply_pending()  # a pause(abort) just before must finish its requests under the old version
            if own and self._adopted and pairs:  # (a copy, not a write into an adopted buffer)
                self._own_params()
                pairs = [(self._params[self._key_of[id(dst)]], src) for dst, src in pairs]
            self._apply(pairs)
            self._sched.version = int(weight_version)
            if flush_cache:  # no KV of the old weights survives, not even a request's paused in place: its
                for r in reversed(list(self._sched.running)):  # later tokens would be conditioned on it
                    self._sched.retract(r)  # (re-prefilled from its tokens under the new weights)
                self._invalidate_cache()

    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int, flush_cache: bool = True
    ) -> None:
        """Partial or full update in HF naming; validated first, then applied whole.
        `flush_cache` drops all KV computed by the old weights: the prefix cache, and running requests are
        retracted (re-prefilled under the new weights when generation continues)."""
        pairs = self._check_tensors(list(named_tensors), full=False)
        self._update(pairs, weight_version, flush_cache)

    def update_weights_from_bucket(self, bucket: WeightBucket, weight_version: int, flush_cache: bool = True) -> None:
        """Update from a flat bucket (slime_rl.buckets layout)."""
        self.update_weights_from_tensors(unpack_bucket(bucket), weight_version, flush_cache)

    def update_weights_from_disk(self, model_path: str, weight_version: int, flush_cache: bool = True) -> None:
        """Full update from an HF safetensors directory."""
        pairs = self._check_tensors(load_safetensors_dir(model_path).items(), full=True)
        self._update(pairs, weight_version, flush_cache)

    # ---- staged weight updates (see module docstring) ---------------------------

    def stage_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], transfer_id: str,
                      copy: bool = True) -> int:
        """Validate HF-named tensors (as a partial update) and hold them for `commit_weights`.

        A validation error raises ValueError before anything is stored. A `transfer_id`
        other than the staged one drops that staging first; a name staged twice keeps the
        last tensor. `copy=False` keeps the caller's tensors (views included), which must
        stay valid and unchanged until the commit or abort. Returns the number staged.
        """
        if not isinstance(transfer_id, str) or not transfer_id:
            raise ValueError(f"transfer_id must be a non-empty string, got {transfer_id!r}")
        named = [(name, src.detach()) for name, src in named_tensors]
        keyed = [(self._param_key(name, src), src) for name, src in named]
        self._check_finite(named)
        if copy:
            keyed = [(key, src.clone()) for key, src in keyed]
        with self._stage_lock:
            if self._staged_id != transfer_id:
                if self._staged_id is not None:
                    log.warning("weight transfer %r replaces staged transfer %r (%d tensors dropped)",
                                transfer_id, self._staged_id, len(self._staged))
                self._staged_id, self._staged = transfer_id, {}
            self._staged.update(keyed)
            return len(self._staged)

    def commit_weights(self, transfer_id: str, weight_version: int, flush_cache: bool = True,
                       expected_tensors: int | None = None, adopt: bool = False) -> dict:
        """Apply the staged transfer `transfer_id` as one full update, stamped `weight_version`.

        It must cover every parameter (and hold `expected_tensors` tensors when given).
        The staging is dropped whatever happens; on a ValueError the weights and the
        version are unchanged. `adopt`: the staged tensors become the parameters where
        they can (same dtype and device, contiguous; the parts of a fused QKV / gate-up
        weight only when they lie back to back in one buffer), with no copy — the caller
        promises nobody writes them afterwards. The rest is copied.
        Returns {"num_tensors", "bytes" (copied), "adopted_bytes", "seconds"}.
        """
        start = time.perf_counter()
        with self._lock:
            with self._stage_lock:
                staged_id, staged = self._staged_id, self._staged
                self._staged_id, self._staged = None, {}
            if staged_id != transfer_id:
                raise ValueError(f"no staged transfer {transfer_id}; staged: {staged_id or 'none'}")
            self._check_complete(staged, f"weight commit {transfer_id}")
            if expected_tensors is not None and expected_tensors != len(staged):
                raise ValueError(f"weight commit {transfer_id}: expected {expected_tensors} tensors, "
                                 f"{len(staged)} are staged")
            pairs = [(self._params[key], src) for key, src in staged.items()]
            adopted = 0
            if adopt:
                with torch.no_grad():
                    self._apply_pending()
                    copies = self._adopt(staged)
                adopted = sum(t.numel() * t.element_size() for t in staged.values()) - \
                    sum(src.numel() * src.element_size() for _, src in copies)
                pairs = copies
            self._update(pairs, weight_version, flush_cache, own=not adopt)
        nbytes = sum(dst.numel() * dst.element_size() for dst, _ in pairs)
        return {"num_tensors": len(staged), "bytes": nbytes, "adopted_bytes": adopted,
                "seconds": time.perf_counter() - start}

    def _own_params(self) -> None:
        """Copy adopted parameters back into memory of this engine's own before writing into them: adopted
        buffers may be shared with other engines (a shared-memory sync) and must stay read-only."""
        with torch.no_grad():
            fused_parts = set()
            for module, attr, names in self._fused:
                fused_parts.update(names)
                self._seat(module, attr, names, getattr(module, attr).clone())
            for name, param in self._params.items():
                if name not in fused_parts:
                    param.data = param.data.clone()
        self._adopted = set()

    def _adopt(self, staged: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Make staged tensors the parameters (step lock held); returns the (param, src) pairs left to copy."""
        left = dict(staged)
        fused_parts = set()
        for module, attr, names in self._fused:
            fused_parts.update(names)
            joined = _back_to_back([left.get(n) for n in names], getattr(module, attr))
            if joined is None:
                continue
            self._seat(module, attr, names, joined)
            for name in names:
                del left[name]
        for name, src in list(left.items()):
            param = self._params[name]
            if name not in fused_parts and _same_layout(src, param):
                param.data = src
                del left[name]
        # What is left to copy may sit in buffers adopted before (maybe read-only): new memory for those.
        self._fresh_memory(self._adopted.intersection(left))
        self._adopted = set(staged) - set(left)
        return [(self._params[name], src) for name, src in left.items()]

    def _seat(self, module: torch.nn.Module, attr: str, names: list[str], fused: torch.Tensor) -> None:
        """Make `fused` the module's fused tensor and the HF parameters `names` its row slices, in order."""
        setattr(module, attr, fused)
        row = 0
        for name in names:
            rows = self._params[name].shape[0]
            self._params[name].data = fused[row: row + rows]
            row += rows

    def _fresh_memory(self, names: Iterable[str]) -> None:
        """New (uninitialized) memory for the parameters `names` (with every part of a fused tensor
        that one of them is part of), which the commit then fills: a commit is complete."""
        names = set(names)
        for module, attr, parts in self._fused:
            if names.intersection(parts):
                self._seat(module, attr, parts, torch.empty_like(getattr(module, attr)))
                names.difference_update(parts)
        for name in names:
            self._params[name].data = torch.empty_like(self._params[name].data)

    def abort_weight_update(self, transfer_id: str | None = None) -> bool:
        """Drop the staged transfer (only if it is `transfer_id`, when given); True if one was dropped."""
        with self._stage_lock:
            if self._staged_id is None or transfer_id not in (None, self._staged_id):
                return False
            self._staged_id, self._staged = None, {}
            return True

    def staged_transfer(self) -> tuple[str | None, int]:
        """(staged transfer id or None, number of tensors staged)."""
        with self._stage_lock:
            return self._staged_id, len(self._staged)

    def weights_checksum(self, names: list[str] | None = None) -> dict[str, str]:
        """sha256 hex digest of each parameter's bytes (HF naming, engine dtype), all when `names` is None.
        A tied lm_head.weight is not a parameter of its own. Taken under the step lock (never mid-commit)."""
        keys = list(self._params) if names is None else list(names)
        unknown = [name for name in keys if name not in self._params]
        if unknown:
            raise ValueError(f"weights_checksum: unknown parameters {unknown[:5]} for {self.config.model_type} model"
                             f" (a tied lm_head.weight is model.embed_tokens.weight)")
        with self._lock:
            return {name: tensor_sha256(self._params[name]) for name in keys}


def _all_finite(src: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor on src's device: no NaN / inf in src (non-empty, floating)."""
    try:
        lo, hi = torch.aminmax(src)
    except (RuntimeError, NotImplementedError):  # dtypes without aminmax (float8 kinds): through float32
        return torch.isfinite(src.float()).all()
    return torch.isfinite(lo) & torch.isfinite(hi)


def _fused_groups(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, list[str]]]:
    """The fused QKV / gate-up tensors of the model and the HF parameters that view them, in row order."""
    groups = []
    for prefix, module in model.named_modules():
        for fused, parts in (("qkv", ("q_proj", "k_proj", "v_proj")), ("gate_up", ("gate_proj", "up_proj"))):
            for kind in ("weight", "bias"):
                if getattr(module, f"{fused}_{kind}", None) is not None:
                    groups.append((module, f"{fused}_{kind}", [f"{prefix}.{p}.{kind}" for p in parts]))
    return groups


def _same_layout(src: torch.Tensor, dst: torch.Tensor) -> bool:
    return src.dtype == dst.dtype and src.device == dst.device and src.shape == dst.shape and src.is_contiguous()


def _back_to_back(srcs: list[torch.Tensor | None], fused: torch.Tensor) -> torch.Tensor | None:
    """One tensor shaped like `fused` over the parts' own memory when they lie back to back, else None."""
    if any(s is None or not s.is_contiguous() or s.dtype != fused.dtype or s.device != fused.device for s in srcs):
        return None
    storage = srcs[0].untyped_storage()
    for a, b in zip(srcs, srcs[1:]):
        if b.untyped_storage().data_ptr() != storage.data_ptr() or \
                a.data_ptr() + a.numel() * a.element_size() != b.data_ptr():
            return None
    if sum(s.shape[0] for s in srcs) != fused.shape[0]:
        return None
    return srcs[0].new_empty(0).set_(storage, srcs[0].storage_offset(), fused.shape, fused.stride())
