"""The HashSearch servicer: protobuf in, `Searcher` calls, protobuf out; errors mapped to status codes.

Every `LatentHashError` becomes its class's gRPC status with the message (the client maps it back to the same
exception); anything unexpected is logged and answered INTERNAL, and the server keeps serving.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
import time
from typing import Any

import grpc
import numpy as np

from latenthash import wire
from latenthash.backend import check_features, check_items, parse_metadata_json
from latenthash.errors import InvalidInput, LatentHashError, to_trailers
from latenthash.limits import MAX_BATCH_QUERIES, MAX_UPSERT_ITEMS
from latenthash.search import Searcher
from latenthash.server.batching import DynamicBatcher
from latenthash.server.wal import WriteAheadLog
from latenthash.v1 import search_pb2 as pb
from latenthash.v1 import search_pb2_grpc as pb_grpc

log = logging.getLogger("latenthash.server")
STREAM_WINDOW = 1024  # unanswered requests a SearchStream buffers before it stops reading
_END = object()
CHECKPOINT_WAL_BYTES = 64 << 20  # log replayed after a crash at most (start-up time), between checkpoints


def status_of(exc: LatentHashError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)


def abort(context, exc: LatentHashError):
    """End the call with the error's status, message, class and request index (see errors.to_trailers)."""
    context.set_trailing_metadata(to_trailers(exc))
    context.abort(status_of(exc), str(exc))


