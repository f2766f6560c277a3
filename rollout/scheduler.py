"""Continuous batching over a paged KV pool with a radix prefix cache.

`Scheduler` owns the requests of one engine and runs on the engine's
background thread (every method is called with the engine's step lock held).
One `step`:

1. admit waiting requests (FIFO) while there are free running rows, prefill
   token budget and KV pages: each request first takes the longest cached
   prefix of its tokens from the radix tree, so only the rest is computed;
2. prefill the admitted requests in one forward and sample their first token;
   their prompt pages go into the tree at once, so later requests with the
   same prompt (the other samples of a GRPO group) reuse them;
3. decode one token for every other running request in one forward.

A request leaves the batch the moment it finishes; its pages go into the tree
(prompt + output, for multi-turn continuations) and stay there until LRU
eviction needs them. When a decode step cannot get pages even after eviction,
the newest requests are retracted: their KV is released (kept as cache) and
they wait to be re-prefilled from their tokens.

Requests in the same admission round that share a long prefix which is not
cached yet are not prefilled together: the later ones wait one step and then
find the first one's prefix in the tree (see `_defer`).

A forward or sampling error fails only the requests that cause it: the batch
is rolled back and each request is run again alone (see `_run`); those that
still fail finish ABORTED with the error. Re-running a request is safe: its
forward writes K/V only into its own slots at positions [kv_len, num_tokens),
computed from its own tokens and earlier K/V, so a rerun writes the same values.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from rollout.kv_cache import PagedKVPool, PagedView
from rollout.model import DecoderLM
from rollout.radix_cache import Node, RadixCache
from rollout.sampling import SamplingTensors, process_logits, sample
from slime_rl.types import GenerateOutput, GenerateRequest, SampleStatus

log = logging.getLogger(__name__)
DECODE_RESERVE_TOKENS = 16  # decode takes KV pages for this many tokens at a time (fewer table updates)
DEFER_MIN_TOKENS = 32  # a shared, uncached prefix this long (or half the prompt) waits for the cache


@dataclass(eq=False)  # identity semantics: requests are compared and looked up by object
class Request:
    """Scheduler-side state of one request."""

    req: GenerateRequest
    rid: str
    max_new: int  # clamped to the context
    uniforms: list[float]  # one per output position
    finish_cb: Callable[["Request", GenerateOutput], None]
    on_update: Callable[[GenerateOutput], None] | None = None
    out_ids: list[int] = field(default_factory=list)
    out_logprobs: list[float] = field(default_factory=list)
    out_versions: list[int] = field(default_factory=list)
    out_top: list[list[tuple[int, float]]] | None = None
    out_top_p: list[list[int]] | None = None  # kept ids per output token (return_top_p_token_ids)
    input_logprobs: list[float | None] | None = None
    input_top: list[list[tuple[int, float]] | None] | None = None
    pages: list[int] = field(default_factory=list)
    tree_pages: int = 0  # leading pages owned by the radix tree (locked through `node`)
    node: Node | None = None
    epoch: int = 0  # the tree generation the pages came from
    kv_len: int = 0  # tokens whose K/V are in the pool
    row: int = -1  # row in the pool's slot table while running
    cached_tokens: int = -1  # set at first admission
    matched_stop: int | str | None = None
    submit_time: float = field(default_factory=time.perf_counter)
    aborted: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.req.input_ids + self.out_ids

    @property
    def num_tokens(self) -> int:
        return len(self.req.input_ids) + len(self.out_ids)

    def tokens_from(self, start: int) -> list[int]:
        n = len(self.req.input_ids)
        return self.out_ids[start - n :] if start >= n else self.req.input_ids[start:] + self.out_ids

    def snapshot(self, status: SampleStatus | None, version: int, error: str | None = None) -> GenerateOutput:
        return GenerateOutput(
            rid=self.rid,
            output_ids=list(self.out_ids),
            output_logprobs=list(self.out_logprobs),
            finish_reason=status,
            weight_version=version,
            prompt_tokens=len(self.req.input_ids),
            cached_tokens=max(self.cached_tokens, 0),
            output_versions=list(self.out_versions),
            matched_stop=self.matched_stop,
            output_top_logprobs=None if self.out_top is None else [list(t) for t in self.out_top],
            input_logprobs=None if self.input_logprobs is None else list(self.input_logprobs),
            input_top_logprobs=None if self.input_top is None else list(self.input_top),
            top_p_token_ids=None if self.out_top_p is None else [list(t) for t in self.out_top_p],
            e2e_latency=time.perf_counter() - self.submit_time if status is not None else 0.0,
            error=error,
        )


@dataclass
class _Progress:
    """What one batch step changes in a request, saved so a failed step can be undone."""

    kv_len: int
    n_out: int
    had_prompt_logprobs: bool

    @classmethod
    def of(cls, r: Request) -> "_Progress":
        return cls(r.kv_len, len(r.out_ids), r.input_logprobs is not None)

    def restore(self, r: Request) -> int:
        """Undo the step in r; how many tokens it had appended."""
        appended = len(r.out_ids) - self.n_out
        r.kv_len = self.kv_len
        for out in (r.out_ids, r.out_logprobs, r.out_versions, r.out_top, r.out_top_p):
            if out is not None:
                del out[self.n_out:]
        if not self.had_prompt_logprobs:
            r.input_logprobs = r.input_top = None
        return appended


class BatchFailure(RuntimeError):
    """A batch step failed, yet each of its requests ran fine alone: no one request is to blame."""


def short_error(exc: BaseException, limit: int = 300) -> str:
    """One line for a client: the exception's type and message, no traceback."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Scheduler:
    def __init__(self, model: DecoderLM, pool: PagedKVPool, tree: RadixCache | None, max_running: int,
                 max_prefill_tokens: int, decode_text: Callable[[list[int]], str] | None):
        self.model, self.pool, self.tree = model, pool, tree
        self.max_running, self.max_prefill_tokens = max_running, max_prefill_tokens
        self.decode_text = decode_text
        self.cfg = model.config
        self.device = pool.k[0].device
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.epoch = 0
        self.version = 0
        self.stats = dict(prompt_tokens=0, cached_tokens=0, prefill_tokens=0, generated_tokens=0,
                          prefill_steps=0, decode_steps=0, retractions=0, finished=0)

    # ---- bookkeeping -------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def used_tokens(self) -> int:
        evictable = self.tree.evictable_pages if self.tree else 0
        return (self.pool.num_pages - self.pool.free_pages - evictable) * self.pool.page_size

    def _alloc(self, n: int) -> list[int] | None:
        if n > self.pool.free_pages and self.tree is not None:
            self.tree.evict(n - self.pool.free_pages)
        return self.pool.alloc_pages(n)

    def _available_pages(self) -> int:
        return self.pool.free_pages + (self.tree.evictable_pages if self.tree else 0)

    def _pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.pool.page_size)

    # ---- admission -----------------------------------------------------------

    def _reusable(self, r: Request) -> list[int]:
        """The tokens whose KV may come from the cache."""
        limit = len(r.tokens) - 1  # at least one token must run to produce logits
        if r.input_logprobs is None and r.req.logprob_start_len >= 0:
            limit = min(limit, max(r.req.logprob_start_len, 1) - 1)  # prompt logprobs need those logits
        return r.tokens[:limit]

    def _match(self, r: Request) -> tuple[list[int], Node | None]:
        if self.tree is None:
            return [], None
        return self.tree.match_prefix(self._reusable(r))

    def _defer(self, r: Request, matched: int, round_tree: RadixCache) -> bool:
        """True when a request admitted this round shares a long uncached prefix with r."""
        common = len(round_tree.match_prefix(self._reusable(r))[0]) // self.pool.page_size * self.pool.page_size
        extra = common - matched
        return extra > 0 and (extra >= DEFER_MIN_TOKENS or 2 * extra >= len(r.tokens) - matched)

    def admit(self) -> list[Request]:
        batch: list[Request] = []
        budget = self.max_prefill_tokens
        round_tree = RadixCache(1, lambda pages: None) if self.tree is not None else None
        for r in list(self.waiting):
            if len(self.running) + len(batch) >= self.max_running or budget <= 0:
                break
            pages, node = self._match(r)
            matched = len(pages) * self.pool.page_size
            if round_tree is not None and self._defer(r, matched, round_tree):
                continue
            need = self._pages_for(len(r.tokens)) - len(pages)
            # one page per running row for the next decode; r needs one only when its last page is full
            headroom = len(self.running) + len(batch) + int(len(r.tokens) % self.pool.page_size == 0)
            if node is not None:
                self.tree.lock(node)
            own = self._alloc(need) if need + headroom <= self._available_pages() else None
            if own is None:
                if node is not None:
                    self.tree.unlock(node)
                break
            self.waiting.remove(r)
            r.node, r.epoch, r.tree_pages, r.pages = node, self.epoch, len(pages), pages + own
            r.kv_len = matched
            r.row = self.pool.alloc_row()
            self.pool.set_slots(r.row, r.pages, 0)
            if r.cached_tokens < 0:
                r.cached_tokens = matched
                self.stats["prompt_tokens"] += len(r.req.input_ids)
                self.stats["cached_tokens"] += matched
            budget -= len(r.tokens) - matched
            if round_tree is not None:
                round_tree.insert(r.tokens, [0] * len(r.tokens))
            batch.append(r)
        self.running.extend(batch)
        return batch

    # ---- forward + sampling -----------------------------------------------

    def _ensure_decode_pages(self, reqs: list[Request]) -> list[Request]:
        """Give every request a slot for its next token; retract the newest when out of pages."""
        needy = [r for r in reqs if self._pages_for(r.num_tokens) > len(r.pages)]
        updates = []
        for r in needy:
            if r.row < 0:
                continue  # retracted below for an older request
            need = self._pages_for(r.num_tokens) - len(r.pages)
            ahead = self._pages_for(min(r.num_tokens + DECODE_RESERVE_TOKENS, len(r.req.input_ids) + r.max_new))
            own = self._alloc(ahead - len(r.pages)) or self._alloc(need)
            while own is None:
                victim = self.running[-1]
                if victim is r and len(self.running) == 1:
                    raise RuntimeError("KV cache too small for a single request")
                self.retract(victim)
                if victim is r:
                    break
                own = self._alloc(need)
            if own is not None:
                updates.append((r.row, len(r.pages), own))
                r.pages += own
        self.pool.set_slots_many([u for u in updates])
        return [r for r in reqs if r.row >= 0]

    def forward(self, reqs: list[Request], prefill: bool) -> torch.Tensor:
        """Run every request's not-yet-cached tokens; logits [B, V] (float32) at each last token."""
        dev, B = self.device, len(reqs)
        q_list = [r.num_tokens - r.kv_len for r in reqs]
        Q = max(q_list)
        flat = [t for r in reqs for t in r.tokens_from(r.kv_len)]
        c_B = torch.tensor([r.kv_len for r in reqs], device=dev)
        q_B = torch.tensor(q_list, device=dev)
        rows_B = torch.tensor([r.row for r in reqs], device=dev)
        pos_BQ = c_B.unsqueeze(1) + torch.arange(Q, device=dev)
        valid_BQ = torch.arange(Q, device=dev).unsqueeze(0) < q_B.unsqueeze(1)
        if Q == 1:
            ids_BQ = torch.tensor(flat, dtype=torch.long, device=dev).unsqueeze(1)
        else:
            ids_BQ = torch.zeros(B, Q, dtype=torch.long, device=dev)
            ids_BQ[valid_BQ] = torch.tensor(flat, dtype=torch.long, device=dev)
        end_B = c_B + q_B
        K = int(end_B.max())
        table = self.pool.req_to_slot
        write_N = table[rows_B.unsqueeze(1).expand(B, Q)[valid_BQ], pos_BQ[valid_BQ]]
        j_K = torch.arange(K, device=dev)
        # Pad queries (i >= q_b) see all of their row's keys, which keeps them NaN-free.
        see_B1QK = ((j_K <= pos_BQ.unsqueeze(2)) & (j_K < end_B.view(B, 1, 1))).unsqueeze(1)
        # An additive float mask, built once: SDPA would convert a bool mask in every layer.
        mask_B1QK = torch.zeros(see_B1QK.shape, dtype=self.pool.k[0].dtype, device=dev).masked_fill_(~see_B1QK, float("-inf"))
        view = PagedView(self.pool, write_N, valid_BQ, table[rows_B, :K])
        x_BQH = self.model.hidden(ids_BQ, pos_BQ, view, mask_B1QK)
        last_BH = x_BQH[torch.arange(B, device=dev), q_B - 1]
        if prefill:
            for b, r in enumerate(reqs):
                if r.input_logprobs is None and r.req.logprob_start_len >= 0:
                    self._prompt_logprobs(r, x_BQH[b, : q_list[b] - 1])
        for r in reqs:
            r.kv_len = r.num_tokens
        return self.model.logits(last_BH).float()

    def _prompt_logprobs(self, r: Request, x_QH: torch.Tensor) -> None:
        """logprob of prompt token t given t' < t, for t in [logprob_start_len, n); None at t = 0.
        With top_logprobs_num > 0 also the top tokens at those positions (None at t = 0)."""
        start, c = r.req.logprob_start_len, r.kv_len
        prompt = r.req.input_ids
        first = max(start, 1)
        lead = [None] if start == 0 else []
        temp = r.req.sampling.temperature or 1.0
        lp_TV = torch.log_softmax(self.model.logits(x_QH[first - 1 - c :]).float() / temp, -1)[: len(prompt) - first]
        target = torch.tensor(prompt[first:], device=lp_TV.device)
        values = lp_TV.gather(1, target.unsqueeze(1)).squeeze(1).tolist()
        r.input_logprobs = lead + values
        k = min(r.req.top_logprobs_num, lp_TV.shape[1])
        if k > 0:
            val_TK, ids_TK = lp_TV.topk(k, dim=-1) if lp_TV.shape[0] else (lp_TV[:, :0], lp_TV[:, :0].long())
            r.input_top = lead + [list(zip(i, v)) for i, v in zip(ids_TK.tolist(), val_TK.tolist())]

    def sample_and_append(self, reqs: list[Request], logits_BV: torch.Tensor) -> None:
        """Penalties and bias, then sampling (rollout/sampling.py has the order); one token per request."""
        dev, B = self.device, len(reqs)
        params = [r.req.sampling for r in reqs]
        process_logits(logits_BV, params, [r.out_ids for r in reqs])
        for b, r in enumerate(reqs):  # stop tokens are masked until min_new_tokens
            sp = params[b]
            if sp.stop_token_ids and len(r.out_ids) < sp.min_new_tokens:
                logits_BV[b, torch.tensor(sp.stop_token_ids, device=dev)] = float("-inf")
        st = SamplingTensors.from_params(params, self.cfg.vocab_size, dev)
        u_B = torch.tensor([r.uniforms[len(r.out_ids)] for r in reqs], dtype=torch.float64)
        kept: dict[int, list[int]] = {}
        tok_B, lp_B = sample(logits_BV, st, u_B, [r.out_top_p is not None for r in reqs], kept)
        tops = self._top_logprobs(reqs, logits_BV, st)
        for b, (r, tok, lp) in enumerate(zip(reqs, tok_B.tolist(), lp_B.tolist())):
            r.out_ids.append(tok)
            r.out_logprobs.append(lp)
            r.out_versions.append(self.version)
            if r.out_top is not None:
                r.out_top.append(tops[b])
            if r.out_top_p is not None:
                r.out_top_p.append(kept[b])
        self.stats["generated_tokens"] += B

    def _top_logprobs(self, reqs, logits_BV, st) -> dict[int, list[tuple[int, float]]]:
        rows = [b for b, r in enumerate(reqs) if r.req.top_logprobs_num > 0]
        if not rows:
            return {}
        idx = torch.tensor(rows, device=logits_BV.device)
        lp_RV = torch.log_softmax(logits_BV[idx] / st.temperature_B[idx].unsqueeze(1), -1)
        out = {}
        for i, b in enumerate(rows):
            k = min(reqs[b].req.top_logprobs_num, lp_RV.shape[1])
            val, ids = lp_RV[i].topk(k)
            out[b] = list(zip(ids.tolist(), val.tolist()))
        return out

    def finished_status(self, r: Request) -> SampleStatus | None:
        sp = r.req.sampling
        tok, n = r.out_ids[-1], len(r.out_ids)
        if n >= sp.min_new_tokens:
            if tok in sp.stop_token_ids:
                r.matched_stop = tok
                return SampleStatus.COMPLETED
            if sp.stop and self.decode_text is not None:
                text = self.decode_text(r.out_ids)
                for s in sp.stop:
                    if s and s in text:
                        r.matched_stop = s
                        return SampleStatus.COMPLETED
        if n >= r.max_new:
            return SampleStatus.TRUNCATED
        return None

    # ---- leaving the batch -------------------------------------------------

    def release(self, r: Request) -> None:
        """Free r's KV: cache what it computed in the tree (when still valid), free the rest."""
        if r.row < 0:
            return
        ps = self.pool.page_size
        if self.tree is not None and r.epoch == self.epoch:
            full = r.kv_len // ps
            already = self.tree.insert(r.tokens[: full * ps], r.pages[:full]) // ps
            self.pool.free(r.pages[r.tree_pages : already] + r.pages[full:])
        else:
            self.pool.free(r.pages[r.tree_pages :])
        if r.node is not None:
            self.tree.unlock(r.node)
        self.pool.free_row(r.row)
        r.pages, r.tree_pages, r.node, r.row, r.kv_len = [], 0, None, -1, 0

    def cache_prompt(self, r: Request) -> None:
        """After prefill: put r's full pages in the tree now and use the tree's copies."""
        if self.tree is None or r.epoch != self.epoch:
            return
        ps = self.pool.page_size
        full = r.kv_len // ps
        if full <= r.tree_pages:
            return
        already = self.tree.insert(r.tokens[: full * ps], r.pages[:full]) // ps
        pages, node = self.tree.match_prefix(r.tokens[: full * ps])
        self.tree.lock(node)
        if r.node is not None:
            self.tree.unlock(r.node)
        duplicates = r.pages[r.tree_pages : already]
        if duplicates != pages[r.tree_pages : already]:
            self.pool.free(duplicates)
        r.pages[: len(pages)] = pages
        self.pool.set_slots(r.row, r.pages, r.tree_pages)
        r.node, r.tree_pages = node, len(pages)

    def retract(self, r: Request) -> None:
        """Move a running request back to the front of the queue, releasing its KV."""
        self.running.remove(r)
        self.release(r)
        self.waiting.insert(0, r)
        self.stats["retractions"] += 1

    def finish(self, r: Request, status: SampleStatus, error: str | None = None) -> None:
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)
        self.release(r)
        self.stats["finished"] += 1
        r.finish_cb(r, r.snapshot(status, self.version, error))

    # ---- one iteration ------------------------------------------------------

    def step(self) -> None:
        new = self.admit()
        if new:
            self.stats["prefill_tokens"] += sum(len(r.tokens) - r.kv_len for r in new)
            self.stats["prefill_steps"] += 1
            self._run(new, prefill=True)
            for r in new:
                if r in self.running:
                    self.cache_prompt(r)
        fresh = set(map(id, new))
        old = [r for r in self.running if id(r) not in fresh]
        old = self._ensure_decode_pages(old)
        if old:
            self.stats["decode_steps"] += 1
            self._run(old, prefill=False)

    def _run(self, reqs: list[Request], prefill: bool) -> None:
        """One forward + sample for `reqs`; on an error, each request again alone (module docstring)."""
        saved = [_Progress.of(r) for r in reqs]
        try:
            self._run_batch(reqs, prefill)
        except Exception as exc:
            self._isolate(reqs, saved, prefill, exc)

    def _isolate(self, reqs: list[Request], saved: list[_Progress], prefill: bool, exc: Exception) -> None:
        """Roll back a failed batch step and rerun each request alone; finish the ones that still fail
        ABORTED with their error. BatchFailure when none does (the batch as a whole is to blame)."""
        kind = "prefill" if prefill else "decode"
        if len(reqs) > 1:
            log.warning("%s step of %d requests failed (%s); running each alone", kind, len(reqs), short_error(exc))
        failed = passed = 0
        for r, progress in zip(reqs, saved):
            if r not in self.running:
                continue  # it finished before the error
            self.stats["generated_tokens"] -= progress.restore(r)
            error = exc
            if len(reqs) > 1:
                try:
                    self._run_batch([r], prefill)
                    passed += 1
                    continue
                except Exception as alone:
                    error = alone
                    if r not in self.running:
                        continue  # it finished, then something after its finish raised
                    self.stats["generated_tokens"] -= progress.restore(r)
            log.error("%s step of request %s failed; aborting it", kind, r.rid, exc_info=error)
            failed += 1
            self.finish(r, SampleStatus.ABORTED, f"engine error in the {kind} step of this request: "
                                                 f"{short_error(error)}")
        if passed and not failed:
            raise BatchFailure(f"a {kind} step of {len(reqs)} requests failed, yet each ran alone: "
                               f"{short_error(exc)}") from exc

    def _run_batch(self, reqs: list[Request], prefill: bool) -> None:
        logits_BV = self.forward(reqs, prefill)
        scored = [r for r in reqs if r.max_new == 0]  # prefill-only scoring: no token to sample
        for r in scored:
            self.finish(r, SampleStatus.TRUNCATED)
        if scored:
            keep = [b for b, r in enumerate(reqs) if r.max_new > 0]
            reqs, logits_BV = [reqs[b] for b in keep], logits_BV[keep]
            if not reqs:
                return
        self.sample_and_append(reqs, logits_BV)
        for r in reqs:
            status = self.finished_status(r)
            if status is not None:
                self.finish(r, status)
            elif r.on_update is not None:
                try:
                    r.on_update(r.snapshot(None, self.version))
                except Exception:  # a caller's callback must not take the engine down
                    log.exception("on_update callback of request %s raised", r.rid)
