"""ONNX export with parity checks, in the manner of timm's `onnx_export(check=True)`.

The exported graph is self-describing: input `images`, uint8 NHWC with a dynamic batch (what image decoders give);
scaling, normalization and the NHWC->NCHW transpose are inside the graph; outputs `probs` (H's sigmoid), `features`
(F4, L2-normalized), `logits`, and `copies` (the copy head's descriptor, L2-normalized) where the run has one.
`metadata_props` carry bits, input size and channels, class names, feature dim,
dataset and the latenthash version, so a runtime needs nothing but the file.

Every export checks itself, in order: `onnx.checker` on the saved file, then ONNX Runtime against PyTorch on a
real batch (max |diff| of probs and of features <= `atol`, code-bit agreement >= 99.9%). A failed check removes the
file and raises `ExportCheckFailed` with the report.

`precisions` adds FP16 and INT8 copies beside the FP32 file (`model.fp16.onnx`, `model.int8.onnx`; see
sdk/precision.py). Each is checked against the FP32 file on the run's held-out (test) images: code-bit agreement,
and the retrieval figures of its own codes (mAP@all, precision within radius 2; test images as queries, training
images as the database), all written into the report with the CPU they were checked on. An INT8 copy must also keep
its weights where no CPU's kernels saturate (precision.SAFE_WEIGHT). A copy that misses PRECISION_BARS is removed,
and the report says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from latenthash import __version__
from latenthash.codes import bits_of, threshold
from latenthash.cpu import cpu_info
from latenthash.encoder import ModelInfo
from latenthash.errors import DataError, ExportCheckFailed, InvalidInput, require
from latenthash.export.data import Dataset, load_source
from latenthash.export.model import ExportWrapper, HashNet
from latenthash.export.train import run_source
from latenthash.precision import (
    DEFAULT_CALIBRATION,
    MIN_CALIBRATION,
    SAFE_WEIGHT,
    check_precision,
    fp16_copy,
    int8_copy,
    max_abs_weight,
)

INPUT = "images"
OUTPUTS = ("probs", "features", "logits")  # and "copies" where the model has a copy head
PARITY_IMAGES = 256  # real test images that the FP32 parity check runs on
MIN_BIT_AGREEMENT = 0.999
PRECISION_BARS = {  # a reduced-precision copy is kept only within these of the FP32 model
    "fp16": {"min_bit_agreement": 0.995, "max_map_drop": 0.002},
    "int8": {"min_bit_agreement": 0.995, "max_map_drop": 0.005},
}


@dataclass
class ParityReport:
    runtime: str
    reference: str
    batch: int
    max_abs_diff_probs: float
    max_abs_diff_features: float
    bit_agreement: float
    atol: float
    min_bit_agreement: float
    passed: bool = field(init=False)

    def __post_init__(self):
        self.passed = (self.max_abs_diff_probs <= self.atol and self.max_abs_diff_features <= self.atol
                       and self.bit_agreement >= self.min_bit_agreement)


def compare_outputs(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray], *, runtime: str,
                    reference: str, atol: float, min_bit_agreement: float) -> ParityReport:
    """Parity of (probs, features) pairs: max abs differences and the share of code bits that agree."""
    (p_ref, f_ref), (p_got, f_got) = ref, got
    return ParityReport(runtime, reference, len(p_ref), float(np.abs(p_ref - p_got).max()),
                        float(np.abs(f_ref - f_got).max()), float((bits_of(p_ref) == bits_of(p_got)).mean()),
                        atol, min_bit_agreement)


def model_metadata(model: HashNet, checkpoint: dict) -> dict[str, str]:
    """What the exported file says about itself: the keys `ModelInfo` reads, and what only people read."""
    c = model.config
    info = ModelInfo(c.bits, c.feature_dim, c.image_size[0], c.image_size[1], c.in_channels,
                     tuple(checkpoint.get("class_names", [])), str(checkpoint.get("dataset", "")), __version__,
                     "fp32", run_source(checkpoint), c.copy_dim)
    return info.to_metadata() | {"input_layout": "NHWC uint8", "backbone": c.backbone,
                                 "multilabel": json.dumps(bool(checkpoint.get("multilabel", False)))}


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike, *, images: np.ndarray | None = None,
                opset: int = 18, atol: float = 1e-4, check: bool = True, precisions: tuple[str, ...] = (),
                calibration: int = DEFAULT_CALIBRATION, check_queries: int | None = None,
                check_database: int | None = None, data_dir: str | os.PathLike | None = None,
                random_pixels: bool = False) -> dict:
    """Export a training run to `out` (ONNX, FP32) and check it; returns the export report (also saved as JSON
    beside the model). `images`: a real uint8 NHWC batch for the parity check (default: 256 test images of the
    data the run recorded, or of `data_dir`). `precisions` ("fp16", "int8") adds checked copies beside `out`; INT8
    calibrates on `calibration` training images; `check_queries`/`check_database` cap the held-out check (default:
    whole splits). Where the run's data cannot be read, the export fails naming --data-dir; `random_pixels` lets
    the FP32 parity check run on random pixels instead, and the report says so."""
    onnx = require("onnx", extra="train", purpose="ONNX export")
    from latenthash.export.train import load_model

    extra = [check_precision(p) for p in precisions if p != "fp32"]
    if "int8" in extra and calibration < MIN_CALIBRATION:
        raise InvalidInput(f"INT8 calibration needs at least {MIN_CALIBRATION} images, got --calibration "
                           f"{calibration}: the default is {DEFAULT_CALIBRATION} training images")
    model, ckpt = load_model(run_dir)
    wrapper = ExportWrapper(model).eval()
    ds = _run_data(ckpt, data_dir, random_pixels=random_pixels and not extra) if images is None or extra else None
    if images is not None:
        parity_images = f"{len(images)} given images"
    elif ds is not None:
        images = ds.test.subset(PARITY_IMAGES, seed=0).images
        parity_images = f"{len(images)} test images of {ds.source['kind'] if ds.source else ds.name}"
    else:
        c = model.config
        images = np.random.default_rng(0).integers(0, 256, (PARITY_IMAGES, *c.image_size, c.in_channels), np.uint8)
        parity_images = f"{len(images)} random images (--random-pixels): nothing was checked on real images"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    example = torch.from_numpy(np.ascontiguousarray(images[:2]))
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):  # the exporter prints its progress
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=[INPUT],
                                    output_names=[*OUTPUTS, *(("copies",) if model.copy_head else ())],
                                    dynamic_shapes={"images": {0: batch}}, opset_version=opset, optimize=True)
    proto = program.model_proto
    del proto.metadata_props[:]
    for key, value in model_metadata(model, ckpt).items():
        proto.metadata_props.add(key=key, value=value)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(proto, tmp)
    os.replace(tmp, out)
    report: dict = {"path": str(out), "bytes": out.stat().st_size, "export_seconds": time.perf_counter() - t0,
                    "opset": opset, "metadata": model_metadata(model, ckpt), "checked_on": cpu_info(),
                    "parity_images": parity_images}
    if check:
        try:
            report["checks"] = check_export(out, wrapper, images, atol=atol)
        except ExportCheckFailed:
            out.unlink(missing_ok=True)
            raise
    if extra:
        assert ds is not None  # loaded above whenever copies are asked for
        report["precisions"] = derive_precisions(out, ds, extra, calibration=calibration,
                                                 check_queries=check_queries, check_database=check_database)
    out.with_suffix(".export.json").write_text(json.dumps(report, indent=1))
    return report


def precision_path(fp32: Path, precision: str) -> Path:
    return fp32 if precision == "fp32" else fp32.with_name(f"{fp32.stem}.{precision}{fp32.suffix}")


def derive_precisions(fp32: Path, ds: Dataset, precisions: list[str], *, calibration: int,
                      check_queries: int | None, check_database: int | None) -> dict:
    """Write each reduced-precision copy of `fp32`, check it against `fp32` on held-out images of `ds` (the run's
    data), keep it only within PRECISION_BARS; returns {precision: report}."""
    queries, db = ds.test.subset(check_queries), ds.train.subset(check_database)
    reference = _retrieval(fp32, queries, db)
    out: dict = {"fp32": {"path": str(fp32), "bytes": fp32.stat().st_size, **reference["figures"]}}
    for precision in precisions:
        path = precision_path(fp32, precision)
        try:
            if precision == "fp16":
                fp16_copy(fp32, path)
            else:
                cal = ds.train.subset(calibration, seed=1)
                int8_copy(fp32, path, cal.images, calibration_source=f"{ds.name} training split, {len(cal)} images")
            got = _retrieval(path, queries, db)
        except Exception as exc:  # a copy that cannot be made or run is never left behind
            path.unlink(missing_ok=True)
            if isinstance(exc, InvalidInput):
                raise
            raise ExportCheckFailed(f"the {precision} copy of {fp32} failed: {exc}") from exc
        rep = {"path": str(path), "bytes": path.stat().st_size, **got["figures"],
               "bit_agreement": float((bits_of(got["probs"]) == bits_of(reference["probs"])).mean()),
               "held_out_images": len(queries), "database_images": len(db), **PRECISION_BARS[precision]}
        rep["map_drop"] = out["fp32"]["map_all"] - rep["map_all"]
        if reference["copies"] is not None:  # how far its copy descriptors moved: cosine to FP32's, per image
            cos = (reference["copies"] * got["copies"]).sum(axis=1)
            rep["copies_cosine_to_fp32"] = {"mean": float(cos.mean()), "p01": float(np.quantile(cos, 0.01))}
        failed = []
        if precision == "int8":  # checked here, on this CPU; no sum can saturate elsewhere either (precision.py)
            rep["max_abs_weight"] = max_abs_weight(path)
            if rep["max_abs_weight"] > SAFE_WEIGHT:
                failed.append(f"int8 weights reach {rep['max_abs_weight']} > {SAFE_WEIGHT}: their products can "
                              "saturate on x86 CPUs without VNNI")
        if rep["bit_agreement"] < rep["min_bit_agreement"]:
            failed.append(f"code-bit agreement with FP32 {rep['bit_agreement']:.4f} < {rep['min_bit_agreement']}")
        if rep["map_drop"] > rep["max_map_drop"]:
            failed.append(f"mAP@all {rep['map_all']:.4f} is {rep['map_drop']:.4f} below FP32's "
                          f"(at most {rep['max_map_drop']})")
        rep["kept"] = not failed
        if failed:
            path.unlink(missing_ok=True)
            rep["why_removed"] = "; ".join(failed)
        out[precision] = rep
    return out


def _retrieval(path: Path, queries, db) -> dict:
    """The file's codes of held-out queries (probs) and its retrieval figures against the database."""
    from latenthash.encoder import Encoder
    from latenthash.export.evaluate import encode_probs
    from latenthash.metrics import hamming_retrieval

    enc = Encoder.open(path, runtime="onnxruntime", providers=["CPUExecutionProvider"])
    q_probs, d_probs = encode_probs(enc, queries.images)[0], encode_probs(enc, db.images)[0]
    rep = hamming_retrieval(threshold(q_probs), threshold(d_probs), queries.labels, db.labels,
                            bits=q_probs.shape[1])
    copies = enc.describe_copies(queries.images) if enc.info.copy_dim else None
    return {"probs": q_probs, "copies": copies,
            "figures": {"map_all": rep.map_all, "precision_r2": rep.precision_r2}}


