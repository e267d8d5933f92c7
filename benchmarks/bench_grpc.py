"""Service overhead: QPS and p50/p99 latency of search-by-code and search-by-image through the gRPC server, at
concurrency 1, 4, 16 and 64, against a 1M-item index, next to the same search called in-process.

    python benchmarks/bench_grpc.py --model RUN/model.onnx [--run RUN] [--n 1000000] [--seconds 5]
                                    [--forms unary stream batch columnar] [--batch-size 64]
                                    [--kinds code image] [--batching on off] [--levels 1 4]

Four forms of the same queries: `unary` (one Search call per query; concurrency = calls in flight), `stream`
(one SearchStream; concurrency = queries written and not yet answered), `batch` (SearchBatch calls of
`--batch-size` queries; concurrency = calls in flight) and `columnar` (SearchCodes calls of `--batch-size` codes,
code queries only). Latency is per query, from sending to its answer (a call's queries each count the call's).

The server runs in its own process; the load generator is one asyncio process sending pre-built requests (both
share this machine's 2 cores, as they would on an edge box serving local clients). Dynamic batching (of encoder
calls and of index searches) is measured by running every row with batching off (batch_max 1) and on.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import save


def build_index(path: Path, model: str, n: int, run: str | None) -> None:
    """n items. `run` given: learned codes, as a trained model makes them (the real database's features,
    replicated with jitter, coded by the model's own latent layer; see bench_search.synthetic_database), which
    collapse onto a few thousand distinct codes. Otherwise uniform random codes: the worst case for search."""
    from latenthash import HashIndex
    from latenthash.encoder import Encoder

    enc = Encoder.open(model, runtime="onnxruntime")
    index = HashIndex(bits=enc.bits, feature_dim=enc.feature_dim, feature_dtype="float16")
    if run:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_search import synthetic_database

        codes, feats, labels, *_ = synthetic_database(run, n)
        index.add(np.arange(n), codes, feats, metadata=[{"label": int(v)} for v in labels])
    else:
        rng = np.random.default_rng(0)
        for lo in range(0, n, 250_000):
            m = min(250_000, n - lo)
            index.add(np.arange(lo, lo + m), rng.random((m, enc.bits)) < 0.5,
                      rng.standard_normal((m, enc.feature_dim)).astype(np.float32),
                      metadata=[{"label": int(i % 10)} for i in range(lo, lo + m)])
    index.save(path)


def run_server(index: str, model: str, batch_max: int, port_q) -> None:
    from latenthash.server.app import ServerConfig, create_server

    server, port = create_server(ServerConfig(index=index, model=model, port=0, batch_max=batch_max,
                                              search_batch_max=batch_max, max_workers=64))
    port_q.put(port)
    server.wait_for_termination()


async def load_calls(port: int, method: str, messages: list, concurrency: int, seconds: float,
                     queries_per_call: int = 1) -> dict:
    """Unary calls (Search, or SearchBatch carrying several queries), `concurrency` in flight; every query of a
    call gets the call's latency."""
    import grpc

    from latenthash.v1 import search_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = getattr(pb_grpc.HashSearchStub(channel), method)
        for m in messages[:5]:
            await call(m)  # warm
        latencies: list[float] = []
        stop = time.perf_counter() + seconds

        async def worker(w: int):
            i = w
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                await call(messages[i % len(messages)])
                latencies.extend([time.perf_counter() - t0] * queries_per_call)
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return summary(latencies, len(latencies), time.perf_counter() - t0)


async def load_stream(port: int, requests: list, concurrency: int, seconds: float) -> dict:
    """One SearchStream with up to `concurrency` queries written and not yet answered."""
    import grpc

    from latenthash.v1 import search_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.HashSearchStub(channel)
        call = stub.SearchStream()
        slots = asyncio.Semaphore(concurrency)
        sent: collections.deque = collections.deque()
        latencies: list[float] = []
        stop = time.perf_counter() + seconds

        async def writer():
            i = 0
            while time.perf_counter() < stop:
                await slots.acquire()
                sent.append(time.perf_counter())
                await call.write(requests[i % len(requests)])
                i += 1
            await call.done_writing()

        async def reader():
            while (resp := await call.read()) is not grpc.aio.EOF:
                assert resp.hits
                latencies.append(time.perf_counter() - sent.popleft())
                slots.release()

        t0 = time.perf_counter()
        await asyncio.gather(writer(), reader())
        return summary(latencies, len(latencies), time.perf_counter() - t0)


def summary(latencies: list[float], queries: int, elapsed: float) -> dict:
    lat = np.asarray(latencies) * 1e3
    return {"qps": queries / elapsed, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "queries": queries}


def embedded(index_dir: str, model: str, codes, images) -> dict:
    from latenthash import HashIndex
    from latenthash.encoder import Encoder
    from latenthash.search import Searcher

    s = Searcher(HashIndex.open(index_dir), Encoder.open(model, runtime="onnxruntime"))
    out = {}
    for name, kwargs in (("code", lambda i: {"codes": codes[i % len(codes)][None]}),
                         ("image", lambda i: {"images": images[i % len(images)][None]})):
        for i in range(20):
            s.search(k=10, **kwargs(i))
        t = []
        for i in range(300):
            t0 = time.perf_counter()
            s.search(k=10, **kwargs(i))
            t.append(time.perf_counter() - t0)
        out[name] = {"p50_ms": statistics.median(t) * 1e3, "p99_ms": float(np.percentile(t, 99) * 1e3),
                     "qps_1_thread": 1 / statistics.mean(t)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--index", help="reuse this index directory")
    ap.add_argument("--run", help="training run of the model: index learned codes (default: uniform random codes)")
    ap.add_argument("--forms", nargs="+", default=["unary", "stream", "batch", "columnar"],
                    choices=["unary", "stream", "batch", "columnar"])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[64],
                    help="queries per SearchBatch / SearchCodes call")
    ap.add_argument("--levels", type=int, nargs="+", help="concurrency levels (default: per form)")
    ap.add_argument("--kinds", nargs="+", default=["code", "image"], choices=["code", "image"])
    ap.add_argument("--batching", nargs="+", default=["on", "off"], choices=["on", "off"],
                    help="server-side dynamic batching settings to run")
    args = ap.parse_args()
    from latenthash.encoder import Encoder
    from latenthash.export.data import load_dataset
    from latenthash.v1 import search_pb2 as pb

    print(f"load average before: {os.getloadavg()[0]:.2f}")
    index_dir = Path(args.index or Path(tempfile.mkdtemp()) / "ix")
    if not (index_dir / "CURRENT").exists():
        build_index(index_dir, args.model, args.n, args.run)
    enc = Encoder.open(args.model, runtime="onnxruntime")
    images = load_dataset(enc.info.dataset).test.images[:500]
    codes = enc.encode(images).codes
    code_reqs = [pb.SearchRequest(query=pb.Query(code=c.tobytes()), k=10) for c in codes]
    image_reqs = [pb.SearchRequest(query=pb.Query(tensor=pb.ImageTensor(
        data=im.tobytes(), height=im.shape[0], width=im.shape[1], channels=im.shape[2])), k=10) for im in images]
    results = {"n": args.n, "codes": "learned" if args.run else "random",
               "embedded": embedded(str(index_dir), args.model, codes, images), "grpc": {}}
    print("embedded:", json.dumps(results["embedded"]))
    print("| query | form | batching | concurrency | QPS | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for batching in args.batching:
        batch_max = 64 if batching == "on" else 1
        port_q = ctx.Queue()
        proc = ctx.Process(target=run_server, args=(str(index_dir), args.model, batch_max, port_q), daemon=True)
        proc.start()
        port = port_q.get(timeout=300)
        try:
            for kind in args.kinds:
                reqs = code_reqs if kind == "code" else image_reqs
                for form in args.forms:
                    if form == "columnar" and kind == "image":
                        continue  # SearchCodes takes codes only
                    sizes = args.batch_size if form in ("batch", "columnar") else [1]
                    default = (1, 4) if form in ("batch", "columnar") else (1, 4, 16, 64) if form == "unary" \
                        else (1, 16, 64, 256)
                    for size, conc in ((b, c) for b in sizes for c in args.levels or default):
                        if form == "unary":
                            r = asyncio.run(load_calls(port, "Search", reqs, conc, args.seconds))
                        elif form == "stream":
                            r = asyncio.run(load_stream(port, reqs, conc, args.seconds))
                        elif form == "batch":
                            batches = [pb.SearchBatchRequest(requests=reqs[i:i + size])
                                       for i in range(0, len(reqs) - size + 1, size)]
                            r = asyncio.run(load_calls(port, "SearchBatch", batches, conc, args.seconds, size))
                        else:
                            calls = [pb.SearchCodesRequest(codes=codes[i:i + size].tobytes(), k=10)
                                     for i in range(0, len(codes) - size + 1, size)]
                            r = asyncio.run(load_calls(port, "SearchCodes", calls, conc, args.seconds, size))
                        name = {"batch": f"SearchBatch of {size}", "columnar": f"SearchCodes of {size}"}.get(form, form)
                        results["grpc"][f"{kind}/{form}{size if size > 1 else ''}/batch{batch_max}/c{conc}"] = r
                        print(f"| {kind} | {name} | {batching} | {conc} | {r['qps']:,.0f} | {r['p50_ms']:.2f} | "
                              f"{r['p99_ms']:.2f} |", flush=True)
        finally:
            proc.terminate()
            proc.join()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    save("grpc_learned" if args.run else "grpc", results)


if __name__ == "__main__":
    main()
