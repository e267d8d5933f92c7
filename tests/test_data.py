import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latenthash.errors import DataError, InvalidInput
from latenthash.export.data import load_dataset, read_idx


def write_idx(path, array, magic, compress=False):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def make_idx_dir(tmp_path, n_train=20, n_test=5, compress=False):
    """IDX files of random pixels and labels; returns the directory and {split: (images, labels)} written."""
    rng = np.random.default_rng(0)
    sfx = ".gz" if compress else ""
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{sfx}", images, 2051, compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{sfx}", labels, 2049, compress)
        written[prefix] = (images, labels)
    return tmp_path, written


def test_fashion_mnist_found_in_debian_location(fashion):
    assert fashion.train.images.shape == (60000, 28, 28, 1) and fashion.test.images.shape == (10000, 28, 28, 1)
    assert fashion.train.images.dtype == np.uint8
    assert np.bincount(fashion.test.labels).tolist() == [1000] * 10
    assert fashion.class_names[9] == "Ankle boot"


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_raw_and_gzip(tmp_path, compress):
    root, written = make_idx_dir(tmp_path, compress=compress)
    ds = load_dataset("mnist", root)
    assert len(ds.train) == 20 and len(ds.test) == 5 and ds.image_shape == (28, 28, 1)
    for split, prefix in ((ds.train, "train"), (ds.test, "t10k")):  # every pixel and label, in file order
        images, labels = written[prefix]
        np.testing.assert_array_equal(split.images[..., 0], images)
        np.testing.assert_array_equal(split.labels, labels)


def test_idx_errors_name_the_file(tmp_path):
    make_idx_dir(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(bad, np.zeros(4), 2049)  # 4 labels for 5 images
    with pytest.raises(DataError, match="5 images but .*t10k-labels.* 4 labels"):
        load_dataset("mnist", tmp_path)
    write_idx(bad, np.zeros(5), 1234)
    with pytest.raises(DataError, match="magic number 1234"):
        load_dataset("mnist", tmp_path)
    write_idx(bad, np.zeros(5), 2049)
    bad.write_bytes(bad.read_bytes()[:-2])
    with pytest.raises(DataError, match="bytes"):
        read_idx(bad)
    (tmp_path / "x.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="x.gz"):
        read_idx(tmp_path / "x.gz")
    bad.unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match="data-dir"):
        load_dataset("mnist")


def test_cifar10_pickles(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 4))}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
        written[name] = batch
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train.images.shape == (20, 32, 32, 3) and ds.test.images.shape == (4, 32, 32, 3)
    # CIFAR rows are 1024 red, then 1024 green, then 1024 blue values, each plane row-major
    test = written["test_batch"]
    np.testing.assert_array_equal(ds.test.images[1, 2, 5], test[b"data"][1, [2 * 32 + 5, 1024 + 69, 2048 + 69]])
    np.testing.assert_array_equal(ds.test.images, test[b"data"].reshape(4, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ds.test.labels, test[b"labels"])
    np.testing.assert_array_equal(ds.train.labels[4:8], written["data_batch_2"][b"labels"])  # batches in order
    (tmp_path / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", tmp_path)


def test_image_folder_and_list(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    ds = load_dataset("folder", root, image_size=16)
    assert ds.class_names == ("cat", "dog") and len(ds.train) + len(ds.test) == 10
    assert ds.train.images.shape[1:] == (16, 16, 3)
    for split in (ds.train, ds.test):  # each image carries the label of its folder, and is that file's pixels
        for path, label, image in zip(split.paths, split.labels, split.images):
            assert ds.class_names[label] == Path(path).parent.name
            expected = np.asarray(Image.open(path).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
            np.testing.assert_allclose(image.astype(int), expected.astype(int), atol=1)
    lines = [f"{cls}/{i}.png {cls} {'pet' if i % 2 else 'wild'}" for cls in ("cat", "dog") for i in range(5)]
    (root / "all.txt").write_text("\n".join(lines))
    ml = load_dataset("list", root / "all.txt", image_size=8)
    assert ml.multilabel and ml.train.labels.shape[1] == 4 and ml.train.labels.sum(1).tolist() == [2] * len(ml.train)
    (root / "cat" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="0.png"):
        load_dataset("folder", root)
    (root / "bad.txt").write_text("only_a_path.png\n")
    with pytest.raises(DataError, match="bad.txt:1"):
        load_dataset("list", root / "bad.txt")


def test_digits_and_unknown_name():
    ds = load_dataset("digits")
    assert ds.train.images.shape[1:] == (8, 8, 1) and ds.train.images.max() == 255
    assert len(ds.train) + len(ds.test) == 1797
    with pytest.raises(InvalidInput, match="fashion-mnist"):
        load_dataset("imagenet")
