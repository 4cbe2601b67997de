"""Compiled loops (numba) where torch would make several passes over large temporaries.

ivf_scan's list search:
- `offer`: each query keeps its best kk (score, id) in a heap; a list's score block offers
  every score to its query's heap, and the heap's worst is the bar to pass: no top-k passes,
  no lists of hits, no final sort. Order: higher score first, equal scores by smaller id, so
  a query's result does not depend on the order its lists are scanned in.
- `probe_lists`: each query's nearest list and the lists within the gap of it, from the
  centroid scores, in one pass a row.

exact's re-rank:
- `exact_dots`: dot products of fp16 rows, converted through a table and summed in fp64,
  straight from the rows: no gathered, converted copies of them.

exact's candidate buffers on CPUs (`offer_dense`, `offer_to_rows`, `offer_to_columns`,
`offer_above`, `kth_keys`): bf16 scores as int16 keys appended to per-row buffers, compacted by
quickselect, without torch's top-k merges and hit lists.

ann's ground truth (`offer_rescored`): heaps of bf16 products whose entries carry their exact
scores, so tuning's exact search runs at bf16's rate.

symmetric_scan: every row's best lists in probe order (`top_lists`), the rows' probes grouped
by list (`probers_by_list`), and a list product's columns offered to the list rows' heaps
(`offer_to_list_rows`)."""

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
def _replace_worst(hs, hi, v, i, n, hx=None, x=0.0):
    """Put (v, i) in the heap (hs, hi) of n slots, worst at the root, in place of its root:
    the worse child moves up into the hole until (v, i) ranks below neither child. hx, if
    given, holds one more value a slot that moves with its entry (x for the new one); numba
    compiles the hx=None case without it."""
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
        if hx is not None:
            hx[at] = hx[child]
        at = child
    hs[at], hi[at] = v, i
    if hx is not None:
        hx[at] = x


@njit(cache=True, parallel=True)
def offer(scores, queries, ids, heap_s, heap_i):
    """Offer scores (r, c) fp32, row j scored by query `queries[j]` against the rows `ids`,
    to the queries' heaps (heap_s, heap_i: (m, kk), worst at [:, 0]). A query appears at
    most once in `queries`, so rows can go in parallel. A row offered to a heap with free
    slots (a query's first list) skips the scores below its own floor (`_row_floor`): only
    about kk of them go in, not every score that beats the heap as it fills."""
    kk = heap_s.shape[1]
    for j in prange(scores.shape[0]):
        q = queries[j]
        hs, hi = heap_s[q], heap_i[q]
        row = scores[j]
        floor = _row_floor(row, kk) if hs[0] == -np.inf else -np.inf
        bar = max(hs[0], floor)
        for c in range(len(row)):
            v = row[c]
            if v >= bar and _worse(hs[0], hi[0], v, ids[c]):
                _replace_worst(hs, hi, v, ids[c], kk)
                bar = max(hs[0], floor)


@njit(cache=True, fastmath={"reassoc", "nsz"})
def _dot32(a, i, b, k):
    """a[i] . b[k] of two fp32 rows, summed in fp32 in the one order this compiled loop takes
    (it vectorises): the same value for b[k] . a[i] and for the pair in any product, within
    d * 2**-24 |a[i]||b[k]| of the exact one (symmetric_scan's screened products). Not
    inlined: inlined, it would compile with its caller's strict flags, one add after another
    (about 13x slower). Indexed, not sliced: no row views."""
    s = np.float32(0.0)
    for j in range(a.shape[1]):
        s += a[i, j] * b[k, j]
    return s


