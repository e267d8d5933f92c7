"""Every limit latenthash enforces, and the search defaults, written once: the SDK, the server and the docs
(docs/reliability.md) read them from here. A request past a limit is refused with `InvalidInput` (gRPC
INVALID_ARGUMENT) naming the limit, before anything is written.
"""

from __future__ import annotations

MAX_K = 10_000  # hits per query (k), embedded and remote alike; a backend may declare a lower max_k of its own
MAX_POOL = 1_000_000  # step-1 candidates per query (pool)
MAX_IMAGE_PIXELS = 40_000_000  # declared width x height of an encoded image, checked before it is decoded
MAX_METADATA_BYTES = 65_536  # one item's metadata as JSON text (UTF-8 bytes)
MAX_METADATA_DEPTH = 64  # nesting of arrays and objects in one item's metadata
MAX_UPSERT_ITEMS = 100_000  # items in one Upsert stream
MAX_BATCH_QUERIES = 10_000  # requests in one SearchBatch, codes in one SearchCodes
MAX_MESSAGE_MB = 64  # one gRPC message, either way (server and client default)
# near-duplicate groups (dedup.py): codes within this Hamming radius, features at least this cosine (measured on
# altered copies of Fashion-MNIST images: benchmarks/bench_dedup.py, RESULTS.md)
DEDUP_RADIUS = 2
DEDUP_MIN_SCORE = 0.998
# copy groups by copy descriptors (copies.py): the margins of groups of 2, 3, 4 over outsiders, the cosine every
# link inside a group reaches, and each item's step-1 pool in the copy index (measured on planted altered copies:
# benchmarks/bench_dedup.py, RESULTS.md)
COPY_MARGINS = (0.01, 0.05, 0.08)
COPY_FLOOR = 0.88
COPY_POOL = 10_000


def pool_size(k: int, pool: int | None = None) -> int:
    """Step 1's pool target: `pool` when a search names one, else max(100 k, 10,000) (recall against time at 60k
    and ~1M items: benchmarks/RESULTS.md). The one place the default is applied."""
    return min(max(100 * k, 10_000), MAX_POOL) if pool is None else pool
