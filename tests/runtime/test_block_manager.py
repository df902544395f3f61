"""Block manager: prefix reuse, eviction order, fork, statistics."""
from __future__ import annotations

import pytest

from jaxrt.runtime.block_manager import ROOT_HASH, BlockManager, hash_page


def admit_and_compute(bm: BlockManager, sid: int, tokens: list[int]) -> int:
    """Allocate for the whole sequence and mark it computed; returns the reused tokens."""
    got = bm.allocate(sid, tokens, len(tokens))
    assert got is not None
    bm.commit(sid, tokens, len(tokens))
    return got


def test_hash_is_chained_and_stable():
    a = hash_page(ROOT_HASH, [1, 2, 3, 4])
    assert a == hash_page(ROOT_HASH, [1, 2, 3, 4])
    assert a != hash_page(ROOT_HASH, [1, 2, 3, 5])
    assert hash_page(a, [5, 6]) != hash_page(hash_page(ROOT_HASH, [9, 9, 9, 9]), [5, 6])
    # stable across processes (blake2b of int32 bytes), unlike hash()
    assert hash_page(ROOT_HASH, [1, 2]).hex() == \
        __import__("hashlib").blake2b(b"\x01\0\0\0\x02\0\0\0", digest_size=16).hexdigest()


def test_prefix_reuse_shares_full_pages():
    bm = BlockManager(16, 4)
    prompt = list(range(10))                       # pages [0..3] [4..7] [8 9]
    assert admit_and_compute(bm, 1, prompt) == 0
    table1 = bm.page_table(1)
    assert admit_and_compute(bm, 2, prompt[:8] + [50, 51, 52]) == 8
    assert bm.page_table(2)[:2] == table1[:2]
    assert bm.refcount(table1[0]) == bm.refcount(table1[1]) == 2
    assert bm.page_table(2)[2] != table1[2]
    assert bm.stats().prefix_cache_hit_rate == pytest.approx(8 / 21)


def test_last_prompt_token_is_always_computed():
    bm = BlockManager(16, 4)
    prompt = list(range(8))                        # exactly two full pages
    admit_and_compute(bm, 1, prompt)
    # the same prompt may reuse only the first page: page 2 holds its last token
    assert bm.allocate(2, prompt, 8) == 4
    assert bm.page_table(2)[0] == bm.page_table(1)[0]
    assert bm.page_table(2)[1] != bm.page_table(1)[1]
    # a longer prompt reuses both
    assert bm.allocate(3, prompt + [9], 9) == 8


def test_prefix_caching_off_reuses_nothing():
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    admit_and_compute(bm, 1, list(range(9)))
    assert bm.allocate(2, list(range(9)), 9) == 0
    assert bm.stats().cached_pages == 0


def test_freed_pages_stay_cached_until_needed():
    bm = BlockManager(4, 2)
    admit_and_compute(bm, 1, [1, 2, 3, 4, 5])      # 3 pages, 2 cached (full)
    bm.free(1)
    assert bm.free_pages == 4 and bm.stats().cached_pages == 2
    assert bm.allocate(2, [1, 2, 3, 4, 9], 5) == 4  # still there
    assert bm.stats().evictions == 0


def test_lru_eviction_leaves_before_parents():
    bm = BlockManager(6, 2)
    admit_and_compute(bm, 1, [1, 1, 2, 2, 3])      # chain A: a1 -> a2, plus a partial page
    a1, a2, _ = bm.page_table(1)
    bm.free(1)
    admit_and_compute(bm, 2, [7, 7, 8])            # chain B: b1, used after A
    b1, _ = bm.page_table(2)
    bm.free(2)
    # 3 cached idle pages (a1, a2, b1); each new sequence needs fresh pages
    order = []
    for sid, tokens in ((3, [9, 9, 9]), (4, [5, 5, 5]), (5, [6, 6, 6])):
        before = set(bm.cached_pages().values())
        assert bm.allocate(sid, tokens, 3) is not None
        order += sorted(before - set(bm.cached_pages().values()))
    # least recently used chain first, and within it the leaf (a2) before its parent (a1)
    assert order == [a2, a1, b1]
    assert bm.stats().evictions == 3


