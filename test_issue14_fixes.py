"""Tests for the edge cases of issue 14: each failed before its fix. Every
test that mutates calls ``check_invariants()`` after each step."""

import copy
import json
import os
import pathlib
import pickle
import tracemalloc

import numpy as np
import pytest

import kvpool
from kvpool import CacheKey, KVCacheManager


def snapshot(m):
    """Everything a refused call must leave as it was."""
    return (m.stats, m.pool.arena.copy(), m.pool.ring.copy(),
            m.pool.state.copy(), m.pool.link.copy(), list(m),
            [(e.key, e.block, e.n_blocks, e.size, e.pinned)
             for e in m.cache.values()])


def assert_same(before, m):
    after = snapshot(m)
    assert before[0] == after[0]
    for a, b in zip(before[1:5], after[1:5]):
        assert np.array_equal(a, b)
    assert before[5:] == after[5:]
    m.check_invariants()


def tamper(path, **changes):
    """Rewrite a saved snapshot with ``changes`` to its meta or arrays."""
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


# -- 1. a NaN key -------------------------------------------------------------

def test_bug1_nan_key():
    nan = float("nan")
    nan_tuple = ("t", float("nan"))
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entry(nan, 20)
    m.check_invariants()
    m.allocate_entry(nan_tuple, 5)
    m.check_invariants()
    m.write(nan, b"abc")
    assert m[nan].size == 20 and nan in m and m.peek(nan_tuple).size == 5
    m.check_invariants()

    twin = copy.deepcopy(m)             # floats are copied as themselves
    twin.check_invariants()
    assert twin == m and twin[nan].size == 20
    assert bytes(twin.read(nan, count=3)) == b"abc"

    back = pickle.loads(pickle.dumps(m))    # a new NaN object: as for a dict,
    back.check_invariants()                 # the copy works but its key is
    k2, k1 = list(back)                     # not the original NaN
    assert k1 != k1 and k2[0] == "t" and k2[1] != k2[1]
    assert back[k1].size == 20 and back.peek(k2).size == 5
    assert bytes(back.read(k1, count=3)) == b"abc"
    assert back != m and nan not in back    # so the managers differ
    back.check_invariants()
    assert {nan: 1} != pickle.loads(pickle.dumps({nan: 1}))   # the same rule

    assert m.remove_cache_entry(nan).size == 20
    m.check_invariants()
    assert m.remove_cache_entries([nan_tuple])[0].size == 5
    m.check_invariants()
    assert len(m) == 0 and m.pool.used_blocks == 0


# -- 2. a tampered file with uint64 columns >= 2**63 ------------------------------

@pytest.mark.parametrize("column", ["heads", "sizes", "n_blocks"])
def test_bug2_load_huge_uint64_columns(tmp_path, column):
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entries(["a", "b"], [20, 5])
    m.check_invariants()
    path = tmp_path / "snap.npz"
    m.save(path)
    tamper(path, **{column: np.array([2 ** 63, 2 ** 64 - 1], np.uint64)})
    with pytest.raises(ValueError, match=rf"inconsistent snapshot: .*{column}"
                       rf".*{2 ** 63}"):
        KVCacheManager.load(path)


@pytest.mark.parametrize("name", ["head", "count", "bump", "peak_used"])
@pytest.mark.parametrize("value", [2 ** 63, 2 ** 64 + 5, -(2 ** 63) - 1, -1, 99])
def test_bug2_load_out_of_range_counters(tmp_path, name, value):
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entry("a", 20)
    m.check_invariants()
    path = tmp_path / "snap.npz"
    m.save(path)
    tamper(path, **{name: value})
    with pytest.raises(ValueError, match=rf"inconsistent snapshot: .*{name}"):
        KVCacheManager.load(path)


# -- 3. read with a subarray dtype ------------------------------------------------

@pytest.mark.parametrize("dtype", [("f4", (2,)), np.dtype(("u1", (4,))),
                                   ("f8", (2, 2))])
def test_bug3_read_subarray_dtype(dtype):
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entries(["a", "b"], [32, 16])
    m.check_invariants()
    before = snapshot(m)
    with pytest.raises(TypeError, match=r"subarray dtype .*reshape"):
        m.read("a", dtype)
    assert_same(before, m)           # in particular, "a" is still LRU
    assert list(m) == ["a", "b"]
    got = m.read("a", [("x", "f4", (2,))])   # a field may be a subarray
    assert got.shape == (4,) and got["x"].shape == (4, 2)
    m.check_invariants()


