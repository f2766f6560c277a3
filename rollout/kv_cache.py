"""Paged KV cache: one pool of K/V slots shared by every request.

The pool holds `num_pages * page_size` token slots per layer
(`k[layer]`: [slots + 1, H_kv, D]; the extra last slot is a zero pad target).
A request owns a list of pages; token t of the request lives in slot
`pages[t // page_size] * page_size + t % page_size`. The slots of each running
request are kept in a row of `req_to_slot` [max_running, context_len], so a
batch's whole key table is one indexing op.

`PagedView` is what the model's attention sees for one forward: it writes
this step's new K/V into their slots and gathers each row's keys [B, K]
(padded rows point anywhere; the attention mask hides them).
"""

from __future__ import annotations

import torch

from rollout.model import ModelConfig


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


class PagedKVPool:
    """K/V storage + a free-page allocator + the per-request slot table."""

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, max_running: int, device, dtype):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"KV pool needs >= 1 page of >= 1 token, got {num_pages} pages of {page_size}")
        self.page_size, self.num_pages = page_size, num_pages
        slots = num_pages * page_size
        shape = (slots + 1, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.pad_slot = slots
        self._free_pages = list(range(num_pages - 1, -1, -1))  # a stack: pop() hands out low pages first
        self.req_to_slot = torch.full((max_running, cfg.max_position_embeddings), slots, dtype=torch.long,
                                      device=device)
        self._free_rows = list(range(max_running - 1, -1, -1))

    @property
    def max_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    def alloc_pages(self, n: int) -> list[int] | None:
        """n free pages, or None (nothing taken) when fewer are free."""
        if n > len(self._free_pages):
            return None
        return [self._free_pages.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free_pages.extend(pages)

    def alloc_row(self) -> int:
        return self._free_rows.pop()

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    def set_slots(self, row: int, pages: list[int], first_page: int) -> None:
        """Record that pages[first_page:] back the row's tokens from first_page * page_size on."""
        self.set_slots_many([(row, first_page, pages[first_page:])])

    def set_slots_many(self, updates: list[tuple[int, int, list[int]]]) -> None:
        """Batched `set_slots`: (row, index of the first new page, the new pages) per request.

        One `index_copy_` into the flat table for the whole batch: per-request indexing ops cost
        more than the update itself on small models."""
        ps, width = self.page_size, self.req_to_slot.shape[1]
        at: list[int] = []
        slots: list[int] = []
        for row, first, new in updates:
            start = first * ps
            n = min(len(new) * ps, width - start)  # the last page may stick out past the context
            if n <= 0:
                continue
            at += range(row * width + start, row * width + start + n)
            slots += new[:n] if ps == 1 else [p * ps + o for p in new for o in range(ps)][:n]
        if not at:
            return
        dev = self.req_to_slot.device
        self.req_to_slot.view(-1).index_copy_(0, torch.tensor(at, device=dev), torch.tensor(slots, device=dev))


class PagedView:
    """One forward's view of the pool: where new K/V go, which keys each row reads."""

    def __init__(self, pool: PagedKVPool, write_slots_N: torch.Tensor, valid_N: torch.Tensor | None,
                 read_slots_BK: torch.Tensor):
        self.pool = pool
        self.write_slots_N = write_slots_N  # slot of every valid new token, in row-major (b, q) order
        self.valid_N = valid_N  # flat (b, q) index of every real query position; None: all of them
        self.read_slots_BK = read_slots_BK

    def update(self, layer: int, k_BHQD: torch.Tensor, v_BHQD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, K = self.read_slots_BK.shape
        flat_read = self.read_slots_BK.reshape(-1)
        out = []
        for pool, new_BHQD in ((self.pool.k[layer], k_BHQD), (self.pool.v[layer], v_BHQD)):
            new_ND = new_BHQD.transpose(1, 2).reshape(-1, *pool.shape[1:])
            if self.valid_N is not None:
                new_ND = new_ND.index_select(0, self.valid_N)
            # index_copy_ / index_select: several times faster than advanced indexing on CPU
            pool.index_copy_(0, self.write_slots_N, new_ND)
            out.append(pool.index_select(0, flat_read).view(B, K, *pool.shape[1:]).transpose(1, 2))
        return out[0], out[1]
