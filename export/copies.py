"""Altered copies of training images, the views the copy term of training pulls together: what a collection's
near-duplicates look like after a user's tools touched them (re-encoded as JPEG, rescaled, shifted, made brighter or
darker), decoded and resized back to the model's input as the encoder would.

The ranges are wider than any one benchmark's alterations, so the features learn copies in general rather than one
recipe.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

SHIFT = 3  # pixels, either way
SCALE = (0.8, 1.25)
GAIN = (0.8, 1.2)
JPEG_QUALITY = (40, 95)


def altered_copies(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One altered copy of each uint8 NHWC image, same shape."""
    n, h, w, c = images.shape
    out = np.empty_like(images)
    dy, dx = rng.integers(-SHIFT, SHIFT + 1, (2, n))
    gain = rng.uniform(*GAIN, n)
    scale = rng.uniform(*SCALE, n)
    quality = rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, n)
    padded = np.pad(images, ((0, 0), (SHIFT, SHIFT), (SHIFT, SHIFT), (0, 0)))
    for i in range(n):
        moved = padded[i, SHIFT - dy[i]:SHIFT - dy[i] + h, SHIFT - dx[i]:SHIFT - dx[i] + w]
        bright = np.clip(moved.astype(np.float32) * gain[i], 0, 255).astype(np.uint8)
        img = Image.fromarray(bright[..., 0] if c == 1 else bright)
        img = img.resize((max(1, round(w * scale[i])), max(1, round(h * scale[i]))), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(quality[i]))
        back = Image.open(buf)
        back = back.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(back, dtype=np.uint8)
        out[i] = arr[..., None] if c == 1 else arr
    return out
