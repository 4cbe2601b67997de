"""Compiled loops (numba) where torch would make several passes over large temporaries.

ivf_scan's list search:
- `offer`: each query keeps its best kk (score, id) in a heap; a list's score block offers
  every score to its query's heap, and the heap's worst is the bar to pass. This replaces a
  top-k per nearest list, a compare and `flatnonzero` per other list, the hits those leave
  and their final sort (about 2.5 s of a 6.7 s block of 65,536 queries at 1M rows).
  Order: higher score first, equal scores by smaller id, so a query's result does not
  depend on the order its lists are scanned in.
- `probe_lists`: each query's nearest list and the lists within the gap of it, from the
  centroid scores, in one pass a row (0.9 s a block with torch's max, compare, nonzero).

exact's re-rank:
- `exact_dots`: dot products of fp16 rows, converted through a table and summed in fp64,
  straight from the rows: no gathered, converted copies of them."""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

EMPTY = -1  # id of an empty heap slot (its score is -inf)


@njit(cache=True, inline="always")
def _worse(s1, i1, s2, i2):
    """Whether (s1, i1) ranks below (s2, i2): lower score, or equal score and larger id."""
    return s1 < s2 or (s1 == s2 and i1 > i2)


@njit(cache=True)
def _replace_worst(hs, hi, v, i, n):
    """Put (v, i) in the heap (hs, hi) of n slots, worst at the root, in place of its root:
    the worse child moves up into the hole until (v, i) ranks below neither child."""
    at = 0
    while True:
        child = 2 * at + 1
        if child >= n:
            break
        if child + 1 < n and _worse(hs[child + 1], hi[child + 1], hs[child], hi[child]):
            child += 1
        if not _worse(hs[child], hi[child], v, i):
            break
        hs[at], hi[at] = hs[child], hi[child]
        at = child
    hs[at], hi[at] = v, i


@njit(cache=True, parallel=True)
def offer(scores, queries, ids, heap_s, heap_i):
    """Offer scores (r, c) fp32, row j scored by query `queries[j]` against the rows `ids`,
    to the queries' heaps (heap_s, heap_i: (m, kk), worst at [:, 0]). A query appears at
    most once in `queries`, so rows can go in parallel."""
    kk = heap_s.shape[1]
    for j in prange(scores.shape[0]):
        q = queries[j]
        hs, hi = heap_s[q], heap_i[q]
        bar = hs[0]
        row = scores[j]
        for c in range(len(row)):
            v = row[c]
            if v >= bar and (v > bar or ids[c] < hi[0]):
                _replace_worst(hs, hi, v, ids[c], kk)
                bar = hs[0]


@njit(cache=True, parallel=True)
def sort_heaps(heap_s, heap_i):
    """Each heap in place as a list, best first (empty slots last)."""
    kk = heap_s.shape[1]
    for q in prange(heap_s.shape[0]):
        hs, hi = heap_s[q], heap_i[q]
        for end in range(kk - 1, 0, -1):  # heapsort: the worst goes to the back
            v, i = hs[end], hi[end]
            hs[end], hi[end] = hs[0], hi[0]
            _replace_worst(hs, hi, v, i, end)


def empty_heaps(m: int, kk: int, id_dtype) -> tuple[np.ndarray, np.ndarray]:
    return np.full((m, kk), -np.inf, np.float32), np.full((m, kk), EMPTY, id_dtype)


def threads_as_torch() -> None:
    """Run the kernels on as many threads as torch's products (OMP_NUM_THREADS, a dask
    worker's share): numba alone would take every core the process may run on."""
    import torch

    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


@njit(cache=True)
def _row_as_f32(scores, bf16_bits, r, out) -> int:
    """Row r of the centroid scores into `out` fp32 (bf16 given as its uint16 bits: exact);
    returns the position of its first maximum."""
    row = scores[r]
    bits = out.view(np.uint32)
    best = 0
    for c in range(len(row)):
        if bf16_bits:
            bits[c] = np.uint32(row[c]) << 16
        else:
            out[c] = row[c]
        if out[c] > out[best]:
            best = c
    return best


@njit(cache=True)
def _best_of(row, k, top_v, top_c):
    """The k largest of `row`'s positions, ties by smaller position (top_v, top_c: buffers
    of at least k): an insertion into a short sorted list, in one pass over the row."""
    held = 0
    for c in range(len(row)):
        v = row[c]
        if held == k and v <= top_v[k - 1]:
            continue
        at = min(held, k - 1)
        while at > 0 and top_v[at - 1] < v:
            top_v[at], top_c[at] = top_v[at - 1], top_c[at - 1]
            at -= 1
        top_v[at], top_c[at] = v, c
        held = min(held + 1, k)
    return top_c[:held]


@njit(cache=True, parallel=True)
def probe_lists(scores, bf16_bits, gap, least, most):
    """(nearest list, probe count, other probed lists) of each row of centroid scores
    (m, nlist), fp32 or (with bf16_bits) bf16 as uint16 bits. A row probes the lists whose
    score is within `gap` of its nearest's, at least `least` and at most `most` of them (the
    best ones then, ties by smaller list number). Other probed lists: (m, most - 1), padded
    with -1."""
    m, nlist = scores.shape
    least, most = min(least, nlist), min(most, nlist)
    home = np.empty(m, np.int64)
    count = np.empty(m, np.int64)
    others = np.full((m, max(most - 1, 1)), -1, np.int32)
    for r in prange(m):
        row = np.empty(nlist, np.float32)
        home[r] = best = _row_as_f32(scores, bf16_bits, r, row)
        bar = row[best] - np.float32(gap)
        n, within = 0, 0
        for c in range(nlist):
            if row[c] >= bar:
                within += 1
                if c != best and n < most - 1:
                    others[r, n] = c
                    n += 1
        count[r] = min(max(within, least), most)
        if count[r] != within:  # outside the bounds: the best count[r] lists instead
            others[r, :] = -1
            n = 0
            top_v, top_c = np.empty(most, np.float32), np.empty(most, np.int64)
            for c in _best_of(row, count[r], top_v, top_c):
                if c != best:
                    others[r, n] = c
                    n += 1
    return home, count, others


F16_AS_F32 = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, parallel=True)
def exact_dots(x_bits, table, q32, rr, cols, out):
    """out[p] = q32[rr[p]] . x[cols[p]] for each pair p, summed in fp64 and rounded once to
    fp32, where x is fp16 given as its uint16 bits and table maps bits to fp32. Each product
    of two fp16 values is exact in fp32 and their fp64 sum is exact (exact.py), so this equals
    any other exact summation bit for bit."""
    d = x_bits.shape[1]
    for p in prange(len(rr)):
        a = q32[rr[p]]
        b = x_bits[cols[p]]
        s = 0.0
        for j in range(d):
            s += np.float64(a[j] * table[b[j]])
        out[p] = np.float32(s)
