"""Near-duplicate groups against a brute-force reference over all pairs (union-find in plain Python), and the two
kernels they use against numpy."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from latenthash import HashIndex
from latenthash import kernels as K
from latenthash.codes import to_words
from latenthash.errors import InvalidInput

BITS, DIM = 32, 24


def planted(rng, n=1500, dtype="float32"):
    """Items around 30 codewords, with 60 altered copies (a flipped bit or none, features nudged) among them."""
    centres = rng.random((30, BITS)) < 0.5
    codes = centres[rng.integers(0, 30, n)] ^ (rng.random((n, BITS)) < 0.02)
    feats = rng.standard_normal((n, DIM)).astype(np.float32)
    src = rng.choice(n - 60, 60, replace=False)
    codes[n - 60:] = codes[src] ^ (rng.random((60, BITS)) < 0.02)
    feats[n - 60:] = feats[src] + 0.15 * rng.standard_normal((60, DIM)).astype(np.float32)
    index = HashIndex(bits=BITS, feature_dim=DIM, feature_dtype=dtype)
    index.add(np.arange(n) * 2 + 5, codes, feats)
    return index, codes, src


def brute_groups(index: HashIndex, radius: int, min_score: float | None) -> list[list[int]]:
    items = index.get(index.ids)
    bits = np.unpackbits(items.codes, axis=1)[:, :BITS].astype(np.int64)
    dist = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    linked = dist <= radius
    if min_score is not None:
        f = items.features / np.linalg.norm(items.features, axis=1, keepdims=True)
        linked &= f @ f.T >= min_score - 1e-6
    parent = list(range(len(bits)))

    def root(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in zip(*np.nonzero(np.triu(linked, 1))):
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for r in range(len(bits)):
        groups.setdefault(root(r), []).append(int(index.ids[r]))
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_groups_match_all_pairs(rng, dtype):
    index, _, src = planted(rng, dtype=dtype)
    for radius, min_score in ((2, 0.95), (1, 0.9), (3, 0.97)):
        got = index.duplicates(radius=radius, min_score=min_score)
        ref = brute_groups(index, radius, min_score)
        assert [g.ids.tolist() for g in got] == ref
        for g in got:
            assert np.all(g.scores >= min_score - 1e-5) and np.all(g.scores <= 1 + 1e-5)
    found = {tuple(g.ids.tolist()) for g in index.duplicates(radius=2, min_score=0.9)}
    planted_pairs = [(int(s) * 2 + 5, (1440 + j) * 2 + 5) for j, s in enumerate(src)]
    assert sum(any(a in g and b in g for g in found) for a, b in planted_pairs) >= 50


def test_codes_only_groups_and_bad_options(rng):
    _, codes, _ = planted(rng)
    index = HashIndex(bits=BITS)
    index.add(np.arange(len(codes)), codes)
    for radius in (0, 1):
        got = index.duplicates(radius=radius)
        assert [g.ids.tolist() for g in got] == brute_groups(index, radius, None)
        assert all(np.isnan(g.scores).all() for g in got)
    for bad in (dict(radius=-1), dict(radius=BITS + 1), dict(radius=1.5), dict(min_score=1.5), dict(min_score="x")):
        with pytest.raises(InvalidInput):
            index.duplicates(**bad)
    assert HashIndex(bits=BITS).duplicates() == []


def test_code_pairs_and_components_kernels(rng):
    u = np.unique(rng.random((300, 70)) < 0.5, axis=0)
    packed = np.packbits(u, axis=1)
    words = to_words(packed, 70)
    first, second = K.code_pairs(words.reshape(-1), len(words), words.shape[1], np.int64(30))
    d = (u[:, None, :] != u[None, :, :]).sum(-1)
    ref = np.argwhere(np.triu(d <= 30, 1))
    np.testing.assert_array_equal(np.stack([first, second], 1), ref)
    a, b = rng.integers(0, 500, 300), rng.integers(0, 500, 300)
    labels = K.components(500, a.astype(np.int64), b.astype(np.int64))
    for x, y in zip(a, b):
        assert labels[x] == labels[y]
    assert all(labels[i] <= i and labels[labels[i]] == labels[i] for i in range(500))
    assert len(set(labels.tolist())) == 500 - np.linalg.matrix_rank(np.eye(500)[a] - np.eye(500)[b])


def test_dedup_command(rng, tmp_path):
    index, _, _ = planted(rng)
    index.save(tmp_path / "idx")
    proc = subprocess.run([sys.executable, "-m", "latenthash.cli", "dedup", "--index", tmp_path / "idx", "--json",
                           "--min-score", "0.9"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups = json.loads(proc.stdout)
    assert [[item["id"] for item in g] for g in groups] == [g.ids.tolist() for g in index.duplicates(min_score=0.9)]
    assert all(set(item) == {"id", "score", "metadata"} for g in groups for item in g)
    table = subprocess.run([sys.executable, "-m", "latenthash.cli", "dedup", "--index", tmp_path / "idx",
                            "--min-score", "0.9"], capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and "group 1" in table.stdout
    bad = subprocess.run([sys.executable, "-m", "latenthash.cli", "dedup", "--index", tmp_path / "idx", "--radius",
                          "99"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "radius" in bad.stderr and "Traceback" not in bad.stderr


def test_duplicates_over_grpc_match_the_embedded_call(rng, tmp_path):
    from latenthash.client import Client
    from latenthash.search import Searcher
    from latenthash.server.app import ServerConfig, create_server

    index, _, _ = planted(rng)
    index.add([10**6], np.zeros((1, BITS), bool), np.ones((1, DIM), np.float32))  # metadata travels too
    index.save(tmp_path / "idx")
    embedded = Searcher(HashIndex.open(tmp_path / "idx")).duplicates(min_score=0.9)
    server, port = create_server(ServerConfig(index=str(tmp_path / "idx"), port=0))
    try:
        with Client(f"127.0.0.1:{port}") as client:
            remote = client.duplicates(min_score=0.9)
            assert [g.ids.tolist() for g in remote] == [g.ids.tolist() for g in embedded] and remote
            for a, b in zip(remote, embedded):
                np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
                assert a.metadata == b.metadata
            assert [len(g) for g in client.duplicates(radius=0, min_score=0.99)] == \
                [len(g) for g in index.duplicates(radius=0, min_score=0.99)]
            with pytest.raises(InvalidInput, match="radius"):
                client.duplicates(radius=BITS + 1)
        proc = subprocess.run([sys.executable, "-m", "latenthash.cli", "dedup", "--server", f"127.0.0.1:{port}",
                               "--json", "--min-score", "0.9"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert [[item["id"] for item in g] for g in json.loads(proc.stdout)] == [g.ids.tolist() for g in embedded]
    finally:
        server.stop(1)
