"""What every benchmark shares: one timer, interleaved medians, the load note, and results files stamped with the
host, the library versions and the commit that produced them (benchmarks/RESULTS.md cites those)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path

from latenthash.cpu import cpu_info

OUT = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("latenthash", "numpy", "numba", "onnxruntime", "torch", "faiss-cpu", "grpcio", "pymilvus", "ray")


def timed(fn, reps: int) -> list[float]:
    """Seconds of each of `reps` calls of fn()."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleaved(fns: dict, reps: int, *, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable, repetitions interleaved so drift hits every method alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name] += timed(fn, 1)
    return {name: statistics.median(t) for name, t in times.items()}


def median_ms(fn, n: int) -> float:
    """Median milliseconds of fn(i) over i = 0..n-1, after one warm-up call."""
    fn(0)
    times: list[float] = []
    for i in range(n):
        times += timed(lambda i=i: fn(i), 1)
    return statistics.median(times) * 1e3


def load_note(when: str = "before") -> str:
    return f"load average {when}: {os.getloadavg()[0]:.2f} (an idle 2-vCPU machine reads < 0.3)"


def stamp() -> dict:
    """Where and from what a figure came: host, CPU and its SIMD features, versions, commit (with a mark if the
    tree had changes)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    cpu = cpu_info()
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git("rev-parse", "--short", "HEAD") + ("+changes" if dirty else ""),
            "host": platform.node(), "cpu": cpu["model"], "machine": cpu["machine"],
            "llvm_cpu": cpu["llvm_cpu"], "simd": cpu["simd"], "cpus": os.cpu_count(),
            # code built for another CPU than this one (e.g. AVX2 code on an AVX-512 host) says so
            "targets": {k: os.environ[k] for k in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")
                        if os.environ.get(k)},
            "python": platform.python_version(),
            "versions": versions, "load_average": os.getloadavg()[0]}


def save(name: str, result) -> Path:
    """Write results/NAME.json: the figures under "result", the stamp beside them."""
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"stamp": stamp(), "result": result}, indent=1, default=float))
    return path


def save_figure(fig, path: Path) -> None:
    """A finished matplotlib figure as a PNG (its folder made if missing), laid out tight, at the plots' one dpi."""
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=120)
