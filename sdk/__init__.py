"""latenthash: image search with latent-hash-layer codes.

Pipeline: train (latenthash.export) -> export ONNX -> encode (Encoder) -> index (HashIndex) -> search -> serve.
`import latenthash` is light: numba, onnxruntime, tensorrt and torch load only when first used.
"""

from latenthash.backend import CodesLike, FeaturesLike, IdsLike, IndexBackend, Items, SearchResult, open_index
from latenthash.codes import pack_codes, unpack_codes
from latenthash.errors import (
    DataError,
    IndexCorrupt,
    InvalidInput,
    LatentHashError,
    MissingDependency,
    ModelMismatch,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from latenthash.index import HashIndex

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

_LAZY = {"Encoder": "latenthash.encoder", "Searcher": "latenthash.search", "Client": "latenthash.client",
         "AsyncClient": "latenthash.client"}


def __getattr__(name: str):
    """`latenthash.Encoder`, `Searcher`, `Client`, `AsyncClient`, imported on first use (grpc and onnxruntime stay
    unloaded until then)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'latenthash' has no attribute {name!r}")


__all__ = [
    "HashIndex", "IndexBackend", "Items", "SearchResult", "open_index", "IdsLike", "CodesLike", "FeaturesLike",
    "pack_codes", "unpack_codes",
    "LatentHashError", "InvalidInput", "NotFound", "DataError", "IndexCorrupt", "ModelMismatch",
    "MissingDependency", "Unauthenticated", "Unavailable", "__version__", "Encoder", "Searcher", "Client",
    "AsyncClient",
]
