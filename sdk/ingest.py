"""Bulk indexing: encode an image collection in batches and add it to an index, with a progress bar."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from latenthash.backend import IndexBackend
from latenthash.encoder import Encoder


def add_images(index: IndexBackend, encoder: Encoder, images: np.ndarray, *, ids: np.ndarray,
               metadata: Sequence[Any] | None = None, batch_size: int = 512, progress: bool = True) -> int:
    """Encode uint8 NHWC `images` with `encoder` and add them under `ids`; returns the number added."""
    from tqdm import tqdm

    if len(ids) != len(images):
        from latenthash.errors import InvalidInput

        raise InvalidInput(f"{len(ids)} ids for {len(images)} images")
    with tqdm(total=len(images), desc="index", unit="img", disable=not progress) as bar:
        for lo in range(0, len(images), batch_size):
            hi = min(len(images), lo + batch_size)
            enc = encoder.encode(images[lo:hi])
            index.add(ids[lo:hi], enc.codes, enc.features if index.feature_dim else None,
                      list(metadata[lo:hi]) if metadata is not None else None)
            bar.update(hi - lo)
    return len(images)
