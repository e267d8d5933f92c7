"""Durability, restarts, stops and hostile input, each case of issue 17 as it was seen failing: real server
processes killed with SIGKILL, real log files torn and damaged, malformed bytes on every RPC (the harness lives in
benchmarks/reliability.py, whose long settings write benchmarks/results/reliability.json)."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import reliability as harness  # noqa: E402

from latenthash.errors import InvalidInput, StorageFull, StorageUnavailable  # noqa: E402
from latenthash.limits import MAX_METADATA_BYTES  # noqa: E402
from latenthash.server.app import ServerConfig, create_server  # noqa: E402
from latenthash.server.wal import FILE_MAGIC, WriteAheadLog, encode_delete, frame  # noqa: E402
from latenthash.v1 import search_pb2 as pb  # noqa: E402
from latenthash.v1 import search_pb2_grpc as pb_grpc  # noqa: E402

BITS, DIM = harness.BITS, harness.DIM


def item(i: int, meta: str = "") -> pb.UpsertItem:
    rng = np.random.default_rng(i)
    return pb.UpsertItem(id=i, code=rng.integers(0, 256, BITS // 8, dtype=np.uint8).tobytes(),
                         feature=rng.standard_normal(DIM).tolist(), metadata_json=meta or json.dumps({"i": i}))


@pytest.fixture
def root(tmp_path) -> Path:
    harness.make_index(tmp_path / "ix")
    return tmp_path / "ix"


class Proc:
    """A codes-only server process on the index at root (see harness.start_server)."""

    def __init__(self, root: Path, **kw):
        self.proc, self.port, self.start_s = harness.start_server(root, **kw)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.HashSearchStub(self.channel)

    def kill(self) -> None:
        self.channel.close()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def ids(self, ids) -> list[int]:
        return [it.id for it in self.stub.Get(pb.GetRequest(ids=list(ids)), timeout=10).items]


def test_torn_tail_does_not_hide_later_writes(root):
    """Issue 17 case 1: upsert 7001, kill -9, a partial frame at the log's end, restart, upsert 7002 and 7003, kill -9,
    restart: all three are there (the tail is cut off on open, so later frames are not appended after garbage)."""
    s = Proc(root)
    s.stub.Upsert(iter([item(7001)]), timeout=10)
    s.kill()
    whole = frame(encode_delete(np.arange(40, dtype=np.int64)))
    with open(root / "wal.log", "ab") as f:
        f.write(whole[:23])
    s = Proc(root)
    s.stub.Upsert(iter([item(7002)]), timeout=10)
    s.stub.Upsert(iter([item(7003)]), timeout=10)
    s.kill()
    with open(root / "wal.log", "ab") as f:
        f.write(whole[:5])
    s = Proc(root)
    try:
        assert s.ids([7001, 7002, 7003]) == [7001, 7002, 7003]
        got = s.stub.Get(pb.GetRequest(ids=[7002]), timeout=10).items[0]
        assert got.code == item(7002).code and json.loads(got.metadata_json) == {"i": 7002}  # content, not just ids
        np.testing.assert_allclose(got.feature, np.asarray(item(7002).feature) / np.linalg.norm(item(7002).feature),
                                   atol=1e-6)
    finally:
        s.kill()


def test_torn_tail_is_cut_by_the_log_itself(root):
    """The same at the log's level, where no checkpoint on start empties the file first (a full disk keeps the
    log): appends after a torn tail follow the last whole frame, and nothing is reported damaged."""
    wal = WriteAheadLog(root / "wal.log")
    wal.append_delete(np.array([1]))
    wal.close()
    with open(root / "wal.log", "ab") as f:
        f.write(frame(encode_delete(np.arange(40, dtype=np.int64)))[:23])
    wal = WriteAheadLog(root / "wal.log")
    wal.append_delete(np.array([2]))
    wal.close()
    again = WriteAheadLog(root / "wal.log")
    assert [r.ids.tolist() for r in again.records()] == [[1], [2]] and again.found.damaged == []
    again.close()


def test_start_checkpoints_the_log_so_crashes_do_not_pile_up(root):
    """Case 4: after a crash the restarted server replays, saves the index and empties its log."""
    s = Proc(root)
    s.stub.Upsert(iter([item(i) for i in range(50)]), timeout=10)
    s.stub.Delete(pb.DeleteRequest(ids=[3, 4]), timeout=10)
    s.kill()
    assert (root / "wal.log").stat().st_size > 1000
    s = Proc(root)
    try:
        assert (root / "wal.log").read_bytes() == FILE_MAGIC
        assert s.stub.Stats(pb.StatsRequest(), timeout=10).count == 48
    finally:
        s.kill()


def test_deep_metadata_is_refused_before_the_log(root):
    """Case 2: nesting that exhausted the replay's recursion is INVALID_ARGUMENT at Upsert, and the server starts
    again after a crash. Case 8: metadata over the size limit and non-standard JSON are refused the same way."""
    s = Proc(root)
    try:
        for meta, match in [("[" * 980 + "]" * 980, "levels deep"), ("[" * 100_000 + "]" * 100_000, "bytes"),
                            (json.dumps({"x": "y" * MAX_METADATA_BYTES}), "MAX_METADATA_BYTES"),
                            ('{"x": NaN}', "NaN"), ('{"x": Infinity}', "Infinity"), ("{bad", "not valid JSON")]:
            with pytest.raises(grpc.RpcError) as info:
                s.stub.Upsert(iter([item(1), item(2, meta)]), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, meta[:20]
            assert match in info.value.details() and "request 1" in info.value.details()
        s.stub.Upsert(iter([item(5)]), timeout=10)
    finally:
        s.kill()
    s = Proc(root)
    try:
        assert s.stub.Stats(pb.StatsRequest(), timeout=10).count == 1
    finally:
        s.kill()


def test_damaged_records_are_reported_kept_and_skipped(root, caplog):
    """Case 3: a flipped byte inside one record loses that record only: the records after it are applied, the
    damage is logged as an error and the original log is kept beside it. Random bytes as the log, likewise."""
    wal = WriteAheadLog(root / "wal.log")
    for i in range(3):
        pkt = item(100 + i)
        codes = np.frombuffer(pkt.code, np.uint8)[None]
        wal.append_upsert(np.array([pkt.id]), codes, np.asarray(pkt.feature, np.float32)[None], [pkt.metadata_json])
    wal.close()
    data = bytearray((root / "wal.log").read_bytes())
    first_end = len(FILE_MAGIC) + (len(data) - len(FILE_MAGIC)) // 3
    data[first_end + 40] ^= 0x10  # inside the second record's payload
    (root / "wal.log").write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="latenthash.server"):
        server, port = create_server(ServerConfig(index=str(root), port=0))
    try:
        assert sorted(server.searcher.index.ids.tolist()) == [100, 102]
        assert any("wal_damaged" in r.getMessage() for r in caplog.records)
        kept = list(root.glob("wal.log.damaged-*"))
        assert len(kept) == 1 and kept[0].read_bytes() == bytes(data)
    finally:
        server.stop(1)
    for p in root.glob("wal.log*"):
        p.unlink()
    (root / "wal.log").write_bytes(random.Random(1).randbytes(5000))
    with caplog.at_level(logging.ERROR, logger="latenthash.server"):
        server, port = create_server(ServerConfig(index=str(root), port=0))
    server.stop(1)
    assert list(root.glob("wal.log.damaged-*")) and (root / "wal.log").read_bytes() == FILE_MAGIC


def test_failed_append_is_cut_back_and_refused(root, monkeypatch):
    """A full disk mid-append: the partial frame is removed, the error is StorageFull (RESOURCE_EXHAUSTED), and the
    next append (space freed) lands right after the last whole frame."""
    wal = WriteAheadLog(root / "wal.log")
    wal.append_delete(np.array([1]))
    good = (root / "wal.log").read_bytes()
    real = os.pwrite
    calls = []

    def full(fd, data, offset):
        if calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        calls.append(1)
        return real(fd, bytes(data)[:7], offset)  # a short write, then the disk is full

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(StorageFull, match="nothing of this request was stored"):
        wal.append_delete(np.array([2, 3]))
    monkeypatch.setattr(os, "pwrite", real)
    assert (root / "wal.log").read_bytes() == good
    wal.append_delete(np.array([4]))
    wal.close()
    assert [r.ids.tolist() for r in WriteAheadLog(root / "wal.log").records()] == [[1], [4]]


def test_crash_rounds_lose_nothing_acknowledged(tmp_path):
    """kill -9 under three concurrent writers, torn tails every third round, a full disk every fifth: every
    acknowledged item is there with its content after every restart (the long run: benchmarks/reliability.py)."""
    report = harness.crash_rounds(10, workdir=tmp_path, log=lambda *a: None)
    assert report["rounds_with_loss"] == []
    assert report["acknowledged_items"] > 1000 and report["torn_tails"] == 3 and report["full_disk_rounds"] == 2
    assert "RESOURCE_EXHAUSTED" in report["refused"] and "INTERNAL" not in report["refused"]
    assert report["restart_s_max"] < 30


def test_fuzz_every_rpc_no_internal_no_hang(root):
    """Case 9: 2,000 malformed messages over every RPC (ours, health, reflection): INVALID_ARGUMENT or a proper
    answer, never INTERNAL or UNKNOWN, no call over 5 s, and the server's answers unchanged afterwards."""
    s = Proc(root)
    try:
        s.stub.Upsert(iter([item(10**9 + i) for i in range(200)]), timeout=10)  # ids no short random varint hits
        before = harness.snapshot(s.port)
        report = harness.fuzz(s.port, 2000, seed=3)
        assert report["internal_or_unknown"] == [] and report["hangs_over_s"] == 0
        assert report["codes"]["INVALID_ARGUMENT"] > 1500
        assert s.proc.poll() is None and harness.snapshot(s.port) == before
    finally:
        s.kill()


