import io
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from latenthash.cpu import cpu_info
from latenthash.encoder import Encoder
from latenthash.errors import ExportCheckFailed, InvalidInput, MissingDependency, ModelMismatch, NotFound
from latenthash.export.model import ExportWrapper
from latenthash.export.onnx import check_export, export_onnx
from latenthash.export.train import load_model, predict
from latenthash.runtimes import create_runtime


def has_tensorrt_gpu() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def test_onnx_is_self_describing_and_passed_its_checks(onnx_model):
    model = onnx.load(str(onnx_model))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["bits"] == "24" and meta["input_height"] == "28" and meta["input_channels"] == "1"
    assert json.loads(meta["class_names"])[9] == "Ankle boot" and meta["dataset"] == "fashion-mnist"
    inp = model.graph.input[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert inp.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert [o.name for o in model.graph.output] == ["probs", "features", "logits", "copies"]
    assert meta["copy_dim"] == "64"
    report = json.loads(onnx_model.with_suffix(".export.json").read_text())
    parity, copies = report["checks"][1:]
    assert parity["passed"] and parity["max_abs_diff_probs"] <= 1e-4 and parity["bit_agreement"] >= 0.999
    assert copies["check"] == "copies" and copies["passed"] and copies["max_abs_diff"] <= 1e-4


def test_onnx_runtime_matches_pytorch_on_real_images(onnx_model, trained_run, small_fashion):
    images = small_fashion.test.images[:200]
    model, _ = load_model(trained_run)
    probs, feats, _ = predict(model, images)
    enc = Encoder.open(onnx_model, runtime="onnxruntime")
    out = enc.encode(images, return_probs=True)
    np.testing.assert_allclose(out.probs, probs, atol=1e-4)
    np.testing.assert_allclose(out.features, feats / np.linalg.norm(feats, axis=1, keepdims=True), atol=1e-4)
    assert (np.unpackbits(out.codes, axis=1)[:, :24] == (probs >= 0.5)).mean() >= 0.999


def test_failed_parity_fails_the_export(onnx_model, trained_run, small_fashion):
    model, _ = load_model(trained_run)
    wrapper = ExportWrapper(model).eval()
    with torch.no_grad():
        wrapper.net.latent.bias += 0.5  # the reference now differs from the file
    with pytest.raises(ExportCheckFailed, match="disagrees"):
        check_export(onnx_model, wrapper, small_fashion.test.images[:64], atol=1e-4)


def test_export_of_missing_run(tmp_path):
    with pytest.raises(NotFound, match="checkpoint"):
        export_onnx(tmp_path, tmp_path / "m.onnx")


def test_encoder_accepts_arrays_pil_and_bytes(onnx_model, small_fashion):
    enc = Encoder.open(onnx_model)
    assert enc.bits == 24 and enc.feature_dim == 64
    assert enc.runtime.name == ("tensorrt" if has_tensorrt_gpu() else "onnxruntime")  # "auto" picks the fastest
    imgs = small_fashion.test.images[:3]
    ref = enc.encode(imgs)
    assert ref.codes.shape == (3, 3) and ref.codes.dtype == np.uint8
    pil = [Image.fromarray(im[:, :, 0]) for im in imgs]
    png = []
    for p in pil:
        buf = io.BytesIO()
        p.save(buf, "PNG")
        png.append(buf.getvalue())
    for alt in (pil, png, list(imgs), imgs[0, :, :, 0]):
        out = enc.encode(alt)
        np.testing.assert_array_equal(out.codes, ref.codes[: len(out.codes)])
    big = Image.fromarray(np.kron(imgs[0, :, :, 0], np.ones((3, 3), np.uint8))).convert("RGB")  # resized, grey
    assert enc.encode(big).codes.shape == (1, 3)
    batch = np.repeat(imgs, 50, axis=0)  # 150 images: several runtime batches
    np.testing.assert_array_equal(enc.encode(batch).codes[::50], ref.codes)


@pytest.mark.parametrize("bad, match", [
    ([b"\x89PNG not really"], "image 0: cannot decode"),
    ([np.zeros((28, 28, 1), np.uint8), b"junk"], "image 1"),
    (np.zeros((2, 32, 32, 1), np.uint8), "does not fit"),
    (np.zeros((1, 28, 28, 1), np.float32), "uint8"),
    ([3.5], "image 0: expected bytes"),
    ("not a list", "a list of them"),
])
def test_encoder_bad_input(onnx_model, bad, match):
    with pytest.raises(InvalidInput, match=match):
        Encoder.open(onnx_model).encode(bad)


def png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header declares any size, with the given (possibly broken) IDAT payload."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def hostile_images() -> dict[str, bytes]:
    """Images that made Pillow raise its own exceptions (or decode 169 MP) before: each must be InvalidInput."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "PNG")
    good = bytearray(buf.getvalue())
    good[41] ^= 0xFF  # inside the IDAT chunk: its length, then zlib data
    tiff = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tiff, "TIFF")
    tiff_bytes = bytearray(tiff.getvalue())
    tiff_bytes[tiff_bytes.index(b"\x02\x01\x03\x00") + 8] = 99  # BitsPerSample: an unsupported mode
    return {"bomb": png_declaring(100_000, 100_000, zlib_garbage()),
            "over the pixel limit": png_declaring(13_000, 13_000),
            "broken IDAT": bytes(good), "truncated": bytes(buf.getvalue()[:30]), "tiff mode": bytes(tiff_bytes)}


def zlib_garbage() -> bytes:
    import zlib

    return zlib.compress(b"\x00" * 1000)


@pytest.mark.parametrize("name", list(hostile_images()))
def test_hostile_images_are_invalid_input(onnx_model, name):
    with pytest.raises(InvalidInput, match="image 0"):
        Encoder.open(onnx_model).encode([hostile_images()[name]])


def test_empty_batch_encodes_to_empty_arrays(onnx_model):
    enc = Encoder.open(onnx_model)
    for empty in ([], np.zeros((0, enc.info.height, enc.info.width, enc.info.channels), np.uint8)):
        out = enc.encode(empty, return_probs=True)
        assert out.codes.shape == (0, 3) and out.features.shape == (0, enc.feature_dim)
        assert out.probs.shape == (0, enc.bits)


def test_large_jpeg_decodes_at_reduced_scale(onnx_model, monkeypatch):
    """A 4000 x 3000 JPEG is decoded through Pillow's draft mode (a fraction of the pixels: the decoded image the
    encoder converts is seen to be small) with the same code as a full decode resized by hand, give or take the few
    bits of a different downscale."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    big = Image.fromarray(small).resize((4000, 3000), Image.NEAREST)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=95)
    enc = Encoder.open(onnx_model)
    decoded = []
    convert = Image.Image.convert
    monkeypatch.setattr(Image.Image, "convert", lambda img, *a, **kw: decoded.append(img.size) or convert(img, *a,
                                                                                                          **kw))
    fast = enc.encode([buf.getvalue()])
    monkeypatch.undo()
    assert decoded and decoded[0][0] * decoded[0][1] <= 4000 * 3000 // 16  # at most a quarter of each side
    size = (enc.info.width, enc.info.height)
    full = enc.encode(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L").resize(size, Image.BILINEAR)))
    differing = np.unpackbits(fast.codes ^ full.codes).sum()
    assert differing <= 3 and float((fast.features * full.features).sum()) > 0.98


def test_encoder_errors(tmp_path, onnx_model):
    with pytest.raises(NotFound):
        Encoder.open(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelMismatch):
        Encoder.open(tmp_path / "junk.onnx", runtime="onnxruntime")
    with pytest.raises(InvalidInput, match="unknown runtime"):
        Encoder.open(onnx_model, runtime="openvino")


def test_spinning_policies_change_when_threads_wait_not_what_they_compute(onnx_model, small_fashion):
    """Each of ONNX Runtime's spinning policies (see runtimes/onnxruntime.py; benchmarks/bench_interleave.py times
    them) gives the same codes and features; a wrong name is refused, naming the ones that exist."""
    from latenthash.runtimes.onnxruntime import SPINNING

    images = small_fashion.test.images[:64]
    want = Encoder.open(onnx_model, runtime="onnxruntime", threads=2).encode(images)
    for policy in SPINNING:
        got = Encoder.open(onnx_model, runtime="onnxruntime", threads=2, spinning=policy).encode(images)
        np.testing.assert_array_equal(got.codes, want.codes)
        np.testing.assert_allclose(got.features, want.features, atol=1e-6)
    with pytest.raises(InvalidInput, match="spinning must be one of run, always, never"):
        Encoder.open(onnx_model, runtime="onnxruntime", spinning="sometimes")


def test_tensorrt_missing_is_a_fix_it_error(onnx_model):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(MissingDependency, match="pip install"):
        create_runtime("tensorrt", onnx_model)


def test_import_latenthash_loads_no_heavy_module():
    code = ("import sys, latenthash; from latenthash import HashIndex; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'tensorrt', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_fp16_parity(onnx_model, small_fashion):
    images = small_fashion.test.images[:256]
    ort_out = Encoder.open(onnx_model, runtime="onnxruntime").encode(images, return_probs=True)
    trt_out = Encoder.open(onnx_model, runtime="tensorrt").encode(images, return_probs=True)
    agreement = ((ort_out.probs >= 0.5) == (trt_out.probs >= 0.5)).mean()
    assert agreement >= 0.99


@pytest.fixture(scope="module")
def precision_models(trained_run, tmp_path_factory):
    """FP32, FP16 and INT8 files of the trained run, checked on 300 held-out images against 3,000 database ones."""
    out = tmp_path_factory.mktemp("precisions") / "model.onnx"
    report = export_onnx(trained_run, out, images=None, precisions=("fp16", "int8"), calibration=256,
                         check_queries=300, check_database=3000)
    return out, report


def test_precision_copies_are_self_describing_and_checked(precision_models, small_fashion):
    out, report = precision_models
    checks = report["precisions"]
    assert json.loads(out.with_suffix(".export.json").read_text())["precisions"] == checks
    images = small_fashion.test.images[:300]
    reference = Encoder.open(out, runtime="onnxruntime").encode(images)
    for precision, name in (("fp16", "model.fp16.onnx"), ("int8", "model.int8.onnx")):
        path = out.with_name(name)
        rep = checks[precision]
        assert rep["kept"] and rep["path"] == str(path) and rep["held_out_images"] == 300
        assert rep["bit_agreement"] >= 0.995 and rep["map_drop"] <= rep["max_map_drop"]
        model = onnx.load(str(path))
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["precision"] == precision and meta["bits"] == "24"  # the FP32 metadata travels along
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
        enc = Encoder.open(path, runtime="onnxruntime")
        assert enc.info.precision == precision and enc.info.to_dict()["precision"] == precision
        got = enc.encode(images)
        assert got.features.dtype == np.float32
        agreement = (np.unpackbits(got.codes, axis=1)[:, :24] == np.unpackbits(reference.codes, axis=1)[:, :24])
        assert agreement.mean() >= 0.99
    int8 = onnx.load(checks["int8"]["path"])
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ: the precision is in the graph
    zero_points = {i.name: onnx.numpy_helper.to_array(i) for i in int8.graph.initializer if "zero_point" in i.name}
    assert zero_points and not any(z.any() for z in zero_points.values())  # symmetric, as TensorRT needs
    assert {z.dtype for name, z in zero_points.items() if "bias" not in name} == {np.dtype(np.int8)}  # int32 biases
    meta = {p.key: p.value for p in int8.metadata_props}
    assert meta["calibration_images"] == "256" and "training split" in meta["calibration_source"]
    assert checks["int8"]["bytes"] < 0.5 * checks["fp32"]["bytes"]
    assert Encoder.open(out).info.precision == "fp32"


def test_eval_measures_an_exported_file(precision_models, trained_run):
    from latenthash.export.evaluate import evaluate_run

    out, report = precision_models
    figures = {p: evaluate_run(trained_run, max_queries=300, max_database=3000, baselines=False, plots=False,
                               progress=False, model_path=report["precisions"][p]["path"]) for p in ("fp32", "int8")}
    assert figures["int8"]["precision"] == "int8" and figures["int8"]["accuracy"] is None
    assert abs(figures["fp32"]["map_all"] - report["precisions"]["fp32"]["map_all"]) < 0.02  # other subsets
    assert abs(figures["int8"]["map_all"] - figures["fp32"]["map_all"]) < 0.01


AVX2_ONLY_ENCODE = textwrap.dedent("""
    import sys, numpy as np
    from latenthash.cpu import cpu_info
    from latenthash.encoder import Encoder
    simd = cpu_info()["simd"]
    assert "avx2" in simd and not {"avx512f", "avx512vnni", "avxvnni"} & set(simd), simd
    codes = Encoder.open(sys.argv[1], runtime="onnxruntime").encode(np.load(sys.argv[2])).codes
    np.save(sys.argv[3], codes)
""")


def test_int8_copy_gives_the_same_codes_on_an_x86_cpu_without_vnni(precision_models, small_fashion, tmp_path):
    """ONNX Runtime runs QDQ INT8 with other kernels where VNNI is missing (16-bit sums of u8 x s8 products, which
    full-range weights saturate): the same file, run on an emulated AVX2-only CPU (qemu-user, -cpu Haswell), must
    give the codes it gives here."""
    from latenthash.encoder import Encoder
    from latenthash.precision import SAFE_WEIGHT

    if platform.machine() != "x86_64":
        pytest.skip("an x86-64 CPU model is emulated by qemu-x86_64 on x86-64 hosts only")
    qemu = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
    if qemu is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-user-static is missing although scripts/setup.sh installs it", pytrace=False)
        pytest.skip("qemu-user-static is not installed (scripts/setup.sh installs it)")
    out, report = precision_models
    rep = report["precisions"]["int8"]
    assert rep["kept"] and rep["max_abs_weight"] <= SAFE_WEIGHT
    assert report["checked_on"]["simd"] == cpu_info()["simd"]
    images = small_fashion.test.images[:300]
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "encode.py").write_text(AVX2_ONLY_ENCODE)
    proc = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, tmp_path / "encode.py", rep["path"],
                           tmp_path / "images.npy", tmp_path / "codes.npy"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    emulated = np.load(tmp_path / "codes.npy")
    here = Encoder.open(rep["path"], runtime="onnxruntime").encode(images).codes
    fp32 = Encoder.open(out, runtime="onnxruntime").encode(images).codes
    bits = np.unpackbits(here, axis=1)[:, :24]
    assert (np.unpackbits(emulated, axis=1)[:, :24] == bits).mean() >= 0.999
    assert (np.unpackbits(emulated, axis=1)[:, :24] == np.unpackbits(fp32, axis=1)[:, :24]).mean() >= 0.995


def test_broken_calibration_is_refused_and_leaves_no_file(onnx_model, tmp_path):
    from latenthash.precision import int8_copy

    out = tmp_path / "m.int8.onnx"
    with pytest.raises(InvalidInput, match="at least 64"):
        int8_copy(onnx_model, out, np.zeros((8, 28, 28, 1), np.uint8))
    with pytest.raises(InvalidInput, match="all alike"):
        int8_copy(onnx_model, out, np.full((100, 28, 28, 1), 255, np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_tiny_calibration_before_writing(trained_run, tmp_path):
    with pytest.raises(InvalidInput, match="--calibration 8"):
        export_onnx(trained_run, tmp_path / "m.onnx", precisions=("int8",), calibration=8)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InvalidInput, match="unknown precision 'int4'"):
        export_onnx(trained_run, tmp_path / "m.onnx", precisions=("int4",))


def test_copy_missing_its_threshold_is_removed(trained_run, tmp_path, monkeypatch):
    from latenthash.export import onnx as export

    monkeypatch.setitem(export.PRECISION_BARS, "fp16", {"min_bit_agreement": 1.01, "max_map_drop": 0.002})
    report = export_onnx(trained_run, tmp_path / "m.onnx", precisions=("fp16",), check_queries=100,
                         check_database=500)
    rep = report["precisions"]["fp16"]
    assert not rep["kept"] and "code-bit agreement" in rep["why_removed"]
    assert not (tmp_path / "m.fp16.onnx").exists() and (tmp_path / "m.onnx").exists()


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_parity_of_reduced_precision_files(precision_models, small_fashion, precision):
    out, report = precision_models
    images = small_fashion.test.images[:256]
    ort_out = Encoder.open(out, runtime="onnxruntime").encode(images, return_probs=True)
    trt = Encoder.open(report["precisions"][precision]["path"], runtime="tensorrt")
    assert trt.runtime.precision == precision
    agreement = ((ort_out.probs >= 0.5) == (trt.encode(images, return_probs=True).probs >= 0.5)).mean()
    assert agreement >= 0.99
