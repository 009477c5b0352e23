"""kvpool: a KV-cache memory pool over one preallocated byte arena.

A ``MemoryPool`` (a numba jitclass) cuts one ``uint8`` arena into fixed-size
blocks and hands them out; a ``KVCacheManager`` (plain Python) maps cache keys
to entries that own a chain of blocks, evicts by recency under pressure, moves
the bytes in and out, keeps statistics, and audits all of it on demand; a
``PagedKVCache`` keeps the K/V of decoding sequences in the blocks of such a
pool, with block tables, slot ids, shared blocks and attention that reads the
pool directly.

All compiled logic is module-level kernels over plain arrays, cached on disk
(``cache=True``): the manager and the paged cache call their compiled entry
points, and the jitclass, which numba cannot cache, is compiled only when it
is asked for.

Layout of the pool (every array has one slot per block)::

    arena  |blk 0 |blk 1 |blk 2 |blk 3 |blk 4 |blk 5 |blk 6 |  ...  |
            <-bs->
    state   HEAD   LINK   FREE   HELD   FREE   NEVER  NEVER
    link     1     -1     .      .      .      .      .      entry chains:
                                                             0 -> 1 -> end
    ring   [ 4 | 2 | . | . | . | . | . ]   FIFO of freed ids, oldest at head
             ^head, count=2
    bump = 5   ids >= bump were never handed out (state NEVER)

* ``allocate`` order: the oldest freed block first (ring head); only when the
  ring is empty, the next never-used id (``bump``, increasing).
* Freed blocks go to the ring tail, so the most recently freed is reused last.
* An entry's blocks form a chain through ``link`` (state HEAD, then LINK),
  ending in ``NO_BLOCK``; blocks taken with ``allocate`` are HELD by the caller.
  The states keep the two APIs apart: block calls never free a chain's block
  and chain calls never free a HELD one. (The chain calls are the manager's
  tools: used on a manager's own entries they corrupt it.)
* Metadata costs 17 bytes per block (ring and link ``int64``, state
  ``uint8``, all in one ``int64`` array ``meta`` after 8 counters).
* A remainder of ``total_size`` smaller than one block is not used.

Complexity (n = blocks involved, e = live entries, all compiled loops)::

    MemoryPool.allocate / release            O(1)
    alloc_chain / free_chain / resize_chain  O(n)
    read_chain / write_chain                 O(n + bytes)
    KVCacheManager.allocate_entry            O(n), one compiled call
                                             (two more when "lru" evicts)
    remove_cache_entry, resize_entry         O(n), one compiled call
    allocate_entries, remove_cache_entries   O(entries + n), one compiled call
    write, read                              O(n + bytes), one compiled call
    lookups, touch, pin, len, in             O(1)
    check_invariants                         O(total blocks + e)

    PagedKVCache (B = sequences in the call, T = tokens, L = context)
    append (a decode step)                   O(B), one compiled call
    add, extend                              O(T), one compiled call
    store                                    O(T * layer bytes), one call
    attention                                O(sum of q_lens * L), one call
    block_table, gather                      O(B * blocks) / O(bytes); for a
                                             handle O(1) after its append
    fork, remove, remove_many                O(blocks), one compiled call
    check_invariants                         O(total blocks + rows)

The pool is usable from a user's own ``@numba.njit`` code: pass it in and call
its methods; compiled code gets status codes (``OK``, ``ERR_*``, ``NO_BLOCK``),
never formatted exceptions, except from ``deallocate``/``deallocate_n``.
Under ``NUMBA_DISABLE_JIT=1`` the jitclass is a plain Python class with the
same behaviour; everything here works in both modes.
"""

__all__ = [
    "MemoryPool", "KVCacheManager", "CacheKey", "KVPoolEntry", "PoolStats",
    "EvictionReport", "PoolExhaustedError",
    "check_pool_invariants", "NO_BLOCK", "OK", "ERR_RANGE", "ERR_NOT_ALLOCATED", "ERR_IN_ENTRY",
    "ERR_DUPLICATE", "ERR_NO_SPACE", "ERR_BAD_CHAIN",
    "PagedKVCache", "PagedStats", "SeqRows", "SequenceReport",
]
__version__ = "0.1.0"

import collections
import collections.abc
import dataclasses
import heapq
import itertools
import json
import operator
import os
import re
import tempfile
import threading
import time

import numba
import numpy as np
from numba import boolean, int64, njit, uint8
from numba.core import types as nb_types
from numba.extending import overload
from numba.experimental import jitclass

# -- constants ---------------------------------------------------------------

NO_BLOCK = -1            # "no block": allocation failed, or end of a chain

# Block states (MemoryPool.state, one byte per block).
NEVER = 0                # never handed out; exactly the ids >= bump
FREE = 1                 # in the FIFO ring
HELD = 2                 # taken with allocate()/allocate_n(); the caller's
HEAD = 3                 # first block of an entry chain
LINK = 4                 # later block of an entry chain

# Status codes returned by compiled methods.
OK = 0
ERR_RANGE = -1           # block id outside [0, total_blocks)
ERR_NOT_ALLOCATED = -2   # block is free or was never handed out
ERR_IN_ENTRY = -3        # block belongs to an entry chain, not to the caller
ERR_DUPLICATE = -4       # the same id twice in one call
ERR_NO_SPACE = -5        # not enough free blocks; nothing was taken
ERR_BAD_CHAIN = -6       # not the head of a chain of the stated length

_UINT8 = np.dtype(np.uint8)
EVICTION_POLICIES = ("none", "lru")
REASONS = ("manual", "lru", "clear")
FORMAT_VERSION = 1       # of the .npz snapshot written by KVCacheManager.save


# -- the pool (compiled) -----------------------------------------------------
#
# The pool is three arrays, and every piece of its logic is a module-level
# kernel over them, compiled once and cached on disk (``cache=True``): the
# manager calls the kernels' compiled entry points directly, and the
# ``MemoryPool`` jitclass below is a thin face over the same kernels and the
# same arrays, compiled only when something needs it.
#
#   arena  uint8[n * block_size]   the bytes
#   meta   int64[8 + 2n + ceil(n/8)]  | counters (8) | ring (n) | link (n) | state |
#
#   state  uint8[n], a view of meta's last words: NEVER / FREE / HELD / HEAD /
#          LINK per block
#
# Everything but the bytes sits in ``meta`` so that a kernel can update the
# counters, and so that a call from the interpreter passes one or two arrays,
# not five (each array crossing the boundary costs tens of nanoseconds).
#
# A paged cache runs its pool in list mode (``C_LIST`` = 1): the free list is
# then doubly linked through ``ring`` (next) and ``link`` (prev), from
# ``C_HEAD`` to ``C_TAIL`` (-1 when empty), so that a prefix hit can take a
# cached block out of its middle in O(1); never-used ids (>= bump) count as
# its front. The block and chain calls are not for such a pool.

C_HEAD = 0               # ring slot of the oldest freed block
C_COUNT = 1              # freed blocks in the ring
C_BUMP = 2               # the next never-used id
C_PEAK = 3               # the most blocks in use at once (since reset)
C_BLOCK_SIZE = 4         # bytes per block
C_TOTAL = 5              # blocks in the pool
C_LIST = 6               # 1: the free list is a linked list (a paged cache's)
C_TAIL = 7               # list mode: the last block of the free list
_N_COUNTERS = 8


@njit(cache=True)
def _state_of(meta):
    """The block states: a ``uint8`` view of ``meta``'s last words."""
    n = meta[C_TOTAL]
    return meta[_N_COUNTERS + 2 * n:].view(np.uint8)[:n]


@njit(cache=True)
def _parts(state, meta):
    """The ring and link views of ``meta`` (the counters are read from
    ``meta`` itself: its first words; kernels make as few views as they
    can, since each costs a reference count inside a compiled loop)."""
    n = state.shape[0]
    return (meta[_N_COUNTERS:_N_COUNTERS + n],
            meta[_N_COUNTERS + n:_N_COUNTERS + 2 * n])


@njit(cache=True)
def _link_of(state, meta):
    """The link view of ``meta`` alone."""
    n = state.shape[0]
    return meta[_N_COUNTERS + n:_N_COUNTERS + 2 * n]


@njit(cache=True)
def _free_count(state, meta):
    """Blocks that can be handed out now: freed ones plus never-used ones."""
    return meta[C_COUNT] + state.shape[0] - meta[C_BUMP]


@njit(cache=True)
def _tail(total, head, count):
    """The ring slot just past the last of ``count`` ids from ``head``."""
    tail = head + count
    return tail - total if tail >= total else tail


@njit(cache=True)
def _take(state, meta, out, mark):
    """Fill ``out`` with the next ``len(out)`` ids in allocation order (the
    oldest freed first, then never-used ids in increasing order) and mark
    them ``mark``. The caller has checked that enough are free."""
    total = state.shape[0]
    head = meta[C_HEAD]
    count = meta[C_COUNT]
    bump = meta[C_BUMP]
    for i in range(out.shape[0]):
        if count > 0:
            block = meta[_N_COUNTERS + head]
            head = head + 1 if head + 1 < total else 0
            count -= 1
        else:
            block = bump
            bump += 1
        out[i] = block
        state[block] = mark
    meta[C_HEAD] = head
    meta[C_COUNT] = count
    meta[C_BUMP] = bump
    _note_peak(meta)


@njit(cache=True)
def _note_peak(meta):
    if meta[C_BUMP] - meta[C_COUNT] > meta[C_PEAK]:
        meta[C_PEAK] = meta[C_BUMP] - meta[C_COUNT]


@njit(cache=True)
def _put(state, meta, ids):
    """Append ``ids`` (checked by the caller) to the ring tail in order,
    marked FREE."""
    total = state.shape[0]
    count = meta[C_COUNT]
    at = _tail(total, meta[C_HEAD], count)
    for i in range(ids.shape[0]):
        meta[_N_COUNTERS + at] = ids[i]
        state[ids[i]] = FREE
        at = at + 1 if at + 1 < total else 0
    meta[C_COUNT] = count + ids.shape[0]


@njit(cache=True)
def _zero(arena, block_size, ids, start):
    """Zero the bytes of blocks ``ids`` from byte ``start`` of the run on."""
    bs = block_size
    first = start // bs
    for i in range(first, ids.shape[0]):
        lo = ids[i] * bs + (start % bs if i == first else 0)
        span = arena[lo:(ids[i] + 1) * bs]   # a view: the loop vectorizes
        for j in range(span.shape[0]):
            span[j] = 0


# block API: the caller owns the ids (state HELD) --------------------------------

@njit(cache=True)
def _allocate_n(meta, out):
    """Take ``len(out)`` blocks into ``out``; ``len(out)``, or 0 (taking
    nothing) when fewer are free."""
    state = _state_of(meta)
    if out.shape[0] > _free_count(state, meta):
        return 0
    _take(state, meta, out, HELD)
    return out.shape[0]


@njit(cache=True)
def _allocate(state, meta):
    """Take one block; its id, or ``NO_BLOCK`` when none is free. (Indexes
    ``meta`` directly, no views: this is the compiled-code hot path.)"""
    total = state.shape[0]
    count = meta[C_COUNT]
    bump = meta[C_BUMP]
    if count + total - bump == 0:
        return NO_BLOCK
    if count > 0:
        head = meta[C_HEAD]
        block = meta[_N_COUNTERS + head]
        meta[C_HEAD] = head + 1 if head + 1 < total else 0
        meta[C_COUNT] = count - 1
    else:
        block = bump
        meta[C_BUMP] = bump + 1
    state[block] = HELD
    _note_peak(meta)                    # (the counters are meta's first words)
    return block


@njit(cache=True)
def _release_n(meta, ids):
    """Return HELD blocks ``ids`` to the ring tail in order; ``(-1, OK)``, or
    the first bad id's index and ``ERR_*`` code (out of range, a repeat, a
    chain's block, not taken), freeing nothing. One pass marks each id FREE
    as it goes, so a repeat shows as no longer HELD; a refusal puts the
    marked ones back."""
    state = _state_of(meta)
    total = state.shape[0]
    for i in range(ids.shape[0]):
        b = ids[i]
        status = OK
        if b < 0 or b >= total:
            status = ERR_RANGE
        elif state[b] != HELD:
            s = state[b]
            status = ERR_IN_ENTRY if s == HEAD or s == LINK else ERR_NOT_ALLOCATED
            for k in range(i):
                if ids[k] == b:
                    status = ERR_DUPLICATE
        if status != OK:
            for k in range(i):
                state[ids[k]] = HELD
            return i, status
        state[b] = FREE
    _put(state, meta, ids)
    return -1, OK


@njit(cache=True)
def _release(state, meta, block):
    """Return one HELD block to the ring tail; ``OK``, or an ``ERR_*`` code
    and nothing freed."""
    total = state.shape[0]
    if block < 0 or block >= total:
        return ERR_RANGE
    s = state[block]                    # (a non-integer block fails here)
    if s != HELD:
        return ERR_IN_ENTRY if s == HEAD or s == LINK else ERR_NOT_ALLOCATED
    meta[_N_COUNTERS + _tail(total, meta[C_HEAD], meta[C_COUNT])] = block
    meta[C_COUNT] += 1
    state[block] = FREE
    return OK


# chain API: what the manager's entries use ----------------------------------------

@njit(cache=True)
def _walk(state, link, head, n, out, at):
    """``(got, ended)``: how many blocks (up to ``n``) the chain at ``head``
    has before a bad id or state, and whether the walk stopped at the
    chain's end (``NO_BLOCK``) rather than at ``n`` or a bad block. Records
    the good ids it passes in ``out`` from index ``at`` on, wrapping to 0 at
    its end; an empty ``out`` records nothing. Takes at most ``len(state)``
    steps, so a corrupted cycle cannot trap it."""
    total = state.shape[0]
    size = out.shape[0]
    b = head
    if n <= 0:
        return 0, False
    for i in range(min(n, total)):
        if b == NO_BLOCK:
            return i, i > 0
        if b < 0 or b >= total or state[b] != (HEAD if i == 0 else LINK):
            return i, False
        if size > 0:
            out[at] = b
            at = at + 1 if at + 1 < size else 0
        b = link[b]
    return min(n, total), b == NO_BLOCK


@njit(cache=True)
def _is_chain(state, link, head, n, out, at):
    """Whether ``head`` starts a chain of exactly ``n >= 1`` blocks (ids
    recorded as ``_walk`` does)."""
    got, ended = _walk(state, link, head, n, out, at)
    return n >= 1 and got == n and ended


@njit(cache=True)
def _chain_blocks(meta, head, n):
    """The ids of the chain at ``head``, at most ``n``, stopping early at a
    bad link or state (so a short result means a broken chain)."""
    state = _state_of(meta)
    out = np.empty(max(min(n, state.shape[0]), 0), np.int64)
    return out[:_walk(state, _link_of(state, meta), head, n, out, 0)[0]]


@njit(cache=True)
def _link_run(state, link, ids, start, stop, first_state):
    """Chain ``ids[start:stop]`` in order, ending in ``NO_BLOCK`` (indices,
    not a slice: one view per chain costs more than the linking)."""
    for i in range(start, stop - 1):
        link[ids[i]] = ids[i + 1]
        state[ids[i + 1]] = LINK
    link[ids[stop - 1]] = NO_BLOCK
    state[ids[start]] = first_state


@njit(cache=True)
def _alloc_chains(arena, meta, counts, zero):
    """One chain of ``counts[k]`` blocks per k, taken in pool order; their
    heads, or an empty array (taking nothing) if any count < 1 or too few
    blocks are free. ``zero`` zeroes the blocks' bytes."""
    state = _state_of(meta)
    m = counts.shape[0]
    free = _free_count(state, meta)
    need = 0
    for k in range(m):
        if counts[k] < 1 or counts[k] > free - need:
            return np.empty(0, np.int64)          # (no int64 overflow)
        need += counts[k]
    ids = np.empty(need, np.int64)
    _take(state, meta, ids, LINK)
    link = _link_of(state, meta)
    heads = np.empty(m, np.int64)
    pos = 0
    for k in range(m):
        _link_run(state, link, ids, pos, pos + counts[k], HEAD)
        heads[k] = ids[pos]
        pos += counts[k]
    if zero:
        _zero(arena, meta[C_BLOCK_SIZE], ids, 0)
    return heads


@njit(cache=True)
def _alloc_chain(arena, meta, n, zero):
    """One chain of ``n`` blocks; its head, or ``NO_BLOCK``. (``arena`` is
    read only with ``zero``, and may be None without.)"""
    state = _state_of(meta)
    if n < 1 or n > _free_count(state, meta):
        return NO_BLOCK
    ids = np.empty(n, np.int64)
    _take(state, meta, ids, LINK)
    _link_run(state, _link_of(state, meta), ids, 0, n, HEAD)
    if zero:
        _zero(arena, meta[C_BLOCK_SIZE], ids, 0)
    return ids[0]


@njit(cache=True)
def _free_chains(meta, heads):
    """Free the whole chains at ``heads`` to the ring tail, chain by chain in
    order; all their ids in that order, or an empty array (freeing nothing)
    if any head does not start a chain that ends in ``NO_BLOCK``, or two
    share a block. One walk per chain, staging the ids in the ring's unused
    slots past the tail (a refused call may leave ids there, nothing else)."""
    state = _state_of(meta)
    ring, link = _parts(state, meta)
    total = state.shape[0]
    count = meta[C_COUNT]
    start = _tail(total, meta[C_HEAD], count)
    at = start
    done = 0
    for k in range(heads.shape[0]):
        room = total - count - done     # no valid chain is longer
        got, ended = _walk(state, link, heads[k], room, ring, at)
        if got == 0 or not ended:
            for i in range(done):       # undo the marks of chains 0..k-1
                state[ring[(start + i) % total]] = LINK
            for j in range(k):
                state[heads[j]] = HEAD
            return np.empty(0, np.int64)
        for i in range(got):
            state[ring[at]] = FREE      # mark, so an overlap shows up
            at = at + 1 if at + 1 < total else 0
        done += got
    ids = np.empty(done, np.int64)
    for i in range(done):
        ids[i] = ring[(start + i) % total]
    meta[C_COUNT] = count + done
    return ids


@njit(cache=True)
def _free_chain(meta, head, n):
    """Free one chain of exactly ``n`` blocks to the ring tail, in chain
    order; ``OK``, or ``ERR_BAD_CHAIN`` (freeing nothing). One walk: the ids
    are written into the ring's unused slots past the tail, then counted in."""
    state = _state_of(meta)
    ring, link = _parts(state, meta)
    total = state.shape[0]
    count = meta[C_COUNT]
    if n > total - count:               # more than the ring has room for
        return ERR_BAD_CHAIN            # (so more than are in use)
    tail = _tail(total, meta[C_HEAD], count)
    if not _is_chain(state, link, head, n, ring, tail):
        return ERR_BAD_CHAIN
    for i in range(n):
        state[ring[tail]] = FREE
        tail = tail + 1 if tail + 1 < total else 0
    meta[C_COUNT] = count + n
    return OK


@njit(cache=True)
def _resize_chain(arena, meta, head, n_old, n_new, zero_from, zero):
    """Make the chain at ``head`` ``n_new`` blocks long (``n_new >= 1``).

    Growth appends blocks in pool order; shrinking frees the tail blocks to
    the ring in chain order. With ``zero``, added blocks are zeroed and so
    are the kept bytes from ``zero_from`` on (``arena`` may be None
    without). Returns ``OK``,
    ``ERR_NO_SPACE``, ``ERR_RANGE`` or ``ERR_BAD_CHAIN`` (then nothing
    changed)."""
    state = _state_of(meta)
    link = _link_of(state, meta)
    ids = np.empty(max(min(n_old, state.shape[0]), 0), np.int64)
    if not _is_chain(state, link, head, n_old, ids, 0) or n_new < 1:
        return ERR_BAD_CHAIN
    if zero_from < 0:
        return ERR_RANGE
    if n_new - n_old > _free_count(state, meta):
        return ERR_NO_SPACE
    bs = meta[C_BLOCK_SIZE]
    if n_new > n_old:
        added = np.empty(n_new - n_old, np.int64)
        _take(state, meta, added, LINK)
        _link_run(state, link, added, 0, n_new - n_old, LINK)
        link[ids[n_old - 1]] = added[0]
        if zero:
            _zero(arena, bs, added, 0)
    elif n_new < n_old:
        link[ids[n_new - 1]] = NO_BLOCK
        _put(state, meta, ids[n_new:])
    if zero and zero_from < min(n_old, n_new) * bs:
        _zero(arena, bs, ids[:min(n_old, n_new)], zero_from)
    return OK


@njit(cache=True)
def _span_status(state, meta, head, n, offset, size):
    """``OK`` if ``size`` bytes from ``offset`` lie inside the chain of ``n``
    blocks at ``head``, else ``ERR_BAD_CHAIN`` or ``ERR_RANGE``."""
    link = _link_of(state, meta)
    if not _is_chain(state, link, head, n, link[:0], 0):   # (records nothing)
        return ERR_BAD_CHAIN
    if offset < 0 or offset > n * meta[C_BLOCK_SIZE] - size:   # (no overflow)
        return ERR_RANGE
    return OK


@njit(cache=True)
def _overlaps(arena, buf):
    """Whether ``buf``'s bytes (at any stride) overlap the arena's."""
    if buf.shape[0] == 0:
        return False
    lo = arena.ctypes.data
    first = buf.ctypes.data
    last = first + (buf.shape[0] - 1) * buf.strides[0]
    return min(first, last) < lo + arena.shape[0] and lo <= max(first, last)


