"""Milvus index backend: the `IndexBackend` Protocol on one Milvus collection, for collections that outgrow a device.

URIs (through `latenthash.open_index`, `latenthash index --out` and `latenthash serve --index`):

    milvus://host:19530/collection          a Milvus server (standalone or distributed); milvus+https:// for TLS
    milvus-lite:///abs/path/file.db/coll    a local milvus-lite file (tests, laptops; BIN_FLAT only)

Options go in the query string or as keyword arguments: `index=BIN_FLAT|BIN_IVF_FLAT`, `nlist` (at build),
`nprobe` (per search), `rerank=fetch|milvus`, `token`, `timeout` (seconds), `consistency` (of reads:
Strong, the default, sees every acknowledged write from any client; on a Milvus server it waits for the time tick,
about 200 ms a read in benchmarks/RESULTS.md; Session sees this client's own writes at once, enough where one
latenthash server is the only writer).

Schema: `id` INT64 primary key, `code` BINARY_VECTOR (dim = bits, a multiple of 8) indexed with metric HAMMING,
`feature` FLOAT_VECTOR (L2-normalized, metric IP = cosine) when the index has features, `metadata` JSON (wrapped as
{"v": value}, since milvus-lite has no nullable fields). Milvus before 2.4 allows one vector field per collection:
there `feature` is an ARRAY of FLOAT (chosen when the server refuses the vector schema, read back from an existing
collection), and step 2 always runs in the SDK (`rerank=fetch`). Writes are upserts, so re-adding an id replaces it,
as in the embedded index. Reads use Strong consistency by default: a search sees every acknowledged write.

Two-step search: step 1 is a Milvus Hamming search (top-`pool`, or a range search for `radius`); step 2 re-ranks
the pool by cosine, either `milvus` (a Milvus search of the feature field filtered to the pool's ids: the default,
7x faster at pool 1000 in benchmarks/RESULTS.md) or `fetch` (get the pool's features and re-rank them with the SDK's
Numba kernel; moving 1000 x 256 floats through pymilvus per query is what makes it slower).
Milvus returns hits of equal distance in no set order; this backend sorts them by (distance, id), so results are
deterministic, but ties may resolve differently from the embedded index (which keeps insertion order).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from latenthash import backend as seam  # the seam's types, validators and URI parser
from latenthash.codes import check_bits
from latenthash.errors import (
    DeadlineExceeded,
    InvalidInput,
    LatentHashError,
    ModelMismatch,
    NotFound,
    Unavailable,
    require,
)
from latenthash.limits import MAX_K, pool_size

MAX_TOPK = 16384  # Milvus's limit on hits per query
INDEX_TYPES = ("BIN_FLAT", "BIN_IVF_FLAT")
RERANK_MODES = ("milvus", "fetch")
CONSISTENCY = ("Strong", "Session", "Bounded", "Eventually")
_FIELDS = {"id", "code", "feature", "metadata"}


def _pymilvus():
    import warnings

    # milvus-lite 2.5 still imports pkg_resources, which warns on every start
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    return require("pymilvus", extra="milvus", purpose="the Milvus index backend")


_GONE = ("unavailable", "connect", "timeout", "deadline", "not ready", "channel", "closed", "refused")


@contextmanager
def _errors(what: str):
    """Turn pymilvus failures into the SDK's error family: a Milvus that is unreachable, restarting or too slow ->
    Unavailable (DeadlineExceeded past the call's timeout), a request it rejects -> InvalidInput. A failure of the
    connection never surfaces as anything else, so a server in front of Milvus answers UNAVAILABLE, not INTERNAL."""
    import grpc

    pm = _pymilvus()
    try:
        yield
    except LatentHashError:
        raise
    except pm.exceptions.MilvusException as exc:
        code = getattr(exc, "code", None)
        text = f"Milvus {what} failed: {getattr(exc, 'message', exc)}"
        if "deadline" in text.lower() or "timeout" in text.lower():
            raise DeadlineExceeded(text + " (is Milvus overloaded or restarting?)") from exc
        if isinstance(exc, pm.exceptions.MilvusUnavailableException) or code in (2, 503) or \
                any(word in text.lower() for word in _GONE):
            raise Unavailable(text + " (is Milvus running and reachable?)") from exc
        raise InvalidInput(text) from exc
    except grpc.RpcError as exc:
        status = exc.code() if hasattr(exc, "code") else None
        cls = DeadlineExceeded if status == grpc.StatusCode.DEADLINE_EXCEEDED else Unavailable
        raise cls(f"Milvus {what} failed: {status}: {exc}") from exc
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise Unavailable(f"Milvus {what} failed: {type(exc).__name__}: {exc} (is Milvus running and reachable?)") \
            from exc


class MilvusIndex:
    """Codes, features and metadata in a Milvus collection; same calls and result types as `HashIndex`."""

    def __init__(self, uri: str, *, bits: int | None = None, feature_dim: int | None = None, create: bool = False,
                 index: str | None = None, nlist: int | None = None, nprobe: int | None = None,
                 rerank: str | None = None, token: str | None = None, timeout: float | None = None,
                 consistency: str | None = None):
        spec = seam.parse_uri(uri)
        opts = spec["options"]
        self.uri = uri.split("?", 1)[0]
        self.collection = spec["collection"]
        self.index_type = (index or opts.get("index", "BIN_FLAT")).upper()
        self.nlist = int(nlist or opts.get("nlist", 1024))
        self.nprobe = int(nprobe or opts.get("nprobe", 16))
        self.rerank_mode = rerank or opts.get("rerank", "milvus")
        self.timeout = float(timeout or opts.get("timeout", 10.0))
        self.consistency = (consistency or opts.get("consistency", "Strong")).capitalize()
        if self.consistency not in CONSISTENCY:
            raise InvalidInput(f"consistency must be one of {CONSISTENCY}, got {self.consistency!r}")
        if self.index_type not in INDEX_TYPES:
            raise InvalidInput(f"index must be one of {INDEX_TYPES}, got {self.index_type!r}")
        if self.rerank_mode not in RERANK_MODES:
            raise InvalidInput(f"rerank must be one of {RERANK_MODES}, got {self.rerank_mode!r}")
        if spec["lite"] and self.index_type != "BIN_FLAT":
            raise InvalidInput("milvus-lite supports only BIN_FLAT; use a Milvus server for BIN_IVF_FLAT")
        pm = _pymilvus()
        try:
            self._client = pm.MilvusClient(spec["client_uri"], token=token or opts.get("token", ""),
                                           timeout=self.timeout)
        except Exception as exc:  # pymilvus raises several types for an unreachable server
            raise Unavailable(f"cannot reach Milvus at {spec['client_uri']} within {self.timeout:g} s: {exc}; "
                              "is it running?") from exc
        with _errors("describe"):
            exists = self._client.has_collection(self.collection, timeout=self.timeout)
        if exists:
            self._adopt(bits, feature_dim)
        elif create:
            if bits is None:
                raise InvalidInput(f"collection {self.collection!r} does not exist: pass bits= to create it")
            self._create(bits, feature_dim)
        else:
            raise NotFound(f"Milvus collection {self.collection!r} does not exist at {spec['client_uri']} "
                           "(latenthash index --out URI creates it)")
        with _errors("load"):
            self._client.load_collection(self.collection, timeout=self.timeout)
        self.path = self.uri  # where the server's checkpoint goes: save() flushes the collection
        self.model_info: dict = {}  # the encoder that made the codes, for stats(); not stored in Milvus
        self.max_k = min(MAX_K, MAX_TOPK)

    # ------------------------------------------------------------------------------------------------ schema
    def _create(self, bits: int, feature_dim: int | None) -> None:
        bits = check_bits(bits)
        if bits % 8:
            raise InvalidInput(f"Milvus binary vectors need a multiple of 8 bits, got {bits}")
        pm = _pymilvus()
        self.bits, self.feature_dim = bits, int(feature_dim) if feature_dim else None
        try:
            self._create_with(pm, vector_features=True)
        except InvalidInput as exc:
            if not feature_dim or "multiple vector fields" not in str(exc):
                raise
            self._create_with(pm, vector_features=False)  # Milvus < 2.4: one vector field per collection

    def _create_with(self, pm, *, vector_features: bool) -> None:
        schema = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                               description=json.dumps({"latenthash": 1, "bits": self.bits}))
        schema.add_field("id", pm.DataType.INT64, is_primary=True)
        schema.add_field("code", pm.DataType.BINARY_VECTOR, dim=self.bits)
        if self.feature_dim and vector_features:
            schema.add_field("feature", pm.DataType.FLOAT_VECTOR, dim=self.feature_dim)
        elif self.feature_dim:
            schema.add_field("feature", pm.DataType.ARRAY, element_type=pm.DataType.FLOAT,
                             max_capacity=self.feature_dim)
        schema.add_field("metadata", pm.DataType.JSON)
        params = self._client.prepare_index_params()
        build = {"nlist": self.nlist} if self.index_type == "BIN_IVF_FLAT" else {}
        params.add_index("code", index_type=self.index_type, metric_type="HAMMING", params=build)
        if self.feature_dim and vector_features:
            params.add_index("feature", index_type="FLAT", metric_type="IP")
        with _errors("create_collection"):
            self._client.create_collection(self.collection, schema=schema, index_params=params,
                                           consistency_level="Strong", timeout=self.timeout)
        self._vector_features = vector_features

    def _adopt(self, bits: int | None, feature_dim: int | None) -> None:
        """Read bits and feature_dim from an existing collection; refuse one that is not ours or does not match."""
        with _errors("describe"):
            desc = self._client.describe_collection(self.collection, timeout=self.timeout)
        fields = {f["name"]: f for f in desc["fields"]}
        if not {"id", "code", "metadata"} <= set(fields) or not set(fields) <= _FIELDS:
            raise ModelMismatch(f"collection {self.collection!r} is not a latenthash collection "
                                f"(fields {sorted(fields)}; expected id, code, [feature,] metadata)")
        self.bits = int(fields["code"]["params"]["dim"])
        feature = fields.get("feature")
        self.feature_dim = None if feature is None else int(feature["params"].get("dim")
                                                               or feature["params"]["max_capacity"])
        self._vector_features = feature is None or "dim" in feature["params"]  # else an ARRAY (Milvus < 2.4)
        if bits is not None and bits != self.bits:
            raise ModelMismatch(f"collection {self.collection!r} holds {self.bits}-bit codes, not {bits}-bit: "
                                "use another collection for this model")
        if feature_dim is not None and feature_dim != self.feature_dim:
            raise ModelMismatch(f"collection {self.collection!r} holds features of dim {self.feature_dim}, "
                                f"not {feature_dim}")

    # ------------------------------------------------------------------------------------------------ writes
    def _present(self, ids: np.ndarray) -> list[int]:
        out: list[int] = []
        for lo in range(0, len(ids), 8192):
            chunk = ids[lo:lo + 8192].tolist()
            with _errors("query"):
                rows = self._client.query(self.collection, filter=f"id in {chunk}", output_fields=["id"],
                                          timeout=self.timeout, consistency_level=self.consistency)
            out += [int(r["id"]) for r in rows]
        return out

    def add(self, ids: seam.IdsLike, codes: seam.CodesLike, features: seam.FeaturesLike | None = None,
            metadata: Sequence[Any] | None = None) -> int:
        """Upsert items (an id already present is replaced); returns how many ids were already present."""
        ids, packed, meta = seam.check_items(ids, codes, metadata, self.bits)
        n = len(ids)
        feats = seam.check_features(features, n, self.feature_dim)
        if n == 0:
            return 0
        replaced = len(self._present(ids))
        rows = [{"id": int(ids[i]), "code": packed[i].tobytes(),
                 "metadata": {"v": None if meta[i] is None else json.loads(meta[i])}} for i in range(n)]
        if feats is not None:
            for row, f in zip(rows, feats):
                row["feature"] = f.tolist()
        for lo in range(0, n, 2048):
            with _errors("upsert"):
                self._client.upsert(self.collection, rows[lo:lo + 2048], timeout=self.timeout)
        return replaced

    def remove(self, ids: seam.IdsLike) -> int:
        """Remove items by id; returns how many were present (unknown ids are ignored)."""
        present = self._present(seam.check_ids(ids))
        if present:
            with _errors("delete"):
                self._client.delete(self.collection, ids=present, timeout=self.timeout)
        return len(present)

    def save(self, path: str | os.PathLike | None = None) -> str:
        """Flush the collection's growing segments to storage (Milvus persists acknowledged writes itself)."""
        if path is not None and os.fspath(path) != self.uri:
            raise InvalidInput("a Milvus index lives in its collection: save() takes no other path")
        with _errors("flush"):
            self._client.flush(self.collection, timeout=self.timeout)
        return self.uri

    # ------------------------------------------------------------------------------------------------ reads
    def __len__(self) -> int:
        with _errors("count"):
            rows = self._client.query(self.collection, filter="", output_fields=["count(*)"], timeout=self.timeout,
                                      consistency_level=self.consistency)
        return int(rows[0]["count(*)"])

    def __contains__(self, id_: int) -> bool:
        return bool(self._present(np.asarray([int(id_)], np.int64)))

    @property
    def ids(self) -> np.ndarray:
        """Every stored id (a full scan of the id column)."""
        out: list[int] = []
        with _errors("query_iterator"):
            it = self._client.query_iterator(self.collection, batch_size=8192, filter="", output_fields=["id"])
            while batch := it.next():
                out += [int(r["id"]) for r in batch]
            it.close()
        return np.asarray(sorted(out), np.int64)

    def _fetch(self, ids: Sequence[int], fields: list[str]) -> dict[int, dict]:
        found: dict[int, dict] = {}
        for lo in range(0, len(ids), 8192):
            with _errors("get"):
                rows = self._client.get(self.collection, ids=list(ids[lo:lo + 8192]), output_fields=fields,
                                        timeout=self.timeout,
                                        consistency_level=self.consistency)
            found.update((int(r["id"]), r) for r in rows)
        return found

    def get(self, ids: seam.IdsLike) -> seam.Items:
        """Stored codes, features and metadata of the given ids, in the order given; NotFound names missing ids."""
        ids = seam.check_ids(ids)
        fields = ["code", "metadata"] + (["feature"] if self.feature_dim else [])
        found = self._fetch(ids.tolist(), fields)
        missing = [i for i in ids.tolist() if i not in found]
        if missing:
            raise NotFound(f"ids not in the index: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        rows = [found[i] for i in ids.tolist()]
        nb = self.bits // 8
        codes = np.frombuffer(b"".join(_code_bytes(r["code"]) for r in rows), np.uint8).reshape(len(rows), nb)
        feats = (np.asarray([r["feature"] for r in rows], np.float32).reshape(len(rows), self.feature_dim)
                 if self.feature_dim else None)
        return seam.Items(ids, codes, feats, [r["metadata"]["v"] for r in rows])

    def metadata(self, ids: seam.IdsLike) -> list[Any]:
        """Metadata of the given ids (None for unknown ids, e.g. the -1 padding of a search result)."""
        wanted = [int(i) for i in np.asarray(ids).ravel().tolist()]
        found = self._fetch([i for i in wanted if i >= 0], ["metadata"])
        return [found[i]["metadata"]["v"] if i in found else None for i in wanted]

    def metadata_json(self, ids: seam.IdsLike) -> list[str | None]:
        """`metadata` as JSON text (None where absent)."""
        return [None if m is None else json.dumps(m) for m in self.metadata(ids)]

    def search(self, codes: seam.CodesLike, k: int = 10, *, features: seam.FeaturesLike | None = None,
               pool: int | None = None, radius: int | None = None,
               rerank: bool | None = None) -> seam.SearchResult:
        """Two-step search with the same arguments and result as `HashIndex.search` (see the module docstring)."""
        packed, qf = seam.check_query(codes, features, rerank, k=k, radius=radius, pool=pool, bits=self.bits,
                                 feature_dim=self.feature_dim, max_k=self.max_k, max_pool=MAX_TOPK)
        do_rerank = qf is not None
        step1 = min(pool_size(k, pool), MAX_TOPK) if do_rerank else k
        hits = self._hamming(packed, step1, radius)
        if not do_rerank:
            return seam.from_hits(hits, k, False)
        rerank_fn = self._rerank_fetch if self.effective_rerank == "fetch" else self._rerank_milvus
        return seam.from_hits(rerank_fn(qf, hits, k), k, True)

    def _hamming(self, packed: np.ndarray, limit: int, radius: int | None) -> list[list[tuple[int, int]]]:
        """Step 1: per query, (id, distance) pairs sorted by (distance, id)."""
        params: dict = {"metric_type": "HAMMING", "params": {}}
        if self.index_type == "BIN_IVF_FLAT":
            params["params"]["nprobe"] = self.nprobe
        if radius is not None:  # Milvus range search keeps range_filter <= distance < radius
            params["params"].update(radius=radius + 1, range_filter=0)
        with _errors("search"):
            res = self._client.search(self.collection, data=[row.tobytes() for row in packed], anns_field="code",
                                      limit=limit, search_params=params, timeout=self.timeout,
                                      consistency_level=self.consistency)
        return [sorted(((int(h["id"]), int(round(h["distance"]))) for h in row), key=lambda t: (t[1], t[0]))
                for row in res]

    def _rerank_fetch(self, qf: np.ndarray, hits, k: int):
        """Step 2 in the SDK: fetch the pools' features once, then the Numba cosine kernel."""
        from latenthash import kernels as K

        pool_ids = sorted({i for row in hits for i, _ in row})
        found = self._fetch(pool_ids, ["feature"])
        where = {i: j for j, i in enumerate(pool_ids)}
        feats = np.asarray([found[i]["feature"] for i in pool_ids], np.float32).reshape(-1, int(self.feature_dim or 0))
        width = max(1, max(len(row) for row in hits))
        rows = np.full((len(hits), width), -1, np.int64)
        for q, row in enumerate(hits):
            rows[q, :len(row)] = [where[i] for i, _ in row]
        counts = np.asarray([len(row) for row in hits], np.int64)
        f, s, lut = K.rerank_args(feats, None)
        pos, scores = K.cosine_rerank(qf, f, s, lut, rows, counts, np.int64(k))
        return [[(hits[q][p][0], hits[q][p][1], float(scores[q, j])) for j, p in enumerate(pos[q]) if p >= 0]
                for q in range(len(hits))]

    def _rerank_milvus(self, qf: np.ndarray, hits, k: int):
        """Step 2 in Milvus: an IP search of the feature field restricted to each pool's ids."""
        out: list[list[tuple[int, int, float]]] = []
        for q, row in enumerate(hits):
            if not row:
                out.append([])
                continue
            dist = dict(row)
            with _errors("search"):
                res = self._client.search(self.collection, data=[qf[q].tolist()], anns_field="feature", limit=k,
                                          filter=f"id in {list(dist)}", search_params={"metric_type": "IP"},
                                          timeout=self.timeout,
                                          consistency_level=self.consistency)
            ranked = sorted(((int(h["id"]), float(h["distance"])) for h in res[0]), key=lambda t: (-t[1], t[0]))
            out.append([(i, dist[i], s) for i, s in ranked])
        return out

    @property
    def effective_rerank(self) -> str:
        """The step 2 that runs: `rerank_mode`, except `fetch` where features are not a vector field."""
        return self.rerank_mode if self._vector_features else "fetch"

    def warmup(self, *, background: bool = False) -> float:
        """Compile the re-rank kernel off the query path (Milvus itself needs no warm-up); returns the seconds
        (0.0 when `background` leaves it to a thread)."""
        import threading
        import time

        from latenthash import kernels as K

        if background:
            threading.Thread(target=self.warmup, name="latenthash-warmup", daemon=True).start()
            return 0.0
        t0 = time.perf_counter()
        if self.feature_dim:
            f, s, lut = K.rerank_args(np.zeros((1, self.feature_dim), np.float32), None)
            K.cosine_rerank(np.zeros((1, self.feature_dim), np.float32), f, s, lut, np.zeros((1, 1), np.int64),
                            np.ones(1, np.int64), np.int64(1))
        return time.perf_counter() - t0

    def defer_warmup(self) -> None:
        """Nothing to defer: searches run in Milvus, and the re-rank kernel compiles on first use at worst."""

    def stats(self) -> dict:
        n = len(self)
        nbytes = n * (self.bits // 8 + 8 + 4 * (self.feature_dim or 0))
        return {"count": n, "bits": self.bits, "feature_dim": self.feature_dim, "feature_dtype": "float32",
                "index_bytes": int(nbytes), "bytes_per_item": nbytes / n if n else 0.0, "path": self.uri,
                "backend": "milvus", "index_type": self.index_type, "rerank": self.effective_rerank,
                "model": self.model_info}

    def ping(self, timeout: float = 2.0) -> None:
        """Whether Milvus answers now: returns, or raises Unavailable (DeadlineExceeded) within about `timeout`."""
        with _errors("ping"):
            self._client.has_collection(self.collection, timeout=timeout)

    def close(self) -> None:
        self._client.close()


def _code_bytes(value) -> bytes:
    """pymilvus returns a binary vector as bytes or as a one-element list of bytes, depending on the version."""
    return value[0] if isinstance(value, list) else bytes(value)