def test_eviction_skips_pages_in_use_and_parents_of_live_children():
    bm = BlockManager(4, 2)
    admit_and_compute(bm, 1, [1, 1, 2, 2, 3])      # a1 -> a2 cached, in use
    assert bm.allocate(2, [4], 1) is not None      # the last free page
    assert bm.free_pages == 0
    assert bm.allocate(3, [5], 1) is None          # nothing reclaimable: all in use
    bm.free(2)
    assert bm.allocate(3, [5], 1) is not None      # the clean page, no eviction
    assert bm.stats().evictions == 0


def test_allocate_is_atomic_when_pool_is_short():
    bm = BlockManager(3, 2)
    admit_and_compute(bm, 1, [1, 1, 2])
    before = (bm.free_pages, bm.stats())
    assert bm.allocate(2, [3, 3, 4, 4, 5], 5) is None
    assert (bm.free_pages, bm.stats()) == before and not bm.has(2)


def test_reused_idle_pages_do_not_count_as_free_for_the_rest():
    bm = BlockManager(3, 2)
    admit_and_compute(bm, 1, [1, 1, 2, 2, 3])      # 3 pages; 2 cached
    bm.free(1)
    # reuses both cached pages (idle) and needs 2 more: only 1 clean page exists
    assert bm.allocate(2, [1, 1, 2, 2, 3, 3, 4], 7) is None
    assert bm.allocate(2, [1, 1, 2, 2, 3], 5) == 4


def test_append_slots_grows_by_pages():
    bm = BlockManager(4, 4)
    assert bm.allocate(1, [1, 2, 3], 3) == 0
    assert len(bm.page_table(1)) == 1
    assert bm.append_slots(1, 4) and len(bm.page_table(1)) == 1
    assert bm.append_slots(1, 5) and len(bm.page_table(1)) == 2
    assert not bm.append_slots(1, 17)              # would need 5 pages
    assert len(bm.page_table(1)) == 2
    assert bm.slot(1, 5) == bm.page_table(1)[1] * 4 + 1


def test_fork_shares_full_pages_only():
    bm = BlockManager(8, 4)
    tokens = list(range(10))
    admit_and_compute(bm, 1, tokens)
    assert bm.fork(1, 2, 10) == 8                  # the partial page is recomputed
    t1, t2 = bm.page_table(1), bm.page_table(2)
    assert t2 == t1[:2] and all(bm.refcount(p) == 2 for p in t2)
    assert bm.refcount(t1[2]) == 1
    bm.free(1)
    assert all(bm.refcount(p) == 1 for p in t2)
    bm.free(2)
    assert bm.free_pages == 8


def test_duplicate_computation_is_deduplicated_on_commit():
    bm = BlockManager(8, 2)
    # two sequences admitted before either computed: no reuse possible
    assert bm.allocate(1, [1, 1, 2], 3) == 0
    assert bm.allocate(2, [1, 1, 3], 3) == 0
    p2 = bm.page_table(2)[0]
    bm.commit(1, [1, 1, 2], 3)
    bm.commit(2, [1, 1, 3], 3)                     # same first page: share the holder
    assert bm.page_table(2)[0] == bm.page_table(1)[0] != p2
    assert bm.refcount(bm.page_table(1)[0]) == 2 and bm.refcount(p2) == 0
    assert bm.free_pages == 8 - 3


def test_double_free_is_caught():
    bm = BlockManager(4, 2)
    bm.allocate(1, [1], 1)
    bm.free(1)
    with pytest.raises(KeyError):
        bm.free(1)


def test_lru_heap_stays_bounded_without_evictions():
    """Requests that keep reusing one cached prefix release its pages again and again; the
    heap's stale entries must not grow with the number of requests."""
    bm = BlockManager(16, 4)
    prompt = list(range(12))
    for sid in range(1, 2001):
        admit_and_compute(bm, sid, prompt + [100 + sid % 7])
        bm.free(sid)
    assert bm.stats().evictions == 0
    assert len(bm._lru) <= 2 * bm.num_pages + 16
    # and eviction order is still by last use, leaves first
    for sid in range(5000, 5004):
        assert admit_and_compute(bm, sid, [1000 + sid] * 16) == 0
    assert bm.stats().evictions > 0
