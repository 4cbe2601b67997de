"""IVF search turned inside out for knn's self-join: each inverted list is scored against all
the queries of a block that probe it, with one matrix product.

faiss's CPU IVF search takes the queries one at a time and scans each probed list's codes in a
scalar loop. knn's queries are the stored rows themselves, 262,144 per block, so every list
is probed by about 1,400 of a block's queries. Grouping the block's (query, list)
pairs by list turns the scan into one BLAS product per list. The lists are an ivf-sq16
index's (ann.build_lists: spherical k-means centroids, each row in its nearest one's list);
the probes are the nprobe nearest centroids, as faiss's flat quantizer picks them up to bf16
rounding (`centroid_dtype`); the scores are fp32 products of the stored fp16 rows (faiss
scores its fp16 residual codes, which differ by rounding). On 1M derived vectors this
searches the same lists 4-6x faster than faiss's IVF search (benchmarks/results/knn.txt).

A query probes either its nprobe nearest lists (as faiss does) or, with `probe_gap` set, the
lists whose centroids score within that gap of its nearest one's, at least PROBE_MIN and at
most PROBE_CAP of them (SPANN's query-aware pruning): queries near many lists probe more of
them, queries deep inside one fewer. tune_nprobe sets the gap at which the sample probes
nprobe lists on average (`probe_gap_for`). On 1M derived vectors the same recall then takes
about a fifth fewer rows scanned than a fixed nprobe (benchmarks/results/graph_choices.txt).

Each query keeps its best k in a heap (kernels.offer, compiled): every score of a list's
product is offered to its query's heap, and only those beating the heap's worst go in. The
query's nearest list is scanned first, so the heap fills with good candidates and the bar is
high for the rest.

`ListScan` searches like a faiss index (`nprobe`, `nlist`, `ntotal`, `search`), so ann.search
and the nprobe tuning use it unchanged. It holds the centroids, the row ids grouped by list
and the fp16 rows in that order: the store's size, not the index's as well. knn's builds and
updates search it both ways (symmetric_scan.py): each list product offered to the list's
rows as well as to its queries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from graphbuild.cpu import has_native_bf16
from graphbuild.graph.kernels import empty_heaps, offer, probe_lists, sort_heaps, threads_as_torch
from graphbuild.graph.kmeans import nearest

# Queries searched together: ~1,400 a list at nlist 2,000 and 11 lists a query. Larger blocks
# make larger products and fewer passes over the lists (graph_choices.txt). The block's
# queries take 200 MB (fp16, as knn passes them), the heaps 70 MB.
QUERY_STEP = 262144
NORM_STEP = 16384  # rows whose norms ListScan.max_norm takes at a time


# Adaptive probing's bounds: among minima 1-6 and caps 24-32, the pair that reached recall 0.95
# over the fewest rows in a simulation on 1M derived vectors (graph_choices.txt).
PROBE_MIN, PROBE_CAP = 4, 32
SCORES = 2**24  # centroid scores computed at once: 8,388 queries at 2,000 lists


def centroid_scores(x: torch.Tensor, centroids: torch.Tensor):
    """Slices of the rows' products with the centroids, in `centroid_dtype()`: (first row,
    scores of rows first, first + 1, ...)."""
    dtype = centroid_dtype()
    step = max(1, SCORES // len(centroids))
    c = centroids.to(dtype).T
    for lo in range(0, len(x), step):
        yield lo, x[lo:lo + step].to(dtype) @ c


def probes(scores: torch.Tensor, nprobe: int, gap: float | None,
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(each row's nearest list, then the row and list of each of its other probes) for a
    slice of centroid scores: the nprobe best lists, or with `gap` those within it of the
    best, at least PROBE_MIN and at most PROBE_CAP of them."""
    if gap is None:
        best = scores.topk(min(nprobe, scores.shape[1]), dim=1).indices.numpy()
        rows = np.repeat(np.arange(len(best)), best.shape[1] - 1)
        return best[:, 0], rows, best[:, 1:].reshape(-1)
    home, _, others = probe_lists(*kernel_view(scores), gap, PROBE_MIN, PROBE_CAP)
    rows, slots = np.nonzero(others >= 0)
    return home, rows, others[rows, slots].astype(np.int64)


def probe_counts(scores: torch.Tensor, gap: float) -> np.ndarray:
    """Lists each row probes with `gap` (as `probes` picks them)."""
    return probe_lists(*kernel_view(scores), gap, PROBE_MIN, PROBE_CAP)[1]


