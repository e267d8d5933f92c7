"""Encoder runtimes: one small Protocol, implementations chosen by name.

A runtime runs an exported latenthash ONNX model: `run(uint8 NHWC batch) -> (probs, features)`, and
`run_copies(batch) -> copy descriptors` where the model has a copy head. Each lives in its
own module and imports its engine (onnxruntime, tensorrt) only when created, failing with what to install.
"""

from __future__ import annotations

import importlib
import os
from typing import Protocol, runtime_checkable

import numpy as np

from latenthash.errors import InvalidInput, LatentHashError

# name -> "module:Class", imported on demand
RUNTIMES = {
    "onnxruntime": "latenthash.runtimes.onnxruntime:OnnxRuntime",
    "tensorrt": "latenthash.runtimes.tensorrt:TensorRTRuntime",
}


@runtime_checkable
class EncoderRuntime(Protocol):
    name: str
    max_batch: int
    metadata: dict[str, str]  # the exported file's metadata (`ModelInfo.from_metadata` reads it)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, C) -> (probs float32 (N, bits), features float32 (N, feature_dim), L2-normalized)."""
        ...

    def run_copies(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) -> copy descriptors float32 (N, copy_dim), L2-normalized; ModelMismatch for a model
        without a copy head."""
        ...


def no_copy_head(model: str) -> str:
    return (f"{model} has no copy head, so it cannot describe copies: retrain it with `latenthash train` "
            "(--copy-dim, default 64) and export it again")


def create_runtime(name: str, model_path: str | os.PathLike, **options) -> EncoderRuntime:
    """Create a runtime by name; "auto" picks TensorRT where it and a GPU are present, else ONNX Runtime."""
    if name == "auto":
        try:
            return create_runtime("tensorrt", model_path, **options)
        except LatentHashError:
            return create_runtime("onnxruntime", model_path, **options)
    try:
        module_name, cls_name = RUNTIMES[name].split(":")
    except KeyError:
        raise InvalidInput(f"unknown runtime {name!r}; choose auto or one of {', '.join(RUNTIMES)}") from None
    return getattr(importlib.import_module(module_name), cls_name)(model_path, **options)
