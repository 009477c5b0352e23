"""Tests of PagedKVCache.store's sharing rule: a block held by more than one
sequence (after fork, or a prefix hit on a live sequence's blocks) refuses
writes; copy-on-write and a block findable but held once do not."""

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import precondition, rule

import kvpool
from kvpool import PagedKVCache

try:                                   # the state machine, wherever it lives
    from test_kvpool import PagedMachine
except ImportError:
    from test_paged_draft import PagedMachine


# -- helpers -------------------------------------------------------------------

def small(**kw):
    args = dict(num_blocks=12, block_tokens=4, layers=2, kv_heads=2, head_dim=4,
                dtype=np.float32)
    args.update(kw)
    return PagedKVCache(args.pop("num_blocks"), args.pop("block_tokens"), **args)


def snapshot(c):
    """Everything observable that defines the cache's future."""
    p = c._pool
    seqs = {s: (c.length(s), c.slots(s).tolist(), c._tok[c.slots(s)].tolist()) for s in c}
    return (seqs, p.ctr.tolist(), p.ring.tolist(), p.link.tolist(), c.stats, c._stamp,
            c.kv.tobytes(), c._state.tobytes(), c._fill.tobytes(), c._px.tobytes())


def kv(n, value, c):
    return np.full((n, c.kv_heads, c.head_dim), value, np.float64)


def refused(c, layer, slots, k, v, index):
    """``store`` raises ValueError naming ``slots[index]``, changing nothing."""
    before = snapshot(c)
    with pytest.raises(ValueError, match=re.escape(f"slot {slots[index]} (index {index})")
                       + ".*shared by"):
        c.store(layer, slots, k, v)
    assert snapshot(c) == before
    c.check_invariants()


