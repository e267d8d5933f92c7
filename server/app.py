"""The gRPC server: `create_server(config) -> (server, port)` builds and starts it; `serve(config)` runs it until
SIGTERM / SIGINT, then finishes in-flight calls and persists the index.

Start-up: the server answers health and searches as soon as the index is open; until the kernels are compiled
(seconds on a fresh install, less than one from Numba's cache), searches are answered without them (numpy_search),
and `create_server` returns once they are.

Durability: Upserts and Deletes go through the write-ahead log (server/wal.py) before they are applied and
acknowledged; shutdown saves the index and truncates the log; a crash is recovered by replaying the log on start.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc

from latenthash.backend import index_directory, open_index, saved_index_at
from latenthash.errors import InvalidInput, LatentHashError, NotFound
from latenthash.limits import MAX_MESSAGE_MB
from latenthash.search import Searcher
from latenthash.server.auth import TokenInterceptor, Tokens, server_credentials
from latenthash.server.batching import encode_batcher, search_batcher
from latenthash.server.handlers import add_service
from latenthash.server.metrics import Metrics
from latenthash.server.service import HashSearchService
from latenthash.server.wal import WriteAheadLog
from latenthash.storage import DirLock
from latenthash.v1 import search_pb2

CHECKPOINT_WAL_BYTES = 64 << 20  # log replayed after a crash at most (start-up time), between checkpoints

log = logging.getLogger("latenthash.server")
SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["HashSearch"].full_name
WAL_NAME = "wal.log"


@dataclass
class ServerConfig:
    index: str  # index directory or milvus:// URI
    create: bool = False  # create the index when missing (bits / feature_dim from the model)
    model: str | None = None  # exported ONNX model; without it the server answers code queries only
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port
    token: str | None = None  # a write token (see auth.py)
    tokens: str | None = None  # a token file: one "TOKEN read|write" a line, read again on SIGHUP
    tls_cert: str | None = None
    tls_key: str | None = None
    runtime: str = "auto"
    max_workers: int = 32
    max_message_mb: int = MAX_MESSAGE_MB
    batch_max: int = 64  # images per dynamic encode batch (1: off)
    batch_delay_ms: float = 2.0
    search_batch_max: int = 64  # concurrent queries merged into one index search (1: off)
    search_batch_delay_ms: float = 0.0  # 0: merge only what queued while the previous search ran
    metrics_port: int | None = None
    grace_s: float = 10.0


class LatentHashServer:
    """A running server: the grpc.Server plus what must be closed and persisted with it."""

    def __init__(self, grpc_server: grpc.Server, service: HashSearchService, health, metrics: Metrics,
                 lock: DirLock, tokens: Tokens | None = None, stopped: threading.Event | None = None):
        self.lock = lock
        self.tokens = tokens
        self.grpc_server = grpc_server
        self.service = service
        self.health = health
        self.metrics = metrics
        self._stopped = stopped or threading.Event()

    @property
    def searcher(self) -> Searcher:
        return self.service.searcher

    def stop(self, grace: float | None = 10.0) -> None:
        """Refuse new calls, finish in-flight ones (up to `grace` seconds), then persist the index."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        from grpc_health.v1 import health_pb2

        self.health.enter_graceful_shutdown()
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        # grpc cancels what is still running when the grace ends; its event is awaited a bounded time only, so a
        # handler stuck anywhere cannot keep the index from being checkpointed
        if not self.grpc_server.stop(grace).wait(None if grace is None else grace + 2.0):
            log.warning(json.dumps({"event": "stop_timeout", "grace_s": grace}))
        for batcher in (self.service.batcher, self.service.search_batcher):
            if batcher is not None:
                batcher.close()
        with self.service.write_lock:  # a write still running finishes (and is logged) before the checkpoint
            saved = checkpoint(self.searcher, self.service.wal)
            if self.service.wal is not None:
                self.service.wal.close()
        self.metrics.close()
        self.lock.release()
        log.info(json.dumps({"event": "stopped", "items": len(self.searcher), "checkpointed": saved}))

    def reload_tokens(self) -> None:
        """Read the token file again (SIGHUP): new calls see the new table, admitted calls run on. A file that fails
        to parse is logged and the old table stays."""
        if self.tokens is None or self.tokens.path is None:
            log.warning(json.dumps({"event": "tokens_not_reloaded", "reason": "no --tokens file"}))
            return
        try:
            log.info(json.dumps({"event": "tokens_reloaded", "tokens": self.tokens.reload()}))
        except InvalidInput as exc:
            log.error(json.dumps({"event": "tokens_reload_failed", "error": str(exc)}))

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def watch_backend(searcher: Searcher, health, stopped: threading.Event, every_s: float = 1.0) -> None:
    """Health follows the backend (a Milvus behind the server): NOT_SERVING while it does not answer a ping,
    SERVING again once it does, each change logged. Calls meanwhile are answered UNAVAILABLE by the backend's
    own errors; nothing here restarts anything: the backend's client reconnects by itself."""
    from grpc_health.v1 import health_pb2

    serving = True
    while not stopped.wait(every_s):
        try:
            searcher.ping(timeout=every_s)
            ok = True
        except LatentHashError as exc:
            ok, reason = False, str(exc)
        if ok != serving and not stopped.is_set():
            serving = ok
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in (SERVICE_NAME, ""):
                health.set(name, status)
            log.warning(json.dumps({"event": "backend_back" if ok else "backend_unreachable",
                                    **({} if ok else {"error": reason})}))


