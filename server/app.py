"""The gRPC server: `create_server(config) -> (server, port)` builds and starts it; `serve(config)` runs it until
SIGTERM / SIGINT, then finishes in-flight calls and persists the index.

Durability: Upserts and Deletes go through the write-ahead log (server/wal.py) before they are applied and
acknowledged; shutdown saves the index and truncates the log; a crash is recovered by replaying the log on start.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from latenthash.backend import open_index
from latenthash.errors import NotFound
from latenthash.index import HashIndex
from latenthash.search import Searcher
from latenthash.server.auth import TokenInterceptor, server_credentials
from latenthash.server.batching import encode_batcher, search_batcher
from latenthash.server.metrics import Metrics
from latenthash.server.service import HashSearchService
from latenthash.server.wal import WriteAheadLog
from latenthash.v1 import search_pb2, search_pb2_grpc

log = logging.getLogger("latenthash.server")
SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["HashSearch"].full_name
WAL_NAME = "wal.log"


@dataclass
class ServerConfig:
    index: str  # index directory or milvus:// URI (created when missing, with bits / feature_dim from the model)
    model: str | None = None  # exported ONNX model; without it the server answers code queries only
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    runtime: str = "auto"
    max_workers: int = 32
    max_message_mb: int = 64
    batch_max: int = 64  # images per dynamic encode batch (1: off)
    batch_delay_ms: float = 2.0
    search_batch_max: int = 64  # concurrent queries merged into one index search (1: off)
    search_batch_delay_ms: float = 0.0  # 0: merge only what queued while the previous search ran
    metrics_port: int | None = None
    grace_s: float = 10.0


class LatentHashServer:
    """A running server: the grpc.Server plus what must be closed and persisted with it."""

    def __init__(self, grpc_server: grpc.Server, service: HashSearchService, health, metrics: Metrics):
        self.grpc_server = grpc_server
        self.service = service
        self.health = health
        self.metrics = metrics
        self._stopped = threading.Event()

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
        self.grpc_server.stop(grace).wait()
        for batcher in (self.service.batcher, self.service.search_batcher):
            if batcher is not None:
                batcher.close()
        self.service.checkpoint()
        if self.service.wal is not None:
            self.service.wal.close()
        self.metrics.close()
        log.info(json.dumps({"event": "stopped", "items": len(self.searcher.index)}))

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def open_searcher(config: ServerConfig) -> tuple[Searcher, WriteAheadLog | None]:
    """The model and the index (created if missing), with the write-ahead log replayed onto it.

    A directory index gets a write-ahead log next to it (fsynced before an upsert is applied and acknowledged); a
    Milvus index (milvus://...) gets none: Milvus acknowledges a write once it is in its own log."""
    from latenthash.encoder import Encoder

    encoder = Encoder.open(config.model, runtime=config.runtime) if config.model else None
    shape = {"bits": encoder.bits, "feature_dim": encoder.feature_dim} if encoder else {}
    if "://" in config.index and not config.index.startswith("file://"):
        index = open_index(config.index, create=encoder is not None, **shape)
        index.warmup()
        return Searcher(index, encoder), None
    root = Path(config.index.removeprefix("file://"))
    if (root / "CURRENT").exists():
        index = HashIndex.open(root)
    elif encoder is not None:
        index = HashIndex(bits=encoder.bits, feature_dim=encoder.feature_dim, path=root)
        index.model_info = encoder.info.to_dict()
        index.save(root)
    else:
        raise NotFound(f"no index at {root}, and no --model to create one with")
    root.mkdir(parents=True, exist_ok=True)
    wal = WriteAheadLog(root / WAL_NAME)
    replayed = wal.replay(index)
    if replayed:
        log.info(json.dumps({"event": "wal_replayed", "records": replayed, "items": len(index)}))
    index.warmup()
    return Searcher(index, encoder), wal


def create_server(config: ServerConfig) -> tuple[LatentHashServer, int]:
    """Build and start the server; returns it and the bound port (config.port 0 picks a free one)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    searcher, wal = open_searcher(config)
    metrics = Metrics(config.metrics_port, config.host) if config.metrics_port is not None else Metrics(None)
    batcher = (encode_batcher(searcher.encoder, max_batch=config.batch_max, max_delay_ms=config.batch_delay_ms)
               if searcher.encoder is not None and config.batch_max > 1 else None)
    searches = (search_batcher(searcher.index, max_batch=config.search_batch_max,
                               max_delay_ms=config.search_batch_delay_ms) if config.search_batch_max > 1 else None)
    service = HashSearchService(searcher, batcher=batcher, search_batcher=searches, wal=wal, metrics=metrics)
    size = config.max_message_mb << 20
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="latenthash-rpc"),
        interceptors=[TokenInterceptor(config.token)] if config.token else [],
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                 ("grpc.so_reuseport", 0)])
    search_pb2_grpc.add_HashSearchServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert or config.tls_key:
        port = server.add_secure_port(address, server_credentials(config.tls_cert, config.tls_key))
    else:
        port = server.add_insecure_port(address)
    server.start()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info(json.dumps({"event": "started", "address": f"{config.host}:{port}", "items": len(searcher.index),
                         "tls": bool(config.tls_cert), "auth": bool(config.token), "metrics_port": metrics.port}))
    return LatentHashServer(server, service, health_servicer, metrics), port


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
    server, port = create_server(config)
    done = threading.Event()

    def on_signal(signum, frame):
        log.info(json.dumps({"event": "signal", "signal": signal.Signals(signum).name}))
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"latenthash serving on {config.host}:{port}", flush=True)
    done.wait()
    server.stop(config.grace_s)
