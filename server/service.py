"""The HashSearch servicer: each RPC decodes its request (wire.py), calls the `Searcher`, encodes the answer.

Every `LatentHashError` becomes its class's gRPC status with the message (the client maps it back to the same
exception); anything unexpected is logged and answered INTERNAL, and the server keeps serving. Writes go to the
write-ahead log before they are applied; `after_write` (the server's checkpoint policy) runs after each.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np

from latenthash import wire
from latenthash.backend import check_features, check_items
from latenthash.errors import LatentHashError
from latenthash.search import Searcher
from latenthash.server.batching import DynamicBatcher
from latenthash.server.handlers import abort, rpc
from latenthash.server.wal import WriteAheadLog
from latenthash.v1 import search_pb2 as pb
from latenthash.v1 import search_pb2_grpc as pb_grpc

log = logging.getLogger("latenthash.server")
STREAM_WINDOW = 1024  # unanswered requests a SearchStream buffers before it stops reading
_END = object()


def _read_stream(request_iterator, inbox: queue.Queue, stop: threading.Event) -> None:
    """Move a stream's requests into `inbox` (waiting while it is full), then _END, or the error that ended the
    stream; gives up as soon as the handler has finished (`stop`), so no reader outlives its call."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                inbox.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        for request in request_iterator:
            if not put(request):
                return
        put(_END)
    except Exception as exc:  # cancelled or broken stream
        put(exc)


def _first_error(responses: list) -> list:
    """The responses, or the first request's error raised (naming the request when there are several)."""
    for i, r in enumerate(responses):
        if isinstance(r, BaseException):
            raise r.at(i) if len(responses) > 1 and isinstance(r, LatentHashError) else r
    return responses


