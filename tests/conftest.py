"""Shared fixtures: small real data subsets, seeded generators, GPU / TensorRT skips."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest


def pytest_configure(config):
    """Test this checkout's code: an editable install made from another clone (as a fresh-clone CI run leaves one)
    would otherwise be imported and tested instead, silently."""
    import latenthash

    here = Path(__file__).resolve().parent.parent / "sdk"
    imported = Path(latenthash.__file__).resolve().parent
    if imported != here and (imported.parent / "pyproject.toml").is_file():
        pytest.exit(f"latenthash is imported from another checkout ({imported}), not this one ({here}): "
                    f"run pip install --no-deps -e {here.parent}", returncode=4)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def fashion():
    """Fashion-MNIST from Debian's dataset-fashion-mnist (installed by .ci/run)."""
    from latenthash.export.data import load_fashion_mnist

    return load_fashion_mnist()


@pytest.fixture(scope="session")
def milvus_server_uri(tmp_path_factory):
    """A real Milvus server for the session (LATENTHASH_MILVUS_URI, or one started from the `milvus` package on free
    ports, its process group ended at teardown); skipped only where that package cannot install."""
    import os
    import platform
    import sys

    if os.environ.get("LATENTHASH_MILVUS_URI"):
        yield os.environ["LATENTHASH_MILVUS_URI"].rstrip("/")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from extras import installed_extras
    from milvus_server import executable, milvus_server

    if executable() is None:
        if (sys.platform, platform.machine()) == ("linux", "x86_64") and "dev" in installed_extras():
            pytest.fail("milvus-server is missing although setup installed latenthash[dev]", pytrace=False)
        pytest.skip("no Milvus server: the `milvus` package installs only on Linux x86-64")
    with milvus_server(tmp_path_factory.mktemp("milvus-server")) as uri:
        yield uri


def pytest_collection_modifyitems(config, items):
    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None and has_cuda
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU on this machine"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="tensorrt or a CUDA GPU is missing"))


@pytest.fixture(scope="session")
def small_fashion(fashion):
    """3000 database images and 300 queries of real Fashion-MNIST."""
    from latenthash.export.data import Dataset

    return Dataset("fashion-mnist", fashion.train.subset(3000, seed=1), fashion.test.subset(300, seed=1),
                   fashion.class_names)


@pytest.fixture(scope="session")
def trained_run(small_fashion, tmp_path_factory):
    """A real 24-bit model, 2 epochs on the small subset (~20 s on 2 cores)."""
    from latenthash.export.train import TrainConfig, default_model_config, train

    out = tmp_path_factory.mktemp("run")
    mc = default_model_config(small_fashion, bits=24, feature_dim=64)
    train(small_fashion, out, model_config=mc, cfg=TrainConfig(epochs=2, batch_size=64, seed=0), progress=False)
    return out


@pytest.fixture(scope="session")
def onnx_model(trained_run, small_fashion):
    from latenthash.export.onnx import export_onnx

    path = trained_run / "model.onnx"
    export_onnx(trained_run, path, images=small_fashion.test.images[:128])
    return path
