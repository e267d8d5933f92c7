"""The base runtime end to end in one process, on whatever CPU runs it (a Jetson, an ARM server, an emulated arm64
userland): kernel parity against numpy, an encode, an index and a two-step search, a served search through the
client. Prints one line a step and exits non-zero at the first that fails.

    python scripts/smoke.py --model model.onnx --images images.npy

`--images`: a uint8 NHWC .npy array of at least 16 images of the model's input size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def step(name: str, t0: float, text: str) -> None:
    print(f"{name:14s} {time.perf_counter() - t0:7.2f} s  {text}", flush=True)


def kernel_parity(rng: np.random.Generator) -> str:
    """Exact top-k, radius search and the two-step search by the kernels against the numpy versions."""
    from latenthash import open_index

    n, bits, dim = 10_000, 64, 32  # under buckets.MIN_ROWS: the kernels scan, exactly as numpy does
    centres = rng.random((50, bits)) < 0.5
    codes = centres[rng.integers(0, 50, n)] ^ (rng.random((n, bits)) < 0.03)
    feats = rng.standard_normal((n, dim)).astype(np.float32)
    index = open_index(Path(tempfile.gettempdir()) / "latenthash-smoke-unsaved", create=True, save_new=False,
                       bits=bits, feature_dim=dim)  # in memory: never saved, so nothing is written there
    index.add(np.arange(n), codes, feats)
    q, qf = codes[:4], feats[:4]
    calls = [dict(k=10), dict(k=5, radius=4), dict(k=10, features=qf)]
    for kwargs in calls:
        got = index.search(q, **kwargs)
        index._pending = frozenset({False, True})  # the numpy versions
        try:
            ref = index.search(q, **kwargs)
        finally:
            index._pending = frozenset()
        if not (np.array_equal(got.ids, ref.ids) and np.array_equal(got.distances, ref.distances)):
            raise SystemExit(f"kernel parity FAILED for {kwargs}: {got.ids[0]} vs {ref.ids[0]}")
    return f"top-k, radius and two-step equal to numpy on {n:,} x {bits}-bit codes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True)
    args = ap.parse_args()
    from latenthash.cpu import cpu_info

    info = cpu_info()
    print(f"cpu            {info['machine']} {info['llvm_cpu']} ({info['model']}), simd: {' '.join(info['simd'])}")
    t0 = time.perf_counter()
    step("kernel parity", t0, kernel_parity(np.random.default_rng(0)))

    from latenthash import Encoder, open_index

    images = np.load(args.images)
    t0 = time.perf_counter()
    encoder = Encoder.open(args.model)
    enc = encoder.encode(images)
    runtime = f"{type(encoder.runtime).__name__}, {encoder.info.precision}"
    step("encode", t0, f"{len(images)} images ({runtime}): codes {enc.codes.shape}, features {enc.features.shape}, "
                       f"first code {enc.codes[0].tobytes().hex()}")

    t0 = time.perf_counter()
    index = open_index(Path(tempfile.gettempdir()) / "latenthash-smoke-unsaved", create=True, save_new=False,
                       bits=encoder.bits, feature_dim=encoder.feature_dim)  # saved below, into a folder of its own
    index.add(np.arange(len(images)), enc.codes, enc.features, metadata=[{"row": i} for i in range(len(images))])
    hits = index.search(enc.codes[3], k=5, features=enc.features[3])
    if hits.ids[0, 0] != 3:
        raise SystemExit(f"search FAILED: image 3's own item is not its first hit: {hits.hits()}")
    step("search", t0, f"image 3 -> {json.dumps(hits.hits())}")

    from latenthash.client import Client
    from latenthash.server.app import ServerConfig, create_server

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index.save(tmp)
        server, port = create_server(ServerConfig(index=tmp, model=args.model, port=0))
        try:
            with Client(f"127.0.0.1:{port}") as client:
                served = client.search(images=[images[3]], k=5)
        finally:
            server.stop(grace=1)
        if served.ids[0, 0] != 3:
            raise SystemExit(f"served search FAILED: {served.hits()}")
        step("serve", t0, f"port {port}, image 3 -> {json.dumps(served.hits())}")
    print("smoke: all steps passed", flush=True)


if __name__ == "__main__":
    sys.exit(main())
