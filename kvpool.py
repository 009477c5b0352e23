"""kvpool: a KV-cache memory pool over one preallocated byte arena.

A ``MemoryPool`` (a numba jitclass) cuts one ``uint8`` arena into fixed-size
blocks and hands them out; a ``KVCacheManager`` (plain Python) maps cache keys
to entries that own a chain of blocks, evicts by recency under pressure, moves
the bytes in and out, keeps statistics, and audits all of it on demand.

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
* Metadata costs 17 bytes per block (ring and link ``int64``, state ``uint8``).
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

The pool is usable from a user's own ``@numba.njit`` code: pass it in and call
its methods; compiled code gets status codes (``OK``, ``ERR_*``, ``NO_BLOCK``),
never formatted exceptions, except from ``deallocate``/``deallocate_n``.
Under ``NUMBA_DISABLE_JIT=1`` the jitclass is a plain Python class with the
same behaviour; everything here works in both modes.
"""

__all__ = [
    "MemoryPool", "KVCacheManager", "CacheKey", "KVPoolEntry", "PoolStats",
    "EvictionReport", "PoolExhaustedError",
    "NO_BLOCK", "OK", "ERR_RANGE", "ERR_NOT_ALLOCATED", "ERR_IN_ENTRY",
    "ERR_DUPLICATE", "ERR_NO_SPACE", "ERR_BAD_CHAIN",
]
__version__ = "0.1.0"

import collections
import collections.abc
import dataclasses
import itertools
import json
import operator
import os
import re
import tempfile
import threading
import time

import numpy as np
from numba import boolean, int64, njit, uint8
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

@njit
def _pop(ring, total, head, count, bump):
    """The next id in allocation order (the oldest freed, else the next
    never-used) and the new ``(head, count, bump)``."""
    if count > 0:
        block = ring[head]
        head += 1
        return block, (0 if head == total else head), count - 1, bump
    return bump, head, count, bump + 1


@njit
def _tail(total, head, count):
    """The ring slot just past the last of ``count`` ids from ``head``."""
    tail = head + count
    return tail - total if tail >= total else tail


@njit
def _push(ring, state, total, head, count, block):
    """Append ``block`` to the ring tail, marked FREE; the new count."""
    ring[_tail(total, head, count)] = block
    state[block] = FREE
    return count + 1