class HashSearchService(pb_grpc.HashSearchServicer):
    def __init__(self, searcher: Searcher, *, batcher: DynamicBatcher | None, wal: WriteAheadLog | None,
                 metrics, search_batcher: DynamicBatcher | None = None, after_write: Callable | None = None):
        self.searcher = searcher
        self.batcher = batcher
        self.search_batcher = search_batcher
        self.wal = wal
        self.metrics = metrics
        self.after_write = after_write
        self.write_lock = threading.Lock()  # WAL order == apply order
        if metrics.enabled:
            metrics.set_items(len(searcher))

    def _encode(self, arrays: np.ndarray):
        """Decoded images encoded in a batch shared with concurrent calls when batching is on."""
        return self.batcher.submit(arrays) if self.batcher is not None else self.searcher.encode(arrays)

    def _search_many(self, queries: list) -> list:
        """A call's queries answered together: their images in one encoder call, one index search per distinct set
        of options (merged with other calls' queries by the search batcher). Each query's SearchResponse, or the
        `LatentHashError` it raised, in order. Timings of shared steps are the shared step's."""
        t0 = time.perf_counter()
        queries = self.searcher.encode_queries(queries, self._encode)
        t1 = time.perf_counter()
        found = (self.search_batcher.submit_many if self.search_batcher is not None
                 else self.searcher.search_many)(queries)
        timings = {"encode_ms": (t1 - t0) * 1e3, "search_ms": (time.perf_counter() - t1) * 1e3}
        out = []
        for res in found:
            if isinstance(res, BaseException):
                out.append(res)
                continue
            resp = wire.to_search_response(res, self.searcher.metadata_json(res.ids[0, :res.counts[0]]))
            resp.timings.CopyFrom(pb.Timings(total_ms=(time.perf_counter() - t0) * 1e3, **timings))
            out.append(resp)
        return out

    # -------------------------------------------------------------------------------------------- RPCs
    @rpc
    def Search(self, request, context):
        return _first_error(self._search_many([wire.query_or_error(request, self.searcher.bits)]))[0]

    @rpc
    def SearchBatch(self, request, context):
        queries = wire.from_batch_request(request, self.searcher.bits)
        return pb.SearchBatchResponse(responses=_first_error(self._search_many(queries)))

    @rpc
    def SearchCodes(self, request, context):
        """Columnar: one frombuffer for the codes, one index search, flat hit arrays out (no message per hit).
        Searched directly, not through the search batcher: the call is a batch already."""
        t0 = time.perf_counter()
        query = wire.from_codes_request(request, self.searcher.bits, self.searcher.feature_dim)
        t1 = time.perf_counter()
        result = _first_error(self.searcher.search_many([query]))[0]
        search_ms = (time.perf_counter() - t1) * 1e3
        resp = wire.to_codes_response(result, self.searcher.metadata_json if query.options.metadata else None)
        resp.timings.search_ms = search_ms
        resp.timings.total_ms = (time.perf_counter() - t0) * 1e3
        return resp

    def SearchStream(self, request_iterator, context):
        """Pipelined: a reader thread queues what the client sends (up to STREAM_WINDOW unanswered requests); each
        round answers everything queued so far together, in order. A bad request ends the stream with its status
        after the responses before it."""
        inbox: queue.Queue = queue.Queue(maxsize=STREAM_WINDOW)
        stop = threading.Event()
        threading.Thread(target=_read_stream, args=(request_iterator, inbox, stop), daemon=True,
                         name="latenthash-stream-reader").start()
        try:
            done = False
            while not done:
                try:
                    batch = [inbox.get(timeout=0.2)]
                except queue.Empty:
                    if context.is_active():
                        continue
                    return  # cancelled, or the server is stopping: never wait on a stream that is gone
                while len(batch) < STREAM_WINDOW:
                    try:
                        batch.append(inbox.get_nowait())
                    except queue.Empty:
                        break
                if batch[-1] is _END or isinstance(batch[-1], BaseException):
                    done, last = True, batch.pop()
                    if isinstance(last, LatentHashError):  # a request that could not be read (malformed)
                        abort(context, last)
                    if isinstance(last, BaseException):
                        return  # the client went away or cancelled: nothing left to answer
                t0 = time.perf_counter()
                try:
                    bits = self.searcher.bits
                    responses = self._search_many([wire.query_or_error(r, bits) for r in batch]) if batch else []
                except Exception as exc:
                    responses = [exc]
                seconds = (time.perf_counter() - t0) / max(len(batch), 1)
                for r in responses:
                    if isinstance(r, LatentHashError):
                        self.metrics.observe("SearchStream", r.grpc_code, seconds)
                        abort(context, r)
                    if isinstance(r, BaseException):
                        self.metrics.observe("SearchStream", "INTERNAL", seconds)
                        log.error("internal error in SearchStream", exc_info=r)
                        context.abort(grpc.StatusCode.INTERNAL, "internal error in SearchStream; see the server log")
                    self.metrics.observe("SearchStream", "OK", seconds)
                    yield r
        finally:
            stop.set()

    @rpc
    def Upsert(self, request_iterator, context):
        """Items are checked as they arrive and all together (the same checks the index makes) before the log is
        written: what was acknowledged can always be replayed."""
        s = self.searcher
        items = wire.from_upsert_items(request_iterator, s.bits, s.feature_dim)
        copies = None
        if items.images:
            batch = s.decode(list(items.images.values()))
            enc = self._encode(batch)
            for j, row in enumerate(items.images):
                items.codes[row], items.features[row] = enc.codes[j], enc.features[j]
            if s.describes_copies:  # items sent as codes get none (a zero row)
                copies = np.zeros((len(items.ids), s.encoder.info.copy_dim), np.float32)
                copies[list(items.images)] = s.encoder.describe_copies(batch)
        ids, codes, meta_texts = check_items(items.ids, np.stack(items.codes), items.metadata, s.bits)
        features = check_features(np.stack(items.features), len(ids), s.feature_dim) if s.feature_dim else None
        with self.write_lock:
            if self.wal is not None:  # durable before applied and acknowledged
                self.wal.append_upsert(ids, codes, features, meta_texts, copies)
            _, replaced = s.upsert(ids, codes=codes, features=features, metadata=items.metadata, copies=copies)
            if self.after_write is not None:
                self.after_write()
        if self.metrics.enabled:  # len() of a remote index is a round trip: only when someone reads it
            self.metrics.set_items(len(s))
        return pb.UpsertResponse(upserted=len(ids), replaced=replaced)

    @rpc
    def Delete(self, request, context):
        ids = wire.from_ids(request, "Delete")
        with self.write_lock:
            if self.wal is not None:
                self.wal.append_delete(ids)
            deleted, missing = self.searcher.delete(ids)
        if self.metrics.enabled:
            self.metrics.set_items(len(self.searcher))
        return pb.DeleteResponse(deleted=deleted, missing=missing)

    @rpc
    def Get(self, request, context):
        return wire.to_items(self.searcher.get(wire.from_ids(request, "Get")))

    @rpc
    def Duplicates(self, request, context):
        """Found in full before the first group is sent, so any error is the call's status."""
        return iter([wire.to_duplicate_group(g) for g in self.searcher.duplicates(
            **wire.from_duplicates_request(request))])

    @rpc
    def Stats(self, request, context):
        return wire.to_stats(self.searcher.stats())

    @rpc
    def Encode(self, request, context):
        inputs = wire.from_encode_request(request)
        return wire.to_encoded(self._encode(self.searcher.decode(inputs)))
