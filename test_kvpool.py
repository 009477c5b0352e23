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


def test_removed_multi_block_entry_keeps_its_ids_without_prior_use():
    m = KVCacheManager(16 * 64)
    e = m.allocate_entry("a", 64 * 5)
    m.remove_cache_entry("a")              # blocks never read while live
    m.allocate_entry("b", 64 * 5)
    assert e.blocks.tolist() == [0, 1, 2, 3, 4]


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
                assert got.blocks.tolist() == model.entries[key][1]
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
