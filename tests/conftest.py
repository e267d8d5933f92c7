"""Shared fixtures: small real data subsets, seeded generators, GPU / TensorRT skips."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def fashion():
    """Fashion-MNIST from Debian's dataset-fashion-mnist (installed by .ci/run)."""
    from latenthash.export.data import load_fashion_mnist

    return load_fashion_mnist()


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
