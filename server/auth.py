"""Bearer tokens with scopes, as a server interceptor, and TLS credentials.

Clients send metadata `authorization: Bearer <token>`. A token has a scope: `read` (searches, Get, Stats, Encode,
Duplicates, reflection) or `write` (also Upsert and Delete). An unknown or missing token is answered
UNAUTHENTICATED, a known token outside its scope PERMISSION_DENIED. Tokens come from a file (`serve --tokens FILE`:
one `TOKEN SCOPE` a line, `#` comments) and from `--token` (a write token); the file is read again by `reload()`
(`serve` calls it on SIGHUP), which swaps the whole table at once: calls already admitted, streams included, run
on. Every known token is compared, in constant time, whatever matches first. The standard health service stays
open so that load balancers and orchestrators can probe without a token.
"""

from __future__ import annotations

import hmac
import threading
from pathlib import Path

import grpc

from latenthash.errors import InvalidInput

OPEN_METHODS = ("/grpc.health.v1.Health/",)
WRITE_METHODS = ("/latenthash.v1.HashSearch/Upsert", "/latenthash.v1.HashSearch/Delete")
SCOPES = ("read", "write")  # write implies read


def read_token_file(path: str | Path) -> dict[bytes, str]:
    """`TOKEN SCOPE` lines (blank lines and `#` comments skipped) as {token: scope}; InvalidInput naming the line."""
    table: dict[bytes, str] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InvalidInput(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    for n, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2 or words[1] not in SCOPES:
            raise InvalidInput(f"{path} line {n}: write 'TOKEN SCOPE' with SCOPE read or write, got {len(words)} "
                               f"words" + (f" and scope {words[1]!r}" if len(words) == 2 else ""))
        if len(words[0]) < 16:
            raise InvalidInput(f"{path} line {n}: a token of {len(words[0])} characters is guessable; use 16 or more "
                               f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        table[words[0].encode()] = words[1]
    if not table:
        raise InvalidInput(f"{path} names no token: add 'TOKEN read' or 'TOKEN write' lines")
    return table


class Tokens:
    """The server's token table: `--token` (write) plus the token file, reloadable."""

    def __init__(self, token: str | None = None, path: str | Path | None = None):
        self.path = path
        self._fixed = {token.encode(): "write"} if token else {}
        self._lock = threading.Lock()
        self.table = self._read()

    def _read(self) -> dict[bytes, str]:
        return {**(read_token_file(self.path) if self.path else {}), **self._fixed}

    def reload(self) -> int:
        """Read the file again and swap the table; a file that fails to parse leaves the old table in force (the
        error is raised). Returns the number of tokens."""
        table = self._read()
        with self._lock:
            self.table = table
        return len(table)

    def scope_of(self, header: str) -> str | None:
        """The scope of an `authorization` header's bearer token; None when it names no known token. Every known
        token is compared in constant time, so the time taken says nothing about which one was near."""
        sent = header.encode()
        sent = sent[7:] if sent.startswith(b"Bearer ") else b""
        found = None
        for token, scope in self.table.items():
            if hmac.compare_digest(sent, token):
                found = scope
        return found


class TokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_METHODS):
            return continuation(handler_call_details)
        headers = [v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"]
        scope = self.tokens.scope_of(str(headers[0])) if headers else None
        if scope == "write" or (scope == "read" and method not in WRITE_METHODS):
            return continuation(handler_call_details)
        if scope is None:
            code, text = grpc.StatusCode.UNAUTHENTICATED, ("missing or unknown bearer token: send metadata "
                                                           "'authorization: Bearer <token>'")
        else:
            code, text = grpc.StatusCode.PERMISSION_DENIED, (f"this token's scope is {scope}; "
                                                             f"{method.rsplit('/', 1)[1]} needs a write token")
        return _refusal(continuation(handler_call_details), code, text)


def _refusal(handler, code: grpc.StatusCode, text: str):
    """A handler of the method's own shape that ends the call with `code` before reading anything."""
    if handler is None:
        return None

    def deny(request, context):
        context.abort(code, text)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(lambda it, ctx: deny(None, ctx))
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(lambda it, ctx: deny(None, ctx))
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


def server_credentials(cert_file: str | Path, key_file: str | Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())])
