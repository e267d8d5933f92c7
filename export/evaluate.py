"""Retrieval evaluation of a trained run, with the baselines in the same harness on the same data.

Protocol: the test split are the queries, the training split the database. Reported for the learned codes:
mAP over the whole database, mAP@1000, precision@k, precision within Hamming radius 2, precision-recall by radius,
and classification accuracy; next to them the paper's "linear search" (exhaustive cosine over the float F4
features) and two unsupervised hashing baselines on raw pixels at the same code length: LSH (random hyperplanes)
and PCA-ITQ (Gong & Lazebnik).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from latenthash.codes import THRESHOLD, bits_of, threshold
from latenthash.encoder import Encoder
from latenthash.export.data import Dataset, load_dataset, load_source
from latenthash.metrics import RetrievalReport, cosine_linear_search, hamming_retrieval


def lsh_codes(train_x: np.ndarray, query_x: np.ndarray, bits: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random-hyperplane LSH on mean-centred inputs; packed codes for database and queries."""
    mean = train_x.mean(axis=0)
    planes = np.random.default_rng(seed).standard_normal((train_x.shape[1], bits)).astype(np.float32)
    return (np.packbits((train_x - mean) @ planes > 0, axis=1), np.packbits((query_x - mean) @ planes > 0, axis=1))


def itq_codes(train_x: np.ndarray, query_x: np.ndarray, bits: int, *, iterations: int = 50,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """PCA-ITQ: PCA to `bits` dimensions, then the rotation that minimizes quantization error (alternating SVD)."""
    mean = train_x.mean(axis=0)
    xc = train_x - mean
    _, _, vt = np.linalg.svd(xc[:: max(1, len(xc) // 20000)], full_matrices=False)
    pca = vt[:bits].T  # (D, bits); bits <= D
    v = xc @ pca
    rng = np.random.default_rng(seed)
    r, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
    for _ in range(iterations):
        b = np.sign(v @ r)
        b[b == 0] = 1
        u, _, wt = np.linalg.svd(b.T @ v)
        r = (u @ wt).T
    proj = pca @ r
    return np.packbits(xc @ proj > 0, axis=1), np.packbits((query_x - mean) @ proj > 0, axis=1)


def report_dict(rep: RetrievalReport) -> dict:
    return {"map_all": rep.map_all, f"map_at_{rep.k}": rep.map_at_k, "precision_r2": rep.precision_r2,
            "precision_at_k": dict(zip(map(str, rep.ks), np.round(rep.precision_at_k, 5).tolist())),
            "precision_by_radius": np.round(rep.precision_by_radius, 5).tolist(),
            "recall_by_radius": np.round(rep.recall_by_radius, 5).tolist()}


def evaluate_run(run_dir: str | Path, *, dataset: Dataset | None = None, dataset_name: str | None = None,
                 data_dir: str | None = None, max_queries: int | None = None, max_database: int | None = None,
                 baselines: bool = True, plots: bool = True, progress: bool = True,
                 model_path: str | Path | None = None) -> dict:
    """Evaluate a training run; returns the report dict (also what `latenthash eval --json` writes). With
    `model_path`, the codes and features come from that exported file (any precision, on ONNX Runtime) instead of
    the PyTorch checkpoint, and classification accuracy is not measured."""
    from latenthash.export.train import load_model, predict, run_source

    model, ckpt = load_model(run_dir)
    ds = dataset or (load_dataset(dataset_name, data_dir) if dataset_name else load_source(run_source(ckpt), data_dir))
    db, queries = ds.train.subset(max_database), ds.test.subset(max_queries)
    bits = model.config.bits
    t0 = time.perf_counter()
    if model_path is None:
        db_probs, db_feats, _ = predict(model, db.images, progress=progress)
        q_probs, q_feats, q_logits = predict(model, queries.images, progress=progress)
    else:
        enc = Encoder.open(model_path, runtime="onnxruntime", providers=["CPUExecutionProvider"])
        (db_probs, db_feats), (q_probs, q_feats) = (encode_probs(enc, x.images) for x in (db, queries))
        q_logits = None
    encode_s = time.perf_counter() - t0
    ours = hamming_retrieval(threshold(q_probs), threshold(db_probs), queries.labels, db.labels, bits=bits)
    report = {"bits": bits, "dataset": ds.name, "queries": len(queries), "database": len(db),
              "backbone": model.config.backbone, "encode_seconds": encode_s, **report_dict(ours)}
    report["map_at_1000"] = report.pop(f"map_at_{ours.k}")
    if model_path is not None:
        report |= {"model": str(model_path), "precision": enc.info.precision}
    if ds.multilabel or q_logits is None:
        report["accuracy"] = None
    else:
        report["accuracy"] = float((q_logits.argmax(1) == queries.labels).mean())
    # how far thresholding moves H's activations: mean |p - threshold| near 0.5 means nearly binary already
    report["activation_binariness"] = float(np.abs(q_probs - THRESHOLD).mean() * 2)
    report["bit_balance"] = float(np.abs(bits_of(db_probs).mean(0) - 0.5).mean())  # 0: every bit half set
    lin = cosine_linear_search(q_feats, db_feats, queries.labels, db.labels)
    report["linear_search"] = {"map_all": lin[0], "map_at_1000": lin[1]}
    if baselines:
        report["baselines"] = baseline_table(ds, db, queries, [bits])
    if plots:
        report["plots"] = write_plots(Path(run_dir), ours, report)
    report["history"] = ckpt["train_config"].get("history", [])
    return report


def encode_probs(enc: Encoder, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """H's activations and the features of `images` through an exported model."""
    out = enc.encode(images, return_probs=True)
    return out.probs, out.features


def baseline_table(ds: Dataset, db, queries, bit_lengths: list[int]) -> dict:
    """LSH and PCA-ITQ on raw pixels at each code length: {"lsh": {bits: {...}}, "pca_itq": {...}}."""
    xd = db.images.reshape(len(db), -1).astype(np.float32) / 255.0
    xq = queries.images.reshape(len(queries), -1).astype(np.float32) / 255.0
    out: dict = {"lsh": {}, "pca_itq": {}}
    for bits in bit_lengths:
        for name, fn in (("lsh", lsh_codes), ("pca_itq", itq_codes)):
            cd, cq = fn(xd, xq, bits)
            rep = hamming_retrieval(cq, cd, queries.labels, db.labels, bits=bits)
            out[name][str(bits)] = {"map_all": rep.map_all, "map_at_1000": rep.map_at_k,
                                    "precision_r2": rep.precision_r2}
    return out


def write_plots(out_dir: Path, rep: RetrievalReport, report: dict) -> list[str]:
    """precision@k and precision-recall-by-radius PNGs next to the checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{report['dataset']}, {report['bits']} bits"
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(rep.ks, rep.precision_at_k, marker="o")
    ax.set(xscale="log", xlabel="number of retrieved images k", ylabel="precision@k", title=title, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(str(out_dir / "precision_at_k.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(rep.recall_by_radius, rep.precision_by_radius, marker=".")
    for r in (0, 2, 4, 8):
        if r < len(rep.recall_by_radius):
            ax.annotate(f"r={r}", (rep.recall_by_radius[r], rep.precision_by_radius[r]), fontsize=8)
    ax.set(xlabel="recall", ylabel="precision", title=f"PR by Hamming radius, {title}", xlim=(0, 1.02),
           ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(str(out_dir / "pr_curve.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def save_report(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=1))
