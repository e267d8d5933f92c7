"""A real Milvus standalone server for tests and benchmarks: the `milvus` package's `milvus-server` (Milvus 2.3,
embedded etcd and local storage) on free ports in a directory of its own.

    with milvus_server(tmp_dir) as uri:      # "milvus://127.0.0.1:PORT"
        index = open_index(f"{uri}/images?index=BIN_IVF_FLAT", bits=48, create=True)

The wrapper starts a child (`milvus run standalone`) that outlives it when only the wrapper is stopped, so the
server runs in a process group of its own and the whole group is ended on exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

PORT_OPTIONS = ("--proxy-port", "--etcd-port", "--root-coord-port", "--proxy-internal-port", "--query-coord-port",
                "--query-node-port", "--index-coord-port", "--index-node-port", "--data-coord-port",
                "--data-node-port")


def executable() -> str | None:
    """The `milvus-server` command of this environment, or None when the `milvus` package is not installed."""
    beside = Path(sys.executable).parent / "milvus-server"
    return str(beside) if beside.exists() else shutil.which("milvus-server")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextmanager
def milvus_server(data_dir: str | os.PathLike, *, start_timeout: float = 120.0):
    """Start a Milvus server with its data under `data_dir`; yields its URI; ends its process group on exit."""
    exe = executable()
    if exe is None:
        raise RuntimeError("milvus-server is not installed: pip install 'latenthash[dev]' (Linux x86-64)")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = free_ports(len(PORT_OPTIONS))
    args = [exe, "--data", str(data_dir)] + [a for opt, port in zip(PORT_OPTIONS, ports) for a in (opt, str(port))]
    log = open(data_dir / "server.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, ports[0], start_timeout, data_dir / "server.log")
        uri = f"milvus://127.0.0.1:{ports[0]}"
        RUNNING[uri] = proc
        yield uri
    finally:
        RUNNING.pop(f"milvus://127.0.0.1:{ports[0]}", None)
        _stop_group(proc)
        log.close()


RUNNING: dict[str, subprocess.Popen] = {}  # URI -> the server's process (group leader), while its block runs


def kill(uri: str) -> None:
    """SIGKILL a running server's whole process group, as a crash or an OOM kill would end it."""
    proc = RUNNING[uri]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_ready(proc: subprocess.Popen, port: int, timeout: float, log: Path) -> None:
    """Until the proxy answers a list of collections (a listening port alone is not ready)."""
    from pymilvus import MilvusClient

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"milvus-server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            client = MilvusClient(f"http://127.0.0.1:{port}", timeout=5)
            client.list_collections()
            client.close()
            return
        except Exception:  # not up yet: refused connections, then pymilvus errors while it starts
            time.sleep(0.5)
    raise RuntimeError(f"milvus-server did not answer on port {port} within {timeout:g} s")


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole group (Milvus flushes on it), SIGKILL to what is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the wrapper, so only live members keep the group
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    proc.poll()