def rpc(method):
    """Map errors to status codes, record metrics, log one structured line per call."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        t0 = time.perf_counter()
        code = "OK"
        try:
            return method(self, request, context)
        except LatentHashError as exc:
            code = exc.grpc_code
            abort(context, exc)
        except Exception:
            code = "INTERNAL"
            log.exception("internal error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see the server log")
        finally:
            seconds = time.perf_counter() - t0
            self.metrics.observe(method.__name__, code, seconds)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(json.dumps({"event": "rpc", "method": method.__name__, "code": code,
                                      "ms": round(seconds * 1e3, 3)}))

    return wrapper


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


class HashSearchService(pb_grpc.HashSearchServicer):
    def __init__(self, searcher: Searcher, *, batcher: DynamicBatcher | None, wal: WriteAheadLog | None,
                 metrics, search_batcher: DynamicBatcher | None = None):
        self.searcher = searcher
        self.batcher = batcher
        self.search_batcher = search_batcher
        self.wal = wal
        self.metrics = metrics
        self.max_k = searcher.index.max_k  # the backend's own limit (limits.MAX_K or lower)
        self.write_lock = threading.Lock()  # WAL order == apply order
        if metrics.enabled:
            metrics.set_items(len(searcher.index))

    # -------------------------------------------------------------------------------------------- helpers
    def _encoder(self):
        if self.searcher.encoder is None:
            raise InvalidInput("this server has no model (--model): query by code instead of image")
        return self.searcher.encoder

    def _encode(self, images) -> Any:
        """Decoded and checked here (errors stay the caller's), encoded in a shared batch when batching is on."""
        arrays = self._encoder().to_array(images)
        return self.batcher.submit(arrays) if self.batcher is not None else self.searcher.encode(arrays)

    @staticmethod
    def _tensor(t: pb.ImageTensor) -> np.ndarray:
        if t.channels not in (1, 3) or not t.height or not t.width:
            raise InvalidInput("tensor needs height, width > 0 and channels 1 or 3, "
                               f"got {t.height}x{t.width}x{t.channels}")
        if len(t.data) != t.height * t.width * t.channels:
            raise InvalidInput(f"tensor data holds {len(t.data)} bytes; {t.height}x{t.width}x{t.channels} needs "
                               f"{t.height * t.width * t.channels}")
        return wire.from_tensor(t)

    def _code(self, data: bytes) -> np.ndarray:
        nb = (self.searcher.index.bits + 7) // 8
        if len(data) != nb:
            raise InvalidInput(f"code has {len(data)} bytes; this index holds {self.searcher.index.bits}-bit codes "
                               f"({nb} bytes, packed MSB-first)")
        return np.frombuffer(data, np.uint8).reshape(1, nb)

    def _options(self, req) -> dict:
        """k, pool, radius and rerank of a SearchRequest or SearchCodesRequest (the fields they share), k checked."""
        if not 1 <= req.k <= self.max_k:
            raise InvalidInput(f"k must be from 1 to {self.max_k}, got {req.k}")
        return {"k": req.k, "pool": req.pool or None, "radius": req.radius if req.HasField("radius") else None,
                "rerank": req.rerank if req.HasField("rerank") else None}

    def _parse(self, req: pb.SearchRequest) -> dict:
        """A request checked and unpacked: codes (1, nb) or an image to encode, features, options, label."""
        if not req.HasField("query") or req.query.WhichOneof("kind") is None:
            raise InvalidInput("empty request: set query.image, query.tensor or query.code")
        q = req.query
        kind = q.WhichOneof("kind")
        parsed = {"codes": None, "features": None, "image": None, "label": req.label if req.HasField("label") else None,
                  "options": self._options(req)}
        if kind == "code":
            parsed["codes"] = self._code(q.code)
            if q.feature:
                parsed["features"] = np.asarray(q.feature, np.float32)[None]
        else:  # decoded and checked now, so a bad image fails its own request only
            parsed["image"] = self._encoder().to_array([q.image] if kind == "image" else self._tensor(q.tensor))
        return parsed

    def _encode_queries(self, queries: list) -> float:
        """Encode every image query of a call in one encoder call; returns its milliseconds."""
        rows = [q for q in queries if isinstance(q, dict) and q["image"] is not None]
        if not rows:
            return 0.0
        t0 = time.perf_counter()
        enc = self._encode(np.concatenate([q["image"] for q in rows]))
        with_features = bool(self.searcher.index.feature_dim)
        for j, q in enumerate(rows):
            q["codes"], q["features"] = enc.codes[j:j + 1], enc.features[j:j + 1] if with_features else None
        return (time.perf_counter() - t0) * 1e3

    def _search_many(self, requests) -> list:
        """Answer a call's queries together: one encoder call for its images, one index search per distinct set of
        options (merged with other calls' queries by the search batcher). Each request's response, or the
        `LatentHashError` it raised, in order. Timings of shared steps are the shared step's."""
        t0 = time.perf_counter()
        queries: list = []
        for req in requests:
            try:
                queries.append(self._parse(req))
            except LatentHashError as exc:
                queries.append(exc)
        encode_ms = self._encode_queries(queries)
        t1 = time.perf_counter()
        valid = [i for i, q in enumerate(queries) if isinstance(q, dict)]
        batch = [(queries[i]["codes"], queries[i]["features"], queries[i]["options"] | {"label": queries[i]["label"]})
                 for i in valid]
        found = self.search_batcher.submit_many(batch) if self.search_batcher is not None \
            else self.searcher.search_many(batch)
        results: list = [q if isinstance(q, LatentHashError) else None for q in queries]
        for i, res in zip(valid, found):
            results[i] = res
        search_ms = (time.perf_counter() - t1) * 1e3
        return [res if isinstance(res, BaseException) else self._response(res, encode_ms, search_ms, t0)
                for res in results]

    def _response(self, result, encode_ms: float, search_ms: float, t0: float) -> pb.SearchResponse:
        texts = self.searcher.index.metadata_json(result.ids[0, :result.counts[0]])  # sent on as stored
        resp = wire.to_search_response(result, texts)
        resp.timings.CopyFrom(pb.Timings(encode_ms=encode_ms, search_ms=search_ms,
                                         total_ms=(time.perf_counter() - t0) * 1e3))
        return resp

    @staticmethod
    def _first_error(responses: list) -> list:
        """The responses, or the first request's error raised (naming the request when there are several)."""
        for i, r in enumerate(responses):
            if isinstance(r, BaseException):
                if len(responses) > 1 and isinstance(r, LatentHashError):
                    raise r.at(i)
                raise r
        return responses

    # -------------------------------------------------------------------------------------------- RPCs
    @rpc
    def Search(self, request, context):
        return self._first_error(self._search_many([request]))[0]

    @rpc
    def SearchBatch(self, request, context):
        if not request.requests:
            raise InvalidInput("empty batch: add at least one request")
        if len(request.requests) > MAX_BATCH_QUERIES:
            raise InvalidInput(f"one SearchBatch takes at most {MAX_BATCH_QUERIES} requests; split it")
        return pb.SearchBatchResponse(responses=self._first_error(self._search_many(request.requests)))

    @rpc
    def SearchCodes(self, request, context):
        """Columnar: one frombuffer for the codes, one index search, flat hit arrays out (no message per hit).
        Searched directly, not through the search batcher: the call is a batch already."""
        t0 = time.perf_counter()
        index = self.searcher.index
        nb = (index.bits + 7) // 8
        n, extra = divmod(len(request.codes), nb)
        if n == 0 or extra:
            raise InvalidInput(f"codes holds {len(request.codes)} bytes: send n >= 1 packed {index.bits}-bit codes "
                               f"back to back, {nb} bytes each (MSB-first)")
        if n > MAX_BATCH_QUERIES:
            raise InvalidInput(f"one SearchCodes takes at most {MAX_BATCH_QUERIES} codes, got {n}; split it")
        features = None
        if request.features:
            dim = index.feature_dim or 0
            if not dim:
                raise InvalidInput("this index stores no features: leave features empty")
            if len(request.features) != n * dim * 4:
                raise InvalidInput(f"features holds {len(request.features)} bytes; {n} codes need {n} x {dim} "
                                   f"float32 values ({n * dim * 4} bytes, little-endian)")
            features = np.frombuffer(request.features, "<f4").reshape(n, dim)
        t1 = time.perf_counter()
        result = self.searcher.search(codes=np.frombuffer(request.codes, np.uint8).reshape(n, nb), features=features,
                                      label=request.label if request.HasField("label") else None, metadata=False,
                                      **self._options(request))
        search_ms = (time.perf_counter() - t1) * 1e3
        resp = wire.to_codes_response(result, None if request.skip_metadata else index.metadata_json)
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
                    responses = self._search_many(batch) if batch else []
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
        ids, codes, features, metadata, image_rows, images = [], [], [], [], [], []
        index = self.searcher.index
        for n, item in enumerate(request_iterator):
            if n >= MAX_UPSERT_ITEMS:
                raise InvalidInput(f"one Upsert stream takes at most {MAX_UPSERT_ITEMS} items; split the stream")
            try:
                kind = item.WhichOneof("content")
                if kind is None:
                    raise InvalidInput(f"item {n} (id {item.id}): set image, tensor or code")
                ids.append(item.id)
                metadata.append(parse_metadata_json(item.metadata_json, n) if item.metadata_json else None)
                if kind == "code":
                    codes.append(self._code(item.code)[0])
                    if index.feature_dim and len(item.feature) != index.feature_dim:
                        raise InvalidInput(f"item {n} (id {item.id}): this index stores {index.feature_dim}-d "
                                           f"features; got {len(item.feature)} values")
                    features.append(np.asarray(item.feature, np.float32) if index.feature_dim else None)
                else:
                    codes.append(None)
                    features.append(None)
                    image_rows.append(n)
                    images.append(item.image if kind == "image" else self._tensor(item.tensor)[0])
            except LatentHashError as exc:
                raise exc.at(n) from None
        if not ids:
            raise InvalidInput("empty Upsert stream: send at least one item")
        if images:
            enc = self._encode(images)
            for j, row in enumerate(image_rows):
                codes[row], features[row] = enc.codes[j], enc.features[j]
        id_arr, code_arr, meta_texts = check_items(ids, np.stack(codes), metadata, index.bits)
        feat_arr = check_features(np.stack(features), len(ids), index.feature_dim) if index.feature_dim else None
        with self.write_lock:
            if self.wal is not None:  # durable before applied and acknowledged
                self.wal.append_upsert(id_arr, code_arr, feat_arr, meta_texts)
            _, replaced = self.searcher.upsert(id_arr, codes=code_arr, features=feat_arr, metadata=metadata)
            self._maybe_checkpoint()
        if self.metrics.enabled:  # len() of a remote index is a round trip: only when someone reads it
            self.metrics.set_items(len(index))
        return pb.UpsertResponse(upserted=len(ids), replaced=replaced)

    @rpc
    def Delete(self, request, context):
        if not request.ids:
            raise InvalidInput("empty Delete: pass at least one id")
        ids = np.asarray(request.ids, np.int64)
        with self.write_lock:
            if self.wal is not None:
                self.wal.append_delete(ids)
            deleted, missing = self.searcher.delete(ids)
        if self.metrics.enabled:
            self.metrics.set_items(len(self.searcher.index))
        return pb.DeleteResponse(deleted=deleted, missing=missing)

    @rpc
    def Get(self, request, context):
        if not request.ids:
            raise InvalidInput("empty Get: pass at least one id")
        return wire.to_items(self.searcher.get(np.asarray(request.ids, np.int64)))

    @rpc
    def Duplicates(self, request, context):
        """Found in full before the first group is sent, so any error is the call's status."""
        groups = self.searcher.duplicates(radius=request.radius if request.HasField("radius") else None,
                                          min_score=request.min_score if request.HasField("min_score") else None)
        return iter([wire.to_duplicate_group(g) for g in groups])

    @rpc
    def Stats(self, request, context):
        return wire.to_stats(self.searcher.stats())

    @rpc
    def Encode(self, request, context):
        inputs = list(request.images) + [self._tensor(t)[0] for t in request.tensors]
        if not inputs:
            raise InvalidInput("empty Encode: pass images or tensors")
        enc = self._encode(inputs)
        return wire.to_encoded(enc)

    # -------------------------------------------------------------------------------------------- persistence
    def _maybe_checkpoint(self) -> None:
        if self.wal is not None and self.wal.size() > CHECKPOINT_WAL_BYTES:
            self.checkpoint()

    def checkpoint(self) -> bool:
        """Save the index, then empty the log (the caller holds the write lock or the server is stopped). A save
        that fails (full or read-only disk) is logged and leaves the log as it is: nothing is lost, and the next
        checkpoint tries again. Returns whether the index is saved."""
        if self.searcher.index.path is None:
            return False
        try:
            self.searcher.index.save()
        except (OSError, LatentHashError) as exc:
            log.error(json.dumps({"event": "checkpoint_failed", "error": str(exc),
                                  "wal_bytes": self.wal.size() if self.wal else 0}))
            return False
        if self.wal is not None:
            self.wal.truncate()
        return True
