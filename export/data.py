"""Datasets as plain numpy arrays: uint8 images in NHWC layout plus labels.

Torch-free on purpose, so that `latenthash index` (base install) reads the same datasets as training does.
Retrieval protocol for the standard sets (seed paper, Lin et al.): the test split is the query set and the
training split is the database.

Labels are int64 class indices of shape (N,) for single-label data, or a bool multi-hot matrix (N, classes) for
multi-label data (list files); `Dataset.multilabel` tells which.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from latenthash.errors import DataError, InvalidInput

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,) or bool (N, classes)
    paths: tuple[str, ...] | None = None  # source files, where the data came from files

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n: int | None, *, seed: int = 0) -> Split:
        """A seeded random subset of n items (all items, in order, when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        paths = tuple(self.paths[i] for i in idx) if self.paths else None
        return Split(self.images[idx], self.labels[idx], paths)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split  # the database for retrieval
    test: Split  # the queries for retrieval
    class_names: tuple[str, ...]
    multilabel: bool = False
    # how to load it again (set by load_dataset): {"kind", "data_dir" (absolute), "options"}; runs record it
    source: dict | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def metadata(self, part: Split, limit: int | None = None) -> list[dict]:
        """What an index stores with each of the first `limit` items of `part`: its label and class name (its
        labels, for multi-label data) and its source file where it came from one."""
        labels = part.labels[:limit]
        if self.multilabel:
            out = [{"labels": [self.class_names[j] for j in np.flatnonzero(row)]} for row in labels]
        else:
            out = [{"label": int(c), "class": self.class_names[c]} for c in labels]
        for m, path in zip(out, part.paths or ()):
            m["path"] = path
        return out


# ----------------------------------------------------------------------------------------------- IDX (MNIST family)
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (raw or gzipped): uint8 images (magic 2051) or labels (magic 2049)."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc} (truncated or not gzip?)") from None
    if len(raw) < 8:
        raise DataError(f"IDX file {path} is too short ({len(raw)} bytes) to hold a header")
    magic = int.from_bytes(raw[0:4], "big")
    if magic not in (2049, 2051):
        raise DataError(
            f"IDX file {path} has magic number {magic}; expected 2049 (labels) or 2051 (images). "
            "Is it an MNIST-format file?"
        )
    ndim = magic - 2048
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"IDX file {path} holds {len(raw)} bytes; its header {dims} promises {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise DataError(f"{stem}[.gz] not found in {directory}")


