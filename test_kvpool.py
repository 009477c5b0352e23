"""Tests for kvpool. Sections follow the module: the pool, the manager's
core rules, eviction, bytes, persistence, then abuse. Every test that mutates
calls ``check_invariants()`` after each step."""

import copy
import json
import multiprocessing
import os
import pickle
import random
import subprocess
import sys
from collections import OrderedDict, deque

import numba
import numpy as np
import pytest

import kvpool
from kvpool import (CacheKey, EvictionReport, KVCacheManager, KVPoolEntry,
                    MemoryPool, PoolExhaustedError, PoolStats)

JIT = os.environ.get("NUMBA_DISABLE_JIT", "0") != "1"


def state_of(m):
    """Everything a bad call must leave unchanged."""
    return m.stats, m.pool.arena.copy(), list(m), [
        (e.block, e.n_blocks, e.size, e.pinned) for e in m.cache.values()]


# -- MemoryPool ---------------------------------------------------------------

def test_pool_geometry_drops_the_remainder():
    pool = MemoryPool(1000, 64)
    assert pool.total_blocks == 15
    assert pool.arena.shape == (960,) and pool.arena.dtype == np.uint8
    assert pool.capacity == 960
    assert (pool.free_blocks, pool.used_blocks, pool.never_used_blocks) == (15, 0, 15)


def test_pool_fifo_reuse_before_never_used():
    pool = MemoryPool(8 * 16, 16)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert (a, b, c) == (0, 1, 2)
    pool.deallocate(b)
    pool.deallocate(a)
    assert pool.allocate() == b            # oldest freed first
    assert pool.allocate() == a
    assert pool.allocate() == 3            # then never-used ids, increasing
    assert (pool.used_blocks, pool.free_blocks, pool.never_used_blocks) == (4, 4, 4)


def test_pool_exhaustion_returns_sentinel():
    pool = MemoryPool(2 * 16, 16)
    assert [pool.allocate() for _ in range(3)] == [0, 1, kvpool.NO_BLOCK]
    out = np.empty(1, np.int64)
    assert pool.allocate_n(out) == 0
    assert pool.peak_used == 2


@pytest.mark.parametrize("bad, match", [
    (99, "out of range"), (-1, "out of range"), (5, "not allocated"),
    (1, "not allocated")])
def test_pool_deallocate_refuses_and_changes_nothing(bad, match):
    pool = MemoryPool(8 * 16, 16)
    pool.allocate(), pool.allocate()
    pool.deallocate(1)                     # 1 is now free: a double free
    before = (pool.head, pool.count, pool.bump, pool.ring.copy(), pool.state.copy())
    with pytest.raises(ValueError, match=match) as info:
        pool.deallocate(bad)
    assert str(bad) in str(info.value)
    after = (pool.head, pool.count, pool.bump, pool.ring.copy(), pool.state.copy())
    assert before[:3] == after[:3]
    assert all(np.array_equal(x, y) for x, y in zip(before[3:], after[3:]))


def test_pool_batch_release_is_all_or_nothing():
    pool = MemoryPool(8 * 16, 16)
    ids = np.empty(4, np.int64)
    assert pool.allocate_n(ids) == 4 and ids.tolist() == [0, 1, 2, 3]
    dup = np.array([2, 3, 2], np.int64)
    assert pool.release_n(dup) == kvpool.ERR_DUPLICATE
    with pytest.raises(ValueError, match="block id 2 appears twice"):
        pool.deallocate_n(dup)
    assert pool.release_n(np.array([0, 9], np.int64)) == kvpool.ERR_RANGE
    assert pool.used_blocks == 4 and pool.count == 0
    assert pool.release_n(np.array([3, 1], np.int64)) == kvpool.OK
    assert pool.release(3) == kvpool.ERR_NOT_ALLOCATED
    out = np.empty(3, np.int64)
    assert pool.allocate_n(out) == 3 and out.tolist() == [3, 1, 4]


def test_pool_block_api_cannot_free_an_entry_block():
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entry("a", 40)
    assert m.pool.release(1) == kvpool.ERR_IN_ENTRY
    with pytest.raises(ValueError, match="belongs to a cache entry"):
        m.pool.deallocate(0)
    m.check_invariants()


def test_pool_over_a_given_arena_shares_memory():
    buf = np.zeros(100, np.uint8)
    pool = MemoryPool(100, 32, buf)
    assert pool.total_blocks == 3
    pool.arena[5] = 7
    assert buf[5] == 7


@pytest.mark.parametrize("total, bs", [(10, 0), (10, -4), (10, 16)])
def test_pool_rejects_bad_geometry(total, bs):
    with pytest.raises(ValueError):
        MemoryPool(total, bs)


@numba.njit
def _compiled_churn(pool, rounds):
    """Allocate and free in a compiled loop; the ids seen, summed."""
    total = 0
    for i in range(rounds):
        b = pool.allocate()
        if b == kvpool.NO_BLOCK:
            return -1
        total += b
        if pool.release(b) != kvpool.OK:
            return -2
    out = np.empty(3, np.int64)
    if pool.allocate_n(out) != 3 or pool.release_n(out) != kvpool.OK:
        return -3
    return total


