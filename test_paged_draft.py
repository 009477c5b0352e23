"""Tests of PagedKVCache: a model-checked state machine, attention against
numpy, preemption, bad input, the audit, and the README's decode loop."""

import collections
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule)

import kvpool
from kvpool import PagedKVCache, PoolExhaustedError, SeqRows


# -- helpers -------------------------------------------------------------------

def reference_attention(kv, table, length, bt, layer, q, scale):
    """softmax(q K^T scale) V for one sequence's last len(q) tokens, numpy,
    float32 accumulation; kv as stored (any float dtype)."""
    blocks = np.asarray(table[:-(-length // bt)])
    k = kv[blocks, layer, 0].reshape(-1, *kv.shape[4:])[:length].astype(np.float32)
    v = kv[blocks, layer, 1].reshape(-1, *kv.shape[4:])[:length].astype(np.float32)
    nq, qh, hd = q.shape
    group = qh // k.shape[1]
    out = np.zeros((nq, qh, hd), np.float32)
    for j in range(nq):
        p = length - nq + j
        for h in range(qh):
            s = (k[:p + 1, h // group] @ q[j, h].astype(np.float32)) * np.float32(scale)
            w = np.exp(s - s.max())
            out[j, h] = (w / w.sum()) @ v[:p + 1, h // group]
    return out


def free_list(c):
    """The free list in hand-out order: never-used ids, then the linked list."""
    p = c._pool
    ids = list(range(p.bump, p.total_blocks))
    b = p.head
    while b != -1:
        ids.append(int(b))
        b = p.ring[b]
    return ids


def snapshot(c):
    """Everything observable that defines the cache's future."""
    p = c._pool
    seqs = {}
    for s in c:
        r = c._row_of[s]
        L = int(c._lens[r])
        nb = -(-L // c.block_tokens)
        seqs[s] = (L, c._tables[r, :nb].tolist(), int(c._rowinfo[r, 1]),
                   c._tok[c.slots(s)].tolist())
    return (seqs, list(c), free_list(c), p.ctr.tolist(), c.stats, c._stamp, c.kv.tobytes(),
            c._state.tobytes(), c._fill.tobytes(), c._px.tobytes())


def small(**kw):
    args = dict(num_blocks=12, block_tokens=4, layers=2, kv_heads=2, head_dim=4,
                dtype=np.float32)
    args.update(kw)
    return PagedKVCache(args.pop("num_blocks"), args.pop("block_tokens"), **args)


# -- the state machine -----------------------------------------------------------

class Model:
    """Pure-Python prediction of vLLM v1's rules: a free queue of every
    block in id order, new blocks from its front, a removed sequence's
    blocks to its back last block first, reference counts, copy-on-write,
    and a prefix cache keyed by exact content (parent key, tokens), so no
    collision is possible here; a lookup takes the oldest block of a key.
    Also the newest-first preemption and the stored bytes."""

    def __init__(self, n, bt, shape, dtype, prefix=True):
        self.n, self.bt, self.prefix = n, bt, prefix
        self.free = list(range(n))
        self.ref = [0] * n
        self.key = [None] * n           # the findable content key of a block
        self.cache = {}                 # key -> blocks, oldest first
        self.fill = [0] * n
        self.tok = [0] * (n * bt)
        self.peak = 0
        self.seqs = {}                  # seq -> [tokens, table, stamp]
        self.stamp = 0
        self.preemptions = 0
        self.queries = self.hits = self.requests = self.copies = 0
        self.kv = np.zeros(shape, dtype)

    def nfree(self):
        return len(self.free)

    def used(self):
        return self.n - len(self.free)

    def take(self):
        b = self.free.pop(0)
        k = self.key[b]
        if k is not None:
            self.cache[k].remove(b)
            if not self.cache[k]:
                del self.cache[k]
            self.key[b] = None
        self.ref[b] = 1
        return b

    def register(self, table, j):
        """Block ``table[j]`` just filled."""
        if not self.prefix:
            return
        b = table[j]
        parent = None if j == 0 else self.key[table[j - 1]]
        if j and parent is None:
            return
        k = (parent, tuple(self.tok[b * self.bt:(b + 1) * self.bt]))
        self.cache.setdefault(k, []).append(b)
        self.key[b] = k

    def lookup(self, tokens):
        found, parent = [], None
        for j in range((len(tokens) - 1) // self.bt):
            k = (parent, tuple(tokens[j * self.bt:(j + 1) * self.bt]))
            if k not in self.cache:
                break
            found.append(self.cache[k][0])
            parent = k
        return found

    def release(self, seq):
        tokens, table, _ = self.seqs.pop(seq)
        freed = 0
        for b in reversed(table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)
                self.fill[b] = 0
                freed += 1
        return len(tokens), freed

    def need(self, length, extra):
        return -(-(length + extra) // self.bt) - (-(-length // self.bt))

    def append_need(self, seqs):
        """Blocks that one token for each of ``seqs`` takes, in order."""
        need, dropped = 0, collections.Counter()
        for s in seqs:
            tokens, table, _ = self.seqs[s]
            if len(tokens) % self.bt == 0:
                need += 1
            else:
                b = table[-1]
                if self.ref[b] - dropped[b] > 1:
                    need += 1
                    dropped[b] += 1
        return need

    def cow(self, seq):
        """Copy the sequence's shared last block before writing to it."""
        tokens, table, _ = self.seqs[seq]
        b = table[-1]
        if len(tokens) % self.bt and self.ref[b] > 1:
            c = self.take()
            self.kv[c] = self.kv[b]
            bt = self.bt
            self.tok[c * bt:(c + 1) * bt] = self.tok[b * bt:(b + 1) * bt]
            self.fill[c] = self.fill[b]
            self.ref[b] -= 1
            table[-1] = c
            self.copies += 1

    def extend(self, seq, toks, skip=0):
        tokens, table, _ = self.seqs[seq]
        if toks and table:
            self.cow(seq)
        for _ in range(self.need(len(tokens), len(toks)) - (skip // self.bt)):
            table.append(self.take())
        slots = []
        for i, t in enumerate(toks):
            p = len(tokens)
            tokens.append(t)
            b = table[p // self.bt]
            slots.append(b * self.bt + p % self.bt)
            if i < skip:
                continue
            self.tok[slots[-1]] = t
            self.fill[b] = p % self.bt + 1
            if p % self.bt == self.bt - 1:
                self.register(table, p // self.bt)
        self.peak = max(self.peak, self.used())
        return slots

    def add(self, seq, tokens):
        """The covered token count, or None when the pool is short."""
        found = self.lookup(tokens) if self.prefix else []
        revive = sum(1 for b in found if self.ref[b] == 0)
        if self.need(0, len(tokens)) - len(found) > self.nfree() - revive:
            return None
        for b in found:
            if self.ref[b] == 0:
                self.free.remove(b)
                self.fill[b] = self.bt
            self.ref[b] += 1
        self.seqs[seq] = [[], list(found), self.stamp]
        self.stamp += 1
        covered = len(found) * self.bt
        self.extend(seq, list(tokens), covered)
        if self.prefix:
            self.requests += 1
            self.queries += len(tokens)
            self.hits += covered
        return covered

    def fork(self, parent, child):
        tokens, table, _ = self.seqs[parent]
        for b in table:
            self.ref[b] += 1
        self.seqs[child] = [list(tokens), list(table), self.stamp]
        self.stamp += 1


SEQS = st.sampled_from(["a", "b", "c", "d", "e", 5, 6])
PROMPTS = ([7, 7, 7, 7, 7, 7, 7, 7], [7, 7, 7, 7, 1, 2, 3, 4], [5, 6, 5, 6, 5, 6])
# prompts: a shared start (or none, or huge ids) and a short tail from a
# small alphabet, so that prefixes repeat and blocks get shared
TOKENS = st.one_of(
    st.tuples(st.sampled_from(PROMPTS), st.integers(0, 8),
              st.lists(st.integers(0, 2), max_size=4)).map(lambda t: t[0][:t[1]] + t[2]),
    st.lists(st.integers(0, 2 ** 40), max_size=9),
).filter(len)


class PagedMachine(RuleBasedStateMachine):

    @initialize(preempt=st.sampled_from(["none", "newest"]),
                dtype=st.sampled_from([np.float16, np.float32]),
                bt=st.sampled_from([1, 2, 4]), prefix=st.booleans())
    def setup(self, preempt, dtype, bt, prefix):
        self.reports = []
        self.c = PagedKVCache(10, bt, layers=2, kv_heads=2, head_dim=2,
                              dtype=dtype, preempt=preempt,
                              on_evict=self.reports.append, prefix_caching=prefix)
        self.m = Model(10, bt, self.c.kv.shape, self.c.dtype, prefix)
        self.rng = np.random.default_rng(0)

    def seq_list(self, data, min_size=0):
        live = sorted(self.m.seqs, key=str)
        return data.draw(st.lists(st.sampled_from(live), min_size=min_size,
                                  unique=True)) if live else []

    @rule(seq=SEQS, tokens=TOKENS)
    def add(self, seq, tokens):
        m = self.m
        if seq in m.seqs:
            with pytest.raises(KeyError):
                self.c.add(seq, tokens)
            return
        before = self.c.stats
        expect = m.add(seq, tokens)
        if expect is None:
            with pytest.raises(PoolExhaustedError):
                self.c.add(seq, tokens)
            assert self.c.stats == before
            return
        assert self.c.add(seq, tokens) == expect
        event(f"add covers {'some' if expect else 'no'} tokens")

    @precondition(lambda self: self.m.seqs)
    @rule(data=st.data(), child=SEQS)
    def fork(self, data, child):
        parent = data.draw(st.sampled_from(sorted(self.m.seqs, key=str)))
        if child in self.m.seqs:
            with pytest.raises(KeyError):
                self.c.fork(parent, child)
            return
        self.c.fork(parent, child)
        self.m.fork(parent, child)
        then = data.draw(st.integers(0, 2))    # then write: copies
        if then == 1:
            self.extend_one(data.draw(st.sampled_from([parent, child])), [3])
        elif then == 2:
            self.append_seqs(data.draw(st.permutations([parent, child])), False)

    @rule()
    def reset_prefix_cache(self):
        m = self.m
        done = self.c.reset_prefix_cache()
        assert done == (not m.seqs)
        if done:
            m.cache.clear()
            m.key = [None] * m.n

    @precondition(lambda self: self.m.seqs)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 99), max_size=6))
    def extend(self, data, tokens):
        self.extend_one(data.draw(st.sampled_from(sorted(self.m.seqs, key=str))), tokens)

    def extend_one(self, seq, tokens):
        m = self.m
        tokens_, table, _ = m.seqs[seq]
        cow = int(bool(tokens) and len(tokens_) % m.bt and m.ref[table[-1]] > 1)
        if m.need(len(tokens_), len(tokens)) + cow > m.nfree():
            with pytest.raises(PoolExhaustedError):
                self.c.extend(seq, tokens)
            return
        assert self.c.blocks_needed([seq], len(tokens)) == m.need(len(tokens_), len(tokens)) + cow
        assert self.c.extend(seq, tokens).tolist() == m.extend(seq, tokens)
        event("extend copies a shared block" if cow else "extend, no copy")

    @rule(data=st.data(), use_rows=st.booleans())
    def append(self, data, use_rows):
        self.append_seqs(self.seq_list(data), use_rows)

    def append_seqs(self, seqs, use_rows):
        m = self.m
        tokens = [len(s) if isinstance(s, str) else s for s in seqs]
        arg = self.c.rows(seqs) if use_rows else seqs
        need = m.append_need(seqs)
        assert self.c.blocks_needed(arg) == need
        if need > m.nfree() and self.c.preempt == "none":
            with pytest.raises(PoolExhaustedError):
                self.c.append(arg, tokens)
            return
        gone = {}
        before = len(self.reports)
        while need > m.nfree():                 # newest first
            newest = max(m.seqs, key=lambda s: m.seqs[s][2])
            gone[newest] = m.release(newest)
            m.preemptions += 1
            need = m.append_need([s for s in seqs if s not in gone])
        expect = []
        for s, t in zip(seqs, tokens):
            expect.append(-1 if s in gone else m.extend(s, [t])[0])
        copies = m.copies
        assert self.c.append(arg, tokens).tolist() == expect
        event("append copies a shared block" if m.copies > copies else "append, no copy")
        got = [(r.seq, r.reason, r.length, r.blocks_freed) for r in self.reports[before:]]
        assert got == [(s, "preempt") + gone[s] for s in gone]

    @rule(data=st.data())
    def remove_many(self, data):
        seqs = self.seq_list(data)
        before = len(self.reports)
        self.c.remove_many(seqs)
        expect = [(s, "remove") + self.m.release(s) for s in seqs]
        assert [(r.seq, r.reason, r.length, r.blocks_freed)
                for r in self.reports[before:]] == expect

    @precondition(lambda self: self.m.seqs)
    @rule(data=st.data(), layer=st.integers(0, 1))
    def store(self, data, layer):
        m = self.m
        seq = data.draw(st.sampled_from(sorted(m.seqs, key=str)))
        length = len(m.seqs[seq][0])
        start = data.draw(st.integers(0, length))
        stop = data.draw(st.integers(start, length))
        slots = self.c.slots(seq, start, stop)
        k = self.rng.standard_normal((len(slots), 2, 2))      # float64: converted
        v = self.rng.standard_normal((len(slots), 2, 2))
        self.c.store(layer, slots, k, v)
        bt = m.bt
        for i, s in enumerate(slots.tolist()):
            m.kv[s // bt, layer, 0, s % bt] = k[i]
            m.kv[s // bt, layer, 1, s % bt] = v[i]

    @rule(data=st.data(), layer=st.integers(0, 1), use_rows=st.booleans())
    def gather_and_attention(self, data, layer, use_rows):
        m, c = self.m, self.c
        seqs = self.seq_list(data)
        arg = c.rows(seqs) if use_rows else seqs
        k, v, lens = c.gather(layer, arg)
        assert lens.tolist() == [len(m.seqs[s][0]) for s in seqs]
        table, tl = c.block_table(arg)
        assert tl.tolist() == lens.tolist()
        for i, s in enumerate(seqs):
            tokens, tab, _ = m.seqs[s]
            assert table[i, :len(tab)].tolist() == tab
            assert np.all(table[i, len(tab):] == -1)
            pos = np.arange(len(tokens))
            blocks = np.array(tab)[pos // m.bt]
            assert np.array_equal(k[i, :len(tokens)], m.kv[blocks, layer, 0, pos % m.bt])
            assert np.array_equal(v[i, :len(tokens)], m.kv[blocks, layer, 1, pos % m.bt])
            assert not np.any(k[i, len(tokens):])
        qlens = [data.draw(st.integers(0, min(3, len(m.seqs[s][0])))) for s in seqs]
        q = self.rng.standard_normal((sum(qlens), 4, 2)).astype(np.float32)
        out = c.attention(layer, q, arg, q_lens=qlens)
        at = 0
        for s, ql in zip(seqs, qlens):
            ref = reference_attention(m.kv, m.seqs[s][1], len(m.seqs[s][0]), m.bt,
                                      layer, q[at:at + ql], 1 / math.sqrt(2))
            np.testing.assert_allclose(out[at:at + ql], ref, rtol=2e-5, atol=2e-6)
            at += ql

    @invariant()
    def agrees(self):
        c, m = self.c, self.m
        c.check_invariants()
        assert sorted(c, key=str) == sorted(m.seqs, key=str) and len(c) == len(m.seqs)
        for s, (tokens, table, _) in m.seqs.items():
            assert c.length(s) == len(tokens)
            assert c._tok[c.slots(s)].tolist() == tokens
        st_ = c.stats
        used = m.used()
        assert (st_.free_blocks, st_.used_blocks, st_.peak_used_blocks, st_.preemptions,
                st_.tokens) == (m.nfree(), used, m.peak, m.preemptions,
                                sum(len(t[0]) for t in m.seqs.values()))
        assert st_.unused_slots == used * m.bt - sum(m.fill)
        assert (st_.prefix_requests, st_.prefix_queries, st_.prefix_hits, st_.cow_copies) == (
            m.requests, m.queries, m.hits, m.copies)
        assert st_.cached_blocks == sum(1 for b in range(m.n)
                                        if m.key[b] is not None and m.ref[b] == 0)
        assert st_.shared_blocks == sum(1 for r in m.ref if r > 1)
        assert c._blk[:, kvpool.B_REF].tolist() == m.ref
        assert free_list(c) == m.free
        assert np.array_equal(c.kv.view(np.uint8), m.kv.view(np.uint8))


PagedMachine.TestCase.settings = settings(
    max_examples=int(__import__("os").environ.get("PAGED_EXAMPLES", 40)),
    stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestPaged = PagedMachine.TestCase


# -- sharing: fork, copy-on-write, the prefix cache ---------------------------------

def test_fork_shares_then_copies_on_write():
    c = small(num_blocks=40, block_tokens=4)
    c.add("p", list(range(10)))                   # 3 blocks, the last partial
    c.store(0, c.slots("p"), np.ones((10, 2, 4)), np.full((10, 2, 4), 2.0))
    for i in range(3):
        c.fork("p", i)
    assert c.stats.used_blocks == 3 and c.stats.shared_blocks == 3
    assert c._blk[c._tables[c._row_of["p"], :3], kvpool.B_REF].tolist() == [4, 4, 4]
    slots = c.append(["p", 0, 1, 2], [7, 7, 7, 7])    # 3 copies; the last keeps it
    assert c.stats.cow_copies == 3 and c.stats.used_blocks == 6
    assert len({s // 4 for s in slots.tolist()}) == 4
    for s in ["p", 0, 1, 2]:
        k, v, _ = c.gather(0, [s])
        assert np.all(k[0, :10] == 1) and np.all(v[0, :10] == 2)   # copied bytes
        assert c._tok[c.slots(s)].tolist() == list(range(10)) + [7]
    c.check_invariants()
    c.remove_many(["p", 0, 1, 2])
    assert c.stats.used_blocks == 0 and c.stats.cached_blocks == 2    # the full ones
    c.check_invariants()


def test_prefix_hits_cover_whole_blocks_short_of_the_last_token():
    c = small(num_blocks=40, block_tokens=4)
    assert c.add("a", list(range(8))) == 0
    assert c.add("b", list(range(8))) == 4         # the last token is computed
    assert c.add("c", list(range(9))) == 8
    assert c.add("d", list(range(3)) + [9] * 6) == 0
    assert c._tables[c._row_of["c"], :2].tolist() == c._tables[c._row_of["a"], :2].tolist()
    s = c.stats
    assert (s.prefix_requests, s.prefix_queries, s.prefix_hits) == (4, 34, 12)
    assert s.prefix_hit_rate == pytest.approx(12 / 34)
    c.append(["d"], [1])                            # a decode step fills a block:
    c.extend("d", [1, 1, 1])                        # findable at once
    assert c.add("e", list(range(3)) + [9] * 6 + [1] * 4 + [5]) == 12
    c.check_invariants()


def test_freed_blocks_stay_findable_until_handed_out():
    c = small(num_blocks=4, block_tokens=2)
    c.add("a", [1, 2, 3, 4, 5])                     # blocks 0, 1, 2
    c.remove("a")                                   # free list: 3, then 2, 1, 0
    assert free_list(c) == [3, 2, 1, 0] and c.stats.cached_blocks == 2
    assert c.add("b", [1, 2, 3, 4, 9]) == 4         # takes 0, 1 from the back
    assert free_list(c) == [2]                      # 3 was handed out
    assert c.stats.cached_blocks == 0
    c.remove("b")
    assert free_list(c) == [2, 3, 1, 0] and c.stats.cached_blocks == 2
    c.add("c", [8] * 6)                             # takes 2, 3, 1: evicts 1
    assert c.stats.cached_blocks == 1
    c.remove("c")
    assert c.add("d", [1, 2, 3, 4, 5]) == 2         # block 0 still found, 1 not
    c.remove("d")
    c.add("e", [8] * 8)                             # every block: all evicted
    c.remove("e")                                   # (e's own 4 now cached)
    assert c.stats.cached_blocks == 4 and c.add("f", [1, 2, 3]) == 0
    c.remove("f")                                   # f took e's tail blocks,
    assert c.add("g", [8] * 7) == 4                 # its prefix outlived them
    c.check_invariants()


def test_reset_prefix_cache_refused_while_live():
    c = small(num_blocks=10, block_tokens=2)
    c.add("a", [1, 2, 3])
    before = snapshot(c)
    assert c.reset_prefix_cache() is False and snapshot(c) == before
    c.remove("a")
    assert c.stats.cached_blocks == 1
    assert c.reset_prefix_cache() is True
    assert c.stats.cached_blocks == 0 and c.add("b", [1, 2, 3]) == 0
    c.check_invariants()


def test_prefix_caching_off_shares_nothing():
    c = small(num_blocks=10, block_tokens=2, prefix_caching=False)
    c.add("a", [1, 2, 3])
    assert c.add("b", [1, 2, 3]) == 0 and c.stats.prefix_queries == 0
    assert c.stats.cached_blocks == 0 and c.stats.shared_blocks == 0
    with pytest.raises(TypeError):
        small(prefix_caching=1)
    c.check_invariants()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), bits=st.sampled_from([0, 1, 3]),
       bt=st.sampled_from([1, 2, 3]))
def test_hash_collisions_never_share_wrong_blocks(seed, bits, bt):
    """With a hash of 0-2 bits nearly every block collides; every hit must
    still be the prompt's own tokens after its own prefix. A strong-hash
    cache beside it gives the exact-key model's hits."""
    rng = np.random.default_rng(seed)
    weak = small(num_blocks=30, block_tokens=bt)
    weak._set_hash_mask(bits)
    strong = small(num_blocks=30, block_tokens=bt)
    m = Model(30, bt, weak.kv.shape, weak.dtype)
    hits = 0
    for step in range(60):
        live = list(weak)
        if live and (rng.random() < 0.4 or weak.free_blocks < 8):
            s = live[rng.integers(len(live))]
            weak.remove(s)
            strong.remove(s)
            m.release(s)
            continue
        base = [[1, 2, 1, 2, 1, 2], [2, 1, 2, 1], [1, 1, 1, 1, 1]][rng.integers(3)]
        tokens = base[:rng.integers(1, len(base) + 1)] + rng.integers(0, 3, rng.integers(0, 4)).tolist()
        covered = weak.add(step, tokens)
        assert strong.add(step, tokens) == m.add(step, tokens)   # strong: exact
        assert covered % bt == 0 and covered < len(tokens)
        assert weak._tok[weak.slots(step)].tolist() == tokens
        hits += covered
        # every shared block of the weak cache holds this prompt's tokens
        # after the same prefix: its holders agree on all tokens before it
        table = weak._tables[weak._row_of[step]]
        for other in weak:
            ot = weak._tables[weak._row_of[other]]
            for j in range(covered // bt):
                if table[j] in ot[:j + 1].tolist():
                    assert ot[j] == table[j]
                    n = (j + 1) * bt
                    assert weak._tok[weak.slots(other, 0, n)].tolist() == tokens[:n]
        weak.check_invariants()
        strong.check_invariants()
    assert weak.stats.prefix_hits == hits


def test_collision_is_rejected_by_verification():
    c = small(num_blocks=10, block_tokens=2)
    c._set_hash_mask(0)                             # every block hashes to 0
    c.add("a", [1, 2, 3])
    assert c.add("b", [5, 6, 3]) == 0               # same hash, other tokens
    assert c.add("c", [1, 2, 1, 2, 3]) == 2         # block 1: collides with 0
    assert c.stats.prefix_hits == 2
    assert c.add("d", [1, 2, 1, 2, 3]) == 2         # c's second block stayed unfindable
    c.check_invariants()


def test_differential_against_vllm_rules():
    """Random traces of add / append / fork / remove on a tight pool: the
    same hits, block ids and free list as the exact-key model at every step."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        bt = int(rng.integers(1, 5))
        c = small(num_blocks=48, block_tokens=bt)
        m = Model(48, bt, c.kv.shape, c.dtype)
        prompts = [rng.integers(0, 4, int(rng.integers(4, 30))).tolist() for _ in range(4)]
        for step in range(300):
            live = sorted(m.seqs)
            u = rng.random()
            if live and (u < 0.25 or m.nfree() < 12):
                s = live[rng.integers(len(live))]
                c.remove(s)
                m.release(s)
            elif live and u < 0.35:
                s = live[rng.integers(len(live))]
                c.fork(s, step)
                m.fork(s, step)
            elif live and u < 0.7:
                seqs = [live[i] for i in rng.permutation(len(live))[:4]]
                toks = rng.integers(0, 4, len(seqs)).tolist()
                assert c.blocks_needed(seqs) == m.append_need(seqs)
                if m.append_need(seqs) <= m.nfree():
                    got = c.append(seqs, toks).tolist()
                    assert got == [m.extend(s, [t])[0] for s, t in zip(seqs, toks)]
            else:
                p = prompts[rng.integers(4)]
                tokens = p[:int(rng.integers(1, len(p) + 1))] + rng.integers(
                    0, 4, int(rng.integers(0, 5))).tolist()
                expect = m.add(step, tokens)
                if expect is None:
                    with pytest.raises(PoolExhaustedError):
                        c.add(step, tokens)
                else:
                    assert c.add(step, tokens) == expect
            assert c.stats.prefix_hits == m.hits
            assert free_list(c) == m.free
        c.check_invariants()
        for s, (tokens, table, _) in m.seqs.items():
            assert c._tables[c._row_of[s], :len(table)].tolist() == table
        assert m.hits > 0 and m.copies > 0


# -- attention against numpy -----------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), dtype=st.sampled_from([np.float16, np.float32]),
       kvh=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 3]),
       hd=st.sampled_from([1, 4, 8]), bt=st.sampled_from([1, 3, 4]))
def test_attention_matches_numpy(seed, dtype, kvh, group, hd, bt):
    rng = np.random.default_rng(seed)
    c = PagedKVCache(64, bt, layers=2, kv_heads=kvh, head_dim=hd, dtype=dtype)
    lengths = rng.integers(1, 12, rng.integers(1, 5)).tolist()   # includes 1-token sequences
    for i, n in enumerate(lengths):
        c.add(i, rng.integers(0, 100, n))
        for layer in range(2):
            c.store(layer, c.slots(i), rng.standard_normal((n, kvh, hd)),
                    rng.standard_normal((n, kvh, hd)))
    seqs = list(range(len(lengths)))
    rng.shuffle(seqs)
    qlens = [int(rng.integers(0, lengths[s] + 1)) for s in seqs]
    q = rng.standard_normal((sum(qlens), kvh * group, hd)).astype(np.float32)
    scale = None if seed % 2 else 0.3
    out = c.attention(1, q, seqs, q_lens=qlens, scale=scale)
    assert out.dtype == np.float32 and out.shape == q.shape
    at = 0
    for s, ql in zip(seqs, qlens):
        r = c._row_of[s]
        ref = reference_attention(c.kv, c._tables[r], lengths[s], bt, 1, q[at:at + ql],
                                  1 / math.sqrt(hd) if scale is None else scale)
        np.testing.assert_allclose(out[at:at + ql], ref, rtol=2e-5, atol=2e-6)
        at += ql
    # the default: one query per sequence, its last token
    out1 = c.attention(1, q[:len(seqs)] if len(q) >= len(seqs) else
                       rng.standard_normal((len(seqs), kvh * group, hd)), seqs)
    assert out1.shape[0] == len(seqs)


def test_float16_is_stored_converted_not_reinterpreted():
    c = small(dtype=np.float16)
    c.add("s", [1, 2])
    k = np.array([[[1.5, -2, 3, 65504]] * 2] * 2)              # float64
    c.store(0, c.slots("s"), k, -k)
    g = c.gather(0, ["s"])
    assert g[0].dtype == np.float16 and np.array_equal(g[0][0], k.astype(np.float16))
    assert np.array_equal(g[1][0], (-k).astype(np.float16))


# -- preemption -------------------------------------------------------------------

def test_preemption_frees_newest_first_and_reports():
    reports = []
    c = small(num_blocks=6, block_tokens=2, preempt="newest", on_evict=reports.append,
              prefix_caching=False)
    for name in "abc":
        c.add(name, [1, 2])                    # 3 full blocks
    c.add("d", [1, 2, 3, 4, 5, 6])             # 3 more: the pool is full
    before = c.free_blocks
    assert before == 0
    slots = c.append(["a", "b", "c"], [7, 8, 9])      # needs 3: d goes first
    assert [r.seq for r in reports] == ["d"] and reports[0].reason == "preempt"
    assert reports[0].length == 6 and reports[0].blocks_freed == 3
    assert (slots >= 0).all() and "d" not in c
    slots = c.append(["a", "b", "c"], [7, 8, 9])      # fits in the partial blocks
    assert (slots >= 0).all() and len(reports) == 1
    slots = c.append(["a", "b", "c"], [1, 1, 1])      # needs 3, none free: c
    assert [r.seq for r in reports[1:]] == ["c"]      # (and c then needs none)
    assert slots[2] == -1 and (slots[:2] >= 0).all()
    c.extend("a", [1])                                # a: 6 tokens, 3 full blocks
    slots = c.append(["b", "a"], [1, 1])              # needs 1, none free: b, then a
    assert [r.seq for r in reports[2:]] == ["b"] and slots.tolist()[0] == -1
    assert slots[1] >= 0
    assert c.stats.preemptions == 3 and list(c) == ["a"]
    c.check_invariants()


def test_preempted_rows_handle_goes_stale():
    c = small(num_blocks=2, block_tokens=1, preempt="newest")
    c.add("a", [1])
    c.add("b", [1])
    h = c.rows(["a", "b"])
    slots = c.append(h, [1, 1])             # a needs a block: b (newest) goes
    assert slots[0] >= 0 and slots[1] == -1
    with pytest.raises(KeyError, match="rows"):
        c.append(h, [1, 1])
    c.check_invariants()


def test_no_preemption_raises_with_counts():
    c = small(num_blocks=2, block_tokens=1)
    c.add("a", [1, 2])
    with pytest.raises(PoolExhaustedError) as e:
        c.append(["a"], [3])
    assert (e.value.needed, e.value.free) == (1, 0)


# -- rows and block tables ------------------------------------------------------------

def test_rows_handle_gives_live_views():
    c = small(num_blocks=20)
    for i in range(5):
        c.add(i, [1] * (i + 1))
    h = c.rows([3, 1, 4])
    table, lens = c.block_table(h)
    assert lens.tolist() == [4, 2, 5]
    assert np.shares_memory(table, c._tables)
    assert table.tolist() == c.block_table([3, 1, 4])[0].tolist()
    c.append(h, [0, 0, 0])
    assert lens.tolist() == [5, 3, 6]              # the view sees the update
    assert c.block_table(h)[0].tolist() == c.block_table([3, 1, 4])[0].tolist()
    h2 = c.rows([0, 3])                              # moves 3: h is stale
    with pytest.raises(KeyError):
        c.block_table(h)
    assert c.block_table(h2)[1].tolist() == [1, 5]
    c.check_invariants()


def test_rows_handle_owns_its_slot_array():
    c = small(num_blocks=20)
    for i in range(3):
        c.add(i, [1] * (i + 3))
    h = c.rows([0, 1, 2])
    first = c.append(h, np.array([7, 8, 9]))
    assert first.tolist() == [c.slots(s)[-1] for s in range(3)]
    kept = first.copy()
    second = c.append(h, [1, 2, 3])
    assert second is not kept and np.shares_memory(first, second)
    assert first.tolist() == second.tolist() != kept.tolist()   # overwritten
    assert second.tolist() == [c.slots(s)[-1] for s in range(3)]
    by_ids = c.append([0, 1, 2], [4, 5, 6])                      # ids: a new array
    assert not np.shares_memory(by_ids, second)
    assert [c._tok[c.slots(s)[-3:]].tolist() for s in range(3)] == [
        [7, 1, 4], [8, 2, 5], [9, 3, 6]]
    c.check_invariants()


def test_append_takes_any_integer_tokens_unchanged():
    c = small(num_blocks=20)
    c.add("a", [1])
    c.add("b", [2])
    h = c.rows(["a", "b"])
    frozen = np.array([5, 6], np.int64)
    frozen.flags.writeable = False
    strided = np.array([7, 0, 8, 0])[::2]
    for tokens in (frozen, strided, np.array([9, 10], np.int32), [11, 12], (13, 14)):
        before = np.array(tokens, copy=True)
        c.append(h, tokens)
        assert np.array_equal(np.asarray(tokens), before)
    assert c._tok[c.slots("a")].tolist() == [1, 5, 7, 9, 11, 13]
    assert c._tok[c.slots("b")].tolist() == [2, 6, 8, 10, 12, 14]
    with pytest.raises(ValueError, match="3 values for 2 sequences"):
        c.append(h, [1, 2, 3])
    with pytest.raises(TypeError, match="integers"):
        c.append(h, np.array([1.0, 2.0]))
    c.check_invariants()


def test_store_copies_runs_and_repeats_in_order():
    c = small(num_blocks=20, block_tokens=4)
    c.add("a", [1] * 10)
    c.add("b", [1] * 3)
    rng = np.random.default_rng(5)
    sa, sb = c.slots("a"), c.slots("b")
    slots = np.concatenate([sa[1:9], sb, sa[[0, 9, 9]]])      # runs across blocks, a repeat
    k = rng.standard_normal((len(slots), 2, 4)).astype(np.float32)
    v = rng.standard_normal((len(slots), 2, 4)).astype(np.float32)
    c.store(1, slots, k, v)
    ka, va, _ = c.gather(1, ["a"])
    kb, vb, _ = c.gather(1, ["b"])
    assert np.array_equal(ka[0], np.concatenate([k[[11]], k[:8], k[[13]]]))
    assert np.array_equal(va[0], np.concatenate([v[[11]], v[:8], v[[13]]]))
    assert np.array_equal(kb[0], k[8:11]) and np.array_equal(vb[0], v[8:11])
    assert not c.gather(0, ["a"])[0].any()                      # the other layer untouched


def test_table_and_rows_grow():
    c = small(num_blocks=700, block_tokens=1)
    for i in range(20):
        c.add(i, [i] * 30)
    c.extend(3, list(range(50)))
    assert c.length(3) == 80 and c.block_table([3])[0].shape == (1, 80)
    c.check_invariants()


# -- bad input: a clear error and nothing changed ---------------------------------------

def bad_calls():
    f = np.zeros((1, 2, 4))
    return [
        ("add existing", lambda c: c.add("a", [1]), KeyError),
        ("add unhashable", lambda c: c.add([1], [1]), TypeError),
        ("add empty", lambda c: c.add("z", []), ValueError),
        ("add negative", lambda c: c.add("z", [1, -1]), ValueError),
        ("add float tokens", lambda c: c.add("z", [1.5]), TypeError),
        ("add bool tokens", lambda c: c.add("z", [True]), TypeError),
        ("add 2-D tokens", lambda c: c.add("z", [[1]]), ValueError),
        ("add too long", lambda c: c.add("z", [1] * 1000), PoolExhaustedError),
        ("append unknown", lambda c: c.append(["a", "zz"], [1, 1]), KeyError),
        ("append duplicate", lambda c: c.append(["a", "b", "a"], [1, 1, 1]), ValueError),
        ("append count", lambda c: c.append(["a", "b"], [1]), ValueError),
        ("append negative", lambda c: c.append(["a", "b"], [1, -3]), ValueError),
        ("append str", lambda c: c.append("ab", [1, 1]), TypeError),
        ("extend unknown", lambda c: c.extend("zz", [1]), KeyError),
        ("extend negative", lambda c: c.extend("a", [1, -1]), ValueError),
        ("extend too many", lambda c: c.extend("a", [1] * 1000), PoolExhaustedError),
        ("store layer", lambda c: c.store(2, [0], f, f), IndexError),
        ("store bool layer", lambda c: c.store(True, [0], f, f), TypeError),
        ("store shape", lambda c: c.store(0, [0], f[:, :1], f), ValueError),
        ("store count", lambda c: c.store(0, [0, 1], f, f), ValueError),
        ("store int data", lambda c: c.store(0, [0], f.astype(int), f), TypeError),
        ("store list data", lambda c: c.store(0, [0], f.tolist(), f), TypeError),
        ("store free slot", lambda c: c.store(0, [c.num_blocks * 4 - 1], f, f), ValueError),
        ("store unreserved", lambda c: c.store(0, [int(c.slots("b")[-1]) + 1], f, f),
         ValueError),
        ("store negative slot", lambda c: c.store(0, [-1], f, f), ValueError),
        ("gather unknown", lambda c: c.gather(0, ["q"]), KeyError),
        ("gather duplicate", lambda c: c.gather(0, ["a", "a"]), ValueError),
        ("gather layer", lambda c: c.gather(-1, ["a"]), IndexError),
        ("table unknown", lambda c: c.block_table(["q"]), KeyError),
        ("table duplicate", lambda c: c.block_table(["b", "b"]), ValueError),
        ("attention heads", lambda c: c.attention(0, np.zeros((2, 3, 4)), ["a", "b"]),
         ValueError),
        ("attention no heads", lambda c: c.attention(0, np.zeros((2, 0, 4)), ["a", "b"]),
         ValueError),
        ("attention head_dim", lambda c: c.attention(0, np.zeros((2, 2, 3)), ["a", "b"]),
         ValueError),
        ("attention int q", lambda c: c.attention(0, np.zeros((2, 2, 4), int), ["a", "b"]),
         TypeError),
        ("attention q_lens sum", lambda c: c.attention(0, np.zeros((2, 2, 4)), ["a", "b"],
                                                       q_lens=[1, 2]), ValueError),
        ("attention q_lens long", lambda c: c.attention(0, np.zeros((2, 2, 4)), ["a", "b"],
                                                        q_lens=[2, 0]), ValueError),
        ("attention q_lens negative", lambda c: c.attention(
            0, np.zeros((1, 2, 4)), ["a", "b"], q_lens=[2, -1]), ValueError),
        ("attention layer", lambda c: c.attention(5, np.zeros((2, 2, 4)), ["a", "b"]),
         IndexError),
        ("attention duplicate", lambda c: c.attention(0, np.zeros((2, 2, 4)), ["a", "a"]),
         ValueError),
        ("attention scale", lambda c: c.attention(0, np.zeros((2, 2, 4)), ["a", "b"],
                                                  scale="x"), TypeError),
        ("remove unknown", lambda c: c.remove("zz"), KeyError),
        ("remove_many duplicate", lambda c: c.remove_many(["a", "a"]), ValueError),
        ("remove_many partly unknown", lambda c: c.remove_many(["a", "zz"]), KeyError),
        ("slots range", lambda c: c.slots("a", 0, 99), IndexError),
        ("rows duplicate", lambda c: c.rows(["a", "b", "a"]), ValueError),
        ("rows unknown", lambda c: c.rows(["a", "zz"]), KeyError),
        ("blocks_needed negative", lambda c: c.blocks_needed(["a"], -1), ValueError),
        ("foreign rows", lambda c: c.append(small().rows([]), []), ValueError),
    ]


@pytest.mark.parametrize("what,call,error", bad_calls(), ids=[b[0] for b in bad_calls()])
@pytest.mark.parametrize("preempt", ["none", "newest"])
def test_bad_input_changes_nothing(what, call, error, preempt):
    c = small(num_blocks=10, preempt=preempt)
    c.add("a", [1, 2, 3])
    c.add("b", [4, 5, 6, 7, 8])
    c.store(0, c.slots("b"), np.ones((5, 2, 4)), np.ones((5, 2, 4)))
    c.remove("a")
    c.add("a", [9])
    c.add("c", [9, 9, 9, 9])
    before = snapshot(c)
    with pytest.raises(error):
        call(c)
    assert snapshot(c) == before
    c.check_invariants()


@pytest.mark.parametrize("kw,error", [
    (dict(num_blocks=0), ValueError), (dict(block_tokens=0), ValueError),
    (dict(layers=-1), ValueError), (dict(head_dim=1.0), TypeError),
    (dict(dtype=np.float64), TypeError), (dict(dtype="bogus"), TypeError),
    (dict(dtype=np.int16), TypeError), (dict(preempt="oldest"), ValueError),
    (dict(on_evict=3), TypeError), (dict(buffer=np.zeros(10, np.uint8)), ValueError),
    (dict(buffer=np.zeros(10 ** 6, np.float32)), TypeError),
])
def test_bad_construction(kw, error):
    with pytest.raises(error):
        small(**kw)


def test_buffer_is_used_without_copy():
    buf = np.zeros(12 * 2 * 2 * 4 * 2 * 4 * 4 + 7, np.uint8)
    c = small(buffer=buf)
    c.add("s", [1])
    c.store(1, c.slots("s"), np.full((1, 2, 4), 2.0), np.full((1, 2, 4), 3.0))
    assert np.shares_memory(c.kv, buf) and buf.view(np.uint8).any()


# -- the audit catches each corruption ------------------------------------------------

def corruptible():
    c = small(num_blocks=10)
    c.add("a", [1, 2, 3, 4, 5])
    c.add("b", [1, 2])
    c.add("c", [1] * 9)
    c.remove("b")
    c.check_invariants()
    return c


def _swap_free_and_held(c):
    b = c._tables[c._row_of["a"], 0]
    c._state[b] = kvpool.FREE


CORRUPTIONS = {
    "table block twice": lambda c: c._tables.__setitem__(
        (c._row_of["c"], 0), c._tables[c._row_of["a"], 0]),
    "table too short": lambda c: c._tables.__setitem__((c._row_of["a"], 1), -1),
    "table padding": lambda c: c._tables.__setitem__((c._row_of["a"], 5), 9),
    "length changed": lambda c: c._lens.__setitem__(c._row_of["a"], 9),
    "held but in no table": lambda c: c._state.__setitem__(9, kvpool.HELD),
    "in a table but free": _swap_free_and_held,
    "fill": lambda c: c._fill.__setitem__(c._tables[c._row_of["a"], 1], 4),
    "free list count": lambda c: setattr(c._pool, "count", c._pool.count + 1),
    "bump": lambda c: setattr(c._pool, "bump", 9),
    "peak": lambda c: setattr(c._pool, "peak_used", 1),
    "free list entry": lambda c: c._pool.ring.__setitem__(c._pool.head, 7),
    "row map": lambda c: c._row_of.__setitem__("a", c._row_of["c"]),
    "row owner": lambda c: c._seq_of.__setitem__(c._row_of["a"], "zz"),
    "free rows": lambda c: c._free_rows.discard(min(c._free_rows)),
    "mark left": lambda c: c._rowinfo.__setitem__((0, kvpool.R_MARK), 1),
    "stamps": lambda c: c._rowinfo.__setitem__((c._row_of["a"], kvpool.R_ADDED),
                                               c._rowinfo[c._row_of["c"], kvpool.R_ADDED]),
    "unknown state": lambda c: c._state.__setitem__(0, 7),
    "reference count": lambda c: c._blk.__setitem__(
        (c._tables[c._row_of["a"], 0], kvpool.B_REF), 2),
    "cached tokens changed": lambda c: c._tok.__setitem__(c._tables[c._row_of["a"], 0] * 4, 9),
    "hash changed": lambda c: c._blk.__setitem__(
        (c._tables[c._row_of["c"], 1], kvpool.B_HASH), 5),
    "depth changed": lambda c: c._blk.__setitem__(
        (c._tables[c._row_of["c"], 1], kvpool.B_DEPTH), 0),
    "findable but unlisted": lambda c: c._blk.__setitem__(
        (c._tables[c._row_of["c"], 2], kvpool.B_DEPTH), 2),
    "free list link": lambda c: c._pool.link.__setitem__(c._pool.ctr[kvpool.C_TAIL], 5),
    "prefix counters": lambda c: c._px.__setitem__(kvpool.P_HITS, 10 ** 6),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_audit_notices(name):
    c = corruptible()
    CORRUPTIONS[name](c)
    with pytest.raises(AssertionError):
        c.check_invariants()


# -- misc ---------------------------------------------------------------------------

def test_blocks_needed_and_stats():
    c = small(num_blocks=20, block_tokens=4, prefix_caching=False)
    c.add("a", [1] * 4)
    c.add("b", [1] * 5)
    assert c.blocks_needed(["a", "b"]) == 1
    assert c.blocks_needed(["a", "b"], 4) == 2
    assert c.blocks_needed(c.rows(["b"]), 0) == 0
    s = c.stats
    assert (s.used_blocks, s.tokens, s.unused_slots, s.sequences) == (3, 9, 3, 2)
    assert s.fragmentation == pytest.approx(3 / 12)


README_EXAMPLE = '''
import numpy as np
from kvpool import PagedKVCache

layers, kv_heads, q_heads, head_dim, vocab = 2, 2, 4, 16, 50
rng = np.random.default_rng(0)
wq = rng.standard_normal((layers, head_dim, q_heads * head_dim)).astype(np.float32)
wk = rng.standard_normal((layers, head_dim, kv_heads * head_dim)).astype(np.float32)
wv = rng.standard_normal((layers, head_dim, kv_heads * head_dim)).astype(np.float32)
wo = rng.standard_normal((layers, q_heads * head_dim, head_dim)).astype(np.float32) / 8
embed = rng.standard_normal((vocab, head_dim)).astype(np.float32)

def forward(c, seqs, tokens, slots, q_lens=None):
    """A toy transformer: per layer, project, store K/V, attend."""
    x = embed[tokens]
    for l in range(layers):
        q = (x @ wq[l]).reshape(-1, q_heads, head_dim)
        c.store(l, slots, (x @ wk[l]).reshape(-1, kv_heads, head_dim),
                (x @ wv[l]).reshape(-1, kv_heads, head_dim))
        x = x + c.attention(l, q, seqs, q_lens=q_lens).reshape(len(x), -1) @ wo[l]
    return x @ embed.T                            # logits

c = PagedKVCache(256, 16, layers=layers, kv_heads=kv_heads, head_dim=head_dim)
prompts = {"a": [1, 2, 3], "b": [4, 5, 6, 7, 8]}
for seq, prompt in prompts.items():              # prefill, one sequence at a time
    c.add(seq, prompt)
    logits = forward(c, [seq], np.array(prompt), c.slots(seq), q_lens=[len(prompt)])
    prompts[seq] = int(logits[-1].argmax())      # its first new token

batch = c.rows(["a", "b"])                       # no id lookups from here on
tokens = np.array([prompts["a"], prompts["b"]])
for step in range(8):                            # decode: one compiled call each
    slots = c.append(batch, tokens)
    tokens = forward(c, batch, tokens, slots).argmax(axis=1)
table, lens = c.block_table(batch)               # views, updated in place
print(lens.tolist())                             # [11, 13]
c.remove_many(["a", "b"])
'''


def test_readme_decode_loop():
    printed = []
    env = {"print": printed.append}
    exec(compile(README_EXAMPLE, "README example", "exec"), env)
    c = env["c"]
    assert len(c) == 0 and c.free_blocks == c.num_blocks
    assert printed == [[11, 13]]
    c.check_invariants()