@jitclass([
    ("arena", uint8[::1]),
    ("block_size", int64),
    ("total_blocks", int64),
    ("ring", int64[::1]),
    ("head", int64),
    ("count", int64),
    ("bump", int64),
    ("state", uint8[::1]),
    ("link", int64[::1]),
    ("peak_used", int64),
])
class MemoryPool:
    """Fixed-size blocks of one byte arena, reused first-freed-first-out.

    ``MemoryPool(total_size, block_size, arena=None)``: ``total_size //
    block_size`` blocks over a new zeroed arena, or over ``arena`` (a 1-D
    C-contiguous ``uint8`` array of at least that many blocks' bytes, used
    without a copy).

    Free-list ring (capacity ``total_blocks``)::

        ring: [ . | . | 7 | 3 | 9 | . ]      head=2, count=3
                        ^oldest     ^newest; the next free goes to
                                    (head + count) % total_blocks

    Invariants (audited by ``KVCacheManager.check_invariants``):
    ``0 <= count <= bump <= total_blocks``; state is NEVER exactly for ids
    ``>= bump``; the ring slots ``head .. head+count-1`` hold each FREE block
    once; ``used_blocks = bump - count <= peak_used``.

    Block API (the caller owns the ids): ``allocate``, ``allocate_n``,
    ``release``, ``release_n`` (status codes) and ``deallocate``,
    ``deallocate_n`` (raise ``ValueError``).
    Chain API (what entries use): ``alloc_chain``, ``alloc_chains``,
    ``free_chain``, ``free_chains``, ``resize_chain``,
    ``chain_blocks``, ``read_chain``, ``write_chain``.
    Counters: ``free_blocks``, ``used_blocks``, ``never_used_blocks``,
    ``total_blocks``, ``capacity``, ``peak_used``.
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
            if arena.shape[0] < n * block_size:
                raise ValueError("arena is smaller than the blocks it must hold")
            self.arena = arena[:n * block_size]
        self.block_size = block_size
        self.total_blocks = n
        self.ring = np.zeros(n, np.int64)
        self.head = 0
        self.count = 0
        self.bump = 0
        self.state = np.zeros(n, np.uint8)
        self.link = np.full(n, NO_BLOCK, np.int64)
        self.peak_used = 0

    # counters ---------------------------------------------------------------

    @property
    def free_blocks(self):
        """Blocks that can be handed out now: freed ones plus never-used ones."""
        return self.count + self.total_blocks - self.bump

    @property
    def used_blocks(self):
        """Blocks handed out and not yet returned (entries' and HELD)."""
        return self.bump - self.count

    @property
    def never_used_blocks(self):
        return self.total_blocks - self.bump

    @property
    def capacity(self):
        """Usable bytes: ``total_blocks * block_size``."""
        return self.total_blocks * self.block_size

    # the two primitives: take from the front, put at the back ---------------

    def _take(self, out):
        """Fill ``out`` with the next ``len(out)`` ids in allocation order.
        The caller has checked that enough are free, and sets their states."""
        ring = self.ring
        total = self.total_blocks
        head = self.head
        count = self.count
        bump = self.bump
        for i in range(out.shape[0]):
            block, head, count, bump = _pop(ring, total, head, count, bump)
            out[i] = block
        self.head = head
        self.count = count
        self.bump = bump
        self._note_peak()

    def _note_peak(self):
        if self.bump - self.count > self.peak_used:
            self.peak_used = self.bump - self.count

    def _put(self, ids):
        """Append ``ids`` (checked by the caller) to the ring tail, in order."""
        ring = self.ring
        state = self.state
        total = self.total_blocks
        head = self.head
        count = self.count
        for i in range(ids.shape[0]):
            count = _push(ring, state, total, head, count, ids[i])
        self.count = count

    def _zero(self, ids, start):
        """Zero the bytes of blocks ``ids`` from byte ``start`` of the run on."""
        arena = self.arena
        bs = self.block_size
        first = start // bs
        for i in range(first, ids.shape[0]):
            lo = ids[i] * bs + (start % bs if i == first else 0)
            span = arena[lo:(ids[i] + 1) * bs]   # a view: the loop vectorizes
            for j in range(span.shape[0]):
                span[j] = 0

    # block API ----------------------------------------------------------------

    def allocate_n(self, out):
        """Take ``len(out)`` blocks into ``out``; return ``len(out)``, or 0
        (taking nothing) when fewer are free."""
        n = out.shape[0]
        if n > self.free_blocks:
            return 0
        self._take(out)
        state = self.state
        for i in range(n):
            state[out[i]] = HELD
        return n

    def allocate(self):
        """Take one block; return its id, or ``NO_BLOCK`` when none is free."""
        if self.free_blocks == 0:
            return NO_BLOCK
        block, head, count, bump = _pop(self.ring, self.total_blocks,
                                        self.head, self.count, self.bump)
        self.head = head
        self.count = count
        self.bump = bump
        self.state[block] = HELD
        self._note_peak()
        return block

    def _first_bad(self, ids):
        """Index of the first id in ``ids`` that ``release_n`` refuses, or -1."""
        state = self.state
        total = self.total_blocks
        bad = -1
        for i in range(ids.shape[0]):
            b = ids[i]
            if b < 0 or b >= total or state[b] != HELD:
                bad = i
                break
            state[b] = FREE          # mark, so a repeat shows as not HELD
        for k in range(bad if bad >= 0 else ids.shape[0]):
            state[ids[k]] = HELD
        return bad

    def _status_of(self, b, seen):
        """Why ``release`` refuses block ``b`` (``seen``: earlier in the call)."""
        if b < 0 or b >= self.total_blocks:
            return ERR_RANGE
        if seen:
            return ERR_DUPLICATE
        s = self.state[b]
        if s == HEAD or s == LINK:
            return ERR_IN_ENTRY
        return ERR_NOT_ALLOCATED

    def release_n(self, ids):
        """Return HELD blocks ``ids`` to the ring tail in order; return ``OK``,
        or an ``ERR_*`` code and free nothing."""
        bad = self._first_bad(ids)
        if bad >= 0:
            seen = False
            for k in range(bad):
                if ids[k] == ids[bad]:
                    seen = True
            return self._status_of(ids[bad], seen)
        self._put(ids)
        return OK

    def release(self, block):
        """Return one HELD block to the ring tail; ``OK`` or an ``ERR_*``
        code (freeing nothing)."""
        if block < 0 or block >= self.total_blocks or self.state[block] != HELD:
            return self._status_of(block, False)
        self.count = _push(self.ring, self.state, self.total_blocks, self.head,
                           self.count, block)
        return OK

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
        status = self.release_n(ids)
        if status != OK:
            self._raise_for(status, ids[self._first_bad(ids)])

    def deallocate(self, block):
        """``release`` that raises ``ValueError`` naming a bad id."""
        status = self.release(block)
        if status != OK:
            self._raise_for(status, block)

    # chain API ----------------------------------------------------------------

    def _walk(self, head, n, out, at):
        """How many blocks (up to ``n``) the chain at ``head`` has before a
        bad id or state; ``n + 1`` if it is exactly ``n`` long and ends.
        Records the good ids it passes in ``out`` from index ``at`` on,
        wrapping to 0 at its end; an empty ``out`` records nothing. Takes at
        most ``total_blocks`` steps, so a corrupted cycle cannot trap it."""
        state = self.state
        link = self.link
        total = self.total_blocks
        size = out.shape[0]
        steps = min(n, total)
        b = head
        for i in range(steps):
            if b < 0 or b >= total or state[b] != (HEAD if i == 0 else LINK):
                return i
            if size > 0:
                out[at] = b
                at = at + 1 if at + 1 < size else 0
            b = link[b]
        if steps < n:                       # more good blocks than exist
            return steps
        return n + 1 if b == NO_BLOCK and n > 0 else n

    def _id_buffer(self, n):
        """Room for the ids of a chain of ``n`` blocks (no chain is longer
        than the pool)."""
        return np.empty(max(min(n, self.total_blocks), 0), np.int64)

    def chain_blocks(self, head, n):
        """The ids of the chain at ``head``, at most ``n``, stopping early at
        a bad link or state (so a short result means a broken chain)."""
        out = self._id_buffer(n)
        return out[:self._walk(head, n, out, 0)]

    def _chain(self, head, n):
        """``chain_blocks`` if ``head`` starts a chain of exactly ``n`` blocks,
        else an empty array."""
        out = self._id_buffer(n)
        return out if self._walk(head, n, out, 0) == n + 1 else out[:0]

    def _link_run(self, ids, start, stop, first_state):
        """Chain ``ids[start:stop]`` in order, ending in ``NO_BLOCK`` (indices,
        not a slice: one view per chain costs more than the linking)."""
        link = self.link
        state = self.state
        for i in range(start, stop - 1):
            link[ids[i]] = ids[i + 1]
            state[ids[i + 1]] = LINK
        link[ids[stop - 1]] = NO_BLOCK
        state[ids[start]] = first_state

    def alloc_chains(self, counts, zero):
        """One chain of ``counts[k]`` blocks per k, taken in pool order; return
        their heads, or an empty array (taking nothing) if any count < 1 or
        too few blocks are free. ``zero`` zeroes the blocks' bytes."""
        m = counts.shape[0]
        free = self.free_blocks
        need = 0
        for k in range(m):
            if counts[k] < 1 or counts[k] > free - need:
                return np.empty(0, np.int64)          # (no int64 overflow)
            need += counts[k]
        ids = np.empty(need, np.int64)
        self._take(ids)
        heads = np.empty(m, np.int64)
        pos = 0
        for k in range(m):
            self._link_run(ids, pos, pos + counts[k], HEAD)
            heads[k] = ids[pos]
            pos += counts[k]
        if zero:
            self._zero(ids, 0)
        return heads

    def alloc_chain(self, n, zero):
        """One chain of ``n`` blocks; its head, or ``NO_BLOCK``."""
        if n < 1 or n > self.free_blocks:
            return NO_BLOCK
        ids = np.empty(n, np.int64)
        self._take(ids)
        self._link_run(ids, 0, n, HEAD)
        if zero:
            self._zero(ids, 0)
        return ids[0]

    def free_chains(self, heads):
        """Free the whole chains at ``heads`` to the ring tail, chain by chain
        in order; return all their ids in that order, or an empty array
        (freeing nothing) if any head does not start a chain that ends in
        ``NO_BLOCK``, or two share a block. One walk per chain, staging the
        ids in the ring's unused slots past the tail as ``free_chain`` does."""
        ring = self.ring
        state = self.state
        total = self.total_blocks
        count = self.count
        start = _tail(total, self.head, count)
        at = start
        done = 0
        for k in range(heads.shape[0]):
            room = total - count - done     # no valid chain is longer
            got = self._walk(heads[k], room, ring, at)
            if got > room:                  # exactly fills the room, and ends
                got = room
            elif got == 0 or self.link[ring[(at + got - 1) % total]] != NO_BLOCK:
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
        self.count = count + done
        return ids

    def free_chain(self, head, n):
        """Free one chain of ``n`` blocks to the ring tail, in chain order;
        ``OK``, or ``ERR_BAD_CHAIN`` (freeing nothing). One walk: the ids are
        written into the ring's unused slots past the tail, then counted in
        (a refused chain may leave ids in those unused slots, nothing else)."""
        ring = self.ring
        total = self.total_blocks
        count = self.count
        if n > total - count:               # more than the ring has room for
            return ERR_BAD_CHAIN            # (so more than are in use)
        tail = _tail(total, self.head, count)
        if self._walk(head, n, ring, tail) != n + 1:
            return ERR_BAD_CHAIN
        state = self.state
        for i in range(n):
            state[ring[tail]] = FREE
            tail = tail + 1 if tail + 1 < total else 0
        self.count = count + n
        return OK

    def resize_chain(self, head, n_old, n_new, zero_from, zero):
        """Make the chain at ``head`` ``n_new`` blocks long (``n_new >= 1``).

        Growth appends blocks in pool order; shrinking frees the tail blocks
        to the ring in chain order. With ``zero``, added blocks are zeroed and
        so are the kept bytes from ``zero_from`` on. Returns ``OK``,
        ``ERR_NO_SPACE`` or ``ERR_BAD_CHAIN`` (then nothing changed).
        """
        ids = self._chain(head, n_old)
        if ids.shape[0] == 0 or n_new < 1:
            return ERR_BAD_CHAIN
        if zero_from < 0:
            return ERR_RANGE
        if n_new - n_old > self.free_blocks:
            return ERR_NO_SPACE
        if n_new > n_old:
            added = np.empty(n_new - n_old, np.int64)
            self._take(added)
            self._link_run(added, 0, n_new - n_old, LINK)
            self.link[ids[n_old - 1]] = added[0]
            if zero:
                self._zero(added, 0)
        elif n_new < n_old:
            self.link[ids[n_new - 1]] = NO_BLOCK
            self._put(ids[n_new:])
        if zero and zero_from < min(n_old, n_new) * self.block_size:
            self._zero(ids[:min(n_old, n_new)], zero_from)
        return OK

    def _copy(self, head, n, offset, buf, into_arena):
        """Scatter ``buf`` into (or gather it from) the chain's bytes starting
        ``offset`` bytes in; ``OK`` or an ``ERR_*`` code, copying nothing.
        Blocks adjacent in the arena are copied as one run; a ``buf`` that
        overlaps the arena goes through a copy, as memmove would."""
        if self._walk(head, n, self.ring[:0], 0) != n + 1:   # (records nothing)
            return ERR_BAD_CHAIN
        size = buf.shape[0]
        bs = self.block_size
        if offset < 0 or offset > n * bs - size:        # (no int64 overflow)
            return ERR_RANGE
        arena = self.arena
        lo = arena.ctypes.data
        first = buf.ctypes.data                 # buf's bytes, at any stride
        last = first + (size - 1) * buf.strides[0]
        overlap = (size > 0 and min(first, last) < lo + arena.shape[0]
                   and lo <= max(first, last))
        user_buf = buf
        if overlap and into_arena:
            buf = user_buf.copy()
        elif overlap:
            buf = np.empty(size, np.uint8)      # filled, then copied out
        link = self.link
        b = head
        for i in range(offset // bs):
            b = link[b]
        within = offset % bs
        done = 0
        while done < size:
            start = b * bs + within
            length = min(bs - within, size - done)
            b = link[b]
            while done + length < size and b * bs == start + length:
                length = min(length + bs, size - done)
                b = link[b]
            run = arena[start:start + length]   # views: the loops vectorize
            part = buf[done:done + length]
            if into_arena:
                for j in range(length):
                    run[j] = part[j]
            else:
                for j in range(length):
                    part[j] = run[j]
            done += length
            within = 0
        if overlap and not into_arena:
            for j in range(size):
                user_buf[j] = buf[j]
        return OK

    def write_chain(self, head, n, offset, data):
        """Copy ``data`` (``uint8``) into the chain from byte ``offset``."""
        return self._copy(head, n, offset, data, True)

    def read_chain(self, head, n, offset, out):
        """Fill ``out`` (``uint8``) from the chain's bytes at ``offset``."""
        return self._copy(head, n, offset, out, False)


class _PoolMethods(dict):
    """``name -> f(pool, *args)`` for the pool methods the manager calls.

    Each is resolved once, on first use, to the compiled entry point of the
    one signature the manager passes (``SIGNATURES``): that skips numba's
    per-call type dispatch, about 4x cheaper from the interpreter than the
    bound method. Under NUMBA_DISABLE_JIT it is the plain function.
    """

    SIGNATURES = {
        "alloc_chain": (int64, boolean),
        "alloc_chains": (int64[::1], boolean),
        "free_chain": (int64, int64),
        "free_chains": (int64[::1],),
        "resize_chain": (int64, int64, int64, int64, boolean),
        "write_chain": (int64, int64, int64, uint8[::1]),
        "read_chain": (int64, int64, int64, uint8[::1]),
    }

    def __missing__(self, name):
        class_type = getattr(MemoryPool, "class_type", None)
        if class_type is None:
            method = getattr(MemoryPool, name)
        else:
            method = class_type.jit_methods[name].compile(
                (class_type.instance_type,) + self.SIGNATURES[name])
        self[name] = method
        return method


_POOL = _PoolMethods()


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


@dataclasses.dataclass(frozen=True)
class PoolStats:
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

    def to_dict(self):
        return dataclasses.asdict(self)


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
    """The raw bytes of ``data`` as a contiguous, writable 1-D ``uint8`` array
    (a copy only when ``data`` is non-contiguous or read-only)."""
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
    flags = arr.flags
    if not (flags.c_contiguous and flags.writeable):
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
    Statistics: ``stats``, ``get_stats``, ``reset_stats``, listeners.
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
        self.pool = MemoryPool(total_size, block_size, arena)
        self._arena = self.pool.arena          # a view, fetched once
        self._block_size = block_size
        self._capacity = self.pool.capacity
        self._eviction = eviction
        self._zero = zero_on_alloc
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
            self._check_new_key(key)
            head = _POOL["alloc_chain"](self.pool, n, self._zero)
            reports = None
            if head < 0:
                reports = self._make_room(n, None)
                head = _POOL["alloc_chain"](self.pool, n, self._zero)
                assert head >= 0, f"no {n} blocks free after making room"
            entry = KVPoolEntry(key, size, head, n, self.pool)
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
            self._deliver(reports)
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
            alloc_chains = _POOL["alloc_chains"]
            heads = alloc_chains(self.pool, counts, self._zero)
            reports = None
            if heads.shape[0] == 0:
                reports = self._make_room(int(counts.sum()), None)
                heads = alloc_chains(self.pool, counts, self._zero)
                assert heads.shape[0] == len(keys), "blocks vanished"
            entries = list(map(KVPoolEntry, keys, sizes, heads.tolist(),
                               counts.tolist(), itertools.repeat(self.pool)))
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
            self._deliver(reports)
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
                args = (self.pool, entry.block, n_old, n_new,
                        min(entry.size, new_size), self._zero)
                status = _POOL["resize_chain"](*args)
                if status == ERR_NO_SPACE:
                    reports = self._make_room(n_new - n_old, entry)
                    status = _POOL["resize_chain"](*args)
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
            self._deliver(reports)
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
            self._deliver(reports)
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
            self._deliver(reports)
        return result

    def clear(self):
        """Remove every entry, pinned ones too (reason ``"clear"``)."""
        with self._lock:
            reports = self._release(list(self._cache.values()), "clear")
        if reports:
            self._deliver(reports)

    def _make_room(self, need, keep):
        """The one eviction hook: free least recently used unpinned entries
        (never ``keep``) until ``need`` blocks are free, or raise
        ``PoolExhaustedError`` having evicted nothing."""
        free = self.pool.free_blocks
        victims = []
        if self._eviction == "lru":
            for entry in self._cache.values():
                if free >= need:
                    break
                if not entry.pinned and entry is not keep:
                    victims.append(entry)
                    free += entry.n_blocks
        if free < need:
            raise PoolExhaustedError(need, self.pool.free_blocks)
        return self._release(victims, "lru")

    def _release(self, entries, reason):
        """The one removal path: free the entries' blocks in one compiled call,
        then forget them; the reports, if anyone listens."""
        pool = self.pool
        if not entries:
            return None
        if len(entries) == 1 and not self._listeners:   # the common case
            entry = entries[0]
            status = _POOL["free_chain"](pool, entry.block, entry.n_blocks)
            assert status == OK, f"entry {entry!r} has no valid chain"
            self._forget(entries, reason)
            return None
        heads = np.fromiter([e.block for e in entries], np.int64, len(entries))
        ids = _POOL["free_chains"](pool, heads)
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

    def _deliver(self, reports):
        """Hand each report to each listener; a listener's exception propagates
        after the state change is complete (later reports are still sent)."""
        error = None
        for report in reports:
            for fn in list(self._listeners):
                try:
                    fn(report)
                except BaseException as exc:       # noqa: BLE001 - re-raised
                    if error is None:
                        error = exc
        if error is not None:
            raise error

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
    def eviction(self):
        return self._eviction

    @property
    def block_size(self):
        return self._block_size

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
            status = _POOL["write_chain"](self.pool, entry.block,
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
            status = _POOL["read_chain"](self.pool, entry.block,
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
        if not 0 <= block < self.pool.total_blocks:
            raise ValueError(f"block id {block} is out of range "
                             f"[0, {self.pool.total_blocks})")
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
        pool = self.pool
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
            self.pool.peak_used = self.pool.used_blocks

    # persistence ---------------------------------------------------------------------

    def _state(self):
        """(meta, arrays, keys): all that defines the manager, shared by
        ``save``, ``load``, pickle and ``==``."""
        pool = self.pool
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
            pool = m.pool
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
                                        % self.pool.total_blocks]
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


def _fail(message):
    raise AssertionError(message)


def _audit(m):
    pool = m.pool
    total, bs = pool.total_blocks, pool.block_size
    head, count, bump, peak = pool.head, pool.count, pool.bump, pool.peak_used
    state, ring, link = pool.state, pool.ring, pool.link

    # Geometry: the arena is total_blocks whole blocks; the manager agrees.
    if bs != m._block_size or m._arena.shape[0] != total * bs:
        _fail(f"arena of {m._arena.shape[0]} bytes != total_blocks={total} * "
              f"block_size={bs} (manager block_size={m._block_size})")
    if not np.shares_memory(m._arena, pool.arena):
        _fail("the manager's arena view is not the pool's arena")

    # Counters in range: 0 <= head < total, 0 <= count <= bump <= total.
    if not (0 <= head < total and 0 <= count <= bump <= total):
        _fail(f"pool counters out of range: head={head} count={count} "
              f"bump={bump} total_blocks={total}")
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

    # The ring holds each FREE block exactly once, nothing else.
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