def test_pool_from_user_njit_code():
    m = KVCacheManager(4 * 16, 16)
    m.allocate_entry("x", 16)              # block 0 stays an entry's
    # Ring is empty, so block 1 is bumped, freed, then reused every round.
    assert _compiled_churn(m.pool, 1000) == 1000
    assert m.pool.free_blocks == 3 and m.pool.peak_used == 4
    m.check_invariants()


def test_pool_chain_api_from_njit():
    @numba.njit
    def grow_then_free(pool):
        head = pool.alloc_chain(2, True)
        if pool.resize_chain(head, 2, 3, 0, True) != kvpool.OK:
            return -1
        ids = pool.chain_blocks(head, 3)
        if pool.free_chain(head, 3) != kvpool.OK:
            return -2
        return ids[0] * 100 + ids[1] * 10 + ids[2]

    pool = MemoryPool(4 * 16, 16)
    assert grow_then_free(pool) == 12      # blocks 0, 1, 2 in order
    assert pool.free_chain(0, 3) == kvpool.ERR_BAD_CHAIN
    assert pool.count == 3


# -- KVCacheManager: the original design's tests, with their numbers -------------

def test_evict_returns_block_to_pool():
    manager = KVCacheManager(1024)
    key1, key2 = CacheKey("test", 1), CacheKey("test2", 2)
    entry1 = manager.allocate_entry(key1, 64)
    block_id = entry1.block
    assert manager.stats.active_entries == 1
    assert manager.stats.evictions == 0
    manager.check_invariants()
    evicted = manager.remove_cache_entry(key1)
    assert evicted is entry1
    assert manager.stats.active_entries == 0
    assert manager.stats.evictions == 1
    manager.check_invariants()
    entry2 = manager.allocate_entry(key2, 64)
    assert entry2.block == block_id
    assert manager.stats.active_entries == 1
    assert manager.stats.evictions == 1
    manager.check_invariants()


def test_evict_nonexistent_key_returns_none():
    manager = KVCacheManager(1024)
    before = manager.stats
    assert manager.remove_cache_entry(CacheKey("nonexistent", 999)) is None
    assert manager.stats == before
    assert manager.stats.evictions == 0 and manager.stats.active_entries == 0
    manager.check_invariants()


def test_multiple_evictions_stats_consistency():
    manager = KVCacheManager(2048)
    keys = [CacheKey("test", i) for i in range(5)]
    for key in keys:
        manager.allocate_entry(key, 128)
        manager.check_invariants()
    assert manager.stats.active_entries == 5
    for i, key in enumerate(keys):
        manager.remove_cache_entry(key)
        assert manager.stats.evictions == i + 1
        assert manager.stats.active_entries == 4 - i
        manager.check_invariants()
    assert manager.stats.evictions == 5
    assert manager.stats.active_entries == 0
    assert len(manager.cache) == 0


def test_allocate_evict_reallocate_cycle():
    manager = KVCacheManager(512)
    keys = [CacheKey("fill", i) for i in range(8)]
    for key in keys:
        manager.allocate_entry(key, 64)
    assert manager.stats.free_blocks == 0
    for key in keys[:4]:
        manager.remove_cache_entry(key)
        manager.check_invariants()
    for i in range(4):
        manager.allocate_entry(CacheKey("new", i), 64)
        manager.check_invariants()
    s = manager.stats
    assert (s.allocations, s.evictions, s.active_entries) == (12, 4, 8)


# -- KVCacheManager: entries, stats, asserts -------------------------------------

def test_entry_blocks_follow_pool_order_and_are_read_only():
    m = KVCacheManager(16 * 64)
    a = m.allocate_entry("a", 130)         # 3 blocks
    assert a.blocks.tolist() == [0, 1, 2] and a.blocks[0] == a.block
    assert a.n_blocks == 3 and a.size == 130 and a.key == "a"
    with pytest.raises(ValueError):
        a.blocks[0] = 5
    m.allocate_entry("b", 64)
    m.remove_cache_entry("a")
    c = m.allocate_entry("c", 200)         # reuses 0, 1, 2 in freed order, then 4
    assert c.blocks.tolist() == [0, 1, 2, 4]
    assert a.blocks.tolist() == [0, 1, 2]  # a removed entry keeps its ids
    m.check_invariants()


def test_removed_entry_blocks_only_if_read_while_live():
    m = KVCacheManager(16 * 64)
    e = m.allocate_entry("a", 64 * 5)
    one = m.allocate_entry("b", 64)
    m.remove_cache_entry("a")              # blocks never read while live
    m.remove_cache_entry("b")
    m.allocate_entry("c", 64 * 5)
    assert (e.block, e.n_blocks, e.size, e.key) == (0, 5, 320, "a")
    with pytest.raises(ValueError, match="'a' was removed before its blocks were read"):
        e.blocks
    assert one.blocks.tolist() == [5]      # one block: known from .block


