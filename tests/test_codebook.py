"""The codeword dictionary of remote indexes (latenthash.codebook) against brute force over the rows it counts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from latenthash.codebook import Codebook, codes_of, keys_of


@pytest.mark.parametrize("bits", [8, 48, 64, 72, 256])
def test_keys_round_trip_to_codes(rng, bits):
    packed = np.packbits(rng.integers(0, 2, (50, bits), dtype=np.uint8), axis=1)
    keys = keys_of(packed, bits)
    assert all(isinstance(k, int if bits <= 64 else str) for k in keys)
    np.testing.assert_array_equal(codes_of(keys, bits), packed)


@pytest.mark.parametrize("bits", [16, 64, 128])
def test_shells_are_whole_distance_shells(rng, bits):
    """The codewords picked are exactly those of every row at distance <= d*, d* the smallest distance covering
    the target (or the radius, when smaller), nearest first."""
    words = np.packbits(rng.integers(0, 2, (300, bits), dtype=np.uint8), axis=1)
    rows = words[rng.integers(0, 300, 5000)]  # repeated codewords, as learned codes are
    book = Codebook(bits)
    book.change(keys_of(rows, bits), 1)
    assert len(book) == len(np.unique(rows, axis=0))
    for q in np.packbits(rng.integers(0, 2, (10, bits), dtype=np.uint8), axis=1):
        d = np.unpackbits(rows ^ q, axis=1).sum(1)
        for target, radius in ((1, None), (100, None), (4000, None), (10**6, None), (500, bits // 2 - 3)):
            cut = min(int(np.argmax(np.cumsum(np.bincount(d, minlength=bits + 1)) >= min(target, len(d)))),
                      bits if radius is None else radius)
            shells = book.shells(q, target, radius)
            assert shells.cut == cut
            assert Counter(shells.keys) == Counter(set(keys_of(rows[d <= cut], bits)))
            assert shells.rows == int((d <= cut).sum())
            assert (np.diff(shells.distances) >= 0).all()


def test_a_rebuild_keeps_what_was_written_during_its_scan():
    book = Codebook(8)
    book.change([1, 1, 2], 1)
    with book.rebuilding() as scanned:
        scanned.update([1, 3])  # the scan saw one row of 1 and a row of 3 (another client's)
        book.change([4, 1], 1)  # written while it scanned: the scan may have passed them
    assert book.counts() == {1: 3, 3: 1, 4: 1}
    book.change([3], -1)
    assert 3 not in book.counts() and len(book) == 2
    with pytest.raises(RuntimeError), book.rebuilding() as scanned:
        scanned.update([9])
        raise RuntimeError("Milvus went away")
    assert book.counts() == {1: 3, 4: 1}  # a failed scan changes nothing
