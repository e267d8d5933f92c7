"""Bulk indexing: encode an image collection in batches and add it to an index, with a progress bar (shown on a
terminal only, so logs are not flooded with redraws)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latenthash.backend import IndexBackend
from latenthash.encoder import Encoder
from latenthash.search import Searcher


def add_images(index: IndexBackend, encoder: Encoder, images: np.ndarray, *, ids: np.ndarray,
               metadata: Sequence[Any] | None = None, batch_size: int = 512, progress: bool = True) -> int:
    """Encode uint8 NHWC `images` with `encoder` and add them under `ids`; returns the number added."""
    from latenthash.progress import progress as progress_bar

    if len(ids) != len(images):
        from latenthash.errors import InvalidInput

        raise InvalidInput(f"{len(ids)} ids for {len(images)} images")
    searcher = Searcher(index, encoder)
    with progress_bar(total=len(images), show=progress, desc="index", unit="img") as bar:
        for lo in range(0, len(images), batch_size):
            hi = min(len(images), lo + batch_size)
            searcher.upsert(ids[lo:hi], images=images[lo:hi],
                            metadata=list(metadata[lo:hi]) if metadata is not None else None)
            bar.update(hi - lo)
    return len(images)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_image_files(source: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under a folder (recursive, sorted, by suffix; hidden files ignored) or listed in a text file (one
    path a line, relative to the file's folder), as absolute paths; and the other files found, with why each is
    skipped."""
    from latenthash.errors import InvalidInput

    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        return ([str(p.resolve()) for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
                [(str(p.resolve()), "not an image file (by its suffix)") for p in files
                 if p.suffix.lower() not in IMAGE_SUFFIXES])
    if source.is_file():
        lines = [line.strip() for line in source.read_text(errors="replace").splitlines()]
        return [str((source.parent / line).resolve()) for line in lines if line and not line.startswith("#")], []
    raise InvalidInput(f"{source} is neither a folder of images nor a text file listing them")


@dataclass
class FileIngest:
    """What `add_image_files` did: files indexed, files skipped as unreadable (path, reason), already present."""

    added: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    already: int = 0


def add_image_files(index: IndexBackend, encoder: Encoder, paths: Sequence[str], *, start_id: int,
                    skip: AbstractSet[str] = frozenset(), batch_size: int = 256, progress: bool = True,
                    checkpoint: Callable[[], Any] | None = None, checkpoint_every: int = 20_000) -> FileIngest:
    """Decode, encode and add image files in batches (memory bounded by `batch_size`), ids from `start_id`,
    metadata {"path": path}. Unreadable files are skipped and reported; paths in `skip` (already indexed) too.
    `checkpoint` is called every `checkpoint_every` added images, so an interrupted run keeps its progress."""
    from latenthash.errors import InvalidInput
    from latenthash.progress import progress as progress_bar

    out = FileIngest()
    todo = [p for p in paths if p not in skip]
    out.already = len(paths) - len(todo)
    next_id, since = start_id, 0
    with progress_bar(total=len(todo), show=progress, desc="index", unit="img") as bar:
        for lo in range(0, len(todo), batch_size):
            arrays, kept = [], []
            for path in todo[lo:lo + batch_size]:
                try:
                    arrays.append(encoder.to_array([Path(path).read_bytes()])[0])
                    kept.append(path)
                except (InvalidInput, OSError) as exc:
                    out.bad.append((path, str(exc)))
            if kept:
                Searcher(index, encoder).upsert(np.arange(next_id, next_id + len(kept)), images=np.stack(arrays),
                                                metadata=[{"path": p} for p in kept])
                next_id += len(kept)
                out.added += len(kept)
                since += len(kept)
            bar.update(min(batch_size, len(todo) - lo))
            if checkpoint is not None and since >= checkpoint_every:
                checkpoint()
                since = 0
    return out