def test_bug3_read_checks_every_argument_before_recency():
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entries(["a", "b"], [16, 16])
    m.check_invariants()
    before = snapshot(m)
    for call in (lambda: m.read("a", None), lambda: m.read("a", "bogus"),
                 lambda: m.read("a", np.uint8, "x"),
                 lambda: m.read("a", np.uint8, 0, 1.5),
                 lambda: m.read("a", np.uint8, 17),
                 lambda: m.read("a", np.float64, 0, 3),
                 lambda: m.read("a", "V0")):
        with pytest.raises((TypeError, ValueError)):
            call()
        assert_same(before, m)


# -- 4. saving a CacheKey subclass -------------------------------------------------

class SubKey(CacheKey):
    pass


class SubStr(str):
    pass


@pytest.mark.parametrize("key", [SubKey("s", 1), SubStr("s"), ("t", SubKey("s", 1)),
                                 (1, SubStr("x"))])
def test_bug4_save_refuses_subclasses(tmp_path, key):
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entry(key, 10)
    m.check_invariants()
    with pytest.raises(TypeError, match=r"subclass.*cannot be saved"):
        m.save(tmp_path / "x.npz")
    assert os.listdir(tmp_path) == []
    m.check_invariants()
    back = pickle.loads(pickle.dumps(m))    # pickle keeps the exact key
    assert back == m and list(back) == [key]
    back.check_invariants()


# -- 5. every argument converted before any lookup ------------------------------------

class Sneaky:
    """An integer whose conversion removes entry "a" and gives its block to
    a new entry "b"."""

    def __init__(self, m, value):
        self.m, self.value = m, value

    def __index__(self):
        if "a" in self.m:
            self.m.remove_cache_entry("a")
            self.m.allocate_entry("b", 16)
            self.m.write("b", b"B" * 16)
        return self.value


@pytest.mark.parametrize("call", [
    lambda m: m.write("a", b"xx", Sneaky(m, 0)),
    lambda m: m.read("a", np.uint8, Sneaky(m, 0)),
    lambda m: m.read("a", np.uint8, 0, Sneaky(m, 2)),
    lambda m: m.read("a", np.uint8, 0, Sneaky(m, 2), out=np.empty(2, np.uint8)),
    lambda m: m.resize_entry("a", Sneaky(m, 8)),
], ids=["write-offset", "read-offset", "read-count", "read-out", "resize"])
def test_bug5_arguments_converted_before_lookup(call):
    m = KVCacheManager(16, 16)          # one block: "b" must reuse "a"'s
    m.allocate_entry("a", 16)
    m.write("a", b"A" * 16)
    m.check_invariants()
    with pytest.raises(KeyError, match="'a'"):
        call(m)
    m.check_invariants()
    assert list(m) == ["b"] and bytes(m.read("b")) == b"B" * 16
    m.check_invariants()


def test_bug5_allocate_entry_size_converted_before_key_check():
    m = KVCacheManager(4 * 16, 16)

    class Grab:
        def __index__(self):
            m.allocate_entry("x", 16)
            return 16

    with pytest.raises(KeyError, match="'x' is already live"):
        m.allocate_entry("x", Grab())
    m.check_invariants()
    with pytest.raises(KeyError, match="'x' is already live"):
        m.allocate_entries(["x"], [Grab()])
    m.check_invariants()
    assert list(m) == ["x"] and m.pool.used_blocks == 1


# -- 6. two distinct keys equal to one stored key ------------------------------------

class EqualsK:
    """Equal to the stored key "k" (and hashing like it), not to another
    EqualsK."""

    def __init__(self, tag):
        self.tag = tag

    def __hash__(self):
        return hash("k")

    def __eq__(self, other):
        return other == "k" if isinstance(other, str) else self is other

    def __repr__(self):
        return f"EqualsK({self.tag})"