@njit(cache=True)
def _seek(link, bs, head, offset):
    """The block of a chain that holds byte ``offset``."""
    b = head
    for i in range(offset // bs):
        b = link[b]
    return b


@njit(cache=True)
def _run(link, bs, b, within, left):
    """``(start, length, next block)``: the next run of a copy that is at
    byte ``within`` of block ``b`` with ``left`` bytes to go, blocks
    adjacent in the arena joined into one run."""
    start = b * bs + within
    length = min(bs - within, left)
    b = link[b]
    while length < left and b * bs == start + length:
        length = min(length + bs, left)
        b = link[b]
    return start, length, b


@njit(cache=True)
def _copy_bytes(dst, dst_at, src, src_at, n):
    """``dst[dst_at:dst_at + n] = src[src_at:src_at + n]``, as views: the
    loop vectorizes."""
    d = dst[dst_at:dst_at + n]
    s = src[src_at:src_at + n]
    for j in range(n):
        d[j] = s[j]


@njit(cache=True)
def _copy_span(link, bs, head, offset, dst, src, total, to_arena):
    """Copy ``total`` bytes between the chain at ``head`` (from byte
    ``offset``) and a buffer, run by run: into the chain when ``to_arena``
    (``dst`` is the arena, ``src`` the buffer), else out of it. Only ``dst``
    is written, so a read-only buffer can be the source."""
    b = _seek(link, bs, head, offset)
    within = offset % bs
    done = 0
    while done < total:
        start, length, b = _run(link, bs, b, within, total - done)
        if to_arena:
            _copy_bytes(dst, start, src, done, length)
        else:
            _copy_bytes(dst, done, src, start, length)
        done += length
        within = 0


@njit(cache=True)
def _write_chain(arena, meta, head, n, offset, data):
    """Copy ``data`` (``uint8``, read-only or not) into the chain from byte
    ``offset``; ``OK`` or an ``ERR_*`` code, writing nothing. A ``data``
    that overlaps the arena is copied first, as memmove would."""
    state = _state_of(meta)
    status = _span_status(state, meta, head, n, offset, data.shape[0])
    if status != OK:
        return status
    if _overlaps(arena, data):
        data = data.copy()
    _copy_span(_link_of(state, meta), meta[C_BLOCK_SIZE], head, offset, arena, data,
               data.shape[0], True)
    return OK


@njit(cache=True)
def _read_chain(arena, meta, head, n, offset, out):
    """Fill ``out`` (``uint8``) from the chain's bytes at ``offset``; ``OK``
    or an ``ERR_*`` code, reading nothing. An ``out`` that overlaps the
    arena is filled through a fresh buffer."""
    state = _state_of(meta)
    status = _span_status(state, meta, head, n, offset, out.shape[0])
    if status != OK:
        return status
    into = np.empty(out.shape[0], np.uint8) if _overlaps(arena, out) else out
    _copy_span(_link_of(state, meta), meta[C_BLOCK_SIZE], head, offset, into, arena,
               out.shape[0], False)
    if into is not out:
        _copy_bytes(out, 0, into, 0, out.shape[0])
    return OK


def _arena_bytes(value):
    """``value`` if it is a 1-D C-contiguous ``uint8`` array, else
    ``ValueError`` naming what it is (in both modes: see the overloads)."""
    if not (isinstance(value, np.ndarray) and value.dtype == np.uint8
            and value.ndim == 1 and value.flags.c_contiguous):
        raise ValueError("arena must be a 1-D C-contiguous uint8 array, got "
                         + _describe(value))
    return value


def _block_ids(value):
    """``value`` if it is a 1-D integer array, else ``TypeError`` naming
    what it is: the block calls take numpy arrays, not lists."""
    if not (isinstance(value, np.ndarray) and value.dtype.kind in "iu"
            and value.ndim == 1):
        raise TypeError("block ids must be a 1-D integer numpy array, got "
                        + _describe(value))
    return value


def _describe(value):
    if isinstance(value, np.ndarray):
        return (f"array({value.dtype}, {value.ndim}d, "
                f"{'C' if value.flags.c_contiguous else 'A'})")
    return type(value).__name__


def _refusal(error, message, dtype):
    """A compiled implementation that raises ``error(message)`` yet types
    as returning a 1-D array of ``dtype``."""
    def refuse(value):
        if len(message) > 0:            # (a branch numba cannot prune)
            raise error(message)
        return np.empty(0, dtype)
    return refuse


@overload(_arena_bytes)
def _arena_bytes_compiled(value):
    if (isinstance(value, nb_types.Array) and value.dtype == nb_types.uint8
            and value.ndim == 1 and value.layout == "C"):
        return lambda value: value
    return _refusal(ValueError, "arena must be a 1-D C-contiguous uint8 "
                    f"array, got {value}", np.uint8)


@overload(_block_ids)
def _block_ids_compiled(value):
    if (isinstance(value, nb_types.Array) and value.ndim == 1
            and isinstance(value.dtype, nb_types.Integer)):
        return lambda value: value
    return _refusal(TypeError, "block ids must be a 1-D integer numpy "
                    f"array, got {value}", np.int64)


# -- the jitclass ------------------------------------------------------------

def _counter(index, doc):
    """A read-write property over ``ctr[index]`` (numba compiles the
    accessors with the jitclass)."""
    def get(self):
        return int(self.ctr[index])

    def put(self, value):
        self.ctr[index] = value
    return property(get, put, doc=doc)


class MemoryPool:
    """Fixed-size blocks of one byte arena, reused first-freed-first-out.

    ``MemoryPool(total_size, block_size, arena=None)``: ``total_size //
    block_size`` blocks over a new zeroed arena, or over ``arena`` (a 1-D
    C-contiguous ``uint8`` array of at least that many blocks' bytes, used
    without a copy).

    Free-list ring (capacity ``total_blocks``, in ``meta`` after the
    counters)::

        ring: [ . | . | 7 | 3 | 9 | . ]      head=2, count=3
                        ^oldest     ^newest; the next free goes to
                                    (head + count) % total_blocks

    Invariants (audited by ``check_invariants``):
    ``0 <= count <= bump <= total_blocks``; state is NEVER exactly for ids
    ``>= bump``; the ring slots ``head .. head+count-1`` hold each FREE block
    once; ``used_blocks = bump - count <= peak_used``.

    Block API (the caller owns the ids): ``allocate``, ``allocate_n``,
    ``release``, ``release_n`` (status codes) and ``deallocate``,
    ``deallocate_n`` (raise ``ValueError``); ids are ``int64`` numpy arrays.
    Chain API (what entries use): ``alloc_chain``, ``alloc_chains``,
    ``free_chain``, ``free_chains``, ``resize_chain``,
    ``chain_blocks``, ``read_chain``, ``write_chain``.
    Counters: ``free_blocks``, ``used_blocks``, ``never_used_blocks``,
    ``total_blocks``, ``capacity``, ``peak_used``, ``head``, ``count``,
    ``bump`` (views of ``ctr``, the first eight words of ``meta``).
    Audit: ``check_invariants()`` (from the interpreter).

    Every method is one call into a module-level kernel over ``arena``,
    ``state`` and ``meta``. The same class body also runs uncompiled as the
    manager's holder of those arrays (``_PlainPool``).
    """

    def __init__(self, total_size, block_size, arena=None):
        if block_size <= 0:
            raise ValueError("block_size must be positive, got " + str(block_size))
        if total_size < block_size:
            raise ValueError("total_size " + str(total_size)
                             + " is smaller than one block of " + str(block_size))
        n = total_size // block_size
        if arena is None:
            self.arena = np.zeros(n * block_size, np.uint8)
        else:
            arena = _arena_bytes(arena)
            if arena.shape[0] < n * block_size:
                raise ValueError("arena is smaller than the blocks it must hold")
            self.arena = arena[:n * block_size]
        self.block_size = block_size
        self.total_blocks = n
        self.meta = np.zeros(_N_COUNTERS + 2 * n + (n + 7) // 8, np.int64)
        self.ctr = self.meta[:_N_COUNTERS]
        self.ring = self.meta[_N_COUNTERS:_N_COUNTERS + n]
        self.link = self.meta[_N_COUNTERS + n:_N_COUNTERS + 2 * n]
        self.ctr[C_BLOCK_SIZE] = block_size
        self.ctr[C_TOTAL] = n
        self.link[:] = NO_BLOCK
        self.state = _state_of(self.meta)

    # counters ---------------------------------------------------------------

    head = _counter(C_HEAD, "Ring slot of the oldest freed block.")
    count = _counter(C_COUNT, "Freed blocks in the ring.")
    bump = _counter(C_BUMP, "The next never-used id.")
    peak_used = _counter(C_PEAK, "The most blocks in use at once since "
                                 "construction or a manager's reset_stats.")

    @property
    def free_blocks(self):
        """Blocks that can be handed out now: freed ones plus never-used ones."""
        return int(self.ctr[C_COUNT] + self.total_blocks - self.ctr[C_BUMP])

    @property
    def used_blocks(self):
        """Blocks handed out and not yet returned (entries' and HELD)."""
        return int(self.ctr[C_BUMP] - self.ctr[C_COUNT])

    @property
    def never_used_blocks(self):
        return int(self.total_blocks - self.ctr[C_BUMP])

    @property
    def capacity(self):
        """Usable bytes: ``total_blocks * block_size``."""
        return self.total_blocks * self.block_size

    # block API ----------------------------------------------------------------

    def allocate_n(self, out):
        """Take ``len(out)`` blocks into ``out``; return ``len(out)``, or 0
        (taking nothing) when fewer are free."""
        return _allocate_n(self.meta, _block_ids(out))

    def allocate(self):
        """Take one block; return its id, or ``NO_BLOCK`` when none is free."""
        return int(_allocate(self.state, self.meta))

    def release_n(self, ids):
        """Return HELD blocks ``ids`` to the ring tail in order; return ``OK``,
        or an ``ERR_*`` code and free nothing."""
        return _release_n(self.meta, _block_ids(ids))[1]

    def release(self, block):
        """Return one HELD block to the ring tail; ``OK`` or an ``ERR_*``
        code (freeing nothing)."""
        return _release(self.state, self.meta, block)

    def _raise_for(self, status, block):
        """The ``ValueError`` for a refused ``block``, naming it."""
        b = str(block)
        if status == ERR_RANGE:
            raise ValueError("block id " + b + " is out of range [0, "
                             + str(self.total_blocks) + ")")
        if status == ERR_DUPLICATE:
            raise ValueError("block id " + b + " appears twice")
        if status == ERR_IN_ENTRY:
            raise ValueError("block id " + b + " belongs to a cache entry; "
                             "remove the entry instead")
        raise ValueError("block id " + b + " is not allocated (already free "
                         "or never handed out)")

    def deallocate_n(self, ids):
        """``release_n`` that raises ``ValueError`` naming the first bad id."""
        bad, status = _release_n(self.meta, _block_ids(ids))
        if status != OK:
            self._raise_for(status, ids[bad])

    def deallocate(self, block):
        """``release`` that raises ``ValueError`` naming a bad id."""
        status = self.release(block)
        if status != OK:
            self._raise_for(status, block)

    # chain API ----------------------------------------------------------------

    def chain_blocks(self, head, n):
        """The ids of the chain at ``head``, at most ``n``, stopping early at
        a bad link or state (so a short result means a broken chain)."""
        return _chain_blocks(self.meta, head, n)

    def alloc_chains(self, counts, zero):
        """One chain of ``counts[k]`` blocks per k, taken in pool order; return
        their heads, or an empty array (taking nothing) if any count < 1 or
        too few blocks are free. ``zero`` zeroes the blocks' bytes."""
        return _alloc_chains(self.arena, self.meta, _block_ids(counts), zero)

    def alloc_chain(self, n, zero):
        """One chain of ``n`` blocks; its head, or ``NO_BLOCK``."""
        return int(_alloc_chain(self.arena, self.meta, n, zero))

    def free_chains(self, heads):
        """Free the whole chains at ``heads`` to the ring tail, chain by chain
        in order; return all their ids in that order, or an empty array
        (freeing nothing) if any head does not start a chain that ends in
        ``NO_BLOCK``, or two share a block."""
        return _free_chains(self.meta, _block_ids(heads))

    def free_chain(self, head, n):
        """Free one chain of ``n`` blocks to the ring tail, in chain order;
        ``OK``, or ``ERR_BAD_CHAIN`` (freeing nothing)."""
        return _free_chain(self.meta, head, n)

    def resize_chain(self, head, n_old, n_new, zero_from, zero):
        """Make the chain at ``head`` ``n_new`` blocks long (``n_new >= 1``).

        Growth appends blocks in pool order; shrinking frees the tail blocks
        to the ring in chain order. With ``zero``, added blocks are zeroed and
        so are the kept bytes from ``zero_from`` on. Returns ``OK``,
        ``ERR_NO_SPACE``, ``ERR_RANGE`` (a negative ``zero_from``) or
        ``ERR_BAD_CHAIN`` (then nothing changed).
        """
        return _resize_chain(self.arena, self.meta, head, n_old,
                             n_new, zero_from, zero)

    def write_chain(self, head, n, offset, data):
        """Copy ``data`` (``uint8``) into the chain from byte ``offset``."""
        return _write_chain(self.arena, self.meta, head, n,
                            offset, data)

    def read_chain(self, head, n, offset, out):
        """Fill ``out`` (``uint8``) from the chain's bytes at ``offset``."""
        return _read_chain(self.arena, self.meta, head, n,
                           offset, out)


_POOL_SPEC = [
    ("arena", uint8[::1]),
    ("block_size", int64),
    ("total_blocks", int64),
    ("state", uint8[::1]),
    ("meta", int64[::1]),
    ("ring", int64[::1]),
    ("link", int64[::1]),
    ("ctr", int64[::1]),
]
_PlainPool = MemoryPool          # the same body, run by the interpreter
MemoryPool = jitclass(_POOL_SPEC)(MemoryPool)   # compiled on first construction


def _jitclass_over(plain):
    """A ``MemoryPool`` jitclass over the arrays of ``plain`` (a
    ``_PlainPool``), sharing them: both see every change. Under
    NUMBA_DISABLE_JIT the classes are one, and this is ``plain`` itself."""
    if MemoryPool is _PlainPool:
        return plain
    pool = MemoryPool(plain.block_size, plain.block_size)   # one block, then
    pool.arena = plain.arena                                # the real arrays
    pool.total_blocks = plain.total_blocks
    pool.state = plain.state
    pool.meta = plain.meta
    pool.ring = plain.ring
    pool.link = plain.link
    pool.ctr = plain.ctr
    return pool


def _compiled(kernel, *argtypes):
    """The compiled entry point of ``kernel`` for exactly ``argtypes``
    (loaded from the disk cache, or compiled once): about 3x cheaper to call
    from the interpreter than the dispatcher, and it checks no types, so the
    callers pass exactly these. Under NUMBA_DISABLE_JIT, the function itself,
    with numpy integer results made ints."""
    compile_ = getattr(kernel, "compile", None)
    if compile_ is None:
        def plain(*args):
            result = kernel(*args)
            return int(result) if isinstance(result, np.integer) else result
        return plain
    return compile_(argtypes)


class _Kernels(dict):
    """``name -> entry point`` for the kernels the manager calls, each
    resolved on first use for the one signature the manager passes.

    An entry point checks nothing but each array's item size: a caller must
    pass exactly the types in ``SIGNATURES`` (1-D C-contiguous arrays of
    those dtypes, writable unless marked read-only; Python ints within
    int64; real bools), or it reads and writes the wrong memory."""

    _ARENA, _META = uint8[::1], int64[::1]
    # (a writable array passes as a read-only one: the kernel only reads it)
    _READ_ONLY_BYTES = nb_types.Array(nb_types.uint8, 1, "C", readonly=True)
    # The arena or None: calls that zero nothing pass None, one array less
    # to unbox (each costs tens of nanoseconds from the interpreter).
    _ARENA_IF_ZEROING = nb_types.Optional(_ARENA)
    SIGNATURES = {
        "alloc_chain": (_alloc_chain, (_ARENA_IF_ZEROING, _META, int64, boolean)),
        "alloc_chains": (_alloc_chains, (_ARENA, _META, int64[::1], boolean)),
        "free_chain": (_free_chain, (_META, int64, int64)),
        "free_chains": (_free_chains, (_META, int64[::1])),
        "resize_chain": (_resize_chain, (_ARENA_IF_ZEROING, _META, int64, int64,
                                         int64, int64, boolean)),
        "write_chain": (_write_chain, (_ARENA, _META, int64, int64, int64,
                                       _READ_ONLY_BYTES)),
        "read_chain": (_read_chain, (_ARENA, _META, int64, int64, int64,
                                     uint8[::1])),
    }

    def __missing__(self, name):
        kernel, argtypes = self.SIGNATURES[name]
        self[name] = fn = _compiled(kernel, *argtypes)
        return fn


_K = _Kernels()


# -- the paged cache's kernels (compiled) ------------------------------------

PREEMPT_POLICIES = ("none", "newest")
R_GEN, R_ADDED, R_MARK = 0, 1, 2     # columns of the per-row int64 array
# A batch crossing into a kernel is one int64 array [3, B], rows BATCH_*: its
# rows of the block table, their generations (-1: sequence ids, checked for
# repeats instead) and room for the slots ``append`` hands out.
BATCH_ROW, BATCH_GEN, BATCH_OUT = 0, 1, 2
_INFO = 4             # status words at the head of ``info``; then the
                      # (row, length) pairs that ``append`` preempted

# Status codes of the paged kernels (info[0] etc. carry the details).
_S_BAD_ROW = -20      # info[0]: index of a row that is not live (stale handle)
_S_DUPLICATE = -21    # info[0]: index of a repeated sequence
_S_BAD_TOKEN = -22    # info[0]: index of a negative token id
_S_NO_SPACE = -23     # info[0]: blocks needed, info[1]: free
_S_GROW = -24         # info[0]: table columns needed; retried after growing
_S_BAD_SLOT = -25     # info[0]: index of a slot no live token owns
_S_BAD_QLEN = -26     # info[0]: index of a bad q_len, or -1 (sum != T, in info[1])
_S_SHARED_SLOT = -27  # info[0]: index of a slot in a shared block, info[1]: its holders

_SCORES = 1 << 22          # attention's score scratch, in floats (16 MiB):
                           # more queries of a row than fit go in turns
_F16_SCALE = 2.0 ** 112   # float16 magnitude bits << 13, read as float32, times
                          # this is the float16's value (normals and subnormals)


def _to_f32(src, lo, n, bits, dst):
    """``src[lo:lo + n]`` as float32 into ``dst`` (``bits`` is ``dst`` viewed
    as uint32): float16 stored as its ``uint16`` bits converted exactly,
    float32 copied."""
    part = src[lo:lo + n]
    dst[:] = part.view(np.float16) if part.dtype == np.uint16 else part


@overload(_to_f32)
def _to_f32_compiled(src, lo, n, bits, dst):
    if isinstance(src.dtype, nb_types.Integer):
        # numba has no float16 arithmetic. Two passes that vectorize: the
        # magnitude's bits shifted into float32's place (Inf/NaN given
        # float32's top exponent), then scaled by +-2**112 as a float: exact,
        # a power of two.
        def impl(src, lo, n, bits, dst):
            part = src[lo:lo + n]
            for i in range(n):
                m = np.uint32(part[i]) & np.uint32(0x7FFF)
                top = np.uint32(0x7F800000) if m >= np.uint32(0x7C00) else np.uint32(0)
                bits[i] = (m << np.uint32(13)) | top
            for i in range(n):
                neg = part[i] & np.uint16(0x8000)
                dst[i] *= np.float32(-_F16_SCALE) if neg else np.float32(_F16_SCALE)
        return impl

    def impl(src, lo, n, bits, dst):
        part = src[lo:lo + n]
        for i in range(n):
            dst[i] = part[i]
    return impl


@njit(cache=True)
def _check_rows(lens, rowinfo, batch, info):
    """Check a batch of rows: each live and, when generations are given (a
    ``SeqRows``, whose rows are distinct by construction), of that
    generation; else no row twice (found by marking, then unmarked). On
    failure ``info[0]`` is the bad index. Leaves nothing marked."""
    rows, gens = batch[BATCH_ROW], batch[BATCH_GEN]
    n = rows.shape[0]
    check_gen = n > 0 and gens[0] >= 0
    status = OK
    done = n
    for i in range(n):
        r = rows[i]
        if r < 0 or r >= lens.shape[0] or lens[r] < 0 or (
                check_gen and rowinfo[r, R_GEN] != gens[i]):
            status = _S_BAD_ROW
        elif not check_gen:
            if rowinfo[r, R_MARK] != 0:
                status = _S_DUPLICATE
            else:
                rowinfo[r, R_MARK] = 1
        if status != OK:
            info[0] = i
            done = i
            break
    if not check_gen:
        for k in range(done):
            rowinfo[rows[k], R_MARK] = 0
    return status


@njit(cache=True)
def _unmark(rowinfo, rows):
    for i in range(rows.shape[0]):
        rowinfo[rows[i], R_MARK] = 0


# Sharing. Blocks carry reference counts; a block is free only when no
# table holds it. The free list runs in vLLM v1's order: never-used ids
# first (increasing), then the linked list of freed blocks, oldest first; a
# removed sequence's blocks join its tail last block first; a prefix hit
# unlinks a cached free block wherever it sits, in O(1). (A lazily skipped
# ring would need room for stale entries beyond the pool's n slots and an
# audit that tolerates them; the linked list stays exact in the same O(1).)
#
# Prefix cache. A full block is findable under a chained 64-bit hash of its
# parent's hash and its token ids. The hash only indexes: every lookup is
# verified against the candidate's stored token ids, its depth and its
# parent's hash, so a collision can cost a hit but never share wrong K/V.
# Findable blocks with one hash form a class: a list in insertion order
# (vLLM keeps such duplicates too; a lookup takes the oldest). A block joins
# a class only if its tokens, depth and parent hash equal the class's, so a
# class is content-pure; a colliding block, and every block after it in its
# sequence, stays unfindable. A class cannot die while a findable child of it
# lives (the child's holders hold a class member, and a freed child sits in
# the free list before its parents), which the audit checks; so a verified
# parent hash identifies the parent's content.
#
# The prefix state is one int64 array (fewer arguments across the boundary):
#
#   px  | counters (16, P_*) | per block [n, 6] (columns B_*): ref, hash,
#       parent hash, next and prev in its class, depth (-1: not findable) |
#       table keys (cap) | table values (cap): the oldest block of the
#       class, -1 empty |
#
# The table is open addressing with linear probing, capacity a power of two
# >= 2n (a load of at most 1/2), and backward-shift deletion (no
# tombstones). It is compiled, not a Python dict, because blocks fill and are
# evicted inside the compiled decode step: a dict would need the step to
# hand every filled and evicted block back to the interpreter.

P_N, P_CAP, P_ON, P_MASK, P_REQS, P_QUERIES, P_HITS, P_COW = range(8)
P_SPLIT = 8          # partial blocks held more than once (0: no copy can be
_P_HEAD = 16         # due, and the decode step reads no reference counts)
# Columns of the per-block part of ``px``.
B_REF, B_HASH, B_PHASH, B_NEXT, B_PREV, B_DEPTH = range(6)
_B_COLS = 6
_ROOT_HASH = 0x6B76706F6F6C      # the parent hash of a sequence's first block
_M64 = (1 << 64) - 1


def _mix(h, x):
    """Token ``x`` into hash ``h`` (Python ints): one multiply and a shift,
    so that a block's 16 tokens cost little; ``_finish`` mixes the result."""
    z = ((int(h) ^ int(x)) * 0x9E3779B97F4A7C15) & _M64
    return z ^ (z >> 29)


def _finish(h):
    """The splitmix64 finalizer of a block's hash (Python ints)."""
    z = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


@overload(_mix)
def _mix_compiled(h, x):
    def impl(h, x):
        z = (np.uint64(h) ^ np.uint64(x)) * np.uint64(0x9E3779B97F4A7C15)
        return z ^ (z >> np.uint64(29))
    return impl


@overload(_finish)
def _finish_compiled(h):
    def impl(h):
        z = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
    return impl


@njit(cache=True)
def _px_parts(px):
    """(blk, blku, keys, vals): the per-block table as int64 and as uint64
    (for the hashes), and the hash table's keys and values."""
    n = px[P_N]
    cap = px[P_CAP]
    a = _P_HEAD + _B_COLS * n
    pxu = px.view(np.uint64)
    return (px[_P_HEAD:a].reshape((n, _B_COLS)), pxu[_P_HEAD:a].reshape((n, _B_COLS)),
            pxu[a:a + cap], px[a + cap:a + 2 * cap])


@njit(cache=True)
def _block_hash(tokens, lo, bt, ph, mask):
    """The chained hash of ``tokens[lo:lo + bt]`` after parent hash ``ph``."""
    h = ph
    for i in range(lo, lo + bt):
        h = _mix(h, tokens[i])
    return _finish(h) & mask


@njit(cache=True)
def _h_slot(keys, vals, h):
    """The table slot holding ``h``, or the empty slot where it would go."""
    m = keys.shape[0] - 1
    i = np.int64(h & np.uint64(m))
    while vals[i] >= 0 and keys[i] != h:
        i = (i + 1) & m
    return i


@njit(cache=True)
def _h_delete(keys, vals, i):
    """Empty slot ``i``, shifting later entries of its probe run back."""
    m = keys.shape[0] - 1
    j = i
    while True:
        j = (j + 1) & m
        if vals[j] < 0:
            break
        k = np.int64(keys[j] & np.uint64(m))       # the entry's home slot
        if (j > i and (k <= i or k > j)) or (j < i and k <= i and k > j):
            keys[i] = keys[j]
            vals[i] = vals[j]
            i = j
    vals[i] = -1


@njit(cache=True)
def _register(tok, parts, mask, bt, b, parent, depth):
    """Make full block ``b`` (at ``depth`` of a sequence, after block
    ``parent``) findable: a new class, or the tail of its equal class.
    Unfindable after an unfindable parent or on a collision. ``parts``:
    ``_px_parts(px)``, made once per kernel call."""
    blk, blku, keys, vals = parts
    if depth == 0:
        ph = np.uint64(_ROOT_HASH)
    elif blk[parent, B_DEPTH] < 0:
        return
    else:
        ph = blku[parent, B_HASH]
    h = _block_hash(tok, b * bt, bt, ph, mask)
    i = _h_slot(keys, vals, h)
    head = vals[i]
    if head < 0:
        keys[i] = h
        vals[i] = b
        blk[b, B_PREV] = b                         # a head's prev is the tail
    else:
        if blk[head, B_DEPTH] != depth or blku[head, B_PHASH] != ph:
            return
        for t in range(bt):
            if tok[head * bt + t] != tok[b * bt + t]:
                return
        tail = blk[head, B_PREV]
        blk[tail, B_NEXT] = b
        blk[b, B_PREV] = tail
        blk[head, B_PREV] = b
    blk[b, B_NEXT] = -1
    blku[b, B_HASH] = h
    blku[b, B_PHASH] = ph
    blk[b, B_DEPTH] = depth


@njit(cache=True)
def _unregister(parts, b):
    """Make findable block ``b`` unfindable (it is handed out anew)."""
    blk, blku, keys, vals = parts
    i = _h_slot(keys, vals, blku[b, B_HASH])
    head = vals[i]
    nx = blk[b, B_NEXT]
    if head == b:
        if nx < 0:
            _h_delete(keys, vals, i)
        else:
            vals[i] = nx
            blk[nx, B_PREV] = blk[b, B_PREV]
    else:
        p = blk[b, B_PREV]
        blk[p, B_NEXT] = nx
        if nx >= 0:
            blk[nx, B_PREV] = p
        else:
            blk[head, B_PREV] = p
    blk[b, B_DEPTH] = -1


@njit(cache=True)
def _lookup(tok, px, bt, tokens, found):
    """The longest verified run of findable blocks matching ``tokens``' full
    blocks (at most ``(len - 1) // bt``): its length, its ids in ``found``."""
    blk, blku, keys, vals = _px_parts(px)
    mask = px.view(np.uint64)[P_MASK]
    most = (tokens.shape[0] - 1) // bt
    ph = np.uint64(_ROOT_HASH)
    for j in range(most):
        h = _block_hash(tokens, j * bt, bt, ph, mask)
        b = vals[_h_slot(keys, vals, h)]
        if b < 0 or blk[b, B_DEPTH] != j or blku[b, B_PHASH] != ph:
            return j
        for t in range(bt):
            if tok[b * bt + t] != tokens[j * bt + t]:
                return j
        found[j] = b
        ph = h
    return most


@njit(cache=True)
def _q_unlink(ring, link, ctr, b):
    """Take block ``b`` out of the (list-mode) free list."""
    p = link[b]
    nx = ring[b]
    if p >= 0:
        ring[p] = nx
    else:
        ctr[C_HEAD] = nx
    if nx >= 0:
        link[nx] = p
    else:
        ctr[C_TAIL] = p
    ctr[C_COUNT] -= 1


@njit(cache=True)
def _q_push(ring, link, ctr, b):
    """Append block ``b`` to the free list's tail."""
    t = ctr[C_TAIL]
    ring[b] = -1
    link[b] = t
    if t >= 0:
        ring[t] = b
    else:
        ctr[C_HEAD] = b
    ctr[C_TAIL] = b
    ctr[C_COUNT] += 1


@njit(cache=True)
def _q_one(state, ring, link, ctr, parts):
    """A block for new content from the free list's front (a never-used id
    first), HELD with one reference; a cached one forgets its hash. The
    caller has checked that one is free and updates the peak."""
    blk = parts[0]
    b = ctr[C_BUMP]
    if b < state.shape[0]:
        ctr[C_BUMP] = b + 1
    else:
        b = ctr[C_HEAD]
        _q_unlink(ring, link, ctr, b)
        if blk[b, B_DEPTH] >= 0:
            _unregister(parts, b)
    state[b] = HELD
    blk[b, B_REF] = 1
    return b


@njit(cache=True)
def _q_peak(ctr):
    if ctr[C_BUMP] - ctr[C_COUNT] > ctr[C_PEAK]:
        ctr[C_PEAK] = ctr[C_BUMP] - ctr[C_COUNT]


@njit(cache=True)
def _cow(arena, tok, fill, state, ring, link, ctr, px, parts, bt, b):
    """Copy shared block ``b`` (every layer, K and V, its tokens and fill)
    into a new block, dropping one reference to ``b``; the new block."""
    blk = parts[0]
    c = _q_one(state, ring, link, ctr, parts)
    bb = ctr[C_BLOCK_SIZE]
    arena[c * bb:(c + 1) * bb] = arena[b * bb:(b + 1) * bb]
    tok[c * bt:(c + 1) * bt] = tok[b * bt:(b + 1) * bt]
    fill[c] = fill[b]
    blk[b, B_REF] -= 1
    if blk[b, B_REF] == 1:
        px[P_SPLIT] -= 1
    px[P_COW] += 1
    return c


@njit(cache=True)
def _release_row(tables, lens, fill, rowinfo, state, meta, px, bt, r):
    """Drop row ``r``'s references, last block first (a block whose count
    reaches 0 joins the free list's tail, keeping its content and hash),
    clear the row and bump its generation; the number of blocks freed."""
    ring, link = _parts(state, meta)
    ctr = meta[:_N_COUNTERS]
    blk = _px_parts(px)[0]
    freed = 0
    last = (lens[r] + bt - 1) // bt - 1
    for j in range(last, -1, -1):
        b = tables[r, j]
        tables[r, j] = NO_BLOCK
        blk[b, B_REF] -= 1
        if j == last and lens[r] % bt != 0 and blk[b, B_REF] == 1:
            px[P_SPLIT] -= 1
        if blk[b, B_REF] == 0:
            fill[b] = 0
            state[b] = FREE
            _q_push(ring, link, ctr, b)
            freed += 1
    lens[r] = -1
    rowinfo[r, R_GEN] += 1
    return freed


@njit(cache=True)
def _shift_of(bt):
    """log2(``bt``) for a power of two, else -1: ``_col`` then shifts."""
    if bt & (bt - 1) != 0:
        return -1
    sh = 0
    while (1 << sh) < bt:
        sh += 1
    return sh


@njit(cache=True)
def _col(p, bt, sh):
    """``p // bt`` (``p >= 0``), by a shift when ``sh >= 0``: the decode step
    divides once per row, and a division costs 10-40 cycles."""
    return p >> sh if sh >= 0 else p // bt


@njit(cache=True)
def _append_need(tables, lens, rowinfo, blk, bt, rows, scratch):
    """Blocks that one more token per row takes while shared partial blocks
    exist (rows marked 2 skipped): a new block for a full last block, a copy
    for a shared partial one (in row order, the last holder in the batch
    keeps it)."""
    need = 0
    for i in range(rows.shape[0]):
        r = rows[i]
        scratch[i] = -1
        if rowinfo[r, R_MARK] == 2:
            continue
        L = lens[r]
        if L % bt == 0:
            need += 1
        else:
            b = tables[r, L // bt]
            if blk[b, B_REF] > 1:
                need += 1
                blk[b, B_REF] -= 1               # for the rows after this one
                scratch[i] = b
    for i in range(rows.shape[0]):
        if scratch[i] >= 0:
            blk[scratch[i], B_REF] += 1
    return need


@njit(cache=True)
def _paged_append(tables, lens, fill, tok, rowinfo, meta, px, arena, bt, batch,
                  tokens, preempt, info):
    """One token per row: reserve its slot (a new block when the last is
    full, a copy when it is shared) into ``batch[BATCH_OUT]``. Short of blocks:
    ``_S_NO_SPACE``, or with ``preempt`` free the newest sequences
    (``info[_INFO:]``: row, length, blocks freed; ``info[2]``: how many)
    until the rest fit; a preempted row's slot is -1. With prefix caching
    the token ids are kept and blocks that fill become findable."""
    state = _state_of(meta)
    rows, out, pre = batch[BATCH_ROW], batch[BATCH_OUT], info[_INFO:]
    n = rows.shape[0]
    info[2] = 0
    status = _check_rows(lens, rowinfo, batch, info)
    if status != OK:
        return status
    width = tables.shape[1]
    sh = _shift_of(bt)
    need = 0                               # (exact unless blocks are split)
    for i in range(n):
        L = lens[rows[i]]
        col = _col(L, bt, sh)
        if tokens[i] < 0:
            info[0] = i
            return _S_BAD_TOKEN
        if L == col * bt:
            if col >= width:
                info[0] = col + 1
                return _S_GROW
            need += 1
    ring, link = _parts(state, meta)
    ctr = meta[:_N_COUNTERS]
    parts = _px_parts(px)
    blk = parts[0]
    mask = px.view(np.uint64)[P_MASK]
    split = px[P_SPLIT] != 0
    if split:
        need = _append_need(tables, lens, rowinfo, blk, bt, rows, out)
    free = _free_count(state, meta)
    npre = 0
    if need > free and preempt != 0:
        for i in range(n):                 # batch members: R_MARK 1
            rowinfo[rows[i], R_MARK] = 1
    while need > free:
        if preempt == 0:
            info[0] = need
            info[1] = free
            return _S_NO_SPACE
        best = -1
        newest = -1
        for r in range(lens.shape[0]):
            if lens[r] >= 0 and rowinfo[r, R_ADDED] > newest:
                newest = rowinfo[r, R_ADDED]
                best = r
        if best < 0:
            break
        if rowinfo[best, R_MARK] == 1:
            rowinfo[best, R_MARK] = 2
        pre[3 * npre] = best
        pre[3 * npre + 1] = lens[best]
        freed = _release_row(tables, lens, fill, rowinfo, state, meta, px, bt, best)
        pre[3 * npre + 2] = freed
        npre += 1
        free += freed
        split = px[P_SPLIT] != 0
        need = _append_need(tables, lens, rowinfo, blk, bt, rows, out)
    info[2] = npre
    on = px[P_ON] != 0
    width = 0
    for i in range(n):
        r = rows[i]
        if npre > 0 and rowinfo[r, R_MARK] == 2:
            out[i] = NO_BLOCK
            continue
        L = lens[r]
        col = _col(L, bt, sh)
        off = L - col * bt
        width = max(width, col + 1)
        if off == 0:
            b = _q_one(state, ring, link, ctr, parts)
            tables[r, col] = b
        else:
            b = tables[r, col]
            if split and blk[b, B_REF] > 1:
                b = _cow(arena, tok, fill, state, ring, link, ctr, px, parts, bt, b)
                tables[r, col] = b
        fill[b] = off + 1
        s = b * bt + off
        lens[r] = L + 1
        out[i] = s
        if on:
            tok[s] = tokens[i]
            if off == bt - 1:
                _register(tok, parts, mask, bt, b, tables[r, col - 1] if col > 0 else -1,
                          col)
    _q_peak(ctr)
    if npre > 0:
        _unmark(rowinfo, rows)
    info[1] = width                        # the rows' most blocks now
    return OK


@njit(cache=True)
def _paged_extend(tables, lens, fill, tok, rowinfo, meta, px, arena, bt, row,
                  tokens, stamp, out, info):
    """Append ``tokens`` to one row, slots into ``out``; with ``stamp >= 0``
    the row is free and becomes a new sequence added at ``stamp``, sharing
    the longest verified run of cached blocks (prefix caching on; the
    tokens it covers in ``info[3]``). A shared partial last block is copied
    first. Blocks that fill become findable."""
    state = _state_of(meta)
    n = tokens.shape[0]
    for i in range(n):
        if tokens[i] < 0:
            info[0] = i
            return _S_BAD_TOKEN
    new = stamp >= 0
    L = 0 if new else lens[row]
    have = (L + bt - 1) // bt
    total = (L + n + bt - 1) // bt
    if total > tables.shape[1]:
        info[0] = total
        return _S_GROW
    ring, link = _parts(state, meta)
    ctr = meta[:_N_COUNTERS]
    parts = _px_parts(px)
    blk = parts[0]
    mask = px.view(np.uint64)[P_MASK]
    on = px[P_ON] != 0
    hit = 0
    revive = 0                             # hits that are free now
    if new and on:
        hit = _lookup(tok, px, bt, tokens, out)      # ``out`` as scratch
        for j in range(hit):
            if blk[out[j], B_REF] == 0:
                revive += 1
    cow = 1 if (n > 0 and L % bt != 0 and blk[tables[row, have - 1], B_REF] > 1) else 0
    need = total - have - hit + cow
    free = _free_count(state, meta) - revive
    if need > free:
        info[0] = need
        info[1] = free
        return _S_NO_SPACE
    for j in range(hit):
        b = out[j]
        if blk[b, B_REF] == 0:
            _q_unlink(ring, link, ctr, b)
            state[b] = HELD
            fill[b] = bt
        blk[b, B_REF] += 1
        tables[row, j] = b
    if cow:
        tables[row, have - 1] = _cow(arena, tok, fill, state, ring, link, ctr, px,
                                     parts, bt, tables[row, have - 1])
    for j in range(have + hit, total):
        tables[row, j] = _q_one(state, ring, link, ctr, parts)
    _q_peak(ctr)
    skip = hit * bt                        # (whole blocks, from position 0)
    col = L // bt
    off = L - col * bt
    i = 0
    while i < n:                           # block by block
        b = tables[row, col]
        k = min(bt - off, n - i)           # tokens that go into block b
        for t in range(k):
            out[i + t] = b * bt + off + t
        if i >= skip:
            fill[b] = off + k
            if on:
                for t in range(k):
                    tok[b * bt + off + t] = tokens[i + t]
                if off + k == bt:
                    _register(tok, parts, mask, bt, b,
                              tables[row, col - 1] if col > 0 else -1, col)
        i += k
        col += 1
        off = 0
    lens[row] = L + n
    if new:
        rowinfo[row, R_ADDED] = stamp
        if on:
            px[P_REQS] += 1
            px[P_QUERIES] += n
            px[P_HITS] += skip
    info[3] = skip
    return OK


@njit(cache=True)
def _paged_remove(tables, lens, fill, rowinfo, meta, px, bt, batch, info):
    """Free whole rows, in order (blocks freed per row into ``batch[BATCH_OUT]``);
    ``OK`` or a status, freeing nothing."""
    status = _check_rows(lens, rowinfo, batch, info)
    if status != OK:
        return status
    state = _state_of(meta)
    rows = batch[BATCH_ROW]
    for i in range(rows.shape[0]):
        batch[BATCH_OUT, i] = _release_row(tables, lens, fill, rowinfo, state, meta, px, bt,
                                       rows[i])
    return OK


@njit(cache=True)
def _paged_fork(tables, lens, rowinfo, px, bt, src, dst, stamp):
    """Row ``dst`` (free) becomes a sequence added at ``stamp`` sharing every
    block of row ``src``: one more reference each."""
    blk = _px_parts(px)[0]
    nb = (lens[src] + bt - 1) // bt
    for j in range(nb):
        b = tables[src, j]
        tables[dst, j] = b
        blk[b, B_REF] += 1
    if lens[src] % bt != 0 and blk[tables[src, nb - 1], B_REF] == 2:
        px[P_SPLIT] += 1
    lens[dst] = lens[src]
    rowinfo[dst, R_ADDED] = stamp


@njit(cache=True)
def _paged_reset(px):
    """Forget every cached hash."""
    blk, blku, keys, vals = _px_parts(px)
    for b in range(blk.shape[0]):
        blk[b, B_DEPTH] = -1
    vals[:] = -1


@njit(cache=True)
def _paged_swap(tables, lens, rowinfo, pairs):
    """Swap table rows pairwise, in order, bumping both generations."""
    for k in range(pairs.shape[0]):
        a, b = pairs[k, 0], pairs[k, 1]
        for j in range(tables.shape[1]):
            t = tables[a, j]
            tables[a, j] = tables[b, j]
            tables[b, j] = t
        t = lens[a]
        lens[a] = lens[b]
        lens[b] = t
        t = rowinfo[a, R_ADDED]
        rowinfo[a, R_ADDED] = rowinfo[b, R_ADDED]
        rowinfo[b, R_ADDED] = t
        rowinfo[a, R_GEN] += 1
        rowinfo[b, R_GEN] += 1


@njit(cache=True)
def _paged_width(lens, rowinfo, bt, batch, info):
    """The most blocks any of the rows holds, or a (negative) status."""
    status = _check_rows(lens, rowinfo, batch, info)
    if status != OK:
        return status
    rows = batch[BATCH_ROW]
    longest = 0
    for i in range(rows.shape[0]):
        longest = max(longest, lens[rows[i]])
    return (longest + bt - 1) // bt


@njit(cache=True)
def _paged_table(tables, lens, rowinfo, bt, batch, info):
    """(status, table, lens): copies of the rows' tables, padded with -1,
    and their lengths."""
    rows = batch[BATCH_ROW]
    n = rows.shape[0]
    width = _paged_width(lens, rowinfo, bt, batch, info)
    if width < 0:
        return width, np.empty((0, 0), np.int32), np.empty(0, np.int32)
    table = np.full((n, width), NO_BLOCK, np.int32)
    out = np.empty(n, np.int32)
    for i in range(n):
        r = rows[i]
        out[i] = lens[r]
        for j in range((lens[r] + bt - 1) // bt):
            table[i, j] = tables[r, j]
    return OK, table, out


@njit(cache=True)
def _paged_store(kv, fill, meta, blk, bt, layers, layer, slots, k, v, info):
    """Write rows of ``k`` and ``v`` (``[T, kv_heads * head_dim]``, the
    cache's element type) at ``slots`` of ``layer``; checked first: each a
    reserved slot (else ``_S_BAD_SLOT``) of a block held once (else
    ``_S_SHARED_SLOT``). A run of consecutive slots within a block is one
    contiguous copy each for K and V (a slot given twice: its last row
    wins, as in order)."""
    state = _state_of(meta)
    nblk = state.shape[0]
    T = slots.shape[0]
    e = k.shape[1]
    for i in range(T):
        s = slots[i]
        b = s // bt
        if s < 0 or b >= nblk or state[b] != HELD or s - b * bt >= fill[b]:
            info[0] = i
            return _S_BAD_SLOT
        if blk[b, B_REF] > 1:
            info[0] = i
            info[1] = blk[b, B_REF]
            return _S_SHARED_SLOT
    kf, vf = k.reshape(T * e), v.reshape(T * e)
    i = 0
    while i < T:
        s = slots[i]
        b = s // bt
        m = 1                              # the run: slots s .. s + m - 1
        end = (b + 1) * bt
        while i + m < T and slots[i + m] == s + m and s + m < end:
            m += 1
        lo = (((b * layers + layer) * 2) * bt + s - b * bt) * e
        ks, vs = kf[i * e:(i + m) * e], vf[i * e:(i + m) * e]
        kd, vd = kv[lo:lo + m * e], kv[lo + bt * e:lo + (bt + m) * e]
        for j in range(ks.shape[0]):       # views: the loops vectorize
            kd[j] = ks[j]
        for j in range(vs.shape[0]):
            vd[j] = vs[j]
        i += m
    return OK


@njit(cache=True)
def _paged_gather(kv, tables, lens, rowinfo, bt, layers, layer, e, batch,
                  info):
    """(status, k, v, lens): the rows' K and V of ``layer`` as
    ``[B, longest, e]`` copies, zero-padded, and their lengths."""
    rows = batch[BATCH_ROW]
    n = rows.shape[0]
    status = _check_rows(lens, rowinfo, batch, info)
    width = 0
    if status == OK:
        for i in range(n):
            width = max(width, lens[rows[i]])
    else:
        n = 0
    k = np.zeros((n, width, e), kv.dtype)
    v = np.zeros((n, width, e), kv.dtype)
    out = np.empty(n, np.int32)
    for i in range(n):
        r = rows[i]
        out[i] = lens[r]
        for t in range(lens[r]):
            b = tables[r, t // bt]
            lo = (((b * layers + layer) * 2) * bt + t % bt) * e
            k[i, t] = kv[lo:lo + e]
            v[i, t] = kv[lo + bt * e:lo + bt * e + e]
    return status, k, v, out


@njit(cache=True, fastmath={"reassoc", "contract", "nsz"})
def _paged_attention(kv, tables, lens, rowinfo, bt, layers, layer, kvh, q, batch,
                     qlens, scale, scores, info):
    """(status, out): causal attention of ``q`` (float32 ``[T, q_heads,
    head_dim]``, ``qlens[i]`` queries per row, each row's last tokens) over
    the rows' stored K and V; float32 throughout, softmax per query. Walks
    each row's blocks in order, converting every token's K (then V) once
    for all heads, for up to ``scores // (q_heads * longest row)`` of the
    row's queries at a time: the score scratch holds at most ``scores``
    floats, or one query's scores where they are more."""
    rows = batch[BATCH_ROW]
    n = rows.shape[0]
    T, qh, hd = q.shape[0], q.shape[1], q.shape[2]
    out = np.zeros((T, qh, hd), np.float32)
    status = _check_rows(lens, rowinfo, batch, info)
    if status != OK:
        return status, out
    total = 0
    longest = 1
    most = 1
    for i in range(n):
        ql = qlens[i]
        if ql < 0 or ql > lens[rows[i]]:
            info[0] = i
            return _S_BAD_QLEN, out
        total += ql
        if ql > 0:
            longest = max(longest, lens[rows[i]])
            most = max(most, ql)
    if total != T:
        info[0] = -1
        info[1] = total
        return _S_BAD_QLEN, out
    group = qh // kvh
    e = kvh * hd
    plane = bt * e                         # one block's K (or V) of one layer
    sc = np.float32(scale)
    chunk = max(1, min(most, scores // (qh * longest)))    # queries at a time
    p = np.empty((chunk, qh, longest), np.float32)   # scores, then weights
    bits = np.empty(e, np.uint32)
    row = bits.view(np.float32)            # one token's K or V, all heads
    heads = row.reshape((kvh, hd))
    qs = 0
    for i in range(n):
        r = rows[i]
        L = lens[r]
        nq = qlens[i]
        first = L - nq                     # position of the first query
        qi = q[qs:qs + nq]                 # (slices made once per row: the
        oi = out[qs:qs + nq]               # inner loops index by loop counters)
        for j0 in range(0, nq, chunk):
            j1 = min(nq, j0 + chunk)       # queries j0..j1-1 see positions
            end = first + j1               # 0..end-1
            nb = (end + bt - 1) // bt
            for c in range(nb):            # scores, block by block
                at = ((tables[r, c] * layers + layer) * 2) * plane - c * plane
                for t in range(c * bt, min(end, c * bt + bt)):
                    _to_f32(kv, at + t * e, e, bits, row)
                    for j in range(max(t - first, j0), j1):
                        for h in range(qh):
                            g = h // group
                            s = np.float32(0.0)
                            for d in range(hd):
                                s += qi[j, h, d] * heads[g, d]
                            p[j - j0, h, t] = s * sc
            for j in range(j0, j1):        # softmax over positions 0..first+j
                last = first + j
                for h in range(qh):
                    pr = p[j - j0, h]
                    m = pr[0]
                    for t in range(1, last + 1):
                        m = max(m, pr[t])
                    z = np.float32(0.0)
                    for t in range(last + 1):
                        w = np.exp(pr[t] - m)
                        pr[t] = w
                        z += w
                    zinv = np.float32(1.0) / z
                    for t in range(last + 1):
                        pr[t] *= zinv
            for c in range(nb):            # weighted values
                at = ((tables[r, c] * layers + layer) * 2 + 1) * plane - c * plane
                for t in range(c * bt, min(end, c * bt + bt)):
                    _to_f32(kv, at + t * e, e, bits, row)
                    for j in range(max(t - first, j0), j1):
                        for h in range(qh):
                            g = h // group
                            w = p[j - j0, h, t]
                            for d in range(hd):
                                oi[j, h, d] += w * heads[g, d]
        qs += nq
    return OK, out


# -- value types -------------------------------------------------------------

class PoolExhaustedError(MemoryError):
    """Not enough free blocks for a request, even after allowed evictions."""

    def __init__(self, needed, free):
        super().__init__(needed, free)      # so that it pickles
        self.needed = needed
        self.free = free

    def __str__(self):
        return (f"need {self.needed} blocks but only {self.free} are free"
                " (and nothing more can be evicted)")


@dataclasses.dataclass(frozen=True, order=True)
class CacheKey:
    """The documented cache key: a name and an integer id, e.g. a sequence."""
    name: str
    id: int

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"CacheKey name must be a str, got {self.name!r}")
        if isinstance(self.id, bool) or not isinstance(self.id, int):
            raise TypeError(f"CacheKey id must be an int, got {self.id!r}")


class KVPoolEntry:
    """A cache entry: ``key``, ``size`` in bytes, its first ``block``,
    ``n_blocks``, ``pinned``, and ``blocks`` (all ids, in order; a read-only
    array built on first use). Treat it as read-only: the manager updates it
    on resize and pin, and freezes it when the entry is removed.

    A removed entry keeps ``key``, ``size``, ``block`` and ``n_blocks``; its
    ``blocks`` stay readable if they were read while it was live (or it had
    one block). Otherwise they are gone with the entry (recording them on
    every removal would cost an array per call): ``ValueError``. Eviction
    reports always carry them."""

    __slots__ = ("key", "size", "block", "n_blocks", "pinned", "_blocks", "_pool")

    def __init__(self, key, size, block, n_blocks, pool):
        self.key = key
        self.size = size
        self.block = block
        self.n_blocks = n_blocks
        self.pinned = False
        self._blocks = None
        self._pool = pool            # None once removed

    @property
    def blocks(self):
        if self._blocks is None:
            if self._pool is None and self.n_blocks > 1:
                raise ValueError(f"entry {self.key!r} was removed before its "
                                 "blocks were read; its eviction report "
                                 "carries them")
            if self.n_blocks == 1:
                ids = np.array([self.block], np.int64)
            else:
                ids = self._pool.chain_blocks(self.block, self.n_blocks)
            ids.flags.writeable = False
            self._blocks = ids
        return self._blocks

    def _known_blocks(self):
        """``blocks``, or None where a removed entry no longer knows them."""
        if self._pool is None and self._blocks is None and self.n_blocks > 1:
            return None
        return self.blocks

    def __eq__(self, other):
        if not isinstance(other, KVPoolEntry):
            return NotImplemented
        if self is other:
            return True
        mine, theirs = self._known_blocks(), other._known_blocks()
        return ((self.key, self.size, self.block, self.n_blocks, self.pinned)
                == (other.key, other.size, other.block, other.n_blocks,
                    other.pinned)
                and (mine is None) == (theirs is None)
                and (mine is None or np.array_equal(mine, theirs)))

    __hash__ = None

    def __repr__(self):
        return (f"KVPoolEntry(key={self.key!r}, size={self.size}, "
                f"block={self.block}, n_blocks={self.n_blocks}"
                f"{', pinned' if self.pinned else ''})")


class _Snapshot:
    """A frozen dataclass of plain values, with a dict form for JSON."""

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PoolStats(_Snapshot):
    """A snapshot of a manager's statistics.

    total_capacity     usable bytes: total_blocks * block_size
    used_memory        bytes requested by live entries (sum of sizes)
    active_entries     live entries
    allocations        successful allocate_entry(ies) entries since reset
    evictions          removals since reset, all reasons (the sum of the next three)
    manual_evictions   removals by remove_cache_entry(ies)
    lru_evictions      removals by the LRU policy
    clear_evictions    removals by clear()
    fragmentation      internal fragmentation: 1 - used_memory /
                       (used_blocks * block_size); 0.0 with no block in use
    block_size         bytes per block
    total_blocks       blocks in the arena
    used_blocks        blocks handed out (entries', plus any taken from the pool directly)
    free_blocks        blocks that can be handed out now
    peak_used_blocks   the most blocks in use at once since reset
    hits, misses       lookups through m[key] / m.get(key) that found / missed
    pinned_entries     live entries that the LRU policy may not evict
    """
    total_capacity: int
    used_memory: int
    active_entries: int
    allocations: int
    evictions: int
    manual_evictions: int
    lru_evictions: int
    clear_evictions: int
    fragmentation: float
    block_size: int
    total_blocks: int
    used_blocks: int
    free_blocks: int
    peak_used_blocks: int
    hits: int
    misses: int
    pinned_entries: int


@dataclasses.dataclass(frozen=True)
class EvictionReport:
    """What one removal did: delivered to eviction listeners."""
    key: object
    reason: str                  # "manual", "lru" or "clear"
    size: int                    # the entry's size in bytes
    blocks: tuple                # its block ids, in order
    blocks_freed: int
    bytes_freed: int             # blocks_freed * block_size
    stats_before: PoolStats
    stats_after: PoolStats
    timestamp: float             # time.monotonic() at the removal

    def to_dict(self):
        """Plain JSON-serializable values. The key takes the form a snapshot
        file gives it (``{"CacheKey": ["seq", 7]}``, ``{"str": "a"}``, ...;
        see ``_key_to_json``), or ``{"repr": repr(key)}`` for a key that
        cannot be saved."""
        try:
            key = _key_to_json(self.key)
        except TypeError:
            key = {"repr": repr(self.key)}
        return {
            "key": key, "reason": self.reason, "size": self.size,
            "blocks": list(self.blocks), "blocks_freed": self.blocks_freed,
            "bytes_freed": self.bytes_freed,
            "stats_before": self.stats_before.to_dict(),
            "stats_after": self.stats_after.to_dict(),
            "timestamp": self.timestamp,
        }


@dataclasses.dataclass(frozen=True)
class PagedStats(_Snapshot):
    """A snapshot of a paged cache's statistics.

    num_blocks         blocks in the arena
    block_tokens       token slots per block
    free_blocks        blocks that can be handed out now
    used_blocks        blocks held by sequences
    peak_used_blocks   the most blocks in use at once
    sequences          live sequences
    tokens             their tokens (reserved slots)
    preemptions        sequences freed by preempt="newest"
    unused_slots       internal fragmentation: the free slots in the
                       sequences' last blocks
    fragmentation      unused_slots / (used_blocks * block_tokens), or 0.0
    prefix_requests    sequences added with prefix caching on
    prefix_queries     their prompt tokens, looked up
    prefix_hits        prompt tokens found cached (shared, not computed)
    prefix_hit_rate    prefix_hits / prefix_queries, or 0.0
    cached_blocks      free blocks still findable by their hash
    shared_blocks      blocks held by more than one sequence
    cow_copies         shared blocks copied before an append wrote to them
    """
    num_blocks: int
    block_tokens: int
    free_blocks: int
    used_blocks: int
    peak_used_blocks: int
    sequences: int
    tokens: int
    preemptions: int
    unused_slots: int
    fragmentation: float
    prefix_requests: int
    prefix_queries: int
    prefix_hits: int
    prefix_hit_rate: float
    cached_blocks: int
    shared_blocks: int
    cow_copies: int


@dataclasses.dataclass(frozen=True)
class SequenceReport:
    """A sequence leaving a paged cache: delivered to its listeners."""
    seq: object
    reason: str              # "remove" or "preempt"
    length: int              # its tokens
    blocks_freed: int        # blocks no other sequence held
    timestamp: float         # time.monotonic() at the removal


class SeqRows:
    """A batch of sequences placed in rows 0..B-1 of a paged cache's block
    table, made by ``PagedKVCache.rows(seqs)``. ``append``, ``block_table``,
    ``attention``, ``gather`` and ``blocks_needed`` take it in place of the
    sequence ids and then do no lookups or allocations: ``block_table``
    returns views of the cache's table, and ``append`` returns the handle's
    own slot array, overwritten by its next ``append``.
    A handle goes stale (``KeyError`` when used) once one of its sequences
    is removed, preempted or moved by a later ``rows`` call."""

    __slots__ = ("seqs", "_batch", "_cache", "_width", "_epoch")

    def __init__(self, seqs, batch, cache):
        self.seqs = seqs          # tuple of the sequence ids, in row order
        self._batch = batch       # int64 [3, B]: rows, generations, slots
        self._cache = cache
        self._width = 0           # the rows' most blocks, known while the
        self._epoch = -1          # cache's epoch is still this one

    def __len__(self):
        return len(self.seqs)

    def __repr__(self):
        return f"SeqRows({len(self.seqs)} sequences)"


_I64 = np.dtype(np.int64)


def _deliver(listeners, reports):
    """Hand each report to each listener (the manager's and the paged
    cache's); a listener's exception propagates after the state change is
    complete, and later reports are still sent."""
    error = None
    for report in reports:
        for fn in list(listeners):
            try:
                fn(report)
            except BaseException as exc:       # noqa: BLE001 - re-raised
                if error is None:
                    error = exc
    if error is not None:
        raise error


# -- argument checks ---------------------------------------------------------

def _as_int(value, name):
    """``value`` as an int: ints and numpy integers, never bools or floats."""
    if type(value) is int:
        return value
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} of type "
                        f"{type(value).__name__}") from None


def _refuse_unhashable(keys):
    """Raise ``TypeError`` naming the first of ``keys`` that cannot be hashed.
    The one place that words this error: a dict lookup that raised
    ``TypeError`` calls it, then re-raises the original when every key
    hashes (the error came from comparing a key, and says so itself)."""
    for key in keys:
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"key {key!r} is not hashable") from None


def _as_bytes(data):
    """The raw bytes of ``data`` as a contiguous 1-D ``uint8`` array, read-only
    or not (a copy only when ``data`` is not C-contiguous)."""
    if isinstance(data, np.ndarray):
        arr = np.asarray(data)  # a plain ndarray: subclasses keep their shape
    elif isinstance(data, (bytes, bytearray)):
        arr = np.frombuffer(data, np.uint8)
    elif isinstance(data, memoryview):
        arr = np.asarray(data)
    else:
        raise TypeError(f"data must be bytes, bytearray, memoryview or a numpy "
                        f"array, got {type(data).__name__}")
    if arr.dtype.hasobject:
        raise TypeError(f"cannot write an array of dtype {arr.dtype}: it holds "
                        "Python objects, not bytes")
    if not arr.flags.c_contiguous:
        arr = arr.copy()        # one compiled signature serves every input
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr if arr.dtype is _UINT8 else arr.view(np.uint8)


def _as_arena(buffer, total_size):
    """Check a user buffer for use as the arena; a 1-D ndarray view of it."""
    if not isinstance(buffer, np.ndarray):
        raise TypeError(f"buffer must be a numpy uint8 array, got "
                        f"{type(buffer).__name__}")
    if buffer.dtype != np.uint8:
        raise TypeError(f"buffer must have dtype uint8, got {buffer.dtype}")
    if not buffer.flags.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if not buffer.flags.writeable:
        raise ValueError("buffer must be writable")
    if buffer.size < total_size:
        raise ValueError(f"buffer holds {buffer.size} bytes, fewer than "
                         f"total_size {total_size}")
    return buffer.view(np.ndarray).reshape(-1)


# -- persistence: keys as JSON, the snapshot file -----------------------------

_INT64_MIN, _INT64_END = -(1 << 63), 1 << 63
_HEX_INT = re.compile(r"-?0x[0-9a-f]+")


def _int_to_json(value):
    """An int as JSON: a number when it fits in 64 bits, else a hex string
    such as ``"-0x1f"`` (Python refuses decimal conversions of more than
    about 4,300 digits, in both directions; base 16 has no such limit)."""
    return value if _INT64_MIN <= value < _INT64_END else hex(value)


def _int_from_json(value):
    """Inverse of ``_int_to_json`` (either form); None for anything else."""
    if type(value) is int:
        return value
    if type(value) is str and _HEX_INT.fullmatch(value):
        return int(value, 16)
    return None


def _key_to_json(key):
    """The one JSON form of a savable key, used by snapshot files and by
    ``EvictionReport.to_dict``: ``{"CacheKey": [name, id]}``, ``{"str": s}``,
    ``{"bytes": hex}``, ``{"int": n}`` or ``{"tuple": [...]}``, ints as
    ``_int_to_json`` writes them. Exactly these types: a subclass (a
    ``CacheKey`` subclass, an ``IntEnum``, a namedtuple) would load as its
    base type, a different key, so it is refused with ``TypeError``."""
    kind = type(key)
    if kind is CacheKey and type(key.name) is str and type(key.id) is int:
        return {"CacheKey": [key.name, _int_to_json(key.id)]}
    if kind is str:
        return {"str": key}
    if kind is bytes:
        return {"bytes": key.hex()}
    if kind is int:
        return {"int": _int_to_json(key)}
    if kind is tuple:
        return {"tuple": [_key_to_json(k) for k in key]}
    for base in (CacheKey, str, bytes, int, tuple):
        if isinstance(key, base) and not isinstance(key, bool):
            raise TypeError(
                f"key {key!r} of type {kind.__name__} (a subclass of "
                f"{base.__name__}, or holding one) cannot be saved: it would "
                f"load as a plain {base.__name__}, a different key")
    raise TypeError(f"key {key!r} of type {kind.__name__} cannot be saved; "
                    "savable keys are CacheKey, str, int, bytes and tuples "
                    "of these (exactly these types)")


def _key_from_json(value):
    """Inverse of ``_key_to_json``; ``ValueError`` on anything else."""
    if type(value) is dict and len(value) == 1:
        (tag, v), = value.items()
        if tag == "CacheKey" and type(v) is list and len(v) == 2:
            name, id_ = v[0], _int_from_json(v[1])
            if type(name) is str and id_ is not None:
                return CacheKey(name, id_)
        if tag == "str" and type(v) is str:
            return v
        if tag == "bytes" and type(v) is str:
            return bytes.fromhex(v)
        if tag == "int" and _int_from_json(v) is not None:
            return _int_from_json(v)
        if tag == "tuple" and type(v) is list:
            return tuple(_key_from_json(k) for k in v)
    raise ValueError(f"malformed key in snapshot: {value!r}")


def _write_snapshot(path, meta, arrays, keys):
    """Write ``meta`` (with the keys' JSON) and ``arrays`` to one ``.npz``
    at ``path`` (a str), atomically: a temporary file in the same directory,
    renamed into place. ``TypeError``, and nothing written, for a key that
    cannot be saved."""
    meta = dict(meta, keys=[_key_to_json(k) for k in keys])
    arrays = dict(arrays, meta=np.frombuffer(json.dumps(meta).encode(),
                                             np.uint8))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix=".kvpool-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                # mkstemp's 0600 is for secrets
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_snapshot(path):
    """(meta, arrays, keys) from a file ``_write_snapshot`` wrote at ``path``
    (a str). Never unpickles. Each array is read once into a new array of
    its own (the arena is then adopted by the manager, not copied);
    ``ValueError`` for a file that is not such a snapshot."""
    with open(path, "rb") as f:
        try:
            with np.load(f, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
            meta = json.loads(arrays.pop("meta").tobytes())
            keys = [_key_from_json(k) for k in meta.pop("keys")]
        except Exception as exc:                # noqa: BLE001 - reworded
            raise ValueError(f"{path!r} is not a readable kvpool snapshot: "
                             f"{exc}") from None
    return meta, arrays, keys


# -- the manager -------------------------------------------------------------

_N_BLOCKS = operator.attrgetter("n_blocks")


class _CacheView(collections.abc.Mapping):
    """``m.cache``: see that property. Iteration copies the keys (or items)
    under the manager's lock, as ``iter(m)`` does."""

    __slots__ = ("_m",)

    def __init__(self, manager):
        self._m = manager

    def __getitem__(self, key):
        entry = self._m.peek(key)
        if entry is None:
            raise KeyError(f"no live entry for key {key!r}")
        return entry

    def __contains__(self, key):
        return key in self._m

    def __len__(self):
        return len(self._m._cache)

    def __iter__(self):
        return iter(self._m)

    def _items(self):
        with self._m._lock:
            return list(self._m._cache.items())

    def items(self):
        return _SnapshotItems(self)

    def values(self):
        return _SnapshotValues(self)

    def __repr__(self):
        return f"<cache view of {self._m!r}>"


class _SnapshotItems(collections.abc.ItemsView):
    __slots__ = ()

    def __iter__(self):
        return iter(self._mapping._items())


class _SnapshotValues(collections.abc.ValuesView):
    __slots__ = ()

    def __iter__(self):
        return (entry for _, entry in self._mapping._items())


class KVCacheManager:
    """Cache entries over a ``MemoryPool``: keys, eviction, bytes, stats.

    ``KVCacheManager(total_size, block_size=64, *, eviction="none",
    zero_on_alloc=True, buffer=None, on_evict=None)``

    Adding and removing: ``allocate_entry``, ``allocate_entries``,
    ``resize_entry``, ``remove_cache_entry``, ``remove_cache_entries``,
    ``clear``.
    Looking up (a read-only mapping, iterated least to most recently used):
    ``m[key]``, ``get``, ``peek``, ``in``, ``len``, ``iter``, ``cache``.
    Recency and pinning: ``touch``, ``pin``, ``unpin``, ``unpin_all``.
    Bytes: ``write``, ``read``, ``views``, ``block_view``.
    Statistics: ``stats``, ``get_stats``, ``reset_stats``, ``free_blocks``,
    listeners.
    Persistence: ``save``, ``load``, pickle and deepcopy.
    Audit: ``check_invariants``.

    Every public operation that reads or changes entries, counters or bytes
    holds one lock, so a manager may be shared between threads. These take
    none: ``len`` and ``in`` (one read of the dict each), ``block_view`` (a
    view of the arena, no entry involved), the properties ``eviction``,
    ``block_size``, ``zero_on_alloc`` and ``cache`` (the view's lookups and
    iteration do lock), ``load`` (a manager no one else has yet), and
    ``m.pool`` itself, which, driven directly or from compiled code, is the
    caller's to guard. Arguments are converted before the lock is taken.
    Eviction listeners run after it is released. The per-entry hot paths (``allocate_entry``, ``resize_entry``,
    ``remove_cache_entry``, ``get``, ``m[key]``) take it with ``acquire`` and
    ``try``/``finally`` instead of ``with``: about 90 ns less per call.
    Every argument is checked before anything changes: a bad call raises and
    leaves the manager as it was.
    """

    def __init__(self, total_size, block_size=64, *, eviction="none",
                 zero_on_alloc=True, buffer=None, on_evict=None):
        total_size = _as_int(total_size, "total_size")
        block_size = _as_int(block_size, "block_size")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if total_size >= 1 << 63:
            raise ValueError(f"total_size {total_size} does not fit in int64")
        if total_size < block_size:
            raise ValueError(f"total_size {total_size} is smaller than one "
                             f"block of {block_size} bytes")
        if eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction must be one of {EVICTION_POLICIES}, "
                             f"got {eviction!r}")
        if not isinstance(zero_on_alloc, (bool, np.bool_)):
            raise TypeError(f"zero_on_alloc must be a bool, got {zero_on_alloc!r}")
        zero_on_alloc = bool(zero_on_alloc)
        if on_evict is not None and not callable(on_evict):
            raise TypeError(f"on_evict must be callable, got {on_evict!r}")
        if buffer is None:      # zeroed lazily by the OS, page by page
            arena = np.zeros(total_size - total_size % block_size, np.uint8)
        else:
            arena = _as_arena(buffer, total_size)
        self._pool = _PlainPool(total_size, block_size, arena)
        self._jitpool = None                   # the jitclass, built on demand
        self._arena = self._pool.arena         # the kernels' two arrays,
        self._meta = self._pool.meta           # fetched once
        self._block_size = block_size
        self._capacity = self._pool.capacity
        self._eviction = eviction
        self._zero = zero_on_alloc
        self._zeroing = self._arena if zero_on_alloc else None   # see _Kernels
        self._cache = collections.OrderedDict()    # key -> entry, LRU first
        self._lock = threading.RLock()
        self._listeners = [] if on_evict is None else [on_evict]
        self._reset_counters()
        # The seed design's cross-check: a count kept apart from len(cache)
        # so that the O(1) asserts after each mutation (active_entries ==
        # len(cache)) and check_invariants have two independent counts to
        # compare. Stats read it; nothing else depends on it.
        self._active_entries = 0
        self._used_memory = 0
        self._pinned_entries = 0
        self._pinned_lru_evictions = 0     # must stay 0: audited

    def _reset_counters(self):
        self._allocations = 0
        self._evictions = dict.fromkeys(REASONS, 0)
        self._hits = 0
        self._misses = 0

    # argument checks -------------------------------------------------------

    def _blocks_for(self, size, name="size"):
        """(blocks, size) for a requested size, or the error a user can act on."""
        if type(size) is not int:
            size = _as_int(size, name)
        if size <= 0:
            raise ValueError(f"{name} must be positive, got {size}")
        if size > self._capacity:
            raise ValueError(f"{name} {size} exceeds the pool's total capacity "
                             f"of {self._capacity} bytes")
        return -(-size // self._block_size), size

    def _get(self, key):
        """The live entry for ``key`` or None; ``TypeError`` naming an
        unhashable key."""
        try:
            return self._cache.get(key)
        except TypeError:
            _refuse_unhashable((key,))
            raise

    def _entry(self, key):
        """The live entry for ``key``; ``KeyError`` naming it if absent."""
        try:
            return self._cache[key]
        except KeyError:
            pass
        except TypeError:
            _refuse_unhashable((key,))
            raise
        raise KeyError(f"no live entry for key {key!r}")

    def _blocks_for_all(self, sizes):
        """(blocks, sizes) for many sizes: an int64 array of block counts and
        a list of ints. Vectorized when all are plain ints (or an integer
        array) in range, else the first bad one's error, naming its index."""
        flat = None                 # the sizes as an int64 array, if plainly ints
        if isinstance(sizes, np.ndarray):
            items = np.asarray(sizes).reshape(-1)
            if items.dtype.kind in "iu":
                flat = items
            elif items.dtype.kind != "O":   # tolist() makes ints of some
                raise TypeError(f"sizes must be integers, got an array of "
                                f"dtype {items.dtype}")
        else:
            items = list(sizes)
            if list(map(type, items)).count(int) == len(items):  # no bools
                try:
                    flat = np.fromiter(items, np.int64, len(items))
                except OverflowError:
                    pass
        if flat is not None and (flat.size == 0 or (
                flat.min() > 0 and flat.max() <= self._capacity)):
            flat = flat.astype(np.int64, copy=False)
            if isinstance(items, np.ndarray):
                items = flat.tolist()
            return -(-flat // self._block_size), items
        if isinstance(items, np.ndarray):
            items = items.tolist()
        pairs = [self._blocks_for(size, f"sizes[{i}]")
                 for i, size in enumerate(items)]
        return (np.array([p[0] for p in pairs], np.int64),
                [p[1] for p in pairs])

    def _check_new_keys(self, keys):
        """``_check_new_key`` for many keys, also refusing repeats."""
        try:
            fresh = set(keys)
        except TypeError:
            _refuse_unhashable(keys)
            raise
        if len(fresh) != len(keys):
            seen = set()
            for key in keys:
                if key in seen:
                    raise KeyError(f"key {key!r} appears twice in keys")
                seen.add(key)
        if not self._cache.keys().isdisjoint(fresh):   # walks the smaller
            for key in keys:
                self._check_new_key(key)       # raises for the first live one

    def _check_new_key(self, key):
        try:
            if key not in self._cache:
                return
        except TypeError:
            _refuse_unhashable((key,))
            raise
        raise KeyError(f"key {key!r} is already live; remove or resize "
                       "its entry instead")

    # adding ------------------------------------------------------------------

    def allocate_entry(self, key, size):
        """A new entry of ``size`` bytes under ``key``, most recently used.

        Takes ``ceil(size / block_size)`` blocks in the pool's order in one
        compiled call; under ``"lru"`` evicts least recently used unpinned
        entries first if needed (all-or-nothing). Raises ``ValueError`` /
        ``TypeError`` for a bad size, ``KeyError`` for a live key,
        ``PoolExhaustedError`` when the blocks cannot be had.
        Runtime complexity: O(blocks).
        """
        self._lock.acquire()    # not "with": see the class docstring
        try:
            if type(size) is int and 0 < size <= self._capacity:
                n = -(-size // self._block_size)            # the common case
            else:
                n, size = self._blocks_for(size)
            try:
                live = key in self._cache       # (inline: the common case)
            except TypeError:
                live = True
            if live:
                self._check_new_key(key)        # raises, naming the key
            head = _K["alloc_chain"](self._zeroing, self._meta, n, self._zero)
            reports = None
            if head < 0:
                reports = self._make_room(n, None)
                head = _K["alloc_chain"](self._zeroing, self._meta, n, self._zero)
                assert head >= 0, f"no {n} blocks free after making room"
            entry = KVPoolEntry(key, size, head, n, self._pool)
            self._cache[key] = entry
            self._allocations += 1
            self._active_entries += 1
            self._used_memory += size
            assert self._active_entries == len(self._cache), (
                f"active_entries={self._active_entries} != "
                f"len(cache)={len(self._cache)}")
        finally:
            self._lock.release()
        if reports:
            _deliver(self._listeners, reports)
        return entry

    def allocate_entries(self, keys, sizes):
        """Many new entries at once, in order, all-or-nothing; one compiled
        call takes all their blocks. The error names the first bad key or
        size, or how many blocks were missing. Runtime complexity:
        O(entries + blocks), the checks vectorized."""
        with self._lock:
            keys = list(keys)
            counts, sizes = self._blocks_for_all(sizes)
            if len(keys) != len(sizes):
                raise ValueError(f"got {len(keys)} keys but {len(sizes)} sizes")
            self._check_new_keys(keys)
            if not keys:
                return []
            alloc_chains = _K["alloc_chains"]
            heads = alloc_chains(self._arena, self._meta, counts,
                                 self._zero)
            reports = None
            if heads.shape[0] == 0:
                reports = self._make_room(int(counts.sum()), None)
                heads = alloc_chains(self._arena, self._meta, counts,
                                 self._zero)
                assert heads.shape[0] == len(keys), "blocks vanished"
            entries = list(map(KVPoolEntry, keys, sizes, heads.tolist(),
                               counts.tolist(), itertools.repeat(self._pool)))
            cache = self._cache
            for key, entry in zip(keys, entries):   # faster than update()
                cache[key] = entry
            self._used_memory += sum(sizes)
            self._allocations += len(entries)
            self._active_entries += len(entries)
            assert self._active_entries == len(self._cache), (
                f"active_entries={self._active_entries} != "
                f"len(cache)={len(self._cache)}")
        if reports:
            _deliver(self._listeners, reports)
        return entries

    def resize_entry(self, key, new_size):
        """Change an entry's size in place, as a decoding sequence grows.

        Existing blocks keep their ids, order and bytes; growth appends blocks
        only when ``new_size`` crosses a block boundary (evicting others under
        ``"lru"``, never this entry); shrinking returns whole tail blocks.
        The entry becomes most recently used. A resize that cannot be
        satisfied changes nothing. One compiled call (three if it evicts),
        none when it grows within its last block: with ``zero_on_alloc`` the
        bytes past an entry's size are zero already (blocks are zeroed when
        taken, a shrink zeroes what it cuts off, ``load`` zeroes them), unless
        you wrote there through the arena itself (``block_view``, an old
        ``views`` result, ``pool.arena``).
        """
        self._lock.acquire()    # not "with": see the class docstring
        try:
            if type(new_size) is int and 0 < new_size <= self._capacity:
                n_new = -(-new_size // self._block_size)    # the common case
            else:
                n_new, new_size = self._blocks_for(new_size, "new_size")
            try:
                entry = self._cache[key]
            except (KeyError, TypeError):
                entry = self._entry(key)        # raises, naming the key
            n_old = entry.n_blocks
            reports = None
            if n_new != n_old or (self._zero and new_size < entry.size):
                resize = _K["resize_chain"]
                cut = min(entry.size, new_size)
                status = resize(self._zeroing, self._meta, entry.block, n_old,
                                n_new, cut, self._zero)
                if status == ERR_NO_SPACE:
                    reports = self._make_room(n_new - n_old, entry)
                    status = resize(self._zeroing, self._meta, entry.block,
                                    n_old, n_new, cut, self._zero)
                assert status == OK, f"resize_chain failed with status {status}"
            self._used_memory += new_size - entry.size
            entry.size = new_size
            if n_new != n_old:
                entry.n_blocks = n_new
                entry._blocks = None
            self._cache.move_to_end(key)
        finally:
            self._lock.release()
        if reports:
            _deliver(self._listeners, reports)
        return entry

    # removing ----------------------------------------------------------------

    def remove_cache_entry(self, key):
        """Remove ``key``'s entry and free its blocks to the free list's tail
        (reused after the blocks freed before them, before never-used ones);
        return the entry, or None if absent. Pinned entries are removed too.
        One compiled call."""
        self._lock.acquire()    # not "with": see the class docstring
        try:
            try:
                entry = self._cache.get(key)
            except TypeError:
                _refuse_unhashable((key,))
                raise
            if entry is None:
                return None
            reports = self._release((entry,), "manual")
        finally:
            self._lock.release()
        if reports:
            _deliver(self._listeners, reports)
        return entry

    def remove_cache_entries(self, keys):
        """Remove many entries in one compiled call; a list of the removed
        entries, None where a key was absent or its entry was already named
        earlier in ``keys`` (as one by one, in order)."""
        with self._lock:
            keys = list(keys)
            try:
                result = list(map(self._cache.get, keys))
            except TypeError:
                _refuse_unhashable(keys)
                raise
            found = [e for e in result if e is not None]
            if len(set(map(id, found))) != len(found):
                # A repeat, by entry rather than by key (two keys that are
                # not equal may both equal the stored one): it finds its
                # entry gone, as one by one.
                seen = set()
                for i, entry in enumerate(result):
                    if entry is not None:
                        if id(entry) in seen:
                            result[i] = None
                        seen.add(id(entry))
                found = [e for e in result if e is not None]
            reports = self._release(found, "manual")
        if reports:
            _deliver(self._listeners, reports)
        return result

    def clear(self):
        """Remove every entry, pinned ones too (reason ``"clear"``)."""
        with self._lock:
            reports = self._release(list(self._cache.values()), "clear")
        if reports:
            _deliver(self._listeners, reports)

    def _make_room(self, need, keep):
        """The one eviction hook: free least recently used unpinned entries
        (never ``keep``) until ``need`` blocks are free, or raise
        ``PoolExhaustedError`` having evicted nothing."""
        free = self._pool.free_blocks
        victims = []
        if self._eviction == "lru":
            for entry in self._cache.values():
                if free >= need:
                    break
                if not entry.pinned and entry is not keep:
                    victims.append(entry)
                    free += entry.n_blocks
        if free < need:
            raise PoolExhaustedError(need, self._pool.free_blocks)
        return self._release(victims, "lru")

    def _release(self, entries, reason):
        """The one removal path: free the entries' blocks in one compiled call,
        then forget them; the reports, if anyone listens."""
        pool = self._pool
        if not entries:
            return None
        if len(entries) == 1 and not self._listeners:   # the common case
            entry = entries[0]
            status = _K["free_chain"](self._meta, entry.block,
                                      entry.n_blocks)
            assert status == OK, f"entry {entry!r} has no valid chain"
            self._forget(entries, reason)
            return None
        heads = np.fromiter([e.block for e in entries], np.int64, len(entries))
        ids = _K["free_chains"](self._meta, heads)
        assert ids.shape[0] > 0, "an entry has no valid chain"
        if not self._listeners:
            self._forget(entries, reason)
            return None
        reports = []
        used = pool.used_blocks + len(ids)      # as if removed one by one
        now = time.monotonic()
        ends = np.cumsum(list(map(_N_BLOCKS, entries)))[:-1]
        for entry, run in zip(entries, np.split(ids, ends)):
            before = self._snapshot(used)
            used -= entry.n_blocks
            self._forget((entry,), reason, (run,))
            reports.append(EvictionReport(
                entry.key, reason, entry.size, tuple(run.tolist()),
                entry.n_blocks, entry.n_blocks * self._block_size,
                before, self._snapshot(used), now))
        return reports

    def _forget(self, entries, reason, runs=()):
        """Drop freed entries from the cache and the counters and freeze them,
        keeping ``runs[i]`` as entry i's blocks when given."""
        cache = self._cache
        size = pinned = 0
        for entry in entries:
            del cache[entry.key]
            entry._pool = None
            size += entry.size
            if entry.pinned:
                pinned += 1
        if runs:
            for entry, ids in zip(entries, runs):
                if entry._blocks is None:
                    ids.flags.writeable = False
                    entry._blocks = ids
        self._active_entries -= len(entries)
        self._used_memory -= size
        self._evictions[reason] += len(entries)
        if pinned:
            self._pinned_entries -= pinned
            if reason == "lru":
                self._pinned_lru_evictions += pinned
        assert self._active_entries == len(cache), (
            f"active_entries={self._active_entries} != len(cache)={len(cache)}")

    # listeners -----------------------------------------------------------------

    def add_eviction_listener(self, fn):
        """Call ``fn(report)`` after every removal, once the state is final."""
        if not callable(fn):
            raise TypeError(f"listener must be callable, got {fn!r}")
        with self._lock:
            self._listeners.append(fn)

    def remove_eviction_listener(self, fn):
        with self._lock:
            try:
                self._listeners.remove(fn)
            except ValueError:
                raise ValueError(f"{fn!r} is not a registered listener") from None

    # lookups and the mapping face ----------------------------------------------

    def _lookup(self, key):
        """The entry or None, counting a hit (and making it most recently
        used) or a miss."""
        try:
            entry = self._cache.get(key)
        except TypeError:
            _refuse_unhashable((key,))
            raise
        if entry is None:
            self._misses += 1
        else:
            self._hits += 1
            self._cache.move_to_end(key)
        return entry

    def __getitem__(self, key):
        """The entry for ``key``, made most recently used; counts a hit or a
        miss; ``KeyError`` naming the key if absent."""
        self._lock.acquire()    # not "with": see the class docstring
        try:
            entry = self._lookup(key)
        finally:
            self._lock.release()
        if entry is None:
            raise KeyError(f"no live entry for key {key!r}")
        return entry

    def get(self, key, default=None):
        """``m[key]``, or ``default`` when absent (still a miss)."""
        self._lock.acquire()    # not "with": see the class docstring
        try:
            entry = self._lookup(key)
        finally:
            self._lock.release()
        return default if entry is None else entry

    def peek(self, key, default=None):
        """The entry, or ``default``: no recency change, no hit or miss."""
        with self._lock:
            entry = self._get(key)
            return default if entry is None else entry

    def __contains__(self, key):
        try:
            return key in self._cache
        except TypeError:
            _refuse_unhashable((key,))
            raise

    def __len__(self):
        return len(self._cache)

    def __iter__(self):
        """Keys from least to most recently used (a copy: safe to mutate)."""
        with self._lock:
            return iter(list(self._cache))

    @property
    def cache(self):
        """A read-only view of the key -> entry mapping, least to most
        recently used. Lookups through it are ``peek``s (no recency change,
        no hit or miss) and it sees every later change; iterating it, or its
        ``keys()``, ``values()`` or ``items()``, walks a snapshot taken when
        the loop starts, so the loop may call ``m[k]``, ``get``, ``read`` or
        remove entries (a key removed meanwhile is still yielded)."""
        return _CacheView(self)

    @property
    def pool(self):
        """The ``MemoryPool`` jitclass over this manager's arrays, to pass to
        your own ``@numba.njit`` code. Built on first use: the jitclass
        compiles then (2-4 s once per process; it cannot be cached on disk),
        which the manager itself never needs. The block API is yours; the
        chain API is the manager's (used on its entries, it corrupts it)."""
        if self._jitpool is None:
            self._jitpool = _jitclass_over(self._pool)
        return self._jitpool

    @property
    def eviction(self):
        return self._eviction

    @property
    def block_size(self):
        return self._block_size

    @property
    def free_blocks(self):
        """Blocks that can be handed out now, read straight from the pool's
        counters (far cheaper than ``stats``, and no lock: a single read)."""
        return self._pool.free_blocks

    @property
    def zero_on_alloc(self):
        return self._zero

    def touch(self, key):
        """Make ``key``'s entry most recently used (no hit counted)."""
        with self._lock:
            self._entry(key)
            self._cache.move_to_end(key)

    def pin(self, key):
        """Protect an entry from automatic eviction (not from removal)."""
        with self._lock:
            entry = self._entry(key)
            if not entry.pinned:
                entry.pinned = True
                self._pinned_entries += 1

    def unpin(self, key):
        with self._lock:
            entry = self._entry(key)
            if entry.pinned:
                entry.pinned = False
                self._pinned_entries -= 1

    def unpin_all(self):
        with self._lock:
            for entry in self._cache.values():
                entry.pinned = False
            self._pinned_entries = 0

    # bytes -----------------------------------------------------------------------

    @staticmethod
    def _span(entry, offset, nbytes):
        """Refuse ``nbytes`` at ``offset`` (ints) unless they fit the entry."""
        if offset < 0 or offset + nbytes > entry.size:
            raise ValueError(f"{nbytes} bytes at offset {offset} do not fit in "
                             f"the entry of {entry.size} bytes")

    def write(self, key, data, offset=0):
        """Copy the raw bytes of ``data`` into the entry from byte ``offset``,
        across block boundaries, in one compiled call; ``ValueError`` (and
        nothing written) if they would not fit. The entry becomes most
        recently used."""
        raw = _as_bytes(data)
        offset = _as_int(offset, "offset")
        with self._lock:
            entry = self._entry(key)
            self._span(entry, offset, raw.shape[0])
            status = _K["write_chain"](self._arena, self._meta, entry.block,
                                       entry.n_blocks, offset, raw)
            assert status == OK, f"write_chain failed with status {status}"
            self._cache.move_to_end(key)

    def read(self, key, dtype=np.uint8, offset=0, count=-1, *, out=None):
        """A new array of ``count`` items of ``dtype`` (all the rest of the
        entry when -1) read from byte ``offset``, in one compiled call. The
        entry becomes most recently used.

        With ``out`` the items go there instead and ``out`` is returned, with
        no allocation: a writable, C-contiguous numpy array of ``dtype``, of
        any shape, holding exactly the items read, and not a view of the
        arena (checked, like every argument, before anything changes).
        A subarray dtype such as ``("f4", (2,))`` is refused: read its base
        dtype and reshape.
        """
        if dtype is None:
            raise TypeError("dtype must be given, not None")
        dtype = _UINT8 if dtype is np.uint8 else np.dtype(dtype)
        if dtype.hasobject or dtype.itemsize == 0:
            raise TypeError(f"cannot read items of dtype {dtype}")
        if dtype.subdtype is not None:
            raise TypeError(f"cannot read items of the subarray dtype {dtype}: "
                            f"read {dtype.base} and reshape to "
                            f"(-1, {', '.join(map(str, dtype.shape))})")
        offset = _as_int(offset, "offset")
        count = _as_int(count, "count")
        if count < -1:
            raise ValueError(f"count must be -1 or >= 0, got {count}")
        if out is not None:
            into = self._out_bytes(out, dtype)
        with self._lock:
            entry = self._entry(key)
            if not 0 <= offset <= entry.size:
                raise ValueError(f"offset {offset} is outside the entry of "
                                 f"{entry.size} bytes")
            if count == -1:
                nbytes = entry.size - offset
                if nbytes % dtype.itemsize:
                    raise ValueError(f"{nbytes} bytes from offset {offset} do "
                                     f"not divide into items of {dtype} "
                                     f"({dtype.itemsize} bytes)")
            else:
                nbytes = count * dtype.itemsize
            self._span(entry, offset, nbytes)
            if out is None:
                into = np.empty(nbytes, np.uint8)
            elif into.shape[0] != nbytes:
                raise ValueError(f"out holds {out.size} items of {dtype}, but "
                                 f"{nbytes // dtype.itemsize} are read")
            status = _K["read_chain"](self._arena, self._meta, entry.block,
                                      entry.n_blocks, offset, into)
            assert status == OK, f"read_chain failed with status {status}"
            self._cache.move_to_end(key)
        if out is not None:
            return out
        return into if dtype is _UINT8 else into.view(dtype)

    def _out_bytes(self, out, dtype):
        """The bytes of ``read``'s ``out`` as a flat ``uint8`` view, or the
        error naming what is wrong with it."""
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy array, got "
                            f"{type(out).__name__}")
        if out.dtype != dtype:
            raise TypeError(f"out has dtype {out.dtype} but the items read are "
                            f"{dtype}: pass dtype=out.dtype")
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        if not out.flags.writeable:
            raise ValueError("out must be writable")
        if np.may_share_memory(out, self._arena):
            raise ValueError("out is a view of the arena: read into an array "
                             "of your own (or use views())")
        return out.view(np.ndarray).reshape(-1).view(np.uint8)

    def block_view(self, block):
        """A zero-copy ``uint8`` view of one block of the arena."""
        block = _as_int(block, "block")
        if not 0 <= block < self._pool.total_blocks:
            raise ValueError(f"block id {block} is out of range "
                             f"[0, {self._pool.total_blocks})")
        bs = self._block_size
        return self._arena[block * bs:(block + 1) * bs]

    def views(self, key):
        """The entry's blocks as zero-copy views in order, the last trimmed
        to the entry's size; writing through them changes the arena. The
        entry becomes most recently used."""
        with self._lock:
            entry = self._entry(key)
            bs = self._block_size
            out = [self._arena[b * bs:(b + 1) * bs] for b in entry.blocks.tolist()]
            out[-1] = out[-1][:entry.size - (entry.n_blocks - 1) * bs]
            self._cache.move_to_end(key)
            return out

    # statistics --------------------------------------------------------------------

    def _snapshot(self, used_blocks=None):
        """The stats now (with ``used_blocks`` as given, for reports that
        describe a moment inside one compiled batch)."""
        pool = self._pool
        if used_blocks is None:
            used_blocks = pool.used_blocks
        ev = self._evictions
        held = used_blocks * self._block_size
        return PoolStats(
            total_capacity=self._capacity,
            used_memory=self._used_memory,
            active_entries=self._active_entries,
            allocations=self._allocations,
            evictions=ev["manual"] + ev["lru"] + ev["clear"],
            manual_evictions=ev["manual"],
            lru_evictions=ev["lru"],
            clear_evictions=ev["clear"],
            fragmentation=1.0 - self._used_memory / held if held else 0.0,
            block_size=self._block_size,
            total_blocks=pool.total_blocks,
            used_blocks=used_blocks,
            free_blocks=pool.total_blocks - used_blocks,
            peak_used_blocks=pool.peak_used,
            hits=self._hits,
            misses=self._misses,
            pinned_entries=self._pinned_entries,
        )

    @property
    def stats(self):
        """The current statistics, as a fresh ``PoolStats`` on every read."""
        with self._lock:
            return self._snapshot()

    def get_stats(self):
        """``stats``, after the O(1) consistency asserts."""
        with self._lock:
            s = self._snapshot()
            assert s.active_entries == len(self._cache), (
                f"active_entries={s.active_entries} != len(cache)={len(self._cache)}")
            assert 0 <= s.used_blocks <= s.total_blocks, (
                f"used_blocks={s.used_blocks} is not within total_blocks="
                f"{s.total_blocks}")
            assert s.used_memory <= s.used_blocks * s.block_size, (
                f"used_memory={s.used_memory} > used_blocks * block_size="
                f"{s.used_blocks * s.block_size}")
            return s

    def reset_stats(self):
        """Zero the counters not derived from the state (allocations,
        evictions, hits, misses) and restart the peak at the current use."""
        with self._lock:
            self._reset_counters()
            self._pool.peak_used = self._pool.used_blocks

    # persistence ---------------------------------------------------------------------

    def _state(self):
        """(meta, arrays, keys): all that defines the manager, shared by
        ``save``, ``load``, pickle and ``==``."""
        pool = self._pool
        entries = list(self._cache.values())
        meta = {
            "format": FORMAT_VERSION, "block_size": self._block_size,
            "total_blocks": pool.total_blocks, "eviction": self._eviction,
            "zero_on_alloc": self._zero, "head": pool.head,
            "count": pool.count, "bump": pool.bump,
            "peak_used": pool.peak_used, "allocations": self._allocations,
            "evictions": dict(self._evictions), "hits": self._hits,
            "misses": self._misses,
        }
        arrays = {
            "arena": self._arena, "ring": pool.ring, "state": pool.state,
            "link": pool.link,
            "sizes": np.array([e.size for e in entries], np.int64),
            "heads": np.array([e.block for e in entries], np.int64),
            "n_blocks": np.array([e.n_blocks for e in entries], np.int64),
            "pinned": np.array([e.pinned for e in entries], np.bool_),
        }
        return meta, arrays, [e.key for e in entries]

    @classmethod
    def _from_state(cls, meta, arrays, keys):
        """A new manager from ``_state()``'s parts; ``ValueError`` (and no
        manager) unless they describe a consistent one. It adopts
        ``arrays["arena"]`` as its arena, without a copy when that is a
        writable, C-contiguous ``uint8`` array: callers pass arrays of their
        own (``load`` the ones it read, pickle the unpickled ones). Every
        number is checked in Python before the compiled pool sees it."""
        try:
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"snapshot format {meta.get('format')!r} is not "
                                 f"the supported version {FORMAT_VERSION}")
            bs, nb = meta["block_size"], meta["total_blocks"]
            arena = arrays["arena"]
            if (type(bs) is not int or type(nb) is not int or bs <= 0 or nb <= 0
                    or arena.shape != (bs * nb,)):
                raise ValueError(f"block_size={bs!r} and total_blocks={nb!r} "
                                 f"do not match an arena of shape {arena.shape}")
            if arena.dtype != np.uint8:
                raise ValueError(f"array 'arena' has dtype {arena.dtype}, "
                                 "expected uint8")
            if not (arena.flags.c_contiguous and arena.flags.writeable):
                arena = arena.copy()
            m = cls(bs * nb, bs, eviction=meta["eviction"],
                    zero_on_alloc=meta["zero_on_alloc"], buffer=arena)
            pool = m._pool
            for name, target in (("ring", pool.ring), ("state", pool.state),
                                 ("link", pool.link)):
                src = arrays[name]
                if src.shape != target.shape or src.dtype != target.dtype:
                    raise ValueError(f"array {name!r} has shape {src.shape} and "
                                     f"dtype {src.dtype}, expected "
                                     f"{target.shape} and {target.dtype}")
                target[...] = src
            for name in ("head", "count", "bump", "peak_used"):
                value = meta[name]
                if type(value) is not int or not (
                        _INT64_MIN <= value < _INT64_END):   # range: audited
                    raise ValueError(f"counter {name!r} is {value!r}, not a "
                                     "64-bit int")
                setattr(pool, name, value)
            columns = []
            for name, kinds, lo, hi in (("sizes", "iu", 1, bs * nb),
                                        ("heads", "iu", 0, nb - 1),
                                        ("n_blocks", "iu", 1, nb),
                                        ("pinned", "b", False, True)):
                column = arrays[name]
                if column.ndim != 1 or column.dtype.kind not in kinds:
                    raise ValueError(f"column {name!r} has dtype {column.dtype} "
                                     f"and shape {column.shape}")
                column = column.tolist()
                if len(column) != len(keys):
                    raise ValueError(f"column {name!r} holds {len(column)} "
                                     f"values for {len(keys)} keys")
                for value in column:
                    if not lo <= value <= hi:
                        raise ValueError(f"column {name!r} holds {value}, not "
                                         f"within [{lo}, {hi}]")
                columns.append(column)
            counters = [meta["allocations"], meta["hits"], meta["misses"]]
            counters += [meta["evictions"][r] for r in REASONS]
            if any(type(c) is not int or c < 0 for c in counters):
                raise ValueError(f"stat counters {counters} are not all "
                                 "non-negative ints")
            for key, size, head, n, pinned in zip(keys, *columns):
                entry = KVPoolEntry(key, size, head, n, pool)
                entry.pinned = pinned
                m._cache[key] = entry
                m._used_memory += size
                m._pinned_entries += pinned
            m._active_entries = len(m._cache)
            m._allocations = meta["allocations"]
            m._evictions = {r: meta["evictions"][r] for r in REASONS}
            m._hits, m._misses = meta["hits"], meta["misses"]
            m.check_invariants()
            if m._zero:     # past each entry's size: zeros, whatever the file says
                for entry in m._cache.values():
                    last = int(entry.blocks[-1])
                    cut = entry.size - (entry.n_blocks - 1) * bs
                    m._arena[last * bs + cut:(last + 1) * bs] = 0
        except (KeyError, TypeError, ValueError, AttributeError,
                AssertionError, OverflowError) as exc:
            raise ValueError(f"inconsistent snapshot: {exc}") from None
        return m

    def save(self, path):
        """Write the whole manager to one ``.npz`` file at ``path`` (str,
        bytes or path-like), atomically: a temporary file in the same
        directory, renamed into place. Keys must be CacheKey, str, int,
        bytes or tuples of these, exactly these types (``TypeError``, and
        nothing written, otherwise)."""
        path = os.fsdecode(path)
        with self._lock:
            _write_snapshot(path, *self._state())

    @classmethod
    def load(cls, path):
        """The manager saved at ``path`` (str, bytes or path-like): same
        entries, bytes, stats and future block ids. Never unpickles; a
        truncated, corrupt, foreign or incompatible file raises
        ``ValueError``. The file's arena becomes the manager's: one arena
        in memory, not two."""
        return cls._from_state(*_read_snapshot(os.fsdecode(path)))

    def __getstate__(self):
        """Pickling and deepcopy carry everything ``save`` does, with any
        picklable keys; listeners are not carried over."""
        with self._lock:
            meta, arrays, keys = self._state()
            return {"meta": meta, "arrays": {k: np.array(v) for k, v in
                                             arrays.items()}, "keys": keys}

    def __setstate__(self, state):
        other = self._from_state(state["meta"], state["arrays"], state["keys"])
        self.__dict__.update(other.__dict__)

    def _canonical(self):
        """``_state()`` without what cannot affect behaviour: the free list as
        its ids in order (not where the ring starts), links only in chains."""
        meta, arrays, keys = self._state()
        head, count = meta.pop("head"), meta["count"]
        arrays["ring"] = arrays["ring"][(head + np.arange(count))
                                        % self._pool.total_blocks]
        chained = (arrays["state"] == HEAD) | (arrays["state"] == LINK)
        arrays["link"] = np.where(chained, arrays["link"], NO_BLOCK)
        return meta, arrays, keys

    def __eq__(self, other):
        """Same configuration, entries (keys, sizes, blocks, pins, order),
        bytes, free-list order, counters and stats: the same future."""
        if not isinstance(other, KVCacheManager):
            return NotImplemented
        with self._lock:
            m1, a1, k1 = self._canonical()
        with other._lock:
            m2, a2, k2 = other._canonical()
        return (m1 == m2 and k1 == k2 and a1.keys() == a2.keys()
                and all(np.array_equal(a1[n], a2[n]) for n in a1))

    __hash__ = None

    def __repr__(self):
        s = self.stats
        return (f"KVCacheManager({s.active_entries} entries, {s.used_blocks}/"
                f"{s.total_blocks} blocks of {s.block_size} bytes, "
                f"eviction={self._eviction!r})")

    # the audit -------------------------------------------------------------------------

    def check_invariants(self):
        """Audit everything from scratch, O(total blocks + entries); raise
        ``AssertionError`` naming the first divergence (explicitly, so it
        works under ``python -O``)."""
        with self._lock:
            _audit(self)


# -- the paged cache -----------------------------------------------------------

class _FreeRow:
    """The owner of a free row in ``PagedKVCache._seq_of`` (not None: any
    hashable, None too, may be a sequence id)."""
    __slots__ = ()

    def __repr__(self):
        return "<free row>"


_FREE_ROW = _FreeRow()
_PAGED_FNS = {}       # element dtype -> {kernel name -> entry point}, shared by
                      # all caches of that dtype (their kernels' arguments
                      # have one type each)


class PagedKVCache:
    """Sequences of K/V over one pool of blocks: block tables, slot ids,
    compiled writes and attention straight from the pool.

    ``PagedKVCache(num_blocks, block_tokens=16, *, layers, kv_heads,
    head_dim, dtype=np.float16, preempt="none", buffer=None, on_evict=None,
    prefix_caching=True)``

    A block holds ``block_tokens`` tokens of every layer, K and V; ``kv`` is
    the arena as ``[num_blocks, layers, 2, block_tokens, kv_heads,
    head_dim]`` (a view, no copy). Token ``p`` of a sequence lives in slot
    ``table[p // block_tokens] * block_tokens + p % block_tokens``.

    Sequences: ``add``, ``append``, ``extend``, ``fork``, ``remove``,
    ``remove_many``, ``len``, ``in``, ``iter``, ``length``, ``blocks_needed``.
    Prefix cache: ``add`` shares cached blocks, ``reset_prefix_cache``.
    K/V: ``slots``, ``store``, ``gather``, ``attention``, ``block_table``.
    Batches without lookups: ``rows`` (a ``SeqRows`` handle).
    Statistics and audit: ``free_blocks``, ``stats``, ``check_invariants``.

    Layout: block tables are one persistent ``int32`` array ``[rows,
    columns]`` (both doubled when full; a refused call undoes its growth),
    padded with -1, plus ``int32`` lengths per row; a sequence gets the
    lowest free row when added. Per block: reserved slots, and with prefix
    caching the token id of each slot. Every public operation is one
    compiled call over these arrays and the pool's.
    ``append``, ``extend`` and ``add`` are all-or-nothing; with
    ``preempt="newest"`` a short ``append`` frees whole sequences, the most
    recently added first, until the rest fit.

    Sharing: blocks are reference counted. ``fork`` shares every block of a
    sequence; appending to a sequence whose last block is shared copies that
    block first (copy-on-write). With ``prefix_caching`` (the default) every
    full block is findable by a chained hash of its parent's hash and its
    token ids, and ``add`` shares the longest run of cached blocks matching
    the prompt's start, each verified against its stored token ids. The free
    list runs in vLLM v1's order: never-used blocks in id order, then freed
    ones oldest first; a freed sequence's blocks go to the tail, its last
    block first; a freed block keeps its content and hash until it is handed
    out for new content, and a prefix hit takes it back from wherever it
    sits. Not thread-safe: guard it yourself if threads share it.
    """

    def __init__(self, num_blocks, block_tokens=16, *, layers, kv_heads,
                 head_dim, dtype=np.float16, preempt="none", buffer=None,
                 on_evict=None, prefix_caching=True):
        num_blocks = _as_int(num_blocks, "num_blocks")
        bt = _as_int(block_tokens, "block_tokens")
        layers = _as_int(layers, "layers")
        kv_heads = _as_int(kv_heads, "kv_heads")
        head_dim = _as_int(head_dim, "head_dim")
        for name, value in (("num_blocks", num_blocks), ("block_tokens", bt),
                            ("layers", layers), ("kv_heads", kv_heads),
                            ("head_dim", head_dim)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float16 or float32, got {dtype!r}") from None
        if dt not in (np.dtype(np.float16), np.dtype(np.float32)):
            raise TypeError(f"dtype must be float16 or float32, got {dt}")
        if preempt not in PREEMPT_POLICIES:
            raise ValueError(f"preempt must be one of {PREEMPT_POLICIES}, got {preempt!r}")
        if on_evict is not None and not callable(on_evict):
            raise TypeError(f"on_evict must be callable, got {on_evict!r}")
        if not isinstance(prefix_caching, (bool, np.bool_)):
            raise TypeError(f"prefix_caching must be True or False, got {prefix_caching!r}")
        e = kv_heads * head_dim
        block_bytes = layers * 2 * bt * e * dt.itemsize
        if num_blocks * block_bytes >= 1 << 62:
            raise ValueError(f"{num_blocks} blocks of {block_bytes} bytes are too many")
        arena = None if buffer is None else _as_arena(
            buffer, num_blocks * block_bytes)[:num_blocks * block_bytes]
        self._pool = _PlainPool(num_blocks * block_bytes, block_bytes, arena)
        self._arena, self._state, self._meta = (
            self._pool.arena, self._pool.state, self._pool.meta)
        ctr = self._pool.ctr                              # the free list as a
        ctr[C_LIST], ctr[C_HEAD], ctr[C_TAIL] = 1, -1, -1  # linked list
        self._pool.ring[:] = -1
        self._pool.link[:] = -1
        cap = 8
        while cap < 2 * num_blocks:
            cap *= 2
        a = _P_HEAD + _B_COLS * num_blocks
        self._px = px = np.zeros(a + 2 * cap, np.int64)   # the prefix state
        px[P_N], px[P_CAP], px[P_ON] = num_blocks, cap, bool(prefix_caching)
        px.view(np.uint64)[P_MASK] = _M64
        self._blk = px[_P_HEAD:a].reshape(num_blocks, _B_COLS)
        self._blk[:, B_NEXT:] = -1
        px[a + cap:] = -1
        self.prefix_caching = bool(prefix_caching)
        self.num_blocks = num_blocks
        self.block_tokens = bt
        self.layers = layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dt
        self.preempt = preempt
        self._preempt_flag = int(preempt == "newest")
        self.kv = self._arena.view(dt).reshape(num_blocks, layers, 2, bt, kv_heads, head_dim)
        f16 = dt == np.float16
        self._bits = self._arena.view(np.uint16 if f16 else np.float32)
        self._bits_dtype = self._bits.dtype
        self._block_bytes = block_bytes
        self._e = e
        self._fill = np.zeros(num_blocks, np.int32)      # reserved slots per block
        self._tok = np.zeros(num_blocks * bt, np.int64)   # token id per slot
        self._tables = np.full((0, 8), NO_BLOCK, np.int32)
        self._lens = np.full(0, -1, np.int32)             # -1: a free row
        self._rowinfo = np.zeros((0, 3), np.int64)        # R_GEN, R_ADDED, R_MARK
        self._info = np.zeros(_INFO, np.int64)            # status words, preempted
        self._row_of = {}                                 # seq -> row
        self._seq_of = []                                 # row -> seq or _FREE_ROW
        self._free_rows = []                              # a heap of the free rows
        self._grow_rows()
        self._stamp = 0                                   # add order
        self._epoch = 0             # bumped by every change of rows or lengths
        self._scores = _SCORES      # attention's score scratch, in floats
        self._preemptions = 0
        self._listeners = [] if on_evict is None else [on_evict]
        self._fn = _PAGED_FNS.setdefault(self._bits_dtype.str, {})  # name -> entry

    # plumbing ---------------------------------------------------------------

    def _kernel(self, name, kernel, args):
        fn = self._fn.get(name)
        if fn is None:
            fn = self._fn[name] = _compiled(
                kernel, *(numba.typeof(a) for a in args))
        return fn(*args)

    def _grow_rows(self):
        old = self._lens.shape[0]
        new = max(8, 2 * old)
        tables = np.full((new, self._tables.shape[1]), NO_BLOCK, np.int32)
        tables[:old] = self._tables
        lens = np.full(new, -1, np.int32)
        lens[:old] = self._lens
        rowinfo = np.zeros((new, 3), np.int64)
        rowinfo[:old] = self._rowinfo
        self._tables, self._lens, self._rowinfo = tables, lens, rowinfo
        self._info = np.zeros(_INFO + 3 * new, np.int64)
        self._seq_of.extend([_FREE_ROW] * (new - old))
        self._free_rows.extend(range(old, new))       # (above all: still a heap)

    def _grow_columns(self, needed):
        rows, cols = self._tables.shape
        tables = np.full((rows, max(needed, 2 * cols)), NO_BLOCK, np.int32)
        tables[:, :cols] = self._tables
        self._tables = tables

    def _row(self, seq):
        try:
            return self._row_of[seq]
        except KeyError:
            raise KeyError(f"no sequence {seq!r} in the cache") from None
        except TypeError:
            raise TypeError(f"sequence id {seq!r} is not hashable") from None

    def _rows(self, seqs):
        """(batch, ids): the int64 ``[3, B]`` batch array of ``seqs`` (a
        ``SeqRows`` or sequence ids; see ``BATCH_ROW``) and the ids for messages."""
        if type(seqs) is SeqRows:
            if seqs._cache is not self:
                raise ValueError("these rows belong to another cache")
            return seqs._batch, seqs.seqs
        if isinstance(seqs, (str, bytes)) or not hasattr(seqs, "__iter__"):
            raise TypeError(f"seqs must be a list of sequence ids or a "
                            f"SeqRows, got {seqs!r}")
        ids = seqs if type(seqs) is list else list(seqs)
        batch = np.empty((3, len(ids)), np.int64)
        try:
            batch[BATCH_ROW] = np.fromiter(map(self._row_of.__getitem__, ids), np.int64,
                                           len(ids))
        except (KeyError, TypeError):
            for s in ids:
                self._row(s)        # raises, naming the first unknown id
            raise
        batch[BATCH_GEN] = -1
        return batch, ids

    def _ids_of(self, seqs):
        """The sequence ids of ``seqs``: a ``SeqRows``'s own (looked up afresh
        by the caller, so one gone since raises ``KeyError``), or ``seqs``."""
        if type(seqs) is SeqRows:
            self._rows(seqs)            # (another cache's rows: ValueError)
            return list(seqs.seqs)
        return seqs

    def _ints(self, values, name, n=None):
        """``values`` as a C-contiguous int64 array (of length ``n``): as it
        is when it is one already, else converted (a copy)."""
        if not (type(values) is np.ndarray and values.dtype is _I64
                and values.ndim == 1 and values.flags.c_contiguous):
            arr = np.asarray(values)
            if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.ndim == 1):
                bad = next((x for x in arr.reshape(-1).tolist()
                            if isinstance(x, bool) or not isinstance(x, int)), arr.dtype)
                raise TypeError(f"{name} must be integers, got {bad!r}")
            if arr.ndim != 1:
                raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
            if arr.dtype == np.uint64 and arr.size and arr.max() >= 1 << 63:
                raise ValueError(f"{name} holds {arr.max()}, too large for int64")
            values = arr if arr is not values and arr.dtype is _I64 \
                and arr.flags.c_contiguous else np.array(arr, np.int64)
        if n is not None and values.shape[0] != n:
            raise ValueError(f"{name} has {values.shape[0]} values for {n} sequences")
        return values

    def _layer(self, layer):
        layer = _as_int(layer, "layer")
        if not 0 <= layer < self.layers:
            raise IndexError(f"layer {layer} is out of range [0, {self.layers})")
        return layer

    def _kv_rows(self, x, name, n):
        """``x`` ([n, kv_heads, head_dim], float) as [n, e] cache elements."""
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
        if x.shape != (n, self.kv_heads, self.head_dim):
            raise ValueError(f"{name} has shape {x.shape}, expected "
                             f"{(n, self.kv_heads, self.head_dim)}")
        if x.dtype != self.dtype:             # converted, never reinterpreted,
            x = x.astype(self.dtype, order="C")   # and C-contiguous like a copy
        elif not (x.flags.c_contiguous and x.flags.writeable):
            x = x.copy()
        return x.view(self._bits_dtype).reshape(n, self._e)

    def _raise(self, status, ids, tokens=None):
        i = int(self._info[0])
        if status == _S_NO_SPACE:
            raise PoolExhaustedError(int(self._info[0]), int(self._info[1]))
        if status == _S_BAD_ROW:
            raise KeyError(f"sequence {ids[i]!r} was removed, preempted or moved "
                           "since these rows were made; call rows() again")
        if status == _S_DUPLICATE:
            raise ValueError(f"sequence {ids[i]!r} appears twice")
        if status == _S_BAD_TOKEN:
            raise ValueError(f"token ids must be non-negative, got "
                             f"{tokens[i]} at index {i}")
        raise AssertionError(f"unexpected status {status}")

    def _evicted(self, triples, reason):
        """Unbind the rows in ``triples`` (row, length, blocks freed), already
        freed; reports."""
        reports = []
        now = time.monotonic() if self._listeners else 0.0
        self._epoch += 1
        for r, length, freed in triples:
            seq = self._seq_of[r]
            self._seq_of[r] = _FREE_ROW
            del self._row_of[seq]
            heapq.heappush(self._free_rows, r)
            if self._listeners:
                reports.append(SequenceReport(seq, reason, length, freed, now))
        if reason == "preempt":
            self._preemptions += len(triples)
        return reports

    def add_eviction_listener(self, fn):
        """Call ``fn(report)`` (a ``SequenceReport``) after every removal."""
        if not callable(fn):
            raise TypeError(f"listener must be callable, got {fn!r}")
        self._listeners.append(fn)

    # sequences -------------------------------------------------------------

    def add(self, seq, tokens):
        """A new sequence with its prompt ``tokens``; reserves their slots
        (all-or-nothing). With prefix caching it first shares the longest
        run of cached full blocks matching the prompt's start, each verified
        against its stored token ids, and returns how many prompt tokens
        they cover: at most ``len(tokens) - 1``, whole blocks, so the last
        token is always computed. Compute K/V only for the rest (the slots
        of ``slots(seq, covered)``). Returns 0 without prefix caching.
        Raises ``KeyError`` for a live id, ``ValueError`` / ``TypeError``
        for bad tokens, ``PoolExhaustedError``. One compiled call,
        O(tokens)."""
        try:
            live = seq in self._row_of
        except TypeError:
            raise TypeError(f"sequence id {seq!r} is not hashable") from None
        if live:
            raise KeyError(f"sequence {seq!r} is already in the cache")
        tokens = self._ints(tokens, "tokens")
        if tokens.shape[0] == 0:
            raise ValueError("a sequence needs at least one token")
        kept = None if self._free_rows else self._arrays()    # rows will grow
        row = self._new_row()
        self._extend(row, tokens, self._stamp, kept)
        self._bind(seq, row)
        return int(self._info[3])

    def _new_row(self):
        """The lowest free row (growing the rows if none is), O(1); it
        stays free until ``_bind``."""
        if not self._free_rows:
            self._grow_rows()
        return self._free_rows[0]

    def _bind(self, seq, row):
        heapq.heappop(self._free_rows)         # ``row``, from _new_row
        self._row_of[seq] = row
        self._seq_of[row] = seq
        self._stamp += 1

    def _extend(self, row, tokens, stamp, kept=None):
        """The one compiled call of ``add`` and ``extend``, growing the
        columns as needed; ``kept``: the arrays before ``add`` grew the rows."""
        out = np.empty(tokens.shape[0], np.int64)
        while True:
            status = self._kernel("extend", _paged_extend, (
                self._tables, self._lens, self._fill, self._tok, self._rowinfo,
                self._meta, self._px, self._arena, self.block_tokens, row, tokens,
                stamp, out, self._info))
            if status != _S_GROW:
                break
            kept = kept or self._arrays()
            self._grow_columns(int(self._info[0]))
        if status != OK:
            if kept is not None:
                self._restore(kept)
            self._raise(status, None, tokens)
        self._epoch += 1
        return out

    def _arrays(self):
        """What ``_restore`` needs to undo growth of the rows or columns."""
        return self._tables, self._lens, self._rowinfo, len(self._seq_of)

    def _restore(self, kept):
        """Undo the growth a refused call made (the kernels refuse before
        changing anything, so the arrays kept are as they were): block table
        views a caller holds stay the live ones."""
        tables, lens, rowinfo, rows = kept
        if len(self._seq_of) > rows:         # (the new rows are all free)
            del self._seq_of[rows:]
            self._free_rows = [r for r in self._free_rows if r < rows]
            heapq.heapify(self._free_rows)
        self._tables, self._lens, self._rowinfo = tables, lens, rowinfo

    def extend(self, seq, tokens):
        """Append several tokens to one sequence (chunked prefill,
        speculation), all-or-nothing; their int64 slot ids. A shared last
        block is copied first. O(tokens)."""
        row = self._row(seq)
        return self._extend(row, self._ints(tokens, "tokens"), -1)

    def fork(self, parent, child):
        """A new sequence ``child`` sharing every block of ``parent`` (its
        tokens and K/V, by reference); whichever appends first to a shared
        last block copies it. Raises ``KeyError`` for an unknown parent or a
        live child. One compiled call, O(blocks)."""
        row_of = self._row_of                  # (_row's lookup, inlined: it
        try:                                   # checks the child as well)
            src = row_of[parent]
            live = child in row_of
        except (KeyError, TypeError):
            self._row(parent)                  # raises, naming the parent
            raise TypeError(f"sequence id {child!r} is not hashable") from None
        if live:
            raise KeyError(f"sequence {child!r} is already in the cache")
        dst = self._new_row()
        self._kernel("fork", _paged_fork, (self._tables, self._lens, self._rowinfo,
                                          self._px, self.block_tokens, src, dst,
                                          self._stamp))
        self._bind(child, dst)
        self._epoch += 1

    def reset_prefix_cache(self):
        """Forget every cached hash: True, or False (refused, nothing
        changed) while sequences are live. O(blocks)."""
        if self._row_of:
            return False
        self._kernel("reset", _paged_reset, (self._px,))
        return True

    def append(self, seqs, tokens):
        """The decode step: one new token per sequence (``seqs``: ids or a
        ``SeqRows``), a new block for those whose last is full, a copy for
        those whose last is shared; returns the int64 slot ids (for a
        ``SeqRows``, its own array, overwritten by its next ``append``).
        Blocks that fill become findable. All-or-nothing, or with
        ``preempt="newest"`` the newest sequences are freed until the rest
        fit (slot -1 for those in ``seqs``; reports with reason "preempt").
        One compiled call, O(B); nothing is allocated for a ``SeqRows`` and
        int64 ``tokens``."""
        handle = type(seqs) is SeqRows and seqs._cache is self
        if handle:
            batch, ids = seqs._batch, seqs.seqs
        else:
            batch, ids = self._rows(seqs)
        if not (type(tokens) is np.ndarray and tokens.dtype is _I64
                and tokens.ndim == 1 and tokens.flags.c_contiguous):
            tokens = self._ints(tokens, "tokens")
        if tokens.shape[0] != batch.shape[1]:
            raise ValueError(f"tokens has {tokens.shape[0]} values for "
                             f"{batch.shape[1]} sequences")
        fn = self._fn.get("append")
        info = self._info
        args = (self._tables, self._lens, self._fill, self._tok, self._rowinfo, self._meta,
                self._px, self._arena, self.block_tokens, batch, tokens,
                self._preempt_flag, info)
        status = fn(*args) if fn is not None else self._kernel("append", _paged_append, args)
        if status == _S_GROW:
            kept = self._arrays()
            while status == _S_GROW:
                self._grow_columns(int(info[0]))
                args = (self._tables,) + args[1:]
                status = self._kernel("append", _paged_append, args)
            if status != OK:
                self._restore(kept)
        if status != OK:
            self._raise(status, ids, tokens)
        self._epoch += 1
        if info[2]:
            pre = info[_INFO:_INFO + 3 * int(info[2])].tolist()
            reports = self._evicted(list(zip(pre[::3], pre[1::3], pre[2::3])), "preempt")
            if reports:
                _deliver(self._listeners, reports)
        elif handle:                           # its width, for block_table
            seqs._width, seqs._epoch = int(info[1]), self._epoch
        return batch[BATCH_OUT]

    def remove(self, seq):
        """Drop a sequence's references, last block first (``remove_many``
        of one, without building a batch). One compiled call, O(blocks)."""
        row = self._row(seq)
        length = int(self._lens[row])
        freed = self._kernel("release", _release_row, (
            self._tables, self._lens, self._fill, self._rowinfo, self._state,
            self._meta, self._px, self.block_tokens, row))
        reports = self._evicted(((row, length, freed),), "remove")
        if reports:
            _deliver(self._listeners, reports)

    def remove_many(self, seqs):
        """Drop several sequences' references, in order, each last block
        first (a block no one else holds joins the free list's tail);
        all-or-nothing. One compiled call, O(B + blocks)."""
        batch, ids = self._rows(self._ids_of(seqs))
        rows = batch[BATCH_ROW]
        lengths = self._lens[rows].tolist() if self._listeners else None
        status = self._kernel("remove", _paged_remove, (
            self._tables, self._lens, self._fill, self._rowinfo, self._meta,
            self._px, self.block_tokens, batch, self._info))
        if status != OK:
            self._raise(status, ids)
        reports = self._evicted(list(zip(rows.tolist(), lengths or [0] * len(ids),
                                         batch[BATCH_OUT].tolist())), "remove")
        if reports:
            _deliver(self._listeners, reports)

    def rows(self, seqs):
        """Put ``seqs`` in rows 0..B-1 of the block table, in this order, and
        return a ``SeqRows`` handle for them: calls given it skip the id
        lookups, and ``block_table`` returns views. Rows move by swapping
        (handles of moved sequences go stale). One compiled call, O(B), and
        O(rows) when a sequence moves into a free row (the free rows are
        listed afresh)."""
        ids = list(seqs)
        rows = self._rows(ids)[0][BATCH_ROW]
        if len(set(rows.tolist())) != len(ids):
            seen = set()
            for s in ids:
                if s in seen:
                    raise ValueError(f"sequence {s!r} appears twice")
                seen.add(s)
        pairs = []
        row_of, seq_of = self._row_of, self._seq_of
        moved_free = False
        for i, s in enumerate(ids):
            r = row_of[s]
            if r != i:
                t = seq_of[i]
                seq_of[i], seq_of[r] = s, t
                row_of[s] = i
                if t is _FREE_ROW:
                    moved_free = True
                else:
                    row_of[t] = r
                pairs.append((i, r))
        if moved_free:                  # (a sorted list is a heap)
            self._free_rows = [r for r, t in enumerate(seq_of) if t is _FREE_ROW]
        self._epoch += 1
        if pairs:
            self._kernel("swap", _paged_swap, (self._tables, self._lens, self._rowinfo,
                                               np.array(pairs, np.int64)))
        n = len(ids)
        batch = np.zeros((3, n), np.int64)
        batch[BATCH_ROW] = np.arange(n)
        batch[BATCH_GEN] = self._rowinfo[:n, R_GEN]
        return SeqRows(tuple(ids), batch, self)

    def __len__(self):
        return len(self._row_of)

    def __contains__(self, seq):
        try:
            return seq in self._row_of
        except TypeError:
            return False

    def __iter__(self):
        return iter(list(self._row_of))

    def length(self, seq):
        """The sequence's tokens."""
        return int(self._lens[self._row(seq)])

    def blocks_needed(self, seqs, n=1):
        """How many free blocks appending ``n`` tokens to each of ``seqs``
        would take, copies of shared last blocks included."""
        n = _as_int(n, "n")
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        rows = self._rows(self._ids_of(seqs))[0][BATCH_ROW]
        lens = self._lens[rows].astype(np.int64)
        bt = self.block_tokens
        need = int((-(-(lens + n) // bt) - (-(-lens // bt))).sum())
        part = lens % bt != 0
        if n and part.any():           # a shared partial last block: copies
            ids, times = np.unique(self._tables[rows[part], lens[part] // bt],
                                   return_counts=True)
            need += int(np.minimum(times, self._blk[ids, B_REF] - 1).sum())
        return need

    # K/V -------------------------------------------------------------------

    def slots(self, seq, start=0, stop=None):
        """int64 slot ids of the sequence's tokens ``[start, stop)``."""
        row = self._row(seq)
        length = int(self._lens[row])
        start = _as_int(start, "start")
        stop = length if stop is None else _as_int(stop, "stop")
        if not 0 <= start <= stop <= length:
            raise IndexError(f"tokens [{start}, {stop}) are not within the "
                             f"sequence's {length}")
        pos = np.arange(start, stop, dtype=np.int64)
        bt = self.block_tokens
        return self._tables[row, pos // bt].astype(np.int64) * bt + pos % bt

    def store(self, layer, slots, k, v):
        """Write ``k`` and ``v`` (``[T, kv_heads, head_dim]``, converted to
        the cache's dtype) of ``layer`` at ``slots`` (a slot given twice gets
        its last row). All-or-nothing; ``ValueError`` naming the first bad
        slot. One compiled call, O(T * kv_heads * head_dim).

        Each slot must be a reserved slot of a live sequence, in a block that
        only one sequence holds (reference count 1). A shared block, after
        ``fork`` or a prefix hit on a live sequence's blocks, is refused:
        writing it would change the other holders' K/V. Appending to a
        shared last block copies it first, so a decode step's new slots are
        always writable; a prefix hit's covered slots need no K/V (they are
        cached). A full block that is findable in the prefix cache but held
        only by its owner stays writable: a block becomes findable the
        moment it fills (in ``append`` or ``extend``), before its owner has
        stored the K/V of the tokens that filled it. Store each step's K/V
        before the next ``add`` or ``fork``, which could share that block."""
        layer = self._layer(layer)
        slots = self._ints(slots, "slots")
        n = slots.shape[0]
        k = self._kv_rows(k, "k", n)
        v = self._kv_rows(v, "v", n)
        fn = self._fn.get("store")
        args = (self._bits, self._fill, self._meta, self._blk, self.block_tokens,
                self.layers, layer, slots, k, v, self._info)
        status = fn(*args) if fn is not None else self._kernel("store", _paged_store, args)
        if status != OK:
            i = int(self._info[0])
            if status == _S_SHARED_SLOT:
                raise ValueError(
                    f"slot {slots[i]} (index {i}) is in block {slots[i] // self.block_tokens}, "
                    f"shared by {int(self._info[1])} sequences; writing it would "
                    "change their K/V")
            raise ValueError(f"slot {slots[i]} (index {i}) is not a reserved "
                             "slot of a live sequence")

    def gather(self, layer, seqs):
        """(k, v, lens): contiguous copies ``[B, longest, kv_heads,
        head_dim]`` of the sequences' K and V in the cache's dtype,
        zero-padded, and their int32 lengths."""
        layer = self._layer(layer)
        batch, ids = self._rows(seqs)
        status, k, v, lens = self._kernel("gather", _paged_gather, (
            self._bits, self._tables, self._lens, self._rowinfo,
            self.block_tokens, self.layers, layer, self._e, batch, self._info))
        if status != OK:
            self._raise(status, ids)
        shape = (k.shape[0], k.shape[1], self.kv_heads, self.head_dim)
        return (k.view(self.dtype).reshape(shape), v.view(self.dtype).reshape(shape), lens)

    def block_table(self, seqs):
        """(int32 ``[B, most blocks in the batch]`` padded with -1, int32
        ``[B]`` token counts). For a ``SeqRows`` both are views of the
        persistent table, updated in place until it grows; else copies.
        O(B), one compiled call; O(1) and none for a ``SeqRows`` whose own
        ``append`` was the last call that changed any sequence (that call
        leaves the batch's width, and an epoch, on the handle)."""
        if type(seqs) is SeqRows and seqs._cache is self:
            batch = seqs._batch
            if seqs._epoch == self._epoch:     # nothing changed since its
                width = seqs._width            # append (or last call here)
            else:
                width = self._kernel("width", _paged_width, (
                    self._lens, self._rowinfo, self.block_tokens, batch, self._info))
                if width < 0:
                    self._raise(width, seqs.seqs)
                seqs._width, seqs._epoch = width, self._epoch
            n = batch.shape[1]
            return self._tables[:n, :width], self._lens[:n]
        batch, ids = self._rows(seqs)
        status, table, lens = self._kernel("table", _paged_table, (
            self._tables, self._lens, self._rowinfo, self.block_tokens, batch, self._info))
        if status != OK:
            self._raise(status, ids)
        return table, lens

    def attention(self, layer, q, seqs, q_lens=None, scale=None):
        """Causal attention straight from the pool: float32 ``[T, q_heads,
        head_dim]``. ``q`` holds ``q_lens[i]`` (default 1) queries of
        ``seqs[i]`` after another's, its last tokens; query head ``h`` reads
        kv head ``h // (q_heads // kv_heads)``; softmax(q·Kᵀ·scale)·V in
        float32, ``scale`` defaulting to 1/sqrt(head_dim). One compiled call."""
        layer = self._layer(layer)
        batch, ids = self._rows(seqs)
        n = batch.shape[1]
        if not isinstance(q, np.ndarray):
            raise TypeError(f"q must be a numpy array, got {type(q).__name__}")
        if q.dtype.kind != "f":
            raise TypeError(f"q must be a float array, got dtype {q.dtype}")
        if q.ndim != 3 or q.shape[2] != self.head_dim or q.shape[1] == 0 \
                or q.shape[1] % self.kv_heads:
            raise ValueError(f"q has shape {q.shape}; expected [T, q_heads, "
                             f"{self.head_dim}] with q_heads a multiple of "
                             f"kv_heads={self.kv_heads}")
        if not (q.dtype == np.float32 and q.flags.c_contiguous and q.flags.writeable):
            q = np.array(q, np.float32, order="C")   # the entry point takes C only
        qlens = np.ones(n, np.int64) if q_lens is None else self._ints(q_lens, "q_lens", n)
        if scale is None:
            scale = 1.0 / float(np.sqrt(self.head_dim))
        elif isinstance(scale, (bool, np.bool_)) or not isinstance(
                scale, (int, float, np.integer, np.floating)) or not np.isfinite(scale):
            raise TypeError(f"scale must be a finite number, got {scale!r}")
        fn = self._fn.get("attention")
        args = (self._bits, self._tables, self._lens, self._rowinfo,
                self.block_tokens, self.layers, layer, self.kv_heads, q, batch,
                qlens, float(scale), self._scores, self._info)
        status, out = fn(*args) if fn is not None else self._kernel(
            "attention", _paged_attention, args)
        if status == _S_BAD_QLEN:
            i = int(self._info[0])
            if i < 0:
                raise ValueError(f"q_lens sum to {int(self._info[1])}, but q "
                                 f"holds {q.shape[0]} tokens")
            raise ValueError(f"q_lens[{i}] = {qlens[i]} is not within the "
                             f"sequence's {int(self._lens[batch[BATCH_ROW, i]])} tokens")
        if status != OK:
            self._raise(status, ids)
        return out

    # statistics and audit ----------------------------------------------------

    @property
    def free_blocks(self):
        return int(self._kernel("free", _free_count, (self._state, self._meta)))

    @property
    def stats(self):
        """A fresh ``PagedStats`` on every read, O(rows)."""
        n = self.num_blocks
        free = self.free_blocks
        used = n - free
        lens = self._lens[self._lens >= 0]
        tokens = int(lens.sum())
        unused = used * self.block_tokens - int(self._fill.sum())
        px, ref = self._px, self._blk[:, B_REF]
        queries, hits = int(px[P_QUERIES]), int(px[P_HITS])
        return PagedStats(
            num_blocks=n, block_tokens=self.block_tokens, free_blocks=free,
            used_blocks=used, peak_used_blocks=self._pool.peak_used,
            sequences=len(self._row_of), tokens=tokens,
            preemptions=self._preemptions, unused_slots=unused,
            fragmentation=unused / (used * self.block_tokens) if used else 0.0,
            prefix_requests=int(px[P_REQS]), prefix_queries=queries,
            prefix_hits=hits, prefix_hit_rate=hits / queries if queries else 0.0,
            cached_blocks=int(np.count_nonzero((self._blk[:, B_DEPTH] >= 0) & (ref == 0))),
            shared_blocks=int(np.count_nonzero(ref > 1)),
            cow_copies=int(px[P_COW]))

    def _set_hash_mask(self, mask):
        """Test hook: keep only the bits ``mask`` of every block hash (a weak
        hash makes collisions; verification must keep them harmless). Only
        before anything is cached."""
        if np.any(self._blk[:, B_DEPTH] >= 0):
            raise RuntimeError("set the hash mask before anything is cached")
        self._px.view(np.uint64)[P_MASK] = mask

    def __repr__(self):
        return (f"PagedKVCache({len(self)} sequences, {self.num_blocks - self.free_blocks}"
                f"/{self.num_blocks} blocks of {self.block_tokens} tokens)")

    def check_invariants(self):
        """Audit everything from scratch, O(blocks + rows * columns); raise
        ``AssertionError`` naming the first divergence."""
        _audit_paged(self)


def _fail(message):
    raise AssertionError(message)


def check_pool_invariants(pool):
    """Audit a ``MemoryPool`` (or a manager's or paged cache's pool) from
    scratch, O(total blocks): raise ``AssertionError`` naming the first
    divergence. For a pool driven from your own compiled code; a manager's
    ``check_invariants`` runs it too."""
    _audit_pool(pool)


def _audit_pool(pool):
    total, bs = pool.total_blocks, pool.block_size
    head, count, bump, peak = pool.head, pool.count, pool.bump, pool.peak_used
    meta, state, ring = pool.meta, pool.state, pool.ring

    # Geometry: meta is counters, ring, links and states of total_blocks
    # blocks, its views are its own, and the arena is that many whole blocks.
    if (meta.shape[0] != _N_COUNTERS + 2 * total + (total + 7) // 8
            or pool.ctr[C_TOTAL] != total or pool.ctr[C_BLOCK_SIZE] != bs
            or pool.arena.shape[0] != total * bs
            or not all(np.shares_memory(v, meta) for v in (
                state, ring, pool.link, pool.ctr))):
        _fail(f"pool arrays do not describe {total} blocks of {bs} bytes "
              f"(meta of {meta.shape[0]} words, arena of "
              f"{pool.arena.shape[0]} bytes)")

    # Counters in range: 0 <= head < total (list mode: -1 <= head, tail <
    # total), 0 <= count <= bump <= total.
    listed = pool.ctr[C_LIST]
    low = -1 if listed else 0
    if not (low <= head < total and 0 <= count <= bump <= total and listed in (0, 1)
            and (not listed or -1 <= pool.ctr[C_TAIL] < total)):
        _fail(f"pool counters out of range: head={head} count={count} "
              f"bump={bump} total_blocks={total} list mode={listed}")
    used = bump - count
    if peak < used or peak > total:
        _fail(f"peak_used={peak} is not within [used_blocks={used}, {total}]")

    # Never-used blocks are exactly the ids >= bump.
    never = np.flatnonzero(state == NEVER)
    if never.size != total - bump or (never.size and never[0] != bump):
        _fail(f"NEVER blocks {never[:8].tolist()}... are not exactly the "
              f"ids >= bump={bump}")
    if np.any(state > LINK):
        _fail(f"unknown block state at {np.flatnonzero(state > LINK)[:8].tolist()}")

    # The ring (list mode: the linked list from head to tail) holds each
    # FREE block exactly once, nothing else.
    if listed:
        slots = _free_list_ids(pool)
    else:
        slots = ring[(head + np.arange(count)) % total]
    if np.any((slots < 0) | (slots >= total)):
        _fail(f"free list holds out-of-range ids {slots[(slots < 0) | (slots >= total)][:8].tolist()}")
    if np.unique(slots).size != count:
        _fail("free list holds a block twice")
    if np.any(state[slots] != FREE):
        _fail(f"free list holds non-free blocks {slots[state[slots] != FREE][:8].tolist()}")
    if np.count_nonzero(state == FREE) != count:
        _fail(f"{np.count_nonzero(state == FREE)} blocks are FREE but the "
              f"free list holds {count}")


def _free_list_ids(pool):
    """The ids of a list-mode free list, head to tail, its links checked."""
    nxt, prev, total = pool.ring, pool.link, pool.total_blocks
    ids = []
    b, before = pool.head, -1
    while b != -1:
        if not 0 <= b < total or len(ids) > pool.count:
            _fail(f"free list runs through {b} after {len(ids)} blocks "
                  f"(count={pool.count})")
        if prev[b] != before:
            _fail(f"free block {b} links back to {prev[b]}, not {before}")
        ids.append(b)
        b, before = nxt[b], b
    if before != pool.ctr[C_TAIL] or len(ids) != pool.count:
        _fail(f"free list of {len(ids)} blocks ends at {before}, but tail="
              f"{pool.ctr[C_TAIL]} count={pool.count}")
    return np.array(ids, np.int64)


def _audit(m):
    pool = m._pool
    _audit_pool(pool)
    bs, link, state = pool.block_size, pool.link, pool.state

    # The manager agrees with its pool and holds its very arrays.
    total = pool.total_blocks
    if bs != m._block_size or m._arena.shape[0] != total * bs:
        _fail(f"arena of {m._arena.shape[0]} bytes != total_blocks={total} * "
              f"block_size={bs} (manager block_size={m._block_size})")
    if m._arena is not pool.arena:
        _fail("the manager's arena view is not the pool's arena")
    if m._meta is not pool.meta:
        _fail("the manager's meta array is not the pool's")

    # Each entry owns a well-formed chain of ceil(size / bs) blocks; chains
    # are disjoint and are all the HEAD/LINK blocks there are.
    chains = []
    used_memory = 0
    pinned = 0
    for key, entry in m._cache.items():
        # The slot's key is the entry's own object (``is``, not ``==``: a NaN
        # key is not equal to itself, yet the dict finds it by identity).
        if entry.key is not key or entry._pool is not pool:
            _fail(f"cache slot {key!r} holds {entry!r} (key or pool mismatch)")
        if type(entry.size) is not int or entry.size <= 0:
            _fail(f"entry {key!r} has size {entry.size!r}")
        if entry.n_blocks != -(-entry.size // bs):
            _fail(f"entry {key!r}: n_blocks={entry.n_blocks} != ceil(size="
                  f"{entry.size} / {bs})")
        ids = pool.chain_blocks(entry.block, entry.n_blocks)
        if ids.size != entry.n_blocks or link[ids[-1]] != NO_BLOCK:
            _fail(f"entry {key!r}: chain from block {entry.block} is not "
                  f"{entry.n_blocks} blocks ending the chain")
        if entry._blocks is not None and not np.array_equal(entry._blocks, ids):
            _fail(f"entry {key!r}: cached blocks {entry._blocks.tolist()} != "
                  f"chain {ids.tolist()}")
        chains.append(ids)
        used_memory += entry.size
        pinned += bool(entry.pinned)
    owned_ids = np.concatenate(chains) if chains else np.empty(0, np.int64)
    owned = owned_ids.size
    chained = np.flatnonzero((state == HEAD) | (state == LINK))
    if not np.array_equal(np.sort(owned_ids), chained):
        ids, times = np.unique(owned_ids, return_counts=True)
        _fail(f"{chained.size} blocks are in chains but live entries own "
              f"{owned}: shared {ids[times > 1][:8].tolist()}, orphaned "
              f"{np.setdiff1d(chained, owned_ids)[:8].tolist()}")
    # (So HELD blocks are exactly the used ones that no entry owns.)

    # Counters recomputed from scratch equal the stored ones.
    if m._active_entries != len(m._cache):
        _fail(f"active_entries={m._active_entries} != len(cache)={len(m._cache)}")
    if m._used_memory != used_memory:
        _fail(f"used_memory={m._used_memory} != sum of entry sizes {used_memory}")
    if m._pinned_entries != pinned:
        _fail(f"pinned_entries={m._pinned_entries} != pinned entries {pinned}")
    if m._pinned_lru_evictions:
        _fail(f"{m._pinned_lru_evictions} pinned entries were evicted by LRU")
    if set(m._evictions) != set(REASONS) or min(
            m._evictions.values()) < 0 or min(m._allocations, m._hits,
                                              m._misses) < 0:
        _fail(f"negative or unknown counters: evictions={m._evictions} "
              f"allocations={m._allocations} hits={m._hits} misses={m._misses}")


def _audit_paged(c):
    pool = c._pool
    _audit_pool(pool)
    state, n, bt = pool.state, c.num_blocks, c.block_tokens

    # Geometry: n blocks of the cache's block bytes; kv is a view of them.
    if (pool.total_blocks != n or pool.block_size != c._block_bytes
            or c._arena is not pool.arena or c._state is not pool.state
            or c._meta is not pool.meta):
        _fail(f"pool arrays do not describe {n} blocks of {c._block_bytes} bytes")
    if not np.shares_memory(c.kv, c._arena) or c.kv.nbytes != c._arena.nbytes:
        _fail("kv is not a view of the whole arena")
    if np.any(state > HELD):
        _fail(f"blocks in a state the paged cache never sets: "
              f"{np.flatnonzero(state > HELD)[:8].tolist()}")

    # Rows: live exactly where the maps say; free rows are blank.
    tables, lens, rowinfo = c._tables, c._lens, c._rowinfo
    rows = lens.shape[0]
    if tables.shape[0] != rows or rowinfo.shape != (rows, 3) or len(c._seq_of) != rows:
        _fail(f"row arrays disagree: tables {tables.shape}, lens {lens.shape}, "
              f"rowinfo {rowinfo.shape}, {len(c._seq_of)} row owners")
    live = np.flatnonzero(lens >= 0)
    if np.any(lens < -1):
        _fail(f"lengths below -1 in rows {np.flatnonzero(lens < -1)[:8].tolist()}")
    if sorted(c._row_of.values()) != live.tolist():
        _fail(f"sequence rows {sorted(c._row_of.values())[:8]} != live rows "
              f"{live[:8].tolist()}")
    for seq, r in c._row_of.items():
        if c._seq_of[r] is not seq and c._seq_of[r] != seq:
            _fail(f"row {r} names {c._seq_of[r]!r}, not its sequence {seq!r}")
    blank = np.flatnonzero(lens < 0).tolist()
    free = c._free_rows
    if sorted(free) != blank or any(c._seq_of[r] is not _FREE_ROW for r in blank):
        _fail(f"free rows {sorted(free)[:8]} != blank rows {blank[:8]}")
    if any(free[(k - 1) // 2] > free[k] for k in range(1, len(free))):
        _fail(f"the free rows {free[:8]} are not a heap")
    if np.any(rowinfo[:, R_MARK] != 0):
        _fail(f"rows left marked: {np.flatnonzero(rowinfo[:, R_MARK])[:8].tolist()}")
    if np.any(rowinfo[:, R_GEN] < 0):
        _fail("a negative row generation")
    added = rowinfo[live, R_ADDED]
    if np.unique(added).size != added.size or (added.size and (
            added.min() < 0 or added.max() >= c._stamp)):
        _fail(f"add stamps {added[:8].tolist()} are not distinct and below {c._stamp}")

    # Each table holds exactly ceil(length / bt) blocks, then -1 padding;
    # tables are disjoint and are all the HELD blocks; each block's fill is
    # its reserved slots, so the slots handed out are the sequences' own.
    need = -(-lens.astype(np.int64) // bt)
    need[lens < 0] = 0
    cols = np.arange(tables.shape[1])
    inside = cols[None, :] < need[:, None]
    if np.any(need > tables.shape[1]) or np.any(tables[~inside] != NO_BLOCK):
        bad = np.flatnonzero(np.any(tables != NO_BLOCK, axis=1) & (~np.all(inside, axis=1))
                             | (need > tables.shape[1]))
        _fail(f"rows {bad[:8].tolist()} do not hold exactly ceil(length / {bt}) blocks")
    held = tables[inside].astype(np.int64)
    if np.any((held < 0) | (held >= n)):
        _fail(f"tables hold out-of-range ids {held[(held < 0) | (held >= n)][:8].tolist()}")
    # Reference counts: each block's count is the number of table entries
    # holding it (no table holds a block twice); HELD exactly when counted,
    # so no block is both free and held.
    px, blk = c._px, c._blk
    cap = int(px[P_CAP])
    if (px[P_N] != n or cap < 2 * n or cap & (cap - 1)
            or px.shape[0] != _P_HEAD + _B_COLS * n + 2 * cap
            or not np.shares_memory(blk, px) or blk.shape != (n, _B_COLS)):
        _fail(f"prefix state does not describe {n} blocks (capacity {cap})")
    if not pool.ctr[C_LIST]:
        _fail("the paged cache's free list is not in list mode")
    ref = blk[:, B_REF]
    counted = np.bincount(held, minlength=n)
    if not np.array_equal(counted, ref):
        _fail(f"reference counts {ref[counted != ref][:8].tolist()} of blocks "
              f"{np.flatnonzero(counted != ref)[:8].tolist()} != the tables holding "
              f"them {counted[counted != ref][:8].tolist()}")
    r_idx, c_idx = np.nonzero(inside)
    if np.unique(tables[r_idx, c_idx].astype(np.int64) * rows + r_idx).size != held.size:
        _fail("a table holds a block twice")
    if not np.array_equal(np.flatnonzero(ref > 0), np.flatnonzero(state == HELD)):
        _fail(f"HELD blocks {np.setxor1d(np.flatnonzero(ref > 0), np.flatnonzero(state == HELD))[:8].tolist()} "
              "are not exactly the blocks tables hold")
    # Each block's fill is its reserved slots, the same for every holder
    # (a shared partial block is the same tokens of forked sequences).
    expect = np.zeros(n, np.int64)
    want = np.minimum(bt, lens[r_idx].astype(np.int64) - c_idx * bt)
    expect[tables[r_idx, c_idx]] = want
    if not np.array_equal(expect[tables[r_idx, c_idx]], want) or not np.array_equal(
            expect, c._fill):
        _fail(f"reserved slots per block disagree at blocks "
              f"{np.flatnonzero(expect != c._fill)[:8].tolist()}")

    split = np.count_nonzero((ref > 1) & (c._fill < bt) & (ref > 0))
    if px[P_SPLIT] != split:
        _fail(f"shared partial blocks: counted {px[P_SPLIT]}, found {split}")

    _audit_prefix(c, tables, r_idx, c_idx)

    # Counters.
    if c._preemptions < 0 or c._stamp < len(c._row_of):
        _fail(f"counters: preemptions={c._preemptions} stamp={c._stamp}")
    px = c._px
    if (min(px[P_REQS], px[P_QUERIES], px[P_HITS], px[P_COW]) < 0
            or px[P_HITS] > px[P_QUERIES] or px[P_HITS] % bt
            or px[P_ON] != c.prefix_caching):
        _fail(f"prefix counters: requests={px[P_REQS]} queries={px[P_QUERIES]} "
              f"hits={px[P_HITS]} copies={px[P_COW]} on={px[P_ON]}")


def _audit_prefix(c, tables, r_idx, c_idx):
    """Every findable hash leads to blocks whose stored tokens and parent
    chain hash to it; classes are content-pure; the table is well formed."""
    px, blk, bt, tok = c._px, c._blk, c.block_tokens, c._tok
    blku = px.view(np.uint64)[_P_HEAD:_P_HEAD + _B_COLS * c.num_blocks].reshape(blk.shape)
    keys, vals = _px_parts(px)[2:]
    mask = int(px.view(np.uint64)[P_MASK])
    depth = blk[:, B_DEPTH]
    found = np.flatnonzero(depth >= 0)
    if np.any(depth < -1):
        _fail(f"depths below -1 at blocks {np.flatnonzero(depth < -1)[:8].tolist()}")
    if found.size and not c.prefix_caching:
        _fail(f"blocks {found[:8].tolist()} are findable with prefix caching off")
    if np.any(c._state[found] == NEVER) or np.any(
            (c._fill[found] != bt) & (blk[found, B_REF] > 0)):
        _fail("a findable block was never handed out or is not full")

    # Each findable block's hash is its stored tokens after its parent hash
    # (the root's for depth 0).
    for b in found.tolist():
        ph = int(blku[b, B_PHASH])
        if depth[b] == 0 and ph != _ROOT_HASH:
            _fail(f"block {b} at depth 0 has parent hash {ph:#x}, not the root's")
        h = ph
        for t in tok[b * bt:(b + 1) * bt].tolist():
            h = _mix(h, t)
        if _finish(h) & mask != int(blku[b, B_HASH]):
            _fail(f"block {b}: its stored tokens and parent hash do not hash to "
                  f"{int(blku[b, B_HASH]):#x}")

    # The table: one entry per hash, reachable by probing, naming the oldest
    # block of a list that holds exactly the findable blocks of that hash,
    # all of one depth, parent hash and tokens; a parent class (depth - 1)
    # lives for every class below the root.
    listed = []
    heads = {}
    for i in np.flatnonzero(vals >= 0).tolist():
        h, head = keys[i], int(vals[i])
        if _h_slot(keys, vals, h) != i:
            _fail(f"table slot {i} (hash {int(h):#x}) is not reachable by probing")
        if not 0 <= head < c.num_blocks or depth[head] < 0 or blku[head, B_HASH] != h:
            _fail(f"table slot {i} names block {head}, not a findable block of its hash")
        heads[int(h)] = head
        members = [head]
        b = int(blk[head, B_NEXT])
        while b != -1:
            if len(members) > found.size or blk[b, B_PREV] != members[-1]:
                _fail(f"the list of hash {int(h):#x} is broken at block {b}")
            members.append(b)
            b = int(blk[b, B_NEXT])
        if blk[head, B_PREV] != members[-1]:
            _fail(f"the list of hash {int(h):#x} does not record its tail")
        for b in members[1:]:
            if (blku[b, B_HASH] != h or depth[b] != depth[head]
                    or blku[b, B_PHASH] != blku[head, B_PHASH]
                    or not np.array_equal(tok[b * bt:(b + 1) * bt],
                                          tok[head * bt:(head + 1) * bt])):
                _fail(f"block {b} is listed with block {head} but differs")
        listed += members
    if sorted(listed) != found.tolist():
        _fail(f"findable blocks {np.setxor1d(listed, found)[:8].tolist()} are not "
              "listed exactly once")
    for b in found.tolist():
        if depth[b] > 0:
            parent = heads.get(int(blku[b, B_PHASH]))
            if parent is None or depth[parent] != depth[b] - 1:
                _fail(f"block {b}: no findable parent class at depth {depth[b] - 1}")

    # In the tables: a findable block sits at its depth, after a findable
    # block of its parent hash.
    held = tables[r_idx, c_idx].astype(np.int64)
    at = depth[held] >= 0
    if np.any(depth[held[at]] != c_idx[at]):
        _fail("a findable block sits in a table at another depth than its own")
    for r, j, b in zip(r_idx[at].tolist(), c_idx[at].tolist(), held[at].tolist()):
        if j and (depth[tables[r, j - 1]] < 0
                  or blku[tables[r, j - 1], B_HASH] != blku[b, B_PHASH]):
            _fail(f"row {r}: block {b} follows a block that is not its parent")
