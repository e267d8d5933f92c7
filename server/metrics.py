"""Prometheus metrics (request counts, latencies, index size) on an optional HTTP port; one registry per server."""

from __future__ import annotations


class Metrics:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1"):
        self.enabled = port is not None
        self.port = None
        if port is None:
            return
        from latenthash.errors import require

        require("prometheus_client", extra="server", purpose="the metrics endpoint (--metrics-port)")
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        self.requests = Counter("latenthash_requests", "RPCs handled", ["method", "code"], registry=self.registry)
        self.latency = Histogram("latenthash_request_seconds", "RPC latency", ["method"], registry=self.registry,
                                 buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1))
        self.items = Gauge("latenthash_index_items", "items in the index", registry=self.registry)
        self.http, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = self.http.server_port

    def observe(self, method: str, code: str, seconds: float) -> None:
        if self.enabled:
            self.requests.labels(method, code).inc()
            self.latency.labels(method).observe(seconds)

    def set_items(self, n: int) -> None:
        if self.enabled:
            self.items.set(n)

    def close(self) -> None:
        if self.enabled:
            self.http.shutdown()
