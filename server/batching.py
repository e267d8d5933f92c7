"""Dynamic batching, in the manner of Triton's dynamic batcher: concurrent calls each submit their request; one
worker thread gathers what arrives within `max_delay_ms` of the first waiting request (or until `max_batch`
rows), makes one call for all of them, and hands each caller its rows.

Two uses: encoding (one encoder call for many small image requests uses the cores far better than many calls of
batch 1) and searching (concurrent queries with the same options become one batch search, which walks the codes
once for all of them, instead of many kernels fighting over the same two cores). With `max_delay_ms=0` nothing
waits: a batch is whatever queued while the previous one ran, so a lone query pays only the hand-over.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from latenthash.api import Query
from latenthash.encoder import Encoder, EncodeResult
from latenthash.errors import Unavailable
from latenthash.search import Searcher


class DynamicBatcher:
    """Runs `run(requests) -> results` (one result, or the exception to raise, per request, in order) over gathered
    concurrent requests."""

    def __init__(self, run: Callable[[list], Sequence], *, rows: Callable[[Any], int] = lambda r: 1,
                 max_batch: int = 64, max_delay_ms: float = 2.0, name: str = "batcher"):
        self._run_batch = run
        self._rows = rows
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1e3
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self.batches = 0  # calls made, for metrics and tests
        self.items = 0
        self._thread = threading.Thread(target=self._loop, name=f"latenthash-{name}", daemon=True)
        self._thread.start()

    def submit(self, request) -> Any:
        """One request's result; its exception is raised here."""
        (result,) = self.submit_many([request])
        if isinstance(result, BaseException):
            raise result
        return result

    def submit_many(self, requests: Sequence) -> list:
        """Queue several requests at once (they may share batches with each other and with other callers); each
        one's result, or the exception it raised, in order."""
        if self._closed:
            raise Unavailable("the server is shutting down")
        futures: list[Future] = [Future() for _ in requests]
        for request, future in zip(requests, futures):
            self._queue.put((request, future))
        return [f.exception() or f.result() for f in futures]

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            pending = [first]
            size = self._rows(first[0])
            deadline = time.monotonic() + self.max_delay
            while size < self.max_batch:
                try:
                    timeout = deadline - time.monotonic()
                    item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                pending.append(item)
                size += self._rows(item[0])
            self._run(pending)

    def _run(self, pending: list) -> None:
        try:
            results = self._run_batch([r for r, _ in pending])
        except Exception as exc:  # hand the failure to every waiting caller
            for _, fut in pending:
                fut.set_exception(exc)
            return
        self.batches += 1
        self.items += len(pending)
        for (_, fut), result in zip(pending, results):
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)


def encode_batcher(encoder: Encoder, *, max_batch: int = 64, max_delay_ms: float = 2.0) -> DynamicBatcher:
    """Batches of decoded uint8 image arrays -> one encoder call -> each caller's `EncodeResult`."""

    def run(arrays: list[np.ndarray]) -> list[EncodeResult]:
        out = encoder.encode(np.concatenate(arrays))
        bounds = np.cumsum([0] + [len(a) for a in arrays])
        return [EncodeResult(out.codes[lo:hi], out.features[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]

    return DynamicBatcher(run, rows=len, max_batch=max_batch, max_delay_ms=max_delay_ms, name="encode-batcher")


def search_batcher(searcher: Searcher, *, max_batch: int = 64, max_delay_ms: float = 0.0) -> DynamicBatcher:
    """Concurrent queries merged into as few index searches as their options allow (`Searcher.search_many`)."""
    return DynamicBatcher(searcher.search_many, rows=lambda q: len(q) if isinstance(q, Query) else 1,
                          max_batch=max_batch,
                          max_delay_ms=max_delay_ms, name="search-batcher")
