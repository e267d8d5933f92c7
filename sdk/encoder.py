"""`Encoder`: images -> packed codes and L2-normalized features, with nothing but the exported ONNX file.

Accepts a uint8 array batch (N, H, W, C) or one image (H, W, C) / (H, W) of exactly the model's input size, PIL
images, or encoded image bytes (JPEG, PNG ...); images and bytes are decoded and resized with Pillow to the size
in the model's metadata. The runtime (ONNX Runtime or TensorRT) is chosen by name.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from latenthash.codes import n_bytes, threshold
from latenthash.errors import InvalidInput, ModelMismatch
from latenthash.limits import MAX_IMAGE_PIXELS
from latenthash.precision import precision_of


@dataclass
class EncodeResult:
    codes: np.ndarray  # packed uint8 (N, ceil(bits/8)): the index's public code format
    features: np.ndarray  # float32 (N, feature_dim), L2-normalized
    probs: np.ndarray | None = None  # float32 (N, bits): H's sigmoid activations, on request

    def __len__(self) -> int:
        return len(self.codes)


@dataclass(frozen=True)
class ModelInfo:
    """What the exported model says about itself (its `metadata_props`)."""

    bits: int
    feature_dim: int
    height: int
    width: int
    channels: int
    class_names: tuple[str, ...]
    dataset: str
    version: str
    precision: str = "fp32"  # fp32, fp16 or int8 (sdk/precision.py)
    data_source: dict | None = None  # the data it was trained on, as the run recorded it (export/data.py)
    copy_dim: int = 0  # size of its copy descriptors (`Encoder.describe_copies`); 0: it has no copy head

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: str) -> ModelInfo:
        import json

        try:
            return cls(int(meta["bits"]), int(meta["feature_dim"]), int(meta["input_height"]),
                       int(meta["input_width"]), int(meta["input_channels"]),
                       tuple(json.loads(meta.get("class_names", "[]"))), meta.get("dataset", ""),
                       meta.get("latenthash_version", ""), precision_of(meta),
                       json.loads(meta["data_source"]) if "data_source" in meta else None,
                       int(meta.get("copy_dim", 0)))
        except (KeyError, ValueError) as exc:
            raise ModelMismatch(f"{path} lacks latenthash metadata ({exc}): export it with `latenthash export`") \
                from None

    def to_metadata(self) -> dict[str, str]:
        """The ONNX metadata `from_metadata` reads this from: the one place its keys are written."""
        import json

        return {"latenthash_version": self.version, "bits": str(self.bits), "feature_dim": str(self.feature_dim),
                "input_height": str(self.height), "input_width": str(self.width),
                "input_channels": str(self.channels), "class_names": json.dumps(list(self.class_names)),
                "dataset": self.dataset, "precision": self.precision, "data_source": json.dumps(self.data_source),
                "copy_dim": str(self.copy_dim)}

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "feature_dim": self.feature_dim, "input_shape": [self.height, self.width,
                self.channels], "class_names": list(self.class_names), "dataset": self.dataset,
                "latenthash_version": self.version, "precision": self.precision, "copy_dim": self.copy_dim}


class Encoder:
    """Encode images with an exported latenthash model.

    >>> enc = Encoder.open("model.onnx")              # runtime="auto": TensorRT on a GPU, else ONNX Runtime
    >>> out = enc.encode([open("a.jpg", "rb").read()])
    >>> out.codes.shape, out.features.shape           # ((1, 6), (1, 256)) for a 48-bit model
    """

    def __init__(self, runtime, info: ModelInfo, path: str, *, batch_size: int = 64):
        self.runtime = runtime
        self.info = info
        self.path = path
        self.batch_size = min(batch_size, getattr(runtime, "max_batch", batch_size))

    @classmethod
    def open(cls, path: str | os.PathLike, *, runtime: str = "auto", batch_size: int = 64, **options) -> Encoder:
        from latenthash.runtimes import create_runtime

        path = os.fspath(path)
        if not os.path.isfile(path):
            from latenthash.errors import NotFound

            raise NotFound(f"model file not found: {path}")
        rt = create_runtime(runtime, path, **options)
        return cls(rt, ModelInfo.from_metadata(rt.metadata, path), path, batch_size=batch_size)

    @property
    def bits(self) -> int:
        return self.info.bits

    @property
    def feature_dim(self) -> int:
        return self.info.feature_dim

    def to_array(self, images) -> np.ndarray:
        """Any accepted input -> uint8 (N, H, W, C) of the model's size; errors name the offending item."""
        h, w, c = self.info.height, self.info.width, self.info.channels
        if isinstance(images, np.ndarray):
            arr = images
            if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == c and arr.shape[:2] == (h, w)):
                arr = arr[None]
            if arr.ndim == 3 and c == 1:
                arr = arr[..., None]
            if arr.dtype != np.uint8:
                raise InvalidInput(f"image arrays must be uint8 (0..255), got {arr.dtype}")
            if arr.ndim != 4 or arr.shape[1:] != (h, w, c):
                raise InvalidInput(f"image array of shape {images.shape} does not fit the model's input "
                                   f"(N, {h}, {w}, {c}); pass PIL images or encoded bytes to have them resized")
            return np.ascontiguousarray(arr)
        if isinstance(images, (bytes, bytearray, memoryview)) or _is_pil(images):
            images = [images]
        if isinstance(images, str) or not isinstance(images, Sequence):
            raise InvalidInput("encode() takes a uint8 array, PIL images or encoded image bytes (a list of them)")
        out = np.empty((len(images), h, w, c), dtype=np.uint8)
        for i, item in enumerate(images):
            out[i] = self._decode(item, i)
        return out

    def _decode(self, item, i: int) -> np.ndarray:
        """One encoded image or PIL image -> the model's input; InvalidInput for anything that fails to decode."""
        from PIL import Image

        h, w, c = self.info.height, self.info.width, self.info.channels
        img: Image.Image
        if isinstance(item, np.ndarray):
            return self.to_array(item)[0]
        if isinstance(item, (bytes, bytearray, memoryview)):
            what = f"{len(item)} bytes"
            try:
                img = Image.open(io.BytesIO(bytes(item)))  # reads the header only
            except Exception as exc:  # noqa: BLE001 - any decoder failure is the caller's bad image
                raise InvalidInput(f"image {i}: cannot decode {what} as an image ({type(exc).__name__}: {exc})") \
                    from None
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise InvalidInput(f"image {i} declares {img.width}x{img.height} pixels, over the limit of "
                                   f"{MAX_IMAGE_PIXELS:,} (MAX_IMAGE_PIXELS): downscale it before sending")
            img.draft("L" if c == 1 else "RGB", (4 * w, 4 * h))  # JPEG: decode at a reduced scale, not full size
        elif _is_pil(item):
            img, what = item, "a PIL image"
        else:
            raise InvalidInput(f"image {i}: expected bytes, a PIL image or a uint8 array, got {type(item).__name__}")
        try:
            img = img.convert("L" if c == 1 else "RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
        except Exception as exc:  # noqa: BLE001 - truncated data, bad chunks, unsupported modes, bombs
            raise InvalidInput(f"image {i}: cannot decode {what} ({type(exc).__name__}: {exc})") from None
        return arr[..., None] if c == 1 else arr

    def encode(self, images, *, return_probs: bool = False) -> EncodeResult:
        """Codes (packed uint8) and L2-normalized features of a batch, run in chunks of `batch_size`."""
        batch = self.to_array(images)
        if not len(batch):  # an empty batch encodes to empty arrays of the right shapes
            return EncodeResult(np.zeros((0, n_bytes(self.bits)), np.uint8), np.zeros((0, self.feature_dim),
                                np.float32), np.zeros((0, self.bits), np.float32) if return_probs else None)
        probs, feats = [], []
        for i in range(0, len(batch), self.batch_size):
            p, f = self.runtime.run(batch[i:i + self.batch_size])
            probs.append(p)
            feats.append(f)
        p, f = np.concatenate(probs), np.concatenate(feats)
        return EncodeResult(threshold(p), f, p if return_probs else None)

    def describe_copies(self, images) -> np.ndarray:
        """Copy descriptors, float32 (N, copy_dim) L2-normalized, of a batch: an image and its altered copies
        (re-encoded, rescaled, shifted, re-exposed) score high, other images lower (what `dedup` groups by).
        ModelMismatch for a model without a copy head."""
        if not self.info.copy_dim:
            from latenthash.runtimes import no_copy_head

            raise ModelMismatch(no_copy_head(self.path))
        batch = self.to_array(images)
        if not len(batch):
            return np.zeros((0, self.info.copy_dim), np.float32)
        return np.concatenate([self.runtime.run_copies(batch[i:i + self.batch_size])
                               for i in range(0, len(batch), self.batch_size)])


def _is_pil(obj) -> bool:
    return type(obj).__module__.startswith("PIL.") and hasattr(obj, "convert")
