"""A Milvus that goes away under `serve --index milvus://...`, while 3 writers and 2 readers call the latenthash
server: the suite's real Milvus server reached through a link that the test cuts (every connection reset, new ones
refused) and restores, and the same server killed with SIGKILL and started again on its data, ROUNDS times each:
3 in the suite (a kill and restart takes 16-76 s), LATENTHASH_OUTAGE_ROUNDS=10 for the figures on the results page.
While Milvus is gone every call ends UNAVAILABLE or DEADLINE_EXCEEDED within its deadline (never INTERNAL, never a
hang) and health is NOT_SERVING; once it is back the same latenthash process serves again, and every acknowledged
upsert is in Milvus with its content.

A restarted Milvus may listen on another port (see milvus_server.restart): the link in front of it follows, as a
service address or load balancer would."""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from extras import need

need("pymilvus", "milvus")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import milvus_server  # noqa: E402
from cuttable import CuttableLink  # noqa: E402

from latenthash import open_index  # noqa: E402
from latenthash.client import Client  # noqa: E402
from latenthash.errors import LatentHashError, Unavailable  # noqa: E402
from latenthash.server.app import ServerConfig, create_server  # noqa: E402

BITS, DIM, DEADLINE = 48, 8, 4.0
ROUNDS = int(os.environ.get("LATENTHASH_OUTAGE_ROUNDS", "3"))


def health(port: int) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="latenthash.v1.HashSearch"), timeout=3).status


