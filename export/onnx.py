"""ONNX export with parity checks, in the manner of timm's `onnx_export(check=True)`.

The exported graph is self-describing: input `images`, uint8 NHWC with a dynamic batch (what image decoders give);
scaling, normalization and the NHWC->NCHW transpose are inside the graph; outputs `probs` (H's sigmoid), `features`
(F4, L2-normalized) and `logits`. `metadata_props` carry bits, input size and channels, class names, feature dim,
dataset and the latenthash version, so a runtime needs nothing but the file.

Every export checks itself, in order: `onnx.checker` on the saved file, then ONNX Runtime against PyTorch on a
real batch (max |diff| of probs and of features <= `atol`, code-bit agreement >= 99.9%). A failed check removes the
file and raises `ExportCheckFailed` with the report.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from latenthash import __version__
from latenthash.errors import ExportCheckFailed, require
from latenthash.export.model import ExportWrapper, HashNet

INPUT = "images"
OUTPUTS = ("probs", "features", "logits")
MIN_BIT_AGREEMENT = 0.999


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
                        float(np.abs(f_ref - f_got).max()), float(((p_ref >= 0.5) == (p_got >= 0.5)).mean()),
                        atol, min_bit_agreement)


def model_metadata(model: HashNet, checkpoint: dict) -> dict[str, str]:
    c = model.config
    return {
        "latenthash_version": __version__,
        "bits": str(c.bits),
        "feature_dim": str(c.feature_dim),
        "input_height": str(c.image_size[0]),
        "input_width": str(c.image_size[1]),
        "input_channels": str(c.in_channels),
        "input_layout": "NHWC uint8",
        "class_names": json.dumps(checkpoint.get("class_names", [])),
        "multilabel": json.dumps(bool(checkpoint.get("multilabel", False))),
        "dataset": str(checkpoint.get("dataset", "")),
        "backbone": c.backbone,
    }


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike, *, images: np.ndarray | None = None,
                opset: int = 18, atol: float = 1e-4, check: bool = True) -> dict:
    """Export a training run to `out` (ONNX) and check it; returns the export report (also saved as JSON beside
    the model). `images`: a real uint8 NHWC batch for the parity check (default: 256 test images of the run's
    dataset)."""
    onnx = require("onnx", extra="train", purpose="ONNX export")
    from latenthash.export.train import load_model

    model, ckpt = load_model(run_dir)
    wrapper = ExportWrapper(model).eval()
    if images is None:
        images = _reference_batch(ckpt, model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    example = torch.from_numpy(np.ascontiguousarray(images[:2]))
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=[INPUT], output_names=list(OUTPUTS),
                                    dynamic_shapes={"images": {0: batch}}, opset_version=opset, optimize=True)
    proto = program.model_proto
    del proto.metadata_props[:]
    for key, value in model_metadata(model, ckpt).items():
        proto.metadata_props.add(key=key, value=value)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(proto, tmp)
    os.replace(tmp, out)
    report: dict = {"path": str(out), "bytes": out.stat().st_size, "export_seconds": time.perf_counter() - t0,
                    "opset": opset, "metadata": model_metadata(model, ckpt)}
    if check:
        try:
            report["checks"] = check_export(out, wrapper, images, atol=atol)
        except ExportCheckFailed:
            out.unlink(missing_ok=True)
            raise
    out.with_suffix(".export.json").write_text(json.dumps(report, indent=1))
    return report


def check_export(path: Path, wrapper: ExportWrapper, images: np.ndarray, *, atol: float) -> list[dict]:
    """onnx.checker, then ONNX Runtime (CPU) against PyTorch on `images`; raises ExportCheckFailed."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportCheckFailed(f"onnx.checker rejected {path}: {exc}") from None
    from latenthash.runtimes import create_runtime

    with torch.inference_mode():
        p_ref, f_ref, _ = (t.numpy() for t in wrapper(torch.from_numpy(np.ascontiguousarray(images))))
    ort_runtime = create_runtime("onnxruntime", path, providers=["CPUExecutionProvider"])
    p_got, f_got = ort_runtime.run(images)
    report = compare_outputs((p_ref, f_ref), (p_got, f_got), runtime="onnxruntime-cpu", reference="pytorch",
                             atol=atol, min_bit_agreement=MIN_BIT_AGREEMENT)
    checks = [{"check": "onnx.checker", "passed": True}, asdict(report)]
    if not report.passed:
        raise ExportCheckFailed(f"ONNX Runtime disagrees with PyTorch beyond tolerance: {json.dumps(asdict(report))}")
    return checks


def _reference_batch(ckpt: dict, model: HashNet, n: int = 256) -> np.ndarray:
    """Real images of the run's dataset for the parity check (random pixels only if the dataset is unavailable)."""
    from latenthash.errors import LatentHashError
    from latenthash.export.data import load_dataset

    try:
        return load_dataset(ckpt["dataset"]).test.subset(n, seed=0).images
    except LatentHashError:
        c = model.config
        warnings.warn(f"dataset {ckpt['dataset']!r} not available: checking parity on random pixels", stacklevel=2)
        return np.random.default_rng(0).integers(0, 256, (n, *c.image_size, c.in_channels), dtype=np.uint8)
