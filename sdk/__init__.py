"""latenthash: image search with latent-hash-layer codes.

Pipeline: train (latenthash.export) -> export ONNX -> encode (Encoder) -> index (HashIndex) -> search -> serve.
`import latenthash` is light: numba, onnxruntime, tensorrt and torch load only when first used.
"""

from latenthash.backend import IndexBackend, Items, SearchResult, open_index
from latenthash.codes import pack_codes, unpack_codes
from latenthash.errors import (DataError, IndexCorrupt, InvalidInput, LatentHashError, MissingDependency,
                               ModelMismatch, NotFound, Unauthenticated, Unavailable)
from latenthash.index import HashIndex

__version__ = "0.1.0"

__all__ = [
    "HashIndex", "IndexBackend", "Items", "SearchResult", "open_index", "pack_codes", "unpack_codes",
    "LatentHashError", "InvalidInput", "NotFound", "DataError", "IndexCorrupt", "ModelMismatch",
    "MissingDependency", "Unauthenticated", "Unavailable", "__version__",
]
