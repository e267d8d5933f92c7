"""What must hold on every CPU and install: searches answered while the kernels compile (and the same answers as
the kernels), a cache folder where nothing else is writable, and the CPU named as the code sees it. (INT8 models on
CPUs without VNNI: tests/test_export_encoder.py.)"""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest

from latenthash import HashIndex
from latenthash.cpu import cpu_info

BITS, DIM = 48, 16


def clustered_index(rng, dtype: str, n: int = 4000) -> tuple[HashIndex, np.ndarray, np.ndarray]:
    """Codes drawn around 40 codewords (many items per code, many ties, as learned codes have)."""
    centres = rng.random((40, BITS)) < 0.5
    codes = centres[rng.integers(0, 40, n)] ^ (rng.random((n, BITS)) < 0.03)
    feats = rng.standard_normal((n, DIM)).astype(np.float32)
    index = HashIndex(bits=BITS, feature_dim=DIM, feature_dtype=dtype)
    index.add(np.arange(n) * 3 + 1, codes, feats)
    return index, codes, feats


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_searches_while_the_kernels_compile_give_the_kernels_answers(rng, dtype):
    index, codes, feats = clustered_index(rng, dtype)
    q, qf = codes[:6] ^ (rng.random((6, BITS)) < 0.05), feats[:6] + 0.1 * rng.standard_normal((6, DIM))
    calls = [dict(k=25), dict(k=2000), dict(k=7, radius=3), dict(k=10, features=qf, pool=500),
             dict(k=10, features=qf, radius=4, pool=300), dict(k=3, features=qf)]
    for kwargs in calls:
        kernels = index.search(q, **kwargs)
        index._pending = frozenset({False, True})  # what warmup(background=True) sets meanwhile
        try:
            numpy = index.search(q, **kwargs)
        finally:
            index._pending = frozenset()
        np.testing.assert_array_equal(numpy.ids, kernels.ids, err_msg=str(kwargs))
        np.testing.assert_array_equal(numpy.distances, kernels.distances)
        np.testing.assert_array_equal(numpy.counts, kernels.counts)
        if kernels.scores is None:
            assert numpy.scores is None
        else:
            np.testing.assert_allclose(numpy.scores, kernels.scores, rtol=1e-5, atol=1e-5)
    assert index.search(q[:1], k=5).ids.shape == (1, 5)


def test_background_warmup_answers_at_once_then_hands_over_to_the_kernels(rng, tmp_path):
    index, codes, feats = clustered_index(rng, "float16")
    index.save(tmp_path / "idx")
    opened = HashIndex.open(tmp_path / "idx")  # warmup(background=True)
    first = opened.search(codes[:3], k=10)
    assert opened.warmed(120) and not opened._pending
    np.testing.assert_array_equal(first.ids, opened.search(codes[:3], k=10).ids)
    opened.add([10**9], codes[:1], feats[:1])  # the writable copy a first write makes: compiled by the same warmup
    assert opened.search(codes[:1], k=1).distances[0, 0] == 0


def test_cache_folder_where_nothing_else_is_writable(monkeypatch, tmp_path):
    import numba

    from latenthash import kernels

    monkeypatch.setattr(kernels, "_writable", lambda folder: False)
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setattr(kernels.tempfile, "tempdir", str(tmp_path))
    kernels._ensure_cache_dir()
    private = tmp_path / f"latenthash-numba-{os.getuid()}"
    assert numba.config.CACHE_DIR == str(private) and private.stat().st_mode & 0o777 == 0o700
    # a folder of that name that others can write to is not trusted: a fresh private one is used instead
    private.chmod(0o777)
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    kernels._ensure_cache_dir()
    assert numba.config.CACHE_DIR not in ("", str(private)) and numba.config.CACHE_DIR.startswith(str(tmp_path))
    # NUMBA_CACHE_DIR, where set, always wins
    monkeypatch.setattr(numba.config, "CACHE_DIR", "/somewhere/else")
    kernels._ensure_cache_dir()
    assert numba.config.CACHE_DIR == "/somewhere/else"


def test_cpu_info_names_the_simd_the_code_sees():
    info = cpu_info()
    assert info["machine"] == platform.machine() and info["llvm_cpu"] and info["model"]
    if platform.machine() == "x86_64":
        assert "popcnt" in info["simd"] and "neon" not in info["simd"]
        flags = open("/proc/cpuinfo").read()
        assert ("avx512f" in info["simd"]) == (" avx512f" in flags)
    if platform.machine() == "aarch64":
        assert "neon" in info["simd"]


def test_float16_rows_convert_exactly(rng):
    from latenthash.numpy_search import _as_float32

    f = (rng.standard_normal((50, 40)) / 8).astype(np.float16)
    f[0, :6] = [6e-8, -6e-8, 1e-5, -0.0, 65504, -65504]  # subnormals, negative zero, the largest magnitudes
    np.testing.assert_array_equal(_as_float32(f).view(np.uint32), f.astype(np.float32).view(np.uint32))


CONCURRENT_WARMUPS = """
import numpy as np, numba
from latenthash import HashIndex
rng = np.random.default_rng(0)
index = HashIndex(bits=64, feature_dim=8)
index.add(np.arange(70_000), rng.integers(0, 256, (70_000, 8), dtype=np.uint8),
          rng.standard_normal((70_000, 8)).astype(np.float32))
index.warmup(background=True)  # what a server does: compiling starts in a thread, and goes on in its own
index.warmup()
index.warmed()
print(numba.threading_layer())
"""


def test_concurrent_launches_on_a_threading_layer_that_is_not_threadsafe(tmp_path):
    """aarch64 installs without TBB or OpenMP get Numba's workqueue layer, which aborts the process when two
    threads launch parallel kernels at once (it did in the arm64 check's served search: a cold cache, two warmups);
    the kernels serialize their launches there."""
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue", "NUMBA_CACHE_DIR": str(tmp_path)}  # cold, as then
    proc = subprocess.run([sys.executable, "-c", CONCURRENT_WARMUPS], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "workqueue"