@njit(cache=True, parallel=True)
def offer_rescored_rows(scores, ncol, queries, q32, ids, c32, tol, heap_s, heap_i):
    """`offer` for screened scores (r, >= ncol; columns from ncol on are padding), each
    within `tol` of the exact one: a score within tol of reaching its query's heap is scored
    again (`_dot32` of the query's row q32[j] and the candidate's c32[c]) and that score is
    offered, so the heaps hold only scores that do not depend on the product."""
    kk = heap_s.shape[1]
    for j in prange(scores.shape[0]):
        q = queries[j]
        hs, hi = heap_s[q], heap_i[q]
        row = scores[j, :ncol]
        floor = _row_floor(row, kk) - 2 * tol if hs[0] == -np.inf else -np.inf
        bar = max(hs[0] - tol, floor)
        for start in range(0, ncol, RESCORE_CHUNK):
            stop = min(start + RESCORE_CHUNK, ncol)
            top = row[start]
            for c in range(start + 1, stop):  # vectorises: most chunks end here
                top = max(top, row[c])
            if top < bar:
                continue
            for c in range(start, stop):
                if row[c] < bar:
                    continue
                v = _dot32(q32, j, c32, c)
                if _worse(hs[0], hi[0], v, ids[c]):
                    _replace_worst(hs, hi, v, ids[c], kk)
                    bar = max(hs[0] - tol, floor)


RESCORE_CHUNK = 16  # screened scores whose maximum is checked before any is read alone


FLOOR_SLACK = 8  # scores a row's floor may let in beyond kk


@njit(cache=True)
def _row_floor(row, kk):
    """A value that at least kk of the row's scores reach and at most kk + FLOOR_SLACK pass
    (or, among ties, the largest value at least kk reach), by bisection with counting passes
    that vectorise; -inf for a row of at most kk + FLOOR_SLACK scores. A score below it
    ranks below kk others of the row (distinct ids), so it cannot be among the best kk."""
    n = len(row)
    if n <= kk + FLOOR_SLACK:
        return np.float32(-np.inf)
    lo, hi = row[0], row[0]
    for c in range(1, n):
        lo, hi = min(lo, row[c]), max(hi, row[c])
    for _ in range(40):  # count(lo) >= kk holds; count(hi) < kk unless every score ties
        mid = np.float32(lo + (hi - lo) * np.float32(0.5))
        if mid <= lo or mid >= hi:
            break
        reach = np.int32(0)
        for c in range(n):
            reach += np.int32(row[c] >= mid)
        if reach < kk:
            hi = mid
        else:
            lo = mid
            if reach <= kk + FLOOR_SLACK:
                break
    return lo


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


@njit(cache=True, inline="always")
def _bits32(v, bf16_bits):
    """The int32 fp32 bits of a score given as ivf_scan.kernel_view gives it: bf16's uint16
    bits (shifted into place, exactly) or fp32's int32 bits."""
    return np.int32(np.uint32(v) << 16) if bf16_bits else np.int32(v)


@njit(cache=True)
def _row_as_f32(scores, bf16_bits, r, out) -> int:
    """Row r of the centroid scores (fp32 as its int32 bits, or bf16 as its uint16 bits:
    ivf_scan.kernel_view) into `out` fp32, exactly; returns the position of its first
    maximum."""
    row = scores[r]
    bits = out.view(np.int32)
    best = 0
    for c in range(len(row)):
        bits[c] = _bits32(row[c], bf16_bits)
        if out[c] > out[best]:
            best = c
    return best


@njit(cache=True, inline="always")
def _key32(bits):
    """The int32 key of an fp32 value given as its int32 bits: keys order like the values
    (positive patterns as they are, negative ones sign and magnitude, so their low 31 bits
    flip), -0 and +0 both 0."""
    key = bits if bits >= 0 else bits ^ np.int32(0x7FFFFFFF)
    return key if key != -1 else np.int32(0)


@njit(cache=True, inline="always")
def _max_of(row):
    """A row's largest element (a single pass that vectorises on int16 lanes)."""
    top = row[0]
    for c in range(1, len(row)):
        top = max(top, row[c])
    return top


