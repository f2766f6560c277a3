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
meanwhile that flushes the cache, the default, retracts them: their later
tokens come from the new weights over KV the new weights recompute, so each
token's logprob is the new policy's; SGLang keeps the old KV; with
flush_cache=False the old KV is kept here too); "retract" sends running requests back to the
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
import math
import numbers
import os
import threading
import uuid
from typing import Callable

import torch

from rollout.engine_weights import EngineWeights, load_safetensors_dir  # noqa: F401 (re-exported)
from rollout.kv_cache import PagedKVPool, bytes_per_token
from rollout.model import DecoderLM, ModelConfig
from rollout.radix_cache import RadixCache
from rollout.sampling import request_uniforms
from rollout.scheduler import Request, Scheduler, short_error
from slime_rl.types import PAUSE_MODES, GenerateOutput, GenerateRequest, SampleStatus

log = logging.getLogger(__name__)


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
            try:
                fn(out)
            except Exception:  # a waiter's callback (e.g. a closed event loop) must not fail the engine step
                log.exception("done callback of request %s raised", self.rid)


class EmbeddedEngine(EngineWeights):
    """In-process rollout engine over a `DecoderLM` (see module docstring); its weight
    updates, staging and checksums are in rollout/engine_weights.py."""

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
        reject_nonfinite_weights: bool = True,
    ):
        """`state_dict` in HF naming (all tensors required); None = random init from `seed`.
        The KV pool holds `max_total_tokens` tokens, or as many as fit in `kv_cache_mb`.
        `reject_nonfinite_weights`: every weight update (and `state_dict`) with a NaN / inf
        value is refused with a ValueError naming the tensor."""
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
        self._lock = threading.RLock()  # one scheduler step or one control operation at a time
        self._init_weights(reject_nonfinite_weights)
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
        """Every field of `r` against its type and the model (a bad value must never reach a step)."""
        sp = r.sampling
        _check_types(r, where)
        try:
            sp.validate()
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if not math.isfinite(sp.temperature):
            raise ValueError(f"{where}: temperature must be finite, got {sp.temperature}")
        n, vocab = len(r.input_ids), self.config.vocab_size
        if n == 0:
            raise ValueError(f"{where}: input_ids is empty")
        bad_bias = [t for t in sp.logit_bias if not 0 <= t < vocab]
        if bad_bias:
            raise ValueError(f"{where}: logit_bias token ids must be in [0, {vocab}) (vocab_size), got {bad_bias[:5]}")
        bad_stops = [t for t in sp.stop_token_ids if not 0 <= t < vocab]
        if bad_stops:
            raise ValueError(f"{where}: stop_token_ids must be in [0, {vocab}) (vocab_size), got {bad_stops[:5]}")
        if sp.seed is not None and not -(2**63) <= sp.seed < 2**64:
            raise ValueError(f"{where}: seed must be in [-2**63, 2**64), got {sp.seed}")
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
        req = Request(req=r, rid=rid, max_new=max_new, uniforms=request_uniforms(int(seed), max_new),
                      finish_cb=self._on_finish, on_update=on_update)
        req.handle = handle  # type: ignore[attr-defined]
        if r.top_logprobs_num > 0:
            req.out_top = []
        if r.sampling.return_top_p_token_ids:
            req.out_top_p = []
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
                except Exception as exc:  # not one request's fault (scheduler.py): fail what was running
                    log.exception("engine step failed; aborting %d running requests", len(sched.running))
                    error = f"engine step failed for every running request: {short_error(exc)}"
                    for r in list(sched.running):
                        sched.finish(r, SampleStatus.ABORTED, error)

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


def _is_int(x) -> bool:
    # numpy ints too; JSON true is no int. `type(x) is int` first: the ABC check costs ~1 us a token
    return type(x) is int or (isinstance(x, numbers.Integral) and not isinstance(x, bool))


def _is_number(x) -> bool:
    return type(x) is float or type(x) is int or (isinstance(x, numbers.Real) and not isinstance(x, bool))


def _check_types(r: GenerateRequest, where: str) -> None:
    """The types of a request's fields (the HTTP layer parses JSON; Python callers may pass anything)."""
    sp = r.sampling
    checks = [
        ("input_ids", isinstance(r.input_ids, list) and all(_is_int(t) for t in r.input_ids), "a list of ints"),
        ("rid", r.rid is None or isinstance(r.rid, str), "a string or None"),
        ("top_logprobs_num", _is_int(r.top_logprobs_num), "an int"),
        ("logprob_start_len", _is_int(r.logprob_start_len), "an int"),
        ("temperature", isinstance(sp.temperature, (int, float)) and not isinstance(sp.temperature, bool), "a number"),
        ("top_p", isinstance(sp.top_p, (int, float)) and not isinstance(sp.top_p, bool), "a number"),
        ("top_k", _is_int(sp.top_k), "an int"),
        ("max_new_tokens", _is_int(sp.max_new_tokens), "an int"),
        ("min_new_tokens", _is_int(sp.min_new_tokens), "an int"),
        ("stop_token_ids", isinstance(sp.stop_token_ids, (list, tuple)) and all(_is_int(t) for t in sp.stop_token_ids),
         "a list of ints"),
        ("stop", isinstance(sp.stop, (list, tuple)) and all(isinstance(t, str) for t in sp.stop), "a list of strings"),
        ("seed", sp.seed is None or _is_int(sp.seed), "an int or None"),
        *((name, _is_number(getattr(sp, name)), "a number")
          for name in ("min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")),
        ("logit_bias", isinstance(sp.logit_bias, dict) and all(_is_int(k) and _is_number(v)
                                                                for k, v in sp.logit_bias.items()),
         "a dict of int token id -> number"),
        ("return_top_p_token_ids", isinstance(sp.return_top_p_token_ids, bool), "a bool"),
    ]
    for name, ok, kind in checks:
        if not ok:
            value = getattr(r, name) if hasattr(r, name) else getattr(sp, name)
            raise ValueError(f"{where}: {name} must be {kind}, got {_preview(value)}")


def _preview(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolve(fut: asyncio.Future, out: GenerateOutput) -> None:
    if not fut.done():
        fut.set_result(out)
