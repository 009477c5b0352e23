# -- fast start: the compiled code is cached on disk ----------------------------

import json
import os
import shutil
import subprocess
import sys

import pytest

import kvpool


# A first use of the manager, then numba's own cache statistics for every
# kernel in the module: {name: [cache hits, cache misses]}.
_FIRST_USE = r"""
import json, sys
import kvpool
m = kvpool.KVCacheManager(1 << 16, 256)
m.allocate_entry("a", 600); m.resize_entry("a", 900)
m.write("a", b"x" * 8); assert bytes(m.read("a", count=8)) == b"x" * 8
m.remove_cache_entry("a")
m.allocate_entries(["b", "c"], [10, 600]); m.remove_cache_entries(["b", "c"])
m.check_invariants()
stats = {}
for name, obj in vars(kvpool).items():
    s = getattr(obj, "stats", None)
    if s is not None and hasattr(s, "cache_hits"):
        stats[name] = [sum(s.cache_hits.values()), sum(s.cache_misses.values())]
print(json.dumps({"stats": stats, "free": int(kvpool._free_count(m._pool.state, m._pool.meta))}))
"""


def _run(script, cwd, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), PYTHONPATH=str(cwd))
    env.pop("NUMBA_DISABLE_JIT", None)
    out = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _vendored(tmp_path):
    """A copy of kvpool.py alone in a directory, as a script would vendor it."""
    where = tmp_path / "vendored"
    where.mkdir()
    shutil.copy(kvpool.__file__, where / "kvpool.py")
    return where


needs_jit = pytest.mark.skipif(not hasattr(kvpool._take, "stats"),
                               reason="nothing is compiled under NUMBA_DISABLE_JIT")


@needs_jit
def test_second_process_compiles_nothing(tmp_path):
    where = _vendored(tmp_path)
    first = _run(_FIRST_USE, where, tmp_path / "cache")
    second = _run(_FIRST_USE, where, tmp_path / "cache")
    assert sum(m for h, m in first["stats"].values()) > 0     # it did compile
    assert sum(h for h, m in second["stats"].values()) >= 7   # every kernel used
    missed = {k: v for k, v in second["stats"].items() if v[1]}
    assert missed == {}, f"compiled again in a warm process: {missed}"


@needs_jit
def test_read_only_vendored_copy_works(tmp_path):
    where = _vendored(tmp_path)
    os.chmod(where / "kvpool.py", 0o444)
    os.chmod(where, 0o555)
    try:
        for _ in range(2):
            result = _run(_FIRST_USE, where, tmp_path / "cache")
            assert result["free"] == 256
    finally:
        os.chmod(where, 0o755)


@needs_jit
def test_editing_the_module_never_runs_stale_code(tmp_path):
    where = _vendored(tmp_path)
    source = where / "kvpool.py"
    assert _run(_FIRST_USE, where, tmp_path / "cache")["free"] == 256
    text = source.read_text()
    old = "return meta[C_COUNT] + state.shape[0] - meta[C_BUMP]"
    assert text.count(old) == 1
    source.write_text(text.replace(old, old + " + 1000"))
    assert _run(_FIRST_USE, where, tmp_path / "cache")["free"] == 1256
