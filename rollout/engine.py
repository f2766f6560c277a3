"""EmbeddedEngine: the in-process `RolloutEngine` (token ids in, ids + logprobs out).

A continuous-batching inference core (rollout/scheduler.py) over a paged KV
pool (rollout/kv_cache.py) shared through a radix prefix cache
(rollout/radix_cache.py). The scheduler runs on a background thread; any
thread may `submit` requests (or call the blocking `generate` /
async `agenerate`) and control the engine.

Concurrency: every scheduler step and every control operation (abort, pause,
retract, flush, weight update) holds one step lock, so a forward never sees a
half-updated model and control takes effect between two steps. Every output
token is stamped with the weight version that sampled it.

Pause modes (SGLang's): "abort" finishes every request now with what it has;
"in_place" stops stepping and keeps requests with their KV (a weight update
meanwhile makes later tokens come from the new weights, over KV computed by
the old ones, as in SGLang); "retract" sends running requests back to the
queue and releases their KV, so after `continue_generation` they are
re-prefilled from their tokens under the weights current then.

Staged (transactional) weight updates: a weight sync streams buckets into
`stage_weights` under a transfer id and applies them all in one
`commit_weights`. Staging validates and holds tensors under its own small
lock, never the step lock, so generation keeps running on the old weights;
only the commit takes the step lock. A transfer that fails midway (or is
replaced by a new transfer id, or aborted) leaves the old weights and version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from glob import glob
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file

from rollout.kv_cache import PagedKVPool, bytes_per_token
from rollout.model import DecoderLM, ModelConfig
from rollout.radix_cache import RadixCache
from rollout.sampling import row_uniforms
from rollout.scheduler import Request, Scheduler
from slime_rl.buckets import tensor_sha256, unpack_bucket
from slime_rl.types import GenerateOutput, GenerateRequest, SampleStatus, WeightBucket

log = logging.getLogger(__name__)
PAUSE_MODES = ("abort", "in_place", "retract")


def load_safetensors_dir(model_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single file or sharded)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, s) for s in shards]
    else:
        files = sorted(glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_file(path, device="cpu"))
    # Old checkpoints carry RoPE buffers; the engine computes its own.
    return {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}


class RequestHandle:
    """A submitted request: wait for its output, or get called back when it finishes."""

    def __init__(self, rid: str):
        self.rid = rid
        self._event = threading.Event()
        self._output: GenerateOutput | None = None
        self._callbacks: list[Callable[[GenerateOutput], None]] = []
        self._mu = threading.Lock()

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> GenerateOutput:
        if not self._event.wait(timeout):
            raise TimeoutError(f"request {self.rid!r} not finished after {timeout} s")
        return self._output  # type: ignore[return-value]

    def add_done_callback(self, fn: Callable[[GenerateOutput], None]) -> None:
        with self._mu:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self._output)

    def _set(self, out: GenerateOutput) -> None:
        with self._mu:
            self._output = out
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(out)


class EmbeddedEngine:
    """In-process rollout engine over a `DecoderLM` (see module docstring)."""

    def __init__(
        self,
        hf_config: dict,
        state_dict: dict[str, torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 64,
        seed: int = 0,
        max_total_tokens: int | None = None,
        kv_cache_mb: float = 256.0,
        page_size: int = 1,
        enable_prefix_cache: bool = True,
        max_prefill_tokens: int = 8192,
        tokenizer=None,
    ):
        """`state_dict` in HF naming (all tensors required); None = random init from `seed`.
        The KV pool holds `max_total_tokens` tokens, or as many as fit in `kv_cache_mb`."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.config = ModelConfig.from_hf(hf_config)
        self.hf_config = dict(hf_config)
        self.device, self.dtype, self.max_batch_size = torch.device(device), dtype, max_batch_size
        self.context_len = self.config.max_position_embeddings
        self.tokenizer = tokenizer
        self.model = DecoderLM(self.config, self.device, dtype).eval()
        self._params = dict(self.model.named_parameters())
        self._fused = _fused_groups(self.model)  # (module, fused attribute, HF names of its parts in order)
        self._key_of = {id(p): name for name, p in self._params.items()}
        self._adopted = False  # parameters live in adopted buffers (possibly shared with other engines)
        self._lock = threading.RLock()  # one scheduler step or one control operation at a time
        self._stage_lock = threading.Lock()  # guards the staged transfer only (see module docstring)
        self._staged_id: str | None = None
        self._staged: dict[str, torch.Tensor] = {}  # parameter key -> tensor to copy in at commit
        if state_dict is None:
            self.model.init_random(seed)
        else:
            self._apply(self._check_tensors(state_dict.items(), full=True))
        if max_total_tokens is None:
            max_total_tokens = int(kv_cache_mb * 2**20) // bytes_per_token(self.config, dtype)
        num_pages = max(1, max_total_tokens // page_size)
        self.page_size, self.enable_prefix_cache = page_size, enable_prefix_cache
        self.pool = PagedKVPool(self.config, num_pages, page_size, max_batch_size, self.device, dtype)
        tree = RadixCache(page_size, self.pool.free) if enable_prefix_cache else None
        decode = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else None
        self._sched = Scheduler(self.model, self.pool, tree, max_batch_size, max_prefill_tokens, decode)
        self._gen = torch.Generator().manual_seed(seed)
        self._cv = threading.Condition()  # guards the inbox, the in-flight rid set, paused, stop
        self._inbox: list[Request] = []
        self._inflight: set[str] = set()
        self._paused = False
        self._released = False  # KV pool freed by release_memory_occupation: no step until resumed
        self._memory_cycles = {"memory_releases": 0, "memory_resumes": 0}
        self._stop = False
        self._abort_rids: set[str] = set()  # control requests the scheduler applies between steps
        self._abort_all = False
        self._retract_all = False
        self._thread = threading.Thread(target=self._loop, name="embedded-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model_dir: str, device="cpu", dtype=torch.float32, **kwargs) -> "EmbeddedEngine":
        """Load `config.json` + `*.safetensors` (possibly sharded) from an HF directory."""
        with open(os.path.join(model_dir, "config.json")) as f:
            hf_config = json.load(f)
        return cls(hf_config, load_safetensors_dir(model_dir), device, dtype, **kwargs)

    # ---- submission ---------------------------------------------------------

    def _validate(self, r: GenerateRequest, where: str) -> None:
        try:
            r.sampling.validate()
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        n, vocab = len(r.input_ids), self.config.vocab_size
        if n == 0:
            raise ValueError(f"{where}: input_ids is empty")
        if n >= self.context_len:
            raise ValueError(f"{where}: prompt of {n} tokens does not fit the context limit of "
                             f"{self.context_len} tokens (max_position_embeddings); at most "
                             f"{self.context_len - 1} prompt tokens leave room for one new token")
        if min(r.input_ids) < 0 or max(r.input_ids) >= vocab:
            raise ValueError(f"{where}: token ids must be in [0, {vocab}), got range "
                             f"[{min(r.input_ids)}, {max(r.input_ids)}]")
        if n + 1 > self.pool.max_tokens:
            raise ValueError(f"{where}: prompt of {n} tokens exceeds the KV cache of {self.pool.max_tokens} tokens")
        if r.top_logprobs_num < 0:
            raise ValueError(f"{where}: top_logprobs_num must be >= 0, got {r.top_logprobs_num}")
        if not -1 <= r.logprob_start_len < n:
            raise ValueError(f"{where}: logprob_start_len must be -1 or in [0, {n}) (prompt length), "
                             f"got {r.logprob_start_len}")
        if r.sampling.stop and self.tokenizer is None:
            raise ValueError(f"{where}: stop strings need an engine tokenizer; use stop_token_ids")

    def _make_request(self, r: GenerateRequest, on_update) -> tuple[Request, RequestHandle]:
        rid = r.rid if r.rid is not None else uuid.uuid4().hex
        max_new = min(r.sampling.max_new_tokens, self.context_len - len(r.input_ids),
                      self.pool.max_tokens - len(r.input_ids))
        seed = r.sampling.seed
        if seed is None:
            with self._cv:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._gen))
        handle = RequestHandle(rid)
        req = Request(req=r, rid=rid, max_new=max_new, uniforms=row_uniforms([int(seed)], max_new)[0].tolist(),
                      finish_cb=self._on_finish, on_update=on_update)
        req.handle = handle  # type: ignore[attr-defined]
        if r.top_logprobs_num > 0:
            req.out_top = []
        return req, handle

    def submit(self, request: GenerateRequest, on_update: Callable[[GenerateOutput], None] | None = None) -> RequestHandle:
        """Queue one request (validated first); see the module docstring for on_update."""
        return self._submit_all([request], [on_update])[0]

    def _submit_all(self, requests: list[GenerateRequest], on_updates) -> list[RequestHandle]:
        for i, r in enumerate(requests):
            self._validate(r, f"request {i} (rid={r.rid!r})")
        rids = [r.rid for r in requests if r.rid is not None]
        if len(set(rids)) != len(rids):
            raise ValueError("duplicate rids in one call")
        made = [self._make_request(r, cb) for r, cb in zip(requests, on_updates)]
        with self._cv:
            if self._stop:
                raise RuntimeError("engine is closed")
            busy = [req.rid for req, _ in made if req.rid in self._inflight]
            if busy:
                raise ValueError(f"rid {busy[0]!r} is already in flight")
            for req, _ in made:
                self._inflight.add(req.rid)
            self._inbox.extend(req for req, _ in made)
            self._cv.notify_all()
        return [h for _, h in made]

    def _on_finish(self, req: Request, out: GenerateOutput) -> None:
        with self._cv:
            self._inflight.discard(req.rid)
        try:
            if req.on_update is not None:
                req.on_update(out)
        except Exception:  # a caller's callback must not take the engine down
            log.exception("on_update callback of request %s raised", req.rid)
        finally:
            req.handle._set(out)  # type: ignore[attr-defined]

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """Generate for all requests (blocking); outputs in request order."""
        handles = self._submit_all(list(requests), [None] * len(requests))
        return [h.result() for h in handles]

    async def agenerate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """`generate` for asyncio code; cancelling it aborts the requests."""
        loop = asyncio.get_running_loop()
        handles = self._submit_all(list(requests), [None] * len(requests))
        futures = []
        for h in handles:
            fut = loop.create_future()
            h.add_done_callback(lambda out, fut=fut: loop.call_soon_threadsafe(_resolve, fut, out))
            futures.append(fut)
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            for h in handles:
                self.abort(h.rid)
            raise

    # ---- the scheduler thread ----------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        sched = self._sched
        while True:
            with self._cv:
                while not (self._stop or self._inbox or self._pending() or (sched.has_work() and not self._held())):
                    self._cv.wait()
                if self._stop:
                    return
            with self._lock:
                self._apply_pending()
                if self._held() or not sched.has_work():
                    continue
                try:
                    with torch.inference_mode():
                        sched.step()
                except Exception:  # keep serving: fail what was running, log why
                    log.exception("engine step failed; aborting %d running requests", len(sched.running))
                    for r in list(sched.running):
                        sched.finish(r, SampleStatus.ABORTED)

    # ---- control --------------------------------------------------------------
    # Control calls never wait for a step in progress: they record what to do,
    # and the scheduler (or the next control call that takes the step lock, such
    # as a weight update) applies it before any further step.

    def _pending(self) -> bool:
        return bool(self._abort_rids or self._abort_all or self._retract_all)

    def _apply_pending(self) -> None:
        """Move new requests to the queue and apply aborts / retractions (step lock held)."""
        with self._cv:
            new, self._inbox = self._inbox, []
            rids, abort_all, retract = self._abort_rids, self._abort_all, self._retract_all
            self._abort_rids, self._abort_all, self._retract_all = set(), False, False
        sched = self._sched
        sched.waiting.extend(new)
        if abort_all or rids:
            for r in list(sched.running) + list(sched.waiting):
                if abort_all or r.rid in rids:
                    sched.finish(r, SampleStatus.ABORTED)
        if retract:
            for r in reversed(list(sched.running)):
                sched.retract(r)

    def _request(self, **flags) -> None:
        with self._cv:
            for name, value in flags.items():
                setattr(self, name, value)
            self._cv.notify_all()

    def abort(self, rid: str | None = None) -> None:
        """Abort one request by rid (unknown rids are ignored) or all (None); each
        returns what it generated so far with finish_reason ABORTED."""
        with self._cv:
            if rid is None:
                self._abort_all = True
            elif rid in self._inflight:
                self._abort_rids.add(rid)
            self._cv.notify_all()

    def pause_generation(self, mode: str = "abort") -> None:
        """Stop stepping until `continue_generation` (modes in the module docstring).
        Requests submitted while paused wait. No step starts after this returns."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
        self._request(_paused=True, _abort_all=self._abort_all or mode == "abort",
                      _retract_all=self._retract_all or mode == "retract")

    def continue_generation(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def is_paused(self) -> bool:
        return self._paused

    def _held(self) -> bool:
        return self._paused or self._released

    # ---- memory release (SGLang's RL-colocation API) ------------------------

    def release_memory_occupation(self) -> bool:
        """Free the KV cache pool so a colocated trainer can use the memory; False if already released.

        Running requests are retracted (their KV dropped) and, with anything submitted
        meanwhile, wait until `resume_memory_occupation`; they are then re-prefilled from
        their tokens, as after a "retract" pause. The prefix cache is dropped. Weights stay
        resident, so weight updates keep working while released.
        """
        with self._lock:
            if self._released:
                return False
            self._apply_pending()
            sched = self._sched
            for r in reversed(list(sched.running)):
                sched.retract(r)
            self._invalidate_cache()
            if self.pool.free_pages != self.pool.num_pages:  # every page must be back before its memory goes
                raise RuntimeError(f"release_memory_occupation: {self.pool.num_pages - self.pool.free_pages} KV "
                                   f"pages still in use after retracting every request")
            for t in self.pool.k + self.pool.v:
                t.untyped_storage().resize_(0)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._memory_cycles["memory_releases"] += 1
            with self._cv:
                self._released = True
            return True

    def resume_memory_occupation(self) -> bool:
        """Re-allocate the KV cache pool (zeroed) and go on serving; False if it was not released."""
        with self._lock:
            if not self._released:
                return False
            for t in self.pool.k + self.pool.v:
                t.untyped_storage().resize_(t.numel() * t.element_size())
                t.zero_()
            self._memory_cycles["memory_resumes"] += 1
            with self._cv:
                self._released = False
                self._cv.notify_all()
            return True

    def is_memory_released(self) -> bool:
        return self._released

    def flush_cache(self) -> bool:
        """Drop the prefix cache; refused (False) while requests are queued or running."""
        with self._lock:
            self._apply_pending()
            if self._sched.has_work():
                return False
            self._invalidate_cache()
            return True

    def _invalidate_cache(self) -> None:
        sched = self._sched
        if sched.tree is not None:
            sched.tree.invalidate()
        sched.epoch += 1

    def health(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def get_weight_version(self) -> int:
        return self._sched.version

    def load(self) -> dict:
        with self._cv:
            inbox = len(self._inbox)
        s = self._sched
        return {"num_running_reqs": len(s.running), "num_waiting_reqs": len(s.waiting) + inbox,
                "num_used_tokens": s.used_tokens(), "max_total_num_tokens": self.pool.max_tokens}

    def stats(self) -> dict:
        s = dict(self._sched.stats) | self._memory_cycles
        s["cache_hit_rate"] = s["cached_tokens"] / s["prompt_tokens"] if s["prompt_tokens"] else 0.0
        return s

    def close(self) -> None:
        """Abort everything and stop the scheduler thread."""
        with self._lock:
            self.abort(None)
            self._apply_pending()
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # ---- weights ----------------------------------------------------------

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
        keyed = [(self._param_key(name, src), src) for name, src in named]
        if full:
            self._check_complete((key for key, _ in keyed), "weight update")
        return [(self._params[key], src) for key, src in keyed]

    def _apply(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with self._lock, torch.no_grad():
            for dst, src in pairs:
                dst.copy_(src)
            if self.device.type == "cuda":  # sources (IPC, staged views) may be released once this returns
                torch.cuda.synchronize(self.device)

    def _update(self, pairs, weight_version: int, flush_cache: bool, own: bool = True) -> None:
        with self._lock:
            self._apply_pending()  # a pause(abort) just before must finish its requests under the old version
            if own and self._adopted and pairs:
                self._own_params()
                pairs = [(self._params[self._key_of[id(dst)]], src) for dst, src in pairs]
            self._apply(pairs)
            self._sched.version = int(weight_version)
            if flush_cache:
                self._invalidate_cache()

    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int, flush_cache: bool = True
    ) -> None:
        """Partial or full update in HF naming; validated first, then applied whole.
        `flush_cache` drops prefix KV computed by the old weights."""
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
        keyed = [(self._param_key(name, src), src.detach()) for name, src in named_tensors]
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
                own = getattr(module, attr).clone()
                setattr(module, attr, own)
                row = 0
                for name in names:
                    rows = self._params[name].shape[0]
                    self._params[name].data = own[row: row + rows]
                    row += rows
            for name, param in self._params.items():
                if name not in fused_parts:
                    param.data = param.data.clone()
        self._adopted = False

    def _adopt(self, staged: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Make staged tensors the parameters (step lock held); returns the (param, src) pairs left to copy."""
        self._adopted = True
        left = dict(staged)
        fused_parts = set()
        for module, attr, names in self._fused:
            fused_parts.update(names)
            joined = _back_to_back([left.get(n) for n in names], getattr(module, attr))
            if joined is None:
                continue
            setattr(module, attr, joined)
            row = 0
            for name in names:
                rows = left.pop(name).shape[0]
                self._params[name].data = joined[row: row + rows]
                row += rows
        for name, src in list(left.items()):
            param = self._params[name]
            if name not in fused_parts and _same_layout(src, param):
                param.data = src
                del left[name]
        return [(self._params[name], src) for name, src in left.items()]

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

    # ---- scoring ----------------------------------------------------------

    @torch.inference_mode()
    def compute_logprobs(
        self, sequences: list[list[int]], temperature: float = 1.0, start_positions: list[int] | None = None
    ) -> list[torch.Tensor]:
        """No-cache forward. For sequence i returns float32 CPU [len_i - start_i]:
        log_softmax(logits / temperature) of token t given tokens < t, for t in
        [start_i, len_i); start defaults to 1. Matches generation's logprobs."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for logprobs, got {temperature}")
        starts = [1] * len(sequences) if start_positions is None else list(start_positions)
        if len(starts) != len(sequences):
            raise ValueError(f"got {len(starts)} start positions for {len(sequences)} sequences")
        for i, (s, start) in enumerate(zip(sequences, starts)):
            if not 1 <= start <= len(s):
                raise ValueError(f"sequence {i}: start position {start} not in [1, {len(s)}]")
        out: list[torch.Tensor] = []
        for c in range(0, len(sequences), self.max_batch_size):
            seqs = sequences[c : c + self.max_batch_size]
            T = max(len(s) for s in seqs)
            ids_BT = torch.zeros(len(seqs), T, dtype=torch.long)
            for b, s in enumerate(seqs):
                ids_BT[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            ids_BT = ids_BT.to(self.device)
            with self._lock:  # right padding: causal attention never sees it
                logits_BTV = self.model(ids_BT).float()
            lp_BT = torch.log_softmax(logits_BTV[:, :-1] / temperature, -1).gather(2, ids_BT[:, 1:, None])[..., 0]
            for b, s in enumerate(seqs):
                out.append(lp_BT[b, starts[c + b] - 1 : len(s) - 1].cpu())
        return out


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


def _resolve(fut: asyncio.Future, out: GenerateOutput) -> None:
    if not fut.done():
        fut.set_result(out)
