"""Write-ahead log: nothing the service acknowledges is lost, on shutdown, on a crash or on a full disk.

Every Upsert and Delete is validated, then appended here and fsynced *before* it is applied to the index and
before the client gets its response. On start the log is replayed onto the saved index and checkpointed (the index
saved, the log emptied), so crashes never pile up log to replay. Re-applying a record is harmless (upserts replace
by id, deletes of absent ids do nothing), so a crash between a save and the truncation loses nothing either.

File: an 8-byte magic, then frames. Frame: magic u32, payload length u32, crc32 of those 8 bytes u32, crc32 of the
payload u32, payload. Payload (little-endian, no text parsing, so replaying it cannot fail on what was accepted):
op u8 (1 upsert, 2 delete, 3 upsert with copy descriptors), n u32, ids int64[n]; an upsert adds code bytes u16,
codes u8[n x bytes], feature dim u32, features f32[n x dim], with op 3 copy dim u32 and copy descriptors
f32[n x dim] (a zero row: none), then per item a metadata length u32 (0xFFFFFFFF: none) and its JSON text.

What opening finds at the end of the file and in it:
- a torn tail, the prefix of a frame that a crash or a full disk cut short (never acknowledged), is cut off;
- a damaged frame (a checksum that fails anywhere else) is skipped, the intact frames after it are still read, the
  original file is kept as `wal.log.damaged-<time>` and the damage is logged as an error: never dropped silently.
A failed append (disk full, read-only) cuts the file back to its last whole frame before the error is raised.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from latenthash.errors import storage_error
from latenthash.storage import fsync_dir

log = logging.getLogger("latenthash.server")
FILE_MAGIC = b"LHWAL2\r\n"
FRAME_MAGIC = 0x4C485752  # "LHWR"
FRAME = struct.Struct("<IIII")  # magic, length, header crc, payload crc
UPSERT, DELETE, UPSERT_COPIES = 1, 2, 3
NO_METADATA = 0xFFFFFFFF
MAX_PAYLOAD = 1 << 31


@dataclass
class Record:
    op: int
    ids: np.ndarray
    codes: np.ndarray | None = None  # packed uint8 (n, bytes)
    features: np.ndarray | None = None  # float32 (n, dim)
    metadata: list[str | None] | None = None  # JSON text per item
    copies: np.ndarray | None = None  # float32 (n, copy dim): copy descriptors (zero rows: none)


@dataclass
class Scan:
    """What reading the log found: intact records, damaged byte ranges, where the intact data ends."""

    records: list[Record] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # where each intact record's frame lies
    damaged: list[tuple[int, int]] = field(default_factory=list)
    end: int = len(FILE_MAGIC)  # the end of the last whole frame: anything after it is a torn tail
    size: int = 0


def encode_upsert(ids: np.ndarray, codes: np.ndarray, features: np.ndarray | None, metadata: list[str | None],
                  copies: np.ndarray | None = None) -> bytes:
    n, nb = codes.shape
    parts = [struct.pack("<BI", UPSERT if copies is None else UPSERT_COPIES, n),
             np.ascontiguousarray(ids, "<i8").tobytes(), struct.pack("<H", nb),
             np.ascontiguousarray(codes, np.uint8).tobytes()]
    for rows in (features, copies) if copies is not None else (features,):
        parts.append(struct.pack("<I", 0 if rows is None else rows.shape[1]))
        if rows is not None:
            parts.append(np.ascontiguousarray(rows, "<f4").tobytes())
    for text in metadata:
        if text is None:
            parts.append(struct.pack("<I", NO_METADATA))
        else:
            raw = text.encode("utf-8")
            parts += [struct.pack("<I", len(raw)), raw]
    return b"".join(parts)


def encode_delete(ids: np.ndarray) -> bytes:
    return struct.pack("<BI", DELETE, len(ids)) + np.ascontiguousarray(ids, "<i8").tobytes()


def decode(payload: bytes) -> Record:
    """A payload back into a record; ValueError (or struct.error) if it does not parse to the end exactly."""
    op, n = struct.unpack_from("<BI", payload, 0)
    pos = 5
    ids = np.frombuffer(payload, "<i8", n, pos).astype(np.int64)
    pos += 8 * n
    if op == DELETE:
        rec = Record(DELETE, ids)
    elif op in (UPSERT, UPSERT_COPIES):
        (nb,) = struct.unpack_from("<H", payload, pos)
        pos += 2
        codes = np.frombuffer(payload, np.uint8, n * nb, pos).reshape(n, nb)
        pos += n * nb
        blocks: list[np.ndarray | None] = []
        for _ in range(2 if op == UPSERT_COPIES else 1):  # features, then copy descriptors
            (dim,) = struct.unpack_from("<I", payload, pos)
            pos += 4
            blocks.append(np.frombuffer(payload, "<f4", n * dim, pos).astype(np.float32).reshape(n, dim)
                          if dim else None)
            pos += 4 * n * dim
        features, copies = blocks[0], blocks[1] if len(blocks) > 1 else None
        metadata: list[str | None] = []
        for _ in range(n):
            (size,) = struct.unpack_from("<I", payload, pos)
            pos += 4
            if size == NO_METADATA:
                metadata.append(None)
                continue
            metadata.append(payload[pos:pos + size].decode("utf-8"))
            pos += size
        rec = Record(UPSERT, ids, codes, features, metadata, copies)
    else:
        raise ValueError(f"unknown operation {op}")
    if pos != len(payload):
        raise ValueError(f"{len(payload) - pos} bytes left over")
    return rec


def frame(payload: bytes) -> bytes:
    head = struct.pack("<II", FRAME_MAGIC, len(payload))
    return head + struct.pack("<II", zlib.crc32(head), zlib.crc32(payload)) + payload


def scan(data: bytes) -> Scan:
    """Read a whole log: records of the intact frames, damaged ranges, and the end of the last whole frame."""
    out = Scan(size=len(data))
    if FILE_MAGIC.startswith(data):  # empty, or a crash while the file was being created
        out.end = 0
        return out
    pos = len(FILE_MAGIC)
    if not data.startswith(FILE_MAGIC):
        pos = out.end = _next_frame(data, 0)
        out.damaged.append((0, pos))
    while pos < len(data):
        header = _frame_header(data, pos)
        if header is None:  # no frame starts here
            if len(data) - pos < FRAME.size and _could_start_frame(data[pos:]):
                break  # torn tail: a frame header cut short
            nxt = _next_frame(data, pos + 1)
            out.damaged.append((pos, nxt))
            pos = out.end = nxt
            continue
        length, crc = header
        stop = pos + FRAME.size + length
        if stop > len(data):
            break  # torn tail: the payload cut short
        payload = data[pos + FRAME.size:stop]
        try:
            if zlib.crc32(payload) != crc:
                raise ValueError("checksum")
            out.records.append(decode(payload))
            out.spans.append((pos, stop))
        except (ValueError, struct.error, UnicodeDecodeError):
            out.damaged.append((pos, stop))
        pos = out.end = stop
    return out


def _frame_header(data: bytes, pos: int) -> tuple[int, int] | None:
    if len(data) - pos < FRAME.size:
        return None
    magic, length, head_crc, crc = FRAME.unpack_from(data, pos)
    if magic != FRAME_MAGIC or head_crc != zlib.crc32(data[pos:pos + 8]) or length > MAX_PAYLOAD:
        return None
    return length, crc


def _could_start_frame(tail: bytes) -> bool:
    magic = struct.pack("<I", FRAME_MAGIC)
    return magic.startswith(tail[:4]) and (len(tail) < 8 or zlib.crc32(tail[:8]).to_bytes(4, "little")
                                           .startswith(tail[8:12]))


def _next_frame(data: bytes, pos: int) -> int:
    """The next position at or after pos where an intact frame starts, else the end of the data."""
    magic = struct.pack("<I", FRAME_MAGIC)
    while (pos := data.find(magic, pos)) >= 0:
        header = _frame_header(data, pos)
        if header is not None:
            stop = pos + FRAME.size + header[0]
            if stop <= len(data) and zlib.crc32(data[pos + FRAME.size:stop]) == header[1]:
                return pos
        pos += 1
    return len(data)


class WriteAheadLog:
    """The log file of one index directory: `open` scans (and repairs) it, `append_*` make writes durable."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        data = self.path.read_bytes() if self.path.exists() else b""
        self.found = scan(data)
        if self.found.damaged:
            self.damaged_copy = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
            shutil.copyfile(self.path, self.damaged_copy)
            log.error(json.dumps({"event": "wal_damaged", "path": str(self.path), "kept_as": str(self.damaged_copy),
                                  "damaged_bytes": [list(r) for r in self.found.damaged[:20]],
                                  "damaged_ranges": len(self.found.damaged),
                                  "intact_records": len(self.found.records)}))
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._failed = False
        if self.found.damaged or self.found.end < len(FILE_MAGIC):  # keep the intact frames only, or start the file
            self._rewrite(b"".join(data[a:b] for a, b in self.found.spans))
        else:
            self._end = self.found.end
            if self._end < self.found.size:
                log.warning(json.dumps({"event": "wal_torn_tail", "path": str(self.path),
                                        "bytes": self.found.size - self._end}))
                os.ftruncate(self._fd, self._end)
                os.fsync(self._fd)
        if created:
            fsync_dir(self.path.parent)

    def records(self) -> Iterator[Record]:
        """The intact records found when the log was opened, in order."""
        return iter(self.found.records)

    def replay(self, index) -> int:
        """Apply the records found on open to an index; returns how many were applied. A record that was accepted
        passed every check before it was written; should one still fail, it is logged and skipped, never fatal."""
        from latenthash.backend import parse_metadata_json

        n = 0
        for i, rec in enumerate(self.found.records):
            try:
                if rec.op == UPSERT:
                    meta = [None if t is None else parse_metadata_json(t) for t in rec.metadata or []]
                    index.add(rec.ids, rec.codes, rec.features, meta, copies=rec.copies)
                else:
                    index.remove(rec.ids)
                n += 1
            except Exception as exc:  # noqa: BLE001 - one bad record must not stop the server from starting
                log.error(json.dumps({"event": "wal_record_failed", "record": i, "ids": rec.ids[:10].tolist(),
                                      "error": f"{type(exc).__name__}: {exc}"}))
        return n

    def append_upsert(self, ids: np.ndarray, codes: np.ndarray, features: np.ndarray | None,
                      metadata: list[str | None], copies: np.ndarray | None = None) -> None:
        """Durably log an upsert of already validated items (metadata as JSON text; copy descriptors, zero rows
        for none)."""
        self._append(encode_upsert(ids, codes, features, metadata, copies))

    def append_delete(self, ids: np.ndarray) -> None:
        self._append(encode_delete(ids))

    def _append(self, payload: bytes) -> None:
        data = frame(payload)
        with self._lock:
            try:
                if self._failed:  # a failed append may have left bytes past the last whole frame
                    os.ftruncate(self._fd, self._end)
                    self._failed = False
                _write_all(self._fd, data, self._end)
                os.fsync(self._fd)
            except OSError as exc:
                self._failed = True
                try:
                    os.ftruncate(self._fd, self._end)
                    os.fsync(self._fd)
                    self._failed = False
                except OSError:
                    pass
                raise storage_error(exc, f"cannot write the write-ahead log {self.path}") from None
            self._end += len(data)

    def size(self) -> int:
        return self._end

    def truncate(self) -> None:
        """Empty the log (after a checkpoint saved everything in it)."""
        with self._lock:
            self._rewrite(b"")

    def _rewrite(self, body: bytes) -> None:
        os.ftruncate(self._fd, 0)
        _write_all(self._fd, FILE_MAGIC + body, 0)
        os.fsync(self._fd)
        self._end = len(FILE_MAGIC) + len(body)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
