"""Scoped tokens on a real `latenthash serve` process: read and write scopes, the file reloaded on SIGHUP while a
stream opened before the reload keeps streaming, constant-time comparison of every token, tokens from the
environment."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import reliability as harness  # noqa: E402

from latenthash.client import Client  # noqa: E402
from latenthash.errors import InvalidInput, PermissionDenied, Unauthenticated  # noqa: E402
from latenthash.server.auth import Tokens, read_token_file  # noqa: E402
from latenthash.v1 import search_pb2 as pb  # noqa: E402
from latenthash.v1 import search_pb2_grpc as pb_grpc  # noqa: E402

BITS, DIM = harness.BITS, harness.DIM


def codes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8),
            rng.standard_normal((n, DIM)).astype(np.float32))


def test_token_file_is_checked_line_by_line(tmp_path):
    path = tmp_path / "tokens"
    for text, match in (("", "names no token"), ("abc read\n", "guessable"), (f"{'x' * 20} admin\n", "line 1"),
                        (f"# staff\n\n{'x' * 20} read extra\n", "line 3")):
        path.write_text(text)
        with pytest.raises(InvalidInput, match=match):
            read_token_file(path)
    path.write_text(f"{'r' * 20} read  # the camera app\n{'w' * 20} write\n")
    tokens = Tokens("fixed-write-token", path)
    assert [tokens.scope_of(f"Bearer {t}") for t in ("r" * 20, "w" * 20, "fixed-write-token", "r" * 19, "")] == \
        ["read", "write", "write", None, None]
    assert tokens.scope_of("r" * 20) is None  # no "Bearer " prefix: not a bearer token


def test_scopes_and_reload_on_sighup(tmp_path):
    """A read token searches and is PERMISSION_DENIED on Upsert and Delete; a write token does both; an unknown
    token is UNAUTHENTICATED. After the file is edited and SIGHUP sent, the removed token is refused and the new
    one accepted, while a SearchStream opened before the reload keeps streaming."""
    root, path = tmp_path / "ix", tmp_path / "tokens"
    harness.make_index(root)
    reader, writer, newcomer = (secrets.token_urlsafe(24) for _ in range(3))
    path.write_text(f"{reader} read\n{writer} write\n")
    proc = subprocess.Popen([sys.executable, "-m", "latenthash.cli", "serve", "--index", str(root), "--port", "0",
                             "--tokens", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(harness._readline(proc, 60).rsplit(":", 1)[1])
        target = f"127.0.0.1:{port}"
        c, f = codes(20)
        with Client(target, token=writer) as w, Client(target, token=reader) as r, Client(target) as anonymous:
            assert w.upsert(np.arange(20), codes=c, features=f) == (20, 0)
            assert r.search(codes=c[:1], k=3).ids[0, 0] == 0 and r.stats().count == 20
            assert r.get([1]).ids.tolist() == [1]
            with pytest.raises(PermissionDenied, match="needs a write token"):
                r.upsert([99], codes=c[:1], features=f[:1])
            with pytest.raises(PermissionDenied):
                r.delete([1])
            with pytest.raises(Unauthenticated):
                anonymous.search(codes=c[:1], k=3)
            assert w.delete([19]) == (1, 0)

            # a stream opened with the reader's token before the reload
            channel = grpc.insecure_channel(target)
            sent, stop = [], threading.Event()

            def requests():
                for i in range(10_000):
                    if stop.is_set():
                        return
                    sent.append(i)
                    yield pb.SearchRequest(query=pb.Query(code=c[i % 19].tobytes()), k=2)
                    time.sleep(0.01)

            stream = pb_grpc.HashSearchStub(channel).SearchStream(requests(), timeout=60,
                                                                 metadata=(("authorization", f"Bearer {reader}"),))
            answers = []
            before = threading.Thread(target=lambda: answers.extend(r.hits for r in stream), daemon=True)
            before.start()
            time.sleep(0.5)

            path.write_text(f"{writer} write\n{newcomer} read\n")  # the reader is removed, a newcomer added
            proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 10
            while time.time() < deadline:
                try:
                    r.stats()
                    time.sleep(0.1)
                except Unauthenticated:
                    break
            with pytest.raises(Unauthenticated):
                r.search(codes=c[:1], k=3)
            with Client(target, token=newcomer) as n:
                assert n.search(codes=c[:1], k=3).ids[0, 0] == 0
            streamed_at_reload = len(answers)
            time.sleep(0.5)
            stop.set()
            before.join(10)
            assert len(answers) > streamed_at_reload > 0  # the stream admitted before the reload ran on
            assert all(len(hits) == 2 for hits in answers)
            channel.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    log = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "tokens_reloaded" and e.get("tokens") == 2 for e in log)


def test_client_takes_its_token_from_the_environment(tmp_path, monkeypatch):
    from latenthash.server.app import ServerConfig, create_server

    root = tmp_path / "ix"
    harness.make_index(root)
    token = secrets.token_urlsafe(24)
    server, port = create_server(ServerConfig(index=str(root), port=0, token=token))
    try:
        with Client(f"127.0.0.1:{port}") as c:
            with pytest.raises(Unauthenticated):
                c.stats()
        monkeypatch.setenv("LATENTHASH_TOKEN", token)
        with Client(f"127.0.0.1:{port}") as c:
            assert c.stats().count == 0
    finally:
        server.stop(1)