def test_sigterm_ends_within_grace_whatever_the_streams_do(root, tmp_path):
    """Case 5: a malformed message on SearchStream and on reflection, both streams left open by the client, then
    SIGTERM: `latenthash serve` exits within grace + 5 s, with the index checkpointed."""
    proc = subprocess.Popen([sys.executable, "-m", "latenthash.cli", "serve", "--index", str(root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(harness._readline(proc, 30).rsplit(":", 1)[1])
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        pb_grpc.HashSearchStub(channel).Upsert(iter([item(9)]), timeout=10)
        identity = lambda b: b  # noqa: E731
        hold = []
        for path in ("/latenthash.v1.HashSearch/SearchStream",
                     "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
            call = channel.stream_stream(path, request_serializer=identity, response_deserializer=identity)
            gate = __import__("threading").Event()

            def requests(gate=gate):
                yield b"\xff\xff\xff"
                gate.wait(60)  # never closes its side

            hold.append((call(requests(), timeout=60), gate))
        time.sleep(0.5)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10 + 5)  # the CLI's grace is 10 s
        assert time.perf_counter() - t0 < 15
        for _, gate in hold:
            gate.set()
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (root / "wal.log").read_bytes() == FILE_MAGIC
    from latenthash import HashIndex

    assert HashIndex.open(root).ids.tolist() == [9]


def test_empty_token_is_refused_and_a_second_server_on_one_index_too(root):
    """Case 10: an empty token would turn authentication off silently. Case 11: two processes writing one index."""
    with pytest.raises(InvalidInput, match="token is empty"):
        create_server(ServerConfig(index=str(root), port=0, token=""))
    for flag, env in (([], {"LATENTHASH_TOKEN": ""}), (["--token", ""], {})):
        proc = subprocess.run([sys.executable, "-m", "latenthash.cli", "serve", "--index", str(root), "--port", "0",
                               *flag], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "token is empty" in proc.stderr and "Traceback" not in proc.stderr
    s = Proc(root)
    try:
        with pytest.raises(StorageUnavailable, match="in use by another process"):
            create_server(ServerConfig(index=str(root), port=0))
    finally:
        s.kill()


def test_missing_index_is_refused_unless_created(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "latenthash.cli", "serve", "--index", str(tmp_path / "typo"),
                           "--port", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no index at" in proc.stderr and "--create" in proc.stderr
    assert not (tmp_path / "typo").exists()


def test_interrupted_index_run_commits_nothing_and_reruns(onnx_model, tmp_path, monkeypatch):
    """Case 13: an index run stopped midway (Ctrl-C) left a committed empty index that refused the rerun."""
    from typer.testing import CliRunner

    import latenthash.ingest
    from latenthash.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    args = ["index", "--model", str(onnx_model), "--out", str(tmp_path / "ix"), "--limit", "300"]
    monkeypatch.setattr(latenthash.ingest, "add_images", interrupted)
    CliRunner().invoke(app, args)
    assert not (tmp_path / "ix" / "CURRENT").exists()
    monkeypatch.undo()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    from latenthash import HashIndex

    assert len(HashIndex.open(tmp_path / "ix")) == 300
