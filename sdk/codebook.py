"""The codeword dictionary of a remote index: how many rows hold each distinct code.

Learned codes are few (a class collapses onto a handful of codewords), so step 1 of the two-step search needs only
which codewords lie in the query's nearest distance shells, not which rows: the dictionary answers that locally, and
the engine is then asked for one search of the features restricted to those codewords (a scalar filter). The pool
is whole distance shells, exactly as the embedded index takes it, and is never cut by the engine's hit limit.

A codeword is stored in the engine as a key: the packed code itself as a signed INT64 for codes of up to 64 bits,
else as hex text. The dictionary is exact for the writes made through it; a scan of the engine rebuilds it while
writes go on (`rebuilding`), keeping any codeword written meanwhile (a codeword counted too often only makes a
filter longer; one that is missing would hide its rows).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from latenthash.codes import from_words, n_bytes, to_words
from latenthash.numpy_search import distances

Key = int | str


def int_keys(bits: int) -> bool:
    """Whether codes of `bits` bits are stored as INT64 keys (else as hex text)."""
    return bits <= 64


def keys_of(packed: np.ndarray, bits: int) -> list[Key]:
    """The engine's codeword keys of packed uint8 code rows."""
    if int_keys(bits):
        return to_words(packed, bits).view(np.int64).ravel().tolist()
    return [row.tobytes().hex() for row in np.asarray(packed, np.uint8)]


def codes_of(keys: Iterable[Key], bits: int) -> np.ndarray:
    """Packed uint8 code rows of codeword keys (the inverse of `keys_of`)."""
    keys = list(keys)
    if int_keys(bits):
        return from_words(np.asarray(keys, np.int64).view(np.uint64)[:, None], bits)
    return np.frombuffer(b"".join(bytes.fromhex(str(k)) for k in keys), np.uint8).reshape(len(keys), n_bytes(bits))


@dataclass(frozen=True)
class Shells:
    """A query's nearest distance shells: the codewords at distance <= `cut`, nearest first, and their rows."""

    keys: list[Key]
    distances: np.ndarray  # (len(keys),) Hamming distance of each codeword to the query
    counts: np.ndarray  # (len(keys),) rows holding each codeword
    cut: int

    @property
    def rows(self) -> int:
        return int(self.counts.sum())

    def distance_of(self) -> dict[Key, int]:
        return dict(zip(self.keys, self.distances.tolist()))


class Codebook:
    """Codeword -> row count, with the distance-shell query of step 1; thread-safe."""

    def __init__(self, bits: int):
        self.bits = bits
        self._counts: Counter = Counter()
        self._lock = threading.Lock()
        self._arrays: tuple[list[Key], np.ndarray, np.ndarray] | None = None  # keys, words, counts
        self._touched: set[Key] | None = None  # codewords written while a rebuild scans

    def __len__(self) -> int:
        return len(self._counts)

    def counts(self) -> dict[Key, int]:
        """A copy of codeword -> rows."""
        with self._lock:
            return dict(self._counts)

    def change(self, keys: Iterable[Key], delta: int) -> None:
        """Count rows in (delta 1) or out (delta -1); a codeword with no rows left is dropped."""
        with self._lock:
            for key in keys:
                left = self._counts[key] + delta
                if left > 0:
                    self._counts[key] = left
                else:
                    del self._counts[key]
                if self._touched is not None and delta > 0:
                    self._touched.add(key)
            self._arrays = None

    @contextmanager
    def rebuilding(self) -> Iterator[Counter]:
        """Rebuild from a scan of the engine while writes go on: fill the yielded Counter with the scanned
        codewords; on a clean exit it replaces the counts, except that a codeword written during the scan keeps at
        least the count it has here (the scan may have passed its rows before they were written). A failed scan
        leaves the counts as they were."""
        with self._lock:
            self._touched = set()
        scanned: Counter = Counter()
        try:
            yield scanned
        except BaseException:
            with self._lock:
                self._touched = None
            raise
        with self._lock:
            for key in self._touched or ():
                scanned[key] = max(scanned[key], self._counts[key])
            self._counts = Counter({k: c for k, c in scanned.items() if c > 0})
            self._touched = None
            self._arrays = None

    def _snapshot(self) -> tuple[list[Key], np.ndarray, np.ndarray]:
        with self._lock:
            if self._arrays is None:
                keys = list(self._counts)
                words = to_words(codes_of(keys, self.bits), self.bits) if keys else \
                    np.zeros((0, (self.bits + 63) // 64), np.uint64)
                self._arrays = keys, words, np.fromiter(self._counts.values(), np.int64, len(keys))
            return self._arrays

    def shells(self, packed_query: np.ndarray, target: int, radius: int | None = None) -> Shells:
        """The codewords of every row at distance <= d*, the smallest distance covering `target` rows (all rows
        when fewer), or <= `radius` when that is smaller: whole shells, nearest first (ties by key order)."""
        keys, words, counts = self._snapshot()
        if not keys:
            return Shells([], np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
        d = distances(words, to_words(packed_query[None, :], self.bits)[0])
        covered = np.cumsum(np.bincount(d, weights=counts, minlength=self.bits + 1))
        cut = int(np.argmax(covered >= min(target, covered[-1])))
        if radius is not None:
            cut = min(cut, radius)
        picked = np.flatnonzero(d <= cut)
        picked = picked[np.argsort(d[picked], kind="stable")]
        return Shells([keys[i] for i in picked.tolist()], d[picked], counts[picked], cut)
