"""Paged KV block manager: a fixed pool of pages, reference counted, with prefix reuse.

Every sequence owns a page table (its pages in position order); token at position p lives
in slot `table[p // page_size] * page_size + p % page_size`.

Prefix caching: once a page is full *and computed*, `commit` keys it by a chained hash
`blake2b(parent_hash || int32 token bytes)`, so equal hashes mean equal prefixes. Admission
(`allocate`) reuses the longest chain of cached pages, but never the page holding the last
prompt token: that token must be computed to produce logits.

Pages whose refcount drops to 0 stay cached; they are reclaimed only when a free page is
needed, least recently used first and only when they are leaves (no cached page chains
from them), so a parent is never evicted before its children.

Invariant (kept by `commit`, which swaps a freshly computed duplicate for the cached
holder of the same hash): every sequence's committed pages are the cache holders of their
hashes. Hence a cached page in use has all its ancestors in use, every unreferenced cached
page is reclaimable, and `free_pages` is exact.
"""
from __future__ import annotations

import hashlib
import heapq
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from jaxrt.errors import SettingError

ROOT_HASH = b""


def hash_page(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Chained content hash of one full page (stable across processes, unlike hash())."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, dtype=np.int32).tobytes())
    return h.digest()


@dataclass(frozen=True)
class BlockStats:
    num_pages: int
    pages_in_use: int         # refcount > 0
    free_pages: int           # refcount 0: never used or cached-and-reclaimable
    cached_pages: int         # pages holding a prefix-cache entry (in use or not)
    evictions: int
    prompt_tokens: int        # tokens looked up at admission
    cached_tokens: int        # of which reused from the prefix cache

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise SettingError(f"need num_pages >= 1 and page_size >= 1, got {num_pages}, "
                               f"{page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_pages
        self._hash: list[bytes | None] = [None] * num_pages
        self._parent: list[bytes | None] = [None] * num_pages
        self._last_used = [0] * num_pages
        self._clock = 0
        self._clean = deque(range(num_pages))         # refcount 0, not cached
        self._num_idle_cached = 0                     # refcount 0, cached
        self._lru: list[tuple[int, int]] = []         # (last_used, page), lazily validated
        self._cache: dict[bytes, int] = {}            # hash -> page
        self._children: dict[bytes, int] = {}         # hash -> cached pages chaining from it
        self._tables: dict[int, list[int]] = {}
        self._hashes: dict[int, list[bytes]] = {}     # hashes of each sequence's committed pages
        self._evictions = self._prompt_tokens = self._cached_tokens = 0

    # ---- queries --------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        return len(self._clean) + self._num_idle_cached

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - self.free_pages

    def stats(self) -> BlockStats:
        return BlockStats(self.num_pages, self.pages_in_use, self.free_pages, len(self._cache),
                          self._evictions, self._prompt_tokens, self._cached_tokens)

    def page_table(self, seq_id: int) -> list[int]:
        return list(self._tables[seq_id])

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def slot(self, seq_id: int, position: int) -> int:
        return self._tables[seq_id][position // self.page_size] * self.page_size \
            + position % self.page_size

    def refcount(self, page: int) -> int:
        return self._ref[page]

    def page_hash(self, page: int) -> tuple[bytes, bytes] | None:
        """(parent hash, hash) of a cached page, None if the page is not cached."""
        return None if self._hash[page] is None else (self._parent[page], self._hash[page])

    def cached_pages(self) -> dict[bytes, int]:
        return dict(self._cache)

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def cached_prefix(self, tokens: Sequence[int], read_cache: bool = True) -> list[int]:
        """Pages of the longest cached prefix of `tokens` (never covering the last token);
        none with `read_cache=False` (a request that needs every token's logits)."""
        if not self.enable_prefix_caching or not read_cache:
            return []
        pages, parent, ps = [], ROOT_HASH, self.page_size
        for i in range((len(tokens) - 1) // ps):
            h = hash_page(parent, tokens[i * ps:(i + 1) * ps])
            page = self._cache.get(h)
            if page is None:
                break
            pages.append(page)
            parent = h
        return pages

    # ---- sequence lifecycle ---------------------------------------------------------

    def allocate(self, seq_id: int, tokens: Sequence[int], num_tokens: int,
                 read_cache: bool = True) -> int | None:
        """Admit a sequence: reuse its cached prefix (unless `read_cache` is False), then
        add pages to hold `num_tokens` tokens. Returns the number of tokens already
        computed (reused), or None without changing anything when the pool cannot supply
        the pages. Its computed pages are committed to the cache either way."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has pages")
        prefix = self.cached_prefix(tokens, read_cache)
        reused = len(prefix) * self.page_size
        need = max(self.pages_needed(max(num_tokens, reused)) - len(prefix), 0)
        idle_in_prefix = sum(1 for p in prefix if self._ref[p] == 0)
        if need > self.free_pages - idle_in_prefix:
            return None
        for page in prefix:
            self._acquire(page)
        self._tables[seq_id] = prefix + [self._take_page() for _ in range(need)]
        self._hashes[seq_id] = [self._hash[p] for p in prefix]
        self._prompt_tokens += len(tokens)
        self._cached_tokens += reused
        return reused

    def append_slots(self, seq_id: int, num_tokens: int) -> bool:
        """Grow the sequence's table to hold `num_tokens` tokens; False (no change) if the
        pool is exhausted."""
        table = self._tables[seq_id]
        need = self.pages_needed(num_tokens) - len(table)
        if need <= 0:
            return True
        if need > self.free_pages:
            return False
        table.extend(self._take_page() for _ in range(need))
        return True

    def trim(self, seq_id: int, num_tokens: int) -> None:
        """Give back the sequence's pages past those holding `num_tokens` tokens (pages a
        rejected speculative proposal needed), last first. Never a committed page: those
        hold computed tokens, which a caller keeps."""
        table = self._tables[seq_id]
        keep = max(self.pages_needed(num_tokens), len(self._hashes[seq_id]))
        while len(table) > keep:
            self._release(table.pop())

    def commit(self, seq_id: int, tokens: Sequence[int], num_computed: int) -> None:
        """Record that the first `num_computed` tokens have their K/V written: cache every
        newly full page. A page whose content is already cached elsewhere is given back
        and the sequence shares the cached holder (identical K/V)."""
        if not self.enable_prefix_caching:
            return
        table, hashes, ps = self._tables[seq_id], self._hashes[seq_id], self.page_size
        while len(hashes) < num_computed // ps:
            i = len(hashes)
            parent = hashes[-1] if hashes else ROOT_HASH
            h = hash_page(parent, tokens[i * ps:(i + 1) * ps])
            page, holder = table[i], self._cache.get(h)
            if holder is None:
                self._hash[page], self._parent[page] = h, parent
                self._cache[h] = page
                self._children[h] = 0
                if parent != ROOT_HASH:
                    self._children[parent] += 1
            elif holder != page:
                self._acquire(holder)
                table[i] = holder
                self._release(page)
            hashes.append(h)

    def fork(self, parent_id: int, child_id: int, num_computed: int) -> int:
        """Give `child_id` the parent's full computed pages (shared, refcount + 1). The
        partial last page is not shared, since both would write into it: the child gets
        its own copy by recomputing those tokens. Returns the child's computed tokens."""
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id} already has pages")
        n = num_computed // self.page_size
        shared = self._tables[parent_id][:n]
        for page in shared:
            self._acquire(page)
        self._tables[child_id] = list(shared)
        self._hashes[child_id] = list(self._hashes[parent_id][:n])
        return n * self.page_size

    def free(self, seq_id: int) -> None:
        """Drop the sequence's references, last page first."""
        for page in reversed(self._tables.pop(seq_id)):
            self._release(page)
        del self._hashes[seq_id]

    # ---- pages ----------------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _acquire(self, page: int) -> None:
        if self._ref[page] == 0:
            if self._hash[page] is None:
                raise AssertionError(f"page {page} is free and uncached; cannot share it")
            self._num_idle_cached -= 1
        self._ref[page] += 1
        self._last_used[page] = self._tick()

    def _release(self, page: int) -> None:
        if self._ref[page] <= 0:
            raise AssertionError(f"double free of page {page}")
        self._ref[page] -= 1
        self._last_used[page] = self._tick()
        if self._ref[page] == 0:
            if self._hash[page] is None:
                self._clean.append(page)
            else:
                self._num_idle_cached += 1
                self._push_if_evictable(page)

    def _push_if_evictable(self, page: int) -> None:
        h = self._hash[page]
        if self._ref[page] == 0 and h is not None and self._children[h] == 0:
            heapq.heappush(self._lru, (self._last_used[page], page))
            if len(self._lru) > 2 * self.num_pages + 16:
                self._compact_lru()

    def _compact_lru(self) -> None:
        """Drop stale heap entries (a page reused, evicted or no longer a leaf since it
        was pushed): at most one entry per page is live, so the heap stays O(pages)
        however many requests finish without an eviction. Amortized O(1) per push."""
        self._lru = [(stamp, page) for stamp, page in self._lru
                     if self._live_entry(stamp, page)]
        heapq.heapify(self._lru)

    def _live_entry(self, stamp: int, page: int) -> bool:
        h = self._hash[page]
        return (self._ref[page] == 0 and h is not None and self._children[h] == 0
                and stamp == self._last_used[page])

    def _take_page(self) -> int:
        if self._clean:
            page = self._clean.popleft()
        else:
            page = self._evict()
        self._ref[page] = 1
        self._last_used[page] = self._tick()
        return page

    def _evict(self) -> int:
        while self._lru:
            stamp, page = heapq.heappop(self._lru)
            if not self._live_entry(stamp, page):
                continue  # stale entry: reused, evicted, or no longer a leaf
            h = self._hash[page]
            parent = self._parent[page]
            del self._cache[h], self._children[h]
            self._hash[page] = self._parent[page] = None
            self._num_idle_cached -= 1
            self._evictions += 1
            if parent != ROOT_HASH:
                self._children[parent] -= 1
                self._push_if_evictable(self._cache[parent])
            return page
        raise AssertionError("no page to evict (callers check free_pages first)")
