"""Radix (prefix) tree over token ids whose nodes own KV pages of the pool.

Keys are cut at page boundaries: a node's key is a whole number of pages of
tokens and it owns exactly those pages, so a match hands a request the pages
of its longest cached page-aligned prefix. Requests `lock` the node their
match ended on (and with it every ancestor); only unlocked nodes are evicted,
least recently used leaves first, when the pool runs out of pages.

`invalidate` (after a weight update) retires the whole tree at once: unlocked
nodes free their pages immediately, locked ones are marked dead and free their
pages when their last user unlocks them; nothing dead is ever matched again.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable

_clock = itertools.count()


class Node:
    __slots__ = ("key", "pages", "children", "parent", "lock_ref", "last_access", "dead")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: "Node | None"):
        self.key, self.pages, self.parent = key, pages, parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.lock_ref = 0
        self.last_access = next(_clock)
        self.dead = False

    def __lt__(self, other: "Node") -> bool:  # for the eviction heap
        return self.last_access < other.last_access


class RadixCache:
    """Prefix tree of cached pages; `free_pages(pages)` returns pages to the pool."""

    def __init__(self, page_size: int, free_pages: Callable[[list[int]], None]):
        self.page_size = page_size
        self._free_pages = free_pages
        self.root = Node((), [], None)
        self.root.lock_ref = 1  # never evicted
        self.evictable_pages = 0  # pages in nodes nobody locks
        self.cached_pages = 0

    # ---- lookup / insert -------------------------------------------------

    def _page_key(self, tokens, i: int) -> tuple[int, ...]:
        return tuple(tokens[i : i + self.page_size])

    def match_prefix(self, tokens: list[int]) -> tuple[list[int], Node]:
        """Pages of the longest cached page-aligned prefix of `tokens`, and its last node."""
        node, pages, i = self.root, [], 0
        ps, n = self.page_size, len(tokens) - len(tokens) % self.page_size
        while i < n:
            child = node.children.get(self._page_key(tokens, i))
            if child is None:
                break
            matched = self._common_pages(child.key, tokens, i)
            if matched < len(child.pages):
                child = self._split(child, matched)
            child.last_access = next(_clock)
            pages += child.pages
            node, i = child, i + matched * ps
        return pages, node

    def _common_pages(self, key: tuple[int, ...], tokens: list[int], start: int) -> int:
        ps, count = self.page_size, 0
        if tuple(tokens[start : start + len(key)]) == key:  # the common case: the whole key matches
            return len(key) // ps
        for p in range(len(key) // ps):
            lo = start + p * ps
            if tuple(tokens[lo : lo + ps]) != key[p * ps : (p + 1) * ps]:
                break
            count += 1
        return count

    def _split(self, node: Node, n_pages: int) -> Node:
        """Cut `node` after n_pages; returns the new upper part (node keeps the rest)."""
        cut = n_pages * self.page_size
        upper = Node(node.key[:cut], node.pages[:n_pages], node.parent)
        upper.lock_ref, upper.last_access = node.lock_ref, node.last_access
        node.parent.children[upper.key[: self.page_size]] = upper
        node.key, node.pages, node.parent = node.key[cut:], node.pages[n_pages:], upper
        upper.children[node.key[: self.page_size]] = node
        return upper

    def insert(self, tokens: list[int], pages: list[int]) -> int:
        """Cache `pages` (one per page of `tokens`, page-aligned length). Returns
        how many leading tokens were already cached: the caller still owns its
        pages for that part (they duplicate the tree's) and must free any that
        are not the tree's own; the tree now owns the rest."""
        ps = self.page_size
        assert len(tokens) == len(pages) * ps, "insert needs whole pages"
        node, i = self.root, 0
        while i < len(tokens):
            key = self._page_key(tokens, i)
            child = node.children.get(key)
            if child is None:
                new = Node(tuple(tokens[i:]), list(pages[i // ps :]), node)
                node.children[key] = new
                self.evictable_pages += len(new.pages)
                self.cached_pages += len(new.pages)
                return i
            matched = self._common_pages(child.key, tokens, i)
            if matched < len(child.pages):
                child = self._split(child, matched)
            child.last_access = next(_clock)
            node, i = child, i + matched * ps
        return i

    # ---- locking ----------------------------------------------------------

    def lock(self, node: Node) -> None:
        while node is not None:
            if node.lock_ref == 0 and not node.dead:
                self.evictable_pages -= len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                if node.dead:
                    self._free_pages(node.pages)
                    node.pages = []
                else:
                    self.evictable_pages += len(node.pages)
            node = node.parent

    # ---- eviction / invalidation ------------------------------------------

    def evict(self, n_pages: int) -> int:
        """Free at least n_pages from unlocked leaves, LRU first; returns pages freed."""
        leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < n_pages and leaves:
            node = heapq.heappop(leaves)
            self._free_pages(node.pages)
            freed += len(node.pages)
            self.evictable_pages -= len(node.pages)
            self.cached_pages -= len(node.pages)
            parent = node.parent
            del parent.children[node.key[: self.page_size]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def invalidate(self) -> None:
        """Retire every cached prefix (see module docstring)."""
        for node in self._nodes():
            node.dead = True
            if node.lock_ref == 0:
                self._free_pages(node.pages)
                node.pages = []
        self.root = Node((), [], None)
        self.root.lock_ref = 1
        self.evictable_pages = self.cached_pages = 0

    def _nodes(self) -> list[Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out
