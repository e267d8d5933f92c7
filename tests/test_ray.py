"""Bulk indexing on Ray Data (a local Ray with this machine's CPUs): the same codes as the single-process path."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from extras import need
from PIL import Image

ray = need("ray", "ray")
need("ray.data", "ray")

from latenthash import HashIndex, open_index  # noqa: E402
from latenthash.encoder import Encoder  # noqa: E402
from latenthash.errors import DataError, InvalidInput  # noqa: E402
from latenthash.ray_ingest import add_images_ray, start_ray  # noqa: E402


def test_ray_encodes_arrays_and_files_like_one_process(onnx_model, small_fashion, tmp_path):
    enc = Encoder.open(onnx_model)
    images = small_fashion.train.images[:600]
    paths = []
    for i, img in enumerate(images[:40]):  # image files, read and decoded by the Ray workers
        buf = io.BytesIO()
        Image.fromarray(img[:, :, 0]).save(buf, "PNG")
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(buf.getvalue())
    index = HashIndex(bits=enc.bits, feature_dim=enc.feature_dim, feature_dtype="float32")
    start_ray(num_cpus=2)
    try:
        meta = [{"n": i} for i in range(600)]
        assert add_images_ray(index, onnx_model, ids=np.arange(600) + 10**6, images=images, metadata=meta,
                              batch_size=64, progress=False) == 600
        assert add_images_ray(index, onnx_model, ids=np.arange(40), paths=[str(p) for p in paths],
                              progress=False) == 40
        with pytest.raises(DataError, match="cannot read image"):
            add_images_ray(index, onnx_model, ids=[7], paths=[str(tmp_path / "missing.png")], progress=False)
        with pytest.raises(InvalidInput, match="exactly one of"):
            add_images_ray(index, onnx_model, ids=[1], images=images[:1], paths=[str(paths[0])])
    finally:
        ray.shutdown()
    ref = enc.encode(images)
    got = index.get(np.arange(600) + 10**6)
    np.testing.assert_array_equal(got.codes, ref.codes)
    np.testing.assert_allclose(got.features, ref.features, atol=1e-6)
    assert got.metadata == meta
    np.testing.assert_array_equal(index.get(np.arange(40)).codes, ref.codes[:40])  # PNG round trip is lossless


def test_cli_index_on_ray_into_milvus(onnx_model, tmp_path):
    """`latenthash index --ray local --out milvus-lite://...`: the whole scale-out path from the command line."""
    need("milvus_lite", "milvus")
    uri = f"milvus-lite://{tmp_path}/lite.db/fm"
    proc = subprocess.run([sys.executable, "-m", "latenthash.cli", "index", "--model", str(onnx_model), "--out", uri,
                           "--limit", "500", "--ray", "local"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = open_index(uri)
    try:
        assert len(index) == 500
        from latenthash.export.data import load_fashion_mnist

        images = load_fashion_mnist().train.images[:500]
        ref = Encoder.open(onnx_model).encode(images)
        items = index.get([0, 123, 499])
        np.testing.assert_array_equal(items.codes, ref.codes[[0, 123, 499]])
        assert items.metadata[0]["class"] and items.metadata[0]["label"] == int(
            load_fashion_mnist().train.labels[0])
    finally:
        index.close()
