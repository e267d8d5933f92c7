"""Binary codes: the public packed format and the internal word layout.

Public format: packed uint8 rows of shape (N, ceil(bits / 8)), most significant bit first within each byte, exactly
as `numpy.packbits` makes them (the byte rows FAISS binary indexes take); unused trailing bits are zero.
0/1 or bool arrays of shape (N, bits) are accepted anywhere a code is and packed on the way in.

Internal layout: uint64 words of shape (N, ceil(bits / 64)), the packed bytes zero-padded to whole words and read
little-endian. Hamming distance does not depend on how bytes are grouped into words, so the two layouts give the
same distances, and 48-bit codes cost one word like 64-bit ones.
"""

from __future__ import annotations

import numpy as np

from latenthash.errors import InvalidInput

MIN_BITS, MAX_BITS = 8, 1024


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise InvalidInput(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return int(bits)


def n_bytes(bits: int) -> int:
    return (bits + 7) // 8


def n_words(bits: int) -> int:
    return (bits + 63) // 64


def pack_codes(codes, bits: int) -> np.ndarray:
    """Any accepted code input -> packed uint8 (N, ceil(bits/8)); a single code (1-D) becomes one row.

    Accepted: bool or 0/1 integer arrays (N, bits); packed uint8 arrays (N, ceil(bits/8)) (returned as they are,
    after checking that the padding bits are zero)."""
    bits = check_bits(bits)
    arr = np.asarray(codes)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InvalidInput(f"codes must be a 2-D array (N, bits) or (N, bytes); got shape {arr.shape}")
    nb = n_bytes(bits)
    # one column per bit (bits != bytes for bits >= 8)
    if arr.shape[1] == bits and (arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer)):
        if arr.dtype != np.bool_ and arr.size and (arr.min() < 0 or arr.max() > 1):
            raise InvalidInput(f"unpacked codes must hold only 0 and 1; found values in [{arr.min()}, {arr.max()}]")
        return np.packbits(arr.astype(bool, copy=False), axis=1)
    if arr.shape[1] == nb and arr.dtype == np.uint8:
        if bits % 8 and arr.size and np.any(arr[:, -1] & np.uint8((1 << (8 - bits % 8)) - 1)):
            raise InvalidInput(f"packed {bits}-bit codes must have their {8 - bits % 8} trailing padding bits zero")
        return np.ascontiguousarray(arr)
    raise InvalidInput(
        f"codes of shape {arr.shape} and dtype {arr.dtype} do not fit {bits}-bit codes: pass packed uint8 rows "
        f"(N, {nb}) or bool / 0-1 arrays (N, {bits})"
    )


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Packed uint8 rows -> bool (N, bits)."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, count=bits).astype(bool)


THRESHOLD = 0.5  # a code bit is 1 where the latent layer's sigmoid activation is at least this


def bits_of(probs: np.ndarray) -> np.ndarray:
    """The latent layer's sigmoid activations -> code bits, bool (N, bits)."""
    return np.asarray(probs) >= THRESHOLD


def threshold(probs: np.ndarray) -> np.ndarray:
    """The latent layer's sigmoid activations -> packed codes."""
    return np.packbits(bits_of(probs), axis=1)


def to_words(packed: np.ndarray, bits: int) -> np.ndarray:
    """Packed uint8 rows -> contiguous uint64 words (N, ceil(bits/64)), zero-padded. Rows that are whole words
    already come back as a view of them (no copy: a query's time is counted in microseconds), unless unaligned or
    read-only: the kernels are compiled for aligned, writable arrays, and another kind would compile them again."""
    packed = np.asarray(packed, dtype=np.uint8)
    nw = n_words(bits)
    if packed.ndim == 2 and packed.shape[1] == nw * 8 and packed.flags.c_contiguous:
        words = packed.view("<u8")
        if words.flags.aligned and words.flags.writeable:
            return words
    buf = np.zeros((len(packed), nw * 8), dtype=np.uint8)
    buf[:, : packed.shape[1]] = packed
    return buf.view("<u8")


def from_words(words: np.ndarray, bits: int) -> np.ndarray:
    """uint64 words -> packed uint8 rows (N, ceil(bits/8))."""
    return np.ascontiguousarray(np.asarray(words, dtype="<u8").view(np.uint8)[:, : n_bytes(bits)])
