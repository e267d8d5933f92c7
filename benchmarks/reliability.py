"""Crash and fuzz harness for the server: kill -9 under concurrent writers, torn log tails and a full disk; malformed
messages on every RPC. The test suite runs short settings of both (tests/test_reliability.py); this script runs the
long ones and writes benchmarks/results/reliability.json.

    python benchmarks/reliability.py --rounds 60 --fuzz 3000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from common import stamp

BITS, DIM = 48, 16
FAR = 10**15
SERVER = """
import resource, sys
limit = int(sys.argv[2])
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # a full disk: writes past it fail with EFBIG
from latenthash.server.app import ServerConfig, create_server
server, port = create_server(ServerConfig(index=sys.argv[1], port=0, search_batch_max=1, grace_s=2.0))
print(port, flush=True)
import threading
threading.Event().wait()
"""


def make_index(root: Path) -> None:
    from latenthash import HashIndex

    HashIndex(bits=BITS, feature_dim=DIM, feature_dtype="float32").save(root)


def start_server(root: Path, fsize_limit: int = 0, timeout: float = 30.0) -> tuple[subprocess.Popen, int, float]:
    """A codes-only server process on a free port; returns it, its port and the seconds until it answered."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(root), str(fsize_limit)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = _readline(proc, timeout)
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, int(line), time.perf_counter() - t0


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return out[0] if out else ""


@dataclass
class Ledger:
    """What the server acknowledged: the last acknowledged state of each id (its item, or deleted)."""

    items: dict[int, tuple[bytes, list[float], str]] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    refused: dict[str, int] = field(default_factory=dict)


def writer(port: int, ledger: Ledger, first_id: int, stop: threading.Event, seed: int) -> None:
    """Upsert batches of fresh ids (code, feature, metadata), sometimes delete some of its own; record what was
    acknowledged. Every id belongs to this writer only, so acknowledged states never race between writers."""
    from latenthash.v1 import search_pb2 as pb
    from latenthash.v1 import search_pb2_grpc as pb_grpc

    rng = np.random.default_rng(seed)
    next_id = first_id
    mine: list[int] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.HashSearchStub(channel)
        while not stop.is_set():
            try:
                if mine and rng.random() < 0.2:
                    gone = [mine.pop(int(rng.integers(len(mine)))) for _ in range(min(3, len(mine)))]
                    with ledger.lock:  # unknown until acknowledged: a delete may be applied and its answer lost
                        for i in gone:
                            ledger.items.pop(i)
                    stub.Delete(pb.DeleteRequest(ids=gone), timeout=5)
                    with ledger.lock:
                        ledger.deleted.update(gone)
                    continue
                n = int(rng.integers(1, 20))
                batch = []
                for i in range(next_id, next_id + n):
                    code = rng.integers(0, 256, BITS // 8, dtype=np.uint8).tobytes()
                    feat = rng.standard_normal(DIM).astype(np.float32)
                    feat /= np.linalg.norm(feat)
                    batch.append((i, code, feat.tolist(), json.dumps({"writer": first_id, "id": i})))
                next_id += n
                stub.Upsert(iter([pb.UpsertItem(id=i, code=c, feature=f, metadata_json=m) for i, c, f, m in batch]),
                            timeout=5)
                with ledger.lock:
                    for i, c, f, m in batch:
                        ledger.items[i] = (c, f, m)
                        mine.append(i)
            except grpc.RpcError as exc:  # not acknowledged: neither recorded nor expected
                with ledger.lock:
                    name = exc.code().name if exc.code() else "NONE"
                    ledger.refused[name] = ledger.refused.get(name, 0) + 1
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.DEADLINE_EXCEEDED):
                    return  # the server is gone
                time.sleep(0.05)


def verify(port: int, ledger: Ledger) -> list[str]:
    """Every acknowledged item present with the code, feature and metadata sent; every acknowledged delete absent."""
    from latenthash.v1 import search_pb2 as pb
    from latenthash.v1 import search_pb2_grpc as pb_grpc

    problems = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.HashSearchStub(channel)
        ids = sorted(ledger.items)
        for lo in range(0, len(ids), 2000):
            chunk = ids[lo:lo + 2000]
            try:
                got = stub.Get(pb.GetRequest(ids=chunk), timeout=30)
            except grpc.RpcError as exc:
                problems.append(f"Get of {len(chunk)} acknowledged ids: {exc.code().name} {exc.details()[:200]}")
                continue
            for item in got.items:
                code, feat, meta = ledger.items[item.id]
                if item.code != code or json.loads(item.metadata_json) != json.loads(meta) or \
                        not np.allclose(item.feature, feat, atol=1e-5):
                    problems.append(f"id {item.id}: stored content differs from what was acknowledged")
        for i in sorted(ledger.deleted)[:500]:
            try:
                stub.Get(pb.GetRequest(ids=[i]), timeout=5)
                problems.append(f"id {i}: deleted (acknowledged) but present")
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    problems.append(f"Get of deleted id {i}: {exc.code().name}")
    return problems


