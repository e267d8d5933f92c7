"""Write-ahead log: nothing the service acknowledges is lost, on shutdown or on a crash.

Every Upsert and Delete is appended here and fsynced *before* it is applied to the in-memory index and before the
client gets its response. On start the log is replayed onto the saved index; a checkpoint (saving the index) lets
the log be truncated. Re-applying a record is harmless (upserts replace by id, deletes of absent ids do nothing),
so a crash between a save and the truncation loses nothing either. A torn record at the tail (a crash mid-write,
never acknowledged) is dropped.

Record: u32 length, u32 crc32 of the payload, payload = JSON header line + packed codes + float32 features.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

FRAME = struct.Struct("<II")


class WriteAheadLog:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file = open(self.path, "ab")

    def append_upsert(self, ids: np.ndarray, codes: np.ndarray, features: np.ndarray | None,
                      metadata: list[Any] | None) -> None:
        header = {"op": "upsert", "ids": ids.tolist(), "code_shape": list(codes.shape),
                  "feature_shape": list(features.shape) if features is not None else None, "metadata": metadata}
        body = codes.astype(np.uint8).tobytes() + (features.astype(np.float32).tobytes() if features is not None
                                                   else b"")
        self._append(json.dumps(header).encode() + b"\n" + body)

    def append_delete(self, ids: np.ndarray) -> None:
        self._append(json.dumps({"op": "delete", "ids": ids.tolist()}).encode() + b"\n")

    def _append(self, payload: bytes) -> None:
        with self._lock:
            self._file.write(FRAME.pack(len(payload), zlib.crc32(payload)) + payload)
            self._file.flush()
            os.fsync(self._file.fileno())

    def records(self) -> Iterator[dict]:
        """Complete, intact records in order; stops at the first torn or corrupt one."""
        data = self.path.read_bytes() if self.path.exists() else b""
        pos = 0
        while pos + FRAME.size <= len(data):
            length, crc = FRAME.unpack_from(data, pos)
            payload = data[pos + FRAME.size: pos + FRAME.size + length]
            if len(payload) < length or zlib.crc32(payload) != crc:
                return
            pos += FRAME.size + length
            head, _, body = payload.partition(b"\n")
            record = json.loads(head)
            if record["op"] == "upsert":
                n_code = int(np.prod(record["code_shape"]))
                record["codes"] = np.frombuffer(body[:n_code], np.uint8).reshape(record["code_shape"])
                record["features"] = (np.frombuffer(body[n_code:], np.float32).reshape(record["feature_shape"])
                                      if record["feature_shape"] else None)
            yield record

    def replay(self, index) -> int:
        """Apply the log to an index; returns the number of records applied."""
        n = 0
        for rec in self.records():
            ids = np.asarray(rec["ids"], dtype=np.int64)
            if rec["op"] == "upsert":
                index.add(ids, rec["codes"], rec["features"], rec["metadata"])
            else:
                index.remove(ids)
            n += 1
        return n

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self) -> None:
        with self._lock:
            self._file.truncate(0)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
