"""The paged cache's bench rows (to merge into bench.py): each case_paged_*
returns rows (label, kvpool figure, peer figure, ratio = peer / kvpool time,
>1 means kvpool is faster). Peers do the same work, checked before timing;
figures are medians of repeats after a warm-up.

    python bench_paged_draft.py [--quick]
"""

import collections
import statistics
import sys
import time

import numpy as np

from kvpool import PagedKVCache, PoolExhaustedError


def median_time(fn, repeats, setup=None):
    """Median seconds of fn(state) over repeats, after one warm-up."""
    times = []
    for i in range(repeats + 1):
        state = setup() if setup else None
        t0 = time.perf_counter()
        fn(state)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- the vLLM-v1-style peer: block objects, a doubly linked free queue ----------

class Block:
    __slots__ = ("id", "prev", "next")

    def __init__(self, i):
        self.id, self.prev, self.next = i, None, None


class FreeQueue:
    """vLLM v1's free block queue: a doubly linked list with fake ends."""

    def __init__(self, blocks):
        self.head, self.tail = Block(-1), Block(-1)
        prev = self.head
        for b in blocks:
            prev.next, b.prev = b, prev
            prev = b
        prev.next, self.tail.prev = self.tail, prev
        self.n = len(blocks)

    def popleft(self):
        b = self.head.next
        self.head.next, b.next.prev = b.next, self.head
        b.prev = b.next = None
        self.n -= 1
        return b

    def append(self, b):
        last = self.tail.prev
        last.next, b.prev, b.next, self.tail.prev = b, last, self.tail, b
        self.n += 1


class Request:
    __slots__ = ("id", "row", "blocks", "num_tokens", "order")


