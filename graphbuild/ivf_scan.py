"""IVF search turned inside out for knn's self-join: each inverted list is scored against all
the queries of a block that probe it, with one matrix product.

faiss's CPU IVF search takes the queries one at a time and scans each probed list's codes in a
scalar loop. knn's queries are the stored rows themselves, tens of thousands per block, so
every list is probed by hundreds of a block's queries. Grouping the block's (query, list)
pairs by list turns the scan into one BLAS product per list. The lists are an ivf-sq16
index's (ann.build_lists: faiss's k-means centroids, each row in its nearest one's list);
the probes are the nprobe nearest centroids, as faiss's flat quantizer picks them up to bf16
rounding (`centroid_dtype`); the scores are fp32 products of the stored fp16 rows (faiss
scores its fp16 residual codes, which differ by rounding). On 1M derived vectors this
searched 4.1-4.3x faster than faiss's IVF search of the same lists (benchmarks/knn.py).

Each query's top k is found in two passes: its nearest list gives k candidates and so a
threshold (the k-th score); the other probed lists then pass on only the scores reaching it,
so no top-k runs over their score matrices, and one sort merges the survivors.

`ListScan` searches like a faiss index (`nprobe`, `nlist`, `ntotal`, `search`), so ann.search
and the nprobe tuning use it unchanged. It holds the centroids, the row ids grouped by list and
the fp16 rows in that order: the store's size, not the index's as well.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from graphbuild.hits import best_per_row
from graphbuild.memory import return_freed_memory

# Queries searched together: ~430 a list at nlist 2,000, nprobe 13. Twice 32,768 searched
# 1.24x faster (larger products, fewer passes); the block's hits then take ~0.5 GB to sort.
QUERY_STEP = 65536


def nearest_centroids(x: torch.Tensor, centroids: torch.Tensor, nprobe: int,
                      scores: int = 2**24, dtype=torch.float32) -> np.ndarray:
    """Each row's nprobe largest inner products with the centroids, largest first (what
    faiss's flat quantizer picks), in slices of rows holding about `scores` scores, computed
    in `dtype`."""
    step = max(1, scores // len(centroids))
    c = centroids.to(dtype).T
    return np.concatenate([(x[lo:lo + step].to(dtype) @ c).topk(nprobe, dim=1).indices.numpy()
                           for lo in range(0, len(x), step)])


def nearest_list(x: torch.Tensor, centroids: torch.Tensor) -> np.ndarray:
    """Each row's list: its largest inner product with the centroids, in `centroid_dtype()`
    (2.7x faster in bf16 here): 99.2% of 1M derived rows then pick the same list as in fp32,
    the rest one whose centroid scores within bf16 rounding of it, which probes reach as well.
    Any assignment gives a valid index; this one is the build's."""
    return nearest_centroids(x, centroids, 1, dtype=centroid_dtype())[:, 0]