def ref(c, slot):
    return int(c._blk[slot // c.block_tokens, kvpool.B_REF])


# -- fork and copy-on-write ----------------------------------------------------

def test_store_into_a_forked_sequence_is_refused_until_copied():
    c = small(num_blocks=20)
    c.add("p", list(range(10)))                   # blocks of 4, 4, 2 tokens
    c.store(0, c.slots("p"), kv(10, 1.0, c), kv(10, 2.0, c))
    c.fork("p", "c")
    for seq in ("p", "c"):                        # every block is shared
        slots = c.slots(seq)
        refused(c, 0, slots, kv(10, 5.0, c), kv(10, 6.0, c), 0)
        refused(c, 1, slots[9:], kv(1, 5.0, c), kv(1, 6.0, c), 0)
    # a good slot first does not make the batch pass: nothing is written
    c.add("x", [50, 51])
    mixed = np.concatenate([c.slots("x"), c.slots("c")[4:6]])
    refused(c, 0, mixed, kv(4, 5.0, c), kv(4, 6.0, c), 2)
    assert not np.any(c.kv[c.slots("x") // 4, 0, :, c.slots("x") % 4])
    # the child appends: its shared partial block is copied, then writable
    new = int(c.append(["c"], [99])[0])
    assert c.stats.cow_copies == 1 and ref(c, new) == 1
    c.store(0, [new], kv(1, 7.0, c), kv(1, 8.0, c))
    assert np.all(c.kv[new // 4, 0, 0, new % 4] == 7.0)
    assert np.all(c.kv[new // 4, 0, 1, new % 4] == 8.0)
    # the copy's earlier slots are the child's own now; so is the parent's
    # old last block (held once again); the full blocks stay shared
    c.store(1, c.slots("c", 8, 10), kv(2, 3.0, c), kv(2, 4.0, c))
    c.store(1, c.slots("p", 8, 10), kv(2, -3.0, c), kv(2, -4.0, c))
    assert np.all(c.gather(1, ["c"])[0][0, 8:10] == 3.0)
    assert np.all(c.gather(1, ["p"])[0][0, 8:10] == -3.0)
    refused(c, 1, c.slots("c", 0, 8), kv(8, 0.0, c), kv(8, 0.0, c), 0)
    c.check_invariants()


def test_removing_the_other_holder_makes_a_block_writable():
    c = small()
    c.add("p", [1, 2, 3, 4, 5])
    c.fork("p", "c")
    slots = c.slots("c")
    refused(c, 0, slots, kv(5, 1.0, c), kv(5, 1.0, c), 0)
    c.remove("p")
    c.store(0, slots, kv(5, 1.0, c), kv(5, 2.0, c))
    assert np.all(c.gather(0, ["c"])[1] == 2.0)
    c.check_invariants()


def test_the_refusal_message_names_the_block_and_its_holders():
    c = small(block_tokens=2)
    c.add("p", [1, 2, 3])                          # blocks 0 (slots 0, 1) and 1
    c.fork("p", "a")
    c.fork("p", "b")
    c.add("x", [9])                                # block 2: slot 4, its own
    assert c.slots("x").tolist() == [4] and c.slots("a").tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"^slot 2 \(index 1\) is in block 1, shared by 3 "
                                         r"sequences; writing it would change their K/V$"):
        c.store(0, [4, 2], kv(2, 1.0, c), kv(2, 1.0, c))
    with pytest.raises(ValueError, match=r"^slot 7 \(index 1\) is not a reserved slot"):
        c.store(0, [4, 7, 2], kv(3, 1.0, c), kv(3, 1.0, c))    # the first bad one
    assert not np.any(c.kv[2])


def test_fork_refuses_bad_ids_changing_nothing():
    c = small()
    c.add("p", [1, 2, 3])
    c.add("q", [4])
    for parent, child, error, text in (
            ("nope", "c", KeyError, "no sequence 'nope'"),
            ([1], "c", TypeError, r"sequence id \[1\] is not hashable"),
            ("p", [2], TypeError, r"sequence id \[2\] is not hashable"),
            ("p", "q", KeyError, "sequence 'q' is already in the cache"),
            ("nope", [2], KeyError, "no sequence 'nope'")):   # the parent first
        before = snapshot(c)
        with pytest.raises(error, match=text):
            c.fork(parent, child)
        assert snapshot(c) == before and sorted(c._free_rows) == list(range(2, 8))


def test_forks_take_the_lowest_free_row_and_grow_the_rows():
    c = small(num_blocks=40)
    c.add("p", [1, 2, 3, 4, 5])
    for i in range(20):                            # 8 rows, then 16, then 32
        c.fork("p", i)
        assert c._row_of[i] == i + 1
    c.remove_many([3, 7])
    c.fork("p", "x")
    c.fork(5, "y")
    assert (c._row_of["x"], c._row_of["y"]) == (4, 8)
    assert c.length("y") == 5 and c.stats.shared_blocks == 2
    c.check_invariants()


# -- the prefix cache ------------------------------------------------------------

def test_a_prefix_hits_covered_slots_are_refused_the_rest_written():
    c = small(num_blocks=20)
    prompt = list(range(100, 110))
    c.add("a", prompt)
    c.store(0, c.slots("a"), kv(10, 1.0, c), kv(10, 2.0, c))
    covered = c.add("b", prompt + [7, 8])
    assert covered == 8                            # two full blocks, shared
    slots = c.slots("b")
    assert [ref(c, s) for s in slots[:covered]] == [2] * covered
    for i in range(covered):
        refused(c, 0, slots[i:], kv(12 - i, 5.0, c), kv(12 - i, 6.0, c), 0)
    refused(c, 0, slots[[9, 3]], kv(2, 5.0, c), kv(2, 6.0, c), 1)
    c.store(0, slots[covered:], kv(4, 3.0, c), kv(4, 4.0, c))    # the computed rest
    k, v, _ = c.gather(0, ["b"])
    assert np.all(k[0, :covered] == 1.0) and np.all(k[0, covered:] == 3.0)
    assert np.all(v[0, :covered] == 2.0) and np.all(v[0, covered:] == 4.0)
    k, _, _ = c.gather(0, ["a"])
    assert np.all(k[0] == 1.0)                     # the source is untouched
    c.check_invariants()


def test_a_hit_on_a_freed_block_is_held_once_and_writable():
    """A cached free block taken back by a hit is its new owner's alone."""
    c = small(num_blocks=20)
    c.add("a", list(range(9)))
    c.store(0, c.slots("a"), kv(9, 1.0, c), kv(9, 1.0, c))
    c.remove("a")
    assert c.add("b", list(range(9))) == 8
    slots = c.slots("b")
    assert [ref(c, s) for s in slots[:8]] == [1] * 8
    c.store(0, slots, kv(9, 1.0, c), kv(9, 1.0, c))
    c.check_invariants()


def test_a_block_that_fills_in_decode_stays_writable_for_its_owner():
    c = small(num_blocks=20)
    c.add("a", [1, 2, 3])
    c.store(0, c.slots("a"), kv(3, 1.0, c), kv(3, 1.0, c))
    s = c.append(["a"], [4])                       # fills block 0: findable
    b = int(s[0]) // 4
    assert c._blk[b, kvpool.B_DEPTH] == 0 and ref(c, int(s[0])) == 1
    c.store(0, s, kv(1, 9.0, c), kv(1, 9.0, c))
    c.store(1, c.slots("a"), kv(4, 9.0, c), kv(4, 9.0, c))
    assert c.add("b", [1, 2, 3, 4, 5]) == 4        # and shared from now on
    refused(c, 0, s, kv(1, 0.0, c), kv(1, 0.0, c), 0)
    c.check_invariants()


def test_an_add_between_append_and_store_shares_the_block_first():
    """The documented order: store a step's K/V before the next add, or
    the add may share the block that step filled and the store is refused."""
    c = small(num_blocks=20)
    c.add("a", [1, 2, 3])
    s = c.append(["a"], [4])
    assert c.add("b", [1, 2, 3, 4, 5]) == 4
    refused(c, 0, s, kv(1, 1.0, c), kv(1, 1.0, c), 0)


def test_extend_fills_blocks_that_stay_writable():
    c = small(num_blocks=20)
    c.add("a", [1])
    slots = c.extend("a", list(range(2, 12)))      # chunked prefill
    assert (c._blk[:, kvpool.B_DEPTH] >= 0).sum() == 2
    c.store(0, np.concatenate([c.slots("a", 0, 1), slots]), kv(11, 1.0, c), kv(11, 1.0, c))
    c.check_invariants()


# -- the state machine, with the sharing rule ---------------------------------

class SharingMachine(PagedMachine):
    """The paged state machine whose ``store`` predicts the refusal: any
    slot in a block the model holds more than once."""

    @precondition(lambda self: self.m.seqs)
    @rule(data=st.data(), layer=st.integers(0, 1))
    def store(self, data, layer):
        """Any positions of one sequence, in any order, repeats allowed."""
        m = self.m
        seq = data.draw(st.sampled_from(sorted(m.seqs, key=str)))
        pos = data.draw(st.lists(st.integers(0, len(m.seqs[seq][0]) - 1), max_size=6))
        table = m.seqs[seq][1]
        slots = [table[p // m.bt] * m.bt + p % m.bt for p in pos]
        k, v = self.rng.standard_normal((2, len(slots), 2, 2))   # float64: converted
        shared = [i for i, s in enumerate(slots) if m.ref[s // m.bt] > 1]
        if shared:
            i = shared[0]
            with pytest.raises(ValueError, match=re.escape(f"slot {slots[i]} (index {i})")):
                self.c.store(layer, slots, k, v)
            return
        self.c.store(layer, slots, k, v)
        for s, ks, vs in zip(slots, k, v):                      # in order: the last wins
            m.kv[s // m.bt, layer, :, s % m.bt] = ks, vs


SharingMachine.TestCase.settings = settings(
    max_examples=int(__import__("os").environ.get("PAGED_EXAMPLES", 40)),
    stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestSharing = SharingMachine.TestCase