def test_stats_fields_and_fragmentation():
    m = KVCacheManager(10 * 64 + 5, 64)
    s = m.stats
    assert s.total_capacity == 640 and s.total_blocks == 10 and s.block_size == 64
    assert s.fragmentation == 0.0 and s.used_blocks == 0 and s.free_blocks == 10
    m.allocate_entry("a", 100)             # 2 blocks, 28 bytes unused
    m.allocate_entry("b", 64)
    s = m.get_stats()
    assert (s.used_memory, s.used_blocks, s.free_blocks) == (164, 3, 7)
    assert s.fragmentation == pytest.approx(1 - 164 / 192)
    assert s.peak_used_blocks == 3
    m.remove_cache_entry("a")
    s = m.stats
    assert (s.used_blocks, s.peak_used_blocks, s.fragmentation) == (1, 3, 0.0)
    assert isinstance(s, PoolStats) and s.to_dict()["used_memory"] == 64
    m.check_invariants()


def test_stats_is_a_snapshot():
    m = KVCacheManager(1024)
    s = m.get_stats()
    m.allocate_entry("a", 10)
    assert s.active_entries == 0 and m.stats.active_entries == 1
    with pytest.raises(Exception):
        s.active_entries = 3


def test_cache_key_is_frozen_ordered_hashable():
    k = CacheKey("seq", 3)
    assert k == CacheKey("seq", 3) and hash(k) == hash(CacheKey("seq", 3))
    assert sorted([CacheKey("b", 1), CacheKey("a", 2), CacheKey("a", 1)]) == [
        CacheKey("a", 1), CacheKey("a", 2), CacheKey("b", 1)]
    assert repr(k) == "CacheKey(name='seq', id=3)"
    with pytest.raises(Exception):
        k.id = 4
    with pytest.raises(TypeError):
        CacheKey("x", 1.5)
    with pytest.raises(TypeError):
        CacheKey(1, 1)


def test_any_hashable_key_and_numpy_sizes():
    m = KVCacheManager(1024)
    m.allocate_entry(("layer", 3), np.int64(65))
    m.allocate_entry(7, np.uint8(1))
    assert m[("layer", 3)].n_blocks == 2 and m[7].n_blocks == 1
    m.check_invariants()


def test_consistency_asserts_fire_on_divergence():
    if not __debug__:
        pytest.skip("asserts are off under python -O")
    m = KVCacheManager(1024)
    m.allocate_entry("a", 10)
    m._active_entries += 1                 # diverge on purpose
    with pytest.raises(AssertionError, match=r"active_entries=2 != len\(cache\)=1"):
        m.get_stats()
    with pytest.raises(AssertionError, match="active_entries=3"):
        m.allocate_entry("b", 10)


# -- bad input: a clear error, and nothing changed -------------------------------

@pytest.mark.parametrize("size, exc, match", [
    (0, ValueError, "must be positive, got 0"),
    (-5, ValueError, "must be positive, got -5"),
    (True, TypeError, "bool True"),
    (1.0, TypeError, "1.0"),
    ("8", TypeError, "'8'"),
    (None, TypeError, "None"),
    (1025, ValueError, "exceeds the pool's total capacity of 1024 bytes"),
    (2 ** 64, ValueError, str(2 ** 64)),
])
def test_allocate_entry_bad_size(size, exc, match):
    m = KVCacheManager(1024)
    m.allocate_entry("live", 100)
    before = state_of(m)
    with pytest.raises(exc, match=match):
        m.allocate_entry("new", size)
    assert state_of(m)[0] == before[0] and "new" not in m
    m.check_invariants()


def test_allocate_entry_exhausted_says_needed_and_free():
    m = KVCacheManager(4 * 64)
    m.allocate_entry("a", 64 * 3)
    before = m.stats
    with pytest.raises(PoolExhaustedError, match="need 2 blocks but only 1 are free") as info:
        m.allocate_entry("b", 65)
    assert isinstance(info.value, MemoryError)
    assert (info.value.needed, info.value.free) == (2, 1)
    assert m.stats == before
    m.check_invariants()


def test_allocate_entry_live_key_keeps_old_entry():
    m = KVCacheManager(1024)
    old = m.allocate_entry(CacheKey("k", 1), 10)
    before = m.stats
    with pytest.raises(KeyError, match=r"CacheKey\(name='k', id=1\) is already live"):
        m.allocate_entry(CacheKey("k", 1), 20)
    assert m.peek(CacheKey("k", 1)) is old and m.stats == before
    m.check_invariants()


def test_unhashable_key_is_a_type_error():
    m = KVCacheManager(1024)
    for call in (lambda: m.allocate_entry([1], 10), lambda: m.remove_cache_entry([1]),
                 lambda: m[[1]], lambda: [1] in m, lambda: m.peek([1])):
        with pytest.raises(TypeError, match=r"\[1\]"):
            call()
    assert m.stats.allocations == 0
    m.check_invariants()


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((10,), {}, ValueError, "smaller than one block"),
    ((1024, 0), {}, ValueError, "block_size must be positive, got 0"),
    ((1024, -64), {}, ValueError, "got -64"),
    ((1024, 64.0), {}, TypeError, "64.0"),
    ((1024.0,), {}, TypeError, "1024.0"),
    ((1024, True), {}, TypeError, "bool"),
    ((1024,), {"eviction": "fifo"}, ValueError, r"\('none', 'lru'\).*'fifo'"),
    ((1024,), {"zero_on_alloc": 1}, TypeError, "zero_on_alloc"),
    ((1024,), {"on_evict": 3}, TypeError, "callable"),
])
def test_constructor_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        KVCacheManager(*args, **kwargs)