def crash_rounds(rounds: int, *, writers: int = 3, seed: int = 0, workdir: Path | None = None,
                 log=print) -> dict:
    """kill -9 a server under `writers` concurrent writers `rounds` times; every third round adds a torn tail to
    the log, every fifth runs the server on a 'full disk' (a file-size limit). Returns the figures."""
    rng = random.Random(seed)
    root = Path(workdir or tempfile.mkdtemp(prefix="latenthash-crash-")) / "ix"
    make_index(root)
    ledger = Ledger()
    starts, lost, torn, full_disk = [], [], 0, 0
    for r in range(rounds):
        limit = 0
        if r % 5 == 4:  # a disk that fills: the log may grow by a few frames, then writes fail
            limit = (root / "wal.log").stat().st_size + rng.randint(200, 4000) if (root / "wal.log").exists() \
                else 4000
            full_disk += 1
        proc, port, seconds = start_server(root, limit)
        starts.append(seconds)
        problems = verify(port, ledger)
        if problems:
            lost.append({"round": r, "problems": problems[:10], "count": len(problems)})
        stop = threading.Event()
        threads = [threading.Thread(target=writer, args=(port, ledger, (r * writers + w + 1) * 10_000_000, stop,
                                                         seed * 1000 + r * writers + w), daemon=True)
                   for w in range(writers)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.1, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        for t in threads:
            t.join(10)
        if r % 3 == 2:
            _append_torn_tail(root / "wal.log", rng)
            torn += 1
        log(f"round {r + 1}/{rounds}: restart {seconds:.2f} s, {len(ledger.items)} items acknowledged, "
            f"problems {len(problems)}")
    proc, port, seconds = start_server(root)
    starts.append(seconds)
    problems = verify(port, ledger)
    if problems:
        lost.append({"round": rounds, "problems": problems[:10], "count": len(problems)})
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {"rounds": rounds, "writers": writers, "torn_tails": torn, "full_disk_rounds": full_disk,
            "acknowledged_items": len(ledger.items), "acknowledged_deletes": len(ledger.deleted),
            "refused": ledger.refused, "rounds_with_loss": lost, "restart_s_max": max(starts),
            "restart_s_median": float(np.median(starts))}


def _append_torn_tail(log: Path, rng: random.Random) -> None:
    from latenthash.server.wal import encode_delete, frame

    whole = frame(encode_delete(np.arange(rng.randint(1, 50), dtype=np.int64)))
    with open(log, "ab") as f:
        f.write(whole[: rng.randint(1, len(whole) - 1)])


# ------------------------------------------------------------------------------------------------ fuzz
def fuzz_messages(rng: random.Random, n: int) -> list[tuple[str, bytes, bool, bool]]:
    """(method path, raw request bytes, client streaming, server streaming): random bytes, truncated and bit-flipped
    valid messages, wrong message types, huge declared lengths, deep nesting, for every RPC of the three services."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from latenthash.v1 import search_pb2 as pb

    valid = {
        "Search": pb.SearchRequest(query=pb.Query(code=b"\x00" * 6), k=3).SerializeToString(),
        "SearchBatch": pb.SearchBatchRequest(requests=[pb.SearchRequest(query=pb.Query(code=b"\x01" * 6), k=2)])
        .SerializeToString(),
        "SearchCodes": pb.SearchCodesRequest(codes=b"\x00" * 12, k=2).SerializeToString(),
        "SearchStream": pb.SearchRequest(query=pb.Query(code=b"\x00" * 6), k=3).SerializeToString(),
        # writes name ids far from any stored one, so that a mutation that still parses changes nothing searched
        "Upsert": pb.UpsertItem(id=FAR, code=b"\x00" * 6, feature=[0.1] * DIM).SerializeToString(),
        "Delete": pb.DeleteRequest(ids=[FAR, FAR + 1]).SerializeToString(),
        "Get": pb.GetRequest(ids=[1]).SerializeToString(),
        "Stats": pb.StatsRequest().SerializeToString(),
        "Encode": pb.EncodeRequest(images=[b"\x89PNG"]).SerializeToString(),
        "Duplicates": pb.DuplicatesRequest(radius=1, min_score=0.99).SerializeToString(),
    }
    service = pb.DESCRIPTOR.services_by_name["HashSearch"]
    methods = [(f"/{service.full_name}/{m.name}", valid[m.name], m.client_streaming, m.server_streaming)
               for m in service.methods]
    methods += [("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(service="x").SerializeToString(),
                 False, False),
                ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                 reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString(), True, True)]
    out = []
    for i in range(n):
        path, good, cstream, sstream = methods[i % len(methods)]
        kind = rng.randrange(6)
        if kind == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        elif kind == 1 and len(good) > 1:
            data = good[: rng.randint(1, len(good) - 1)]
        elif kind == 2 and good:
            flipped = bytearray(good)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            data = bytes(flipped)
        elif kind == 3:
            data = bytes([0x0A]) + _varint(rng.choice([2**31, 2**40, 10**6])) + b"\x00" * 4  # length past the end
        elif kind == 4:
            data = b"\x0a\x02" * rng.randint(100, 2000)  # nested length-delimited fields
        else:
            data = bytes([rng.choice([0x07, 0x0F, 0xFF])]) + good  # an invalid wire type in front of a valid message
        out.append((path, data, cstream, sstream))
    return out


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def fuzz(port: int, n: int, seed: int = 0, timeout: float = 5.0) -> dict:
    """Send n malformed requests; count status codes, INTERNAL/UNKNOWN answers and calls slower than `timeout`."""
    rng = random.Random(seed)
    codes: dict[str, int] = {}
    bad: list[str] = []
    hangs = 0
    identity = lambda b: b  # noqa: E731 - raw bytes both ways
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for path, data, cstream, sstream in fuzz_messages(rng, n):
            t0 = time.perf_counter()
            try:
                if cstream:
                    call = (channel.stream_stream if sstream else channel.stream_unary)(
                        path, request_serializer=identity, response_deserializer=identity)
                    response = call(iter([data]), timeout=timeout)
                else:
                    call = (channel.unary_stream if sstream else channel.unary_unary)(
                        path, request_serializer=identity, response_deserializer=identity)
                    response = call(data, timeout=timeout)
                if sstream:
                    list(response)
                name = "OK"
            except grpc.RpcError as exc:
                name = exc.code().name
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    hangs += 1
            codes[name] = codes.get(name, 0) + 1
            if name in ("INTERNAL", "UNKNOWN") and len(bad) < 20:
                bad.append(f"{path} {data[:40]!r} -> {name}")
            if time.perf_counter() - t0 > timeout:
                hangs += 1
    return {"requests": n, "codes": codes, "internal_or_unknown": bad, "hangs_over_s": hangs, "timeout_s": timeout}


def snapshot(port: int) -> list:
    """Search results for fixed codes: what a fuzz run must leave as it found it (its writes are all refused)."""
    from latenthash.v1 import search_pb2 as pb
    from latenthash.v1 import search_pb2_grpc as pb_grpc

    codes = np.random.default_rng(7).integers(0, 256, (5, BITS // 8), dtype=np.uint8)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        r = pb_grpc.HashSearchStub(channel).SearchCodes(pb.SearchCodesRequest(codes=codes.tobytes(), k=20), timeout=30)
    return [list(r.counts), list(r.ids), list(r.distances)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--writers", type=int, default=3)
    ap.add_argument("--fuzz", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reliability.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        crash = crash_rounds(args.rounds, writers=args.writers, workdir=Path(tmp))
        root = Path(tmp) / "ix"
        proc, port, _ = start_server(root)
        try:
            before = snapshot(port)
            fuzzed = fuzz(port, args.fuzz)
            unchanged = snapshot(port) == before
        finally:
            proc.kill()
            proc.wait()
    report = {"crash": crash, "fuzz": fuzzed, "fuzz_results_unchanged": unchanged,
              "date": time.strftime("%Y-%m-%d"), "host": os.uname().nodename}
    args.out.write_text(json.dumps({"stamp": stamp(), "result": report}, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
