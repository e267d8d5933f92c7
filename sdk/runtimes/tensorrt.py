"""TensorRT: engines built from the exported ONNX file with the official `tensorrt` Python API.

- Explicit batch, one optimization profile for the dynamic batch (min 1 / opt 32 / max 256 by default).
- A file exported with `--precision fp16` or `int8` (sdk/precision.py) carries its precision in the graph (FP16
  tensors, Q/DQ nodes): it is built as a strongly typed network, as TensorRT 10 and 11 both take it.
- An FP32 file asked for FP16: `BuilderFlag.FP16` where the installed TensorRT has it (TensorRT 10.x, as JetPack 6
  ships it); where it does not (TensorRT 11 removed the precision flags), a strongly typed network is built from an
  FP16 copy of the ONNX model (float initializers and compute in FP16, inputs and outputs unchanged).
- Serialized engines are cached under a key of (ONNX sha256, TensorRT version, GPU compute capability, precision).
- Inference uses tensor addresses and `execute_async_v3` on a CUDA stream; memory comes from cuda-python.

Needs an NVIDIA GPU with `tensorrt` and `cuda-python` installed (`pip install 'latenthash[tensorrt]'`, or
JetPack's packages on a Jetson).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from latenthash.errors import LatentHashError, MissingDependency, ModelMismatch, require
from latenthash.precision import fp16_copy, precision_of
from latenthash.runtimes import no_copy_head

PROFILE = (1, 32, 256)


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise MissingDependency("the TensorRT runtime needs cuda-python: pip install cuda-python") from None
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise LatentHashError(f"CUDA call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def compute_capability() -> str:
    cudart = _cudart()
    dev = _check(cudart.cudaGetDevice())
    props = _check(cudart.cudaGetDeviceProperties(dev))
    return f"{props.major}.{props.minor}"


def engine_key(onnx_path: Path, trt_version: str, capability: str, precision: str) -> str:
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()[:16]
    return f"{digest}-trt{trt_version}-sm{capability}-{precision}"


def file_metadata(onnx_path: Path) -> dict[str, str]:
    """The metadata an exported file carries (read with the onnx package: no inference session needed)."""
    onnx = require("onnx", extra="tensorrt", purpose="reading the model's metadata")
    return {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}


def file_precision(onnx_path: Path) -> str:
    """The precision an exported file declares in its metadata (fp32 for older files)."""
    return precision_of(file_metadata(onnx_path))


def build_engine(onnx_path: str | os.PathLike, *, precision: str = "fp16", profile: tuple[int, int, int] = PROFILE,
                 cache_dir: str | os.PathLike | None = None, workspace_bytes: int = 1 << 30) -> bytes:
    """Build (or load from the cache) a serialized engine for `onnx_path`; a reduced-precision file is built in
    its own precision, whatever `precision` asks."""
    trt = require("tensorrt", extra="tensorrt", purpose="the TensorRT runtime")
    onnx_path = Path(onnx_path)
    declared = file_precision(onnx_path)
    precision = precision if declared == "fp32" else declared
    cache = Path(cache_dir or Path.home() / ".cache" / "latenthash" / "trt")
    cache.mkdir(parents=True, exist_ok=True)
    key = engine_key(onnx_path, trt.__version__, compute_capability(), precision)
    cached = cache / f"{key}.engine"
    if cached.is_file():
        return cached.read_bytes()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    source = onnx_path
    flags = 0
    if declared != "fp32" or (precision == "fp16" and not has_fp16_flag):
        if declared == "fp32":
            source = fp16_copy(onnx_path, cache / f"{key}.fp16.onnx", extra="tensorrt")
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(source.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelMismatch(f"TensorRT cannot parse {source}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16" and has_fp16_flag and declared == "fp32":
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    shape = tuple(inp.shape)[1:]
    opt_profile.set_shape(inp.name, *[(b, *shape) for b in profile])
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelMismatch(f"TensorRT failed to build an engine from {source}")
    data = bytes(serialized)
    tmp = cached.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, cached)
    return data


class TensorRTRuntime:
    """Runs a cached TensorRT engine; batches above the profile's max are split by the Encoder."""

    name = "tensorrt"

    def __init__(self, model_path: str | os.PathLike, *, precision: str = "fp16",
                 profile: tuple[int, int, int] = PROFILE, cache_dir: str | os.PathLike | None = None, **_):
        trt = require("tensorrt", extra="tensorrt", purpose="the TensorRT runtime")
        self._cudart = _cudart()
        if int(_check(self._cudart.cudaGetDeviceCount())) < 1:
            raise MissingDependency("the TensorRT runtime needs an NVIDIA GPU; none is visible")
        self.max_batch = profile[2]
        self.metadata = file_metadata(Path(model_path))
        declared = precision_of(self.metadata)
        self.precision = precision if declared == "fp32" else declared
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            build_engine(model_path, precision=precision, profile=profile, cache_dir=cache_dir))
        self.context = self.engine.create_execution_context()
        self.stream = _check(self._cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self._buffers: dict[str, tuple[int, int]] = {}

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr))
            ptr = _check(self._cudart.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, features = self._execute(images, ("probs", "features"))
        return probs, features

    def run_copies(self, images: np.ndarray) -> np.ndarray:
        if "copies" not in self.dtypes:
            raise ModelMismatch(no_copy_head(self.metadata.get("dataset", "this model")))
        return self._execute(images, ("copies",))[0]

    def _execute(self, images: np.ndarray, wanted: tuple[str, ...]) -> list[np.ndarray]:
        """Run the engine (every output bound, as TensorRT requires); the `wanted` outputs, float32."""
        cudart, ctx = self._cudart, self.context
        images = np.ascontiguousarray(images, dtype=self.dtypes[self.input])
        ctx.set_input_shape(self.input, images.shape)
        ptr = self._buffer(self.input, images.nbytes)
        _check(cudart.cudaMemcpyAsync(ptr, images.ctypes.data, images.nbytes,
                                      cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        ctx.set_tensor_address(self.input, ptr)
        outputs = {}
        for name in self.dtypes:
            if name == self.input:
                continue
            out = np.empty(tuple(ctx.get_tensor_shape(name)), dtype=self.dtypes[name])
            outputs[name] = out
            ctx.set_tensor_address(name, self._buffer(name, out.nbytes))
        if not ctx.execute_async_v3(self.stream):
            raise LatentHashError("TensorRT execute_async_v3 failed")
        for name in wanted:
            out = outputs[name]
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return [outputs[name].astype(np.float32) for name in wanted]

    def __del__(self):
        for ptr, _ in getattr(self, "_buffers", {}).values():
            self._cudart.cudaFree(ptr)
