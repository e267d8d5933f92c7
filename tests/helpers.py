"""What several test files compare: search results (exactly, or up to the order of ties at the last distance) and
the stored content of two indexes. One comparator of each kind, so every test means the same by "the same"."""

from __future__ import annotations

import numpy as np


def assert_same_results(a, b, *, ties_in_any_order: bool = False) -> None:
    """Two SearchResults give the same answer: counts, distances, scores (to 1e-6) and metadata equal; ids equal,
    or with `ties_in_any_order` (engines that order equal distances differently) equal as sets before each query's
    last distance, where no tie can be cut."""
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.distances, b.distances)
    if ties_in_any_order:
        for q in range(len(a)):
            n = int(a.counts[q])
            inner = a.distances[q, :n] < a.distances[q, n - 1]
            assert set(a.ids[q, :n][inner]) == set(b.ids[q, :n][inner])
    else:
        np.testing.assert_array_equal(a.ids, b.ids)
    if a.scores is None:
        assert b.scores is None
    else:
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    assert a.metadata == b.metadata


def assert_same_items(a, b) -> None:
    """Two indexes hold the same ids with the same codes, features and metadata."""
    np.testing.assert_array_equal(np.sort(a.ids), np.sort(b.ids))
    ids = np.sort(a.ids)
    ga, gb = a.get(ids), b.get(ids)
    np.testing.assert_array_equal(ga.codes, gb.codes)
    np.testing.assert_array_equal(ga.features, gb.features)
    assert ga.metadata == gb.metadata