@functools.cache
def bf16_in_hardware() -> bool:
    """AVX-512 BF16 or AMX: without them torch's bf16 products are no faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def centroid_dtype() -> torch.dtype:
    """Lists and probes are picked by centroid products in bf16 where the CPU multiplies bf16
    in hardware. The choice is approximate either way: at 1M, nprobe 13 gave recall 0.9505
    with bf16 probes and 0.9506 with fp32 ones, in half the time (0.52 s against 1.09 s a
    65,536-query block)."""
    return torch.bfloat16 if bf16_in_hardware() else torch.float32


def lists_of(index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids (nlist, d) float32, offsets (nlist + 1,), ids grouped by list) of an index."""
    from graphbuild.faiss_loader import load_faiss

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
        self.centroids = torch.from_numpy(np.ascontiguousarray(centroids, np.float32))
        self.offsets = offsets
        # int32 ids and query numbers: hits of a block of queries hold 12 bytes, not 20
        self.ids = torch.from_numpy(ids.astype(np.int32 if len(ids) < 2**31 else np.int64))
        self.rows = torch.from_numpy(rows)  # fp16, in list order

    @classmethod
    def from_lists(cls, centroids: np.ndarray, offsets: np.ndarray, ids: np.ndarray, arr,
                   block_rows: int) -> ListScan:
        """Lists (from `lists_of`) over the rows of `arr` (zarr or numpy, fp16), read block by
        block into list order."""
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
        without a row hold -inf and -1."""
        xq = np.ascontiguousarray(xq, np.float32)
        nprobe = min(self.nprobe, self.nlist)
        parts = [self._search(xq[lo:lo + QUERY_STEP], kk, nprobe)
                 for lo in range(0, len(xq), QUERY_STEP)]
        if not parts:
            return np.empty((0, kk), np.float32), np.empty((0, kk), np.int64)
        return np.concatenate([s for s, _ in parts]), np.concatenate([i for _, i in parts])

    def _search(self, xq: np.ndarray, kk: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """The two passes of the module docstring, for one block of queries."""
        m = len(xq)
        queries = torch.from_numpy(xq)
        probes = nearest_centroids(queries, self.centroids, nprobe, dtype=centroid_dtype())
        best_s = torch.full((m, kk), float("-inf"))
        best_i = torch.full((m, kk), -1, dtype=self.ids.dtype)
        for q, rows, ids in self._by_list(probes[:, :1], queries):
            s, j = (queries.index_select(0, q) @ rows.T).topk(min(kk, len(ids)), dim=1)
            best_s[q, :s.shape[1]] = s
            best_i[q, :s.shape[1]] = ids[j]
        thr = best_s[:, kk - 1].numpy()  # -inf while the nearest list held fewer than kk rows
        hit_q = [torch.arange(m, dtype=torch.int32).repeat_interleave(kk)]
        hit_s, hit_i = [best_s.view(-1)], [best_i.view(-1)]
        for q, rows, ids in self._by_list(probes[:, 1:], queries):
            s = queries.index_select(0, q) @ rows.T
            # numpy's compare and flatnonzero: 2.4x torch's on a 430 x 700 block; flat
            # positions and index_select: faster than 2-d positions and fancy indexing
            f = torch.from_numpy(np.flatnonzero(s.numpy() >= thr[q.numpy(), None]))
            hit_q.append(q.index_select(0, f // s.shape[1]))
            hit_s.append(s.view(-1).index_select(0, f))
            hit_i.append(ids.index_select(0, f % s.shape[1]))
        hits = [torch.cat(h) for h in (hit_q, hit_s, hit_i)]
        hit_q = hit_s = hit_i = None  # free the pieces (and trim) before the sort's buffers
        return_freed_memory()
        best_s, best_i = best_per_row(m, kk, *hits)
        return best_s.numpy(), best_i.numpy()

    def _by_list(self, probes: np.ndarray, queries: torch.Tensor):
        """(queries probing it, its fp32 rows, its ids) for each probed, non-empty list."""
        pairs = probes.reshape(-1)
        order = np.argsort(pairs, kind="stable")
        bounds = np.searchsorted(pairs[order], np.arange(self.nlist + 1))
        for lst in np.flatnonzero(bounds[1:] > bounds[:-1]):
            lo, hi = self.offsets[lst], self.offsets[lst + 1]
            if lo < hi:
                q = torch.from_numpy(
                    (order[bounds[lst]:bounds[lst + 1]] // probes.shape[1]).astype(np.int32))
                yield q, self.rows[lo:hi].float(), self.ids[lo:hi]


class StoreOrder:
    """A ListScan's rows by store row number: `view[lo:hi]` is the store's `arr[lo:hi]`."""

    def __init__(self, scan: ListScan):
        self.scan = scan
        self.shape = tuple(scan.rows.shape)
        self.position = torch.empty(scan.ntotal, dtype=torch.int64)
        self.position[scan.ids] = torch.arange(scan.ntotal)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.scan.rows.index_select(0, self.position[rows]).numpy()
