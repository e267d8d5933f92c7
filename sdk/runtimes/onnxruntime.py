"""ONNX Runtime: the default encoder runtime, CPU everywhere, CUDA / TensorRT execution providers where installed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from latenthash.errors import InvalidInput, ModelMismatch, require
from latenthash.runtimes import no_copy_head

PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# when ONNX Runtime's intra-op threads may busy-wait for work: within a run only (they stop as it returns), also
# between runs (ONNX Runtime's own default), or never
SPINNING = {"run": ("session.force_spinning_stop", "1"), "always": None,
            "never": ("session.intra_op.allow_spinning", "0")}


def default_providers(cache_dir: str | os.PathLike | None = None) -> list:
    """The installed providers in order of speed; TensorRT runs FP16 with an engine cache directory."""
    ort = require("onnxruntime", extra=None, purpose="the ONNX Runtime encoder")
    available = set(ort.get_available_providers())
    providers: list = []
    for name in PREFERRED:
        if name not in available:
            continue
        if name == "TensorrtExecutionProvider":
            cache = str(cache_dir or Path.home() / ".cache" / "latenthash" / "ort-trt")
            providers.append((name, {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                     "trt_engine_cache_path": cache}))
        else:
            providers.append(name)
    return providers


class OnnxRuntime:
    """An ONNX Runtime session over an exported latenthash model.

    `spinning` says when its threads may busy-wait for work. ONNX Runtime's default ("always") keeps them spinning
    on the cores for a while after each run, where they slow the index search that follows an encode in the same
    process (search by image, in the Searcher and the server) by as much as they speed up the next encode;
    "run" (the default here) lets them spin while a run lasts and stops them as it returns; "never" makes each
    operator's threads sleep between its tasks (benchmarks/bench_interleave.py measures all three).
    """

    name = "onnxruntime"
    max_batch = 1024

    def __init__(self, model_path: str | os.PathLike, *, providers: list | None = None, threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None, spinning: str = "run"):
        ort = require("onnxruntime", extra=None, purpose="the ONNX Runtime encoder")
        if spinning not in SPINNING:
            raise InvalidInput(f"spinning must be one of {', '.join(SPINNING)}, got {spinning!r}")
        opts = ort.SessionOptions()
        entry = SPINNING[spinning]
        if entry is not None:
            opts.add_session_config_entry(*entry)
        # small CPUs: all cores on one op at a time, no inter-op pool competing with them
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(model_path), opts,
                                                providers=providers or default_providers(cache_dir))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelMismatch(f"ONNX Runtime cannot load {model_path}: {exc}") from None
        self.providers = self.session.get_providers()
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self._outputs = [o.name for o in self.session.get_outputs()]
        if "probs" not in self._outputs or "features" not in self._outputs:
            raise ModelMismatch(f"{model_path} is not a latenthash model: outputs {self._outputs} lack probs/features")

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, features = self.session.run(["probs", "features"], {"images": images})
        return probs, features

    def run_copies(self, images: np.ndarray) -> np.ndarray:
        if "copies" not in self._outputs:
            raise ModelMismatch(no_copy_head(self.metadata.get("dataset", "this model")))
        return self.session.run(["copies"], {"images": images})[0]