def load_idx_dir(directory: str | os.PathLike, *, name: str, class_names: tuple[str, ...]) -> Dataset:
    """MNIST-format files `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`, `t10k-...` in a folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{name} directory not found: {directory}")
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
        lab_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3:
            raise DataError(f"{img_path} is not an image file (it holds {images.ndim}-d data)")
        if labels.ndim != 1:
            raise DataError(f"{lab_path} is not a label file (it holds {labels.ndim}-d data)")
        if len(images) != len(labels):
            raise DataError(f"{img_path} holds {len(images)} images but {lab_path} holds {len(labels)} labels")
        if labels.size and labels.max() >= len(class_names):
            raise DataError(f"{lab_path} has label {labels.max()}, beyond the {len(class_names)} classes")
        splits[split] = Split(images[..., None].copy(), labels.astype(np.int64))
    return Dataset(name, splits["train"], splits["test"], class_names)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    directory = Path(data_dir) if data_dir else FASHION_MNIST_DEBIAN_DIR
    if data_dir is None and not directory.is_dir():
        raise DataError(
            f"Fashion-MNIST not found in {directory}: `apt-get install -y dataset-fashion-mnist`, "
            "or pass --data-dir with the IDX files"
        )
    return load_idx_dir(directory, name="fashion-mnist", class_names=FASHION_MNIST_CLASSES)


def load_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    if data_dir is None:
        raise DataError("MNIST needs --data-dir: a folder with the four MNIST IDX files (raw or .gz)")
    return load_idx_dir(data_dir, name="mnist", class_names=MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------------------- CIFAR-10
def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 file not found: {path}") from None
    except Exception as exc:  # unpickling garbage raises many types
        raise DataError(f"cannot read CIFAR-10 batch {path}: {exc}") from None


def load_cifar10(data_dir: str | os.PathLike | None = None) -> Dataset:
    """The python-pickle CIFAR-10 folder (`cifar-10-batches-py`: data_batch_1..5, test_batch, batches.meta)."""
    if data_dir is None:
        raise DataError("CIFAR-10 needs --data-dir: the extracted cifar-10-batches-py folder")
    directory = Path(data_dir)

    def batch(name: str) -> Split:
        d = _unpickle(directory / name)
        try:
            data = np.asarray(d[b"data"], dtype=np.uint8)
            labels = np.asarray(d[b"labels"], dtype=np.int64)
        except KeyError as exc:
            raise DataError(f"CIFAR-10 batch {directory / name} lacks the key {exc}") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise DataError(f"CIFAR-10 batch {directory / name} has data {data.shape} and {len(labels)} labels")
        return Split(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels)

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    train = Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
    meta_path = directory / "batches.meta"
    names = tuple(n.decode() for n in _unpickle(meta_path)[b"label_names"]) if meta_path.exists() else tuple(
        "airplane automobile bird cat deer dog frog horse ship truck".split())
    return Dataset("cifar10", train, batch("test_batch"), names)


# ------------------------------------------------------------------------------------------------ image files
def load_image_file(path: str | os.PathLike, size: tuple[int, int], channels: int) -> np.ndarray:
    """Decode one image file with Pillow and resize it to (height, width); uint8 (H, W, C)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from None
    return arr[..., None] if channels == 1 else arr


def _read_images(paths: list[str], size: tuple[int, int], channels: int) -> np.ndarray:
    from latenthash.progress import progress as progress_bar

    out = np.empty((len(paths), size[0], size[1], channels), dtype=np.uint8)
    for i, p in enumerate(progress_bar(paths, show=len(paths) >= 2000, desc="decode images", unit="img")):
        out[i] = load_image_file(p, size, channels)
    return out


