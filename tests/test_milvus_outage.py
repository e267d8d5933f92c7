"""A Milvus that goes away under `serve --index milvus://...`: the suite's real Milvus server reached through a link
that the test cuts (every connection reset, new ones refused) and restores, 10 times, while 3 writers and 2 readers
call the latenthash server. While Milvus is gone every call ends UNAVAILABLE or DEADLINE_EXCEEDED within its
deadline (never INTERNAL, never a hang) and health is NOT_SERVING; once it is back the same server process serves
again, and every acknowledged upsert is in Milvus with its content.

(Killing Milvus itself with SIGKILL was tried: the `milvus` package's Milvus 2.3.5-lite was not ready again 3
minutes after a restart on its data, waiting on the dead node's sessions, so the outage is made in the network.)"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
from extras import need

need("pymilvus", "milvus")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from cuttable import CuttableLink  # noqa: E402

from latenthash import open_index  # noqa: E402
from latenthash.client import Client  # noqa: E402
from latenthash.errors import LatentHashError, Unavailable  # noqa: E402
from latenthash.server.app import ServerConfig, create_server  # noqa: E402

BITS, DIM, DEADLINE, CUTS = 48, 8, 4.0, 10


def health(port: int) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="latenthash.v1.HashSearch"), timeout=3).status


def reaches(port: int, status: int, within: float) -> bool:
    """Whether the server's health shows `status` within `within` seconds."""
    deadline = time.monotonic() + within
    while health(port) != status:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_milvus_outages_under_load(milvus_server_uri):
    from grpc_health.v1 import health_pb2

    real = f"{milvus_server_uri}/outage_{uuid.uuid4().hex[:8]}"
    open_index(real, bits=BITS, feature_dim=DIM, create=True).close()
    link = CuttableLink(int(milvus_server_uri.rsplit(":", 1)[1]))
    server, port = create_server(ServerConfig(index=real.replace(milvus_server_uri.rsplit(":", 1)[1],
                                                                 str(link.port), 1) + "?timeout=2", port=0))
    acked: dict[int, bytes] = {}
    wrong: list[str] = []
    counts = {"ok": 0, "unavailable": 0}
    stop = threading.Event()

    def call(fn):
        t0 = time.monotonic()
        try:
            out = fn()
            counts["ok"] += 1
            return out
        except LatentHashError as exc:
            if not isinstance(exc, Unavailable):
                wrong.append(f"{type(exc).__name__}: {exc}")
            counts["unavailable"] += 1
        finally:
            if time.monotonic() - t0 > DEADLINE + 1:
                wrong.append(f"a call took {time.monotonic() - t0:.1f} s, past its {DEADLINE:g} s deadline")
        return None

    def writer(w: int):
        rng = np.random.default_rng(w)
        with Client(f"127.0.0.1:{port}", timeout=DEADLINE, retries=0) as c:
            for i in range(w * 100_000, w * 100_000 + 100_000):
                if stop.is_set():
                    return
                code = np.packbits(rng.random((1, BITS)) < 0.5, axis=1)
                if call(lambda: c.upsert([i], codes=code, features=rng.standard_normal((1, DIM)))) is not None:
                    acked[i] = code.tobytes()
                time.sleep(0.02)

    def reader(r: int):
        rng = np.random.default_rng(100 + r)
        with Client(f"127.0.0.1:{port}", timeout=DEADLINE, retries=0) as c:
            while not stop.is_set():
                call(lambda: c.search(codes=rng.random((1, BITS)) < 0.5, k=5))
                time.sleep(0.02)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    threads += [threading.Thread(target=reader, args=(r,)) for r in range(2)]
    seen_down = seen_up = 0
    try:
        for t in threads:
            t.start()
        for _ in range(CUTS):
            time.sleep(1.5)
            link.cut()
            seen_down += reaches(port, health_pb2.HealthCheckResponse.NOT_SERVING, within=10)
            time.sleep(1.0)
            link.restore()
            seen_up += reaches(port, health_pb2.HealthCheckResponse.SERVING, within=20)
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        server.stop(2)
        link.close()
    assert wrong == [], wrong[:5]
    assert seen_down == seen_up == CUTS  # health followed every outage and every return
    assert counts["unavailable"] > 0 and counts["ok"] > 0
    direct = open_index(real)
    ids = np.fromiter(acked, np.int64)
    got = direct.get(ids)  # NotFound if any acknowledged item is missing
    assert dict(zip(got.ids.tolist(), (c.tobytes() for c in got.codes))) == acked
    direct.close()