@pytest.mark.parametrize("keys, found", [
    ([EqualsK(1), EqualsK(2)], [True, False]),
    (["k", EqualsK(1), "k"], [True, False, False]),
    ([EqualsK(1), "zz", "k"], [True, False, False]),
])
def test_bug6_remove_entries_repeat_by_equality(keys, found):
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entries(["k", "other"], [40, 16])
    m.check_invariants()
    got = m.remove_cache_entries(keys)      # as if removed one by one
    m.check_invariants()
    assert [g is not None for g in got] == found
    assert got[found.index(True)].key == "k"
    assert list(m) == ["other"] and m.pool.used_blocks == 1
    assert m.stats.manual_evictions == 1
    assert m.allocate_entry("k", 40).blocks.tolist() == [0, 1, 2]
    m.check_invariants()


def test_bug6_remove_entries_numeric_twins():
    for stored, keys in ((1, [1, 1.0]), (1, [True, 1]), (1.0, [1, True])):
        m = KVCacheManager(8 * 16, 16)
        m.allocate_entry(stored, 20)
        m.check_invariants()
        got = m.remove_cache_entries(keys)
        m.check_invariants()
        assert got[0].key == stored and got[1] is None and len(m) == 0


# -- 7. bytes and PathLike paths --------------------------------------------------

class BytesPath:
    def __init__(self, path):
        self.path = os.fsencode(path)

    def __fspath__(self):
        return self.path


@pytest.mark.parametrize("kind", [bytes, str, pathlib.Path, BytesPath])
def test_bug7_save_and_load_any_path_kind(tmp_path, kind):
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entry("a", 20)
    m.write("a", b"hello")
    m.check_invariants()
    path = kind(os.fsencode(tmp_path / "s.npz")) if kind is bytes else kind(
        str(tmp_path / "s.npz"))
    m.save(path)
    back = KVCacheManager.load(path)
    back.check_invariants()
    assert back == m and bytes(back.read("a", count=5)) == b"hello"
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]


def test_bug7_bad_path_type():
    m = KVCacheManager(8 * 16, 16)
    with pytest.raises(TypeError):
        m.save(42)
    with pytest.raises(TypeError):
        KVCacheManager.load(42.0)
    with pytest.raises(TypeError):          # not a file descriptor
        KVCacheManager.load(987654)


# -- 8. an int key of more than 4,300 digits ---------------------------------------

def test_bug8_big_int_keys(tmp_path):
    big = 7 ** 6000                          # 5,071 digits
    keys = [big, -big, CacheKey("s", big), ("t", -big, 2 ** 64), 2 ** 63,
            -(2 ** 63) - 1, 5]
    reports = []
    m = KVCacheManager(16 * 16, 16, on_evict=reports.append)
    for k in keys:
        m.allocate_entry(k, 3)
        m.check_invariants()
    path = tmp_path / "big.npz"
    m.save(path)
    back = KVCacheManager.load(path)
    back.check_invariants()
    assert back == m and list(back) == keys
    m.remove_cache_entries(keys)
    m.check_invariants()
    dicts = [json.loads(json.dumps(r.to_dict())) for r in reports]
    assert [d["key"] for d in dicts] == [kvpool._key_to_json(k) for k in keys]
    assert [kvpool._key_from_json(d["key"]) for d in dicts] == keys


def test_bug8_old_and_malformed_int_forms(tmp_path):
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entries([12, CacheKey("s", 3)], [3, 3])
    m.check_invariants()
    path = tmp_path / "s.npz"
    m.save(path)
    tamper(path, keys=[{"int": 12}, {"CacheKey": ["s", 3]}])   # plain numbers
    assert KVCacheManager.load(path) == m
    for bad in ("12", " 0x1", "0x", "0x_1", "0X1", "+0x1", "0x1g", 1.0, True):
        tamper(path, keys=[{"int": bad}, {"CacheKey": ["s", 3]}])
        with pytest.raises(ValueError, match="malformed key"):
            KVCacheManager.load(path)


# -- 9. datetime64 / timedelta64 sizes ---------------------------------------------

@pytest.mark.parametrize("sizes", [
    np.array([16, 16], "timedelta64[ns]"), np.array([16, 16], "datetime64[ns]"),
    np.array([16, 16], "timedelta64[D]"), np.array([1, 2], "datetime64[s]"),
    [np.timedelta64(16), np.timedelta64(16)], np.array([16.0, 16.0]),
    np.array([True, True]),
], ids=["m8[ns]", "M8[ns]", "m8[D]", "M8[s]", "m8-scalars", "float", "bool"])
def test_bug9_time_sizes_refused(sizes):
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entry("a", 16)
    m.check_invariants()
    before = snapshot(m)
    with pytest.raises(TypeError, match="integer"):
        m.allocate_entries(["x", "y"], sizes)
    assert_same(before, m)
    with pytest.raises(TypeError, match="integer"):
        m.allocate_entry("x", sizes[0])
    assert_same(before, m)


