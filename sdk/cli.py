"""The `latenthash` command: thin wrappers over the library; each subcommand imports what it needs when it runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from latenthash.errors import LatentHashError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="latenthash: train, export, index, search and serve latent-hash image search.")

DATASETS = "fashion-mnist, mnist, cifar10, folder, list, digits"


def _fail(exc: LatentHashError) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def train(
    dataset: str = typer.Option("fashion-mnist", help=f"one of: {DATASETS}"),
    out: Path = typer.Option(..., help="run directory (checkpoint, history, plots)"),
    data_dir: Optional[str] = typer.Option(None, help="dataset files (Fashion-MNIST: found automatically)"),
    bits: int = typer.Option(48, help="code length h (8..1024)"),
    epochs: Optional[int] = typer.Option(None, help="epochs (default: the measured default, 14)"),
    backbone: str = typer.Option("cnn", help="cnn, resnet18, mobilenet_v3_small, mobilenet_v3_large"),
    pretrained: Optional[str] = typer.Option(None, help="local ImageNet state-dict file for the backbone"),
    feature_dim: int = typer.Option(256, help="size of the F4 feature layer"),
    batch_size: int = typer.Option(128),
    lr: float = typer.Option(0.1, help="peak learning rate of the one-cycle schedule"),
    binarize: float = typer.Option(0.1, help="weight of the push-to-0/1 regularizer (0 disables)"),
    balance: float = typer.Option(0.1, help="weight of the 50%-firing-rate regularizer (0 disables)"),
    image_size: int = typer.Option(32, help="resize size for folder/list datasets"),
    max_train: Optional[int] = typer.Option(None, help="train on a seeded subset of this many images"),
    threads: int = typer.Option(0, help="torch threads (0: all cores)"),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, help="continue from OUT/checkpoint.pt"),
) -> None:
    """Train the hash-layer CNN on class labels."""
    try:
        from latenthash.export.data import load_dataset
        from latenthash.export.train import TrainConfig, default_model_config
        from latenthash.export.train import train as run_training

        options = {"image_size": image_size} if dataset in ("folder", "list") else {}
        ds = load_dataset(dataset, data_dir, **options)
        cfg = TrainConfig(batch_size=batch_size, lr=lr, binarize=binarize, balance=balance, seed=seed,
                          threads=threads, max_train=max_train)
        if epochs is not None:
            cfg.epochs = epochs
        mc = default_model_config(ds, bits=bits, backbone=backbone, feature_dim=feature_dim, pretrained=pretrained)
        run_training(ds, out, model_config=mc, cfg=cfg, resume=resume)
        typer.echo(f"trained {bits}-bit model: {out / 'checkpoint.pt'}")
    except LatentHashError as exc:
        _fail(exc)


@app.command("eval")
def evaluate(
    run_dir: Path = typer.Argument(..., help="a run directory written by `latenthash train`"),
    dataset: Optional[str] = typer.Option(None, help="default: the dataset the run was trained on"),
    data_dir: Optional[str] = typer.Option(None),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report here"),
    max_queries: Optional[int] = typer.Option(None, help="evaluate a seeded subset of the queries"),
    max_database: Optional[int] = typer.Option(None, help="use a seeded subset of the database"),
    baselines: bool = typer.Option(True, help="also run LSH and PCA-ITQ at the same code length"),
) -> None:
    """Retrieval quality of a run: mAP, precision within radius 2, P@k, PR curve, baselines, plots."""
    try:
        from latenthash.export.evaluate import evaluate_run, save_report

        report = evaluate_run(run_dir, dataset_name=dataset, data_dir=data_dir, max_queries=max_queries,
                              max_database=max_database, baselines=baselines)
        if json_out:
            save_report(report, json_out)
        keys = ("bits", "map_all", "map_at_1000", "precision_r2", "accuracy")
        typer.echo(json.dumps({k: report[k] for k in keys} | {"linear_search": report["linear_search"]}, indent=1))
    except LatentHashError as exc:
        _fail(exc)


@app.command("export")
def export_model(
    run_dir: Path = typer.Argument(..., help="a run directory written by `latenthash train`"),
    out: Path = typer.Option(..., help="the ONNX file to write"),
    opset: int = typer.Option(18),
    atol: float = typer.Option(1e-4, help="max |diff| of probs and features, ONNX Runtime vs PyTorch"),
) -> None:
    """Export a self-describing ONNX model (uint8 NHWC in; probs, features, logits out) and check its parity."""
    try:
        from latenthash.export.onnx import export_onnx

        report = export_onnx(run_dir, out, opset=opset, atol=atol)
        typer.echo(json.dumps({"path": report["path"], "bytes": report["bytes"], "checks": report["checks"]},
                              indent=1))
    except LatentHashError as exc:
        _fail(exc)