class PeerCache:
    """Requests with lists of blocks, slots allocated request by request, a
    persistent numpy block table [max_requests, max_blocks] updated in place."""

    def __init__(self, num_blocks, bt, max_requests, max_blocks):
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free = FreeQueue(self.blocks)
        self.bt = bt
        self.table = np.full((max_requests, max_blocks), -1, np.int32)
        self.lens = np.zeros(max_requests, np.int32)
        self.reqs = {}
        self.rows = list(range(max_requests - 1, -1, -1))
        self.order = 0

    def add(self, rid, tokens):
        need = -(-len(tokens) // self.bt)
        if need > self.free.n:
            raise PoolExhaustedError(need, self.free.n)
        r = Request()
        r.id, r.row, r.num_tokens, r.order = rid, self.rows.pop(), len(tokens), self.order
        self.order += 1
        r.blocks = [self.free.popleft() for _ in range(need)]
        self.table[r.row, :need] = [b.id for b in r.blocks]
        self.lens[r.row] = r.num_tokens
        self.reqs[rid] = r

    def remove(self, rid):
        r = self.reqs.pop(rid)
        for b in reversed(r.blocks):
            self.free.append(b)
        self.table[r.row, :len(r.blocks)] = -1
        self.lens[r.row] = 0
        self.rows.append(r.row)

    def append(self, reqs, tokens, preempt=False):
        """One token per request; (slots, table, lens) or -1 for the preempted."""
        bt = self.bt
        need = sum(1 for r in reqs if r.num_tokens % bt == 0)
        gone = set()
        while need > self.free.n:
            if not preempt:
                raise PoolExhaustedError(need, self.free.n)
            victim = max(self.reqs.values(), key=lambda r: r.order)
            if victim.num_tokens % bt == 0 and any(r is victim for r in reqs):
                need -= 1
            gone.add(victim.id)
            self.remove(victim.id)
        slots = np.empty(len(reqs), np.int64)
        table, lens = self.table, self.lens
        for i, r in enumerate(reqs):
            if r.id in gone:
                slots[i] = -1
                continue
            n = r.num_tokens
            if n % bt == 0:
                b = self.free.popleft()
                r.blocks.append(b)
                table[r.row, n // bt] = b.id
            slots[i] = r.blocks[n // bt].id * bt + n % bt
            r.num_tokens = n + 1
            lens[r.row] = n + 1
        return slots


# -- 1: decode-step bookkeeping ----------------------------------------------------

def case_paged_bookkeeping(quick=False):
    B, bt, steps = 256, 16, (50 if quick else 200)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 1000, n) for n in rng.integers(100, 2001, B)]
    blocks = sum(-(-(len(p) + steps + 1) // bt) for p in prompts) + 8
    tokens = rng.integers(0, 1000, (steps, B))

    def make_kv():
        c = PagedKVCache(blocks, bt, layers=1, kv_heads=1, head_dim=1, dtype=np.float32)
        for i, p in enumerate(prompts):
            c.add(i, p)
        return c, c.rows(list(range(B)))

    def make_peer():
        p = PeerCache(blocks, bt, B, -(-(2000 + steps + 1) // bt))
        for i, t in enumerate(prompts):
            p.add(i, t)
        return p, [p.reqs[i] for i in range(B)]

    def run_kv(state):
        c, rows = state
        for s in range(steps):
            c.append(rows, tokens[s])
            c.block_table(rows)

    def run_peer(state):
        p, reqs = state
        for s in range(steps):
            p.append(reqs, tokens[s])
            p.table[:B], p.lens[:B]

    (c, rows), (p, reqs) = make_kv(), make_peer()     # the same work?
    for s in range(3):
        assert np.array_equal(c.append(rows, tokens[s]), p.append(reqs, tokens[s]))
        t, l = c.block_table(rows)
        assert np.array_equal(l, p.lens[:B])
        assert np.array_equal(t, p.table[:B, :t.shape[1]])
    repeats = 3 if quick else 7
    kv = median_time(run_kv, repeats, make_kv) / steps
    peer = median_time(run_peer, repeats, make_peer) / steps
    return [("paged 1: decode bookkeeping, 256 seqs, append+block_table (us/step)",
             kv * 1e6, peer * 1e6, peer / kv)]


# -- 2: the decode loop --------------------------------------------------------------

def case_paged_decode(quick=False):
    B, L, kvh, qh, hd, bt = 32, 2, 4, 8, 64, 16
    steps = 4 if quick else 16
    rng = np.random.default_rng(2)
    lens0 = rng.integers(256, 1025, B)
    group = qh // kvh
    data = {}   # (seq, layer) -> (k, v) float16 of its prompt
    for s in range(B):
        for l in range(L):
            data[s, l] = (rng.standard_normal((lens0[s], kvh, hd)).astype(np.float16),
                          rng.standard_normal((lens0[s], kvh, hd)).astype(np.float16))
    q = rng.standard_normal((steps, L, B, qh, hd)).astype(np.float32)
    knew = rng.standard_normal((steps, L, B, kvh, hd)).astype(np.float16)
    vnew = rng.standard_normal((steps, L, B, kvh, hd)).astype(np.float16)
    toks = rng.integers(0, 1000, (steps, B))
    nblocks = sum(-(-(n + steps) // bt) for n in lens0) + 4

    def make_kv():
        c = PagedKVCache(nblocks, bt, layers=L, kv_heads=kvh, head_dim=hd, dtype=np.float16)
        for s in range(B):
            c.add(s, np.zeros(lens0[s], np.int64))
            for l in range(L):
                c.store(l, c.slots(s), *data[s, l])
        return c, c.rows(list(range(B)))

    def run_kv(state, out=None):
        c, rows = state
        for t in range(steps):
            slots = c.append(rows, toks[t])
            for l in range(L):
                c.store(l, slots, knew[t, l], vnew[t, l])
                o = c.attention(l, q[t, l], rows)
                if out is not None:
                    out.append(o)

    def make_peer():
        cache = {}
        for s in range(B):
            for l in range(L):
                k = np.empty((lens0[s] + steps, kvh, hd), np.float16)
                v = np.empty_like(k)
                k[:lens0[s]], v[:lens0[s]] = data[s, l]
                cache[s, l] = (k, v)
        return cache, lens0.copy()

    def run_peer(state, out=None):
        cache, lens = state
        scale = np.float32(1 / np.sqrt(hd))
        for t in range(steps):
            for l in range(L):
                o = np.empty((B, qh, hd), np.float32)
                for s in range(B):
                    k, v = cache[s, l]
                    n = lens[s]
                    k[n], v[n] = knew[t, l, s], vnew[t, l, s]
                    kf = k[:n + 1].astype(np.float32)          # [n, kvh, hd]
                    vf = v[:n + 1].astype(np.float32)
                    qs = q[t, l, s].reshape(kvh, group, hd)
                    sc = np.einsum("ghd,ngd->ghn", qs, kf) * scale
                    w = np.exp(sc - sc.max(axis=2, keepdims=True))
                    w /= w.sum(axis=2, keepdims=True)
                    o[s] = np.einsum("ghn,ngd->ghd", w, vf).reshape(qh, hd)
                if out is not None:
                    out.append(o)
            lens += 1

    a, b = [], []
    run_kv(make_kv(), a)
    run_peer(make_peer(), b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    repeats = 3 if quick else 5
    kv = median_time(run_kv, repeats, make_kv) / steps
    peer = median_time(run_peer, repeats, make_peer) / steps
    read = 2 * L * 2 * kvh * hd * int((lens0 + steps // 2).sum())    # K+V bytes/step
    src = np.ones(64 << 20, np.uint8)
    dst = np.empty_like(src)
    copy = median_time(lambda _: np.copyto(dst, src), 5) / src.nbytes
    return [("paged 2: decode loop, 32 seqs, fp16 (ms/step)", kv * 1e3, peer * 1e3, peer / kv),
            ("paged 2: K/V read GB/s vs np.copyto GB/s", read / kv / 1e9, 1 / copy / 1e9,
             (read / kv) * copy)]


# -- 3: store bandwidth ----------------------------------------------------------------

def case_paged_store(quick=False):
    T, kvh, hd, bt = 4096, 8, 128, 16
    c = PagedKVCache(T // bt + 1, bt, layers=1, kv_heads=kvh, head_dim=hd, dtype=np.float16)
    c.add("s", np.zeros(T, np.int64))
    slots = c.slots("s")
    rng = np.random.default_rng(3)
    k = rng.standard_normal((T, kvh, hd)).astype(np.float16)
    v = rng.standard_normal((T, kvh, hd)).astype(np.float16)
    c.store(0, slots, k, v)
    g = c.gather(0, ["s"])
    assert np.array_equal(g[0][0], k) and np.array_equal(g[1][0], v)
    dst_k, dst_v = np.empty_like(k), np.empty_like(v)
    repeats = 5 if quick else 21
    kv = median_time(lambda _: c.store(0, slots, k, v), repeats)
    cp = median_time(lambda _: (np.copyto(dst_k, k), np.copyto(dst_v, v)), repeats)
    gb = 2 * k.nbytes / 1e9
    return [("paged 3: store 4,096 tokens (GB/s) vs np.copyto", gb / kv, gb / cp, cp / kv)]


# -- 4: the serving trace on the paged cache ----------------------------------------------

def serve_paged(c, trace, peer):
    """One sequence per request; each step one append for all running
    requests (preempting the newest: they go back to waiting)."""
    prompt, decode = trace["prompt"], trace["decode"]
    waiting = collections.deque()
    running = {}                     # rid -> tokens still to decode
    completed = preempted = 0
    for arrivals in trace["arrivals"]:
        waiting.extend(arrivals)
        if running:
            ids = list(running)
            if peer:
                slots = c.append([c.reqs[i] for i in ids], np.zeros(len(ids), np.int64),
                                 preempt=True)
            else:
                slots = c.append(ids, np.zeros(len(ids), np.int64))
            done = []
            for rid, s in zip(ids, slots.tolist()):
                if s < 0:
                    del running[rid]
                    waiting.append(rid)
                    preempted += 1
                    continue
                running[rid] -= 1
                if running[rid] == 0:
                    done.append(rid)
            for rid in done:
                del running[rid]
                completed += 1
            if done:
                if peer:
                    for rid in done:
                        c.remove(rid)
                else:
                    c.remove_many(done)
        while waiting and len(running) < trace["max_running"]:
            rid = waiting[0]
            try:
                c.add(rid, np.zeros(prompt[rid], np.int64))
            except PoolExhaustedError:
                break
            waiting.popleft()
            running[rid] = decode[rid]
    return completed, preempted


def case_paged_serving(quick=False):
    steps = 500 if quick else 3000
    rng = np.random.default_rng(2024)
    counts = rng.poisson(1.0, steps)
    n = int(counts.sum())
    starts = np.concatenate([[0], np.cumsum(counts)])
    trace = {"prompt": np.clip(rng.lognormal(np.log(128), 1.0, n), 4, 2048).astype(int).tolist(),
             "decode": np.clip(rng.lognormal(np.log(48), 0.8, n), 1, 512).astype(int).tolist(),
             "arrivals": [list(range(starts[i], starts[i + 1])) for i in range(steps)],
             "max_running": 96}
    bt = 16
    big = PeerCache(1 << 16, bt, 256, 2048)
    serve_paged(big, trace, True)
    blocks = max(1, int(0.8 * (len(big.blocks) - big.free.n + 0)))   # a small pool
    blocks = max(blocks, 256)

    def make_kv():
        return PagedKVCache(blocks, bt, layers=1, kv_heads=1, head_dim=1,
                            dtype=np.float32, preempt="newest")

    def make_peer():
        return PeerCache(blocks, bt, 256, -(-(2048 + 512) // bt))

    out = {}
    kv = median_time(lambda c: out.__setitem__("kv", serve_paged(c, trace, False)),
                     3 if quick else 5, make_kv)
    peer = median_time(lambda c: out.__setitem__("peer", serve_paged(c, trace, True)),
                       3 if quick else 5, make_peer)
    assert out["kv"] == out["peer"], out
    return [(f"paged 4: serving trace, {steps} steps, preempt newest (req/s)",
             out["kv"][0] / kv, out["peer"][0] / peer, peer / kv)]


# -- 5: shared-prefix trace ----------------------------------------------------------

class PBlock:
    __slots__ = ("id", "prev", "next", "ref_cnt", "block_hash")

    def __init__(self, i):
        self.id, self.prev, self.next, self.ref_cnt, self.block_hash = i, None, None, 0, None


class PrefixPeer:
    """vLLM v1's prefix-caching block pool in pure Python: block objects in a
    doubly linked free queue (remove from the middle on a hit), a map of
    hash -> {block id: block} (oldest first), a chained Python hash of the
    parent hash and each full block's tokens, reference counts, newest-first
    preemption."""

    def __init__(self, num_blocks, bt):
        self.blocks = [PBlock(i) for i in range(num_blocks)]
        self.head, self.tail = PBlock(-1), PBlock(-1)
        prev = self.head
        for b in self.blocks:
            prev.next, b.prev = b, prev
            prev = b
        prev.next, self.tail.prev = self.tail, prev
        self.nfree = num_blocks
        self.cached = {}
        self.bt = bt
        self.reqs = {}                 # rid -> [blocks, tokens, order]
        self.order = 0

    def _remove(self, b):
        b.prev.next, b.next.prev = b.next, b.prev
        b.prev = b.next = None
        self.nfree -= 1

    def _push(self, b):
        last = self.tail.prev
        last.next, b.prev, b.next, self.tail.prev = b, last, self.tail, b
        self.nfree += 1

    def _new_block(self):
        b = self.head.next
        self._remove(b)
        if b.block_hash is not None:
            group = self.cached[b.block_hash]
            del group[b.id]
            if not group:
                del self.cached[b.block_hash]
            b.block_hash = None
        b.ref_cnt = 1
        return b

    def _cache(self, blocks, tokens, j):
        parent = blocks[j - 1].block_hash if j else None
        h = hash((parent, tuple(tokens[j * self.bt:(j + 1) * self.bt])))
        blocks[j].block_hash = h
        self.cached.setdefault(h, {})[blocks[j].id] = blocks[j]

    def add(self, rid, tokens):
        bt = self.bt
        hits, parent = [], None
        for j in range((len(tokens) - 1) // bt):
            h = hash((parent, tuple(tokens[j * bt:(j + 1) * bt])))
            group = self.cached.get(h)
            if not group:
                break
            hits.append(next(iter(group.values())))
            parent = h
        need = -(-len(tokens) // bt) - len(hits)
        if need > self.nfree - sum(1 for b in hits if b.ref_cnt == 0):
            raise PoolExhaustedError(need, self.nfree)
        for b in hits:
            if b.ref_cnt == 0:
                self._remove(b)
            b.ref_cnt += 1
        blocks = hits + [self._new_block() for _ in range(need)]
        tokens = list(tokens)
        for j in range(len(hits), len(tokens) // bt):
            self._cache(blocks, tokens, j)
        self.reqs[rid] = [blocks, tokens, self.order]
        self.order += 1
        return len(hits) * bt

    def remove(self, rid):
        blocks = self.reqs.pop(rid)[0]
        for b in reversed(blocks):
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self._push(b)

    def append(self, rids, tokens):
        """One token each; the preempted (newest first) get -1."""
        bt = self.bt
        need = sum(1 for r in rids if len(self.reqs[r][1]) % bt == 0)
        gone = set()
        while need > self.nfree:
            victim = max(self.reqs, key=lambda r: self.reqs[r][2])
            if len(self.reqs[victim][1]) % bt == 0 and victim in rids:
                need -= 1
            gone.add(victim)
            self.remove(victim)
        out = []
        for r, t in zip(rids, tokens):
            if r in gone:
                out.append(-1)
                continue
            blocks, toks, _ = self.reqs[r]
            if len(toks) % bt == 0:
                blocks.append(self._new_block())
            toks.append(t)
            out.append(blocks[-1].id)
            if len(toks) % bt == 0:
                self._cache(blocks, toks, len(toks) // bt - 1)
        return out


def prefix_trace(quick):
    rng = np.random.default_rng(13)
    n = 400 if quick else 2000
    systems = [rng.integers(0, 32000, int(k)).tolist() for k in rng.integers(256, 1025, 8)]
    prompts = [systems[rng.integers(8)] + rng.integers(0, 32000, int(rng.integers(8, 65))).tolist()
               for _ in range(n)]
    decode = rng.integers(16, 129, n).tolist()
    return prompts, decode


def serve_prefix(c, prompts, decode, max_running, peer):
    """Admit in order while it fits, one decode step for all running, the
    newest preempted (and restarted) when short; (completed, preempted,
    covered tokens per admission)."""
    waiting = collections.deque(range(len(prompts)))
    running = {}
    covered = []
    completed = preempted = step = 0
    while waiting or running:
        while waiting and len(running) < max_running:
            rid = waiting[0]
            try:
                covered.append(c.add(rid, prompts[rid]))
            except PoolExhaustedError:
                break
            waiting.popleft()
            running[rid] = decode[rid]
        ids = list(running)
        step += 1
        toks = [(step * 31 + r) % 32000 for r in ids]
        slots = c.append(ids, toks) if peer else c.append(ids, toks).tolist()
        done = []
        for rid, s in zip(ids, slots):
            if s < 0:
                del running[rid]
                waiting.appendleft(rid)
                preempted += 1
            else:
                running[rid] -= 1
                if running[rid] == 0:
                    done.append(rid)
        for rid in done:
            del running[rid]
            completed += 1
        if done:
            if peer:
                for rid in done:
                    c.remove(rid)
            else:
                c.remove_many(done)
    return completed, preempted, covered


def serve_prefix_kv(c, prompts, decode, max_running):
    """serve_prefix for a PagedKVCache, its per-step work in numpy: the same
    admissions, steps, tokens and preemptions."""
    waiting = collections.deque(range(len(prompts)))
    ids, left = [], np.zeros(0, np.int64)
    covered = []
    completed = preempted = step = 0
    while waiting or ids:
        added = []
        while waiting and len(ids) + len(added) < max_running:
            rid = waiting[0]
            try:
                covered.append(c.add(rid, prompts[rid]))
            except PoolExhaustedError:
                break
            waiting.popleft()
            added.append(rid)
        if added:
            ids = ids + added
            left = np.concatenate([left, np.array([decode[r] for r in added], np.int64)])
            arr = np.array(ids, np.int64)
        step += 1
        slots = c.append(ids, (step * 31 + arr) % 32000)
        left -= 1
        gone = slots < 0
        done = (left == 0) & ~gone
        if gone.any() or done.any():
            if gone.any():
                for i in np.flatnonzero(gone)[::-1].tolist():
                    waiting.appendleft(ids[i])
                preempted += int(gone.sum())
            fin = np.flatnonzero(done).tolist()
            if fin:
                c.remove_many([ids[i] for i in fin])
                completed += len(fin)
            keep = np.flatnonzero(~(gone | done))
            ids = [ids[i] for i in keep.tolist()]
            left, arr = left[keep], arr[keep]
    return completed, preempted, covered


def case_paged_prefix(quick=False):
    prompts, decode = prefix_trace(quick)
    bt, running = 16, 64
    peak = sum(sorted(-(-(len(p) + d) // bt) for p, d in zip(prompts, decode))[-running:])
    blocks = peak // 2                          # half the peak demand, unshared

    def make_kv():
        return PagedKVCache(blocks, bt, layers=1, kv_heads=1, head_dim=1,
                            dtype=np.float32, preempt="newest")

    arrays = [np.array(p, np.int64) for p in prompts]     # each side's natural form
    out = {}
    kv = median_time(lambda c: out.__setitem__("kv", serve_prefix_kv(
        c, arrays, decode, running)), 1 if quick else 3, make_kv)
    peer = median_time(lambda c: out.__setitem__("peer", serve_prefix(
        c, prompts, decode, running, True)), 1 if quick else 3,
        lambda: PrefixPeer(blocks, bt))
    assert out["kv"] == out["peer"], "the peer found other hits"
    done, _, covered = out["kv"]
    rate = sum(covered) / sum(len(p) for p in prompts[:len(covered)])
    return [(f"paged 5: shared-prefix trace, {len(prompts)} requests, hit rate "
             f"{rate:.2f} (req/s)", done / kv, done / peer, peer / kv)]


# -- 6: fork ---------------------------------------------------------------------------

def case_paged_fork(quick=False):
    bt, forks, prefix, steps = 16, 8, 1000, 64
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 32000, prefix)
    shape = dict(layers=2, kv_heads=4, head_dim=64, dtype=np.float16)
    per_seq = -(-(prefix + steps) // bt)

    def make():
        c = PagedKVCache(2 * forks * per_seq, bt, **shape)
        c.add("p", tokens)
        kv = rng.standard_normal((prefix, 4, 64))
        for layer in range(2):
            c.store(layer, c.slots("p"), kv, kv)
        c.fork("p", "warm")                      # entry point resolved
        c.remove("warm")
        return c

    def run(c):
        for i in range(forks):
            c.fork("p", i)

    def peer_fork(state):                       # vLLM-style: block objects
        blocks, reqs = state
        for i in range(forks):
            for b in blocks:
                b.ref_cnt += 1
            reqs[i] = list(blocks)

    kv = median_time(run, 20, make) / forks
    peer = median_time(peer_fork, 20, lambda: (
        [PBlock(i) for i in range(-(-prefix // bt))], {})) / forks
    c = make()
    run(c)
    h = c.rows(list(range(forks)))
    for s in range(steps):
        c.append(h, np.full(forks, s))
    used = c.stats.used_blocks
    unshared = (forks + 1) * -(-prefix // bt) + forks * (per_seq - -(-prefix // bt))
    return [(f"paged 6: fork x{forks} of {prefix} tokens + {steps} decoded (us/fork)",
             kv * 1e6, peer * 1e6, peer / kv),
            (f"paged 6: blocks used, shared vs unshared copies ({c.stats.cow_copies} copies)",
             used, unshared, unshared / used)]


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    cases = (case_paged_bookkeeping, case_paged_decode, case_paged_store,
             case_paged_serving, case_paged_prefix, case_paged_fork)
    only = [a for a in sys.argv[1:] if not a.startswith("--")]
    for case in cases:
        if only and not any(o in case.__name__ for o in only):
            continue
        for label, a, b, ratio in case(quick):
            print(f"{label:<70} kvpool {a:10.3f}  peer {b:10.3f}  ratio {ratio:6.2f}")
