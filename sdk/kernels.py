"""Numba kernels: exact Hamming top-k, radius search, cosine re-rank, retrieval statistics.

Pure functions over explicit dtypes: codes are uint64 words (N * W flattened, row-major; see `codes.py`),
distances int64, ids int64, features float32 / float16 / int8 (+ float32 per-vector scale). Every kernel is
parity-tested against a brute-force numpy reference in tests/test_kernels.py.

Top-k selection works on integer distances in 0..bits: each query keeps a histogram of the candidates it holds and
a threshold T, accepting a code only when its distance is below T, and lowering T as soon as k held candidates lie
below it (a code at distance T can no longer enter: ties go to the earlier item). Ties are broken by database order,
so results are deterministic.

Every search reads the database twice. The first pass is the popcount pass itself: it stores only the smallest
distance of every group of 256 codes. The k-th smallest of those minima bounds T from above (k codes lie at or below
it), so the second pass reads again only the groups whose minimum is below T (about one in thirty for random 64-bit
codes), as a bit mask per 64 codes of those below T. One query (`topk_single`) splits the first pass across threads
and bounds T from all chunks' minima; its second pass, a few percent of the work, runs on the calling thread. A batch
(`topk_batch`) gives each thread whole queries, in rounds whose first pass walks the database in L2-sized blocks
that every query of the round reuses.
"""

from __future__ import annotations

import functools
import os
import stat
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from latenthash.errors import MissingDependency

try:
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.cpython.unsafe.numbers import trailing_zeros
    from numba.extending import intrinsic, overload
except ImportError as exc:  # pragma: no cover - numba is a base dependency
    raise MissingDependency("latenthash's search kernels need numba: pip install numba") from exc


def _writable(folder: Path) -> bool:
    """Numba's own test of a cache folder: it can be made, and a file written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def _ensure_cache_dir() -> None:
    """Numba refuses to import a module of cached kernels when no cache folder is writable (a read-only
    site-packages and no writable home: a container image, a service user). Then the compiled kernels go to a
    private folder in the temp directory, kept across restarts; NUMBA_CACHE_DIR, where set, always wins."""
    from numba.misc.appdirs import AppDirs

    config: Any = numba.config  # its settings are set at import, from the environment
    if config.CACHE_DIR or _writable(Path(__file__).parent / "__pycache__") \
            or _writable(Path(AppDirs(appname="numba", appauthor=False).user_cache_dir)):
        return
    private = Path(tempfile.gettempdir()) / f"latenthash-numba-{os.getuid()}"
    try:
        private.mkdir(mode=0o700, exist_ok=True)
        st = private.lstat()
        trusted = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022
    except OSError:
        trusted = False
    # a folder someone else made there could hold their code: then one of this process's own
    config.CACHE_DIR = str(private if trusted else tempfile.mkdtemp(prefix="latenthash-numba-"))


_ensure_cache_dir()

GROUP = 256  # codes per skip group (measured: 64 costs 35% more per scan, 1024 gains little)
BLOCK = 16384  # codes per cache block in batch scans
ROUND = 32  # queries of a batch whose group minima are held at once, at most ROUND_MINIMA minima per query block
ROUND_MINIMA = 1 << 20  # int16: 2 MiB per block of queries, whatever the database size
_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_S1, _S2, _S4, _S56 = np.uint64(1), np.uint64(2), np.uint64(4), np.uint64(56)


@njit(inline="always", cache=True)
def popcount64(x):
    """SWAR popcount; LLVM turns it into the hardware instruction (vpopcntq where AVX-512 has it)."""
    x = x - ((x >> _S1) & _M1)
    x = (x & _M2) + ((x >> _S2) & _M2)
    x = (x + (x >> _S4)) & _M4
    return np.int64((x * _H01) >> _S56)


def _emit_prefetch(context, builder, start, nbytes):
    """LLVM's prefetch intrinsic (x86 prefetcht0, arm64 prfm) for every cache line of [start, start + nbytes)."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8")
    with cgutils.for_range_slice(builder, context.get_constant(types.intp, 0), nbytes,
                                 context.get_constant(types.intp, 64)) as (off, _):
        builder.call(fn, [builder.inttoptr(builder.add(start, off), i8p), i32(0), i32(3), i32(1)])


