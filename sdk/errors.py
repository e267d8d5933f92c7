"""One exception family for embedded and remote use.

Every error the SDK raises on purpose is a `LatentHashError`; each subclass names the gRPC status code that the
server sends for it and that the client maps back, so the same mistake raises the same exception whether the index
is in-process or behind `latenthash serve`.
"""

from __future__ import annotations


class LatentHashError(Exception):
    """Base class of every error raised on purpose by latenthash."""

    grpc_code = "INTERNAL"


class InvalidInput(LatentHashError, ValueError):
    """The caller passed something malformed (shape, dtype, range, undecodable image); the message says the fix."""

    grpc_code = "INVALID_ARGUMENT"


class NotFound(LatentHashError, KeyError):
    """An id, file or run directory that does not exist."""

    grpc_code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DataError(LatentHashError):
    """A data file is missing, truncated or not in the format its name promises."""

    grpc_code = "FAILED_PRECONDITION"


class IndexCorrupt(LatentHashError):
    """An index directory fails its header or checksum checks."""

    grpc_code = "DATA_LOSS"


class ModelMismatch(LatentHashError):
    """A model and an index (or a code and an index) disagree on bits, feature size or input shape."""

    grpc_code = "FAILED_PRECONDITION"


class MissingDependency(LatentHashError, ImportError):
    """An optional heavy dependency (torch, tensorrt, onnx ...) is not installed; the message says what to install."""

    grpc_code = "UNIMPLEMENTED"


class ExportCheckFailed(LatentHashError):
    """An exported model failed a parity check against its reference."""


class Unauthenticated(LatentHashError):
    """A missing or wrong bearer token."""

    grpc_code = "UNAUTHENTICATED"


class Unavailable(LatentHashError):
    """The service cannot be reached (after retries) or is shutting down."""

    grpc_code = "UNAVAILABLE"


def require(module: str, *, extra: str, purpose: str):
    """Import an optional heavy module, or raise `MissingDependency` that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"{purpose} needs the '{module}' package, which is not installed: "
            f"pip install 'latenthash[{extra}]' (for torch, first: pip install torch==2.13.0)"
        ) from exc