def test_bug9_integer_arrays_still_accepted():
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entries(["x", "y"], np.array([16, 17], np.uint16))
    m.allocate_entries(["z"], np.array([3], object))
    m.check_invariants()
    assert [e.n_blocks for e in m.cache.values()] == [1, 2, 1]


# -- friction: m.cache, read(out=), one JSON form, load in place -------------------

def test_friction_cache_view_survives_recency_changes():
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entries(["a", "b", "c"], [16, 16, 16])
    for i, k in enumerate("abc"):
        m.write(k, bytes([i + 1]))
    m.check_invariants()
    seen = []
    for k in m.cache:
        seen.append((k, m[k].size, m.get(k).size, int(m.read(k, count=1)[0])))
    assert seen == [("a", 16, 16, 1), ("b", 16, 16, 2), ("c", 16, 16, 3)]
    m.check_invariants()
    for k in m.cache.keys():
        m.touch(k)
    for k, e in m.cache.items():
        assert m[k] is e
    for e in m.cache.values():
        m.read(e.key)
    for k in m.cache:                         # and removal during iteration
        m.remove_cache_entry(k)
        m.check_invariants()
    assert len(m) == 0 and len(m.cache) == 0 and list(m.cache.items()) == []


def test_friction_cache_view_is_read_only_and_a_mapping():
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entries(["a", "b"], [16, 16])
    v = m.cache
    assert len(v) == 2 and "a" in v and "zz" not in v and v["a"] is m.peek("a")
    assert dict(v) == {"a": m.peek("a"), "b": m.peek("b")}
    assert v.get("zz") is None and list(v.keys()) == ["a", "b"]
    assert list(m) == ["a", "b"]              # looking through it: no recency
    assert m.stats.hits == 0 and m.stats.misses == 0
    with pytest.raises(KeyError, match="'zz'"):
        v["zz"]
    with pytest.raises(TypeError, match=r"key \[1\] is not hashable"):
        v[[1]]
    with pytest.raises(TypeError):
        v["c"] = 1
    with pytest.raises((TypeError, AttributeError)):
        del v["a"]
    m.allocate_entry("c", 16)                 # a live view of the membership
    assert len(v) == 3 and list(v) == ["a", "b", "c"]
    m.check_invariants()


