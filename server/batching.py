"""Dynamic batching of encode requests, in the manner of Triton's dynamic batcher.

Concurrent calls each submit their images; one worker thread gathers what arrives within `max_delay_ms` of the
first waiting request (or until `max_batch` images), runs the encoder once, and hands each caller its rows.
One encoder call for many small requests uses the cores far better than many calls of batch 1.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import numpy as np

from latenthash.encoder import EncodeResult, Encoder
from latenthash.errors import Unavailable


class DynamicBatcher:
    def __init__(self, encoder: Encoder, *, max_batch: int = 64, max_delay_ms: float = 2.0):
        self.encoder = encoder
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1e3
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self.batches = 0  # encoder calls made, for metrics and tests
        self.items = 0
        self._thread = threading.Thread(target=self._loop, name="latenthash-batcher", daemon=True)
        self._thread.start()

    def encode(self, images) -> EncodeResult:
        """Encode images (decoded and checked in the caller's thread, so errors name the caller's items)."""
        if self._closed:
            raise Unavailable("the server is shutting down")
        array = self.encoder.to_array(images)
        future: Future = Future()
        self._queue.put((array, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            pending = [first]
            size = len(first[0])
            deadline = _now() + self.max_delay
            while size < self.max_batch:
                timeout = deadline - _now()
                if timeout <= 0:
                    break
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                pending.append(item)
                size += len(item[0])
            self._run(pending)

    def _run(self, pending: list) -> None:
        try:
            out = self.encoder.encode(np.concatenate([a for a, _ in pending]))
        except Exception as exc:  # hand the failure to every waiting caller
            for _, fut in pending:
                fut.set_exception(exc)
            return
        self.batches += 1
        self.items += len(out)
        start = 0
        for array, fut in pending:
            end = start + len(array)
            fut.set_result(EncodeResult(out.codes[start:end], out.features[start:end]))
            start = end

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)


def _now() -> float:
    import time

    return time.monotonic()
