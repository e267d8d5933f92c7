"""Point-wise training of the hash-layer network on class labels (no pairs), with checkpoints and resume.

Loss = cross-entropy (single-label) or binary cross-entropy (multi-label) on F5's logits, plus the two optional
SSDH regularizers on H's sigmoid outputs p:
  - `binarize`: -mean((p - 0.5)^2), pushes each activation towards 0 or 1, so thresholding loses little;
  - `balance`:  mean over bits of (batch mean of p - 0.5)^2, asks every bit to fire for half the images;
and, for single-label data, `compact`: the within-class variance of p in the batch, which draws each class's codes
together, so fewer correctly classified queries land where no database code lies within a small Hamming radius.
Where the model has a copy head (model.CopyHead), its own instance-contrastive term (NT-Xent, as SimCLR and SSCD
train copy detectors) trains it beside the class path: it sees each batch's images as stored and an altered copy of
each (export/copies.py), and each image's descriptor must pick its copy's out of the batch. The head shares no
weights with the class path, and its copies draw on a random stream of their own, so the class path trains as it
would without it.
SGD with Nesterov momentum and a one-cycle learning-rate schedule converges in few epochs, which matters on a
2-core CPU; augmentation (random shifts, horizontal flips where the data allow) runs in numpy on whole batches, and
the last `clean_epochs` train on the images as stored, in the low-learning-rate tail of the schedule.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from latenthash.cpu import cpu_info
from latenthash.errors import InvalidInput, NotFound
from latenthash.export.copies import altered_copies
from latenthash.export.data import Dataset, source_of
from latenthash.export.model import HashNet, ModelConfig

CHECKPOINT = "checkpoint.pt"
# Horizontal flips change the meaning of digits; clothes and natural images are symmetric enough.
NO_HFLIP = {"mnist", "digits"}


@dataclass
class TrainConfig:
    """Defaults chosen by measurement on full Fashion-MNIST (benchmarks/RESULTS.md). The database of the retrieval
    protocol is the training split, so its codes must be right too: heavy regularization (dropout, random shifts)
    left 5% of the database misclassified and cost 0.05 mAP, so it is off by default; for the same reason the last
    epochs see no flips (`clean_epochs`): a database item whose code lands in another class's cluster is an intruder
    for every query of that class. `compact` keeps each class's codes close together, so a correctly classified query
    rarely lands where no database code lies within Hamming radius 2."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1  # tightens each class's codes: +0.009 mAP@all at 48 bits (0.2: no further gain)
    binarize: float = 0.1
    balance: float = 0.1
    compact: float = 0.3  # within-class spread of H: fewer queries with nothing near (mAP@all 0.9394 -> 0.9419)
    copy: float = 1.0  # weight of the copy head's term (models without a copy head have none)
    copy_tau: float = 0.07  # temperature of the copy term's softmax over cosines
    shift: int = 0  # random translation in pixels
    hflip: bool = True
    clean_epochs: int = 3  # the last epochs see unaugmented images, so the model fits the database it will index
    seed: int = 0
    threads: int = 0  # 0: all cores torch sees
    max_train: int | None = None  # use a seeded subset of the training split
    stop_after: int | None = None  # end this call after that epoch; `resume` continues (split long runs)
    history: list = field(default_factory=list)


def default_model_config(dataset: Dataset, *, bits: int, backbone: str = "cnn", feature_dim: int = 256,
                         pretrained: str | None = None, copy_dim: int = ModelConfig.copy_dim) -> ModelConfig:
    """Input shape, class count and per-channel normalization taken from the training split."""
    if not 8 <= bits <= 1024:
        raise InvalidInput(f"bits must be between 8 and 1024, got {bits}")
    images = dataset.train.images
    sample = images[:: max(1, len(images) // 5000)].astype(np.float32) / 255.0
    mean = tuple(float(m) for m in sample.mean(axis=(0, 1, 2)))
    std = tuple(float(max(s, 1e-3)) for s in sample.std(axis=(0, 1, 2)))
    return ModelConfig(backbone=backbone, bits=bits, feature_dim=feature_dim, num_classes=len(dataset.class_names),
                       in_channels=images.shape[3], image_size=tuple(images.shape[1:3]), mean=mean, std=std,
                       pretrained=pretrained, copy_dim=copy_dim)


def augment(images: np.ndarray, rng: np.random.Generator, *, shift: int, hflip: bool) -> np.ndarray:
    """Random translation by up to `shift` pixels (zero fill) and random horizontal flips; uint8 NHWC in and out."""
    n, h, w, _ = images.shape
    out = np.zeros_like(images)
    padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0))) if shift else images
    dy = rng.integers(0, 2 * shift + 1, n)
    dx = rng.integers(0, 2 * shift + 1, n)
    flips = rng.random(n) < 0.5 if hflip else np.zeros(n, bool)
    for i in range(n):
        crop = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out


