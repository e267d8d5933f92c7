"""The `latenthash` command: thin wrappers over the library; each subcommand imports what it needs when it runs."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import typer

from latenthash.errors import ExportCheckFailed, LatentHashError
from latenthash.limits import COPY_FLOOR, COPY_MARGINS, DEDUP_MIN_SCORE, DEDUP_RADIUS
from latenthash.precision import DEFAULT_CALIBRATION

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="latenthash: train, export, index, search and serve latent-hash image search.")


def _version(value: bool) -> None:
    if value:
        from latenthash import __version__

        typer.echo(f"latenthash {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print the version and exit")) -> None:
    """latenthash: train, export, index, search and serve latent-hash image search."""


DATASETS = "fashion-mnist, mnist, cifar10, folder, list, digits"


def _need_torch(purpose: str) -> None:
    """Training-side commands need the `train` extra: one line naming it, never a traceback."""
    from latenthash.errors import require

    require("torch", extra="train", purpose=purpose)


def _fail(exc: LatentHashError) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def train(
    dataset: str = typer.Option("fashion-mnist", help=f"one of: {DATASETS}"),
    out: Path = typer.Option(..., help="run directory (checkpoint, history, plots)"),
    data_dir: str | None = typer.Option(None, help="dataset files (Fashion-MNIST: found automatically)"),
    bits: int = typer.Option(48, help="code length h (8..1024)"),
    epochs: int | None = typer.Option(None, help="epochs (default: the measured default, 10)"),
    backbone: str = typer.Option("cnn", help="cnn, resnet18, mobilenet_v3_small, mobilenet_v3_large"),
    pretrained: str | None = typer.Option(None, help="local ImageNet state-dict file for the backbone"),
    feature_dim: int = typer.Option(256, help="size of the F4 feature layer"),
    batch_size: int = typer.Option(128),
    lr: float = typer.Option(0.1, help="peak learning rate of the one-cycle schedule"),
    binarize: float = typer.Option(0.1, help="weight of the push-to-0/1 regularizer (0 disables)"),
    balance: float = typer.Option(0.1, help="weight of the 50%-firing-rate regularizer (0 disables)"),
    compact: float | None = typer.Option(None, help="weight of the within-class code spread regularizer "
                                            "(default: the measured default; 0 disables)"),
    label_smoothing: float | None = typer.Option(None, help="cross-entropy label smoothing (default: the "
                                                    "measured default)"),
    clean_epochs: int | None = typer.Option(None, help="the last N epochs train on unaugmented images "
                                               "(default: the measured default)"),
    copy_dim: int = typer.Option(64, help="size of the copy descriptor that `dedup` groups copies by, trained "
                                 "beside the class path (0: none; training is faster without)"),
    image_size: int = typer.Option(32, help="resize size for folder/list datasets"),
    max_train: int | None = typer.Option(None, help="train on a seeded subset of this many images"),
    threads: int = typer.Option(0, help="torch threads (0: all cores)"),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, help="continue from OUT/checkpoint.pt"),
) -> None:
    """Train the hash-layer CNN on class labels."""
    try:
        _need_torch("training")
        from latenthash.export.data import load_dataset
        from latenthash.export.train import TrainConfig, default_model_config
        from latenthash.export.train import train as run_training

        options = {"image_size": image_size} if dataset in ("folder", "list") else {}
        ds = load_dataset(dataset, data_dir, **options)
        cfg = TrainConfig(batch_size=batch_size, lr=lr, binarize=binarize, balance=balance, seed=seed,
                          threads=threads, max_train=max_train)
        if epochs is not None:
            cfg.epochs = epochs
        if label_smoothing is not None:
            cfg.label_smoothing = label_smoothing
        if compact is not None:
            cfg.compact = compact
        if clean_epochs is not None:
            cfg.clean_epochs = clean_epochs
        mc = default_model_config(ds, bits=bits, backbone=backbone, feature_dim=feature_dim, pretrained=pretrained,
                                  copy_dim=copy_dim)
        run_training(ds, out, model_config=mc, cfg=cfg, resume=resume)
        typer.echo(f"trained {bits}-bit model: {out / 'checkpoint.pt'}")
    except (LatentHashError, OSError) as exc:
        _fail(exc)


@app.command("eval")
def evaluate(
    run_dir: Path = typer.Argument(..., help="a run directory written by `latenthash train`"),
    dataset: str | None = typer.Option(None, help="default: the dataset the run was trained on"),
    data_dir: str | None = typer.Option(None),
    json_out: Path | None = typer.Option(None, "--json", help="write the report here"),
    max_queries: int | None = typer.Option(None, help="evaluate a seeded subset of the queries"),
    max_database: int | None = typer.Option(None, help="use a seeded subset of the database"),
    baselines: bool = typer.Option(True, help="also run LSH and PCA-ITQ at the same code length"),
    model: Path | None = typer.Option(None, help="evaluate this exported ONNX file (fp32, fp16 or int8) "
                                         "instead of the PyTorch checkpoint"),
) -> None:
    """Retrieval quality of a run: mAP, precision within radius 2, P@k, PR curve, baselines, plots."""
    try:
        _need_torch("evaluation")
        from latenthash.export.evaluate import evaluate_run, save_report

        report = evaluate_run(run_dir, dataset_name=dataset, data_dir=data_dir, max_queries=max_queries,
                              max_database=max_database, baselines=baselines, model_path=model)
        if json_out:
            save_report(report, json_out)
        keys = ("bits", "map_all", "map_at_1000", "precision_r2", "accuracy")
        typer.echo(json.dumps({k: report[k] for k in keys} | {"linear_search": report["linear_search"]}, indent=1))
    except (LatentHashError, OSError) as exc:
        _fail(exc)


@app.command("export")
def export_model(
    run_dir: Path = typer.Argument(..., help="a run directory written by `latenthash train`"),
    out: Path = typer.Option(..., help="the ONNX file to write"),
    opset: int = typer.Option(18),
    atol: float = typer.Option(1e-4, help="max |diff| of probs and features, ONNX Runtime vs PyTorch"),
    precision: list[str] = typer.Option(["fp32"], help="fp32, fp16, int8 (repeat for several); reduced-precision "
                                        "copies go beside OUT as NAME.fp16.onnx / NAME.int8.onnx"),
    calibration: int = typer.Option(DEFAULT_CALIBRATION, help="training images that calibrate INT8"),
    check_queries: int | None = typer.Option(None, help="held-out images for the precision checks (all)"),
    check_database: int | None = typer.Option(None, help="database images for the precision checks (all)"),
    data_dir: str | None = typer.Option(None, help="where the run's data is now (default: where it was trained)"),
    random_pixels: bool = typer.Option(False, "--random-pixels", help="where the run's data is gone, check FP32 "
                                       "parity on random pixels (the report says so; not with --precision)"),
) -> None:
    """Export a self-describing ONNX model (uint8 NHWC in; probs, features, logits out) and check its parity;
    with --precision fp16/int8, also checked reduced-precision copies (kept only within their thresholds)."""
    try:
        _need_torch("export")
        from latenthash.export.onnx import export_onnx

        report = export_onnx(run_dir, out, opset=opset, atol=atol, precisions=tuple(precision),
                             calibration=calibration, check_queries=check_queries, check_database=check_database,
                             data_dir=data_dir, random_pixels=random_pixels)
        keys = ("path", "bytes", "parity_images", "checks", "precisions", "checked_on")
        typer.echo(json.dumps({k: report[k] for k in keys if k in report}, indent=1))
        removed = {p: r["why_removed"] for p, r in report.get("precisions", {}).items() if not r.get("kept", True)}
        if removed:
            _fail(ExportCheckFailed("; ".join(f"{p} copy removed: {why}" for p, why in removed.items())))
    except (LatentHashError, OSError) as exc:
        _fail(exc)


@app.command("index")
def build_index(
    model: Path = typer.Option(..., help="exported ONNX model"),
    out: str = typer.Option(..., "--out", "--index",
                            help="index directory, or milvus://host:19530/collection[?index=BIN_IVF_FLAT"
                                 "&nlist=1024] (milvus-lite:///path/file.db/collection for a local file)"),
    dataset: str | None = typer.Option(None, help=f"one of: {DATASETS} (default: the data the model was "
                                       "trained on, from where it was)"),
    data_dir: str | None = typer.Option(None, help="where that data is now"),
    split: str = typer.Option("train", help="train (the database, default) or test"),
    add: bool = typer.Option(False, "--add", help="append to an existing index (ids continue after its largest)"),
    limit: int | None = typer.Option(None, help="index only the first N images"),
    feature_dtype: str = typer.Option("float16", help="float32, float16 or int8 feature storage (directories)"),
    runtime: str = typer.Option("auto"),
    ray: str | None = typer.Option(None, help="encode on Ray Data: 'local' starts a local Ray, 'auto' or "
                                                 "ray://head:10001 joins a cluster"),
    ray_workers: int | None = typer.Option(None, help="encoder actors on Ray (default: one per CPU)"),
    ray_gpus: float = typer.Option(0.0, help="GPUs per Ray encoder actor"),
    images: Path | None = typer.Option(None, "--images", help="index your own image files instead of a dataset: "
                                          "a folder (recursive; jpg, jpeg, png, webp, bmp, gif, tiff) or a text "
                                          "file of paths; metadata {\"path\": ...}; rerun with --add to resume"),
) -> None:
    """Encode a dataset split (ids = positions in the split) or your own image files, and store codes, features
    and metadata."""
    if images is not None:
        return _index_files(model, out, images, add=add, feature_dtype=feature_dtype, runtime=runtime)
    try:
        import numpy as np

        from latenthash.encoder import Encoder
        from latenthash.export.data import load_dataset, load_source
        from latenthash.ingest import add_images

        encoder = Encoder.open(model, runtime=runtime)
        source = encoder.info.data_source or {"kind": encoder.info.dataset or "fashion-mnist"}
        ds = load_dataset(dataset, data_dir) if dataset else load_source(source, data_dir, what=f"the model {model}")
        part = ds.train if split == "train" else ds.test
        arrays = part.images[:limit]
        with _index_for_writing(out, encoder, add=add, feature_dtype=feature_dtype, create=not add) as index:
            start = int(index.ids.max()) + 1 if add and len(index) else 0
            metadata = ds.metadata(part, limit)
            ids = np.arange(start, start + len(arrays))
            if ray:
                from latenthash.ray_ingest import add_images_ray

                # workers decode files themselves
                files = {"paths": list(part.paths[:limit])} if part.paths else {"images": arrays}
                add_images_ray(index, model, ids=ids, metadata=metadata, runtime=runtime, **files,
                               address=None if ray == "local" else ray, workers=ray_workers, gpus_per_worker=ray_gpus)
            else:
                add_images(index, encoder, arrays, ids=ids, metadata=metadata)
            index.save()
        typer.echo(json.dumps(index.stats(), indent=1))
    except (LatentHashError, OSError) as exc:
        _fail(exc)


@contextlib.contextmanager
def _index_for_writing(out: str, encoder, *, add: bool, feature_dtype: str, create: bool, hint: str = ""):
    """The index an indexing run writes to, under the directory's lock until the run ends (no server or other
    indexer writes meanwhile). An existing one is refused without --add; a directory index not saved yet is built
    in memory and saved by the run, so an interrupted first run leaves none."""
    from latenthash.backend import index_directory, open_index, saved_index_at
    from latenthash.storage import DirLock

    if not add and saved_index_at(out):
        raise LatentHashError(f"an index already exists at {out}: pass --add to append{hint}, or another --out")
    with DirLock(index_directory(out)):
        index = open_index(out, create=create, bits=encoder.bits, feature_dim=encoder.feature_dim,
                           **({"feature_dtype": feature_dtype, "save_new": False} if index_directory(out) else {}))
        index.model_info = encoder.info.to_dict()
        yield index


def _index_files(model: Path, out: str, source: Path, *, add: bool, feature_dtype: str, runtime: str) -> None:
    """`index --images`: stream files into the index, saving every 20,000 images; unreadable files are named."""
    try:
        from latenthash.encoder import Encoder
        from latenthash.ingest import add_image_files, list_image_files

        encoder = Encoder.open(model, runtime=runtime)
        paths, others = list_image_files(source)
        with _index_for_writing(out, encoder, add=add, feature_dtype=feature_dtype, create=True,
                                hint=" (or to resume an interrupted run: files already indexed are skipped)") as index:
            ids = index.ids
            present = {m.get("path") for m in index.metadata(ids) if isinstance(m, dict)} if len(ids) else set()
            done = add_image_files(index, encoder, paths, start_id=int(ids.max()) + 1 if len(ids) else 0,
                                   skip=present, checkpoint=index.save)
            done.bad = others + done.bad
            if done.added:
                index.save()
        for path, why in done.bad[:5]:
            typer.secho(f"skipped {path}: {why}", fg=typer.colors.YELLOW, err=True)
        if len(done.bad) > 5:
            typer.secho(f"... and {len(done.bad) - 5} more unreadable files", fg=typer.colors.YELLOW, err=True)
        typer.echo(json.dumps({"indexed": done.added, "already_indexed": done.already, "unreadable": len(done.bad),
                               "files": len(paths) + len(others), "count": len(index), "index": out}, indent=1))
        if done.added == 0 and done.already == 0:
            raise LatentHashError(f"no readable image among the {len(paths)} files of {source}")
    except (LatentHashError, OSError) as exc:
        _fail(exc)


@app.command()
def search(
    queries: list[Path] = typer.Argument(..., help="query image files"),
    index: str | None = typer.Option(None, help="index directory or milvus:// URI (searched in process)"),
    model: Path | None = typer.Option(None, help="exported ONNX model (with --index)"),
    server: str | None = typer.Option(None, help="host:port of a running `latenthash serve` instead"),
    token: str | None = typer.Option(None, envvar="LATENTHASH_TOKEN", help="bearer token for --server"),
    k: int = typer.Option(10, help="hits per query"),
    pool: int | None = typer.Option(None, help="step-1 pool (recall against speed; default max(100 k, 10000))"),
    as_json: bool = typer.Option(False, "--json", help="print the hits as JSON"),
    sheet: Path | None = typer.Option(None, help="write a contact sheet (each query beside its hits) here"),
) -> None:
    """Search an index with image files: a table of hits (or --json), and optionally a contact sheet."""
    try:
        if (index is None) == (server is None):
            raise LatentHashError("search needs --index (with --model) or --server host:port")
        blobs = [q.read_bytes() for q in queries]
        if server is not None:
            from latenthash.client import Client

            with Client(server, token=token) as client:
                result = client.search(images=blobs, k=k, pool=pool)
        else:
            if model is None:
                raise LatentHashError("--index needs --model (the model that built the index)")
            from latenthash.backend import open_index
            from latenthash.encoder import Encoder
            from latenthash.search import Searcher

            searcher = Searcher(open_index(index), Encoder.open(model))
            result = searcher.search(images=blobs, k=k, pool=pool)
        hits = result.to_list()
        if as_json:
            typer.echo(json.dumps([{"query": str(q), "hits": h} for q, h in zip(queries, hits)], indent=1))
        else:
            for q, h in zip(queries, hits):
                typer.echo(f"{q}")
                for rank, hit in enumerate(h, 1):
                    score = "" if hit["score"] is None else f"{hit['score']:.4f}"
                    typer.echo(f"  {rank:>3}  id {hit['id']:<10} distance {hit['distance']:<3} score {score:<7} "
                               f"{json.dumps(hit['metadata'])}")
        if sheet is not None:
            from latenthash.sheet import contact_sheet

            contact_sheet(queries, hits, sheet)
            typer.echo(f"contact sheet: {sheet}", err=True)
    except (LatentHashError, OSError) as exc:
        _fail(exc)


@app.command()
def verify(index: str = typer.Argument(..., help="index directory")) -> None:
    """Check every file of a saved index against its checksum and say which are damaged (exit 1 when any is)."""
    try:
        import time

        from latenthash.backend import index_directory
        from latenthash.generations import verify_files

        root = index_directory(index)
        if root is None:
            raise LatentHashError(f"{index} is not a directory index: verify checks embedded indexes' files")
        t0 = time.perf_counter()
        problems, size = verify_files(root)
        for line in problems:
            typer.echo(f"DAMAGED: {line}", err=True)
        if problems:
            raise typer.Exit(1)
        typer.echo(f"ok: every checksum of {root} holds ({size / 1e6:,.1f} MB read in "
                   f"{time.perf_counter() - t0:.2f} s)")
    except (LatentHashError, OSError) as exc:
        _fail(exc)


@app.command()
def dedup(
    index: str | None = typer.Option(None, help="index directory (searched in process)"),
    server: str | None = typer.Option(None, help="host:port of a running `latenthash serve` instead"),
    token: str | None = typer.Option(None, envvar="LATENTHASH_TOKEN", help="bearer token for --server"),
    radius: int | None = typer.Option(None, help="group by codes and features instead: the largest Hamming distance "
                                      f"between the codes of duplicates (default {DEDUP_RADIUS})"),
    min_score: float | None = typer.Option(None, help="group by codes and features instead: the smallest feature "
                                           f"cosine between duplicates (default {DEDUP_MIN_SCORE})"),
    margins: list[float] | None = typer.Option(None, "--margin", help="copy groups: the margin a group of 2 (then 3, "
                                               "4: repeat the option) must hold over outsiders (default "
                                               f"{' '.join(map(str, COPY_MARGINS))})"),
    floor: float | None = typer.Option(None, help="copy groups: the cosine every link inside a group reaches "
                                       f"(default {COPY_FLOOR})"),
    as_json: bool = typer.Option(False, "--json", help="print the groups as JSON: lists of {id, score, metadata}"),
    sheet: Path | None = typer.Option(None, help="draw each group as a row of this contact sheet (PNG)"),
) -> None:
    """Groups of near-duplicate images in an index, largest first: copies of each other by the copy descriptors the
    index keeps (indexed with a model that has a copy head), or, with --radius / --min-score or where it keeps none,
    codes within --radius and features at least --min-score alike, grouped transitively."""
    try:
        import math

        if (index is None) == (server is None):
            raise LatentHashError("dedup needs --index DIR or --server host:port")
        if server is not None:
            from latenthash.client import Client

            if margins or floor is not None:
                raise LatentHashError("--margin and --floor apply to an --index in process; a server groups copies by "
                                      "its defaults")
            with Client(server, token=token) as client:
                groups = client.duplicates(radius=radius, min_score=min_score, timeout=24 * 3600)
        else:
            from latenthash.backend import open_index
            from latenthash.search import Searcher

            groups = Searcher(open_index(index)).duplicates(radius=radius, min_score=min_score, margins=margins or None,
                                                            floor=floor, progress=True)
        rows = [[{"id": i, "score": None if math.isnan(s) else round(s, 6), "metadata": m}
                 for i, s, m in zip(g.ids.tolist(), g.scores.tolist(), g.metadata or [None] * len(g))]
                for g in groups]
        if as_json:
            typer.echo(json.dumps(rows, indent=1))
        else:
            typer.echo(f"{len(groups)} groups of near-duplicates, {sum(map(len, groups))} items")
            for n, group in enumerate(rows, 1):
                typer.echo(f"group {n}: {len(group)} items")
                for item in group:
                    score = "" if item["score"] is None else f"{item['score']:.4f}"
                    typer.echo(f"  id {item['id']:<10} score {score:<7} {json.dumps(item['metadata'])}")
        if sheet is not None:
            from latenthash.sheet import contact_sheet

            paths = [g[0]["metadata"].get("path") if isinstance(g[0]["metadata"], dict) else None for g in rows]
            contact_sheet(paths, [g[1:] for g in rows], sheet, lead="first")
            typer.echo(f"contact sheet: {sheet}", err=True)
    except (LatentHashError, OSError) as exc:
        _fail(exc)


@app.command()
def serve(
    index: str = typer.Option(..., help="index directory or milvus://host:19530/collection"),
    create: bool = typer.Option(False, "--create", help="create the index (from the model's shape) when missing"),
    model: Path | None = typer.Option(None, help="exported ONNX model (needed for image queries)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 for all interfaces"),
    port: int = typer.Option(50051),
    token: str | None = typer.Option(None, envvar="LATENTHASH_TOKEN", help="require this bearer token (write scope)"),
    tokens: Path | None = typer.Option(None, help="token file: one 'TOKEN read|write' a line; re-read on SIGHUP"),
    tls_cert: Path | None = typer.Option(None),
    tls_key: Path | None = typer.Option(None),
    metrics_port: int | None = typer.Option(None, help="serve Prometheus metrics on this HTTP port"),
    runtime: str = typer.Option("auto"),
    batch_max: int = typer.Option(64, help="largest dynamic encode batch (1 disables batching)"),
    batch_delay_ms: float = typer.Option(2.0, help="longest wait to fill a dynamic batch"),
    search_batch_max: int = typer.Option(64, help="most concurrent queries merged into one search (1 disables)"),
) -> None:
    """Run the gRPC service until SIGTERM / SIGINT (then finish in-flight calls and persist the index); SIGHUP
    reloads the --tokens file."""
    try:
        from latenthash.server.app import ServerConfig
        from latenthash.server.app import serve as run_server

        if bool(tls_cert) != bool(tls_key):
            raise LatentHashError("TLS needs both --tls-cert and --tls-key")
        if token is None and os.environ.get("LATENTHASH_TOKEN") == "":  # set but empty: refused, not ignored
            token = ""
        run_server(ServerConfig(index=index, model=str(model) if model else None, host=host, port=port,
                                token=token, tokens=str(tokens) if tokens else None,
                                tls_cert=str(tls_cert) if tls_cert else None,
                                tls_key=str(tls_key) if tls_key else None, runtime=runtime, metrics_port=metrics_port,
                                batch_max=batch_max, batch_delay_ms=batch_delay_ms,
                                search_batch_max=search_batch_max, create=create))
    except (LatentHashError, OSError) as exc:
        _fail(exc)
    _exit_even_if_stuck()


def _exit_even_if_stuck() -> None:
    """The server is stopped and its index checkpointed; a handler thread that a broken client left waiting must
    not keep the process alive past its grace period."""
    import sys
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), help="work directory; finished steps are reused"),
    dataset: str | None = typer.Option(None, help="default: fashion-mnist where installed, else digits"),
    bits: int = typer.Option(48),
    epochs: int | None = typer.Option(None, help="default: the training default"),
) -> None:
    """The main job: train, export, index, serve, query through the client, report quality and speed."""
    try:
        _need_torch("the main job")
        from latenthash.quickstart import run

        run(out, dataset=dataset, bits=bits, epochs=epochs)
    except (LatentHashError, OSError) as exc:
        _fail(exc)


if __name__ == "__main__":
    app()