def checkpoint(searcher: Searcher, wal: WriteAheadLog | None, min_log_bytes: int = 0) -> bool:
    """The checkpoint policy: once the log holds at least `min_log_bytes`, save the index, then empty the log (the
    caller holds the write lock or the server is stopped). A save that fails (full or read-only disk) is logged and
    leaves the log as it is: nothing is lost, and the next checkpoint tries again. Returns whether it saved."""
    if wal is not None and wal.size() < min_log_bytes:
        return False
    try:
        if not searcher.save():
            return False
    except (OSError, LatentHashError) as exc:
        log.error(json.dumps({"event": "checkpoint_failed", "error": str(exc), "wal_bytes": wal.size() if wal else 0}))
        return False
    if wal is not None:
        wal.truncate()
    return True


def open_searcher(config: ServerConfig) -> tuple[Searcher, WriteAheadLog | None, DirLock]:
    """The model and the index, with the write-ahead log replayed onto it and checkpointed, and the directory's
    lock held (one writing process per index directory).

    A directory index gets a write-ahead log next to it (fsynced before an upsert is applied and acknowledged); a
    Milvus index (milvus://...) gets none: Milvus acknowledges a write once it is in its own log. A missing index is
    created from the model's shape only with `create=True`."""
    from latenthash.encoder import Encoder

    encoder = Encoder.open(config.model, runtime=config.runtime) if config.model else None
    shape = {"bits": encoder.bits, "feature_dim": encoder.feature_dim} if encoder else {}
    root = index_directory(config.index)
    if root is None:
        index = open_index(config.index, create=config.create and encoder is not None, **shape)
        index.defer_warmup()
        return Searcher(index, encoder), None, DirLock(None)
    if not saved_index_at(root):
        if not config.create:
            raise NotFound(f"no index at {root}: check the path, or pass --create (with --model) to start an "
                           f"empty one")
        if encoder is None:
            raise NotFound(f"no index at {root}, and no --model to create one with")
    lock = DirLock(root)  # before anything is read or written: another server or indexer may own the directory
    try:
        # compiling starts in the background at open and finishes in create_server's thread once serving: with
        # either alone, the service's searches ran at half speed afterwards (measured; see HashIndex.warmup)
        index = open_index(root, create=True, **shape)
        if encoder is not None:
            index.model_info = index.model_info or encoder.info.to_dict()
        wal = WriteAheadLog(root / WAL_NAME)
        replayed = wal.replay(index)
        if replayed or wal.found.damaged:
            log.info(json.dumps({"event": "wal_replayed", "records": replayed, "items": len(index)}))
            try:  # start from a clean log: crashes never pile up log to replay
                index.save()
                wal.truncate()
            except (OSError, LatentHashError) as exc:  # a full disk: serve on, the log keeps everything
                log.error(json.dumps({"event": "checkpoint_failed", "error": str(exc), "wal_bytes": wal.size()}))
    except BaseException:
        lock.release()
        raise
    index.defer_warmup()  # until create_server warms it up, searches are answered without compiled kernels
    return Searcher(index, encoder), wal, lock


