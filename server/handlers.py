"""Registering servicers so that a malformed message is the caller's error, not the server's; and `rpc`, which
answers every error of the family with its class's status.

grpcio answers a request that fails to deserialize with INTERNAL ("Exception deserializing request!"), and on a
stream it can leave the handler waiting for a message that never comes. Here every service (ours, health and
reflection) is registered from its descriptor with a deserializer that never raises: a message that does not parse
becomes `Malformed`, and the call ends with INVALID_ARGUMENT naming what failed to parse (on a request stream, where
the handler reads that message: the messages before it are handled as usual).
"""

from __future__ import annotations

import functools
import json
import logging
import time

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from latenthash.errors import InvalidInput, LatentHashError, to_trailers

log = logging.getLogger("latenthash.server")


class Malformed:
    """A request message that failed to parse, and why."""

    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error


def _deserializer(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's malformed message
            return Malformed(f"{type(exc).__name__}: {exc}")

    return parse


class MalformedRequest(InvalidInput):
    """A message of a request stream failed to parse (raised where the handler reads it)."""


def _message(bad: Malformed) -> str:
    return f"malformed request message ({bad.error}): send a valid protobuf message of the method's request type"


def _checked(requests):
    """A request stream that raises MalformedRequest at the first message that failed to parse."""
    for request in requests:
        if isinstance(request, Malformed):
            raise MalformedRequest(_message(request))
        yield request


def _unary(behaviour):
    def handle(request, context):
        if isinstance(request, Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(request))
        return behaviour(request, context)

    return handle


def _stream_unary(behaviour):
    def handle(requests, context):
        try:
            return behaviour(_checked(requests), context)
        except MalformedRequest as exc:  # a servicer that does not map errors itself (ours does: same status)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    return handle


def _stream_stream(behaviour):
    def handle(requests, context):
        try:
            yield from behaviour(_checked(requests), context)
        except MalformedRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    return handle


def add_service(server: grpc.Server, servicer, service: ServiceDescriptor) -> None:
    """Register every method of `service` (a protobuf ServiceDescriptor) implemented by `servicer`."""
    handlers = {}
    for method in service.methods:
        request = _deserializer(message_factory.GetMessageClass(method.input_type))
        response = message_factory.GetMessageClass(method.output_type).SerializeToString
        behaviour = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _stream_stream(behaviour), request_deserializer=request, response_serializer=response)
        elif method.client_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                _stream_unary(behaviour), request_deserializer=request, response_serializer=response)
        else:
            make = grpc.unary_stream_rpc_method_handler if method.server_streaming \
                else grpc.unary_unary_rpc_method_handler
            handlers[method.name] = make(_unary(behaviour), request_deserializer=request,
                                         response_serializer=response)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def abort(context, exc: LatentHashError):
    """End the call with the error's status, message, class and request index (see errors.to_trailers)."""
    context.set_trailing_metadata(to_trailers(exc))
    context.abort(getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL), str(exc))


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
