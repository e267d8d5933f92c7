"""How far a descriptor learned for copy detection goes on bench_dedup's planted copies, where the product's
class-trained features and every pixel likeness tried fall short (`bench_dedup.py --learned`).

A small CNN maps an image to a unit 64-d vector; it is trained self-supervised (instance contrastive, NT-Xent, as
SimCLR and SSCD train copy detectors) to bring an image and its altered copies together and push other images apart,
on images the database does not hold (the 10,000 test images, each with `views` copies altered as bench_dedup alters
its planted ones). It then scores each planted copy against every training image. A measurement of what is reachable,
not the product: the index scores duplicates by the class-trained features.
"""

from __future__ import annotations

import time

import numpy as np

from latenthash.cpu import cpu_info


def _net(dim: int):
    import torch.nn as nn

    def block(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    return nn.Sequential(block(1, 32), block(32, 32), nn.MaxPool2d(2), block(32, 64), block(64, 64), nn.MaxPool2d(2),
                         block(64, 128), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(512, 256), nn.ReLU(),
                         nn.Linear(256, dim))


def train_descriptor(views: np.ndarray, *, epochs: int, dim: int = 64, batch: int = 512, tau: float = 0.07,
                     seed: int = 0):
    """views (V, N, H, W) uint8: V versions of N images (the first the image as stored). Each step draws two
    different versions of `batch` images; each pair must find its partner among the 2 x batch - 2 others.
    Returns a function: uint8 (M, H, W) -> unit float32 (M, dim)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    net = _net(dim)
    data = torch.from_numpy(views).float().div_(255.0)
    nv, n = data.shape[:2]
    steps = n // batch
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * steps)
    partner = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
    bf16 = "avx512bf16" in cpu_info()["simd"]  # emulated, and slower, without it
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order, total = torch.randperm(n), 0.0
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            a = torch.randint(0, nv, (batch,))
            b = (a + torch.randint(1, nv, (batch,))) % nv
            x = torch.cat([data[a, idx], data[b, idx]])[:, None]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                z = F.normalize(net(x).float(), dim=1)
            sim = (z @ z.T / tau).fill_diagonal_(-1e9)
            loss = F.cross_entropy(sim, partner)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"  copy descriptor epoch {epoch + 1}/{epochs}: loss {total / steps:.3f}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    net.eval()

    def describe(images: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), 4096):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + 4096])).float().div_(255.0)[:, None]
                out.append(F.normalize(net(x).float(), dim=1).numpy())
        return np.concatenate(out)

    return describe


def copy_scores(describe, originals: np.ndarray, copies: np.ndarray, picked: np.ndarray) -> dict:
    """Each copy's cosine to its own original and to every other original, by the learned descriptor: how often
    another image scores higher, and recall against copy-pair precision at thresholds that keep 98 to 85% of the
    copies (pairs scored directly, no transitive grouping: each (copy, original) pair at or above the threshold is
    found)."""
    sims = describe(copies) @ describe(originals).T
    rows = np.arange(len(copies))
    own = sims[rows, picked].copy()
    sims[rows, picked] = -2.0
    other = sims.max(axis=1)
    curve = []
    for keep in (0.98, 0.95, 0.90, 0.85):
        t = float(np.quantile(own, 1 - keep))
        hits = int((own >= t).sum())
        wrong = int((sims >= t).sum())
        curve.append({"threshold": round(t, 4), "recall": hits / len(copies),
                      "copy_pair_precision": hits / max(1, hits + wrong)})
    return {"beaten_share": float((other >= own).mean()),
            "own_quantiles": np.quantile(own, [0.05, 0.1, 0.5]).round(4).tolist(),
            "best_other_quantiles": np.quantile(other, [0.5, 0.9]).round(4).tolist(), "curve": curve}