@njit(cache=True, parallel=True)
def first_max(scores, bf16_bits):
    """The position of each row's first maximum (m,) int64, of scores as `_row_as_f32`
    takes them: one pass for the row's largest key, one to find where it first is. A bf16
    row whose largest value is positive is read as int16 bit patterns, which order like
    positive values (and put negative ones below): two vectorised passes on 16-bit lanes."""
    m, n = scores.shape
    out = np.zeros(m, np.int64)
    for r in prange(m):
        if bf16_bits:
            row16 = scores[r].view(np.int16)
            top16 = _max_of(row16)
            if top16 > 0:
                for c in range(n):
                    if row16[c] == top16:
                        out[r] = c
                        break
                continue
        row = scores[r]
        top = np.int32(-2**31)
        for c in range(n):
            top = max(top, _key32(_bits32(row[c], bf16_bits)))
        for c in range(n):
            if _key32(_bits32(row[c], bf16_bits)) == top:
                out[r] = c
                break
    return out


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


@njit(cache=True, inline="always")
def _exact_dot(a, b_bits):
    """a . b, rounded once to fp32, for a row a of fp16 values held as fp32 and a row b of
    fp16 given as its uint16 bits: each product of two fp16 values is exact in fp32 and their
    fp64 sum is exact (exact.py), so this equals any other exact summation bit for bit."""
    s = 0.0
    for j in range(len(a)):
        s += np.float64(a[j] * F16_AS_F32[b_bits[j]])
    return np.float32(s)


@njit(cache=True, parallel=True)
def exact_dots(x_bits, q32, rr, cols, out):
    """out[p] = q32[rr[p]] . x[cols[p]] for each pair p (`_exact_dot`), where x is fp16 given
    as its uint16 bits."""
    for p in prange(len(rr)):
        out[p] = _exact_dot(q32[rr[p]], x_bits[cols[p]])


# exact's candidate buffers (CPU, bf16 scores). Scores are held as int16 keys that order
# like the bf16 values (`_ordered`), so every comparison is an integer one. A row's scores
# that reach its filter key are appended to its buffer; a full buffer is compacted: the
# k-th best found by selection sets the filter key (through `filter_keys`, built by exact.py
# from the error bound) and what falls below it goes. An append costs a few ns a score, far
# less than the branchy sift of a heap that kept the exact k-th best at every score.
EMPTY_KEY = -32768   # below the key of -inf: nothing is dropped yet
NO_PASS_KEY = 32767  # a filter key no score reaches (above +inf's): padding rows
_KEYS = np.arange(-32768, 32768, dtype=np.int32)
# the bf16 value of each key, at [key + 32768]: ascending (keys below -inf's read -inf,
# above +inf's +inf), so np.searchsorted finds the key of a threshold
KEY_AS_F32 = np.where(
    _KEYS >= 0, (np.minimum(_KEYS, 0x7F80) << 16).view(np.float32),
    ((np.minimum(-_KEYS, 0x7F80) | 0x8000) << 16).view(np.float32)).astype(np.float32)


def key_values(keys: np.ndarray) -> np.ndarray:
    """The fp32 values of int16 keys (EMPTY_KEY reads -inf)."""
    return KEY_AS_F32[keys.astype(np.int32) + 32768]


def key_of(values: np.ndarray) -> np.ndarray:
    """The int16 keys of fp32 values that bf16 holds exactly (`key_values` inverted)."""
    bits = (np.ascontiguousarray(values, np.float32).view(np.int32) >> 16).astype(np.int32)
    return np.where(bits >= 0, bits, -(bits & 0x7FFF)).astype(np.int16)


@njit(cache=True, inline="always")
def _ordered(bits):
    """The key of a bf16 value given as its int16 bits: positive patterns order like their
    values, negative ones are sign and magnitude, so they go to minus the magnitude (-0 and
    +0 both to 0)."""
    b = np.int32(bits)
    return b if b >= 0 else -(b & 0x7FFF)


