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

Per-step costs on small models are torch op launches and Python passes over
the batch, not FLOPs, so a step batches them: one slot-table write for all the
requests a step admits or moves onto cached pages, a decode forward built from
a handful of ops whatever the batch size, and the batch's sampling settings
reused while the same requests keep running.

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


@dataclass
class _BatchSampling:
    """What sampling needs of one batch beyond its logits; it depends only on which requests are in it."""

    key: tuple[Request, ...]
    params: list
    st: SamplingTensors
    processed: bool  # some row has a penalty or a logit bias
    stop_rows: list[int]  # rows with stop tokens to mask until min_new_tokens
    want_kept: list[bool] | None  # rows returning their top-p token ids (None: no row)
    any_top: bool  # some row returns top logprobs
    extras: bool  # some row returns top logprobs or top-p ids

    @classmethod
    def of(cls, reqs: tuple[Request, ...], vocab_size: int, device) -> "_BatchSampling":
        params = [r.req.sampling for r in reqs]
        want = [r.out_top_p is not None for r in reqs]
        any_top = any(r.out_top is not None for r in reqs)
        return cls(reqs, params, SamplingTensors.from_params(params, vocab_size, device),
                   processed=any(p.penalized or p.logit_bias for p in params),
                   stop_rows=[b for b, p in enumerate(params) if p.stop_token_ids and p.min_new_tokens > 0],
                   want_kept=want if any(want) else None, any_top=any_top, extras=any_top or any(want))


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
        self._sampling: _BatchSampling | None = None
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
        if not self.waiting:
            return []
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
            if r.cached_tokens < 0:
                r.cached_tokens = matched
                self.stats["prompt_tokens"] += len(r.req.input_ids)
                self.stats["cached_tokens"] += matched
            budget -= len(r.tokens) - matched
            if round_tree is not None:
                round_tree.insert(r.tokens, [0] * len(r.tokens))
            batch.append(r)
        self.pool.set_slots_many([(r.row, 0, r.pages) for r in batch])
        self.running.extend(batch)
        return batch

    # ---- forward + sampling -----------------------------------------------

    def _ensure_decode_pages(self, reqs: list[Request]) -> list[Request]:
        """Give every request a slot for its next token; retract the newest when out of pages."""
        ps = self.pool.page_size
        needy = [r for r in reqs if r.num_tokens > len(r.pages) * ps]
        if not needy:
            return reqs
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
        c_list = [r.kv_len for r in reqs]
        end_list = [r.num_tokens for r in reqs]
        q_list = [e - c for c, e in zip(c_list, end_list)]
        Q, K = max(q_list), max(end_list)
        if Q == 1:
            flat = [r.out_ids[-1] if r.out_ids else r.req.input_ids[-1] for r in reqs]
        else:
            flat = [t for r in reqs for t in r.tokens_from(r.kv_len)]
        c_B = torch.tensor(c_list, device=dev)
        read_BK = self.pool.req_to_slot[:, :K].index_select(0, torch.tensor([r.row for r in reqs], device=dev))
        j_K = torch.arange(K, device=dev)
        if Q == 1:  # decode: one new token per row, at position kv_len; its keys are exactly j <= kv_len
            pos_BQ = c_B.unsqueeze(1)
            ids_BQ = torch.tensor(flat, dtype=torch.long, device=dev).unsqueeze(1)
            write_N = read_BK.gather(1, pos_BQ).squeeze(1)
            hide_B1QK = (j_K > pos_BQ).view(B, 1, 1, K)
            valid_N = None
        else:
            q_B = torch.tensor(q_list, device=dev)
            pos_BQ = c_B.unsqueeze(1) + torch.arange(Q, device=dev)
            valid_BQ = torch.arange(Q, device=dev).unsqueeze(0) < q_B.unsqueeze(1)
            valid_N = valid_BQ.view(-1).nonzero().squeeze(1)  # flat (b, q) index of every real token
            ids_BQ = torch.zeros(B * Q, dtype=torch.long, device=dev)
            ids_BQ = ids_BQ.index_copy_(0, valid_N, torch.tensor(flat, dtype=torch.long, device=dev)).view(B, Q)
            write_N = read_BK.gather(1, pos_BQ.clamp(max=K - 1)).view(-1).index_select(0, valid_N)
            # Pad queries (i >= q_b) see all of their row's keys, which keeps them NaN-free.
            see_BQK = (j_K <= pos_BQ.unsqueeze(2)) & (j_K < (c_B + q_B).view(B, 1, 1))
            hide_B1QK = (~see_BQK).unsqueeze(1)
        # An additive float mask, built once: SDPA would convert a bool mask in every layer.
        mask_B1QK = torch.zeros(hide_B1QK.shape, dtype=self.pool.k[0].dtype, device=dev)
        mask_B1QK.masked_fill_(hide_B1QK, float("-inf"))
        x_BQH = self.model.hidden(ids_BQ, pos_BQ, PagedView(self.pool, write_N, valid_N, read_BK), mask_B1QK)
        if Q == 1:
            last_BH = x_BQH[:, 0]
        else:
            last_BH = x_BQH[torch.arange(B, device=dev), q_B - 1]
        if prefill:
            for b, r in enumerate(reqs):
                if r.input_logprobs is None and r.req.logprob_start_len >= 0:
                    self._prompt_logprobs(r, x_BQH[b, : q_list[b] - 1])
        for r, end in zip(reqs, end_list):
            r.kv_len = end
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

    def _batch_sampling(self, reqs: list[Request]) -> "_BatchSampling":
        """The batch's per-row sampling settings, rebuilt only when the batch changes (most decode steps
        run the same requests as the step before)."""
        key = tuple(reqs)
        if self._sampling is None or self._sampling.key != key:
            self._sampling = _BatchSampling.of(key, self.cfg.vocab_size, self.device)
        return self._sampling

    def sample_and_append(self, reqs: list[Request], logits_BV: torch.Tensor) -> None:
        """Penalties and bias, then sampling (rollout/sampling.py has the order); one token per request."""
        dev, B = self.device, len(reqs)
        bs = self._batch_sampling(reqs)
        if bs.processed:
            process_logits(logits_BV, bs.params, [r.out_ids for r in reqs])
        for b in bs.stop_rows:  # stop tokens are masked until min_new_tokens
            sp, r = bs.params[b], reqs[b]
            if len(r.out_ids) < sp.min_new_tokens:
                logits_BV[b, torch.tensor(sp.stop_token_ids, device=dev)] = float("-inf")
        u_B = torch.tensor([r.uniforms[len(r.out_ids)] for r in reqs], dtype=torch.float64)
        kept: dict[int, list[int]] = {}
        tok_B, lp_B = sample(logits_BV, bs.st, u_B, bs.want_kept, kept)
        tops = self._top_logprobs(reqs, logits_BV, bs.st) if bs.any_top else {}
        version = self.version
        for b, (r, tok, lp) in enumerate(zip(reqs, tok_B.tolist(), lp_B.tolist())):
            r.out_ids.append(tok)
            r.out_logprobs.append(lp)
            r.out_versions.append(version)
            if bs.extras:
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

    def cache_prompts(self, reqs: list[Request]) -> None:
        """After prefill: put each request's full pages in the tree now and use the tree's copies."""
        if self.tree is None:
            return
        running = set(self.running)
        updates = [u for r in reqs if r.epoch == self.epoch and r in running for u in self._cache_prompt(r)]
        self.pool.set_slots_many(updates)

    def _cache_prompt(self, r: Request) -> list[tuple[int, int, list[int]]]:
        """`cache_prompts` for one request; the slot-table update it needs (none when no page changed)."""
        ps = self.pool.page_size
        full = r.kv_len // ps
        if full <= r.tree_pages:
            return []
        already = self.tree.insert(r.tokens[: full * ps], r.pages[:full]) // ps
        pages, node = self.tree.match_prefix(r.tokens[: full * ps])
        self.tree.lock(node)
        if r.node is not None:
            self.tree.unlock(r.node)
        first = r.tree_pages
        duplicates = r.pages[first:already]
        changed = duplicates != pages[first:already]
        if changed:
            self.pool.free(duplicates)
        r.pages[: len(pages)] = pages
        r.node, r.tree_pages = node, len(pages)
        # the pages past `already` are r's own, now the tree's: only replaced duplicates move slots
        return [(r.row, first, r.pages[first:already])] if changed else []

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
            self.cache_prompts(new)
        fresh = set(new)
        old = [r for r in self.running if r not in fresh] if new else list(self.running)
        old = self._ensure_decode_pages(old)
        if old:
            self.stats["decode_steps"] += 1
            self._run(old, prefill=False)
        if not self.running:
            self._sampling = None  # holds the last batch's requests: let them go while idle

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
