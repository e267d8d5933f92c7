"""Bulk indexing on Ray Data: encode a large image collection on Ray workers, write it into any index backend.

Ray Data carries row positions only. Each worker is an actor holding one encoder session (ONNX Runtime, CPU or GPU
as configured), fed batches of positions by `map_batches`; it reads its images (an in-memory array shared through
Ray's object store, or image files by path, which must be readable where the workers run) and returns codes and
features. The driver keeps ids and metadata and streams the results into the backend (`IndexBackend.add`) batch by
batch with a progress bar, so the same call fills an embedded index or a Milvus collection, on a local Ray (tests,
one machine) or a cluster (`address="auto"` or "ray://head:10001") unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from latenthash.backend import IndexBackend
from latenthash.errors import DataError, InvalidInput, require
from latenthash.search import Searcher


class EncodeBatches:
    """The Ray Data worker: one Encoder per actor, positions in, codes and features out."""

    def __init__(self, model: str, source, runtime: str, threads: int):
        import ray

        from latenthash.encoder import Encoder

        self.source = ray.get(source) if isinstance(source, ray.ObjectRef) else source
        self.encoder = Encoder.open(model, runtime=runtime, **({"threads": threads} if threads else {}))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pos = batch["data"].astype(np.int64)
        images: np.ndarray | list[bytes]
        if isinstance(self.source, np.ndarray):
            images = self.source[pos]
        else:
            blobs: list[bytes] = []
            for p in pos.tolist():
                try:
                    with open(self.source[p], "rb") as fh:
                        blobs.append(fh.read())
                except OSError as exc:
                    raise DataError(f"cannot read image {self.source[p]!r} on a Ray worker ({exc}); paths must be "
                                    "readable where the workers run (a shared file system)") from None
            images = blobs
        enc = self.encoder.encode(images)
        return {"pos": pos, "codes": enc.codes, "features": enc.features}


def start_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """`ray.init` for ingest: joins the cluster at `address`, or starts a local one with every CPU (or `num_cpus`).

    A local start on a 2-core machine under load can miss Ray's own start-up windows: the GCS port file (30 s by
    default; given 120 s here unless RAY_gcs_server_port_wait_time_s says otherwise) and the raylet's registration
    (a fixed 30 s, "timed out during startup"). A local start is therefore tried twice; any other failure, and a
    failed join, are raised at once."""
    ray = require("ray", extra="ray", purpose="bulk indexing on Ray Data")

    options = {"include_dashboard": False, "log_to_driver": False}
    if address:
        ray.init(address=address, **options)
        return
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=num_cpus or os.cpu_count(), **options)
            return
        except Exception as exc:  # Ray raises a bare Exception for these
            ray.shutdown()
            slow_start = "timed out during startup" in str(exc) or "Timed out waiting for file" in str(exc)
            if attempt == 2 or not slow_start:
                raise


def add_images_ray(index: IndexBackend, model: str | os.PathLike, *, ids, images: np.ndarray | None = None,
                   paths: Sequence[str] | None = None, metadata: Sequence[Any] | None = None,
                   address: str | None = None, workers: int | None = None, threads_per_worker: int = 1,
                   gpus_per_worker: float = 0.0, batch_size: int = 256, runtime: str = "auto",
                   progress: bool = True) -> int:
    """Encode `images` (uint8 NHWC) or the image files at `paths` on Ray Data and add them to `index` under `ids`.

    address: None starts a local Ray on this machine (stopped afterwards); "auto" or "ray://host:10001" joins a
    cluster. workers: encoder actors (default: one per `threads_per_worker` CPUs Ray offers). Returns the count."""
    ray = require("ray", extra="ray", purpose="bulk indexing on Ray Data")
    require("ray.data", extra="ray", purpose="bulk indexing on Ray Data")
    from latenthash.progress import progress as progress_bar

    if (images is None) == (paths is None):
        raise InvalidInput("add_images_ray needs exactly one of images= or paths=")
    paths = None if paths is None else [str(p) for p in paths]
    n = len(images) if images is not None else len(paths or [])
    ids = np.asarray(ids, np.int64)
    if ids.shape != (n,):
        raise InvalidInput(f"{len(ids)} ids for {n} images")
    if metadata is not None and len(metadata) != n:
        raise InvalidInput(f"{len(metadata)} metadata entries for {n} images")
    if n == 0:
        return 0
    if paths is not None and address is None:  # workers on this machine: a missing file is found before Ray starts
        missing = [str(p) for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"cannot read image {missing[0]!r} ({len(missing)} of {n} paths missing)")
    started = not ray.is_initialized()
    if started:
        start_ray(address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        cpus = int(ray.available_resources().get("CPU", 1))
        workers = workers or max(1, cpus // max(1, threads_per_worker))
        source = ray.put(images if images is not None else paths)
        # Positions go in as in-memory blocks: a read stage would need a CPU of its own, and with every CPU held by
        # an encoder actor it would never be scheduled.
        blocks = np.array_split(np.arange(n, dtype=np.int64), max(workers * 2, -(-n // (8 * batch_size))))
        ds = ray.data.from_numpy(blocks).map_batches(
            EncodeBatches, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads_per_worker, num_gpus=gpus_per_worker,
            fn_constructor_kwargs={"model": os.fspath(model), "source": source, "runtime": runtime,
                                   "threads": threads_per_worker})
        done, searcher = 0, Searcher(index)
        with progress_bar(total=n, show=progress, desc=f"index (ray, {workers} workers)", unit="img") as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                pos = batch["pos"]
                searcher.upsert(ids[pos], codes=batch["codes"], features=batch["features"],
                                metadata=[metadata[p] for p in pos.tolist()] if metadata is not None else None)
                done += len(pos)
                bar.update(len(pos))
        return done
    finally:
        if started:
            ray.shutdown()

