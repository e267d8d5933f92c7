"""A client's gRPC channel: message limits, the retry policy, TLS and the bearer token; and a failed call as the
error family's exception."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc

from latenthash import errors


def connect(target: str, token: str | None, tls: bool | str | Path, retries: int, max_message_mb: int, *,
            aio: bool):
    """(channel, call metadata) for `target`: grpc.aio's channel when `aio`. Calls that fail with UNAVAILABLE are
    retried `retries` times with exponential backoff by gRPC's own retry policy; `tls` is True (system roots) or
    the path of a CA certificate; `token` defaults to the LATENTHASH_TOKEN environment variable."""
    options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", max_message_mb << 20),
                                            ("grpc.max_send_message_length", max_message_mb << 20)]
    if retries > 0:  # gRPC's policy counts attempts, at least 2
        config = {"methodConfig": [{"name": [{"service": "latenthash.v1.HashSearch"}], "retryPolicy": {
            "maxAttempts": retries + 1, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"]}}]}
        options += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]
    else:
        options.append(("grpc.enable_retries", 0))
    token = token if token is not None else os.environ.get("LATENTHASH_TOKEN") or None
    kind = grpc.aio if aio else grpc
    if tls:
        root = Path(tls).read_bytes() if isinstance(tls, (str, Path)) else None
        channel = kind.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root), options)
    else:
        channel = kind.insecure_channel(target, options)
    return channel, ((("authorization", f"Bearer {token}"),) if token else ())


def rpc_error(exc: grpc.RpcError) -> errors.LatentHashError:
    """A failed call as the class the server raised (named in its trailers), else the class of its status."""
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return errors.from_status(exc.code().name, exc.details(), trailers)