def test_friction_read_out():
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entries(["a", "b"], [40, 16])
    data = np.arange(10, dtype=np.float32)
    m.write("a", data)
    m.check_invariants()
    out = np.zeros(10, np.float32)
    assert m.read("a", np.float32, count=10, out=out) is out
    assert np.array_equal(out, data) and list(m) == ["b", "a"]
    grid = np.zeros((2, 3), np.float32)
    assert m.read("a", np.float32, 4, count=6, out=grid) is grid
    assert np.array_equal(grid.ravel(), data[1:7])
    raw = np.zeros(40, np.uint8)
    assert m.read("a", out=raw) is raw and raw.tobytes() == data.tobytes()
    m.check_invariants()

    m.read("b")                               # "a" is LRU again
    before = snapshot(m)
    for out, match in [
            (np.zeros(10, np.float64), "dtype float64"),
            (np.zeros(9, np.float32), "holds 9 items"),
            (np.zeros(20, np.float32)[::2], "C-contiguous"),
            (np.zeros(10, np.float32).reshape(2, 5).T, "C-contiguous"),
            (bytearray(40), "numpy array"),
            (memoryview(bytearray(40)), "numpy array"),
            (m.pool.arena[:40].view(np.float32), "arena")]:
        with pytest.raises((TypeError, ValueError), match=match):
            m.read("a", np.float32, count=10, out=out)
        assert_same(before, m)
    ro = np.zeros(10, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        m.read("a", np.float32, count=10, out=ro)
    assert_same(before, m)
    with pytest.raises(KeyError, match="'zz'"):
        m.read("zz", out=np.zeros(1, np.uint8))
    assert_same(before, m)


def test_friction_one_json_form_for_keys(tmp_path):
    keys = [CacheKey("s", 1), "str", 7, b"raw", ("t", 1, (b"x", CacheKey("n", 2)))]
    reports = []
    m = KVCacheManager(16 * 16, 16, on_evict=reports.append)
    m.allocate_entries(keys + [1.5, None], [3] * 7)
    m.remove_cache_entries(keys)
    snap_keys = [kvpool._key_to_json(k) for k in keys]
    assert [r.to_dict()["key"] for r in reports] == snap_keys
    m.clear()
    assert [r.to_dict()["key"] for r in reports[-2:]] == [
        {"repr": "1.5"}, {"repr": "None"}]
    for r in reports:
        json.dumps(r.to_dict())
    m.check_invariants()


def test_friction_load_builds_no_second_arena(tmp_path):
    size = 32 << 20
    m = KVCacheManager(size, 4096)
    m.allocate_entry("a", 4096 * 3)
    m.write("a", b"xyz")
    path = tmp_path / "big.npz"
    m.save(path)
    del m
    tracemalloc.start()
    try:
        back = KVCacheManager.load(path)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    back.check_invariants()
    assert bytes(back.read("a", count=3)) == b"xyz"
    assert peak < 1.25 * size, f"peak {peak} bytes for a {size}-byte arena"


def test_friction_unhashable_keys_named_everywhere():
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entry("a", 16)
    before = snapshot(m)
    for call in (lambda k: m.allocate_entry(k, 1),
                 lambda k: m.allocate_entries(["x", k], [1, 1]),
                 lambda k: m.resize_entry(k, 1), lambda k: m.remove_cache_entry(k),
                 lambda k: m.remove_cache_entries(["a", k]), lambda k: m[k],
                 lambda k: m.get(k), lambda k: m.peek(k), lambda k: k in m,
                 lambda k: m.touch(k), lambda k: m.pin(k), lambda k: m.unpin(k),
                 lambda k: m.write(k, b"z"), lambda k: m.read(k),
                 lambda k: m.views(k), lambda k: m.cache[k], lambda k: k in m.cache):
        with pytest.raises(TypeError, match=r"key \[1\] is not hashable"):
            call([1])
        assert_same(before, m)


def test_friction_type_error_from_a_key_comparison_is_not_relabelled():
    class Touchy:
        def __hash__(self):
            return hash("a")

        def __eq__(self, other):
            raise TypeError("cannot compare Touchy")

    class Touchy2(Touchy):              # two of them collide in a set
        pass

    m = KVCacheManager(8 * 16, 16)
    m.allocate_entry("a", 16)
    before = snapshot(m)
    for call in (lambda k: m[k], lambda k: m.peek(k), lambda k: k in m,
                 lambda k: m.remove_cache_entry(k), lambda k: m.touch(k),
                 lambda k: m.allocate_entry(k, 1),
                 lambda k: m.allocate_entries([k, Touchy2()], [1, 1]),
                 lambda k: m.remove_cache_entries(["zz", k])):
        with pytest.raises(TypeError, match="cannot compare Touchy"):
            call(Touchy())
        assert_same(before, m)


def test_friction_load_adopts_or_copies_the_arena(tmp_path):
    m = KVCacheManager(8 * 16, 16)
    m.allocate_entry("a", 20)
    m.write("a", b"abc")
    state = m.__getstate__()
    arena = state["arrays"]["arena"]
    back = KVCacheManager.__new__(KVCacheManager)
    back.__setstate__(state)            # a writable arena of its own: adopted
    assert np.shares_memory(back.pool.arena, arena) and back == m
    arena.flags.writeable = False       # a read-only one: copied
    back = KVCacheManager.__new__(KVCacheManager)
    back.__setstate__(state)
    assert not np.shares_memory(back.pool.arena, arena) and back == m
    back.write("a", b"xyz")
    back.check_invariants()
    assert bytes(arena[:3]) == b"abc"
    state["arrays"]["arena"] = arena.view(np.int8)
    with pytest.raises(ValueError, match="inconsistent snapshot: array 'arena'"
                                         " has dtype int8"):
        KVCacheManager.__new__(KVCacheManager).__setstate__(state)
    assert repr(m.cache) == f"<cache view of {m!r}>"