# -- randomized: the manager against a pure-Python model -------------------------

class Model:
    """The documented rules in plain Python: FIFO ring + bump, LRU order."""

    def __init__(self, total_blocks, bs, lru):
        self.total, self.bs, self.lru = total_blocks, bs, lru
        self.ring, self.bump = deque(), 0
        self.entries = OrderedDict()         # key -> [size, blocks, pinned]
        self.allocations = self.evictions = self.lru_evictions = 0

    def free(self):
        return len(self.ring) + self.total - self.bump

    def take(self, n):
        out = []
        for _ in range(n):
            if self.ring:
                out.append(self.ring.popleft())
            else:
                out.append(self.bump)
                self.bump += 1
        return out

    def make_room(self, need, keep=None):
        victims, free = [], self.free()
        if self.lru:
            for k, (size, blocks, pinned) in self.entries.items():
                if free >= need:
                    break
                if not pinned and k != keep:
                    victims.append(k)
                    free += len(blocks)
        if free < need:
            return False
        for k in victims:
            self.ring.extend(self.entries.pop(k)[1])
            self.evictions += 1
            self.lru_evictions += 1
        return True

    def allocate(self, key, size):
        n = -(-size // self.bs)
        if n > self.free() and not self.make_room(n):
            return None
        self.entries[key] = [size, self.take(n), False]
        self.allocations += 1
        return self.entries[key][1]

    def remove(self, key):
        size, blocks, pinned = self.entries.pop(key)
        self.ring.extend(blocks)
        self.evictions += 1

    def resize(self, key, size):
        n_new = -(-size // self.bs)
        entry = self.entries[key]
        n_old = len(entry[1])
        if n_new - n_old > self.free() and not self.make_room(n_new - n_old, key):
            return False
        if n_new > n_old:
            entry[1] += self.take(n_new - n_old)
        else:
            self.ring.extend(entry[1][n_new:])
            del entry[1][n_new:]
        entry[0] = size
        self.entries.move_to_end(key)
        return True


@pytest.mark.parametrize("eviction", ["none", "lru"])
def test_random_operations_match_the_model(eviction):
    rng = random.Random(1234)
    bs, nb = 16, 12
    m = KVCacheManager(bs * nb, bs, eviction=eviction)
    model = Model(nb, bs, eviction == "lru")
    for step in range(3000):
        op = rng.random()
        key = rng.randrange(10)
        if op < 0.45:
            size = rng.randint(1, bs * 5)
            if key in model.entries:
                with pytest.raises(KeyError):
                    m.allocate_entry(key, size)
            else:
                expected = model.allocate(key, size)
                if expected is None:
                    with pytest.raises(PoolExhaustedError):
                        m.allocate_entry(key, size)
                else:
                    assert m.allocate_entry(key, size).blocks.tolist() == expected
        elif op < 0.7:
            got = m.remove_cache_entry(key)
            if key in model.entries:
                assert (got.block, got.n_blocks) == (model.entries[key][1][0],
                                                     len(model.entries[key][1]))
                model.remove(key)
            else:
                assert got is None
        elif op < 0.85 and key in model.entries:
            size = rng.randint(1, bs * 5)
            if model.resize(key, size):
                assert m.resize_entry(key, size).blocks.tolist() == model.entries[key][1]
            else:
                with pytest.raises(PoolExhaustedError):
                    m.resize_entry(key, size)
        elif op < 0.95 and key in model.entries:
            assert m[key].key == key
            model.entries.move_to_end(key)
        elif key in model.entries:
            m.pin(key) if rng.random() < 0.5 else m.unpin(key)
            model.entries[key][2] = m.peek(key).pinned
        assert list(m) == list(model.entries)
        for k, (size, blocks, pinned) in model.entries.items():
            e = m.peek(k)
            assert (e.size, e.blocks.tolist()) == (size, blocks)
        s = m.stats
        used = sum(len(b) for _, b, _ in model.entries.values())
        assert (s.allocations, s.evictions, s.lru_evictions) == (
            model.allocations, model.evictions, model.lru_evictions)
        assert (s.used_blocks, s.free_blocks) == (used, model.free())
        assert s.used_memory == sum(v[0] for v in model.entries.values())
        m.check_invariants()


# -- eviction: LRU, pins, lookups, resize, reports -------------------------------

def lru_manager(blocks=4, bs=16, **kw):
    return KVCacheManager(blocks * bs, bs, eviction="lru", **kw)


def test_lru_order_over_mixed_lookups():
    m = lru_manager(4)
    for k in "abcd":
        m.allocate_entry(k, 16)
    m["a"]
    m.get("b")
    m.touch("c")
    m.peek("d")                            # no recency change
    "d" in m
    assert list(m) == ["d", "a", "b", "c"]
    m.allocate_entry("e", 32)              # evicts d, then a
    assert list(m) == ["b", "c", "e"]
    assert m.peek("e").blocks.tolist() == [3, 0]   # freed order: d's, then a's
    s = m.stats
    assert (s.lru_evictions, s.evictions, s.manual_evictions) == (2, 2, 0)
    m.check_invariants()


def test_lru_respects_pins_and_is_all_or_nothing():
    m = lru_manager(4)
    for k in "abcd":
        m.allocate_entry(k, 16)
    m.pin("a"), m.pin("b"), m.pin("c")
    assert m.stats.pinned_entries == 3
    m.allocate_entry("e", 16)              # only d is evictable
    assert list(m) == ["a", "b", "c", "e"]
    m.pin("e")
    before = state_of(m)
    with pytest.raises(PoolExhaustedError):
        m.allocate_entry("f", 16)          # only pinned entries remain
    assert state_of(m)[0] == before[0] and list(m) == before[2]
    m.unpin("b")
    with pytest.raises(PoolExhaustedError, match="need 2 blocks but only 0"):
        m.allocate_entry("f", 32)          # b alone is not enough: keep b
    assert "b" in m and m.stats.evictions == 1
    m.unpin_all()
    assert m.stats.pinned_entries == 0
    m.allocate_entry("f", 32)              # now a and b go, LRU first
    assert list(m) == ["c", "e", "f"]
    assert m.remove_cache_entry("c").key == "c"   # pinned or not, removable
    m.check_invariants()


def test_pin_unknown_key_is_key_error():
    m = lru_manager()
    for call in (m.pin, m.unpin, m.touch):
        with pytest.raises(KeyError, match="'nope'"):
            call("nope")


def test_eviction_policy_none_raises_instead_of_evicting():
    m = KVCacheManager(2 * 16, 16)
    m.allocate_entry("a", 32)
    with pytest.raises(PoolExhaustedError):
        m.allocate_entry("b", 1)
    assert "a" in m and m.eviction == "none"


def test_mapping_face_hits_and_misses():
    m = lru_manager(8)
    m.allocate_entry("a", 10)
    assert m["a"].size == 10 and m.get("a").size == 10
    assert m.get("zz") is None and m.get("zz", 5) == 5
    with pytest.raises(KeyError, match="no live entry for key 'zz'"):
        m["zz"]
    m.peek("a"), m.peek("zz"), "a" in m
    s = m.stats
    assert (s.hits, s.misses) == (2, 3)
    assert len(m) == 1 and list(m) == ["a"] and dict(m.cache) == {"a": m.peek("a")}
    with pytest.raises(TypeError):
        m.cache["b"] = 1


def test_resize_keeps_ids_and_bytes_across_boundaries():
    m = lru_manager(8)
    m.allocate_entry("a", 20)
    m.allocate_entry("b", 16)
    m.write("a", bytes(range(1, 21)))
    e = m.resize_entry("a", 40)            # 2 -> 3 blocks: appends block 3
    assert e.blocks.tolist() == [0, 1, 3] and e.size == 40
    assert m.read("a").tolist() == list(range(1, 21)) + [0] * 20
    m.resize_entry("a", 41)                # still 3 blocks
    assert m.peek("a").blocks.tolist() == [0, 1, 3]
    m.resize_entry("a", 5)                 # shrink: 1 and 3 freed, in order
    assert m.peek("a").blocks.tolist() == [0] and m.stats.used_memory == 21
    assert m.read("a").tolist() == [1, 2, 3, 4, 5]
    m.resize_entry("a", 16)                # the cut-off bytes read as zeros
    assert m.read("a").tolist() == [1, 2, 3, 4, 5] + [0] * 11
    assert m.allocate_entry("c", 32).blocks.tolist() == [1, 3]
    m.check_invariants()


def test_resize_evicts_others_never_itself_and_fails_cleanly():
    m = lru_manager(4)
    m.allocate_entry("a", 16)
    m.allocate_entry("b", 16)
    m.allocate_entry("c", 16)
    m.touch("a")                           # order: b, c, a
    m.resize_entry("a", 48)                # needs 2 more: evict b, reuse 1, then 3
    assert list(m) == ["c", "a"] and m.peek("a").blocks.tolist() == [0, 1, 3]
    m.pin("c")
    before = state_of(m)
    with pytest.raises(PoolExhaustedError):
        m.resize_entry("a", 64)            # only pinned c could make room
    assert state_of(m)[0] == before[0] and m.peek("a").size == 48
    with pytest.raises(ValueError, match="new_size must be positive"):
        m.resize_entry("a", 0)
    with pytest.raises(KeyError):
        m.resize_entry("zz", 5)
    m.check_invariants()


def test_clear_and_reset_stats():
    m = lru_manager(8)
    for k in "abc":
        m.allocate_entry(k, 20)
    m.pin("a")
    m["a"], m.get("q")
    m.clear()
    s = m.stats
    assert len(m) == 0 and (s.clear_evictions, s.evictions, s.pinned_entries) == (3, 3, 0)
    assert s.free_blocks == 8 and s.peak_used_blocks == 6
    m.allocate_entry("d", 5)
    m.reset_stats()
    s = m.stats
    assert (s.allocations, s.evictions, s.hits, s.misses) == (0, 0, 0, 0)
    assert (s.active_entries, s.used_memory, s.peak_used_blocks) == (1, 5, 1)
    m.check_invariants()


def test_eviction_reports_fields_and_json():
    reports = []
    m = lru_manager(4, on_evict=reports.append)
    m.allocate_entry(CacheKey("s", 1), 40)  # blocks 0, 1, 2
    m.allocate_entry("b", 16)
    m.allocate_entry("c", 32)               # evicts the CacheKey entry
    (r,) = reports
    assert isinstance(r, EvictionReport)
    assert (r.key, r.reason, r.size, r.blocks) == (CacheKey("s", 1), "lru", 40, (0, 1, 2))
    assert (r.blocks_freed, r.bytes_freed) == (3, 48)
    assert r.stats_before.used_blocks == 4 and r.stats_after.used_blocks == 1
    assert r.stats_after.lru_evictions == r.stats_before.lru_evictions + 1
    assert r.stats_after.active_entries == 1
    d = json.loads(json.dumps(r.to_dict()))
    assert d["key"] == {"name": "s", "id": 1} and d["blocks"] == [0, 1, 2]
    assert d["stats_after"]["evictions"] == 1
    m.remove_cache_entries(["b", "c"])
    assert [(x.key, x.reason) for x in reports[1:]] == [("b", "manual"), ("c", "manual")]
    assert reports[1].stats_after == reports[2].stats_before
    assert reports[2].stats_after == m.stats
    assert reports[1].timestamp <= reports[2].timestamp
    m.check_invariants()


def test_raising_listener_leaves_a_consistent_manager():
    seen = []
    m = lru_manager(2)

    def boom(report):
        raise RuntimeError(f"listener saw {report.key}")

    m.add_eviction_listener(boom)
    m.add_eviction_listener(seen.append)
    m.allocate_entry("a", 32)
    with pytest.raises(RuntimeError, match="listener saw a"):
        m.allocate_entry("b", 32)
    assert list(m) == ["b"] and [r.key for r in seen] == ["a"]
    assert m.stats.used_blocks == 2
    m.check_invariants()
    m.remove_eviction_listener(boom)
    m.remove_cache_entry("b")
    assert [r.key for r in seen] == ["a", "b"]
    with pytest.raises(ValueError, match="not a registered listener"):
        m.remove_eviction_listener(boom)
    with pytest.raises(TypeError):
        m.add_eviction_listener(42)


def test_batch_allocate_and_remove():
    m = lru_manager(8)
    es = m.allocate_entries(["a", "b", "c"], [16, 40, 1])
    assert [e.blocks.tolist() for e in es] == [[0], [1, 2, 3], [4]]
    before = state_of(m)
    for keys, sizes, exc in ((["d", "d"], [1, 1], KeyError), (["d", "a"], [1, 1], KeyError),
                             (["d", "e"], [1, 0], ValueError), (["d"], [1, 2], ValueError),
                             (["d", [2]], [1, 1], TypeError)):
        with pytest.raises(exc):
            m.allocate_entries(keys, sizes)
        assert state_of(m)[0] == before[0]
    got = m.remove_cache_entries(["b", "zz", "a", "b"])
    assert [g and g.key for g in got] == ["b", None, "a", None]
    assert m.stats.manual_evictions == 2
    es = m.allocate_entries(["x", "y"], [64, 16])     # reuses 1,2,3,0 in order
    assert [e.blocks.tolist() for e in es] == [[1, 2, 3, 0], [5]]
    es = m.allocate_entries(["p", "q"], [64, 16])     # evicts c (LRU), then x
    assert "c" not in m and "x" not in m and m.stats.lru_evictions == 2
    assert m.allocate_entries([], []) == []
    m.check_invariants()
    with pytest.raises(PoolExhaustedError):
        KVCacheManager(64, 16).allocate_entries(["a", "b"], [48, 32])


# -- bytes ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float16, np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 8, 13])
def test_write_read_round_trip_across_blocks(dtype, offset):
    m = KVCacheManager(64 * 16, 16)
    m.allocate_entry("a", 200)
    data = (np.arange(20) * 3 + 1).astype(dtype)
    m.write("a", data, offset=offset)
    back = m.read("a", dtype=dtype, offset=offset, count=20)
    assert back.dtype == dtype and np.array_equal(back, data)
    raw = m.read("a")
    assert raw[:offset].tolist() == [0] * offset
    assert raw[offset:offset + data.nbytes].tobytes() == data.tobytes()
    m.check_invariants()


def test_write_accepts_buffers_and_non_contiguous_arrays():
    m = KVCacheManager(1024, 16)
    m.allocate_entry("a", 64)
    m.write("a", b"\x01\x02")
    m.write("a", bytearray(b"\x03"), offset=2)
    m.write("a", memoryview(b"\x04\x05"), offset=3)
    m.write("a", np.arange(10, dtype=np.uint8)[::2], offset=5)
    ro = np.full(2, 9, np.uint8)
    ro.flags.writeable = False
    m.write("a", ro, offset=10)
    assert m.read("a", count=12).tolist() == [1, 2, 3, 4, 5, 0, 2, 4, 6, 8, 9, 9]


@pytest.mark.parametrize("call, exc, match", [
    (lambda m: m.write("a", b"x" * 41), ValueError, "41 bytes at offset 0"),
    (lambda m: m.write("a", b"x", offset=40), ValueError, "offset 40"),
    (lambda m: m.write("a", b"x", offset=-1), ValueError, "offset -1"),
    (lambda m: m.write("a", b"x", offset=1.0), TypeError, "1.0"),
    (lambda m: m.write("a", "text"), TypeError, "str"),
    (lambda m: m.write("a", np.array([None])), TypeError, "object"),
    (lambda m: m.write("zz", b"x"), KeyError, "'zz'"),
    (lambda m: m.read("a", dtype="S3"), ValueError, "40 bytes from offset 0"),
    (lambda m: m.read("a", dtype=np.float32, offset=2), ValueError, "38 bytes"),
    (lambda m: m.read("a", count=41), ValueError, "41 bytes"),
    (lambda m: m.read("a", count=-2), ValueError, "-2"),
    (lambda m: m.read("a", offset=41), ValueError, "offset 41"),
    (lambda m: m.read("a", dtype=object), TypeError, "object"),
    (lambda m: m.block_view(64), ValueError, "block id 64"),
    (lambda m: m.block_view(-1), ValueError, "block id -1"),
])
def test_bytes_bad_calls_change_nothing(call, exc, match):
    m = KVCacheManager(1024, 16)
    m.allocate_entry("a", 40)
    m.write("a", np.arange(40, dtype=np.uint8))
    before = state_of(m)
    with pytest.raises(exc, match=match):
        call(m)
    after = state_of(m)
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    m.check_invariants()


def test_views_alias_the_arena():
    m = KVCacheManager(1024, 16)
    m.allocate_entry("x", 16)
    m.allocate_entry("a", 40)              # blocks 1, 2, 3
    vs = m.views("a")
    assert [v.shape[0] for v in vs] == [16, 16, 8]
    vs[1][:] = 7
    assert m.read("a", offset=16, count=16).tolist() == [7] * 16
    bv = m.block_view(np.int64(3))
    bv[0] = 5
    assert vs[2][0] == 5 and m.pool.arena[48] == 5


@pytest.mark.parametrize("zero", [True, False])
def test_reused_blocks_read_as_zeros_only_with_zeroing(zero):
    m = KVCacheManager(4 * 16, 16, zero_on_alloc=zero)
    m.allocate_entry("a", 64)
    m.write("a", np.full(64, 0xAB, np.uint8))
    m.remove_cache_entry("a")
    m.allocate_entry("b", 30)
    expected = [0] * 30 if zero else [0xAB] * 30
    assert m.read("b").tolist() == expected
    m.resize_entry("b", 60)
    assert m.read("b", offset=30).tolist() == ([0] * 30 if zero else [0xAB] * 30)


def test_memmap_arena(tmp_path):
    path = tmp_path / "arena.bin"
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(1000,))
    m = KVCacheManager(1000, 64, buffer=mm)
    m.allocate_entry("a", 10)
    m.write("a", b"persisted!")
    mm.flush()
    assert path.read_bytes()[:10] == b"persisted!"
    assert m.stats.total_blocks == 15
    m.check_invariants()


@pytest.mark.parametrize("buffer, exc, match", [
    (b"x" * 100, TypeError, "bytes"),
    (np.zeros(100, np.int8), TypeError, "int8"),
    (np.zeros((10, 20), np.uint8)[:, ::2], ValueError, "C-contiguous"),
    (np.zeros(10, np.uint8), ValueError, "10 bytes, fewer than total_size 100"),
])
def test_bad_buffers(buffer, exc, match):
    with pytest.raises(exc, match=match):
        KVCacheManager(100, 10, buffer=buffer)
    ro = np.zeros(100, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        KVCacheManager(100, 10, buffer=ro)


def _read_shared(name, size, q):
    from multiprocessing import shared_memory
    shm = shared_memory.SharedMemory(name=name)
    q.put(bytes(shm.buf[:size]))
    shm.close()


def test_shared_memory_arena_read_by_another_process():
    from multiprocessing import shared_memory
    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        arena = np.ndarray((4096,), np.uint8, buffer=shm.buf)
        m = KVCacheManager(4096, 64, buffer=arena)
        e = m.allocate_entry("a", 100)
        m.write("a", b"hello from the pool")
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_read_shared, args=(shm.name, 4096, q))
        p.start()
        seen = q.get(timeout=60)
        p.join(60)
        start = e.block * 64
        assert seen[start:start + 19] == b"hello from the pool"
        del m, arena, e
    finally:
        shm.close()
        shm.unlink()


# -- persistence ------------------------------------------------------------------

def busy_manager():
    m = lru_manager(16, on_evict=lambda r: None)
    keys = [CacheKey("s", 1), "str", 7, b"raw", ("t", 1, (b"x", CacheKey("n", 2)))]
    for i, k in enumerate(keys):
        m.allocate_entry(k, 10 + 9 * i)
        m.write(k, np.full(10, i + 1, np.uint8))
    m.remove_cache_entry("str")
    m.pin(7)
    m[CacheKey("s", 1)], m.get("missing")
    m.pool.allocate()                      # a HELD block survives too
    return m


def same_future(a, b):
    """The next allocations give the same ids, bytes and stats."""
    for m in (a, b):
        m.allocate_entry("next1", 50)
        m.allocate_entry("next2", 100)
    assert [e.blocks.tolist() for e in a.cache.values()] == [
        e.blocks.tolist() for e in b.cache.values()]
    assert a.stats == b.stats and a == b


def test_save_load_round_trip(tmp_path):
    m = busy_manager()
    m.save(tmp_path / "snap.npz")
    back = KVCacheManager.load(tmp_path / "snap.npz")
    assert back == m and back.stats == m.stats and list(back) == list(m)
    assert back.peek(7).pinned and back.eviction == "lru"
    assert back.read(b"raw", count=10).tolist() == [4] * 10   # read is a use:
    assert m.read(b"raw", count=10).tolist() == [4] * 10      # in both
    back.check_invariants()
    same_future(m, back)
    assert os.listdir(tmp_path) == ["snap.npz"]


def test_pickle_and_deepcopy_round_trip():
    m = busy_manager()
    for other in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert other == m and other.stats == m.stats
        other.check_invariants()
        same_future(copy.deepcopy(m), other)


def test_save_refuses_unsavable_keys_and_writes_nothing(tmp_path):
    m = KVCacheManager(1024)
    m.allocate_entry(frozenset({1}), 10)
    with pytest.raises(TypeError, match=r"frozenset\(\{1\}\)"):
        m.save(tmp_path / "x.npz")
    assert os.listdir(tmp_path) == []


def test_interrupted_save_keeps_the_earlier_snapshot(tmp_path, monkeypatch):
    m = busy_manager()
    m.save(tmp_path / "snap.npz")
    good = (tmp_path / "snap.npz").read_bytes()
    m.allocate_entry("later", 10)

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(kvpool.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        m.save(tmp_path / "snap.npz")
    assert (tmp_path / "snap.npz").read_bytes() == good
    assert os.listdir(tmp_path) == ["snap.npz"]
    monkeypatch.undo()
    assert "later" not in KVCacheManager.load(tmp_path / "snap.npz")
    m.check_invariants()


def tamper(path, **changes):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes())
    for k, v in changes.items():
        if k in meta:
            meta[k] = v
        else:
            arrays[k] = v
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)


