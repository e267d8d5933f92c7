"""Start-up of `latenthash serve`: seconds from the process's start to its first health answer, to health SERVING and
to its first answered search by code, with Numba's cache cold, warm, and with nothing writable but the temp folder.

    python benchmarks/bench_startup.py [--python /path/to/venv/bin/python] [--items 200000] [--runs 3]

`--python` is the interpreter of the install under test (a fresh base install: `python3 -m venv v && v/bin/pip
install .`); the probe runs here. Cases: `cold` (an empty NUMBA_CACHE_DIR: a fresh install's first start), `warm`
(the same folder again), `read-only` (run as the user `nobody` with no home, so neither site-packages nor a home
folder is writable; its first start is cold, later ones use the private temp folder the kernels fall back to; needs
root to switch user). Results: benchmarks/results/startup_<this CPU's LLVM name>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from common import load_note, save
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latenthash.cpu import cpu_info
from latenthash.errors import LatentHashError
from latenthash.index import HashIndex


def probe(port: int, code: np.ndarray, t0: float, timeout: float) -> dict:
    """Seconds from t0 until health answers, until it says SERVING, until a search by code is answered."""
    from latenthash.client import Client

    out: dict = {}
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    client = Client(f"127.0.0.1:{port}", retries=0)
    while time.perf_counter() - t0 < timeout and len(out) < 3:
        if "health_s" not in out or "serving_s" not in out:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                out.setdefault("health_s", time.perf_counter() - t0)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    out.setdefault("serving_s", time.perf_counter() - t0)
            except grpc.RpcError:
                pass
        if "health_s" in out and "search_s" not in out:
            try:
                client.search(codes=code, k=10)
                out["search_s"] = time.perf_counter() - t0
            except LatentHashError:
                pass
        time.sleep(0.01)
    channel.close()
    client.close()
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(python: str, index: Path, env: dict, user: str | None, code: np.ndarray, timeout: float) -> dict:
    port = free_port()
    cmd = [python, "-m", "latenthash.cli", "serve", "--index", str(index), "--port", str(port)]
    if user:
        cmd = ["runuser", "-u", user, "--", "env", *(f"{k}={v}" for k, v in env.items()), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=None if user else {**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd="/")
    try:
        got = probe(port, code, t0, timeout)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    if len(got) < 3:
        raise SystemExit(f"the server did not answer within {timeout} s: {err.decode()[-2000:]}")
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    print(load_note())
    work = Path(tempfile.mkdtemp(prefix="latenthash-startup-"))
    os.chmod(work, 0o755)
    rng = np.random.default_rng(0)
    index = HashIndex(bits=64)
    index.add(np.arange(args.items), rng.integers(0, 256, (args.items, 8), dtype=np.uint8))
    index.save(work / "index")
    for p in work.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    code = rng.integers(0, 256, (1, 8), dtype=np.uint8)
    cases: dict[str, list[dict]] = {"cold": [], "warm": [], "read-only cold": [], "read-only warm": []}
    as_root = os.geteuid() == 0
    fallback = Path(tempfile.gettempdir()) / "latenthash-numba-65534"  # nobody's private folder (kernels.py)
    for _ in range(args.runs):
        cache = work / "numba-cache"
        shutil.rmtree(cache, ignore_errors=True)
        env = {"NUMBA_CACHE_DIR": str(cache)}
        cases["cold"].append(start(args.python, work / "index", env, None, code, args.timeout))
        cases["warm"].append(start(args.python, work / "index", env, None, code, args.timeout))
        if as_root:  # copies of the index nobody can lock (the server writes its lock file next to it)
            ro = work / "index-ro"
            shutil.rmtree(ro, ignore_errors=True)
            shutil.copytree(work / "index", ro)
            for p in [ro, *ro.rglob("*")]:
                shutil.chown(p, "nobody")
            shutil.rmtree(fallback, ignore_errors=True)
            env = {"HOME": "/nonexistent"}
            cases["read-only cold"].append(start(args.python, ro, env, "nobody", code, args.timeout))
            cases["read-only warm"].append(start(args.python, ro, env, "nobody", code, args.timeout))
    result = {"items": args.items, "bits": 64, "runs": args.runs, "python": args.python, "cases": {}}
    for name, runs in cases.items():
        if runs:
            result["cases"][name] = {key: {"median": statistics.median(r[key] for r in runs),
                                           "max": max(r[key] for r in runs)} for key in runs[0]}
            row = ", ".join(f"{key} {v['median']:.2f} (max {v['max']:.2f})" for key, v in result["cases"][name].items())
            print(f"{name:16s} {row}")
    print(load_note("after"))
    print("saved", save(f"startup_{cpu_info()['llvm_cpu']}", result))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