@intrinsic
def prefetch_row(typingctx, arr, row):
    """Ask the memory system for every cache line of arr[row] (a C-contiguous 2-D array) without waiting.

    A pool's rows are random reads across the whole feature array, each a DRAM round trip; scoring one row while
    the next rows are already on their way overlaps those latencies. A prefetch never faults, so no bounds are
    needed."""
    sig = types.void(arr, row)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        base = builder.ptrtoint(ary.data, ir.IntType(64))
        row = context.cast(builder, args[1], signature.args[1], types.intp)
        start = builder.add(base, builder.mul(row, builder.extract_value(ary.strides, 0)))
        item = context.get_constant(types.intp, aryty.dtype.bitwidth // 8)
        _emit_prefetch(context, builder, start, builder.mul(builder.extract_value(ary.shape, 1), item))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch_span(typingctx, arr, lo, hi):
    """Ask the memory system for the cache lines of arr[lo:hi] (a contiguous 1-D array) without waiting."""
    sig = types.void(arr, lo, hi)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        item = context.get_constant(types.intp, aryty.dtype.bitwidth // 8)
        lo, hi = (context.cast(builder, a, t, types.intp) for a, t in zip(args[1:], signature.args[1:]))
        start = builder.add(builder.ptrtoint(ary.data, ir.IntType(64)), builder.mul(lo, item))
        _emit_prefetch(context, builder, start, builder.mul(builder.sub(hi, lo), item))
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", cache=True)
def _distances(db, start, n, q, w, out):
    """out[j] = Hamming distance to query words q of code start + j, for j < n (db: flattened words).

    Indices are cast to unsigned so Numba drops its negative-index wraparound and LLVM vectorises the loop;
    slicing instead would cost a reference count per call."""
    if w == 1:
        q0 = q[0]
        for j in range(n):
            out[j] = popcount64(db[np.uint64(start + j)] ^ q0)
    elif w == 2:  # 128-bit codes: unrolled, so the loop vectorises like the one-word case
        q0, q1 = q[0], q[1]
        for j in range(n):
            b = np.uint64(2 * (start + j))
            out[j] = popcount64(db[b] ^ q0) + popcount64(db[b + np.uint64(1)] ^ q1)
    else:
        for j in range(n):
            d = np.int64(0)
            base = (start + j) * w
            for t in range(w):
                d += popcount64(db[np.uint64(base + t)] ^ q[t])
            out[j] = d


@njit(inline="always", cache=True)
def _group_min(db, start, n, q, w):
    """The smallest distance among codes start..start+n-1: a pure vectorised reduction, nothing stored.

    Its loops repeat `_distances`' on purpose: a shared per-code helper measured 20-40% slower for 48-bit codes
    (LLVM no longer vectorised the reduction)."""
    mn = np.int64(1 << 30)
    if w == 1:
        q0 = q[0]
        for j in range(n):
            mn = min(mn, popcount64(db[np.uint64(start + j)] ^ q0))
    elif w == 2:
        q0, q1 = q[0], q[1]
        for j in range(n):
            b = np.uint64(2 * (start + j))
            mn = min(mn, popcount64(db[b] ^ q0) + popcount64(db[b + np.uint64(1)] ^ q1))
    else:
        for j in range(n):
            d = np.int64(0)
            base = (start + j) * w
            for t in range(w):
                d += popcount64(db[np.uint64(base + t)] ^ q[t])
            mn = min(mn, d)
    return mn


@njit(inline="always", cache=True)
def _distance(db, i, q, w):
    """The Hamming distance of code i to query words q."""
    if w == 1:
        return popcount64(db[np.uint64(i)] ^ q[0])
    d = np.int64(0)
    for t in range(w):
        d += popcount64(db[np.uint64(i * w + t)] ^ q[t])
    return d


@njit(inline="always", cache=True)
def _pieces(parts, work, grain):
    """How many of `parts` threads a pass of `work` items takes: pieces of at least `grain` items (a parallel launch
    costs microseconds)."""
    return max(1, min(parts, work // grain))


@njit(inline="always", cache=True)
def _piece(n, parts, c):
    """Piece c of `parts` near-equal pieces of 0..n-1: (lo, hi)."""
    per = (n + parts - 1) // parts
    lo = min(n, c * per)
    return lo, min(n, lo + per)


@njit(cache=True)
def _below_mask(db, start, m, q, w, thr):
    """Bit j set where code start + j (j < m <= 64) lies below distance thr.

    Built without branches, so LLVM vectorises it like the popcount pass: testing 32-code minima first (the
    design before) cost four times as long, the horizontal minimum of every subgroup being a chain of shuffles.
    Callers pass w as a literal where they can (see `_select_bounded`)."""
    mask = np.uint64(0)
    if w == 1:
        q0 = q[0]
        for j in range(m):
            mask |= np.uint64(popcount64(db[np.uint64(start + j)] ^ q0) < thr) << np.uint64(j)
    elif w == 2:
        q0, q1 = q[0], q[1]
        for j in range(m):
            b = np.uint64(2 * (start + j))
            d = popcount64(db[b] ^ q0) + popcount64(db[b + np.uint64(1)] ^ q1)
            mask |= np.uint64(d < thr) << np.uint64(j)
    else:
        for j in range(m):
            mask |= np.uint64(_distance(db, start + j, q, w) < thr) << np.uint64(j)
    return mask


@njit(inline="always", cache=True)
def _take(i, d, k, hist, cand_i, cand_d, held, thr, below):
    """Add candidate i at distance d < thr to a selection state; returns its new (held, thr, below).

    cand_i/cand_d hold candidates in database order; when they are full, they are compacted to what can still
    enter (all below thr, the first k - below at thr)."""
    if held == cand_i.shape[0]:
        keep, at_thr = 0, 0
        for c in range(held):
            e = cand_d[c]
            if e < thr or (e == thr and at_thr < k - below):
                at_thr += e == thr
                cand_i[keep] = cand_i[c]
                cand_d[keep] = e
                keep += 1
        held = keep
    cand_i[held] = i
    cand_d[held] = d
    held += 1
    hist[d] += 1
    below += 1
    while below >= k:
        thr -= 1
        below -= hist[thr]
    return held, thr, below


@njit(cache=True)
def _group_mins(db, n, q, w, gmin):
    """gmin[g] = the smallest distance in group g of the n codes; returns the number of groups.

    A function of its own, never inlined: inlined into the selection code the same loop ran ~50% slower (measured
    on Zen 5: LLVM vectorises the reduction less well inside the larger function)."""
    ng = (n + GROUP - 1) // GROUP
    for g in range(ng):
        gmin[g] = _group_min(db, g * GROUP, min(GROUP, n - g * GROUP), q, w)
    return ng


@njit(cache=True)
def _count_below(gmin, d):
    """How many group minima are at most d: a branch-free count that LLVM vectorises."""
    c = 0
    for g in range(gmin.shape[0]):
        c += gmin[np.uint64(g)] <= d
    return c


@njit(cache=True)
def _mins_bound(gmin, k, bits):
    """One above the k-th smallest group minimum (k codes lie at or below it), or bits + 1 when there are fewer
    than k groups: a binary search over distances 0..bits, each step one vectorised count. A histogram of the
    minima cost several times as much (its increments pile onto the few counters near the bound)."""
    lo, hi = 0, bits + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _count_below(gmin, mid) >= k:
            hi = mid
        else:
            lo = mid + 1
    return min(lo + 1, bits + 1)


@njit(inline="always", cache=True)
def _mins_below(gmin, start, m, thr):
    """Bit j set where group start + j (j < m <= 64) has its minimum below thr (branch-free, as `_below_mask`)."""
    mask = np.uint64(0)
    for j in range(m):
        mask |= np.uint64(gmin[np.uint64(start + j)] < thr) << np.uint64(j)
    return mask


@njit(cache=True)
def _select_bounded(db, n, base, q, w, k, hist, cand_i, cand_d, state, gmin):
    """The second pass over n codes whose group minima gmin are known, into an empty selection state whose T
    comes from `_mins_bound`: only the groups whose minimum lies below T are read again, 64 codes per mask of those
    below T. Random 64-bit codes leave about one group in thirty for this pass, where a single pass that lowers T
    as it goes enters thousands while T falls."""
    held, thr, below = state[0], state[1], state[2]
    ng = (n + GROUP - 1) // GROUP
    for g0 in range(0, ng, 64):
        groups = _mins_below(gmin, g0, min(64, ng - g0), thr)
        while groups:
            g = g0 + trailing_zeros(groups)
            groups &= groups - np.uint64(1)
            if gmin[g] >= thr:  # thr has fallen since the mask was made
                continue
            if groups:  # the next group is a cache miss otherwise: pass 1 has long evicted it
                nxt = g0 + trailing_zeros(groups)
                prefetch_span(db, nxt * GROUP * w, min(n, (nxt + 1) * GROUP) * w)
            end = min(n, (g + 1) * GROUP)
            for s0 in range(g * GROUP, end, 64):
                m = min(64, end - s0)
                # a literal word count for the common lengths: LLVM then drops the other branches, measured twice
                # as fast for one-word codes as with w a run-time value
                mask = _below_mask(db, s0, m, q, 1, thr) if w == 1 else \
                    _below_mask(db, s0, m, q, 2, thr) if w == 2 else _below_mask(db, s0, m, q, w, thr)
                while mask:
                    i = s0 + trailing_zeros(mask)
                    mask &= mask - np.uint64(1)
                    d = _distance(db, i, q, w)
                    if d < thr:  # thr may have fallen since the mask was made
                        held, thr, below = _take(base + i, d, k, hist, cand_i, cand_d, held, thr, below)
    state[0], state[1], state[2] = held, thr, below


@njit(cache=True)
def _finish(hist, cand_i, cand_d, state, k, out_i, out_d):
    """Stable counting sort of the held candidates by distance; writes the first k (or fewer). Returns the count."""
    held, thr = state[0], state[1]
    nb = hist.shape[0]
    start = np.zeros(nb + 1, np.int64)
    for c in range(held):
        if cand_d[c] <= thr:
            start[cand_d[c] + 1] += 1
    for d in range(nb):
        start[d + 1] += start[d]
    total = min(k, start[nb])
    for c in range(held):
        d = cand_d[c]
        if d <= thr:
            p = start[d]
            start[d] += 1
            if p < total:
                out_i[p] = cand_i[c]
                out_d[p] = d
    return total


@njit(cache=True)
def _chunk_select(db, lo, hi, w, q, k, bits, thr, gmin, out_i, out_d):
    """Top-k of one query among codes lo..hi-1 below threshold thr, given their group minima gmin, into
    out_i/out_d sorted by (distance, database order); returns the count (fewer than k when thr cuts)."""
    hist = np.zeros(bits + 2, np.int64)
    cand_i = np.empty(2 * k + 4 * GROUP, np.int64)
    cand_d = np.empty(2 * k + 4 * GROUP, np.int64)
    state = np.array([0, thr, 0], np.int64)
    _select_bounded(db[lo * w:hi * w], hi - lo, lo, q, w, k, hist, cand_i, cand_d, state, gmin)
    return _finish(hist, cand_i, cand_d, state, k, out_i, out_d)


@njit(parallel=True, cache=True)
def _parallel_mins(db, n, w, q, chunks, gmin):
    """The first pass split across threads: every group minimum into gmin."""
    per = (n + chunks - 1) // chunks
    per = (per + GROUP - 1) // GROUP * GROUP
    for c in prange(chunks):
        lo = min(n, c * per)
        hi = min(n, lo + per)
        _group_mins(db[lo * w:hi * w], hi - lo, q, w, gmin[lo // GROUP:])


@njit(cache=True)
def topk_single(db, n, w, q, k, bits, chunks):
    """Top-k of one query over n codes, the first pass split into `chunks` parallel parts (one chunk runs without a
    parallel launch; see `single_chunks`).

    Returns (rows (1, k), distances (1, k), counts (1,)) as `topk_batch` rows: sorted by (distance, database order),
    -1 padded where n < k. The second pass, a few percent of the first's work, runs on the calling thread: split
    too, it measured slower (a second launch and a merge)."""
    out_i = np.full((1, k), -1, np.int64)
    out_d = np.full((1, k), -1, np.int64)
    gmin = np.empty((n + GROUP - 1) // GROUP, np.int64)
    if chunks > 1:
        _parallel_mins(db, n, w, q, chunks, gmin)
    else:
        _group_mins(db, n, q, w, gmin)
    thr = _mins_bound(gmin, k, bits)  # one threshold from every chunk's minima: a chunk's own admits k per chunk
    counts = np.empty(1, np.int64)
    counts[0] = _chunk_select(db, 0, n, w, q, k, bits, thr, gmin, out_i[0], out_d[0])
    return out_i, out_d, counts


_topk_single = topk_single  # for compiled callers: the public name is rebound below (`_one_launch_at_a_time`)


@njit(cache=True)
def topk_one(db, n, w, q, k, bits, chunks, ids):
    """One query's exact top-k as the index answers it: ids (1, k), distances (1, k), counts (1,), -1 padded
    where n < k. `topk_single` with its rows mapped to `ids` in the same compiled call: no Python between the
    scan and the result, whose cost counts against a scan of microseconds."""
    rows, dists, counts = _topk_single(db, n, w, q, min(k, max(n, 1)), bits, chunks)
    out_i = np.full((1, k), -1, np.int64)
    out_d = np.full((1, k), -1, np.int64)
    for j in range(counts[0]):
        out_i[0, j] = ids[rows[0, j]]
        out_d[0, j] = dists[0, j]
    return out_i, out_d, counts


@njit(parallel=True, cache=True)
def topk_batch(db, n, w, qs, k, bits, query_blocks):
    """Top-k of each of nq queries (qs flattened (nq * w)); rows padded with id -1 / distance -1 when n < k.

    Threads take blocks of queries and split them into rounds of ROUND queries. A round first walks the database
    in BLOCK-code pieces that its queries share in L2, storing every group minimum of every query (the popcount
    pass), then runs each query's bounded second pass as one query does."""
    nq = qs.shape[0] // w
    out_i = np.full((nq, k), -1, np.int64)
    out_d = np.full((nq, k), -1, np.int64)
    cap = 2 * k + 4 * GROUP
    ng = (n + GROUP - 1) // GROUP
    per_block = (nq + query_blocks - 1) // query_blocks
    hists = np.empty((query_blocks, bits + 2), np.int64)
    cand_i = np.empty((query_blocks, cap), np.int64)
    cand_d = np.empty((query_blocks, cap), np.int64)
    states = np.empty((query_blocks, 3), np.int64)
    round_ = max(1, min(ROUND, ROUND_MINIMA // max(ng, 1)))
    gmins = np.empty((query_blocks, round_, ng), np.int16)  # distances <= 1,024 bits
    for b in prange(query_blocks):
        q0 = b * per_block
        q1 = min(nq, q0 + per_block)
        for r0 in range(q0, q1, round_):
            r1 = min(q1, r0 + round_)
            for lo in range(0, n, BLOCK):
                hi = min(n, lo + BLOCK)
                block = db[lo * w:hi * w]
                for i in range(r0, r1):
                    _group_mins(block, hi - lo, qs[i * w:(i + 1) * w], w, gmins[b, i - r0, lo // GROUP:])
            for i in range(r0, r1):
                hist, state = hists[b], states[b]
                hist[:] = 0
                state[0], state[1], state[2] = 0, _mins_bound(gmins[b, i - r0, :ng], k, bits), 0
                _select_bounded(db, n, np.int64(0), qs[i * w:(i + 1) * w], w, k, hist, cand_i[b], cand_d[b], state,
                                gmins[b, i - r0])
                _finish(hist, cand_i[b], cand_d[b], state, k, out_i[i], out_d[i])
    return out_i, out_d


@njit(cache=True)
def _bucket_topk(ucodes, nu, w, offsets, rows, q, k, bits, dist, pick, out_i, out_d):
    """Top-k of one query from code buckets (see `topk_buckets`); returns the count written.

    Three passes over the distinct codes, the first two vectorised: distances (and their minimum), then rows at
    distance d for d = min, min + 1, ... until k rows are covered (learned codes: one or two passes, as the nearest
    codeword usually holds thousands of rows), then the buckets within that distance. A histogram instead costs a
    scattered read-modify-write per code, 3x slower."""
    _distances(ucodes, 0, nu, q, w, dist)
    lo = np.int64(1 << 30)
    for u in range(nu):
        lo = min(lo, dist[u])
    cut, covered = lo, np.int64(0)
    while cut <= bits:
        held = np.int64(0)
        for u in range(nu):
            held += (offsets[u + 1] - offsets[u]) if dist[u] == cut else 0
        covered += held
        if covered >= k:
            break
        cut += 1
    m = 0
    for u in range(nu):
        if dist[u] <= cut:
            pick[m] = dist[u] * nu + u  # sorts by distance, then by bucket
            m += 1
    picked = np.sort(pick[:m])
    pos, b0 = 0, 0
    while b0 < m and pos < k:
        d = picked[b0] // nu
        b1 = b0
        while b1 < m and picked[b1] // nu == d:
            b1 += 1
        need = k - pos  # below `cut` every row fits; at `cut` the first `need` rows of each bucket hold the answer
        if b1 - b0 == 1:  # one bucket: its rows are already in database order
            u = picked[b0] % nu
            take = min(need, offsets[u + 1] - offsets[u])
            for j in range(take):
                out_i[pos + j] = rows[offsets[u] + j]
        else:  # several: merge their first rows by row
            total = 0
            for b in range(b0, b1):
                u = picked[b] % nu
                total += min(need, offsets[u + 1] - offsets[u])
            tmp = np.empty(total, np.int64)
            t = 0
            for b in range(b0, b1):
                u = picked[b] % nu
                for j in range(min(need, offsets[u + 1] - offsets[u])):
                    tmp[t] = rows[offsets[u] + j]
                    t += 1
            tmp.sort()
            take = min(need, total)
            for j in range(take):
                out_i[pos + j] = tmp[j]
        for j in range(take):
            out_d[pos + j] = d
        pos += take
        b0 = b1
    return pos


@njit(cache=True)
def _buckets_serial(ucodes, nu, w, offsets, rows, qs, k, bits, out_i, out_d, counts):
    dist = np.empty(nu, np.int64)
    pick = np.empty(nu, np.int64)
    for i in range(qs.shape[0] // w):
        counts[i] = _bucket_topk(ucodes, nu, w, offsets, rows, qs[i * w:(i + 1) * w], k, bits, dist, pick, out_i[i],
                                 out_d[i])


@njit(parallel=True, cache=True)
def _buckets_parallel(ucodes, nu, w, offsets, rows, qs, k, bits, query_blocks, out_i, out_d, counts):
    nq = qs.shape[0] // w
    per_block = (nq + query_blocks - 1) // query_blocks
    for b in prange(query_blocks):
        lo, hi = b * per_block, min(nq, (b + 1) * per_block)
        _buckets_serial(ucodes, nu, w, offsets, rows, qs[lo * w:hi * w], k, bits, out_i[lo:hi], out_d[lo:hi],
                        counts[lo:hi])


@njit(cache=True)
def topk_buckets(ucodes, nu, w, offsets, rows, qs, k, bits, query_blocks):
    """Exact top-k of each query when the database is given as buckets of identical codes: ucodes (nu * w
    flattened distinct codes), bucket u holding rows[offsets[u]:offsets[u + 1]] in ascending order. Distances to
    the nu distinct codes replace the scan over all rows; whole buckets are taken nearest first, and at the last
    distance needed the smallest rows win, so results equal `topk_batch`'s (ties by database order).

    Returns (rows (nq, k), distances (nq, k), counts (nq,)), -1 padded. One query block runs without a parallel
    launch (~10 us saved on a single query)."""
    nq = qs.shape[0] // w
    out_i = np.full((nq, k), -1, np.int64)
    out_d = np.full((nq, k), -1, np.int64)
    counts = np.zeros(nq, np.int64)
    if query_blocks <= 1:
        _buckets_serial(ucodes, nu, w, offsets, rows, qs, k, bits, out_i, out_d, counts)
    else:
        _buckets_parallel(ucodes, nu, w, offsets, rows, qs, k, bits, query_blocks, out_i, out_d, counts)
    return out_i, out_d, counts


@njit(parallel=True, cache=True)
def radius_counts(db, n, w, qs, bits):
    """Per-query histogram of distances over all n codes: (nq, bits + 1) int64."""
    nq = qs.shape[0] // w
    out = np.zeros((nq, bits + 1), np.int64)
    for i in prange(nq):
        q = qs[i * w:(i + 1) * w]
        buf = np.empty(GROUP, np.int64)
        for g0 in range(0, n, GROUP):
            m = min(GROUP, n - g0)
            _distances(db, g0, m, q, w, buf)
            for j in range(m):
                out[i, buf[j]] += 1
    return out


@njit(parallel=True, cache=True)
def radius_search(db, n, w, qs, radius, limits):
    """Every code within `radius` of each query, sorted by (distance, database order), at most limits[i] per query.

    Returns (offsets (nq + 1,), ids, distances): query i's hits are ids[offsets[i]:offsets[i + 1]]."""
    nq = qs.shape[0] // w
    offsets = np.zeros(nq + 1, np.int64)
    for i in range(nq):
        offsets[i + 1] = offsets[i] + limits[i]
    ids = np.empty(offsets[nq], np.int64)
    dists = np.empty(offsets[nq], np.int64)
    found = np.zeros(nq, np.int64)
    for i in prange(nq):
        q = qs[i * w:(i + 1) * w]
        buf = np.empty(GROUP, np.int64)
        start = np.zeros(radius + 2, np.int64)
        for g0 in range(0, n, GROUP):  # pass 1: counts per distance, to place hits without sorting
            m = min(GROUP, n - g0)
            _distances(db, g0, m, q, w, buf)
            for j in range(m):
                if buf[j] <= radius:
                    start[buf[j] + 1] += 1
        for d in range(radius + 1):
            start[d + 1] += start[d]
        total = min(limits[i], start[radius + 1])
        base = offsets[i]
        for g0 in range(0, n, GROUP):
            m = min(GROUP, n - g0)
            _distances(db, g0, m, q, w, buf)
            for j in range(m):
                d = buf[j]
                if d <= radius:
                    p = start[d]
                    start[d] += 1
                    if p < total:
                        ids[base + p] = g0 + j
                        dists[base + p] = d
        found[i] = total
    return offsets, found, ids, dists



# Numba has no float16 arrays: half features travel as their uint16 bit patterns (see `_dot_f16`).
NO_SCALES = np.empty(0, np.float32)
# Reassociation lets the dot products vectorise (the order of a float sum changes in the last bits); NaN and
# infinity semantics stay exact, unlike full fastmath.
FAST = {"reassoc", "contract"}


PARTS = 16  # pieces one query's pool is split into for the threads
PREFETCH_AHEAD = 6  # rows requested ahead of the one being scored (measured: 4-8 best, 2.7x over none)
CELL_SHARE = 8  # a widened shell holds at most one cell per this many pool rows (see `_shell_picks`)
SKETCH_LANES = 64  # rows rotated side by side by `sketch_rows` (measured: 3x faster per row than 16 or 32)
SKETCH_PIECES = 64  # parallel pieces of one `sketch_rows` call (buckets._scan_cells: 65,536 rows at most)
SIM_BINS = 2048  # resolution of the cell cut (`_cell_ranges`): cosine -1..1 in steps of 1/1024
QUERY_LEVEL_BITS = 6  # the query's side of the sketch distance: each rotated coordinate as one of 64 levels
# the least work per thread of one query's parallel passes (`twostep_one`; measured: smaller pieces lose the launch)
GRAIN_ROWS, GRAIN_SCORES = 1024, 64
GRAIN_CONVERT = 2048  # rows per parallel piece of the row-wise conversions (unit rows, float16 in and out)
CHEAP_LAUNCH = 10e-6  # seconds: a parallel launch costing more makes one query's two-step serial (`one_query_parts`)
SKETCH_AHEAD = 16  # blocks of 8 sketches requested ahead of the sketch pass (measured: 4-16 best, 1.7x over none)
SAMPLE_ROWS = 256  # the sketch pass estimates its cut from this many of the pool's distances ...
SAMPLE_MARGIN = 1.5  # ... as the distance that SAMPLE_MARGIN x the rows it keeps reach
SAMPLE_BINS = 256  # ... read off a histogram of the sample in this many bins (`_sample_limit`)
DOT_SUMS = 4  # independent sums of a float16 dot product (`_dot_f16`; a power of two)


@intrinsic
def _dot_f16(typingctx, q, feats, row):
    """The dot product of float32 q (D,) with feats[row], float16 values stored as their uint16 bit patterns.

    LLVM's half-to-float conversion on 16 lanes at a time (vcvtph2ps where x86 has F16C, fcvtl on Arm) and fused
    multiply-adds into DOT_SUMS independent sums, so that one multiply-add need not wait for the last (the cell
    cut's centroid products, one after another in a loop, waited on a single chain: RESULTS.md); Numba has no
    float16 type, and the table lookup per element used before is a gather per value."""
    sig = types.float32(q, feats, row)
    lanes = 16

    def codegen(context, builder, signature, args):
        qty, fty, rty = signature.args
        qa = context.make_array(qty)(context, builder, args[0])
        fa = context.make_array(fty)(context, builder, args[1])
        f32, i16, half = ir.FloatType(), ir.IntType(16), ir.HalfType()
        vf, vh = ir.VectorType(f32, lanes), ir.VectorType(i16, lanes)
        dim = builder.extract_value(qa.shape, 0)
        start = builder.mul(context.cast(builder, args[2], rty, types.intp), builder.extract_value(fa.strides, 0))
        fptr = builder.bitcast(builder.gep(builder.bitcast(fa.data, ir.IntType(8).as_pointer()), [start]),
                               i16.as_pointer())
        qptr = qa.data
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{lanes}f32")
        sums = [cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * lanes)) for _ in range(DOT_SUMS)]

        def add_chunk(chunk, acc):  # acc += feats[row, 16 chunk:16 chunk + 16] * q[...]
            off = builder.mul(chunk, ir.Constant(dim.type, lanes))
            h = builder.load(builder.bitcast(builder.gep(fptr, [off]), vh.as_pointer()), align=2)
            f = builder.fpext(builder.bitcast(h, ir.VectorType(half, lanes)), vf)
            qv = builder.load(builder.bitcast(builder.gep(qptr, [off]), vf.as_pointer()), align=4)
            builder.store(builder.call(fma, [f, qv, builder.load(acc)]), acc)

        whole = builder.udiv(dim, ir.Constant(dim.type, lanes))
        rounds = builder.udiv(whole, ir.Constant(dim.type, DOT_SUMS))
        with cgutils.for_range(builder, rounds) as loop:
            first = builder.mul(loop.index, ir.Constant(dim.type, DOT_SUMS))
            for a, acc in enumerate(sums):
                add_chunk(builder.add(first, ir.Constant(dim.type, a)), acc)
        with cgutils.for_range_slice(builder, builder.mul(rounds, ir.Constant(dim.type, DOT_SUMS)), whole,
                                     ir.Constant(dim.type, 1)) as (chunk, _):
            add_chunk(chunk, sums[0])
        parts = [builder.load(acc) for acc in sums]
        while len(parts) > 1:
            parts = [builder.fadd(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
        v = parts[0]
        width = lanes
        while width > 1:  # a tree of halves, not a chain of sixteen dependent adds
            width //= 2
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), width), list(range(width))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), width),
                                                          list(range(width, 2 * width))))
            v = builder.fadd(lo, hi)
        total = cgutils.alloca_once_value(builder, builder.extract_element(v, ir.Constant(ir.IntType(32), 0)))
        tail = builder.mul(whole, ir.Constant(dim.type, lanes))
        with cgutils.for_range_slice(builder, tail, dim, ir.Constant(dim.type, 1)) as (t, _):
            x = builder.fpext(builder.bitcast(builder.load(builder.gep(fptr, [t])), half), f32)
            builder.store(builder.fadd(builder.load(total), builder.fmul(x, builder.load(builder.gep(qptr, [t])))),
                          total)
        return builder.load(total)

    return sig, codegen


@intrinsic
def _block_levels(typingctx, blocks, block, planes, out, pos):
    """out[pos:pos + 8] = the sketch distances of the 8 rows of block `block` of `blocks` ((nblocks, S, 8) uint64:
    word t of 8 rows side by side) to a query given as the QUERY_LEVEL_BITS bit planes of its levels
    (`query_levels`): sum_j |L s_j - v_j| = sum_p 2^p popcount(s XOR plane_p), s a row's sign bits, v the query's
    levels 0..L, L = 2^QUERY_LEVEL_BITS - 1 (L - v_j is v_j with its bits flipped; one plane would be the Hamming
    distance between sign sketches).

    In this layout the 8 distances are 8 lanes summed down the words, with no sum across lanes: a row-major sketch
    needs one horizontal reduction per row, which cost most of the sketch pass."""
    sig = types.void(blocks, block, planes, out, pos)

    def codegen(context, builder, signature, args):
        bty, kty, qty, oty, pty = signature.args
        ba = context.make_array(bty)(context, builder, args[0])
        qa = context.make_array(qty)(context, builder, args[2])
        oa = context.make_array(oty)(context, builder, args[3])
        i64 = ir.IntType(64)
        v8 = ir.VectorType(i64, 8)
        sw = builder.extract_value(qa.shape, 1)
        block = context.cast(builder, args[1], kty, types.intp)
        base = builder.gep(ba.data, [builder.mul(block, builder.mul(sw, ir.Constant(i64, 8)))])
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8]), "llvm.ctpop.v8i64")
        accs = [cgutils.alloca_once_value(builder, ir.Constant(v8, [0] * 8)) for _ in range(QUERY_LEVEL_BITS)]
        with cgutils.for_range(builder, sw) as loop:
            words = builder.load(builder.bitcast(builder.gep(base, [builder.mul(loop.index, ir.Constant(i64, 8))]),
                                                 v8.as_pointer()), align=8)
            for p, acc in enumerate(accs):  # unrolled: one XOR and popcount per plane, each its own sum
                at = builder.add(builder.mul(ir.Constant(i64, p), sw), loop.index)
                word = builder.load(builder.gep(qa.data, [at]))
                qv = builder.insert_element(ir.Constant(v8, ir.Undefined), word, ir.Constant(ir.IntType(32), 0))
                qv = builder.shuffle_vector(qv, qv, ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
                builder.store(builder.add(builder.load(acc), builder.call(ctpop, [builder.xor(words, qv)])), acc)
        dist = builder.load(accs[0])
        for p, acc in enumerate(accs[1:], 1):
            dist = builder.add(dist, builder.shl(builder.load(acc), ir.Constant(v8, [p] * 8)))
        v32 = ir.VectorType(ir.IntType(32), 8)
        at = builder.gep(oa.data, [context.cast(builder, args[4], pty, types.intp)])
        builder.store(builder.trunc(dist, v32), builder.bitcast(at, v32.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _dot(a, b, i):
    """float32 a (D,) . row i of stored features b: float32, int8, or float16 as uint16 bit patterns."""


def _dot_half(a, b, i):
    return _dot_f16(a, b, i)


def _dot_cast(a, b, i):
    s = np.float32(0.0)
    for t in range(a.shape[0]):
        s += a[t] * np.float32(b[i, t])
    return s


# Numba's SSA pass misreads the inlined loop's accumulator as out of scope and warns; the code it makes is right
# (tests/test_kernels.py checks every dtype against numpy)
warnings.filterwarnings("ignore", message="variable '_dot_cast", category=numba.NumbaIRAssumptionWarning)


@overload(_dot, jit_options={"fastmath": FAST}, inline="always")  # inlined: a call per row measured 2.5x slower
def _dot_by_dtype(a, b, i):
    return _dot_half if b.dtype == types.uint16 else _dot_cast


@njit(inline="always", cache=True, fastmath=FAST)
def _score_rows(q, feats, scales, rows, lo, hi, out):
    """out[j] = score of rows[j] for lo <= j < hi, prefetching PREFETCH_AHEAD rows ahead."""
    for j in range(lo, min(hi, lo + PREFETCH_AHEAD)):
        prefetch_row(feats, rows[j])
    for j in range(lo, hi):
        if j + PREFETCH_AHEAD < hi:
            prefetch_row(feats, rows[j + PREFETCH_AHEAD])
        out[j] = _score(q, feats, rows[j], scales)


@njit(parallel=True, cache=True, fastmath=FAST)
def _parallel_scores(q, feats, scales, rows, m, parts, out):
    """`_score_rows` of rows[:m] in `parts` parallel pieces: a pool's rows are random reads, so one query's are
    split over the threads."""
    for c in prange(parts):
        lo, hi = _piece(m, parts, c)
        _score_rows(q, feats, scales, rows, lo, hi, out)


@njit(parallel=True, cache=True, fastmath=FAST)
def cosine_rerank(qf, feats, scales, pool, pool_n, k):
    """Re-rank each query's Hamming pool by cosine similarity.

    qf: (nq, D) float32 L2-normalized queries; feats: (N, D) stored L2-normalized features, as float32, int8 or
    float16 bit patterns in uint16, with scales: (N,) float32 per-row scale (NO_SCALES: none); pool: (nq, P)
    int64 candidate rows, the first pool_n[i] valid. Returns (positions into pool (nq, k) int64, -1 padded; scores
    (nq, k) float32, NaN padded) by descending score, ties by pool order (that is, by Hamming distance, then
    database order)."""
    nq = qf.shape[0]
    out_p = np.full((nq, k), -1, np.int64)
    out_s = np.full((nq, k), np.nan, np.float32)
    if nq == 1:
        m = pool_n[0]
        scores = np.empty(m, np.float32)
        # a constant, not the thread count: that would defeat caching
        _parallel_scores(qf[0], feats, scales, pool[0], m, max(1, min(PARTS, m // 128)), scores)
        _keep_best(scores, k, out_p[0], out_s[0])
        return out_p, out_s
    for i in prange(nq):
        m = pool_n[i]
        scores = np.empty(m, np.float32)
        _score_rows(qf[i], feats, scales, pool[i], 0, m, scores)
        _keep_best(scores, k, out_p[i], out_s[i])
    return out_p, out_s


@njit(inline="always", cache=True, fastmath=FAST)
def _score(q, feats, r, scales):
    s = _dot(q, feats, r)
    return s * scales[r] if scales.shape[0] else s


@njit(cache=True)
def _keep_best(scores, k, out_p, out_s):
    """The k best scores into out_p (positions) and out_s, descending, ties by position (places past the scores
    keep what they hold): one pass keeping the best so far in order; a score enters only above the k-th best so
    far, so of equal scores the earlier stays. NaN scores are passed over. A pool's few hundred or thousand scores
    cost a few nanoseconds each, where numpy's partition and sort took microseconds."""
    n = 0
    for j in range(scores.shape[0]):
        x = scores[j]
        if n == k:
            if not x > out_s[k - 1]:
                continue
            i = k - 1
        elif x == x:
            i = n
            n += 1
        else:
            continue
        while i > 0 and out_s[i - 1] < x:
            out_s[i] = out_s[i - 1]
            out_p[i] = out_p[i - 1]
            i -= 1
        out_s[i] = x
        out_p[i] = j


LANES16 = np.uint64(0x0001000100010001)  # one in each 16-bit lane of a word (`_level`)
HIGH16 = np.uint64(0x8000800080008000)  # the top bit of each lane
SHELL_LEVELS = 8  # distances `_shell_picks` takes one pass each before it counts the rest by one histogram ...
SHELL_SCAN_CODES = 8192  # ... over more distinct codes than this; fewer are counted by the histogram at once


@njit(inline="always", cache=True)
def _lanes_equal(word, pattern):
    """Non-zero exactly when one of word's four 16-bit lanes equals pattern's (x = word ^ pattern has a zero lane:
    x - 1 per lane borrows into the top bit of a lane whose own top bit is clear)."""
    x = word ^ pattern
    return (x - LANES16) & ~x & HIGH16


@njit(inline="always", cache=True)
def _level(dist, nu, d, sizes, out, n):
    """Append to out (from n) every u < nu with dist[u] == d, in order; returns (new n, their rows, their cells),
    sizes[u] = rows << 32 | cells. dist is uint16, padded with 0xFFFF to whole words: four distances per word are
    tested at once (`_lanes_equal`), sixteen words OR-ed before one branch, and only the few words that hold one
    are read code by code."""
    words = dist.view(np.uint64)
    nw = words.shape[0]
    pattern = np.uint64(d) * LANES16
    rows = np.int64(0)
    cells = np.int64(0)
    for g in range(0, nw, 16):
        hit = np.uint64(0)
        for i in range(g, min(g + 16, nw)):
            hit |= _lanes_equal(words[np.uint64(i)], pattern)
        if not hit:
            continue
        for i in range(g, min(g + 16, nw)):
            if not _lanes_equal(words[np.uint64(i)], pattern):
                continue
            for u in range(4 * i, min(nu, 4 * i + 4)):
                if dist[u] == d:
                    out[n] = u
                    n += 1
                    rows += sizes[u] >> 32
                    cells += sizes[u] & 0xFFFFFFFF
    return n, rows, cells


@njit(inline="always", cache=True)
def _wider(covered, cells, more, c, target, shell, max_cells):
    """Whether the shells take the next distance, which adds `more` rows and `c` cells: always while they hold
    fewer than `target` rows, then towards `shell` rows as long as the cells stay within `max_cells`."""
    return covered < target or (covered < shell and cells + c <= max_cells)


@njit(cache=True)
def _shells_by_histogram(dist, nu, sizes, d, covered, cells, target, shell, max_cells, bits, picked, pdist, n):
    """The rest of `_shell_picks` past distance d in one histogram of every code's rows and cells (four of them,
    merged after: code distances crowd a few values, and one histogram's increments would wait on each other),
    then the codes past d within the cut, counting-sorted by distance (stable, so ties stay in bucket order).
    Returns (n, rows covered)."""
    h = np.zeros((4, bits + 2), np.int64)
    for u in range(nu):
        h[u & 3, dist[u]] += sizes[u]
    both = h[0] + h[1] + h[2] + h[3]
    rows = both >> 32
    ncells = both & 0xFFFFFFFF
    cut = d
    while cut < bits and _wider(covered, cells, rows[cut + 1], ncells[cut + 1], target, shell, max_cells):
        cut += 1
        covered += rows[cut]
        cells += ncells[cut]
    count = np.zeros(cut + 2, np.int64)
    for u in range(nu):
        e = dist[u]
        if d < e <= cut:
            count[e] += 1
    start = np.zeros(cut + 2, np.int64)
    at = n
    for e in range(d + 1, cut + 1):
        start[e] = at
        at += count[e]
    for u in range(nu):
        e = dist[u]
        if d < e <= cut:
            picked[start[e]] = u
            pdist[start[e]] = e
            start[e] += 1
    return at, covered


@njit(cache=True)
def _shell_picks(ucodes, nu, w, sizes, q, target, shell, max_cells, bits):
    """The buckets of one query's shells, nearest code first (ties by bucket), their distances and their rows in
    all: the smallest distance d* with at least `target` rows within it (every bucket when the index holds fewer),
    then widened a distance at a time towards `shell` rows while its cells stay within `max_cells` (far shells hold
    many small buckets, each a cell whose centroid the cut would have to compare). sizes[u] = bucket u's
    rows << 32 | its cells.

    One vectorised pass of distances to the nu distinct codes, then one pass per distance from the nearest code's
    (`_level`, which reads only the codes at that distance, and they come out sorted): learned codes over a large
    index decide within two to four. A histogram of every code's rows per distance costs a scattered
    read-modify-write per code, three times as long as those passes, but less than many of them: shells that go on
    past SHELL_LEVELS distances finish by one, and a small index (few codes with many rows each, whose shells reach
    far) takes it at once."""
    dist = np.empty((nu + 3) // 4 * 4, np.uint16)
    if w == 1:  # a literal word count: LLVM vectorises the one-word loop
        _distances(ucodes, 0, nu, q, 1, dist)
    else:
        _distances(ucodes, 0, nu, q, w, dist)
    dist[nu:] = 0xFFFF
    low = np.uint16(0xFFFF)
    for u in range(nu):
        low = min(low, dist[np.uint64(u)])
    picked = np.empty(nu, np.int64)
    pdist = np.empty(nu, np.int64)
    d = np.int64(low) - 1 if nu else np.int64(bits)
    n, covered, cells = 0, np.int64(0), np.int64(0)
    passes_left = SHELL_LEVELS if nu > SHELL_SCAN_CODES else 0
    while d < bits:
        if passes_left == 0:
            n, covered = _shells_by_histogram(dist, nu, sizes, d, covered, cells, target, shell, max_cells, bits,
                                              picked, pdist, n)
            break
        n0 = n
        n, more, c = _level(dist, nu, d + 1, sizes, picked, n)
        passes_left -= 1
        if not _wider(covered, cells, more, c, target, shell, max_cells):
            n = n0
            break
        d += 1
        pdist[n0:n] = d
        covered += more
        cells += c
    return picked[:n], pdist[:n], covered


@njit(cache=True, fastmath=FAST)
def _cell_ranges(qf, picked, pdist, nrows, bucket_cells, cells, centroids, target):
    """Step 1's cut of one query's shells (buckets `picked`, nearest code first, `nrows` rows in all) to about
    `target` rows: the cells nearest the query by centroid cosine (whole bins of SIM_BINS over -1..1) until they
    cover `target`, or every bucket whole when the shells hold no more.

    Returns (lo, hi, code distance) of each chosen range of the cell order, in pool order (nearest code first, then
    bucket, then cell), and the rows they hold."""
    nb = picked.shape[0]
    if nrows <= target:
        lo = np.empty(nb, np.int64)
        hi = np.empty(nb, np.int64)
        for b in range(nb):
            lo[b] = cells[bucket_cells[picked[b]]]
            hi[b] = cells[bucket_cells[picked[b] + 1]]
        return lo, hi, pdist, nrows
    total = 0
    for b in range(nb):
        total += bucket_cells[picked[b] + 1] - bucket_cells[picked[b]]
    bins = np.empty(total, np.int64)
    hist = np.zeros(SIM_BINS, np.int64)
    c = 0
    for b in range(nb):
        for g in range(bucket_cells[picked[b]], bucket_cells[picked[b] + 1]):
            x = min(SIM_BINS - 1, max(0, np.int64((_dot(qf, centroids, g) + 1.0) * (SIM_BINS // 2))))
            bins[c] = x
            hist[x] += cells[g + 1] - cells[g]
            c += 1
    cut = SIM_BINS - 1
    covered = hist[cut]
    while covered < target and cut > 0:
        cut -= 1
        covered += hist[cut]
    m = 0
    for c in range(total):
        m += bins[c] >= cut
    lo = np.empty(m, np.int64)
    hi = np.empty(m, np.int64)
    rd = np.empty(m, np.int64)
    c = m = 0
    for b in range(nb):
        for g in range(bucket_cells[picked[b]], bucket_cells[picked[b] + 1]):
            if bins[c] >= cut:
                lo[m], hi[m], rd[m] = cells[g], cells[g + 1], pdist[b]
                m += 1
            c += 1
    return lo, hi, rd, covered


@njit(inline="always", cache=True)
def _blocks_distances(planes, signs, flat, lo, first, base, start, stop, sd):
    """`_block_levels` of blocks start..stop-1 of the pool's block order, where range b's blocks (from lo[b] // 8 of
    the cell order) are blocks first[b]..first[b + 1]-1 of it, their distances at sd[base[b] + 8 * block]; the
    sketches of SKETCH_AHEAD blocks ahead requested before each (across ranges, however short)."""
    if start >= stop:
        return
    b = np.searchsorted(first, start, side="right") - 1
    pb, pg = b, start  # the next block to request, and its range
    for g in range(start, stop):
        while pg < min(stop, g + SKETCH_AHEAD + 1):
            while pg >= first[pb + 1]:
                pb += 1
            prefetch_row(flat, lo[pb] // 8 + pg - first[pb])
            pg += 1
        while g >= first[b + 1]:
            b += 1
        blk = lo[b] // 8 + g - first[b]
        _block_levels(signs, blk, planes, sd, base[b] + 8 * blk)


@njit(parallel=True, cache=True)
def _parallel_blocks(planes, signs, flat, lo, first, base, parts, sd):
    """`_blocks_distances` of every block of the pool in `parts` parallel pieces of near-equal blocks."""
    for c in prange(parts):
        start, stop = _piece(first[-1], parts, c)
        _blocks_distances(planes, signs, flat, lo, first, base, start, stop, sd)


@njit(cache=True)
def _pool_distances(planes, signs, lo, hi, parts):
    """The sketch distance (`_block_levels`) of every row of the ranges [lo, hi) of the cell order, whole blocks of 8
    at a time, in `parts` parallel pieces. Returns (distances, base): row r of range b has its distance at
    distances[base[b] + r] (a range's first and last block may hold others' rows)."""
    nb = lo.shape[0]
    base = np.empty(nb, np.int64)
    first = np.empty(nb + 1, np.int64)
    first[0] = 0
    for b in range(nb):
        base[b] = 8 * first[b] - lo[b] // 8 * 8
        first[b + 1] = first[b] + (hi[b] + 7) // 8 - lo[b] // 8
    sd = np.empty(8 * first[nb], np.int32)
    flat = signs.reshape(signs.shape[0], -1)  # a block's sketches as one row, for prefetch_row
    if parts > 1:
        _parallel_blocks(planes, signs, flat, lo, first, base, parts, sd)
    else:
        _blocks_distances(planes, signs, flat, lo, first, base, 0, first[nb], sd)
    return sd, base


@njit(inline="always", cache=True)
def _within_mask(sd, start, m, limit):
    """Bit j set where sd[start + j] <= limit (j < m <= 64): branch-free, so LLVM vectorises it."""
    mask = np.uint64(0)
    for j in range(m):
        mask |= np.uint64(sd[np.uint64(start + j)] <= limit) << np.uint64(j)
    return mask


@njit(inline="always", cache=True)
def _rows_within(sd, lo, hi, base, limit, keep_r, keep_b, keep_d):
    """The rows of the ranges [lo, hi) of the cell order (row r of range b at sketch distance sd[base[b] + r]) at
    distance <= limit, in pool order, into keep_*: their positions in the cell order, ranges and distances.
    Returns how many. Tested 64 rows per mask: the few kept rows are the only branches."""
    c = 0
    for b in range(lo.shape[0]):
        s0 = base[b] + lo[b]
        n = hi[b] - lo[b]
        for g in range(0, n, 64):
            mask = _within_mask(sd, s0 + g, min(64, n - g), limit)
            while mask:
                j = g + trailing_zeros(mask)
                mask &= mask - np.uint64(1)
                keep_r[c] = lo[b] + j
                keep_b[c] = b
                keep_d[c] = sd[s0 + j]
                c += 1
    return c


@njit(cache=True)
def _sample_limit(values, at):
    """A value at or above the at-th smallest of `values` (0-based, at < len(values)) by at most one bin of about
    (max - min) / SAMPLE_BINS: the upper edge of the bin that holds it, of SAMPLE_BINS power-of-two-wide bins from the
    smallest value. The sketch pass's sampled cut needs no more (the rows within it are then cut exactly), and one
    counting pass over the sample costs a fraction of an exact selection."""
    low, high = values[0], values[0]
    for x in values:
        low = min(low, x)
        high = max(high, x)
    shift = 0
    while ((high - low) >> shift) >= SAMPLE_BINS:
        shift += 1
    hist = np.zeros(SAMPLE_BINS, np.int64)
    for x in values:
        hist[(x - low) >> shift] += 1
    seen = 0
    for b in range(SAMPLE_BINS):
        seen += hist[b]
        if seen > at:
            return low + ((b + 1) << shift) - 1
    return high


@njit(cache=True)
def _sketch_pick(planes, signs, lo, hi, rdist, m, out_p, out_d, parts):
    """Step 2's first pass for one query over its pool, ranges [lo, hi) of the cell order at code distances
    rdist: each pool row's sketch distance to the query, sum_j |L s_j - v_j| over the row's sign bits s and the
    query's levels v (`query_levels`; see buckets.py; a few popcounts a row, contiguous reads), and the m rows
    nearest by it, ties by pool order, into out_p (positions into the cell order) and out_d (their code distances),
    in pool order. Returns how many (min(m, pool rows)).

    The cut: a sample of SAMPLE_ROWS of the distances gives one that about SAMPLE_MARGIN x m rows reach; the rows
    within it are kept (a wider one again if fewer than m were), and the exact cut is counted among those few (a
    histogram of every row's distance cost as much as the popcounts). The distances are computed in `parts` parallel
    pieces."""
    nb = lo.shape[0]
    sd, base = _pool_distances(planes, signs, lo, hi, parts)
    nrows = np.sum(hi - lo)
    want = min(nrows, m)
    step = max(1, nrows // SAMPLE_ROWS)
    sample = np.empty(nrows // step + 1, np.int32)
    ns, skip = 0, 0
    for b in range(nb):  # every step-th row of the pool, counted across its ranges
        r = lo[b] + skip
        while r < hi[b]:
            sample[ns] = sd[base[b] + r]
            ns += 1
            r += step
        skip = r - hi[b]
    sample = sample[:ns]
    at = np.int64(np.ceil(ns * SAMPLE_MARGIN * want / nrows))
    keep_r = np.empty(nrows, np.int64)
    keep_b = np.empty(nrows, np.int64)
    keep_d = np.empty(nrows, np.int32)
    while True:  # the rows within the sampled limit, in pool order; widened until at least m
        limit = _sample_limit(sample, at) if at < ns else np.iinfo(np.int32).max
        c = _rows_within(sd, lo, hi, base, limit, keep_r, keep_b, keep_d)
        if c >= want:
            break
        at = 2 * at + 1
    low, high = keep_d[:c].min(), keep_d[:c].max()
    by_d = np.zeros(high - low + 1, np.int64)
    for j in range(c):
        by_d[keep_d[j] - low] += 1
    cut, below = 0, 0  # rows nearer than low + cut all go; of those at it, the first (want - below) in pool order
    while below + by_d[cut] < want:
        below += by_d[cut]
        cut += 1
    cut += low
    room = want - below
    n = 0
    for j in range(c):
        d = keep_d[j]
        if d < cut or (d == cut and room > 0):
            if d == cut:
                room -= 1
            out_p[n] = keep_r[j]
            out_d[n] = rdist[keep_b[j]]
            n += 1
    return n


@njit(cache=True)
def _candidates(ucodes, nu, w, sizes, bucket_cells, cells, centroids, signs, q, qf, centre, flips, shell,
                target, bits, out_p, out_d, parts):
    """Steps 1 and 2's sketch pass for one query: the buckets of the shells covering `shell` rows, cut by cells to
    about `target` rows (`_cell_ranges`), and of those the out_p.shape[0] nearest by sketch (`_sketch_pick`; a pool
    that fits takes no sketch pass, and no query sketch). The sketch pass runs in up to `parts` parallel pieces
    (one: all on the calling thread, as a batch's queries run)."""
    picked, pdist, nrows = _shell_picks(ucodes, nu, w, sizes, q, target, shell, max(1, target // CELL_SHARE), bits)
    lo, hi, rd, rows = _cell_ranges(qf, picked, pdist, nrows, bucket_cells, cells, centroids, target)
    if rows <= out_p.shape[0]:
        c = 0
        for b in range(lo.shape[0]):
            for r in range(lo[b], hi[b]):
                out_p[c] = r
                out_d[c] = rd[b]
                c += 1
        return c
    planes = query_levels(qf, centre, flips, signs.shape[1] * 64)
    return _sketch_pick(planes, signs, lo, hi, rd, out_p.shape[0], out_p, out_d, _pieces(parts, rows, GRAIN_ROWS))


@njit(parallel=True, cache=True)
def twostep_candidates(ucodes, nu, w, sizes, bucket_cells, cells, centroids, signs, qs, qf, centre, flips,
                       shell, target, bits, keep):
    """`_candidates` for each query of a batch (qs flattened (nq * w) code words, qf (nq, D) unit features).
    Returns positions into the cell order (nq, keep) and their code distances, both -1 padded, in pool order, and
    the count per query."""
    nq = qf.shape[0]
    out_p = np.full((nq, keep), -1, np.int64)
    out_d = np.full((nq, keep), -1, np.int64)
    counts = np.zeros(nq, np.int64)
    for i in prange(nq):
        counts[i] = _candidates(ucodes, nu, w, sizes, bucket_cells, cells, centroids, signs, qs[i * w:(i + 1) * w],
                                qf[i], centre, flips, shell, target, bits, out_p[i], out_d[i], 1)
    return out_p, out_d, counts


@njit(inline="always", cache=True, fastmath=FAST)
def _butterflies(src, dst, h):
    """One stage of the fast Walsh-Hadamard transform along axis 0 of src (P, B), B columns at once, into dst."""
    for i in range(0, src.shape[0], 2 * h):
        for j in range(i, i + h):
            for b in range(src.shape[1]):
                a = src[j, b]
                c = src[j + h, b]
                dst[j, b] = a + c
                dst[j + h, b] = a - c


@njit(inline="always", cache=True, fastmath=FAST)
def _butterflies_twice(src, dst, h):
    """Stages h and 2h of the transform in one pass (radix 4): each element read and written once for two stages,
    where the pass, not the additions, is what a stage costs."""
    for i in range(0, src.shape[0], 4 * h):
        for j in range(i, i + h):
            for b in range(src.shape[1]):
                a = src[j, b]
                c = src[j + h, b]
                e = src[j + 2 * h, b]
                g = src[j + 3 * h, b]
                dst[j, b] = (a + c) + (e + g)
                dst[j + h, b] = (a - c) + (e - g)
                dst[j + 2 * h, b] = (a + c) - (e + g)
                dst[j + 3 * h, b] = (a - c) - (e - g)


@njit(cache=True, fastmath=FAST)
def _hadamard(y, tmp):
    """y := H y along axis 0 (unnormalized Walsh-Hadamard; y (P, B), P a power of two), two stages a pass while two
    remain, the passes alternating between y and tmp."""
    h, passes = 1, 0
    while h < y.shape[0]:
        step = 4 if 4 * h <= y.shape[0] else 2
        src, dst = (tmp, y) if passes % 2 else (y, tmp)
        if step == 4:
            _butterflies_twice(src, dst, h)
        else:
            _butterflies(src, dst, h)
        h *= step
        passes += 1
    if passes % 2:
        y[:] = tmp


@njit(cache=True, fastmath=FAST)
def _sketch_block(f, lo, centre, flips, y, tmp, word, out):
    """The sketches of rows lo..lo + y.shape[1] - 1 of f (m, D) float32 into out (m, S / 64) uint64: bit j is the sign
    of coordinate j of the rotated centred feature, R(f - centre), where rotation r (of flips.shape[0], each giving
    P coordinates) is H F_k ... H F_1 (H the P-point Walsh-Hadamard transform, F_i the random signs flips[r, i],
    the feature zero-padded to P). Bits laid out as numpy's packbits of the bits read as little-endian words.

    A structured random rotation (as in fast Johnson-Lindenstrauss transforms): P log P additions per round
    instead of a D x S matrix product, transformed for the y.shape[1] rows side by side."""
    nb = y.shape[1]
    dim = f.shape[1]
    rotations, rounds, p = flips.shape
    bits = out.shape[1] * 64
    for r in range(rotations):
        for t in range(dim):
            for b in range(nb):
                y[t, b] = (f[lo + b, t] - centre[t]) * flips[r, 0, t]
        y[dim:] = 0
        for k in range(rounds):
            if k:
                for t in range(p):
                    for b in range(nb):
                        y[t, b] *= flips[r, k, t]
            _hadamard(y, tmp)
        for j0 in range(r * p, min(bits, (r + 1) * p), 64):  # one output word of every row at a time: lanes = rows
            word[:nb] = 0
            for j in range(j0, j0 + 64):
                shift = np.uint64(8 * ((j % 64) // 8) + 7 - j % 8)
                for b in range(nb):
                    word[b] |= np.uint64(y[j - r * p, b] > 0) << shift
            for b in range(nb):
                out[lo + b, j0 // 64] = word[b]


@njit(cache=True, fastmath=FAST)
def _sketch_blocks(f, lo, hi, centre, flips, out):
    """`_sketch_block` of the blocks of SKETCH_LANES rows lo..hi-1 of f (the last may be short), with scratch of
    their own."""
    p = flips.shape[2]
    y = np.empty((p, SKETCH_LANES), np.float32)
    tmp = np.empty((p, SKETCH_LANES), np.float32)
    word = np.empty(SKETCH_LANES, np.uint64)
    m = f.shape[0]
    for blk in range(lo, hi):
        r = blk * SKETCH_LANES
        if m - r >= SKETCH_LANES:
            _sketch_block(f, r, centre, flips, y, tmp, word, out)
        else:
            _sketch_block(f, r, centre, flips, y[:, :m - r], tmp[:, :m - r], word, out)


@njit(parallel=True, cache=True, fastmath=FAST)
def _parallel_sketches(f, centre, flips, pieces, out):
    """`_sketch_blocks` of every block of f in `pieces` parallel pieces."""
    for c in prange(pieces):
        lo, hi = _piece((f.shape[0] + SKETCH_LANES - 1) // SKETCH_LANES, pieces, c)
        _sketch_blocks(f, lo, hi, centre, flips, out)


@njit(cache=True, fastmath=FAST)
def sketch_rows(f, centre, flips, bits):
    """The sketches (`_sketch_block`) of every row of f (m, D) float32: (m, bits / 64) uint64, blocks of rows in
    parallel (SKETCH_PIECES pieces: a constant, as compiled code that asks for the thread count cannot be
    cached)."""
    out = np.zeros((f.shape[0], bits // 64), np.uint64)
    blocks = (f.shape[0] + SKETCH_LANES - 1) // SKETCH_LANES
    _parallel_sketches(f, centre, flips, max(1, min(SKETCH_PIECES, blocks)), out)
    return out


@intrinsic
def _hadamard_lanes(typingctx, v):
    """v := H v for one contiguous float32 vector (P,), P a power of two and a multiple of 16 (the unnormalized
    Walsh-Hadamard transform of `_hadamard`): the stages of stride below 16 inside each 16-lane vector by a shuffle,
    an add, a subtract and a select, the others between whole vectors. Numba's loops over one vector stayed scalar
    (stages commute: the same transform, rounded in another order)."""
    sig = types.void(v)
    lanes = 16

    def codegen(context, builder, signature, args):
        va = context.make_array(signature.args[0])(context, builder, args[0])
        vf = ir.VectorType(ir.FloatType(), lanes)
        n = builder.extract_value(va.shape, 0)
        one = ir.Constant(n.type, 1)
        chunks = builder.udiv(n, ir.Constant(n.type, lanes))
        base = builder.bitcast(va.data, vf.as_pointer())
        with cgutils.for_range(builder, chunks) as loop:
            at = builder.gep(base, [loop.index])
            x = builder.load(at, align=4)
            for h in (1, 2, 4, 8):  # lane j pairs with lane j ^ h: x_j + x_(j+h) where bit h of j is clear, else
                partner = builder.shuffle_vector(  # x_(j-h) - x_j
                    x, x, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [j ^ h for j in range(lanes)]))
                upper = ir.Constant(ir.VectorType(ir.IntType(1), lanes), [bool(j & h) for j in range(lanes)])
                x = builder.select(upper, builder.fsub(partner, x), builder.fadd(x, partner))
            builder.store(x, at, align=4)
        cttz = cgutils.get_or_insert_function(builder.module, ir.FunctionType(n.type, [n.type, ir.IntType(1)]),
                                              f"llvm.cttz.i{n.type.width}")
        with cgutils.for_range(builder, builder.call(cttz, [chunks, ir.Constant(ir.IntType(1), 0)])) as stage:
            h = builder.shl(one, stage.index)  # stride in vectors: pair t is vectors j and j + h
            with cgutils.for_range(builder, builder.lshr(chunks, one)) as pair:
                low = builder.and_(pair.index, builder.sub(h, one))
                j = builder.or_(builder.shl(builder.sub(pair.index, low), one), low)
                pa, pc = builder.gep(base, [j]), builder.gep(base, [builder.add(j, h)])
                a, c = builder.load(pa, align=4), builder.load(pc, align=4)
                builder.store(builder.fadd(a, c), pa, align=4)
                builder.store(builder.fsub(a, c), pc, align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, fastmath=FAST)
def query_levels(qf, centre, flips, bits):
    """The query's side of the sketch distance: its centred feature rotated as `sketch_rows` rotates the rows', each
    of the first `bits` coordinates y_j quantized to a level v_j = round(L / 2 + y_j L / (2 max|y|)) in 0..L
    (L = 2^QUERY_LEVEL_BITS - 1), as QUERY_LEVEL_BITS bit planes laid out as the rows' sketches: plane p holds bit p
    of every level: (QUERY_LEVEL_BITS, bits / 64) uint64.

    The rows keep one sign bit a coordinate, the query keeps its magnitudes (asymmetric, as RaBitQ and Qdrant's
    binary quantization query): sum_j |L s_j - v_j| ranks rows by the dot product of their signs with the rotated
    query, where the Hamming distance between two sign sketches needed about three times the re-scores for the same
    recall (RESULTS.md). One vector's own transform (`_hadamard_lanes`): `sketch_rows` on one row would leave its
    lanes idle."""
    dim = qf.shape[0]
    rotations, rounds, p = flips.shape
    y = np.zeros(rotations * p, np.float32)
    for r in range(rotations):
        v = y[r * p:(r + 1) * p]
        for t in range(dim):
            v[t] = (qf[t] - centre[t]) * flips[r, 0, t]
        for k in range(rounds):
            if k:
                for t in range(p):
                    v[t] *= flips[r, k, t]
            _hadamard_lanes(v)
    top = (1 << QUERY_LEVEL_BITS) - 1
    amax = np.float32(0.0)
    for j in range(bits):
        amax = max(amax, abs(y[j]))
    scale = np.float32(top / 2) / amax if amax > 0 else np.float32(0.0)
    levels = np.empty(bits, np.uint8)
    for j in range(bits):
        levels[j] = min(top, max(0, np.int32(np.floor(y[j] * scale + np.float32(top / 2) + np.float32(0.5)))))
    planes = np.zeros((QUERY_LEVEL_BITS, bits // 64), np.uint64)
    plane_bytes = planes.view(np.uint8)  # byte i of a plane holds levels 8i..8i+7, the first in its high bit
    for b in range(QUERY_LEVEL_BITS):
        for i in range(bits // 8):
            byte = np.uint8(0)
            for e in range(8):
                byte |= ((levels[8 * i + e] >> b) & 1) << (7 - e)
            plane_bytes[b, i] = byte
    return planes


@njit(cache=True, fastmath=FAST)
def twostep_one(ucodes, nu, w, sizes, bucket_cells, cells, centroids, signs, centre, flips, cell_rows, feats, scales,
                ids, code, features, shell, target, bits, rescore, k, parts):
    """Both steps of one query over a bucketed index in one call (the batch path's `twostep_candidates`,
    `cosine_rerank` and `take_hits`, without the Python between them): the pool by shells and cells, the `rescore`
    rows nearest by sketch, their exact cosine, the best k. The sketch pass and the exact re-score run in up to
    `parts` parallel pieces where they are long enough (`one_query_parts` picks `parts`); the result is the same.
    The index's arrays come first (as `HashIndex` keeps them at hand: the bucket layout, then the stored rows), the
    query last and as given: `code` its packed code (ceil(bits / 8),) uint8, `features` (D,) float32, normalized here
    as `unit_rows` does (the arrays and calls that prepared them in Python cost more than the shells).

    Returns (ids (1, k), code distances (1, k), scores (1, k) float32, counts (1,)), -1 / NaN padded; counts[0] is -1
    where the features hold NaN or infinity (nothing searched)."""
    out_p = np.full((1, k), -1, np.int64)
    out_s = np.full((1, k), np.nan, np.float32)
    qf = np.empty((1, features.shape[0]), np.float32)
    if not _unit_rows(features.reshape((1, features.shape[0])), qf, 0, 1):
        return out_p, out_p.copy(), out_s, np.full(1, -1, np.int64)
    q = np.zeros(w, np.uint64)
    for i in range(code.shape[0]):  # the little-endian words of `to_words`
        q[i // 8] |= np.uint64(code[i]) << np.uint64(8 * (i % 8))
    cand = np.empty(max(1, rescore), np.int64)
    cand_d = np.empty(max(1, rescore), np.int64)
    c = _candidates(ucodes, nu, w, sizes, bucket_cells, cells, centroids, signs, q, qf[0], centre, flips, shell,
                    target, bits, cand, cand_d, parts)
    rows = np.empty(c, np.int64)
    for j in range(c):
        rows[j] = cell_rows[cand[j]]
    scores = np.empty(c, np.float32)
    pieces = _pieces(parts, c, GRAIN_SCORES)
    if pieces > 1:
        _parallel_scores(qf[0], feats, scales, rows, c, pieces, scores)
    else:
        _score_rows(qf[0], feats, scales, rows, 0, c, scores)
    _keep_best(scores, k, out_p[0], out_s[0])
    out_i, out_d, counts = take_hits(out_p, rows.reshape(1, c), cand_d[:c].reshape(1, c), ids)
    return out_i, out_d, out_s, counts


@njit(cache=True)
def take_hits(pos, pool, pool_d, ids):
    """The re-ranked hits as ids and Hamming distances: pos (nq, k) positions into each query's pool (-1 padded,
    as `cosine_rerank` returns them), pool/pool_d (nq, P) its rows and distances, ids (N,) the row ids.

    Returns (ids (nq, k), distances (nq, k), counts (nq,)), -1 padded: one pass in place of a dozen numpy calls
    (~40 us of a 0.3 ms query)."""
    nq, k = pos.shape
    out_i = np.full((nq, k), -1, np.int64)
    out_d = np.full((nq, k), -1, np.int64)
    counts = np.zeros(nq, np.int64)
    for i in range(nq):
        for j in range(k):
            p = pos[i, j]
            if p >= 0:
                out_i[i, j] = ids[pool[i, p]]
                out_d[i, j] = pool_d[i, p]
                counts[i] += 1
    return out_i, out_d, counts


@intrinsic
def _half_bits(typingctx, x):
    """float32 x rounded to float16 (IEEE round to nearest even, as numpy's astype), as its uint16 bit pattern."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@njit(inline="always", cache=True, fastmath=FAST)
def _unit_half_rows(x, out, scales, lo, hi):
    """Rows lo..hi-1 of `unit_half_rows`; whether all their values were finite."""
    finite = True
    for i in range(lo, hi):
        s = np.float64(0.0)
        for t in range(x.shape[1]):
            s += np.float64(x[i, t]) * np.float64(x[i, t])
        finite &= np.isfinite(s)
        norm = np.float32(max(np.sqrt(s), 1e-12))
        r = np.float32(0.0)
        for t in range(x.shape[1]):
            h = _half_bits(x[i, t] / norm)
            out[i, t] = h
            v = _half_value(h)
            r += v * v
        scales[i] = np.float32(1.0) / np.sqrt(r) if r > 0 else np.float32(1.0)
    return finite


@njit(parallel=True, cache=True, fastmath=FAST)
def _parallel_unit_half_rows(x, out, scales, parts, finite):
    for c in prange(parts):
        lo, hi = _piece(x.shape[0], parts, c)
        finite[c] = _unit_half_rows(x, out, scales, lo, hi)


@njit(cache=True, fastmath=FAST)
def unit_half_rows(x):
    """What an index stores of float32 feature rows x (n, D) kept as float16: each row L2-normalized (`unit_rows`;
    a zero row stays zero) and rounded to float16 (IEEE round to nearest even, as numpy's astype; LLVM's conversion
    on vectors, vcvtps2ph where x86 has F16C, fcvtn on Arm, where numpy converts a value at a time), as bit patterns
    (uint16), with 1 / its rounded norm (its row scale, `half_row_scales`), and whether every value was finite. One
    pass where normalizing, rounding and measuring took three; many rows in parallel pieces."""
    out = np.empty(x.shape, np.uint16)
    scales = np.empty(x.shape[0], np.float32)
    parts = _pieces(PARTS, x.shape[0], GRAIN_CONVERT)
    if parts == 1:
        return out, scales, _unit_half_rows(x, out, scales, 0, x.shape[0])
    finite = np.ones(parts, np.bool_)
    _parallel_unit_half_rows(x, out, scales, parts, finite)
    return out, scales, bool(finite.all())


@intrinsic
def _half_value(typingctx, h):
    """The float32 value of float16 bit pattern h (uint16): exact."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@njit(inline="always", cache=True)
def _half_gather_rows(bits, rows, out, lo, hi):
    for i in range(lo, hi):
        r = rows[i]
        for t in range(bits.shape[1]):
            out[i, t] = _half_value(bits[r, t])


@njit(parallel=True, cache=True)
def _parallel_half_gather(bits, rows, out, parts):
    for c in prange(parts):
        lo, hi = _piece(rows.shape[0], parts, c)
        _half_gather_rows(bits, rows, out, lo, hi)


@njit(cache=True)
def half_gather(bits, rows):
    """Rows `rows` of float16 features stored as their bit patterns (N, D) uint16, as float32 (len(rows), D):
    one vectorised conversion, where numpy takes several passes (numpy_search.float_rows); many rows in parallel
    pieces (the bucket build gathers every row)."""
    out = np.empty((rows.shape[0], bits.shape[1]), np.float32)
    parts = _pieces(PARTS, rows.shape[0], GRAIN_CONVERT)
    if parts > 1:
        _parallel_half_gather(bits, rows, out, parts)
    else:
        _half_gather_rows(bits, rows, out, 0, rows.shape[0])
    return out


@njit(cache=True, fastmath=FAST)
def half_row_scales(bits):
    """1 / the norm of each float16 row (N, D) given as bit patterns (uint16), 1 for a zero row: the rows' scales
    (index._row_scales) in one vectorised pass, where numpy converts float16 a value at a time."""
    out = np.ones(bits.shape[0], np.float32)
    for i in range(bits.shape[0]):
        s = np.float32(0.0)
        for t in range(bits.shape[1]):
            v = _half_value(bits[i, t])
            s += v * v
        if s > 0:
            out[i] = np.float32(1.0) / np.sqrt(s)
    return out


@njit(cache=True, nogil=True)
def segment_sums(x, first):
    """Column sums of the row segments of x (m, D) float32 that start at `first` (ascending, first[0] == 0; the
    last runs to the end): (len(first), D) float32, where numpy's add.reduceat along rows is several times slower. It
    releases the GIL: the bucket build's k-means call it from several threads."""
    out = np.zeros((first.shape[0], x.shape[1]), np.float32)
    for g in range(first.shape[0]):
        end = first[g + 1] if g + 1 < first.shape[0] else x.shape[0]
        for r in range(first[g], end):
            for t in range(x.shape[1]):
                out[g, t] += x[r, t]
    return out


@njit(inline="always", cache=True, fastmath=FAST)
def _unit_rows(x, out, lo, hi):
    finite = True
    for i in range(lo, hi):
        s = np.float64(0.0)
        for t in range(x.shape[1]):
            s += np.float64(x[i, t]) * np.float64(x[i, t])
        finite &= np.isfinite(s)
        norm = np.float32(max(np.sqrt(s), 1e-12))
        for t in range(x.shape[1]):
            out[i, t] = x[i, t] / norm
    return finite


@njit(parallel=True, cache=True, fastmath=FAST)
def _parallel_unit_rows(x, out, parts, finite):
    for c in prange(parts):
        lo, hi = _piece(x.shape[0], parts, c)
        finite[c] = _unit_rows(x, out, lo, hi)


@njit(cache=True, fastmath=FAST)
def unit_rows(x):
    """Row-wise L2 normalization of float32 (n, d) (zero rows stay zero) and whether every value was finite; many
    rows in parallel pieces (one query's row on the calling thread).

    The squares are summed in float64, where no float32 value overflows, so a row's sum is finite exactly when all
    its values are: one vectorised pass per row checks and measures it."""
    out = np.empty_like(x)
    parts = _pieces(PARTS, x.shape[0], GRAIN_CONVERT)
    if parts == 1:
        return out, _unit_rows(x, out, 0, x.shape[0])
    finite = np.ones(parts, np.bool_)
    _parallel_unit_rows(x, out, parts, finite)
    return out, bool(finite.all())


def rerank_args(features: np.ndarray, scales: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(features, scales) in the form `cosine_rerank` takes for any storage dtype."""
    if scales is None:
        scales = NO_SCALES
    return (features.view(np.uint16) if features.dtype == np.float16 else features), scales


@njit(parallel=True, cache=True)
def hamming_ranking_stats(qwords, dbwords, qmask, dmask, ks, topk, bits):
    """Exact retrieval statistics of the Hamming ranking (ties by database order) for every query, in O(N) each.

    Returns (AP over all, AP@topk, relevant hits at each k (nq, len(ks)), relevant per distance (nq, bits + 1),
    items per distance (nq, bits + 1))."""
    nq, w = qwords.shape
    n = dbwords.shape[0]
    lw = qmask.shape[1]
    ap_all = np.zeros(nq)
    ap_k = np.zeros(nq)
    hits = np.zeros((nq, ks.shape[0]), np.int64)
    rel_d = np.zeros((nq, bits + 1), np.int64)
    tot_d = np.zeros((nq, bits + 1), np.int64)
    flat = dbwords.ravel()
    for i in prange(nq):
        dist = np.empty(n, np.int64)
        rel = np.zeros(n, np.bool_)
        _distances(flat, 0, n, qwords[i], w, dist)
        for j in range(n):
            r = False
            for t in range(lw):
                if qmask[i, t] & dmask[j, t]:
                    r = True
            rel[j] = r
            tot_d[i, dist[j]] += 1
            if r:
                rel_d[i, dist[j]] += 1
        start = np.zeros(bits + 1, np.int64)
        rel_before = np.zeros(bits + 1, np.int64)
        for d in range(1, bits + 1):
            start[d] = start[d - 1] + tot_d[i, d - 1]
            rel_before[d] = rel_before[d - 1] + rel_d[i, d - 1]
        n_rel = rel_before[bits] + rel_d[i, bits]
        sum_all, sum_k, n_rel_k = 0.0, 0.0, 0
        for j in range(n):
            d = dist[j]
            pos = start[d]
            start[d] += 1
            if rel[j]:
                rel_before[d] += 1
                p = rel_before[d] / (pos + 1.0)
                sum_all += p
                if pos < topk:
                    sum_k += p
                    n_rel_k += 1
                for t in range(ks.shape[0]):
                    if pos < ks[t]:
                        hits[i, t] += 1
        ap_all[i] = sum_all / n_rel if n_rel > 0 else 0.0
        ap_k[i] = sum_k / n_rel_k if n_rel_k > 0 else 0.0
    return ap_all, ap_k, hits, rel_d, tot_d


@njit(parallel=True, cache=True)
def code_pairs(ucodes, nu, w, radius):
    """Every pair (u, v), u < v, of the nu distinct codes (flattened (nu, W) uint64) within Hamming `radius`, sorted
    by u then v: (first, second) int64 arrays. One popcount pass per pair, in parallel over u."""
    counts = np.zeros(nu + 1, np.int64)
    for u in prange(nu):
        c = 0
        for v in range(u + 1, nu):
            d = 0
            for t in range(w):
                d += popcount64(ucodes[u * w + t] ^ ucodes[v * w + t])
            c += d <= radius
        counts[u + 1] = c
    for u in range(nu):
        counts[u + 1] += counts[u]
    first = np.empty(counts[nu], np.int64)
    second = np.empty(counts[nu], np.int64)
    for u in prange(nu):
        c = counts[u]
        for v in range(u + 1, nu):
            d = 0
            for t in range(w):
                d += popcount64(ucodes[u * w + t] ^ ucodes[v * w + t])
            if d <= radius:
                first[c] = u
                second[c] = v
                c += 1
    return first, second


@njit(cache=True)
def components(n, a, b):
    """Connected components of the graph on n nodes with edges (a[i], b[i]): each node's label is the smallest node
    of its component (union-find with path halving)."""
    parent = np.arange(n)
    for i in range(a.shape[0]):
        x, y = a[i], b[i]
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        while parent[y] != y:
            parent[y] = parent[parent[y]]
            y = parent[y]
        if x < y:
            parent[y] = x
        elif y < x:
            parent[x] = y
    for i in range(n):  # roots are their component's smallest node; point every node at its root
        parent[i] = parent[parent[i]]
    return parent


@njit(parallel=True, cache=True)
def _empty_launch(x):
    """A parallel loop that does nothing worth timing but its launch (`launch_cost`)."""
    for c in prange(x.shape[0]):
        x[c] = c


_LAUNCH = threading.Lock()
_layer: list[str] = []  # the threading layer Numba chose, once a parallel kernel has run


def _unsafe_layer() -> bool:
    """Whether parallel launches must be serialized: Numba's workqueue layer (what an install without TBB or
    OpenMP gets, as on aarch64 here) aborts the whole process when two threads launch at once; tbb and omp are
    threadsafe. Before the first launch the layer is unknown: serialize."""
    if not _layer:
        try:
            _layer.append(numba.threading_layer())
        except ValueError:
            return True
    return _layer[0] == "workqueue"


def _one_launch_at_a_time(kernel):
    """`kernel`, called under a process-wide lock where the threading layer is not threadsafe (a server's threads
    and a background warmup do launch at once); each kernel uses every core, so little is lost."""

    @functools.wraps(kernel)
    def call(*args):
        if _unsafe_layer():
            with _LAUNCH:
                return kernel(*args)
        return kernel(*args)

    return call


# the entry points that launch parallel regions (compiled code calls them by other names: these can be rebound)
for _name in ("_empty_launch", "topk_single", "topk_one", "topk_batch", "topk_buckets", "radius_counts",
              "radius_search", "cosine_rerank", "twostep_candidates", "twostep_one", "sketch_rows",
              "hamming_ranking_stats", "code_pairs"):
    globals()[_name] = _one_launch_at_a_time(globals()[_name])


def set_threads(n: int) -> None:
    """Numba's thread count for the kernels on the calling thread (at most the number it started with); use this,
    not numba.set_num_threads, which `one_query_parts` would not see."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]
    _launches.__dict__.pop("parts", None)


def threads() -> int:
    return numba.get_num_threads()


_launches = threading.local()


def launch_cost() -> float:
    """Seconds one parallel launch costs when made from the calling thread, measured once per thread (the fastest
    of a few empty launches). It differs by thread, not only by threading layer: on the omp layer a launch from the
    main thread reuses spinning workers, one from any other thread (a server's request threads) costs tens of times
    more; the workqueue layer is slow from every thread (RESULTS.md has the figures)."""
    cost = getattr(_launches, "cost", None)
    if cost is None:
        x = np.zeros(2)
        _empty_launch(x)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            _empty_launch(x)
            best = min(best, time.perf_counter() - t0)
        cost = _launches.cost = best
    return cost


def one_query_parts() -> int:
    """Threads one query's two-step (`twostep_one`) splits its passes over: all of them where a launch from this
    thread is cheap (CHEAP_LAUNCH), else one: its two or three launches would cost more than they save. Kept per
    thread until `set_threads` (asking Numba for its thread count costs a microsecond a query)."""
    parts = getattr(_launches, "parts", None)
    if parts is None:
        n = threads()
        parts = _launches.parts = n if n > 1 and launch_cost() <= CHEAP_LAUNCH else 1
    return parts


def single_chunks(n: int) -> int:
    """Parts of one query's first pass over n codes: one per 65,536 codes, at most one per thread (below that a
    parallel launch costs more than it saves). In Python: compiled code that asks Numba for its thread count cannot
    be cached."""
    return max(1, min(numba.get_num_threads(), n // 65536 + 1))
