"""The facade's contract: one search interface (`SearchAPI`) that Searcher, Client and AsyncClient implement with
the same arguments, typed requests, readable results, and the status map derived from the error classes."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

from latenthash import errors
from latenthash.api import Query, SearchAPI, SearchOptions
from latenthash.backend import SearchResult, from_flat
from latenthash.client import AsyncClient, Client
from latenthash.search import Searcher

PROTOCOL_METHODS = [name for name, value in vars(SearchAPI).items()
                    if callable(value) and not name.startswith("_")]


@pytest.mark.parametrize("impl", [Searcher, Client, AsyncClient])
def test_every_implementation_offers_the_interface(impl):
    """Every call of the interface, with every parameter it names, of the same kind and default (an
    implementation may add keyword options of its own); the async client's calls are coroutines."""
    assert set(PROTOCOL_METHODS) == {"search", "upsert", "delete", "get", "stats", "encode", "duplicates"}
    for name in PROTOCOL_METHODS:
        want = inspect.signature(getattr(SearchAPI, name)).parameters
        method = getattr(impl, name)
        got = inspect.signature(method).parameters
        for pname, p in want.items():
            assert pname in got, f"{impl.__name__}.{name} lacks {pname}"
            assert (got[pname].kind, got[pname].default) == (p.kind, p.default), f"{impl.__name__}.{name}({pname})"
        extra = [q for q in got.values() if q.name not in want]
        assert all(q.kind is q.KEYWORD_ONLY and q.default is not q.empty for q in extra), f"{impl.__name__}.{name}"
        assert inspect.iscoroutinefunction(method) == (impl is AsyncClient), f"{impl.__name__}.{name}"


def test_options_are_checked_once_with_the_backends_limit():
    with pytest.raises(errors.InvalidInput, match="k must be an integer from 1 to 50"):
        SearchOptions(k=51).checked(50)
    assert SearchOptions(k=50).checked(50).k == 50
    with pytest.raises(dataclasses.FrozenInstanceError):  # options are values
        SearchOptions().k = 3  # type: ignore[misc]
    assert len(Query(codes=np.zeros(6, np.uint8))) == 1 and len(Query(codes=np.zeros((4, 6), np.uint8))) == 4
    assert len(Query(images=[b"a", b"b"])) == 2 and len(Query(images=np.zeros((3, 8, 8, 1), np.uint8))) == 3


def test_statuses_without_trailers_map_to_the_most_general_class():
    """A status from gRPC itself (no class in the trailers) becomes the class the family answers it with."""
    cases = {"INVALID_ARGUMENT": errors.InvalidInput, "NOT_FOUND": errors.NotFound,
             "FAILED_PRECONDITION": errors.FailedPrecondition, "DATA_LOSS": errors.IndexCorrupt,
             "UNAUTHENTICATED": errors.Unauthenticated, "UNAVAILABLE": errors.Unavailable,
             "DEADLINE_EXCEEDED": errors.DeadlineExceeded, "RESOURCE_EXHAUSTED": errors.ResourceExhausted,
             "UNIMPLEMENTED": errors.MissingDependency, "INTERNAL": errors.LatentHashError,
             "CANCELLED": errors.LatentHashError}
    for code, cls in cases.items():
        back = errors.from_status(code, "boom", None)
        assert type(back) is cls and str(back) == f"boom [{code}]", code
    assert issubclass(errors.DeadlineExceeded, errors.Unavailable)  # callers catching Unavailable still do
    assert issubclass(errors.StorageFull, errors.ResourceExhausted)
    assert issubclass(errors.ModelMismatch, errors.FailedPrecondition)


def test_results_read_as_rows_and_print_short():
    res = from_flat([2, 1], [7, 3, 9], [0, 4, 1], [1.0, 0.5, 0.25], width=3)
    res.metadata = [[{"a": 1}, None], [None]]
    assert res.hits(0) == [(7, 0, 1.0, {"a": 1}), (3, 4, 0.5, None)] and res.hits(0)[0].id == 7
    assert res.to_list()[1] == [{"id": 9, "distance": 1, "score": 0.25, "metadata": None}]
    text = repr(res)
    assert text.startswith("SearchResult(2 queries, up to 3 hits each, re-ranked") and "7@0 1.000" in text
    big = SearchResult(np.arange(10**5).reshape(1, -1), np.zeros((1, 10**5), np.int64), np.array([10**5]))
    assert len(repr(big)) < 200  # never the arrays
