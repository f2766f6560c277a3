"""The embedded engine's core: radix prefix cache, paged KV pool, continuous batching.

RadixCache against a brute-force model (page sizes 1 and 4); then the engine
on a tiny random Llama (CPU, fp32): prefix cache on == off, continuous
batching, a tiny pool (eviction + retraction) == a big pool with no page
leaked, pause / retract / in-place weight updates, top and prompt logprobs,
stop strings. Synchronization is by callbacks on the engine thread
(`on_update`, done callbacks) and the step lock, never by sleeping.
"""

from __future__ import annotations

import functools
import random
import threading

import pytest
import torch

from rollout import EmbeddedEngine
from rollout.model import DecoderLM, ModelConfig
from rollout.radix_cache import RadixCache
from slime_rl.buckets import pack_bucket
from slime_rl.tokenizer import CharTokenizer
from slime_rl.types import GenerateRequest, SampleStatus, SamplingParams

VOCAB = CharTokenizer().vocab_size  # 99: the stop-string test decodes any sampled id
CFG = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
WAIT = 30  # seconds; only reached when the engine hangs


@functools.cache
def weights(seed: int) -> dict[str, torch.Tensor]:
    """Random HF-named weights, std 0.15 so logits are peaked (no near-ties under greedy)."""
    model = DecoderLM(ModelConfig.from_hf(CFG))
    model.init_random(seed, std=0.15)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.fixture
def make_engine():
    made = []

    def make(weights_seed: int = 0, **kw) -> EmbeddedEngine:
        kw.setdefault("max_total_tokens", 4096)  # the default 256 MB pool is slow to allocate
        engine = EmbeddedEngine(CFG, weights(weights_seed), **kw)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def req(ids, rid=None, top_logprobs_num=0, logprob_start_len=-1, **sampling) -> GenerateRequest:
    return GenerateRequest(list(ids), SamplingParams(**sampling), rid=rid, top_logprobs_num=top_logprobs_num,
                           logprob_start_len=logprob_start_len)


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def grpo_batch(n_prompts=8, k=4, max_new=12, seed=0, first_len=10) -> list[GenerateRequest]:
    """n_prompts x k samples, group-major, seeded; prompt lengths first_len, first_len + 3, ..."""
    ps = random_prompts([first_len + 3 * i for i in range(n_prompts)], seed)
    return [req(p, rid=f"g{i}s{j}", temperature=1.0, max_new_tokens=max_new, seed=1000 * i + j)
            for i, p in enumerate(ps) for j in range(k)]


def pause_at(engine: EmbeddedEngine, n_tokens: int, mode: str):
    """An on_update callback pausing `engine` (mode) once its request has n_tokens; and the Event it sets."""
    paused = threading.Event()

    def callback(out):
        if len(out.output_ids) == n_tokens and not paused.is_set():
            engine.pause_generation(mode)
            paused.set()

    return callback, paused


def submit_together(engine: EmbeddedEngine, reqs, on_updates=None) -> list:
    """Submit while paused so the first step sees every request (one submit each races the engine thread)."""
    engine.pause_generation("in_place")
    handles = [engine.submit(r, on_update=cb) for r, cb in zip(reqs, on_updates or [None] * len(reqs))]
    engine.continue_generation()
    return handles


def assert_same_outputs(outs, refs) -> None:
    assert [o.output_ids for o in outs] == [r.output_ids for r in refs]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(torch.tensor(o.output_logprobs), torch.tensor(r.output_logprobs),
                                   atol=1e-5, rtol=0)
        assert o.finish_reason == r.finish_reason


def assert_no_leak(engine: EmbeddedEngine) -> None:
    """Idle engine: every page is either free or owned by exactly one live tree node."""
    with engine._lock:  # the step that finished the last request may still be running
        sched, pool = engine._sched, engine.pool
        assert not sched.running and not sched.waiting
        tree = sched.tree
        tree_pages = [p for n in tree._nodes() for p in n.pages] if tree is not None else []
        cached = tree.cached_pages if tree is not None else 0
        assert len(tree_pages) == cached
        assert pool.free_pages + cached == pool.num_pages
        assert sorted(pool._free_pages + tree_pages) == list(range(pool.num_pages))  # no page twice
        if tree is not None:
            assert tree.evictable_pages == cached  # nothing locked
        assert sorted(pool._free_rows) == list(range(engine.max_batch_size))


# ---- RadixCache --------------------------------------------------------------


class FakePool:
    """Free list for the tree's `free_pages` callback; a double free fails the test."""

    def __init__(self, num_pages: int):
        self.num_pages, self.free_list, self.freed = num_pages, list(range(num_pages)), []

    def free(self, pages: list[int]) -> None:
        for p in pages:
            assert p not in self.free_list, f"page {p} freed twice"
        self.free_list += pages
        self.freed += pages

    def alloc(self, n: int) -> list[int]:
        assert n <= len(self.free_list)
        out, self.free_list = self.free_list[:n], self.free_list[n:]
        return out


