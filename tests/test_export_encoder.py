import io
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from latenthash.encoder import Encoder
from latenthash.errors import ExportCheckFailed, InvalidInput, MissingDependency, ModelMismatch, NotFound
from latenthash.export.model import ExportWrapper
from latenthash.export.onnx import check_export, export_onnx
from latenthash.export.train import load_model, predict
from latenthash.runtimes import create_runtime


def test_onnx_is_self_describing_and_passed_its_checks(onnx_model):
    model = onnx.load(str(onnx_model))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["bits"] == "24" and meta["input_height"] == "28" and meta["input_channels"] == "1"
    assert json.loads(meta["class_names"])[9] == "Ankle boot" and meta["dataset"] == "fashion-mnist"
    inp = model.graph.input[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert inp.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert [o.name for o in model.graph.output] == ["probs", "features", "logits"]
    report = json.loads(onnx_model.with_suffix(".export.json").read_text())
    parity = report["checks"][1]
    assert parity["passed"] and parity["max_abs_diff_probs"] <= 1e-4 and parity["bit_agreement"] >= 0.999


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
    assert enc.bits == 24 and enc.feature_dim == 64 and enc.runtime.name == "onnxruntime"  # no TensorRT here
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
