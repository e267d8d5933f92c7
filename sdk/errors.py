"""One exception family for embedded and remote use.

Every error the SDK raises on purpose is a `LatentHashError`; each subclass names the gRPC status code that the
server sends for it. The server also sends the class name and, for one request of a batch, its index as trailing
metadata (`to_trailers`), and the client rebuilds the same class with the same `request_index` (`from_status`), so the
same mistake raises the same exception whether the index is in-process or behind `latenthash serve`.
"""

from __future__ import annotations

import errno

CLASS_KEY = "latenthash-error"
INDEX_KEY = "latenthash-request-index"


class LatentHashError(Exception):
    """Base class of every error raised on purpose by latenthash. `request_index`: which request of a batch (or
    which query of a search) it concerns, None when it concerns the whole call. A subclass names the gRPC status
    the server answers it with as a class keyword: `class X(LatentHashError, grpc_code="NOT_FOUND")`."""

    grpc_code = "INTERNAL"
    request_index: int | None = None

    def __init_subclass__(cls, grpc_code: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if grpc_code is not None:
            cls.grpc_code = grpc_code

    def at(self, index: int | None) -> LatentHashError:
        """The same error, naming request `index` of a batch."""
        self.request_index = index
        return self

    def __str__(self) -> str:
        text = str(self.args[0]) if self.args else ""
        return text if self.request_index is None else f"request {self.request_index}: {text}"


class InvalidInput(LatentHashError, ValueError, grpc_code="INVALID_ARGUMENT"):
    """The caller passed something malformed (shape, dtype, range, undecodable image); the message says the fix."""


class NotFound(LatentHashError, KeyError, grpc_code="NOT_FOUND"):
    """An id, file or run directory that does not exist."""

    __str__ = LatentHashError.__str__  # KeyError quotes its message; keep it readable


class FailedPrecondition(LatentHashError, grpc_code="FAILED_PRECONDITION"):
    """The call is well formed but the state it needs is not there (the kinds below)."""


class DataError(FailedPrecondition):
    """A data file is missing, truncated or not in the format its name promises."""


class IndexCorrupt(LatentHashError, grpc_code="DATA_LOSS"):
    """An index directory fails its header or checksum checks."""


class ModelMismatch(FailedPrecondition):
    """A model and an index (or a code and an index) disagree on bits, feature size or input shape."""


class MissingDependency(LatentHashError, ImportError, grpc_code="UNIMPLEMENTED"):
    """An optional heavy dependency (torch, tensorrt, onnx ...) is not installed; the message says what to install."""


class ExportCheckFailed(LatentHashError):
    """An exported model failed a parity check against its reference."""


class Unauthenticated(LatentHashError, grpc_code="UNAUTHENTICATED"):
    """A missing or wrong bearer token."""


class PermissionDenied(LatentHashError, grpc_code="PERMISSION_DENIED"):
    """A known token whose scope does not cover the call (a read token sent with Upsert or Delete)."""


class Unavailable(LatentHashError, grpc_code="UNAVAILABLE"):
    """The service cannot be reached (after retries) or is shutting down."""


class DeadlineExceeded(Unavailable, grpc_code="DEADLINE_EXCEEDED"):
    """The call's deadline passed before it was answered."""


class ResourceExhausted(LatentHashError, grpc_code="RESOURCE_EXHAUSTED"):
    """A size or space limit was reached: a gRPC message over its limit, or the disk (below)."""


class StorageFull(ResourceExhausted):
    """The disk is full (or a quota or file-size limit is reached): nothing of the refused write was stored."""


class StorageUnavailable(Unavailable):
    """The index directory cannot be written (read-only, permissions, I/O error): nothing of the write was stored."""


def require(module: str, *, extra: str | None, purpose: str):
    """Import an optional heavy module, or raise `MissingDependency` that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        how = "pip install latenthash" if not extra else f"pip install 'latenthash[{extra}]'"
        torch = " (for torch, first: pip install torch==2.13.0)" if extra == "train" else ""
        raise MissingDependency(f"{purpose} needs the '{module}' package, which is not installed: {how}{torch}") \
            from exc


def class_for_status(code: str) -> type[LatentHashError]:
    """The class a gRPC status code stands for when no trailer names one (a status from gRPC itself, or from an
    older server): the most general class answered with that code, derived from the classes' `grpc_code`."""
    found: type[LatentHashError] = LatentHashError
    todo = list(LatentHashError.__subclasses__())
    while todo:
        cls = todo.pop(0)  # breadth first
        if vars(cls).get("grpc_code") == code:  # declared by the class, not inherited
            return cls  # breadth first, so the most general class with this code
        todo += cls.__subclasses__()
    return found


def to_trailers(exc: LatentHashError) -> tuple[tuple[str, str], ...]:
    """The class (and request index) of an error as gRPC trailing metadata."""
    out = ((CLASS_KEY, type(exc).__name__),)
    return out + (((INDEX_KEY, str(exc.request_index)),) if exc.request_index is not None else ())


def from_status(code: str, details: str, trailers) -> LatentHashError:
    """The error a server sent: its own class and request index when the trailers name them (else the class for
    the status code), with the server's message."""
    meta = {k: v for k, v in trailers or ()}
    cls = globals().get(meta.get(CLASS_KEY, ""))
    if not (isinstance(cls, type) and issubclass(cls, LatentHashError)):
        cls = class_for_status(code)
    index = meta.get(INDEX_KEY)
    index = int(index) if index is not None and index.lstrip("-").isdigit() else None
    if index is not None:
        details = details.removeprefix(f"request {index}: ")  # str() of the error puts it back
    return cls(f"{details} [{code}]").at(index)


def storage_error(exc: OSError, what: str) -> LatentHashError:
    """An OSError of the disk as the error family's StorageFull (no space) or StorageUnavailable (anything else)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, None):  # None: a short write (numpy says so)
        return StorageFull(f"{what}: {exc.strerror or exc} (errno {exc.errno}); nothing of this request was "
                           f"stored: free disk space and retry")
    return StorageUnavailable(f"{what}: {exc.strerror or exc} (errno {exc.errno}); nothing of this request was "
                              f"stored: check that the directory is writable and retry")