def pages_of(*patterns: int, ps: int) -> list[int]:
    """Tokens of whole pages; page pattern x is [x, x + 1, ..., x + ps - 1] (page size ps)."""
    return [x + j for x in patterns for j in range(ps)]


@pytest.mark.parametrize("ps", [1, 4])
def test_radix_match_insert_split(ps):
    pool = FakePool(32)
    tree = RadixCache(ps, pool.free)
    a = pages_of(10, 20, 30, ps=ps)
    a_pages = pool.alloc(3)
    assert tree.insert(a, a_pages) == 0
    assert tree.cached_pages == tree.evictable_pages == 3
    assert tree.match_prefix(a)[0] == a_pages
    assert tree.match_prefix(a + [7] * (ps - 1) + [1])[0] == a_pages  # a longer query matches what is cached
    if ps > 1:  # page-aligned: a partial last page is never matched
        assert tree.match_prefix(a[: 2 * ps + ps - 1])[0] == a_pages[:2]
        assert tree.match_prefix(a[:ps] + a[ps : ps + 2] + [99, 99])[0] == a_pages[:1]  # diverges mid-page
        with pytest.raises(AssertionError, match="whole pages"):
            tree.insert(a[:-1], a_pages)

    # Diverging after 2 pages splits the node; insert reports the 2 cached pages' tokens.
    b = pages_of(10, 20, 40, ps=ps)
    b_pages = pool.alloc(3)
    assert tree.insert(b, b_pages) == 2 * ps
    assert tree.cached_pages == 4  # the tree took only b's last page
    assert tree.match_prefix(b)[0] == a_pages[:2] + b_pages[2:]
    assert tree.match_prefix(a)[0] == a_pages
    # (with ps > 1 the mid-page match above already cut the first page off)
    assert sorted(len(n.key) // ps for n in tree._nodes()) == ([1, 1, 2] if ps == 1 else [1, 1, 1, 1])
    assert tree.insert(a, pool.alloc(3)) == 3 * ps  # all cached: the caller keeps (and frees) its pages
    assert tree.insert(a[:ps], [0]) == ps and tree.cached_pages == 4

    # A match ending inside a node splits it too; the split keeps every page.
    pages, node = tree.match_prefix(a[:ps] + [5] * ps)
    assert pages == a_pages[:1] and node.key == tuple(a[:ps])
    assert sorted(len(n.key) // ps for n in tree._nodes()) == [1, 1, 1, 1]
    assert tree.match_prefix([1, 2, 3] * ps) == ([], tree.root)
    assert tree.cached_pages == tree.evictable_pages == 4


@pytest.mark.parametrize("ps", [1, 4])
def test_radix_lock_protects_and_evicts_lru_leaves_first(ps):
    pool = FakePool(32)
    tree = RadixCache(ps, pool.free)
    shared = pages_of(1, ps=ps)
    seqs = {name: shared + pages_of(*pats, ps=ps) for name, pats in
            dict(x=(10, 11), y=(20,), z=(30, 31, 32)).items()}
    owned = {}
    for name in "xyz":  # insertion order x, y, z; then x is used again
        pages = pool.alloc(len(seqs[name]) // ps)
        pool.free(pages[: tree.insert(seqs[name], pages) // ps])  # our copies of the cached part
        owned[name] = pages
    pool.freed = []
    tree.match_prefix(seqs["x"])
    assert tree.cached_pages == tree.evictable_pages == 1 + 2 + 1 + 3

    assert tree.evict(1) == 1 and pool.freed == owned["y"][1:]  # least recently used leaf
    pages, node_z = tree.match_prefix(seqs["z"])
    tree.lock(node_z)
    assert tree.evictable_pages == 2  # z's path (shared page included) is locked
    assert tree.evict(100) == 2 and pool.freed[-2:] == owned["x"][1:]
    assert tree.match_prefix(seqs["z"])[0] == owned["x"][:1] + owned["z"][1:] and tree.evictable_pages == 0
    assert tree.evict(1) == 0
    tree.unlock(node_z)
    assert tree.evictable_pages == tree.cached_pages == 4
    assert tree.evict(3) == 3 and tree.cached_pages == 1  # the whole z leaf; its parent is next
    assert tree.evict(1) == 1 and pool.freed[-1:] == owned["x"][:1]
    assert sorted(pool.free_list) == list(range(32)) and tree.cached_pages == tree.evictable_pages == 0


@pytest.mark.parametrize("ps", [1, 4])
def test_radix_invalidate_frees_unlocked_now_locked_on_unlock(ps):
    pool = FakePool(16)
    tree = RadixCache(ps, pool.free)
    a, b = pages_of(1, 2, ps=ps), pages_of(5, 6, ps=ps)
    a_pages, b_pages = pool.alloc(2), pool.alloc(2)
    tree.insert(a, a_pages)
    tree.insert(b, b_pages)
    _, node_a = tree.match_prefix(a + [0])
    tree.lock(node_a)
    tree.lock(node_a)  # two users
    tree.invalidate()
    assert sorted(pool.freed) == sorted(b_pages)  # unlocked: freed at once
    assert tree.cached_pages == tree.evictable_pages == 0
    assert tree.match_prefix(a) == ([], tree.root)  # dead nodes never match again
    new_pages = pool.alloc(2)
    assert tree.insert(a, new_pages) == 0 and tree.match_prefix(a)[0] == new_pages
    tree.unlock(node_a)
    assert sorted(pool.freed) == sorted(b_pages)
    tree.unlock(node_a)  # last user: the dead pages go back now, the live copy stays
    assert sorted(pool.freed) == sorted(b_pages + a_pages)
    assert tree.cached_pages == tree.evictable_pages == 2 and tree.evict(2) == 2
    assert sorted(pool.free_list) == list(range(16))


class TreeModel:
    """Brute-force RadixCache: each cached page keyed by the page-aligned prefix it ends."""

    def __init__(self, ps: int):
        self.ps, self.gen = ps, 0
        self.live: dict[tuple, int] = {}  # prefix -> page
        self.locks: dict[tuple, int] = {}  # prefix -> users
        self.dead: dict[tuple, list[int]] = {}  # (gen, prefix) -> [page, users]

    def prefixes(self, tokens, n_pages) -> list[tuple]:
        return [tuple(tokens[: (k + 1) * self.ps]) for k in range(n_pages)]

    def match(self, tokens) -> list[int]:
        out = []
        for p in self.prefixes(tokens, len(tokens) // self.ps):
            if p not in self.live:
                break
            out.append(self.live[p])
        return out

    def insert(self, tokens, pages) -> int:
        already = len(self.match(tokens))
        for p, page in list(zip(self.prefixes(tokens, len(pages)), pages))[already:]:
            self.live[p], self.locks[p] = page, 0
        return already * self.ps


def check_tree(tree: RadixCache, model: TreeModel) -> None:
    seen, stack = {}, [((), n) for n in tree.root.children.values()]
    while stack:
        prefix, node = stack.pop()
        assert not node.dead and node.pages and len(node.key) == len(node.pages) * model.ps
        for j, page in enumerate(node.pages):
            p = prefix + node.key[: (j + 1) * model.ps]
            seen[p] = page
            assert node.lock_ref == model.locks[p]
        stack += [(prefix + node.key, c) for c in node.children.values()]
    assert seen == model.live
    assert tree.cached_pages == len(model.live)
    assert tree.evictable_pages == sum(1 for p in model.live if model.locks[p] == 0)


@pytest.mark.parametrize("ps", [1, 3])
def test_set_slots_many_matches_slot_formula(ps):
    """One batched table update == each page's slots written by hand, a last page past the context cut."""
    from rollout.kv_cache import PagedKVPool

    cfg = ModelConfig.from_hf(dict(CFG, max_position_embeddings=10))
    pool = PagedKVPool(cfg, num_pages=40, page_size=ps, max_running=4, device="cpu", dtype=torch.float32)
    rng = random.Random(ps)
    updates = [(row, first, rng.sample(range(40), -(-10 // ps) - first)) for row, first in ((0, 0), (2, 1), (3, 2))]
    pool.set_slots_many(updates + [(1, 0, [])])
    want = torch.full_like(pool.req_to_slot, pool.pad_slot)
    for row, first, pages in updates:
        for i, page in enumerate(pages):
            for o in range(ps):
                if (first + i) * ps + o < 10:
                    want[row, (first + i) * ps + o] = page * ps + o
    assert torch.equal(pool.req_to_slot, want)


def test_request_uniforms_equal_row_uniforms():
    from rollout.sampling import UNIFORM_BLOCK, request_uniforms, row_uniforms

    for seed in (0, 7, 2**63 - 1):
        for n in (0, 1, UNIFORM_BLOCK, UNIFORM_BLOCK + 1, 3 * UNIFORM_BLOCK - 5):
            gen = torch.Generator().manual_seed(seed)  # the stream: blocks of UNIFORM_BLOCK from one generator
            blocks = [torch.rand(UNIFORM_BLOCK, generator=gen, dtype=torch.float64) for _ in range(3)]
            want = torch.cat(blocks)[:n].tolist()
            assert request_uniforms(seed, n) == want
            assert row_uniforms([seed, seed], n).tolist() == [want, want]


@pytest.mark.parametrize("ps", [1, 4])
def test_radix_random_ops_match_brute_force_model(ps):
    """Scheduler-like use (match + lock, hold own pages, insert + unlock later), evictions and
    invalidations at random; after every op the tree equals the model and no page is lost."""
    rng = random.Random(1234 + ps)
    pool, model = FakePool(24), TreeModel(ps)
    tree = RadixCache(ps, pool.free)
    patterns = [[0] * ps, [0] * (ps - 1) + [1], [1] * ps]  # pages that share all but their last token
    open_reqs = []
    counts = dict(evicted=0, split_inserts=0, stale_releases=0, invalidate=0)

    def release(r):
        tokens, pages, m, node, keys, gen = r
        if gen == model.gen:
            already = tree.insert(tokens, pages) // ps
            assert already * ps == model.insert(tokens, pages) and already >= m
            counts["split_inserts"] += already > m
            pool.free(pages[m:already])  # the caller's duplicates of pages cached meanwhile
            tree.unlock(node)
            for k in keys:
                model.locks[k] -= 1
        else:
            pool.free(pages[m:])
            before = len(pool.freed)
            tree.unlock(node)
            expect = []
            for k in keys:
                entry = model.dead[(gen, k)]
                entry[1] -= 1
                if entry[1] == 0:
                    expect.append(entry[0])
                    del model.dead[(gen, k)]
            assert sorted(pool.freed[before:]) == sorted(expect)
            counts["stale_releases"] += 1

    for _ in range(600):
        op = rng.random()
        if op < 0.4:  # a request arrives: match, lock, take pages for the rest
            tokens = [t for _ in range(rng.randint(1, 5)) for t in rng.choice(patterns)]
            tail = [rng.randint(0, 1) for _ in range(rng.randint(0, ps - 1))]
            pages, node = tree.match_prefix(tokens + tail)
            assert pages == model.match(tokens + tail)
            keys = model.prefixes(tokens, len(pages))
            tree.lock(node)
            for k in keys:
                model.locks[k] += 1
            need = len(tokens) // ps - len(pages)
            short = need - len(pool.free_list)
            if short > 0:
                unlocked = {p for p in model.live if model.locks[p] == 0}
                before = len(pool.freed)
                freed = tree.evict(short)
                gone = {p for p in unlocked if model.live[p] in set(pool.freed[before:])}
                assert freed == len(gone) == len(pool.freed) - before  # only unlocked pages go
                assert freed >= short or gone == unlocked
                for p in gone:
                    del model.live[p], model.locks[p]
                assert all(p[:-ps] in model.live for p in model.live if len(p) > ps)  # still a tree
                counts["evicted"] += freed
            if need > len(pool.free_list):
                tree.unlock(node)
                for k in keys:
                    model.locks[k] -= 1
            else:
                open_reqs.append((tokens, pages + pool.alloc(need), len(pages), node, keys, model.gen))
        elif op < 0.75 and open_reqs:
            release(open_reqs.pop(rng.randrange(len(open_reqs))))
        elif op < 0.95:
            tokens = [t for _ in range(rng.randint(1, 6)) for t in rng.choice(patterns)]
            assert tree.match_prefix(tokens)[0] == model.match(tokens)
        else:
            before = len(pool.freed)
            tree.invalidate()
            expect = [page for p, page in model.live.items() if model.locks[p] == 0]
            assert sorted(pool.freed[before:]) == sorted(expect)
            for p, page in model.live.items():
                if model.locks[p]:
                    model.dead[(model.gen, p)] = [page, model.locks[p]]
            model.live, model.locks, model.gen = {}, {}, model.gen + 1
            counts["invalidate"] += 1
        check_tree(tree, model)
        held = [pg for r in open_reqs for pg in r[1][r[2]:]] + [e[0] for e in model.dead.values()]
        assert sorted(pool.free_list + list(model.live.values()) + held) == list(range(pool.num_pages))

    assert all(v > 0 for v in counts.values()), counts  # every path was exercised
    while open_reqs:
        release(open_reqs.pop())
    check_tree(tree, model)
    tree.evict(pool.num_pages)
    assert sorted(pool.free_list) == list(range(pool.num_pages)) and not model.dead


# ---- engine: prefix cache -------------------------------------------------------


@pytest.mark.parametrize("ps", [1, 4])
def test_prefix_cache_keeps_outputs_and_saves_prefill(make_engine, ps):
    batch = grpo_batch()
    on, off = make_engine(page_size=ps), make_engine(page_size=ps, enable_prefix_cache=False)
    outs, refs = on.generate(batch), off.generate(batch)
    assert_same_outputs(outs, refs)
    assert len({tuple(o.output_ids) for o in outs}) == len(batch)  # the samples really differ

    # First sample of a group computes the prompt; the others wait one step and reuse its pages.
    for r, o in zip(batch, outs):
        n = len(r.input_ids)
        assert o.cached_tokens == (0 if r.rid.endswith("s0") else (n - 1) // ps * ps), r.rid
        assert o.prompt_tokens == n
    assert all(o.cached_tokens == 0 for o in refs)
    s_on, s_off = on.stats(), off.stats()
    assert s_on["prefill_steps"] == 2  # all first samples together, then all the others together
    lens = [len(r.input_ids) for r in batch[::4]]
    assert s_on["prefill_tokens"] == sum(n + 3 * (n - (n - 1) // ps * ps) for n in lens)
    assert s_off["prefill_tokens"] == s_off["prompt_tokens"] == 4 * sum(lens)
    assert s_on["prefill_tokens"] < 0.4 * s_off["prefill_tokens"]
    assert s_on["cache_hit_rate"] == s_on["cached_tokens"] / s_on["prompt_tokens"] > 0.5

    # A second turn extends turn 1's prompt + output: the whole turn-1 KV is reused.
    first, out1 = batch[5], outs[5]
    turn2 = req(first.input_ids + out1.output_ids + [7, 8, 9], temperature=1.0, max_new_tokens=8, seed=5)
    (o2,), (ref2,) = on.generate([turn2]), off.generate([turn2])
    assert_same_outputs([o2], [ref2])
    kv_len = len(first.input_ids) + len(out1.output_ids) - 1  # the last token never had KV computed
    assert o2.cached_tokens == kv_len // ps * ps > len(first.input_ids)
    assert_no_leak(on)
    assert_no_leak(off)


# ---- engine: continuous batching -----------------------------------------------


def test_short_request_submitted_mid_decode_finishes_first(make_engine):
    engine, alone = make_engine(), make_engine(enable_prefix_cache=False)
    long_p, short_p = random_prompts([9, 6], seed=3)
    long_r = req(long_p, rid="long", temperature=0.0, max_new_tokens=60)
    short_r = req(short_p, rid="short", temperature=1.0, max_new_tokens=4, seed=9)
    done_order, long_len, handles = [], [], {}

    def on_long(out):
        long_len.append(len(out.output_ids))
        if len(out.output_ids) == 5 and out.finish_reason is None:  # mid-generation: submit the short one
            handles["short"] = engine.submit(short_r)
            handles["short"].add_done_callback(lambda o: done_order.append(("short", long_len[-1])))

    handles["long"] = engine.submit(long_r, on_update=on_long)
    handles["long"].add_done_callback(lambda o: done_order.append(("long", None)))
    long_out = handles["long"].result(WAIT)
    short_out = handles["short"].result(WAIT)
    # Admitted the very next step and decoded alongside: done 4 steps later, long far from done.
    assert done_order == [("short", 9), ("long", None)]
    assert len(long_out.output_ids) == 60 and len(short_out.output_ids) == 4
    ref_long, ref_short = alone.generate([long_r]), alone.generate([short_r])
    assert_same_outputs([long_out, short_out], ref_long + ref_short)
    assert engine.stats()["decode_steps"] == 59  # one decode per long token after the first, none extra


def test_finished_requests_leave_the_batch(make_engine):
    engine = make_engine()
    ps = random_prompts([5, 7, 9, 11], seed=4)
    reqs = [req(p, rid=f"r{n}", temperature=0.0, max_new_tokens=n) for p, n in zip(ps, (3, 6, 9, 12))]
    running_at_finish, running_per_token = [], []
    engine.pause_generation("in_place")  # queue all four so they are admitted in one step
    handles = [engine.submit(r, on_update=(lambda o: running_per_token.append(engine.load()["num_running_reqs"]))
                             if r.rid == "r12" else None) for r in reqs]
    for h in handles:
        h.add_done_callback(lambda o: running_at_finish.append((o.rid, engine.load()["num_running_reqs"])))
    assert engine.load()["num_waiting_reqs"] == 4 and engine.load()["num_running_reqs"] == 0
    engine.continue_generation()
    outs = [h.result(WAIT) for h in handles]
    assert running_at_finish == [("r3", 3), ("r6", 2), ("r9", 1), ("r12", 0)]
    assert running_per_token == [4, 4, 3, 3, 3, 2, 2, 2, 1, 1, 1, 0]  # the last one is its finish
    assert [len(o.output_ids) for o in outs] == [3, 6, 9, 12]
    assert engine.stats()["decode_steps"] == 11 and engine.load()["num_running_reqs"] == 0


# ---- engine: memory pressure ------------------------------------------------------


@pytest.mark.parametrize("ps,cache", [(1, True), (4, True), (1, False), (4, False)])
def test_tiny_pool_gives_big_pool_outputs_without_leaks(make_engine, ps, cache):
    batch = grpo_batch(n_prompts=6, k=3, max_new=24, seed=6, first_len=8)
    refs = make_engine().generate(batch)
    tiny = make_engine(page_size=ps, max_total_tokens=64, enable_prefix_cache=cache, max_batch_size=8)
    aborted = {}

    def abort_midway(out):  # an abort under pressure must not leak either
        if len(out.output_ids) == 10 and not aborted:
            aborted["out"] = out
            tiny.abort(out.rid)

    handles = submit_together(tiny, batch, [abort_midway if r.rid == "g2s1" else None for r in batch])
    outs = [h.result(WAIT) for h in handles]
    i = [r.rid for r in batch].index("g2s1")
    assert outs[i].finish_reason == SampleStatus.ABORTED
    assert outs[i].output_ids == refs[i].output_ids[: len(outs[i].output_ids)]
    assert_same_outputs(outs[:i] + outs[i + 1 :], refs[:i] + refs[i + 1 :])
    stats = tiny.stats()
    assert stats["retractions"] > 0
    assert tiny.load()["max_total_num_tokens"] == 64
    assert_no_leak(tiny)
    if cache:
        assert stats["cached_tokens"] > 0 and tiny._sched.tree.cached_pages > 0

    with pytest.raises(ValueError, match="prompt of 64 tokens exceeds the KV cache of 64 tokens"):
        tiny.submit(req(list(range(64)), max_new_tokens=1))


@pytest.mark.parametrize("ps", [1, 4])
def test_request_filling_the_whole_pool_is_served(make_engine, ps):
    """A prompt that fits (n + 1 <= pool) must be admitted, also when its pages fill the pool;
    so must a request retracted with nearly the whole pool in use."""
    tiny = make_engine(page_size=ps, max_total_tokens=64)
    big = make_engine(enable_prefix_cache=False)
    for n in (61, 62, 63):
        r = req(random_prompts([n], seed=n)[0], temperature=0.0, max_new_tokens=8)
        out = tiny.submit(r).result(WAIT)
        assert len(out.output_ids) == 64 - n  # clamped to the pool
        assert out.output_ids == big.generate([r])[0].output_ids[: 64 - n]

    long_r = req([5, 6, 7, 8], temperature=0.0, max_new_tokens=60)
    pause_late, paused = pause_at(tiny, 57, "retract")

    h = tiny.submit(long_r, on_update=pause_late)
    assert paused.wait(WAIT)
    assert tiny.flush_cache() is False  # queued under pause (this also applies the retraction)
    assert tiny.load()["num_waiting_reqs"] == 1 and tiny.stats()["retractions"] == 1
    tiny.continue_generation()
    assert h.result(WAIT).output_ids == big.generate([long_r])[0].output_ids
    assert_no_leak(tiny)


# ---- engine: pause / weight updates ----------------------------------------------


@pytest.mark.parametrize("ps", [1, 4])
def test_pause_retract_then_continue_equals_uninterrupted(make_engine, ps):
    ps_ = random_prompts([6, 9, 13, 17], seed=7)
    reqs = [req(p, rid=f"r{i}", max_new_tokens=20, **(dict(temperature=0.0) if i % 2 else dict(seed=i)))
            for i, p in enumerate(ps_)]
    refs = make_engine(page_size=ps).generate(reqs)
    engine = make_engine(page_size=ps)
    pause_at_6, paused = pause_at(engine, 6, "retract")

    handles = submit_together(engine, reqs, [pause_at_6] + [None] * 3)
    assert paused.wait(WAIT)
    assert engine.flush_cache() is False  # requests queued under pause; applies the retraction
    load = engine.load()
    assert (load["num_running_reqs"], load["num_waiting_reqs"]) == (0, 4)
    assert engine.stats()["retractions"] == 4 and not any(h.done() for h in handles)
    with engine._lock:
        assert engine._sched.tree.evictable_pages == engine._sched.tree.cached_pages > 0  # KV kept as cache
    engine.continue_generation()
    outs = [h.result(WAIT) for h in handles]
    assert_same_outputs(outs, refs)
    assert engine.stats()["prefill_steps"] == 2  # the re-prefill after the retraction
    assert_no_leak(engine)


def test_pause_in_place_bucket_update_switches_versions_mid_sequence(make_engine):
    engine, old = make_engine(), make_engine(enable_prefix_cache=False)
    r = req(random_prompts([8], seed=8)[0], temperature=0.0, max_new_tokens=16)
    ref = old.generate([r])[0]
    pause_at_5, paused = pause_at(engine, 5, "in_place")

    h = engine.submit(r, on_update=pause_at_5)
    assert paused.wait(WAIT)
    assert engine.flush_cache() is False  # a request is running (paused in place)
    engine.update_weights_from_bucket(pack_bucket(weights(1).items()), weight_version=1)
    assert engine.get_weight_version() == 1 and not h.done()
    engine.continue_generation()
    out = h.result(WAIT)
    assert out.output_versions == [0] * 5 + [1] * 11 and out.weight_version == 1
    assert out.output_ids[:5] == ref.output_ids[:5] and out.output_ids[5:] != ref.output_ids[5:]
    assert engine.flush_cache() is True
    assert_no_leak(engine)


def test_flush_cache_refused_while_queued_then_drops_the_cache(make_engine):
    engine = make_engine()
    r = req(random_prompts([12], seed=9)[0], temperature=0.0, max_new_tokens=6)
    engine.pause_generation("in_place")
    h = engine.submit(r)
    assert engine.flush_cache() is False and engine.load()["num_waiting_reqs"] == 1
    engine.continue_generation()
    first = h.result(WAIT)
    assert engine.generate([r])[0].cached_tokens == 11  # cached from the first run
    assert engine.flush_cache() is True
    with engine._lock:
        assert engine._sched.tree.cached_pages == 0 and engine.pool.free_pages == engine.pool.num_pages
    again = engine.generate([r])[0]
    assert again.cached_tokens == 0 and again.output_ids == first.output_ids
    assert_no_leak(engine)


@pytest.mark.parametrize("ps", [1, 4])
def test_weight_update_flush_while_prefixes_are_held_does_not_leak(make_engine, ps):
    engine = make_engine(page_size=ps)
    batch = grpo_batch(n_prompts=4, k=4, max_new=12, seed=10)
    pause_at_3, paused = pause_at(engine, 3, "in_place")  # g0s1 was admitted on g0s0's cached prompt pages

    handles = submit_together(engine, batch, [pause_at_3 if r.rid == "g0s1" else None for r in batch])
    assert paused.wait(WAIT)
    with engine._lock:
        sched = engine._sched
        assert sum(r.tree_pages > 0 for r in sched.running) == 16  # everyone holds tree pages
    engine.update_weights_from_bucket(pack_bucket(weights(1).items()), weight_version=1, flush_cache=True)
    with engine._lock:  # the old tree is retired, the running requests retracted: no old KV is left
        assert sched.tree.cached_pages == sched.tree.evictable_pages == 0
        assert not sched.running and engine.pool.free_pages == engine.pool.num_pages
    engine.continue_generation()
    outs = [h.result(WAIT) for h in handles]
    for o in outs:
        assert o.output_versions == sorted(o.output_versions) and set(o.output_versions) == {0, 1}
    assert_no_leak(engine)

    outs = engine.generate(batch)  # the new tree holds the prompts re-prefilled by the new weights
    for r, o in zip(batch, outs):
        assert o.cached_tokens == (len(r.input_ids) - 1) // ps * ps
        assert o.output_versions == [1] * 12
    assert_no_leak(engine)


# ---- engine: logprobs and stopping ------------------------------------------------


@pytest.mark.parametrize("ps", [1, 4])
def test_top_logprobs_and_prompt_logprobs(make_engine, ps):
    engine = make_engine(page_size=ps)
    prompt = random_prompts([14], seed=11)[0]
    engine.generate([req(prompt, temperature=0.0, max_new_tokens=4)])  # warm the cache with this prompt
    greedy, hot, cold = engine.generate([
        req(prompt, temperature=0.0, max_new_tokens=10, top_logprobs_num=5, logprob_start_len=0),
        req(prompt, temperature=0.7, max_new_tokens=10, seed=3, top_logprobs_num=3, logprob_start_len=6),
        req(prompt, temperature=1.0, max_new_tokens=2, seed=4, logprob_start_len=13),
    ])
    # Prompt logprobs need logits from logprob_start_len - 1 on, so only the prefix before can be cached.
    assert [o.cached_tokens for o in (greedy, hot, cold)] == [0, 5 // ps * ps, 12 // ps * ps]

    seq = prompt + greedy.output_ids
    with torch.inference_mode():
        ref_lp_TV = torch.log_softmax(engine.model(torch.tensor([seq]))[0].float(), -1)[len(prompt) - 1 : -1]
    assert len(greedy.output_top_logprobs) == 10
    for t, (tok, lp, top) in enumerate(zip(greedy.output_ids, greedy.output_logprobs, greedy.output_top_logprobs)):
        assert len(top) == 5 and top[0][0] == tok
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert top[0][1] == pytest.approx(lp, abs=1e-5)
        vals, ids = ref_lp_TV[t].topk(5)
        assert [i for i, _ in top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top]), vals, atol=1e-5, rtol=0)

    assert greedy.input_logprobs[0] is None and len(greedy.input_logprobs) == 14
    lp0 = engine.compute_logprobs([prompt], temperature=1.0)[0]
    torch.testing.assert_close(torch.tensor(greedy.input_logprobs[1:]), lp0, atol=1e-5, rtol=0)
    lp6 = engine.compute_logprobs([prompt], temperature=0.7, start_positions=[6])[0]
    assert len(hot.input_logprobs) == 8
    torch.testing.assert_close(torch.tensor(hot.input_logprobs), lp6, atol=1e-5, rtol=0)
    lp13 = engine.compute_logprobs([prompt], temperature=1.0, start_positions=[13])[0]
    torch.testing.assert_close(torch.tensor(cold.input_logprobs), lp13, atol=1e-5, rtol=0)
    assert cold.output_top_logprobs is None
    # Sampled rows: top logprobs at the request's temperature, like the sampled token's logprob.
    with torch.inference_mode():
        logits_TV = engine.model(torch.tensor([prompt + hot.output_ids]))[0].float()[len(prompt) - 1 : -1]
    ref_TV = torch.log_softmax(logits_TV / 0.7, -1)
    for t, (tok, lp, top) in enumerate(zip(hot.output_ids, hot.output_logprobs, hot.output_top_logprobs)):
        vals, ids = ref_TV[t].topk(3)
        assert [i for i, _ in top] == ids.tolist() and lp == pytest.approx(float(ref_TV[t, tok]), abs=1e-5)
        torch.testing.assert_close(torch.tensor([v for _, v in top]), vals, atol=1e-5, rtol=0)


def test_stop_strings_with_char_tokenizer(make_engine):
    tok = CharTokenizer()
    engine = make_engine(tokenizer=tok)
    prompt = tok.encode("user: what is 2+3?\nassistant: ")
    free = engine.generate([req(prompt, temperature=0.0, max_new_tokens=30)])[0].output_ids
    i = next(i for i in range(3, 20) if min(free[i : i + 2]) >= 3)  # two printable characters
    stop = tok.decode(free[i : i + 2])
    n = next(n for n in range(1, 31) if stop in tok.decode(free[:n]))
    never = "~~~~~" if "~~~~~" not in tok.decode(free) else "\x7f"
    hit, late, miss = engine.generate([
        req(prompt, temperature=0.0, max_new_tokens=30, stop=[never, stop]),
        req(prompt, temperature=0.0, max_new_tokens=30, stop=[stop], min_new_tokens=n + 2),
        req(prompt, temperature=0.0, max_new_tokens=30, stop=[never]),
    ])
    assert hit.output_ids == free[:n] and hit.matched_stop == stop and hit.finish_reason == SampleStatus.COMPLETED
    # Stop strings are not checked before min_new_tokens (and never change the tokens).
    assert late.output_ids == free[: n + 2] and late.matched_stop == stop
    assert miss.output_ids == free and miss.matched_stop is None and miss.finish_reason == SampleStatus.TRUNCATED
    with pytest.raises(ValueError, match="stop strings need an engine tokenizer"):
        make_engine(max_total_tokens=256).submit(req(prompt, stop=["x"]))


def test_min_new_tokens_masks_stop_tokens(make_engine):
    engine = make_engine()
    prompt = random_prompts([7], seed=12)[0]
    free = engine.generate([req(prompt, temperature=0.0, max_new_tokens=20)])[0].output_ids
    j = next(j for j in range(1, 5) if free[j] not in free[:j])  # greedy would stop at new token j
    stop = free[j]
    out = engine.generate([req(prompt, temperature=0.0, max_new_tokens=20, min_new_tokens=6,
                               stop_token_ids=[stop])])[0]
    # Reference: greedy on no-cache logits with the stop token masked before 6 new tokens.
    seq = list(prompt)
    with torch.inference_mode():
        for t in range(20):
            logits_V = engine.model(torch.tensor([seq]))[0, -1].float()
            if t < 6:
                logits_V[stop] = float("-inf")
            seq.append(int(logits_V.argmax()))
            if seq[-1] == stop:
                break
    assert out.output_ids == seq[len(prompt) :]
    assert stop not in out.output_ids[:6] and out.output_ids[:j] == free[:j] and out.output_ids[j] != stop
    if out.finish_reason == SampleStatus.COMPLETED:
        assert out.matched_stop == stop == out.output_ids[-1]
    else:
        assert out.finish_reason == SampleStatus.TRUNCATED and len(out.output_ids) == 20


# ---- robustness ------------------------------------------------------------------


def test_raising_on_update_callback_does_not_kill_the_engine(make_engine):
    engine = make_engine()

    def broken(out):
        raise RuntimeError("user callback bug")

    good, bad = submit_together(engine, [req([3, 4, 5], temperature=0.0, max_new_tokens=8),
                                         req([6, 7, 8], temperature=0.0, max_new_tokens=8)], [None, broken])
    out = good.result(WAIT)
    assert out.finish_reason == SampleStatus.TRUNCATED and engine.health()
    assert bad.result(WAIT).finish_reason == SampleStatus.TRUNCATED  # its handle resolves too
