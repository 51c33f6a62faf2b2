"""Block pool: allocation, reference counts, prefix caching, LRU eviction."""

from __future__ import annotations

import itertools

import pytest

from rocmforge.engine.block_manager import BlockManager, hash_block_tokens
from rocmforge.engine.request import Request
from rocmforge.errors import KVCacheError
from rocmforge.sampling_params import SamplingParams

_ids = itertools.count()


def make(tokens: list[int]) -> Request:
    return Request(f"r{next(_ids)}", tokens, SamplingParams(max_tokens=8))


def admit(bm: BlockManager, req: Request, num_new: int | None = None) -> bool:
    """Admit like the scheduler does: prefix hits, allocate, compute, register."""
    hits, cached = bm.get_computed_blocks(req)
    num_new = req.num_tokens - cached if num_new is None else num_new
    if not bm.allocate_slots(req, num_new, hits):
        return False
    req.num_computed_tokens = cached + num_new
    bm.cache_full_blocks(req)
    return True


def test_allocate_and_free_counts() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make(list(range(10)))
    assert bm.allocate_slots(a, 10)
    assert len(a.block_ids) == 3 and bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    a.num_computed_tokens = 10
    assert bm.allocate_slots(a, 2)  # tokens 10, 11 still fit in block 2
    assert len(a.block_ids) == 3
    a.num_computed_tokens = 12
    assert bm.allocate_slots(a, 1)  # token 12 opens block 3
    assert len(a.block_ids) == 4 and bm.num_free_blocks == 4
    bm.check_invariants([a])
    bm.free(a)
    assert a.block_ids == [] and bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.check_invariants([a])


def test_allocation_failure_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make([1, 2, 3, 4, 5]), make([1, 2, 3, 4, 9, 9, 9, 9])
    assert admit(bm, a)  # 3 blocks, [1,2] and [3,4] cached
    before = (list(bm._free), dict(bm._cached), [blk.ref_count for blk in bm.blocks])
    # b would reuse 2 hit blocks but needs 2 more; only 1 is free.
    hits, cached = bm.get_computed_blocks(b)
    assert cached == 4
    assert not bm.allocate_slots(b, 4, hits)
    assert b.block_ids == []
    assert (list(bm._free), dict(bm._cached), [blk.ref_count for blk in bm.blocks]) == before
    bm.check_invariants([a, b])


def test_prefix_hit_shares_full_blocks() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make(list(range(10)))  # blocks [0-3] [4-7] [8,9]
    assert admit(bm, a)
    b = make(list(range(8)) + [50, 51, 52])
    hits, cached = bm.get_computed_blocks(b)
    assert hits == a.block_ids[:2] and cached == 8
    assert bm.allocate_slots(b, 3, hits)
    b.num_computed_tokens = 11
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert [bm.blocks[i].ref_count for i in a.block_ids] == [2, 2, 1]
    bm.check_invariants([a, b])
    assert bm.prefix_cache_queries == 10 + 11 and bm.prefix_cache_hits == 8
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_ids] == [1, 1, 1]
    bm.check_invariants([b])


def test_hit_leaves_at_least_one_token() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    assert admit(bm, make(list(range(8))))  # two full blocks cached
    same = make(list(range(8)))
    hits, cached = bm.get_computed_blocks(same)
    assert len(hits) == 1 and cached == 4  # the last token must be computed for logits
    longer = make(list(range(9)))
    assert bm.get_computed_blocks(longer)[1] == 8


def test_same_block_after_a_different_prefix_is_not_a_hit() -> None:
    bm = BlockManager(num_blocks=10, block_size=2)
    assert admit(bm, make([1, 2, 3, 4, 0]))
    assert bm.get_computed_blocks(make([9, 9, 3, 4, 0]))[1] == 0
    assert bm.get_computed_blocks(make([1, 2, 3, 5, 0]))[1] == 2
    after_12 = hash_block_tokens(hash_block_tokens(None, [1, 2]), [3, 4])
    assert hash_block_tokens(None, [3, 4]) != after_12


def test_partial_block_is_never_cached() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make(list(range(6)))
    assert admit(bm, a)
    assert bm.num_cached_blocks == 1
    assert bm.blocks[a.block_ids[1]].block_hash is None
    # Computing the rest of block 1 registers it.
    a.append_token(6)
    a.append_token(7)
    assert bm.allocate_slots(a, 2)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 2 and bm.blocks[a.block_ids[1]].block_hash is not None


def test_hit_on_a_free_cached_block_takes_it_back() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make([1, 2, 3, 4, 5])
    assert admit(bm, a)
    held = list(a.block_ids)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    b = make([1, 2, 3, 4, 7])
    hits, _ = bm.get_computed_blocks(b)
    assert hits == held[:2]
    assert bm.allocate_slots(b, 1, hits)
    assert [bm.blocks[i].ref_count for i in hits] == [1, 1] and bm.num_free_blocks == 1
    bm.check_invariants([b])


def test_lru_eviction_frees_tail_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make([1, 2, 3, 4, 5, 6, 7, 8])
    assert bm.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    head, b1, b2, tail = a.block_ids
    bm.free(a)
    assert list(bm._free) == [tail, b2, b1, head]  # freed in reverse: tail evicted first
    c = make([7, 7, 7])
    assert bm.allocate_slots(c, 3)  # takes the two least recently freed blocks
    assert c.block_ids == [tail, b2]
    assert bm.num_cached_blocks == 2
    d = make([1, 2, 3, 4, 5, 6, 7, 8])
    assert bm.get_computed_blocks(d) == ([head, b1], 4)  # the head of the prefix survived
    bm.check_invariants([c])


def test_duplicate_content_keeps_one_cached_copy() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = make([1, 2, 3]), make([1, 2, 4])
    for req in (a, b):  # both admitted before either registered its block
        assert bm.allocate_slots(req, 3)
    for req in (a, b):
        req.num_computed_tokens = 3
        bm.cache_full_blocks(req)
    assert bm.num_cached_blocks == 1
    assert bm.blocks[a.block_ids[0]].block_hash is not None
    assert bm.blocks[b.block_ids[0]].block_hash is None
    bm.check_invariants([a, b])


def test_reset_prefix_cache() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make([1, 2, 3])
    assert admit(bm, a)
    assert not bm.reset_prefix_cache()  # a block is in use
    assert bm.num_cached_blocks == 1
    bm.free(a)
    assert bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.get_computed_blocks(make([1, 2, 3])) == ([], 0)
    bm.check_invariants([])


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make([1, 2, 3, 4, 5])
    assert admit(bm, a)
    assert bm.num_cached_blocks == 0
    assert bm.get_computed_blocks(make([1, 2, 3, 4, 5])) == ([], 0)
    assert bm.prefix_cache_queries == 0


def test_hits_are_refused_for_a_running_request() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make([1, 2, 3])
    assert admit(bm, a)
    with pytest.raises(KVCacheError):
        bm.allocate_slots(a, 1, [a.block_ids[0]])


def test_check_invariants_detects_corruption() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make([1, 2, 3])
    assert admit(bm, a)
    bm.check_invariants([a])
    with pytest.raises(KVCacheError):
        bm.check_invariants([])  # blocks referenced by no table
    bm.blocks[a.block_ids[1]].ref_count = 2
    with pytest.raises(KVCacheError):
        bm.check_invariants([a])