@pytest.mark.parametrize("changes, match", [
    ({"format": 99}, "format 99"),
    ({"count": 3}, "inconsistent snapshot"),
    ({"bump": 0}, "inconsistent snapshot"),
    ({"head": 10 ** 6}, "inconsistent snapshot"),
    ({"link": np.full(16, -1, np.int64)}, "inconsistent snapshot"),
    ({"ring": np.zeros(3, np.int64)}, "array 'ring'"),
    ({"sizes": np.array([1, 2], np.int64)}, "inconsistent snapshot"),
    ({"total_blocks": 10 ** 12}, "do not match an arena"),
    ({"keys": [{"set": 1}] * 4}, "malformed key"),
])
def test_tampered_snapshots_are_rejected(tmp_path, changes, match):
    path = tmp_path / "snap.npz"
    busy_manager().save(path)
    tamper(path, **changes)
    with pytest.raises(ValueError, match=match):
        KVCacheManager.load(path)


def test_truncated_and_foreign_files_are_rejected(tmp_path):
    path = tmp_path / "snap.npz"
    busy_manager().save(path)
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    np.save(tmp_path / "plain.npy", np.zeros(3))
    (tmp_path / "text.npz").write_text("hello")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    for name in ("cut.npz", "plain.npy", "text.npz", "other.npz"):
        with pytest.raises(ValueError, match="not a readable kvpool snapshot"):
            KVCacheManager.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        KVCacheManager.load(tmp_path / "absent.npz")