@njit(cache=True)
def _select_best(keys, ids, n, k):
    """Reorder (keys, ids)[:n] in place so that the k largest keys come first (quickselect);
    returns the k-th largest."""
    lo, hi, t = 0, n - 1, k - 1
    while lo < hi:
        pivot = keys[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while keys[i] > pivot:
                i += 1
            while keys[j] < pivot:
                j -= 1
            if i <= j:
                keys[i], keys[j] = keys[j], keys[i]
                ids[i], ids[j] = ids[j], ids[i]
                i += 1
                j -= 1
        if t <= j:
            hi = j
        elif t >= i:
            lo = i
        else:
            break
    return keys[t]


@njit(cache=True)
def _make_room(r, k, cand_k, cand_i, count, dropped, filter_keys, key):
    """Compact row r's full buffer: its k-th best raises the filter key and the entries
    below the key go (they cannot matter: the key only rises). If every entry can still
    matter, the least goes and `dropped` keeps the best such. Returns the filter key."""
    keys, ids, n = cand_k[r], cand_i[r], count[r]
    kth = _select_best(keys, ids, n, k)
    bar = key[r] = max(key[r], filter_keys[kth + 32768])
    kept = k  # the k best are at least the k-th, above any filter key of it
    for c in range(k, n):
        if keys[c] >= bar:
            keys[kept], ids[kept] = keys[c], ids[c]
            kept += 1
    if kept == n:  # the least is among those after the k best, if any
        least = k if n > k else 0
        for c in range(least + 1, n):
            if keys[c] < keys[least]:
                least = c
        dropped[r] = max(dropped[r], keys[least])
        kept -= 1
        keys[least], ids[least] = keys[kept], ids[kept]
    count[r] = kept
    return bar


@njit(cache=True, inline="always")
def _take(r, v, i, k, cand_k, cand_i, count, dropped, filter_keys, key):
    """Append key v with id i to row r's buffer, making room first if it is full; returns
    the row's filter key (which the room may have raised above v: then v is not kept)."""
    bar = key[r]
    if count[r] == cand_k.shape[1]:
        bar = _make_room(r, k, cand_k, cand_i, count, dropped, filter_keys, key)
        if v < bar:
            return bar
    cand_k[r, count[r]], cand_i[r, count[r]] = v, i
    count[r] += 1
    return bar


KTH_WINDOW = 256  # a row's k-th best is looked for among its keys this close to its max


@njit(cache=True)
def _count_from(row, bits):
    """How many of a row's bf16 bit patterns reach `bits` (> 0) as int16: those of the
    positive values at least its value. Vectorises; on int16 lanes compared and int32 ones
    counted, about 1.6x faster than a bool summed into an int64 (graph_choices.txt)."""
    n = np.int32(0)
    b = np.int16(bits)
    for c in range(len(row)):
        n += np.int32(row[c] >= b)
    return n


@njit(cache=True)
def _kth_of_row(row, k):
    """The k-th largest key of a row of bf16 bits, by binary search among the positive
    keys within KTH_WINDOW of the largest (counting passes, fast on int16 lanes);
    EMPTY_KEY if fewer than k keys fall there."""
    top = _max_of(row)
    lo, hi = max(np.int32(top) - KTH_WINDOW + 1, 1), np.int32(top)
    if top < 1 or _count_from(row, lo) < k:
        return EMPTY_KEY
    while lo < hi:  # k keys reach lo; find the largest such
        mid = (lo + hi + 1) // 2
        if _count_from(row, mid) >= k:
            lo = mid
        else:
            hi = mid - 1
    return lo


@njit(cache=True, inline="always")
def _raw_bar(bar):
    """A bar on raw int16 bit patterns that every key reaching `bar` passes: the same for
    positive bars (positive keys are their patterns), none otherwise."""
    return bar if bar > 0 else EMPTY_KEY


@njit(cache=True, parallel=True)
def offer_dense(bits, lo, cols, k, cand_k, cand_i, count, dropped, filter_keys, key):
    """Offer every score of bits (r, c: bf16 as int16) to rows lo.. (row j to lo + j), the
    columns being ids `cols`: scores whose key reaches the row's filter key are kept. The
    row's own k-th best among these scores first raises the key (they will all be kept), so
    few scores go in and the buffer is seldom compacted."""
    for j in prange(bits.shape[0]):
        r, row = lo + j, bits[j]
        kth = _kth_of_row(row, k)
        if kth != EMPTY_KEY:
            key[r] = max(key[r], filter_keys[kth + 32768])
        bar = key[r]
        raw = _raw_bar(bar)
        for c in range(len(row)):
            if row[c] < raw:
                continue
            v = _ordered(row[c])
            if v >= bar:
                bar = _take(r, v, cols[c], k, cand_k, cand_i, count, dropped, filter_keys, key)
                raw = _raw_bar(bar)


@njit(cache=True, parallel=True)
def offer_to_rows(bits, gmax, at, cols, k, cand_k, cand_i, count, dropped, filter_keys, key):
    """Offer a block of scores bits (groups * g, c) row-wise: row j's scores go to buffer
    row at[j], against the columns' ids `cols`. gmax (groups, c) holds the int16 maximum of
    each group of g rows per column; a group is read again only where that maximum reaches
    the smallest filter key of its rows (as int16 patterns, valid for positive keys)."""
    groups, n_cols = gmax.shape
    g = bits.shape[0] // groups
    for gi in prange(groups):
        least = NO_PASS_KEY
        for t in range(g):
            least = min(least, key[at[gi * g + t]])
        least = _raw_bar(least)
        for c in range(n_cols):
            if gmax[gi, c] < least:
                continue
            for t in range(g):
                r = at[gi * g + t]
                v = _ordered(bits[gi * g + t, c])
                if v >= key[r]:
                    _take(r, v, cols[c], k, cand_k, cand_i, count, dropped, filter_keys, key)


@njit(cache=True, parallel=True)
def offer_to_columns(bits, gmax, lo, ids, k, cand_k, cand_i, count, dropped, filter_keys,
                     key):
    """Offer a block of scores bits (groups * g, c) column-wise: column c's scores go to
    buffer row lo + c, against the rows' ids `ids`; gmax as in offer_to_rows."""
    groups, n_cols = gmax.shape
    g = bits.shape[0] // groups
    for c in prange(n_cols):
        r = lo + c
        bar = key[r]
        for gi in range(groups):
            if gmax[gi, c] < _raw_bar(bar):
                continue
            for t in range(g):
                v = _ordered(bits[gi * g + t, c])
                if v >= bar:
                    bar = _take(r, v, ids[gi * g + t], k, cand_k, cand_i, count, dropped,
                                filter_keys, key)


SCAN_CHUNK = 64  # scores whose int16 maximum is checked before any is read one by one


@njit(cache=True, parallel=True)
def offer_above(bits, lo, cols, k, cand_k, cand_i, count, dropped, filter_keys, key):
    """Offer every score of bits (r, c: bf16 as int16) to rows lo.. (row j to lo + j), the
    columns being ids `cols`, for rows whose filter keys are already final (seeded from an
    earlier pass): few scores reach them, so chunks of SCAN_CHUNK scores whose maximum falls
    below the key are skipped whole (a vectorised pass), with no k-th best taken first."""
    for j in prange(bits.shape[0]):
        r, row = lo + j, bits[j]
        bar = key[r]
        raw = _raw_bar(bar)
        for start in range(0, len(row), SCAN_CHUNK):
            stop = min(start + SCAN_CHUNK, len(row))
            top = row[start]
            for c in range(start + 1, stop):
                top = max(top, row[c])
            if top < raw:
                continue
            for c in range(start, stop):
                v = _ordered(row[c])
                if v >= bar:
                    bar = _take(r, v, cols[c], k, cand_k, cand_i, count, dropped, filter_keys,
                                key)
                    raw = _raw_bar(bar)


@njit(cache=True, parallel=True)
def kth_keys(lo, hi, k, cand_k, cand_i, count, out):
    """Each row's k-th best key (EMPTY_KEY where it holds fewer than k), rows lo..hi."""
    for j in prange(hi - lo):
        r = lo + j
        out[j] = (_select_best(cand_k[r], cand_i[r], count[r], k) if count[r] >= k
                  else EMPTY_KEY)


# ann's ground truth: bf16 products, each score that enters a query's heap re-scored exactly
@njit(cache=True, parallel=True)
def offer_rescored(scores, lo, q32, x_bits, heap_k, heap_i, heap_x):
    """Offer approximate scores (m, c) of m queries (fp32 rows q32), bf16 as their int16
    bits, against the rows lo.. (fp16, as their uint16 bits x_bits) to the queries' heaps of
    keys (`_ordered`; EMPTY_KEY when free), kept as `offer` keeps scores. Each score taken in
    carries its row's exact score (heap_x, `_exact_dot`)."""
    kk = heap_k.shape[1]
    for q in prange(scores.shape[0]):
        hk, hi, hx = heap_k[q], heap_i[q], heap_x[q]
        bar = hk[0]
        row, a = scores[q], q32[q]
        for start in range(0, len(row), SCAN_CHUNK):
            stop = min(start + SCAN_CHUNK, len(row))
            top = row[start]
            for c in range(start + 1, stop):  # vectorises: most chunks end here
                top = max(top, row[c])
            if top < _raw_bar(bar):
                continue
            for c in range(start, stop):
                v = _ordered(row[c])
                if v >= bar and (v > bar or lo + c < hi[0]):
                    _replace_worst(hk, hi, v, lo + c, kk, hx, _exact_dot(a, x_bits[c]))
                    bar = hk[0]


# symmetric_scan: every row's best lists, and list products offered to the list rows too
@njit(cache=True, parallel=True)
def top_lists(scores, bf16_bits, lists, values):
    """Each row's best lists (scores (m, nlist) as `_row_as_f32` takes them), best first, ties
    by smaller list number, into lists and values (m, most); the order probe_lists picks
    its lists in, so the first `count` of them are the lists it would probe. A bf16 row
    whose most-th best is positive and near its best goes by `_top_by_kth`; any other by
    sorted insertion (`_best_of`)."""
    m, nlist = scores.shape
    most = lists.shape[1]
    for r in prange(m):
        if bf16_bits and _top_by_kth(scores[r].view(np.int16), lists[r], values[r]):
            continue
        row = np.empty(nlist, np.float32)
        bits = row.view(np.int32)
        for c in range(nlist):  # as _row_as_f32, without its first maximum's chain
            bits[c] = _bits32(scores[r, c], bf16_bits)
        top_v, top_c = np.empty(most, np.float32), np.empty(most, np.int64)
        best = _best_of(row, most, top_v, top_c)
        for t in range(len(best)):
            lists[r, t] = best[t]
            values[r, t] = row[best[t]]


@njit(cache=True)
def _top_by_kth(row, lists, values):
    """top_lists for one row of bf16 bits as int16, when the row's most-th best key (most =
    len(lists)) is positive and within KTH_WINDOW of its best (`_kth_of_row`, counting passes
    that vectorise): the scores above that key and the first of those equal to it are the
    best, and only they are sorted (equal ones stay in list order). False, with nothing
    written, for any other row. On 1M derived rows against 2,000 lists every row went this
    way, in about two thirds of the time of a sorted insertion of each score reaching the
    32 best so far (graph_choices.txt)."""
    most = len(lists)
    kth = _kth_of_row(row, most)
    if kth == EMPTY_KEY:
        return False
    ties = most - _count_from(row, kth + 1)  # of the scores equal to the most-th best
    keys = np.empty(most, np.int16)
    n = 0
    for c in range(len(row)):
        key = row[c]
        if key < kth or (key == kth and ties == 0):
            continue
        if key == kth:
            ties -= 1
        at = n
        while at > 0 and keys[at - 1] < key:
            keys[at], lists[at] = keys[at - 1], lists[at - 1]
            at -= 1
        keys[at], lists[at] = key, c
        n += 1
    bits = values.view(np.int32)
    for t in range(most):
        bits[t] = _bits32(np.uint16(keys[t]), True)
    return True


@njit(cache=True, inline="always")
def _probes(lists, counts, r, lst):
    """Whether `lst` is among the first `counts[r]` of row r's `lists[r]`."""
    for t in range(counts[r]):
        if lists[r, t] == lst:
            return True
    return False


COLUMN_TILE = 16  # columns whose heaps a thread updates together: one cache line a product row


@njit(cache=True, parallel=True)
def offer_to_list_rows(scores, ncol, tol, sources, s32, homes, cols, c32, col_heaps, probed,
                       counts, heap_s, heap_i):
    """Offer a list product's columns to the heaps of the list's rows: column c < ncol (the
    row `cols[c]`, fp32 c32[c], heap `col_heaps[c]`, -1 for none) takes row j's score with
    its source `sources[j]` (fp32 s32[j]), unless the source's home list `homes[j]` is among
    the first `counts` of the row's `probed` lists (the row's own scan of that list scores
    the pair). The scores are screened, as offer_rescored_rows takes them: one within tol of
    a heap's bar is scored again (`_dot32`) and that score is offered. Columns go in tiles
    of COLUMN_TILE, each product row read once a tile, and a tile's scores are first compared
    with its bars all at once (one vector compare): most pass none."""
    kk = heap_s.shape[1]
    m = scores.shape[0]
    for tile in prange((ncol + COLUMN_TILE - 1) // COLUMN_TILE):
        c0 = tile * COLUMN_TILE
        c1 = min(c0 + COLUMN_TILE, ncol)
        bars = np.full(COLUMN_TILE, np.inf, np.float32)
        for c in range(c0, c1):
            if col_heaps[c] >= 0:
                bars[c - c0] = heap_s[col_heaps[c], 0] - tol
        for j in range(m):
            row = scores[j]
            passes = False
            for c in range(c0, c1):
                passes |= row[c] >= bars[c - c0]
            if not passes:
                continue
            for c in range(c0, c1):
                if row[c] < bars[c - c0] or _probes(probed, counts, cols[c], homes[j]):
                    continue
                h = col_heaps[c]
                hs, hi = heap_s[h], heap_i[h]
                v = _dot32(s32, j, c32, c)
                if _worse(hs[0], hi[0], v, sources[j]):
                    _replace_worst(hs, hi, v, sources[j], kk)
                    bars[c - c0] = hs[0] - tol


@njit(cache=True)
def probers_by_list(lists, counts, wanted, nlist):
    """(offsets (nlist + 1,), rows int32) of every row's probes beyond its home list (the
    first `counts[r]` of `lists[r]` but the first), grouped by list, rows ascending within a
    list; only lists with `wanted` set (a counting sort: no (row, list) pair arrays)."""
    n = lists.shape[0]
    offsets = np.zeros(nlist + 1, np.int64)
    for r in range(n):
        for t in range(1, counts[r]):
            lst = lists[r, t]
            if wanted[lst]:
                offsets[lst + 1] += 1
    for lst in range(nlist):
        offsets[lst + 1] += offsets[lst]
    rows = np.empty(offsets[nlist], np.int32)
    fill = offsets[:nlist].copy()
    for r in range(n):
        for t in range(1, counts[r]):
            lst = lists[r, t]
            if wanted[lst]:
                rows[fill[lst]] = r
                fill[lst] += 1
    return offsets, rows


@njit(cache=True, parallel=True)
def candidates_reached(lists, counts, rows, truth):
    """For each row `rows[a]`, how many of `truth[a]` (ids, -1 for none) a both-ways search
    makes its candidates (symmetric_scan): j is one if j's own list `lists[j, 0]` is among
    the first `counts[r]` of the row's `lists[r]`, or the row's own list among j's first
    `counts[j]`."""
    hits = np.zeros(len(rows), np.int64)
    for a in prange(len(rows)):
        r = rows[a]
        for j in truth[a]:
            if j >= 0 and (_probes(lists, counts, r, lists[j, 0])
                           or _probes(lists, counts, j, lists[r, 0])):
                hits[a] += 1
    return hits
