"""Rotten index files: random bytes flipped in one file of a saved index per round, then the index opened with
and without verification and searched.

    python benchmarks/fuzz_index.py [--rounds 1000] [--seed 0] [--out results/fuzz_index.json]

Each round copies a clean saved index (codes, ids, float16 features, metadata; and one with int8 features and
scales), flips 1-8 bytes of one of its files (CURRENT, header.json, every .npy including its header, metadata.bin),
and checks: a verified open (`HashIndex.open(verify=True)`) raises IndexCorrupt naming the damaged file (the
header's damage is named through header.json); an unverified open either raises IndexCorrupt or gives an index
whose searches (Hamming, re-ranked, radius, with metadata) return only ids the index holds, or IndexCorrupt. Any
other exception is counted and listed. A crash or a hang ends this process: run it as a child with a timeout (the
test does). Prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from latenthash import HashIndex
from latenthash.errors import IndexCorrupt


def clean_index(root: Path, dtype: str, rng: np.random.Generator) -> None:
    n, bits, dim = 400, 48, 16
    centres = rng.random((12, bits)) < 0.5
    codes = centres[rng.integers(0, 12, n)] ^ (rng.random((n, bits)) < 0.05)
    index = HashIndex(bits=bits, feature_dim=dim, feature_dtype=dtype)
    index.add(rng.choice(10**9, n, replace=False), codes, rng.standard_normal((n, dim)).astype(np.float32),
              [{"i": i, "tag": "x" * (i % 7)} if i % 3 else None for i in range(n)])
    index.save(root)


def files_of(root: Path) -> list[Path]:
    gen = root / (root / "CURRENT").read_text().split()[0]
    return [root / "CURRENT", *sorted(gen.iterdir())]


def flip(path: Path, rng: np.random.Generator) -> None:
    data = bytearray(path.read_bytes())
    near_start = rng.random() < 0.3  # .npy headers, JSON structure: the first bytes matter most
    for _ in range(int(rng.integers(1, 9))):
        pos = int(rng.integers(0, min(len(data), 160) if near_start else len(data)))
        data[pos] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))


def probe(index: HashIndex, rng: np.random.Generator) -> None:
    """Searches of every kind; raises AssertionError if a hit's id is not one the index holds."""
    held = set(index.ids.tolist())
    q = rng.random((3, index.bits)) < 0.5
    qf = rng.standard_normal((3, index.feature_dim)).astype(np.float32)
    for res in (index.search(q, 10), index.search(q, 10, features=qf), index.search(q, 10, radius=6)):
        for row, n in zip(res.ids, res.counts):
            assert set(row[:n].tolist()) <= held, "a search returned an id the index does not hold"
    index.metadata(index.ids[:50])
    index.get(index.ids[:5])


def run(rounds: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    work = Path(tempfile.mkdtemp(prefix="latenthash-fuzz-"))
    cleans = []
    for dtype in ("float16", "int8"):
        clean_index(work / f"clean-{dtype}", dtype, rng)
        cleans.append(work / f"clean-{dtype}")
    out = {"rounds": rounds, "verified_refused": 0, "verified_accepted": [], "unverified_refused": 0,
           "unverified_served": 0, "unexpected": [], "by_file": {}}
    t0 = time.perf_counter()
    for r in range(rounds):
        root = work / "round"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(cleans[r % 2], root)
        target = files_of(root)[int(rng.integers(0, len(files_of(root))))]
        name = target.name
        out["by_file"][name] = out["by_file"].get(name, 0) + 1
        flip(target, rng)
        try:
            HashIndex.open(root, verify=True, warmup=False)
            out["verified_accepted"].append(f"round {r}: {name}")
        except IndexCorrupt as exc:
            named = name if name != "CURRENT" else "CURRENT"
            if named not in str(exc):
                out["unexpected"].append(f"round {r}: verified open of damaged {name} named another file: {exc}")
            out["verified_refused"] += 1
        try:
            probe(HashIndex.open(root, verify=False, warmup=False), rng)
            out["unverified_served"] += 1
        except IndexCorrupt:
            out["unverified_refused"] += 1
        except Exception as exc:  # noqa: BLE001 - what the fuzz is looking for
            out["unexpected"].append(f"round {r}: unverified {name}: {type(exc).__name__}: {exc}")
    out["seconds"] = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the summary here (JSON)")
    args = ap.parse_args()
    summary = run(args.rounds, args.seed)
    text = json.dumps(summary)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    sys.exit(0)


if __name__ == "__main__":
    main()