def kernel_view(scores: torch.Tensor) -> tuple[np.ndarray, bool]:
    """Scores as the kernels take them (probe_lists, top_lists, first_max): bf16 as its
    uint16 bits, anything else as fp32's int32 bits."""
    if scores.dtype == torch.bfloat16:
        return scores.view(torch.int16).numpy().view(np.uint16), True
    return scores.float().numpy().view(np.int32), False


def probe_gap_for(xq: np.ndarray, centroids: torch.Tensor, nprobe: int) -> float | None:
    """The gap at which the queries xq probe nprobe lists on average (the smallest, to
    1e-5); None where the bounds leave no room for one (nprobe outside (PROBE_MIN,
    PROBE_CAP), or too few lists): search those with fixed nprobe."""
    if not PROBE_MIN < nprobe < min(PROBE_CAP, len(centroids)):
        return None
    scores = torch.cat([s for _, s in centroid_scores(torch.from_numpy(xq), centroids)])
    low, high = 0.0, 2.0 * float(torch.linalg.vector_norm(centroids, dim=1).max()) * float(
        np.linalg.norm(xq, axis=1).max())
    while high - low > 1e-5:
        mid = (low + high) / 2
        low, high = ((low, mid) if probe_counts(scores, mid).mean() >= nprobe
                     else (mid, high))
    return high


def nearest_list(x: torch.Tensor, centroids: torch.Tensor) -> np.ndarray:
    """Each row's list: its largest inner product with the centroids, in `centroid_dtype()`.
    In bf16 a few rows pick a list whose centroid scores within bf16 rounding of their fp32
    nearest one's, which probes reach as well (graph_choices.txt). Any assignment gives a
    valid index; this one is the build's."""
    return nearest(x.to(centroid_dtype()), centroids).numpy()


def centroid_dtype() -> torch.dtype:
    """Lists and probes are picked by centroid products in bf16 where the CPU multiplies bf16
    in hardware: in half the time of fp32 and at the same recall, since the choice is
    approximate either way (graph_choices.txt)."""
    return torch.bfloat16 if has_native_bf16() else torch.float32


def lists_of(index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids (nlist, d) float32, offsets (nlist + 1,), ids grouped by list) of an index."""
    from graphbuild.graph.faiss_loader import load_faiss

    faiss = load_faiss()
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    ids = np.empty(offsets[-1], np.int64)
    for i in np.flatnonzero(sizes):
        ptr = invlists.get_ids(int(i))
        ids[offsets[i]:offsets[i + 1]] = faiss.rev_swig_ptr(ptr, int(sizes[i]))
        invlists.release_ids(int(i), ptr)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist), offsets, ids


def save_lists(path: Path, lists: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """(centroids, offsets, ids) to an .npz file (written through a file object: np.savez
    would add a suffix to a temp path)."""
    centroids, offsets, ids = lists
    with open(path, "wb") as f:
        np.savez(f, centroids=centroids, offsets=offsets, ids=ids)


def load_lists(path: Path, n: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Lists saved by save_lists, if they read back whole and fit a store of n rows of d
    dims; None otherwise (a cache to rebuild, not an error)."""
    try:
        with np.load(path) as f:
            centroids, offsets, ids = f["centroids"], f["offsets"], f["ids"]
    except (OSError, ValueError, KeyError):
        return None
    fits = (centroids.ndim == 2 and centroids.shape[1] == d and len(offsets) == len(centroids) + 1
            and offsets[0] == 0 and offsets[-1] == n == len(ids) and (np.diff(offsets) >= 0).all()
            and np.array_equal(np.sort(ids), np.arange(n)))
    return (centroids, offsets, ids) if fits else None