def _seeded_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def load_folder(data_dir: str | os.PathLike | None, *, image_size: int = 32, channels: int = 3,
                test_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """An image folder with one subfolder per class; `train/` and `test/` subfolders if present, else a seeded split."""
    if data_dir is None:
        raise DataError("the folder dataset needs --data-dir: a folder with one subfolder of images per class")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    split_dirs = [root / "train", root / "test"]
    if all(d.is_dir() for d in split_dirs):
        class_names = tuple(sorted(p.name for p in split_dirs[0].iterdir() if p.is_dir()))
        listed = [_list_class_dirs(d, class_names) for d in split_dirs]
    else:
        class_names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
        paths, labels = _list_class_dirs(root, class_names)
        tr, te = _seeded_split(len(paths), test_fraction, seed)
        listed = [([paths[i] for i in tr], labels[tr]), ([paths[i] for i in te], labels[te])]
    size = (image_size, image_size)
    train, test = (Split(_read_images(p, size, channels), lab, tuple(p)) for p, lab in listed)
    return Dataset(root.name, train, test, class_names)


def _list_class_dirs(root: Path, class_names: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    if not class_names:
        raise DataError(f"{root} has no class subfolders (expected one subfolder of images per class)")
    paths, labels = [], []
    for c, name in enumerate(class_names):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += [str(p) for p in files]
        labels += [c] * len(files)
    if not paths:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return paths, np.asarray(labels, dtype=np.int64)


def load_list(data_dir: str | os.PathLike | None, *, image_size: int = 32, channels: int = 3,
              test_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Multi-label list files: lines `path label [label ...]` (labels are names or integers; paths relative to the
    list file). `--data-dir` is one list file (seeded split) or a folder with `train.txt` and `test.txt`."""
    if data_dir is None:
        raise DataError("the list dataset needs --data-dir: a list file, or a folder with train.txt and test.txt")
    root = Path(data_dir)
    files = [root / "train.txt", root / "test.txt"] if root.is_dir() else [root]
    entries = [_parse_list(f) for f in files]
    class_names = tuple(sorted({lab for e in entries for _, labs in e for lab in labs},
                               key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s)))
    index = {c: i for i, c in enumerate(class_names)}

    def to_split(items: list[tuple[str, list[str]]]) -> Split:
        multi_hot = np.zeros((len(items), len(class_names)), dtype=bool)
        for i, (_, labs) in enumerate(items):
            multi_hot[i, [index[lab] for lab in labs]] = True
        paths = [p for p, _ in items]
        return Split(_read_images(paths, (image_size, image_size), channels), multi_hot, tuple(paths))

    if len(entries) == 1:
        tr, te = _seeded_split(len(entries[0]), test_fraction, seed)
        entries = [[entries[0][i] for i in tr], [entries[0][i] for i in te]]
    return Dataset(root.stem, to_split(entries[0]), to_split(entries[1]), class_names, multilabel=True)


def _parse_list(path: Path) -> list[tuple[str, list[str]]]:
    if not path.is_file():
        raise DataError(f"list file not found: {path}")
    items = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{lineno}: expected 'path label [label ...]', got {line!r}")
        image = Path(parts[0]) if Path(parts[0]).is_absolute() else path.parent / parts[0]
        items.append((str(image), parts[1:]))
    if not items:
        raise DataError(f"list file {path} has no entries")
    return items


# ---------------------------------------------------------------------------------------------------------- digits
def load_digits(data_dir: str | os.PathLike | None = None, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), scaled from 0..16 to 0..255; seeded split."""
    from latenthash.errors import require

    datasets = require("sklearn.datasets", extra="train", purpose="the digits dataset")
    bunch = datasets.load_digits()
    images = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    tr, te = _seeded_split(len(images), test_fraction, seed)
    return Dataset("digits", Split(images[tr], labels[tr]), Split(images[te], labels[te]), MNIST_CLASSES)


LOADERS: dict[str, Callable[..., Dataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "folder": load_folder,
    "list": load_list,
    "digits": load_digits,
}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **options) -> Dataset:
    """Load a dataset by name: one of `LOADERS`. The result records where it came from (`Dataset.source`)."""
    try:
        loader = LOADERS[name]
    except KeyError:
        raise InvalidInput(f"unknown dataset {name!r}; choose one of {', '.join(LOADERS)}") from None
    ds = loader(data_dir, **options)
    return replace(ds, source={"kind": name, "data_dir": None if data_dir is None else str(Path(data_dir).resolve()),
                               "options": options})


def source_of(ds: Dataset) -> dict:
    """What a run records of its data: the dataset's source, or for one built in memory from a named dataset (a
    subset of Fashion-MNIST, say), that dataset's name and default location."""
    if ds.source is not None:
        return ds.source
    return {"kind": ds.name, "data_dir": None, "options": {}}


def load_source(source: dict, data_dir: str | os.PathLike | None = None, *, what: str = "the run") -> Dataset:
    """The data a run or a model recorded, from where it was (or from `data_dir`); a DataError naming --data-dir
    when it is not there any more."""
    kind = source.get("kind")
    if kind not in LOADERS:
        raise DataError(f"{what} was trained on data latenthash cannot load again by name ({kind!r}): pass "
                        f"--dataset KIND --data-dir DIR")
    where = data_dir if data_dir is not None else source.get("data_dir")
    try:
        return load_dataset(kind, where, **source.get("options", {}))
    except DataError as exc:
        place = f" at {where}" if where else ""
        raise DataError(f"{what}'s {kind} data{place} cannot be read ({exc}): pass --data-dir DIR where it is now") \
            from None
