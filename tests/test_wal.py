"""The write-ahead log's replay restores exactly what was written: every code byte, feature, metadata value and the
order of overwrites and deletes (a recovery that only counted ids would pass with any of those wrong)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_same_items

from latenthash import HashIndex
from latenthash.codes import pack_codes
from latenthash.server.wal import FILE_MAGIC, FRAME, WriteAheadLog

BITS, DIM = 48, 16


def operations(rng) -> list[tuple]:
    """Upserts (with overwrites of earlier ids, nested and absent metadata) and deletes, interleaved."""
    ops: list[tuple] = []
    for step in range(12):
        if step % 4 == 3:
            ops.append(("delete", rng.choice(40, 5, replace=False).astype(np.int64)))
            continue
        n = int(rng.integers(1, 9))
        ids = rng.choice(40, n, replace=False).astype(np.int64)  # ids recur: later writes replace earlier ones
        codes = pack_codes(rng.random((n, BITS)) < 0.5, BITS)
        feats = rng.standard_normal((n, DIM)).astype(np.float32)
        meta = [None if j % 3 == 0 else json.dumps({"step": step, "j": j, "tags": ["a", {"b": [j, None]}]})
                for j in range(n)]
        ops.append(("upsert", ids, codes, feats, meta))
    return ops


def apply(index: HashIndex, op: tuple) -> None:
    if op[0] == "delete":
        index.remove(op[1])
    else:
        _, ids, codes, feats, meta = op
        index.add(ids, codes, feats, [None if m is None else json.loads(m) for m in meta])


def log_ops(path, ops) -> None:
    wal = WriteAheadLog(path)
    for op in ops:
        if op[0] == "delete":
            wal.append_delete(op[1])
        else:
            wal.append_upsert(*op[1:])
    wal.close()


@pytest.fixture
def ops(rng):
    return operations(rng)


def new_index() -> HashIndex:
    return HashIndex(bits=BITS, feature_dim=DIM, feature_dtype="float32")


def test_replay_restores_exact_content_in_order(tmp_path, ops):
    log_ops(tmp_path / "wal.log", ops)
    direct, replayed = new_index(), new_index()
    for op in ops:
        apply(direct, op)
    assert WriteAheadLog(tmp_path / "wal.log").replay(replayed) == len(ops)
    assert len(direct) > 0
    assert_same_items(direct, replayed)
    # the order matters: applying the same records backwards gives another index (so the check above can fail)
    backwards = new_index()
    for op in reversed(ops):
        apply(backwards, op)
    with pytest.raises(AssertionError):
        assert_same_items(direct, backwards)


def test_a_record_with_a_flipped_byte_is_not_applied(tmp_path, ops):
    """A payload byte flipped inside one upsert (its header intact): that record is dropped by its checksum, the
    others replay with their exact content."""
    path = tmp_path / "wal.log"
    log_ops(path, ops)
    data = bytearray(path.read_bytes())
    pos, starts = len(FILE_MAGIC), []
    while pos < len(data):
        starts.append(pos)
        pos += FRAME.size + FRAME.unpack_from(data, pos)[1]
    victim = 1  # the second record, an upsert
    assert ops[victim][0] == "upsert"
    data[starts[victim] + FRAME.size + 5 + 8 * len(ops[victim][1]) + 3] ^= 0x01  # a byte of its codes
    path.write_bytes(bytes(data))
    expected, replayed = new_index(), new_index()
    for i, op in enumerate(ops):
        if i != victim:
            apply(expected, op)
    assert WriteAheadLog(path).replay(replayed) == len(ops) - 1
    assert_same_items(expected, replayed)