# -- the README's examples run as written -----------------------------------------

def readme_blocks():
    text = open(os.path.join(os.path.dirname(__file__), "README.md")).read()
    return [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]


def test_readme_examples_run():
    blocks = readme_blocks()
    assert len(blocks) == 3
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README block {i}", "exec"), namespace)
    assert namespace["simulate"](namespace["pool"], 10) == 1   # FIFO: 0 is held


def test_import_compiles_nothing():
    code = ("import sys, kvpool; "
            "print(any(m.startswith('numba.core.compiler') and "
            "'kvpool' in str(getattr(sys.modules[m], '__file__', '')) for m in sys.modules)); "
            "ct = getattr(kvpool.MemoryPool, 'class_type', None); "
            "print(0 if ct is None else sum(len(d.overloads) for d in ct.jit_methods.values()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.stdout.split()[-1] == "0"


def test_bytes_over_a_scattered_chain_match_the_views():
    m = KVCacheManager(16 * 16, 16)
    for k in range(8):
        m.allocate_entry(k, 16)
    for k in (5, 2, 3, 7):                 # frees 5, 2, 3, 7 in that order
        m.remove_cache_entry(k)
    e = m.allocate_entry("s", 16 * 6)      # blocks 5, 2, 3, 7, 8, 9: runs of 1, 2, 3
    assert e.blocks.tolist() == [5, 2, 3, 7, 8, 9]
    data = np.random.default_rng(3).integers(0, 256, 90, np.uint8)
    m.write("s", data, offset=3)
    joined = np.concatenate(m.views("s"))
    assert np.array_equal(joined[3:93], data)
    assert np.array_equal(m.read("s", offset=3, count=90), data)
    for offset, count in ((0, 96), (15, 2), (17, 40), (47, 49)):
        assert np.array_equal(m.read("s", offset=offset, count=count),
                              joined[offset:offset + count])
    m.check_invariants()
