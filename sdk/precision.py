"""Reduced-precision copies of an exported model: FP16 and INT8, each a self-describing ONNX file.

The precision lives in the file itself (FP16 tensors; INT8 as explicit QuantizeLinear/DequantizeLinear pairs, the
QDQ format), so one file serves ONNX Runtime, TensorRT 10 and TensorRT 11, whose strongly typed networks take their
precision from the graph (TensorRT 11 has no FP16/INT8 builder flags). Inputs (uint8 NHWC) and outputs (float32)
keep their types, so callers never see the difference. Each copy carries the FP32 model's metadata plus
`precision` and, for INT8, how it was calibrated.

INT8 uses ONNX Runtime's static quantization: symmetric int8 activations and per-channel int8 weights (what
TensorRT's explicit quantization requires), ranges calibrated on real training images. The weights use 7 bits of
the 8 (-64..64): ONNX Runtime on x86 CPUs without VNNI (AVX2 only) multiplies u8 x s8 and adds pairs of products in
16 bits, which full-range weights can saturate (255 x 127 x 2 > 32767), so the same file gave other codes there.
With 7-bit weights no sum can overflow on any kernel, and one file gives the same codes on every CPU and on TensorRT.
Calibration that cannot describe real inputs (too few images, or all alike, e.g. blank frames) is refused before
anything is written.
`latenthash export --precision` then checks every copy against the FP32 model on held-out images and removes a
copy that misses its thresholds (export/onnx.py).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from latenthash.errors import InvalidInput, require

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_CALIBRATION = 2048  # training images whose activations set the INT8 ranges
MIN_CALIBRATION = 64
SAFE_WEIGHT = 64  # 255 x 64 x 2 = 32640 fits the 16-bit pair sums of non-VNNI x86 kernels
CALIBRATION_BATCH = 64


def precision_of(metadata: dict[str, str]) -> str:
    """The precision an exported file declares (files from before precisions existed are FP32)."""
    return metadata.get("precision", "fp32")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InvalidInput(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def check_calibration(images: np.ndarray) -> np.ndarray:
    """Refuse calibration images that cannot set activation ranges: fewer than MIN_CALIBRATION, or all alike."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise InvalidInput(f"calibration images must be uint8 NHWC, got {images.dtype} {images.shape}")
    if len(images) < MIN_CALIBRATION:
        raise InvalidInput(f"INT8 calibration needs at least {MIN_CALIBRATION} real images, got {len(images)}: "
                           f"pass --calibration {DEFAULT_CALIBRATION} (training images of the run's dataset)")
    flat = images.reshape(len(images), -1)
    if (flat == flat[:1]).all() or int(flat.std(axis=1).max()) == 0:
        raise InvalidInput(f"INT8 calibration images are all alike (blank or identical frames, {len(images)} of "
                           "them): calibrate on real images of the data the model will encode")
    return images


def fp16_copy(src: str | os.PathLike, out: str | os.PathLike, *, extra: str = "train") -> Path:
    """An FP16 copy of `src` (initializers and compute in FP16; uint8 input and float32 outputs kept), made by
    ONNX Runtime's own converter (onnxconverter-common's mistypes this graph's input cast)."""
    onnx = require("onnx", extra=extra, purpose="the FP16 ONNX conversion")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():  # tiny constants (normalization epsilons) are clamped to FP16's range
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    return _save_with_metadata(model, src, out, {"precision": "fp16"})


def int8_copy(src: str | os.PathLike, out: str | os.PathLike, calibration: np.ndarray, *,
              calibration_source: str = "") -> Path:
    """An INT8 QDQ copy of `src`, activation ranges calibrated (min/max) on `calibration` (uint8 NHWC)."""
    calibration = check_calibration(calibration)
    q = require("onnxruntime.quantization", extra="train", purpose="INT8 quantization")
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self):
            lo = next(self.batches, None)
            return None if lo is None else {"images": calibration[lo:lo + CALIBRATION_BATCH]}

    with tempfile.TemporaryDirectory() as tmp:
        pre, raw = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        # symbolic shape inference fails on this graph's dynamic batch; ONNX's own shape inference suffices
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        q.quantize_static(str(pre), str(raw), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          reduce_range=True, activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                          extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        onnx = require("onnx", extra="train", purpose="INT8 quantization")
        return _save_with_metadata(onnx.load(str(raw)), src, out, {
            "precision": "int8", "calibration_images": str(len(calibration)),
            "calibration_source": calibration_source,
            "quantization": "QDQ, symmetric int8 activations, per-channel 7-bit weights"})


def max_abs_weight(path: str | os.PathLike) -> int:
    """The largest |value| of the file's int8 weights: at most SAFE_WEIGHT means no 16-bit sum of u8 x s8 products
    can saturate on CPUs without VNNI (see above)."""
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and "zero_point" not in t.name]
    return max((int(np.abs(w.astype(np.int16)).max(initial=0)) for w in weights), default=0)


def _save_with_metadata(model, src: str | os.PathLike, out: str | os.PathLike, extra: dict[str, str]) -> Path:
    """Save `model` atomically at `out` with `src`'s metadata_props plus `extra`."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props} | extra
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, out)
    return out