def to_tensor(images: np.ndarray, config: ModelConfig) -> torch.Tensor:
    """uint8 NHWC -> normalized float NCHW (channels-last memory, faster convolutions on CPU)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(config.mean).view(1, -1, 1, 1)
    std = torch.tensor(config.std).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def hash_loss(logits: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor, *, multilabel: bool,
              cfg: TrainConfig) -> torch.Tensor:
    if multilabel:
        loss = F.binary_cross_entropy_with_logits(logits, targets.float())
    else:
        loss = F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
    if cfg.binarize:
        loss = loss - cfg.binarize * ((probs - 0.5) ** 2).mean() * 4.0  # scaled so the term lies in [-1, 0]
    if cfg.balance:
        loss = loss + cfg.balance * ((probs.mean(dim=0) - 0.5) ** 2).mean() * 4.0
    if cfg.compact and not multilabel:
        onehot = F.one_hot(targets, logits.shape[1]).to(probs.dtype)
        means = (onehot.T @ probs) / onehot.sum(0).clamp_min(1.0)[:, None]
        loss = loss + cfg.compact * ((probs - means[targets]) ** 2).mean() * 4.0
    return loss


def copy_loss(descriptors: torch.Tensor, tau: float) -> torch.Tensor:
    """Instance-contrastive term (NT-Xent) over 2B descriptors: rows i and B + i are an image and its altered copy;
    each must pick its partner out of the other 2B - 2 by cosine / tau."""
    z = F.normalize(descriptors.float(), dim=1)
    b = len(z) // 2
    sim = (z @ z.T / tau).fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, partner)


def save_checkpoint(path: Path, *, model: HashNet, optimizer, scheduler, epoch: int, dataset: Dataset,
                    train_cfg: TrainConfig) -> None:
    """Everything needed to rebuild the model (config, class names, normalization, bits) and to resume."""
    state = {
        "format": "latenthash-checkpoint/1",
        "model_config": model.config.to_dict(),
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict() if optimizer else None,
        "scheduler_state": scheduler.state_dict() if scheduler else None,
        "epoch": epoch,
        "dataset": dataset.name,
        "data_source": source_of(dataset),  # export, eval and index load the same data by default
        "class_names": list(dataset.class_names),
        "multilabel": dataset.multilabel,
        "train_config": asdict(train_cfg),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir)
    path = path / CHECKPOINT if path.is_dir() else path
    if not path.is_file():
        raise NotFound(f"no checkpoint at {path}: pass a run directory written by `latenthash train`")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != "latenthash-checkpoint/1":
        raise InvalidInput(f"{path} is not a latenthash checkpoint")
    return state


def run_source(ckpt: dict) -> dict:
    """The data source a checkpoint recorded (runs from before sources were recorded: the dataset's name)."""
    return ckpt.get("data_source") or {"kind": ckpt["dataset"], "data_dir": None, "options": {}}


def load_model(run_dir: str | os.PathLike) -> tuple[HashNet, dict]:
    """The trained network in eval mode, and the checkpoint dict (class names, dataset, history ...)."""
    state = load_checkpoint(run_dir)
    config = ModelConfig.from_dict(state["model_config"])
    config.pretrained = None  # the weights are in the checkpoint
    model = HashNet(config)
    model.load_state_dict(state["model_state"])
    return model.eval(), state


def train(dataset: Dataset, out_dir: str | os.PathLike, *, model_config: ModelConfig,
          cfg: TrainConfig | None = None, resume: bool = False, progress: bool = True) -> tuple[HashNet, TrainConfig]:
    """Train (or resume) a run in `out_dir`; writes `checkpoint.pt` after every epoch and `history.json`."""
    from latenthash.progress import progress as progress_bar

    cfg = cfg or TrainConfig()
    if cfg.clean_epochs < 0:
        raise InvalidInput(f"clean_epochs must be 0 or more (0: augment every epoch), got {cfg.clean_epochs}")
    if cfg.compact < 0:
        raise InvalidInput(f"compact must be 0 or more (0: off), got {cfg.compact}")
    if cfg.copy < 0 or cfg.copy_tau <= 0:
        raise InvalidInput(f"copy must be 0 or more (0: off) and copy_tau above 0, got {cfg.copy} and {cfg.copy_tau}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    split = dataset.train.subset(cfg.max_train, seed=cfg.seed)
    labels = torch.from_numpy(split.labels)
    model = HashNet(model_config).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(split) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if total_steps < 3:
        raise InvalidInput(f"{total_steps} optimizer step(s) in all ({len(split)} images, batch size "
                           f"{cfg.batch_size}, {cfg.epochs} epochs): the learning-rate schedule needs at least 3; "
                           "use more epochs or a smaller batch size")
    # warm-up over a quarter of the run, but at least two steps (OneCycleLR divides by the warm-up's length)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, epochs=cfg.epochs,
                                                    steps_per_epoch=steps_per_epoch,
                                                    pct_start=min(0.5, max(0.25, 2.0 / total_steps)))
    start_epoch = 0
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state["model_config"] != model_config.to_dict():
            raise InvalidInput(f"cannot resume {ckpt_path}: it was trained with another model configuration")
        if state["train_config"]["epochs"] != cfg.epochs:
            raise InvalidInput(f"cannot resume {ckpt_path} with --epochs {cfg.epochs}: it was started with "
                               f"{state['train_config']['epochs']} (the learning-rate schedule depends on it)")
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        start_epoch = state["epoch"]
        cfg.history = state["train_config"].get("history", [])
    hflip = cfg.hflip and dataset.name not in NO_HFLIP
    copies = model.copy_head is not None and cfg.copy > 0
    bf16 = "avx512bf16" in cpu_info()["simd"]  # the copy head in bfloat16 where the CPU computes it natively
    last = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
    for epoch in range(start_epoch, last):
        model.train()
        rng = np.random.default_rng(cfg.seed * 1000 + epoch)
        copy_rng = np.random.default_rng((cfg.seed, epoch, 1))  # the class path's stream stays as without copies
        order = rng.permutation(len(split))
        t0, total, correct, seen = time.perf_counter(), 0.0, 0, 0
        bar = progress_bar(range(steps_per_epoch), show=progress, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                           leave=False)
        clean = epoch >= cfg.epochs - cfg.clean_epochs
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            batch = split.images[idx] if clean else augment(split.images[idx], rng, shift=cfg.shift, hflip=hflip)
            y = labels[idx]
            logits, probs, _ = model(to_tensor(batch, model_config))
            loss = hash_loss(logits, probs, y, multilabel=dataset.multilabel, cfg=cfg)
            if copies and len(idx) > 1:
                pairs = np.concatenate([split.images[idx], altered_copies(split.images[idx], copy_rng)])
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    descriptors = model.copy_head(to_tensor(pairs, model_config))
                loss = loss + cfg.copy * copy_loss(descriptors, cfg.copy_tau)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            if not dataset.multilabel:
                correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{total / seen:.3f}", acc=f"{correct / seen:.3f}")
        record = {"epoch": epoch + 1, "loss": total / seen, "train_acc": correct / seen if not dataset.multilabel
                  else None, "seconds": time.perf_counter() - t0}
        cfg.history.append(record)
        if progress:
            print(json.dumps(record), flush=True)
        save_checkpoint(ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch + 1,
                        dataset=dataset, train_cfg=cfg)
    (out / "history.json").write_text(json.dumps(cfg.history, indent=1))
    return model.eval(), cfg


@torch.inference_mode()
def predict(model: HashNet, images: np.ndarray, *, batch_size: int = 512,
            progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs float32 (N, bits), features float32 (N, feature_dim), logits float32 (N, classes)) for uint8 NHWC."""
    from latenthash.progress import progress as progress_bar

    model.eval()
    outs = []
    for i in progress_bar(range(0, len(images), batch_size), show=progress, desc="encode", unit="batch",
                          leave=False):
        logits, probs, features = model(to_tensor(images[i:i + batch_size], model.config))
        outs.append((probs.numpy(), features.numpy(), logits.numpy()))
    return tuple(np.concatenate([o[j] for o in outs]) for j in range(3))  # type: ignore[return-value]