def create_server(config: ServerConfig, *, on_serving: Callable[[LatentHashServer, int], None] | None = None
                  ) -> tuple[LatentHashServer, int]:
    """Build and start the server; returns it and the bound port (config.port 0 picks a free one) once its kernels
    are compiled. It serves before that (until then searches are answered without compiled kernels):
    `on_serving(server, port)` is called, in this thread, as soon as it does (what `serve` announces itself from:
    a fresh install's first compilation is slow, see RESULTS.md)."""
    from grpc_health.v1 import health, health_pb2
    from grpc_reflection.v1alpha import reflection, reflection_pb2

    check_token(config)
    stopped = threading.Event()
    tokens = Tokens(config.token, config.tokens) if config.token or config.tokens else None
    searcher, wal, lock = open_searcher(config)
    metrics = Metrics(config.metrics_port, config.host) if config.metrics_port is not None else Metrics(None)
    batcher = (encode_batcher(searcher.encoder, max_batch=config.batch_max, max_delay_ms=config.batch_delay_ms)
               if searcher.encoder is not None and config.batch_max > 1 else None)
    searches = (search_batcher(searcher, max_batch=config.search_batch_max,
                               max_delay_ms=config.search_batch_delay_ms) if config.search_batch_max > 1 else None)
    policy = None if wal is None else lambda: checkpoint(searcher, wal, CHECKPOINT_WAL_BYTES)
    service = HashSearchService(searcher, batcher=batcher, search_batcher=searches, wal=wal, metrics=metrics,
                                after_write=policy)
    size = config.max_message_mb << 20
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="latenthash-rpc"),
        interceptors=[TokenInterceptor(tokens)] if tokens else [],
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                 ("grpc.so_reuseport", 0)])
    add_service(server, service, search_pb2.DESCRIPTOR.services_by_name["HashSearch"])
    health_servicer = health.HealthServicer()
    add_service(server, health_servicer, health_pb2.DESCRIPTOR.services_by_name["Health"])
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    add_service(server, reflection.ReflectionServicer(names),
                reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"])
    address = f"{config.host}:{config.port}"
    if config.tls_cert or config.tls_key:
        port = server.add_secure_port(address, server_credentials(config.tls_cert, config.tls_key))
    else:
        port = server.add_insecure_port(address)
    server.start()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if index_directory(config.index) is None:  # a backend behind a network: health follows it
        threading.Thread(target=watch_backend, args=(searcher, health_servicer, stopped), daemon=True,
                         name="latenthash-backend-watch").start()
    log.info(json.dumps({"event": "started", "address": f"{config.host}:{port}", "items": len(searcher),
                         "tls": bool(config.tls_cert), "auth": bool(tokens), "metrics_port": metrics.port}))
    running = LatentHashServer(server, service, health_servicer, metrics, lock, tokens, stopped)
    try:  # serving already (without compiled kernels); compiled in this thread, as it runs on (see warmup)
        if on_serving is not None:
            on_serving(running, port)
        log.info(json.dumps({"event": "warm", "seconds": round(searcher.warmup(), 3)}))
    except BaseException:
        running.stop(0)
        raise
    return running, port


def check_token(config: ServerConfig) -> None:
    """An empty token would silently turn authentication off: refuse it. A token sent without TLS crosses the
    network in the clear: say so."""
    if config.token is not None and not config.token.strip():
        raise InvalidInput("the token is empty (--token or LATENTHASH_TOKEN): pass a non-empty token, or unset it "
                           "to serve without authentication")
    if (config.token or config.tokens) and not config.tls_cert and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(json.dumps({"event": "token_without_tls", "message": "the bearer token crosses the network "
                                "in the clear: add --tls-cert and --tls-key"}))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger and the message (itself JSON where the server wrote it)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        try:
            body = json.loads(msg)
        except ValueError:
            body = {"message": msg}
        if not isinstance(body, dict):
            body = {"message": body}
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name, **body}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT; then finish in-flight calls and persist the index."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    done = threading.Event()

    def on_signal(signum, frame):
        log.info(json.dumps({"event": "signal", "signal": signal.Signals(signum).name}))
        done.set()

    def serving(server: LatentHashServer, port: int) -> None:  # as soon as it serves, while the kernels compile
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(target=server.reload_tokens).start())
        print(f"latenthash serving on {config.host}:{port}", flush=True)

    server, _ = create_server(config, on_serving=serving)
    done.wait()
    server.stop(config.grace_s)
