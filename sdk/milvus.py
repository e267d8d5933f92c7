"""Milvus index backend: the `IndexBackend` Protocol on one Milvus collection, for collections that outgrow a device.

URIs (through `latenthash.open_index`, `latenthash index --out` and `latenthash serve --index`):

    milvus://host:19530/collection          a Milvus server (standalone or distributed); milvus+https:// for TLS
    milvus-lite:///abs/path/file.db/coll    a local milvus-lite file (tests, laptops; BIN_FLAT only)

Options go in the query string or as keyword arguments (`OPTIONS`; an unknown one is refused): `index` of the code
field (BIN_FLAT or BIN_IVF_FLAT), `feature_index` (FLAT, IVF_FLAT or HNSW, at build), `nlist` (at build), `nprobe`
and `ef` (per search), `token`, `timeout` (seconds), `consistency` of reads (Session, the default, sees this
client's own writes at once; Strong sees every client's but waits for the server's time tick, about 200 ms a read),
`refresh` (seconds between rebuilds of the codeword dictionary from the collection; 0: only at open).

Layout 2 (`LAYOUT`): `id` INT64 primary key, `codeword` (the packed code as INT64 for codes of up to 64 bits, else
hex VARCHAR; scalar-indexed), `feature` FLOAT_VECTOR (L2-normalized, metric IP = cosine) when the index has
features, `code` BINARY_VECTOR (metric HAMMING) where the server allows a second vector field (Milvus >= 2.4) or the
index has no features, `metadata` JSON (wrapped as {"v": value}, since milvus-lite has no nullable fields). Writes
are upserts, so re-adding an id replaces it, as in the embedded index.

Two-step search runs in Milvus: the backend keeps a codeword dictionary (`latenthash.codebook`: codeword -> rows,
read from the collection at open, kept exact by this client's writes), picks the codewords of the query's nearest
distance shells locally, and asks Milvus for one search of the features filtered to those codewords, limit k. The
pool is whole distance shells, as on the embedded index, never cut by Milvus's hit limit, and no features travel.
Exact Hamming search uses Milvus's search of the `code` field where it exists, else the dictionary's shells and a
query by codeword. Milvus returns hits of equal distance (or score) in no set order; this backend sorts them by
id, so results are deterministic, but ties may resolve differently from the embedded index (insertion order).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from latenthash import backend as seam  # the seam's types, validators and URI parser
from latenthash.codebook import Codebook, codes_of, int_keys, keys_of
from latenthash.codes import check_bits
from latenthash.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    LatentHashError,
    ModelMismatch,
    NotFound,
    Unavailable,
    require,
)
from latenthash.limits import MAX_K, pool_size

LAYOUT = 2  # 1: code BINARY_VECTOR and features, no codeword (latenthash before the codeword dictionary)
MAX_TOPK = 16384  # Milvus's limit on hits per query
INDEX_TYPES = ("BIN_FLAT", "BIN_IVF_FLAT")  # of the code field
FEATURE_INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW")
CONSISTENCY = ("Strong", "Session", "Bounded", "Eventually")
OPTIONS = ("index", "feature_index", "nlist", "nprobe", "ef", "token", "timeout", "consistency", "refresh")
DELETE_SETTLE_S = 1.0  # see MilvusIndex._level
HNSW_BUILD = {"M": 16, "efConstruction": 200}
_FIELDS = {"id", "codeword", "code", "feature", "metadata"}
log = logging.getLogger("latenthash.milvus")


def _pymilvus():
    import warnings

    # milvus-lite 2.5 still imports pkg_resources, which warns on every start
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    pm = require("pymilvus", extra="milvus", purpose="the Milvus index backend")
    # pymilvus logs every failed call with its traceback at WARNING/ERROR on a handler of its own (thousands of lines
    # a second while Milvus is away, enough CPU to delay the calls themselves); this backend raises each failure as
    # an SDK error instead. LATENTHASH_PYMILVUS_LOG=WARNING (any level) keeps pymilvus's own log.
    logging.getLogger("pymilvus").setLevel(os.environ.get("LATENTHASH_PYMILVUS_LOG", "CRITICAL").upper())
    return pm


_GONE = ("unavailable", "connect", "timeout", "deadline", "not ready", "channel", "closed", "refused", "not loaded",
         "unrecoverable")  # "not loaded": a restarted Milvus that has not loaded the collection again yet


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
    keeps_copies = False
    """Codes, features and metadata in a Milvus collection; same calls and result types as `HashIndex`."""

    def __init__(self, uri: str, *, bits: int | None = None, feature_dim: int | None = None, create: bool = False,
                 **options: Any):
        spec = seam.parse_uri(uri)
        opts = spec["options"] | {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(opts) - set(OPTIONS))
        if unknown:
            raise InvalidInput(f"unknown Milvus index options {unknown}: the options are {', '.join(OPTIONS)} "
                               "(docs/scale.md)")
        self.uri = uri.split("?", 1)[0]
        self.collection = spec["collection"]
        self.index_type = str(opts.get("index", "BIN_FLAT")).upper()
        self.feature_index = str(opts.get("feature_index", "FLAT")).upper()
        self.nlist = int(opts.get("nlist", 1024))
        self.nprobe = int(opts.get("nprobe", 16))
        self.ef = int(opts.get("ef", 64))
        self.timeout = float(opts.get("timeout", 10.0))
        self.refresh = float(opts.get("refresh", 300.0))
        self.consistency = str(opts.get("consistency", "Session")).capitalize()
        for name, value, allowed in (("consistency", self.consistency, CONSISTENCY),
                                     ("index", self.index_type, INDEX_TYPES),
                                     ("feature_index", self.feature_index, FEATURE_INDEX_TYPES)):
            if value not in allowed:
                raise InvalidInput(f"{name} must be one of {allowed}, got {value!r}")
        if spec["lite"] and self.index_type != "BIN_FLAT":
            raise InvalidInput("milvus-lite supports only BIN_FLAT; use a Milvus server for BIN_IVF_FLAT")
        self._lite = spec["lite"]
        pm = _pymilvus()
        try:
            self._client = pm.MilvusClient(spec["client_uri"], token=str(opts.get("token", "")),
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
        self.codebook = Codebook(self.bits)
        self._refreshed = 0.0
        self._deleted = -DELETE_SETTLE_S
        self._refreshing = threading.Lock()
        self._loading = threading.Lock()
        if exists:
            self.refresh_codewords()
        else:
            self._refreshed = time.monotonic()  # a new collection's dictionary is exact: empty

    # ------------------------------------------------------------------------------------------------ schema
    def _create(self, bits: int, feature_dim: int | None) -> None:
        bits = check_bits(bits)
        if bits % 8:
            raise InvalidInput(f"Milvus binary vectors need a multiple of 8 bits, got {bits}")
        self.bits, self.feature_dim = bits, int(feature_dim) if feature_dim else None
        # Milvus < 2.4 allows one vector field per collection: there the features are it
        self._create_with(code_field=not self.feature_dim or self._lite or self._server_version() >= (2, 4))

    def _server_version(self) -> tuple[int, int]:
        """(major, minor) of the Milvus server ((9, 9) where the answer has no version: assume a recent one)."""
        with _errors("get_server_version"):
            found = re.search(r"(\d+)\.(\d+)", str(self._client.get_server_version(timeout=self.timeout)))
        return (int(found[1]), int(found[2])) if found else (9, 9)

    def _create_with(self, *, code_field: bool) -> None:
        pm = _pymilvus()
        schema = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                               description=json.dumps({"latenthash": LAYOUT, "bits": self.bits}))
        schema.add_field("id", pm.DataType.INT64, is_primary=True)
        if int_keys(self.bits):
            schema.add_field("codeword", pm.DataType.INT64)
        else:
            schema.add_field("codeword", pm.DataType.VARCHAR, max_length=self.bits // 4)
        if code_field:
            schema.add_field("code", pm.DataType.BINARY_VECTOR, dim=self.bits)
        if self.feature_dim:
            schema.add_field("feature", pm.DataType.FLOAT_VECTOR, dim=self.feature_dim)
        schema.add_field("metadata", pm.DataType.JSON)
        params = self._client.prepare_index_params()
        if code_field:
            build = {"nlist": self.nlist} if self.index_type == "BIN_IVF_FLAT" else {}
            params.add_index("code", index_type=self.index_type, metric_type="HAMMING", params=build)
        if self.feature_dim:
            params.add_index("feature", index_type=self.feature_index, metric_type="IP",
                             params={"IVF_FLAT": {"nlist": self.nlist}, "HNSW": HNSW_BUILD}.get(self.feature_index,
                                                                                                 {}))
        with _errors("create_collection"):
            self._client.create_collection(self.collection, schema=schema, index_params=params,
                                           consistency_level="Strong", timeout=self.timeout)
        # a scalar index on the codeword: Milvus 2.3 servers know STL_SORT (INT64) and Trie (VARCHAR), milvus-lite
        # 2.5 only INVERTED (loaded again by __init__)
        scalar = self._client.prepare_index_params()
        scalar.add_index("codeword", index_type="INVERTED" if self._lite else
                         ("STL_SORT" if int_keys(self.bits) else "Trie"))
        with _errors("create_index"):
            self._client.release_collection(self.collection, timeout=self.timeout)  # loaded: indexes are fixed
            self._client.create_index(self.collection, scalar, timeout=self.timeout)
        self._code_field = code_field

    def _adopt(self, bits: int | None, feature_dim: int | None) -> None:
        """Read bits and feature_dim from an existing collection; refuse one that is not ours, is of an older
        layout, or does not match."""
        with _errors("describe"):
            desc = self._client.describe_collection(self.collection, timeout=self.timeout)
        fields = {f["name"]: f for f in desc["fields"]}
        if {"id", "code", "metadata"} <= set(fields) and "codeword" not in fields:
            raise FailedPrecondition(
                f"collection {self.collection!r} has layout 1 (no codeword field: written by an earlier "
                "latenthash), on which two-step search cannot run in Milvus: copy it into a new collection with "
                f"`python -m latenthash.milvus upgrade {self.uri} {self.uri}_v{LAYOUT}` and use that one (or "
                "index the images again with `latenthash index --out NEW_URI`)")
        if not {"id", "codeword", "metadata"} <= set(fields) or not set(fields) <= _FIELDS:
            raise ModelMismatch(f"collection {self.collection!r} is not a latenthash collection "
                                f"(fields {sorted(fields)}; expected id, codeword, [code,] [feature,] metadata)")
        self.bits = int(json.loads(desc.get("description") or "{}").get("bits") or fields["code"]["params"]["dim"])
        self.feature_dim = int(fields["feature"]["params"]["dim"]) if "feature" in fields else None
        self._code_field = "code" in fields
        if self.feature_dim:
            with _errors("describe_index"):
                self.feature_index = str(self._client.describe_index(self.collection, "feature",
                                                                     timeout=self.timeout)["index_type"])
        if bits is not None and bits != self.bits:
            raise ModelMismatch(f"collection {self.collection!r} holds {self.bits}-bit codes, not {bits}-bit: "
                                "use another collection for this model")
        if feature_dim is not None and feature_dim != self.feature_dim:
            raise ModelMismatch(f"collection {self.collection!r} holds features of dim {self.feature_dim}, "
                                f"not {feature_dim}")

    # ------------------------------------------------------------------------------------------------ codewords
    def refresh_codewords(self) -> float:
        """Rebuild the codeword dictionary from a scan of the collection (at open, every `refresh` seconds in the
        background, or on demand: another client's writes reach this client's two-step searches this way);
        returns the seconds it took."""
        t0 = time.perf_counter()
        with self._refreshing, self.codebook.rebuilding() as scanned, _errors("query_iterator"):
            it = self._client.query_iterator(self.collection, batch_size=16384, filter="",
                                             output_fields=["codeword"], timeout=self.timeout,
                                             consistency_level=self._level())
            while batch := it.next():
                scanned.update(r["codeword"] for r in batch)
            it.close()
        self._refreshed = time.monotonic()
        return time.perf_counter() - t0

    def _refresh_due(self) -> None:
        """Start a background rebuild when the dictionary is older than `refresh` seconds (none runs twice)."""
        if self.refresh <= 0 or time.monotonic() - self._refreshed < self.refresh or self._refreshing.locked():
            return
        self._refreshed = time.monotonic()  # no second start while this one scans

        def rebuild() -> None:
            try:
                self.refresh_codewords()
            except LatentHashError as exc:  # Milvus away: the next search due tries again
                log.warning("codeword dictionary not refreshed: %s", exc)

        threading.Thread(target=rebuild, name="latenthash-codewords", daemon=True).start()

    # ------------------------------------------------------------------------------------------------ writes
    def _level(self) -> str:
        """The consistency of a read: Strong for a second after this client's delete, whose timestamp pymilvus does
        not track for Session reads against a Milvus 2.3 server (a count right after it missed it), else the
        option's."""
        return "Strong" if time.monotonic() - self._deleted < DELETE_SETTLE_S else self.consistency

    def _present(self, ids: np.ndarray) -> dict[int, Any]:
        """The given ids that are stored, with their codeword keys."""
        out: dict[int, Any] = {}
        for lo in range(0, len(ids), 8192):
            chunk = ids[lo:lo + 8192].tolist()
            with _errors("query"):
                rows = self._client.query(self.collection, filter=f"id in {chunk}", output_fields=["codeword"],
                                          timeout=self.timeout, consistency_level=self._level())
            out.update((int(r["id"]), r["codeword"]) for r in rows)
        return out

    def add(self, ids: seam.IdsLike, codes: seam.CodesLike, features: seam.FeaturesLike | None = None,
            metadata: Sequence[Any] | None = None, *, copies: seam.FeaturesLike | None = None) -> int:
        """Upsert items (an id already present is replaced); returns how many ids were already present. Copy
        descriptors are not kept here (`keeps_copies`): copy groups run on embedded indexes."""
        if copies is not None:
            raise InvalidInput("a Milvus index keeps no copy descriptors: find copy groups on an embedded "
                               "(directory) index")
        ids, packed, meta = seam.check_items(ids, codes, metadata, self.bits)
        n = len(ids)
        feats = seam.check_features(features, n, self.feature_dim)
        if n == 0:
            return 0
        old = self._present(ids)
        keys = keys_of(packed, self.bits)
        rows = [{"id": int(ids[i]), "codeword": keys[i],
                 "metadata": {"v": None if meta[i] is None else json.loads(meta[i])}} for i in range(n)]
        for i, row in enumerate(rows):
            if self._code_field:
                row["code"] = packed[i].tobytes()
            if feats is not None:
                row["feature"] = feats[i].tolist()
        for lo in range(0, n, 2048):
            try:
                with _errors("upsert"):
                    self._client.upsert(self.collection, rows[lo:lo + 2048], timeout=self.timeout)
            finally:  # counted in even when the upsert failed (it may have landed); counted out only once it has
                self.codebook.change(keys[lo:lo + 2048], 1)
            self.codebook.change([old[i] for i in ids[lo:lo + 2048].tolist() if i in old], -1)
        return len(old)

    def remove(self, ids: seam.IdsLike) -> int:
        """Remove items by id; returns how many were present (unknown ids are ignored)."""
        present = self._present(seam.check_ids(ids))
        if present:
            with _errors("delete"):
                self._client.delete(self.collection, ids=list(present), timeout=self.timeout)
            self.codebook.change(present.values(), -1)
            self._deleted = time.monotonic()
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
                                      consistency_level=self._level())
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
                                        timeout=self.timeout, consistency_level=self._level())
            found.update((int(r["id"]), r) for r in rows)
        return found

    def get(self, ids: seam.IdsLike) -> seam.Items:
        """Stored codes, features and metadata of the given ids, in the order given; NotFound names missing ids."""
        ids = seam.check_ids(ids)
        fields = ["codeword", "metadata"] + (["feature"] if self.feature_dim else [])
        found = self._fetch(ids.tolist(), fields)
        missing = [i for i in ids.tolist() if i not in found]
        if missing:
            raise NotFound(f"ids not in the index: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        rows = [found[i] for i in ids.tolist()]
        codes = codes_of([r["codeword"] for r in rows], self.bits)
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
                                      feature_dim=self.feature_dim, max_k=self.max_k)
        self._refresh_due()
        if qf is not None:
            target = pool_size(k, pool)
            return seam.from_hits([self._two_step(p, f, k, target, radius) for p, f in zip(packed, qf)], k, True)
        if self._code_field:
            return seam.from_hits(self._hamming(packed, k, radius), k, False)
        return seam.from_hits([self._hamming_by_codewords(p, k, radius) for p in packed], k, False)

    def _in(self, keys: list) -> str:
        return f"codeword in {json.dumps(keys)}"

    def _two_step(self, packed: np.ndarray, qf: np.ndarray, k: int, target: int, radius: int | None):
        """Step 1 in the dictionary (the codewords of the nearest shells), step 2 in Milvus (one search of the
        features filtered to them): (id, distance, score) best first, ties by id."""
        shells = self.codebook.shells(packed, target, radius)
        if not shells.keys:
            return []
        distance = shells.distance_of()
        params = {"metric_type": "IP", "params": {"IVF_FLAT": {"nprobe": self.nprobe},
                                                  "HNSW": {"ef": max(self.ef, k)}}.get(self.feature_index, {})}
        with _errors("search"):
            res = self._client.search(self.collection, data=[qf.tolist()], anns_field="feature", limit=k,
                                      filter=self._in(shells.keys), search_params=params,
                                      output_fields=["codeword"], timeout=self.timeout,
                                      consistency_level=self._level())
        ranked = sorted(((int(h["id"]), float(h["distance"]), h["entity"]["codeword"]) for h in res[0]),
                        key=lambda t: (-t[1], t[0]))
        return [(i, distance[key], s) for i, s, key in ranked]

    def _hamming_by_codewords(self, packed: np.ndarray, k: int, radius: int | None):
        """Exact Hamming top-k without a code field: every row of the shells nearer than the boundary shell (fewer
        than k), then as many rows of the boundary shell as are missing."""
        shells = self.codebook.shells(packed, k, radius)
        distance = shells.distance_of()
        hits: list[tuple[int, int]] = []
        for keys in ([key for key, d in distance.items() if d < shells.cut],
                     [key for key, d in distance.items() if d == shells.cut]):
            if keys and len(hits) < k:
                with _errors("query"):
                    rows = self._client.query(self.collection, filter=self._in(keys), output_fields=["codeword"],
                                              limit=k - len(hits), timeout=self.timeout,
                                              consistency_level=self._level())
                hits += sorted(((int(r["id"]), distance[r["codeword"]]) for r in rows), key=lambda t: (t[1], t[0]))
        return hits[:k]

    def _hamming(self, packed: np.ndarray, limit: int, radius: int | None) -> list[list[tuple[int, int]]]:
        """Milvus's search of the code field: per query, (id, distance) pairs sorted by (distance, id)."""
        params: dict = {"metric_type": "HAMMING", "params": {}}
        if self.index_type == "BIN_IVF_FLAT":
            params["params"]["nprobe"] = self.nprobe
        if radius is not None:  # Milvus range search keeps range_filter <= distance < radius
            params["params"].update(radius=radius + 1, range_filter=0)
        with _errors("search"):
            res = self._client.search(self.collection, data=[row.tobytes() for row in packed], anns_field="code",
                                      limit=limit, search_params=params, timeout=self.timeout,
                                      consistency_level=self._level())
        return [sorted(((int(h["id"]), int(round(h["distance"]))) for h in row), key=lambda t: (t[1], t[0]))
                for row in res]

    def warmup(self, *, background: bool = False) -> float:
        """Nothing to compile: searches run in Milvus and in numpy (kept for the Protocol)."""
        return 0.0

    def defer_warmup(self) -> None:
        """Nothing to defer (kept for the Protocol)."""

    def stats(self) -> dict:
        n = len(self)
        nbytes = n * (self.bits // 8 * (2 if self._code_field else 1) + 8 + 4 * (self.feature_dim or 0))
        return {"count": n, "bits": self.bits, "feature_dim": self.feature_dim, "feature_dtype": "float32",
                "index_bytes": int(nbytes), "bytes_per_item": nbytes / n if n else 0.0, "path": self.uri,
                "backend": "milvus", "layout": LAYOUT, "index_type": self.index_type if self._code_field else None,
                "feature_index": self.feature_index if self.feature_dim else None,
                "codewords": len(self.codebook), "model": self.model_info}

    def ping(self, timeout: float = 2.0) -> None:
        """Whether Milvus answers queries on the collection now: returns, or raises Unavailable (DeadlineExceeded)
        within about `timeout`. A restarted Milvus answers before it serves the collection again ("not loaded"),
        so the ping is a query; it loads the collection when Milvus does not."""
        with _errors("ping"):
            state = str(self._client.get_load_state(self.collection, timeout=timeout)["state"])
        try:
            if not state.endswith("Loaded"):
                raise Unavailable(f"Milvus collection {self.collection!r} is not loaded ({state})")
            with _errors("ping"):
                self._client.query(self.collection, filter="id in [-1]", output_fields=["id"], timeout=timeout,
                                   consistency_level="Eventually")
        except Unavailable as exc:
            if ("NotLoad" in state or "not loaded" in str(exc)) and self._loading.acquire(blocking=False):
                threading.Thread(target=self._load, name="latenthash-load", daemon=True).start()
            raise

    def _load(self) -> None:
        try:
            with _errors("load"):
                self._client.load_collection(self.collection, timeout=max(self.timeout, 60.0))
        except LatentHashError as exc:  # the next ping tries again
            log.warning("Milvus collection not loaded: %s", exc)
        finally:
            self._loading.release()

    def close(self) -> None:
        self._client.close()


def upgrade(source: str, target: str, *, batch: int = 4096) -> int:
    """Copy a layout-1 collection (code and features, no codeword) into a new layout-2 collection at `target`;
    returns the rows copied. The source is only read."""
    pm = _pymilvus()
    spec = seam.parse_uri(source)
    client = pm.MilvusClient(spec["client_uri"], token=spec["options"].get("token", ""))
    try:
        with _errors("describe"):
            fields = {f["name"]: f for f in client.describe_collection(spec["collection"])["fields"]}
        if "codeword" in fields or "code" not in fields:
            raise InvalidInput(f"{source} is not a layout-1 latenthash collection (fields {sorted(fields)})")
        bits = int(fields["code"]["params"]["dim"])
        feature = fields.get("feature")
        dim = None if feature is None else int(feature["params"].get("dim") or feature["params"]["max_capacity"])
        out = MilvusIndex(target, bits=bits, feature_dim=dim, create=True)
        copied = 0
        with _errors("query_iterator"):
            client.load_collection(spec["collection"])
            it = client.query_iterator(spec["collection"], batch_size=batch, filter="",
                                       output_fields=["code", "metadata"] + (["feature"] if dim else []))
            while rows := it.next():
                codes = np.frombuffer(b"".join(_code_bytes(r["code"]) for r in rows), np.uint8).reshape(len(rows),
                                                                                                       -1)
                feats = np.asarray([r["feature"] for r in rows], np.float32) if dim else None
                out.add([r["id"] for r in rows], codes, feats, [r["metadata"]["v"] for r in rows])
                copied += len(rows)
            it.close()
        out.save()
        out.close()
        return copied
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m latenthash.milvus upgrade OLD_URI NEW_URI`: copy a collection into the current layout."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m latenthash.milvus", description=main.__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upgrade", help="copy a layout-1 collection into a new collection of the current layout")
    up.add_argument("source")
    up.add_argument("target")
    args = ap.parse_args(argv)
    print(f"copied {upgrade(args.source, args.target):,} rows from {args.source} to {args.target}")


def _code_bytes(value) -> bytes:
    """pymilvus returns a binary vector as bytes or as a one-element list of bytes, depending on the version."""
    return value[0] if isinstance(value, list) else bytes(value)


if __name__ == "__main__":
    main()
