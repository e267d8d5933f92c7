"""A real Milvus standalone server for tests and benchmarks: the `milvus` package's `milvus-server` (Milvus 2.3,
embedded etcd and local storage) on free ports in a directory of its own.

    with milvus_server(tmp_dir) as uri:      # "milvus://127.0.0.1:PORT"
        index = open_index(f"{uri}/images?index=BIN_IVF_FLAT", bits=48, create=True)

The wrapper starts a child (`milvus run standalone`) that outlives it when only the wrapper is stopped, so the
server runs in a process group of its own and the whole group is ended on exit.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass
class Running:
    """A server started here: its process (the group leader), data directory, ports and log."""

    proc: subprocess.Popen
    data_dir: Path
    ports: list[int]
    log: Any


def _start(data_dir: Path, ports: list[int]) -> Running:
    args = [executable(), "--data", str(data_dir)] + [a for opt, port in zip(PORT_OPTIONS, ports)
                                                      for a in (opt, str(port))]
    log = open(data_dir / "server.log", "ab")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Running(proc, data_dir, ports, log)


@contextmanager
def milvus_server(data_dir: str | os.PathLike, *, start_timeout: float = 120.0):
    """Start a Milvus server with its data under `data_dir`; yields its URI; ends its process group on exit."""
    if executable() is None:
        raise RuntimeError("milvus-server is not installed: pip install 'latenthash[dev]' (Linux x86-64)")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = free_ports(len(PORT_OPTIONS))
    uri = f"milvus://127.0.0.1:{ports[0]}"
    RUNNING[uri] = _start(data_dir, ports)
    try:
        _wait_ready(RUNNING[uri].proc, ports[0], start_timeout, data_dir / "server.log")
        yield uri
    finally:
        server = RUNNING.pop(uri)
        _stop_group(server.proc)
        server.log.close()


RUNNING: dict[str, Running] = {}  # URI -> the server started for it, while its block runs


def kill(uri: str) -> None:
    """SIGKILL a running server's whole process group, as a crash or an OOM kill would end it."""
    proc = RUNNING[uri].proc
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def restart(uri: str, *, same_port: bool = True, timeout: float = 180.0) -> int:
    """Start a killed server again on its data; returns the port its proxy answers on once ready.

    The `milvus` package binds its ports without SO_REUSEADDR, so while the killed server's connections sit in
    TIME_WAIT (up to a minute) it moves the proxy to the next free port. `same_port` waits for the old port first
    (the URI keeps working); without it the server starts at once and the port it took is returned (read from the
    configuration the package writes), for a forwarder in front of it to follow."""
    server = RUNNING[uri]
    deadline = time.monotonic() + timeout
    while same_port and not _bindable(server.ports[0]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {server.ports[0]} still busy after {timeout:g} s")
        time.sleep(1.0)
    config = server.data_dir / "configs" / "milvus.yaml"
    before = config.stat().st_mtime_ns if config.exists() else 0
    server.log.close()
    RUNNING[uri] = server = _start(server.data_dir, server.ports)
    while not config.exists() or config.stat().st_mtime_ns == before:
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise RuntimeError("the restarted milvus-server wrote no configuration")
        time.sleep(0.2)
    time.sleep(0.2)  # written whole
    port = int(re.search(r"^proxy:\n(?:(?:  .*)?\n)*?  port: (\d+)", config.read_text(), re.M)[1])
    _wait_ready(server.proc, port, max(1.0, deadline - time.monotonic()), server.data_dir / "server.log")
    return port


def _bindable(port: int) -> bool:
    """Whether 127.0.0.1:port binds as the `milvus` package binds it (no SO_REUSEADDR)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


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
