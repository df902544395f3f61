"""Stateful model check of the paged block manager.

The machine plays a scheduler and a model at once: it admits sequences (with prefix
reuse), computes chunks of their tokens (writing each token into a shadow copy of the
cache at the slot the manager gives it), extends them with generated tokens, forks and
frees them, on a pool small enough that pages are evicted all the time. After every
step it checks that:
- each page's refcount equals the number of live page tables holding it, and free +
  used = total (no leak, no double free);
- no sequence writes into a page someone else holds, nor into a cached page;
- every computed token is still in the shadow cache where its sequence's table says it
  is (no corruption), and reused prefixes really hold the reusing sequence's tokens;
- every cached page's hash is the chained hash of the tokens written there, and its
  parent is cached too (so the prefix chain is always reachable).
"""
from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from jaxrt.runtime.block_manager import ROOT_HASH, BlockManager, hash_page

PAGE = 2
PAGES = 10
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=11)  # tiny vocab: shared prefixes


@dataclass
class Seq:
    tokens: list[int]
    computed: int


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(caching=st.booleans())
    def setup(self, caching):
        self.bm = BlockManager(PAGES, PAGE, enable_prefix_caching=caching)
        self.seqs: dict[int, Seq] = {}
        self.shadow = [[None] * PAGE for _ in range(PAGES)]
        self.next_id = 0

    # ---- helpers ----------------------------------------------------------------------

    def _write(self, sid: int, start: int, end: int) -> None:
        seq = self.seqs[sid]
        for pos in range(start, end):
            slot = self.bm.slot(sid, pos)
            page, off = divmod(slot, PAGE)
            assert self.bm.refcount(page) == 1, f"write into page {page} shared by others"
            assert self.bm.page_hash(page) is None, f"write into cached page {page}"
            self.shadow[page][off] = seq.tokens[pos]
        seq.computed = end
        self.bm.commit(sid, seq.tokens, end)

    def _pick(self, data, pred=lambda s: True) -> int | None:
        ids = sorted(i for i, s in self.seqs.items() if pred(s))
        return data.draw(st.sampled_from(ids)) if ids else None

    # ---- rules ------------------------------------------------------------------------

    @rule(tokens=tokens_st, chunk=st.integers(1, 11))
    def admit(self, tokens, chunk):
        sid, self.next_id = self.next_id, self.next_id + 1
        cached = len(self.bm.cached_prefix(tokens)) * PAGE
        n = min(chunk, len(tokens) - cached)
        free_before = self.bm.free_pages
        got = self.bm.allocate(sid, tokens, cached + n)
        if got is None:
            assert self.bm.free_pages == free_before and not self.bm.has(sid)
            return
        assert got == cached < len(tokens), "the last prompt token must be computed"
        for pos in range(got):  # reused pages hold exactly our prefix
            page, off = divmod(self.bm.slot(sid, pos), PAGE)
            assert self.shadow[page][off] == tokens[pos]
        self.seqs[sid] = Seq(list(tokens), got)
        self._write(sid, got, got + n)

    @rule(data=st.data(), chunk=st.integers(1, 11))
    def compute(self, data, chunk):
        sid = self._pick(data, lambda s: s.computed < len(s.tokens))
        if sid is None:
            return
        seq = self.seqs[sid]
        end = min(seq.computed + chunk, len(seq.tokens))
        if self.bm.append_slots(sid, end):
            self._write(sid, seq.computed, end)

    @rule(data=st.data(), token=st.integers(0, 2))
    def generate(self, data, token):
        sid = self._pick(data, lambda s: s.computed == len(s.tokens))
        if sid is not None:
            self.seqs[sid].tokens.append(token)

    @rule(data=st.data(), token=st.integers(0, 2))
    def fork(self, data, token):
        parent = self._pick(data, lambda s: s.computed == len(s.tokens))
        if parent is None:
            return
        sid, self.next_id = self.next_id, self.next_id + 1
        p = self.seqs[parent]
        shared = self.bm.fork(parent, sid, p.computed)
        assert shared == p.computed // PAGE * PAGE
        self.seqs[sid] = Seq(p.tokens + [token], shared)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = self._pick(data)
        self.bm.free(sid)
        del self.seqs[sid]

    # ---- invariants -------------------------------------------------------------------

    @invariant()
    def refcounts_match_owners(self):
        holders = [0] * PAGES
        for sid in self.seqs:
            table = self.bm.page_table(sid)
            assert len(set(table)) == len(table), f"sequence {sid} holds a page twice"
            for page in table:
                holders[page] += 1
        assert [self.bm.refcount(p) for p in range(PAGES)] == holders
        free = sum(1 for h in holders if h == 0)
        assert self.bm.free_pages == free
        assert self.bm.free_pages + self.bm.pages_in_use == PAGES

    @invariant()
    def computed_tokens_intact(self):
        for sid, seq in self.seqs.items():
            assert len(self.bm.page_table(sid)) >= -(-seq.computed // PAGE)
            for pos in range(seq.computed):
                page, off = divmod(self.bm.slot(sid, pos), PAGE)
                assert self.shadow[page][off] == seq.tokens[pos], (sid, pos)

    @invariant()
    def cache_hashes_match_content(self):
        cache = self.bm.cached_pages()
        for h, page in cache.items():
            parent, hh = self.bm.page_hash(page)
            assert hh == h
            assert hash_page(parent, self.shadow[page]) == h
            assert parent == ROOT_HASH or parent in cache, "orphaned cached page"
        stats = self.bm.stats()
        assert 0.0 <= stats.prefix_cache_hit_rate <= 1.0
        assert stats.cached_pages == len(cache)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
