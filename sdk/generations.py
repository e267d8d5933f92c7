"""The embedded index's files: atomic, checksummed generations in one directory.

    index-dir/
      CURRENT              "gen-N" and the sha256 of that generation's header.json (replaced atomically)
      LOCK                 the writer's lock (storage.DirLock)
      gen-N/header.json    format, version, shape, and every file's size and sha256
      gen-N/*.npy          arrays (codes as uint64 words, ids, features, scales, metadata offsets)
      gen-N/metadata.bin   metadata JSON texts back to back

A save writes a new generation, fsyncs it, then swaps CURRENT and removes older generations, so a crash at any
point leaves either the old or the new index whole. `read_generation` checks the header's checksum, format,
version, sizes (always) and sha256 (when asked) before it maps any array. This module knows files, not searching:
`HashIndex` (index.py) turns arrays into an index and back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from latenthash.errors import IndexCorrupt, NotFound
from latenthash.storage import fsync_dir

FORMAT = "latenthash-index"
VERSION = 1


@dataclass
class Generation:
    """What a saved generation holds: its header and its arrays (memory-mapped when asked), metadata as texts."""

    header: dict
    arrays: dict[str, np.ndarray]
    metadata: list[str | None]
    path: Path


def write_generation(root: Path, arrays: dict[str, np.ndarray], metadata: list, header: dict) -> Path:
    """Write a new generation of `arrays` (name -> array, saved as name.npy) and `metadata` (JSON text or None per
    row) under `root`, with `header` plus format, version and file checksums; then make it CURRENT."""
    current = read_current(root)
    gen = (int(current[0].split("-")[1]) + 1) if current else 1
    gen_dir = root / f"gen-{gen}"
    if gen_dir.exists():
        shutil.rmtree(gen_dir)
    gen_dir.mkdir()
    blob, offsets = _pack_metadata(metadata)
    files = {}
    for name, arr in {**arrays, "metadata_offsets": offsets}.items():
        files[f"{name}.npy"] = _write_file(gen_dir / f"{name}.npy",
                                           lambda f, a=arr: np.save(f, np.ascontiguousarray(a)))
    files["metadata.bin"] = _write_file(gen_dir / "metadata.bin", lambda f: f.write(blob))
    full = {"format": FORMAT, "version": VERSION, **header, "files": files, "saved_at": time.time()}
    head = _write_file(gen_dir / "header.json", lambda f: f.write(json.dumps(full, indent=1).encode()))
    fsync_dir(gen_dir)
    tmp = root / "CURRENT.tmp"
    _write_file(tmp, lambda f: f.write(f"{gen_dir.name}\nheader-sha256 {head['sha256']}\n".encode()))
    os.replace(tmp, root / "CURRENT")
    fsync_dir(root)
    for old in root.glob("gen-*"):
        if old.name != gen_dir.name:
            shutil.rmtree(old, ignore_errors=True)
    return gen_dir


def read_generation(root: Path, shapes, *, verify: bool, mmap: bool) -> Generation:
    """Open the CURRENT generation of `root`: header checked (checksum, format, version), every file's size (and
    sha256 when `verify`), then each array of `shapes(header)` (name -> (dtype, shape)) loaded and checked."""
    if not root.is_dir():
        raise NotFound(f"no index directory at {root}")
    current = read_current(root, strict=verify)
    if current is None:
        raise IndexCorrupt(f"{root} is not a latenthash index (no CURRENT file)")
    gen_dir = root / current[0]
    try:
        raw = (gen_dir / "header.json").read_bytes()
    except OSError as exc:
        raise IndexCorrupt(f"cannot read the index header {gen_dir / 'header.json'}: {exc}") from None
    if current[1] is not None and hashlib.sha256(raw).hexdigest() != current[1]:
        raise IndexCorrupt(f"{gen_dir / 'header.json'} fails its checksum (named in {root / 'CURRENT'}): the "
                           f"index is corrupt; restore or rebuild it")
    try:
        return _read(root, gen_dir, json.loads(raw), shapes, verify=verify, mmap=mmap)
    except IndexCorrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes the parsers raise
        raise IndexCorrupt(f"the index in {gen_dir} cannot be read ({type(exc).__name__}: {exc}); restore or "
                           f"rebuild it") from None


def verify_files(root: Path) -> tuple[list[str], int]:
    """Every problem of an index directory's saved files, each naming its file: CURRENT's form, the header's
    checksum, each listed file's presence, size and sha256 (all files are read, not only up to the first problem).
    Returns (problems, bytes read); no problems: every checksum holds."""
    problems: list[str] = []
    try:
        name, digest = read_current(root, strict=True) or (None, None)
    except IndexCorrupt as exc:
        return [str(exc)], 0
    if name is None:
        return [f"{root} is not a latenthash index (no CURRENT file)"], 0
    head = root / name / "header.json"
    try:
        raw = head.read_bytes()
        if hashlib.sha256(raw).hexdigest() != digest:
            return [f"{head} fails its checksum (named in {root / 'CURRENT'})"], len(raw)
        files = json.loads(raw)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{head} cannot be read ({type(exc).__name__}: {exc})"], 0
    read = len(raw)
    for fname, meta in files.items():
        problem = _file_problem(root / name / fname, meta, verify=True)
        if problem:
            problems.append(problem)
        else:
            read += meta["size"]
    return problems, read


def _file_problem(file: Path, meta: dict, *, verify: bool) -> str | None:
    """What is wrong with one listed file: missing or of the wrong size, or (`verify`) failing its sha256."""
    if not file.is_file() or file.stat().st_size != meta["size"]:
        return f"{file} is missing or truncated (expected {meta['size']} bytes)"
    if verify and _sha256(file) != meta["sha256"]:
        return f"{file} fails its checksum"
    return None


def _read(root: Path, gen_dir: Path, header: dict, shapes, *, verify: bool, mmap: bool) -> Generation:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise IndexCorrupt(f"{gen_dir} is not a latenthash index header")
    if header.get("version") != VERSION:
        raise IndexCorrupt(f"index format version {header.get('version')} in {root}; this latenthash reads "
                           f"version {VERSION}: upgrade latenthash or rebuild the index")
    files = header["files"]
    for name, meta in files.items():
        problem = _file_problem(gen_dir / name, meta, verify=verify)
        if problem:
            raise IndexCorrupt(f"{problem}: the index is corrupt; restore or rebuild it")
    mode: Literal["r"] | None = "r" if mmap else None

    def load(name: str, dtype, shape) -> np.ndarray:
        if f"{name}.npy" not in files:
            raise IndexCorrupt(f"{gen_dir / 'header.json'} does not list {name}.npy")
        arr = np.load(gen_dir / f"{name}.npy", mmap_mode=mode, allow_pickle=False)
        if arr.dtype != np.dtype(dtype) or arr.shape != shape:
            raise IndexCorrupt(f"{gen_dir / name}.npy holds {arr.dtype} {arr.shape}, the header says {dtype} {shape}")
        return arr.view(np.ndarray)  # the same mapped memory; slicing np.memmap costs ~5 us a time in Python

    n = header["count"]
    arrays = {name: load(name, dtype, shape) for name, (dtype, shape) in shapes(header).items()}
    offsets = np.asarray(load("metadata_offsets", np.int64, (n + 1,)))
    if "metadata.bin" not in files:
        raise IndexCorrupt(f"{gen_dir / 'header.json'} does not list metadata.bin")
    blob = (gen_dir / "metadata.bin").read_bytes()
    if offsets[0] != 0 or offsets[-1] != len(blob) or np.any(np.diff(offsets) < 0):
        raise IndexCorrupt(f"{gen_dir / 'metadata_offsets.npy'} does not describe metadata.bin "
                           f"({len(blob)} bytes): restore or rebuild the index")
    try:
        metadata = [None if offsets[i] == offsets[i + 1] else blob[offsets[i]:offsets[i + 1]].decode()
                    for i in range(n)]
    except UnicodeDecodeError as exc:
        raise IndexCorrupt(f"{gen_dir / 'metadata.bin'} holds invalid UTF-8 ({exc}): restore or rebuild the "
                           f"index") from None
    return Generation(header, arrays, metadata, gen_dir)


def _pack_metadata(texts: list) -> tuple[bytes, np.ndarray]:
    encoded = [t.encode() if t is not None else b"" for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return b"".join(encoded), offsets


def _write_file(path: Path, write) -> dict:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_current(root: Path, strict: bool = False) -> tuple[str, str | None] | None:
    """The generation named by CURRENT and the sha256 of its header (None in indexes saved before it was kept).
    `strict`: CURRENT must be exactly what a save writes (its name line and the header's checksum), so that no
    damage to it goes unnoticed."""
    try:
        text = (root / "CURRENT").read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexCorrupt(f"cannot read {root / 'CURRENT'}: {exc}") from None
    if strict and not re.fullmatch(r"gen-\d+\nheader-sha256 [0-9a-f]{64}\n", text):
        raise IndexCorrupt(f"{root / 'CURRENT'} is damaged (or from a latenthash that kept no header checksum): "
                           f"restore the index, or open it without verification and save it again")
    lines = text.split("\n")
    name = lines[0].strip()
    if not name.startswith("gen-") or not name[4:].isdigit() or not (root / name).is_dir():
        raise IndexCorrupt(f"{root / 'CURRENT'} names {name!r}, which is not a generation folder of this index")
    digest = next((line.split()[1] for line in lines[1:] if line.startswith("header-sha256 ")), None)
    return name, digest
