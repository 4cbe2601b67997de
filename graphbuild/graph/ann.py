"""Approximate top-k by a faiss inverted-file index, with nprobe tuned to a recall target.

Index choice (`index_kind`): the stored vectors are fp16, so an IVF index with fp16 scalar
codes ("ivf-sq16") holds them losslessly in N*d*2 bytes, half of IVF-Flat's fp32 copy, and
scores them as IVF-Flat would (decoded to fp32). When even that exceeds the memory budget,
IVF-PQ stores d/4 one-byte codes per vector (8x smaller again) and its sims are the codes'
estimates, not exact dot products.

The index is trained on a seeded sample of rows and every row is added in order, so it is a
function of the store alone; knn builds it once under the run lock and saves it for the
other shards. On a CPU an ivf-sq16 index is saved as its lists alone (`build_lists`): the
search reads the rows from the store (ivf_scan.ListScan), so fp16 codes would only copy the
store. nprobe is tuned on a seeded sample of queries against exact search: the
smallest of 1, 2, 4, ..., nlist whose recall@k reaches the target.

Vectors come from `arr[lo:hi]` slices, one block at a time, and `arr[ids]` gathers of sampled
rows: `arr` is the store's reader (rundir.store.StoredRows), a ListScan's rows in store
order, or a numpy array.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from graphbuild.cpu import has_native_bf16
from graphbuild.graph.hits import descending_bits
from graphbuild.graph.ivf_scan import centroid_dtype, nearest_list, probe_gap_for
from graphbuild.graph.kernels import empty_heaps, offer, sort_heaps, threads_as_torch
from graphbuild.graph.kmeans import spherical_kmeans

log = logging.getLogger(__name__)

TRAIN_PER_LIST = 40   # training points per inverted list (faiss warns below 39)
# build_lists' k-means is cheap enough for twice as many, which gives lists that reach the
# same recall over fewer rows a query (benchmarks/results/graph_choices.txt)
LIST_TRAIN_PER_LIST = 80
KMEANS_ITERS = 10  # faiss's; 20 gave no better recall at twice the cost (graph_choices.txt)
TUNE_QUERIES = 1000
# Stored rows scored against the tuning queries at once: 1,000 x 16,384 scores stay in cache
# better than x 65,536 (graph_choices.txt)
GROUND_TRUTH_ROWS = 16384
SEED = 1234


@dataclass
class Tuning:
    nprobe: int  # lists a query probes (on average, with probe_gap)
    recall: float
    sample: int
    curve: list[dict] = field(default_factory=list)  # per nprobe: recall, seconds, probe_gap
    probe_gap: float | None = None  # adaptive probing's gap (ivf_scan), if it is used


def nlist_for(n: int) -> int:
    """About 2*sqrt(N) lists, but at least 39 training points per list for k-means.

    Fewer, longer lists than faiss's usual 4-16*sqrt(N) suit a search that scores lists by
    matrix products (ivf_scan.py), and k-means costs nlist**2: on 1M derived vectors, 2,000
    lists reach the recall of 4,000, search as fast and train several times faster
    (benchmarks/results/graph_choices.txt)."""
    return max(1, min(round(2 * math.sqrt(n)), n // 39))


def index_kind(n: int, d: int, budget_bytes: int) -> str:
    """ivf-sq16 when its fp16 codes (N*d*2 bytes) fit the memory budget, else ivf-pq."""
    return "ivf-sq16" if n * d * 2 <= budget_bytes else "ivf-pq"


def pq_subquantizers(d: int) -> int:
    """d/4 one-byte codes (4 dims each), or the largest divisor of d below that."""
    return max(m for m in range(1, d // 4 + 1) if d % m == 0) if d >= 4 else d


def sample_ids(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def _trained_index(arr, kind: str, nlist: int, seed: int, subquantizers: int | None = None):
    """An empty IVF index of `kind`, its k-means trained on a seeded sample of rows; IVF-PQ
    with `subquantizers` (default `pq_subquantizers(d)`)."""
    from graphbuild.graph.faiss_loader import load_faiss

    faiss = load_faiss()
    n, d = arr.shape
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivf-sq16":
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, nlist, subquantizers or pq_subquantizers(d), 8,
                                 faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    index.cp.seed = seed
    index.cp.niter = KMEANS_ITERS
    index.train(np.asarray(arr[sample_ids(n, TRAIN_PER_LIST * nlist, seed)], np.float32))
    return index


def _blocks_with_lists(arr, centroids: torch.Tensor, block_rows: int):
    """(stored fp16 block, each row's list) over the store, in order. The lists come from
    torch's products, faster than faiss's here in fp32 and more so in bf16
    (graph_choices.txt)."""
    for lo in range(0, arr.shape[0], block_rows):
        x = torch.from_numpy(np.asarray(arr[lo:lo + block_rows]))
        yield x, np.ascontiguousarray(nearest_list(x, centroids), np.int64)


def build_index(arr, kind: str, nlist: int, block_rows: int, seed: int = SEED,
                subquantizers: int | None = None):
    """Train on a seeded sample and add every row in order (IVF-PQ: `subquantizers`, as
    `_trained_index`)."""
    from graphbuild.graph.faiss_loader import load_faiss

    faiss = load_faiss()
    t0 = time.perf_counter()
    index = _trained_index(arr, kind, nlist, seed, subquantizers)
    t1 = time.perf_counter()
    centroids = torch.from_numpy(index.quantizer.reconstruct_n(0, nlist))
    for x, lists in _blocks_with_lists(arr, centroids, block_rows):
        x = x.float().numpy()  # torch converts fp16 far faster than numpy
        index.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(lists))
    log.info("built %s index: %d lists over %d vectors (train %.1fs, add %.1fs)", kind, nlist,
             arr.shape[0], t1 - t0, time.perf_counter() - t1)
    return index


def build_lists(arr, nlist: int, block_rows: int, seed: int = SEED,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What build_index("ivf-sq16") would hold but its codes: (centroids (nlist, d) fp32,
    offsets (nlist + 1,), row ids grouped by list, ascending within each), as `lists_of`
    gives them. The store holds the rows already, so a search that reads them from it
    (ivf_scan.ListScan) needs no second copy on disk or in memory.

    The centroids are torch's spherical k-means in `centroid_dtype()`. faiss's IVF k-means
    is spherical too, but in fp32: in the time it trains on 40 rows a list, torch's trains on
    80 (graph_choices.txt)."""
    t0 = time.perf_counter()
    centroids = list_centroids(arr, nlist, seed)
    t1 = time.perf_counter()
    lists = np.concatenate([b for _, b in _blocks_with_lists(arr, torch.from_numpy(centroids),
                                                             block_rows)])
    log.info("built %d lists over %d vectors (train %.1fs, assign %.1fs)", nlist, len(lists),
             t1 - t0, time.perf_counter() - t1)
    return centroids, *grouped_by_list(lists, nlist)


def list_centroids(arr, nlist: int, seed: int = SEED) -> np.ndarray:
    """build_lists' centroids (nlist, d) fp32: spherical k-means on a seeded sample of
    LIST_TRAIN_PER_LIST rows a list."""
    train = np.asarray(arr[sample_ids(arr.shape[0], LIST_TRAIN_PER_LIST * nlist, seed)],
                       np.float32)
    return spherical_kmeans(torch.from_numpy(train).to(centroid_dtype()), nlist,
                            KMEANS_ITERS, seed).numpy()


def grouped_by_list(lists: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (nlist + 1,), row ids grouped by list, ascending within each) of each row's
    list."""
    ids = np.argsort(lists, kind="stable")
    return np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=nlist))]), ids


def faiss_gpus() -> int:
    """GPUs faiss can use: 0 with faiss-cpu, or without faiss."""
    from graphbuild.graph.faiss_loader import faiss_if_installed

    faiss = faiss_if_installed()
    return 0 if faiss is None else getattr(faiss, "get_num_gpus", lambda: 0)()


def ground_truth(arr, queries: np.ndarray, k: int, block_rows: int) -> np.ndarray:
    """Exact top-k ids of query rows (self excluded, equal scores by smaller id), streaming
    the rows. Where the CPU multiplies bf16 in hardware, bf16 products pick candidates and
    their exact scores rank them (`_rescored_truth`, at bf16's rate); a query whose
    candidates cannot be shown to hold its exact top-k is scored again in fp32."""
    if not has_native_bf16():
        return _fp32_truth(arr, queries, k, block_rows)
    truth, proven = _rescored_truth(arr, queries, k, block_rows)
    if not proven.all():
        log.info("ground truth: %d of %d queries scored again in fp32 (near-ties beyond "
                 "their candidates)", (~proven).sum(), len(queries))
        truth[~proven] = _fp32_truth(arr, queries[~proven], k, block_rows)
    return truth


def _fp32_truth(arr, queries: np.ndarray, k: int, block_rows: int) -> np.ndarray:
    """ground_truth by fp32 scores; each query's best kept in a heap (kernels.offer)."""
    n = arr.shape[0]
    xq = torch.from_numpy(np.asarray(arr[queries], np.float32))
    own = torch.from_numpy(queries)
    every = np.arange(len(queries), dtype=np.int32)
    threads_as_torch()
    best_s, best_i = empty_heaps(len(queries), k, np.int64)
    step = min(block_rows, GROUND_TRUTH_ROWS)
    for lo in range(0, n, step):
        # torch converts fp16 to fp32 far faster than numpy
        block = torch.from_numpy(np.asarray(arr[lo:lo + step])).float()
        sims = xq @ block.T
        _exclude_self(sims, own, lo)
        offer(sims.numpy(), every, np.arange(lo, lo + len(block)), best_s, best_i)
    sort_heaps(best_s, best_i)
    return best_i


def _exclude_self(sims: torch.Tensor, own: torch.Tensor, lo: int) -> None:
    """A query's own row (ids `own`) is not its neighbour: -inf where it is a column."""
    mine = (own >= lo) & (own < lo + sims.shape[1])
    sims[mine.nonzero()[:, 0], own[mine] - lo] = float("-inf")


def _rescored_truth(arr, queries: np.ndarray, k: int, block_rows: int,
                    candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(top-k ids, which queries are proven exact): each query keeps its `candidates` best
    by bf16 product, each with its exact score (kernels.offer_rescored), and ranks them by
    that score, ties by id.

    Proof: a row left out scored v <= w by bf16, w the query's worst candidate. bf16
    products of rows whose norms are at most N (rounded to bf16: at most N~, so N <=
    N~ / (1 - u)) are within b(v) of the exact score (exact.ErrorBound, with u = 2**-8
    bounding every element's rounding: E <= u N). So if w + b(w) is below the k-th exact
    score, no row left out can be among the k best."""
    from graphbuild.graph.exact import (
        HALF_UNIT_ROUNDOFF,
        THRESHOLD_SLACK,
        ErrorBound,
        default_capacity,
    )
    from graphbuild.graph.kernels import EMPTY_KEY, key_values, offer_rescored

    n, d = arr.shape
    kk = min(candidates or default_capacity(k), n - 1)
    q32 = np.asarray(arr[queries], np.float32)
    xq = torch.from_numpy(q32).bfloat16()
    own = torch.from_numpy(queries)
    threads_as_torch()
    best_k = np.full((len(queries), kk), EMPTY_KEY, np.int16)
    best_i = np.full(best_k.shape, -1, np.int64)
    best_x = np.full(best_k.shape, -np.inf, np.float32)
    rounded_norm = 0.0
    step = min(block_rows, GROUND_TRUTH_ROWS)
    for lo in range(0, n, step):
        block = np.ascontiguousarray(arr[lo:lo + step], np.float16)
        rows = torch.from_numpy(block).bfloat16()
        rounded_norm = max(rounded_norm, float(torch.linalg.vector_norm(
            rows, dim=1, dtype=torch.float32).max()))
        sims = xq @ rows.T
        _exclude_self(sims, own, lo)
        offer_rescored(sims.view(torch.int16).numpy(), lo, q32, block.view(np.uint16), best_k,
                       best_i, best_x)
    u = HALF_UNIT_ROUNDOFF["bf16"]
    rounded_norm *= 1 + 1e-5  # covers the fp32 norm's own rounding
    norm = rounded_norm / (1 - u)
    bound = ErrorBound.of_norms(norm, rounded_norm, u * norm, d, "bf16")
    # heaps keep their worst at the root
    reach = bound.highest(key_values(best_k[:, 0]).astype(np.float64)) + THRESHOLD_SLACK
    order = np.lexsort((best_i, -best_x), axis=1)[:, :k]
    kth = np.take_along_axis(best_x, order, 1)[:, -1]
    proven = (reach < kth) | (best_i[:, 0] < 0)  # a heap never filled holds every row
    return np.take_along_axis(best_i, order, 1), proven


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth))
    return hits / truth.size


def search(index, xq: np.ndarray, rows: np.ndarray, k: int, nprobe: int,
           probe_gap: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids (r, k) int64, sims (r, k) float32) of query vectors xq whose node ids are `rows`:
    self excluded by id, best first, equal sims by smaller id. `probe_gap`: adaptive probing
    (ivf_scan; ListScan only). Rows whose probed lists hold fewer than k other vectors are
    searched again with twice nprobe lists each."""
    n = index.ntotal
    if n > 2**31:
        raise ValueError(f"approximate search packs ids in 31 bits: {n} rows is too many")
    ids = np.empty((len(rows), k), np.int64)
    sims = np.empty((len(rows), k), np.float32)
    todo = np.arange(len(rows))
    while len(todo):
        index.nprobe = nprobe
        if hasattr(index, "probe_gap"):
            index.probe_gap = probe_gap
            probe_gap = None  # again with fixed nprobe, if at all
        batch = xq if len(todo) == len(xq) else xq[todo]  # no copy of a whole block
        s, i = index.search(np.ascontiguousarray(batch), min(k + 1, n))
        got_s, got_i = _best_first(s, i, rows[todo], k)
        full = np.isfinite(got_s).all(axis=1) | (nprobe >= index.nlist)
        ids[todo[full]], sims[todo[full]] = got_i[full], got_s[full]
        todo, nprobe = todo[~full], nprobe * 2
    return ids, sims


def _best_first(s: np.ndarray, i: np.ndarray, rows: np.ndarray, k: int,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best (sims, ids), self and empty slots (-1) dropped to -inf, equal sims by
    smaller id: one sort of packed (descending sim, id) keys, faster than numpy's lexsort. Ids take
    31 bits: stores of up to 2**31 rows."""
    s, i = torch.from_numpy(s), torch.from_numpy(i).long()
    s = s.masked_fill((i == torch.from_numpy(rows)[:, None]) | (i < 0), float("-inf"))
    order = ((descending_bits(s) << 31) | i.clamp(min=0)).sort(dim=1).indices[:, :k]
    return s.gather(1, order).numpy(), i.gather(1, order).numpy()


def tuning_key(k: int, recall_target: float, both_ways: bool) -> str:
    """The key of a graph's tuning in graph/_index/index.json: a ListScan searched both ways
    (symmetric_scan) reaches a target at fewer lists than a one-way search, so its tunings
    are kept apart."""
    return f"k={k} target={recall_target}" + (" both-ways" if both_ways else "")


def tune_nprobe(index, arr, k: int, target: float, block_rows: int,
                sample: int = TUNE_QUERIES, seed: int = SEED, both_ways=None) -> Tuning:
    """The smallest nprobe reaching recall@k >= target on a seeded sample of queries,
    measured against exact search: doubling from 1 to the first that reaches it, then
    bisecting down from there (recall only grows with nprobe: more lists, more candidates),
    since a power of two can cost up to twice the lists needed. A ListScan probes adaptively
    where it can: nprobe lists on average, at the gap that gives that on the sample.
    `both_ways` (a symmetric_scan.BothWays of the ListScan `index`): the recall its search
    (each list product offered both ways) would reach, from the sample's candidate sets
    alone (BothWays.recall): no list products, which a both-ways search of a sample makes
    for every row probing the sample's lists."""
    queries = sample_ids(index.ntotal, sample, seed + 1)
    truth = ground_truth(arr, queries, k, block_rows)
    xq = np.asarray(arr[queries], np.float32)
    curve, recalls, gaps = [], {}, {}

    def measure(nprobe: int) -> float:
        t0 = time.perf_counter()
        gaps[nprobe] = gap = (probe_gap_for(xq, index.centroids, nprobe)
                              if hasattr(index, "probe_gap") else None)
        recalls[nprobe] = recall = (
            recall_at_k(search(index, xq, queries, k, nprobe, gap)[0], truth)
            if both_ways is None else both_ways.recall(queries, truth, nprobe, gap))
        curve.append({"nprobe": nprobe, "recall": round(recall, 4),
                      "seconds": round(time.perf_counter() - t0, 3), "probe_gap": gap})
        log.info("nprobe %d%s: recall@%d %.4f on %d sampled queries (%.2fs)", nprobe,
                 "" if gap is None else f" (on average: lists within {gap:.4f})", k, recall,
                 len(queries), curve[-1]["seconds"])
        return recall

    # faiss-gpu probes at most 2048 lists (faiss_gpu.OnGpu.max_nprobe)
    limit = getattr(index, "max_nprobe", index.nlist)
    low, high = 0, 1  # low: largest nprobe known to miss the target (0: none tried)
    while measure(high) < target and high < limit:
        low, high = high, min(high * 2, limit)
    if recalls[high] < target and limit < index.nlist:
        log.warning("nprobe stops at %d of %d lists, faiss-gpu's limit: recall@%d %.4f, below "
                    "the target %.2f", limit, index.nlist, k, recalls[high], target)
    while recalls[high] >= target and high - low > 1:
        mid = (low + high) // 2
        if measure(mid) >= target:
            high = mid
        else:
            low = mid
    return Tuning(high, recalls[high], len(queries), sorted(curve, key=lambda c: c["nprobe"]),
                  gaps[high])
