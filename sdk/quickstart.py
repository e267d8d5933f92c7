"""The main job, end to end: train -> export -> index -> serve -> query through the client -> report.

It orchestrates the packages as an application would: training and export from `latenthash.export` (the train
extra), the index through the backend seam, the service from `latenthash.server`, queries through the client; the
training package itself depends on neither the server nor the client.

Each step writes its output into the work directory and is skipped on a rerun when its output is there, so an
interrupted run continues where it stopped. Fashion-MNIST is used where Debian's package provides it; otherwise
scikit-learn's bundled digits (no download).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from latenthash.export.data import FASHION_MNIST_DEBIAN_DIR, Dataset, load_dataset


def pick_dataset() -> str:
    return "fashion-mnist" if FASHION_MNIST_DEBIAN_DIR.is_dir() else "digits"


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(out: str | Path = "runs/quickstart", *, dataset: str | None = None, bits: int = 48,
        epochs: int | None = None, queries: int = 1000) -> dict:
    from latenthash.backend import open_index, saved_index_at
    from latenthash.client import Client
    from latenthash.encoder import Encoder
    from latenthash.export.evaluate import evaluate_run
    from latenthash.export.onnx import export_onnx
    from latenthash.export.train import TrainConfig, default_model_config, train
    from latenthash.ingest import add_images
    from latenthash.server.app import ServerConfig, create_server

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = dataset or pick_dataset()
    ds = load_dataset(name)
    run_dir, model_path, index_dir = out / "run", out / "model.onnx", out / "index"
    print(f"dataset {name}: {len(ds.train)} database images, {len(ds.test)} queries, work dir {out}")

    _step("1/6 train")
    history = run_dir / "history.json"
    if history.exists():
        print(f"reusing {run_dir}")
    else:
        cfg = TrainConfig()
        if epochs is not None:
            cfg.epochs = epochs
        elif name == "digits":
            cfg.epochs, cfg.batch_size = 30, 64
        t0 = time.perf_counter()
        train(ds, run_dir, model_config=default_model_config(ds, bits=bits), cfg=cfg)
        print(f"trained in {time.perf_counter() - t0:.0f} s")

    _step("2/6 export ONNX (checker + ONNX Runtime vs PyTorch parity)")
    if model_path.exists():
        print(f"reusing {model_path}")
    else:
        report = export_onnx(run_dir, model_path, images=ds.test.subset(256).images)
        print(json.dumps(report["checks"][1], indent=1))

    _step("3/6 retrieval quality (codes of the database vs the query split)")
    quality_path = out / "quality.json"
    if quality_path.exists():
        quality = json.loads(quality_path.read_text())
    else:
        quality = evaluate_run(run_dir, dataset=ds, baselines=False)
        quality_path.write_text(json.dumps(quality, indent=1))
    print(json.dumps({k: quality[k] for k in ("map_all", "map_at_1000", "precision_r2", "accuracy")}, indent=1))

    _step("4/6 index the database with the ONNX encoder")
    encoder = Encoder.open(model_path)
    if saved_index_at(index_dir):
        print(f"reusing {index_dir}")
    else:
        index = open_index(index_dir, create=True, save_new=False, bits=encoder.bits,
                           feature_dim=encoder.feature_dim)
        index.model_info = encoder.info.to_dict()
        add_images(index, encoder, ds.train.images, ids=np.arange(len(ds.train)), metadata=ds.metadata(ds.train))
        index.save()

    _step("5/6 serve over gRPC and query through the client")
    server, port = create_server(ServerConfig(index=str(index_dir), model=str(model_path), port=0))
    try:
        speed = _query_service(Client(f"127.0.0.1:{port}"), ds, queries)
    finally:
        server.stop(5)

    _step("6/6 results")
    index = open_index(index_dir, warmup=False)
    index.warmup()  # as the server does before it serves: kernels compiled, codes grouped into buckets
    speed.update(_search_speed(index, encoder, ds))
    grid = _sample_grid(out / "samples.png", ds, index, encoder)
    summary = {"dataset": name, "bits": bits, **{k: quality[k] for k in ("map_all", "map_at_1000", "precision_r2",
                                                                          "accuracy")}, **speed, "grid": str(grid)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


def _query_service(client, ds: Dataset, n: int) -> dict:
    """Send query images through the service; precision of the returned hits and the round-trip rate."""
    images = ds.test.images[:n]
    t0 = time.perf_counter()
    res = client.search(images=images, k=10)
    seconds = time.perf_counter() - t0
    precision = float((np.asarray(ds.train.labels)[res.ids] == ds.test.labels[:n, None]).mean())
    return {"service_precision_at_10": precision, "service_images_per_s": n / seconds}


def _search_speed(index, encoder, ds: Dataset, n: int = 200) -> dict:
    """In-process two-step search against the paper's linear search (exhaustive cosine) on the same features."""
    enc = encoder.encode(ds.test.images[:n])
    feats = index.get(index.ids).features
    index.search(enc.codes[:1], k=10, features=enc.features[:1])  # warm
    t0 = time.perf_counter()
    for c, f in zip(enc.codes, enc.features):
        index.search(c, k=10, features=f)
    two_step = (time.perf_counter() - t0) / n
    t1 = time.perf_counter()
    for f in enc.features:
        s = feats @ f
        np.argpartition(-s, 10)[:10]
    linear = (time.perf_counter() - t1) / n
    return {"two_step_ms": two_step * 1e3, "linear_search_ms": linear * 1e3, "speedup": linear / two_step}


def _sample_grid(path: Path, ds: Dataset, index, encoder, rows: int = 8, k: int = 8) -> Path:
    """Query images (left column) with their top-k hits; green frame = same class, red = another class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    picks = rng.choice(len(ds.test), rows, replace=False)
    enc = encoder.encode(ds.test.images[picks])
    res = index.search(enc.codes, k=k, features=enc.features)
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.1 * (k + 1), 1.2 * rows))
    cmap = "gray" if ds.image_shape[2] == 1 else None
    for r, q in enumerate(picks):
        axes[r, 0].imshow(ds.test.images[q].squeeze(), cmap=cmap)
        axes[r, 0].set_title(ds.class_names[ds.test.labels[q]][:10], fontsize=7)
        for j in range(k):
            hit = int(res.ids[r, j])
            ax = axes[r, j + 1]
            ax.imshow(ds.train.images[hit].squeeze(), cmap=cmap)
            good = ds.train.labels[hit] == ds.test.labels[q]
            for side in ax.spines.values():
                side.set(color="tab:green" if good else "tab:red", linewidth=2.5)
            ax.set_title(f"d={res.distances[r, j]}", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("queries (left) and their top hits: Hamming pool, cosine re-rank", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