def check_export(path: Path, wrapper: ExportWrapper, images: np.ndarray, *, atol: float) -> list[dict]:
    """onnx.checker, then ONNX Runtime (CPU) against PyTorch on `images`; raises ExportCheckFailed."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportCheckFailed(f"onnx.checker rejected {path}: {exc}") from None
    from latenthash.runtimes import create_runtime

    with torch.inference_mode():
        p_ref, f_ref, _, *c_ref = (t.numpy() for t in wrapper(torch.from_numpy(np.ascontiguousarray(images))))
    ort_runtime = create_runtime("onnxruntime", path, providers=["CPUExecutionProvider"])
    p_got, f_got = ort_runtime.run(images)
    report = compare_outputs((p_ref, f_ref), (p_got, f_got), runtime="onnxruntime-cpu", reference="pytorch",
                             atol=atol, min_bit_agreement=MIN_BIT_AGREEMENT)
    checks = [{"check": "onnx.checker", "passed": True}, asdict(report)]
    if not report.passed:
        raise ExportCheckFailed(f"ONNX Runtime disagrees with PyTorch beyond tolerance: {json.dumps(asdict(report))}")
    if c_ref:
        diff = float(np.abs(c_ref[0] - ort_runtime.run_copies(images)).max())
        checks.append({"check": "copies", "max_abs_diff": diff, "atol": atol, "passed": diff <= atol})
        if diff > atol:
            raise ExportCheckFailed(f"ONNX Runtime's copy descriptors differ from PyTorch's by {diff:.2e} > {atol}")
    return checks


def _run_data(ckpt: dict, data_dir: str | os.PathLike | None, *, random_pixels: bool) -> Dataset | None:
    """The run's data (from where it recorded it, or `data_dir`); None where it cannot be read and random pixels
    were allowed."""
    try:
        return load_source(run_source(ckpt), data_dir)
    except DataError as exc:
        if not random_pixels:
            raise
        warnings.warn(f"{exc}; checking parity on random pixels (--random-pixels)", stacklevel=3)
        return None