def within(seconds: float, condition) -> bool:
    """Whether `condition()` holds within `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def reaches(port: int, status: int, within: float) -> bool:
    """Whether the server's health shows `status` within `within` seconds."""
    deadline = time.monotonic() + within
    while health(port) != status:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class Load:
    """3 writers and 2 readers calling the latenthash server on `port` until the block ends: the upserts it
    acknowledged (id -> code), the answers that were wrong (any error but UNAVAILABLE / DEADLINE_EXCEEDED, or a call
    past its deadline + 1 s), and how many calls succeeded or were unavailable."""

    def __init__(self, port: int):
        self.port = port
        self.acked: dict[int, bytes] = {}
        self.wrong: list[str] = []
        self.counts = {"ok": 0, "unavailable": 0}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._writer, args=(w,)) for w in range(3)]
        self._threads += [threading.Thread(target=self._reader, args=(r,)) for r in range(2)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _call(self, fn):
        t0 = time.monotonic()
        try:
            out = fn()
            self.counts["ok"] += 1
            return out
        except LatentHashError as exc:
            if not isinstance(exc, Unavailable):  # DeadlineExceeded is one
                self.wrong.append(f"{type(exc).__name__}: {exc}")
            self.counts["unavailable"] += 1
        finally:
            if time.monotonic() - t0 > DEADLINE + 1:
                self.wrong.append(f"a call took {time.monotonic() - t0:.1f} s, past its {DEADLINE:g} s deadline")
        return None

    def _writer(self, w: int) -> None:
        rng = np.random.default_rng(w)
        with Client(f"127.0.0.1:{self.port}", timeout=DEADLINE, retries=0) as c:
            for i in range(w * 100_000, w * 100_000 + 100_000):
                if self._stop.is_set():
                    return
                code = np.packbits(rng.random((1, BITS)) < 0.5, axis=1)
                if self._call(lambda: c.upsert([i], codes=code, features=rng.standard_normal((1, DIM)))) is not None:
                    self.acked[i] = code.tobytes()
                time.sleep(0.02)

    def _reader(self, r: int) -> None:
        rng = np.random.default_rng(100 + r)
        with Client(f"127.0.0.1:{self.port}", timeout=DEADLINE, retries=0) as c:
            while not self._stop.is_set():
                self._call(lambda: c.search(codes=rng.random((1, BITS)) < 0.5, k=5))
                time.sleep(0.02)

    def check(self, real: str) -> None:
        """Nothing wrong, both outcomes seen, and every acknowledged upsert in Milvus with its code."""
        assert self.wrong == [], self.wrong[:5]
        assert self.counts["unavailable"] > 0 and self.counts["ok"] > 0
        direct = open_index(real)
        ids = np.fromiter(self.acked, np.int64)
        got = direct.get(ids)  # NotFound if any acknowledged item is missing
        assert dict(zip(got.ids.tolist(), (c.tobytes() for c in got.codes))) == self.acked
        direct.close()


def serve_through_link(milvus_uri: str):
    """A new collection, a link in front of Milvus, and a latenthash server whose index goes through the link."""
    real = f"{milvus_uri}/outage_{uuid.uuid4().hex[:8]}"
    open_index(real, bits=BITS, feature_dim=DIM, create=True).close()
    milvus_port = milvus_uri.rsplit(":", 1)[1]
    link = CuttableLink(int(milvus_port))
    server, port = create_server(ServerConfig(index=real.replace(milvus_port, str(link.port), 1) + "?timeout=2",
                                              port=0))
    return real, link, server, port


def test_milvus_outages_under_load(milvus_server_uri):
    from grpc_health.v1 import health_pb2

    real, link, server, port = serve_through_link(milvus_server_uri)
    seen_down = seen_up = resumed = 0
    try:
        with Load(port) as load:
            for _ in range(ROUNDS):
                time.sleep(1.5)
                link.cut()
                seen_down += reaches(port, health_pb2.HealthCheckResponse.NOT_SERVING, within=10)
                time.sleep(1.0)
                link.restore()
                seen_up += reaches(port, health_pb2.HealthCheckResponse.SERVING, within=20)
                served = load.counts["ok"]
                resumed += within(30, lambda: load.counts["ok"] >= served + 20)  # calls succeed again
            time.sleep(2.0)
    finally:
        server.stop(2)
        link.close()
    assert seen_down == seen_up == resumed == ROUNDS  # health followed every outage and every return
    load.check(real)


def test_milvus_killed_and_restarted_under_load(milvus_server_uri):
    """SIGKILL to Milvus's whole process group, then a start on its data, 10 times; the last restart waits for the
    original port so the rest of the suite finds the server where it was."""
    from grpc_health.v1 import health_pb2

    if milvus_server_uri not in milvus_server.RUNNING:
        pytest.skip("Milvus was not started by this suite (LATENTHASH_MILVUS_URI): it cannot be killed here")
    real, link, server, port = serve_through_link(milvus_server_uri)
    seen_down = seen_up = resumed = 0
    gone: list[float] = []
    try:
        with Load(port) as load:
            for i in range(ROUNDS):
                served = load.counts["ok"]
                resumed += within(60, lambda: load.counts["ok"] >= served + 20)  # calls succeed (again)
                t0 = time.monotonic()
                milvus_server.kill(milvus_server_uri)
                link.cut()  # the connections to the dead server go with it
                seen_down += reaches(port, health_pb2.HealthCheckResponse.NOT_SERVING, within=10)
                link.target = milvus_server.restart(milvus_server_uri, same_port=i == ROUNDS - 1)
                link.restore()
                seen_up += reaches(port, health_pb2.HealthCheckResponse.SERVING, within=120)
                gone.append(time.monotonic() - t0)
            served = load.counts["ok"]
            resumed += within(60, lambda: load.counts["ok"] >= served + 20)
    finally:
        server.stop(2)
        link.close()
    print(f"Milvus killed {ROUNDS} times: health SERVING again {min(gone):.0f}-{max(gone):.0f} s after the kill; "
          f"calls {load.counts}; {len(load.acked)} upserts acknowledged")
    assert seen_down == seen_up == ROUNDS and resumed == ROUNDS + 1  # calls succeeded before each kill and after
    assert link.target == int(milvus_server_uri.rsplit(":", 1)[1])
    load.check(real)