class ListScan:
    """Searches a store's rows by list: `from_lists(*ann.build_lists(arr, ...), arr, ...)`."""

    def __init__(self, centroids: np.ndarray, offsets: np.ndarray, ids: np.ndarray,
                 rows: np.ndarray):
        self.nlist = len(centroids)
        self.ntotal = len(ids)
        self.nprobe = 1
        self.probe_gap: float | None = None  # adaptive probing's gap (module docstring)
        self.centroids = torch.from_numpy(np.ascontiguousarray(centroids, np.float32))
        self.offsets = offsets
        # int32 ids: half the bytes of the lists and of the search's heaps
        self.ids = ids.astype(np.int32 if len(ids) < 2**31 else np.int64)
        self.rows = torch.from_numpy(rows)  # fp16, in list order
        self._max_norm: float | None = None

    def max_norm(self) -> float:
        """The largest norm of a row (fp32 norms, rounded up), found once, in blocks of
        NORM_STEP rows (torch converts a block to fp32 whole: 0.4 GiB more at the search's
        peak for 262,144 rows)."""
        if self._max_norm is None:
            top = max((float(torch.linalg.vector_norm(self.rows[lo:lo + NORM_STEP], dim=1,
                                                      dtype=torch.float32).max())
                       for lo in range(0, self.ntotal, NORM_STEP)), default=0.0)
            self._max_norm = top * (1 + 1e-5)  # covers the fp32 norm's own rounding
        return self._max_norm

    @classmethod
    def from_lists(cls, centroids: np.ndarray, offsets: np.ndarray, ids: np.ndarray, arr,
                   block_rows: int) -> ListScan:
        """Lists (from `lists_of`) over the rows of `arr` (the store's reader or numpy, fp16),
        read block by block into list order."""
        n, d = arr.shape
        position = np.empty(n, np.int64)
        position[ids] = np.arange(n)
        rows = np.empty((n, d), np.float16)
        for lo in range(0, n, block_rows):
            block = np.asarray(arr[lo:lo + block_rows], np.float16)
            rows[position[lo:lo + len(block)]] = block
        return cls(centroids, offsets, ids, rows)

    def in_store_order(self) -> StoreOrder:
        """The rows as the store's slices would give them (for tuning's exact search),
        gathered from memory: no second copy, no decoding of the store."""
        return StoreOrder(self)

    def search(self, xq: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """Like faiss's Index.search: (sims, ids), each (len(xq), kk), best first; slots
        without a row hold -inf and -1. xq: fp32, or fp16 as stored (half the memory)."""
        xq = np.ascontiguousarray(xq, np.float16 if xq.dtype == np.float16 else np.float32)
        nprobe = min(self.nprobe, self.nlist)
        threads_as_torch()
        parts = [self._search(xq[lo:lo + QUERY_STEP], kk, nprobe)
                 for lo in range(0, len(xq), QUERY_STEP)]
        if not parts:
            return np.empty((0, kk), np.float32), np.empty((0, kk), np.int64)
        return np.concatenate([s for s, _ in parts]), np.concatenate([i for _, i in parts])

    def _search(self, xq: np.ndarray, kk: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """One block of queries: each query's nearest list first (its heap fills, and sets
        a high bar early), then the others."""
        m = len(xq)
        queries = torch.from_numpy(xq)
        home, pair_q, pair_l = self._probes(queries, nprobe)
        best_s, best_i = empty_heaps(m, kk, self.ids.dtype)
        for probed in ((np.arange(m), home), (pair_q, pair_l)):
            for q, rows, ids in self._by_list(*probed):
                offer((queries.index_select(0, q).float() @ rows.T).numpy(), q.numpy(), ids,
                      best_s, best_i)
        sort_heaps(best_s, best_i)
        return best_s, best_i

    def _probes(self, queries: torch.Tensor, nprobe: int):
        """`probes` of every query: (nearest lists, query numbers and lists of the others)."""
        home, pair_q, pair_l = [], [], []
        for lo, scores in centroid_scores(queries, self.centroids):
            h, q, lists = probes(scores, nprobe, self.probe_gap)
            home.append(h)
            pair_q.append(q + lo)
            pair_l.append(lists)
        return np.concatenate(home), np.concatenate(pair_q), np.concatenate(pair_l)

    def _by_list(self, pair_q: np.ndarray, pair_l: np.ndarray):
        """(queries probing it, its fp32 rows, its ids (numpy)) for each probed, non-empty list, from
        (query, list) pairs."""
        order = np.argsort(pair_l, kind="stable")
        bounds = np.searchsorted(pair_l[order], np.arange(self.nlist + 1))
        for lst in np.flatnonzero(bounds[1:] > bounds[:-1]):
            lo, hi = self.offsets[lst], self.offsets[lst + 1]
            if lo < hi:
                q = torch.from_numpy(pair_q[order[bounds[lst]:bounds[lst + 1]]].astype(np.int32))
                yield q, self.rows[lo:hi].float(), self.ids[lo:hi]


class StoreOrder:
    """A ListScan's rows by store row number: `view[lo:hi]` and `view[ids]` are the store's
    `arr[lo:hi]` and `arr[ids]`."""

    def __init__(self, scan: ListScan):
        self.scan = scan
        self.shape = tuple(scan.rows.shape)
        self.position = torch.empty(scan.ntotal, dtype=torch.int64)
        self.position[torch.from_numpy(scan.ids)] = torch.arange(scan.ntotal)

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        return self.scan.rows.index_select(0, self.position[rows]).numpy()
