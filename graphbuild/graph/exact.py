"""Exact top-k cosine neighbours by blocked search: no N x N matrix, no I/O.

The plan, for rows R of an fp16 matrix X (unit-norm rows) against all its rows:

1. Candidate pass in half precision. Blocks of rows are multiplied in bf16 on CPUs (fast on
   AVX-512 BF16 / AMX; fp16 matrix products are ~100x slower there) and in fp16 on CUDA. Each
   row keeps the `capacity` best approximate scores offered so far (`_Candidates`; on CPUs
   `_CompiledCandidates`, the same rules in compiled loops: 1.6x the whole search at 90k).
2. Filtering. Each row has a keep threshold (from its current k-th best, first taken in
   its diagonal block, offered first), and only scores reaching it are offered. A
   block of scores is reduced once to maxima over groups of rows (`_Blocks`), compared as
   int16 bit patterns against integer keys of the thresholds; only the few groups that can
   hold a hit are read again. Thresholds only rise, so filtering with a stale one is safe,
   and hits are merged lazily in bulk.
3. Symmetry. Inside R, the product of block I with block J (I < J) is computed once and used
   for I's rows and, column-wise, for J's rows: about half the multiply-adds. Rows outside
   R (other query shards own them) are plain columns: R's rows against them, one direction.
4. Exact re-rank. A rigorous bound b(v) on |approximate - exact| (see `ErrorBound`) says
   which candidates can still be in the exact top-k: every candidate whose score could reach
   the lowest value the exact k-th best can take. Those are scored again exactly and the
   best k kept, ties broken by the smaller node id.
5. Capacity overflow. If a row ever dropped a candidate that could still matter, the row is
   searched again in a plain pass with a larger capacity, so the result stays exact.
6. Locality order. R's rows are searched in an order that puts similar rows together (a few
   bf16 k-means iterations, clusters about one block each, chained so neighbouring clusters
   are alike). Each row's diagonal block then holds most of its neighbours, so its first
   threshold is close to the final one and far blocks pass almost nothing: on 90k real
   captions this halves the hits offered. Candidates carry original ids throughout and
   results are returned in the original order, so the order changes speed, never output.

Exact scores are fp64 dot products of the stored fp16 values: every product of two fp16
numbers is a multiple of 2**-48 with at most 22 significant bits (so it is also exact in
fp32, which is where it is computed), and every partial sum stays a multiple of 2**-48
below 2**5 when |x|*|y| < 32, so fp64 holds each step exactly, whatever the summation order.
The stored sim is that exact value rounded once to fp32, so the output does not depend on
block size, shard count, thread count, BLAS, or which candidates the filter let through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from graphbuild import options
from graphbuild.graph.hits import padded_bands
from graphbuild.memory import return_freed_memory

log = logging.getLogger(__name__)

F32_UNIT_ROUNDOFF = 2.0 ** -24
# Unit roundoff (half the spacing just above 1.0) of the half-precision compute types.
HALF_UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
EXACT_NORM_LIMIT = 5.0     # |x| below this keeps fp64 dot products of fp16 values exact
THRESHOLD_SLACK = 2e-6     # covers fp32 rounding of the threshold and of the stored sims
GROUP = 16  # rows per max-pooled group when filtering a block of scores
MERGE_BANDS = (16, 64)  # hit counts per row that bound one padded merge (hits.py)
SCORE_FLOOR = -1e30  # below every finite score; filtering thresholds never go lower
COMPILED_ON_CPU = True  # CPU searches use the compiled candidate buffers (tests flip it)


def default_capacity(k: int) -> int:
    """Candidates kept per row: the k best plus room for near-ties within the error bound."""
    return 2 * k + 16


@dataclass(frozen=True)
class ErrorBound:
    """|v - s| <= absolute + relative * |v| for every computed half-precision score v of an
    exact score s (derivation in `error_bound`)."""

    absolute: float
    relative: float

    def lowest_kth(self, t):
        """The lowest value the exact k-th best can take when the approximate k-th best is t:
        k candidates have v >= t, and v - b(v) increases with v."""
        return t - self.absolute - self.relative * t.abs()

    def keep_threshold(self, t):
        """Smallest v whose upper bound v + b(v) reaches lowest_kth(t); b(v) grows with |v|,
        so v + b(v) increases and can be inverted piecewise. Works on torch tensors."""
        import torch

        low = self.lowest_kth(t) - self.absolute
        up = low / (1.0 + self.relative)
        down = low / (1.0 - self.relative)
        return torch.where(low >= 0, up, down) - THRESHOLD_SLACK


def error_bound(x16: np.ndarray, half: str = "bf16", block_rows: int = 65536) -> ErrorBound:
    """A rigorous bound for half-precision dot products of the rows of x16 (fp16).

    Let x, y be rows as fp32 (exact copies of fp16), x~, y~ their roundings to the compute
    type, e = x~ - x, and z the fp32-accumulated dot product of x~ and y~, v = z rounded to
    the output type (torch returns bf16/fp16 products). With u the output unit roundoff and
    g = d*2**-24 / (1 - d*2**-24) (fp32 accumulation; products of half-precision numbers are
    exact in fp32):
      |x~.y~ - x.y| = |e_x.y~ + x.e_y| <= |e_x||y~| + |x||e_y|          (Cauchy-Schwarz)
      |z - x~.y~|  <= g * |x~||y~|                                       (any summation order)
      |v - z|      <= u |z|  and |z| <= |v| + |v - z|,  so  |v - z| <= u/(1-u) |v|.
    With maxima over all rows: absolute = E*N~ + N*E + g*N~**2 and relative = u/(1-u), where
    N, N~, E are the largest |x|, |x~| and |e|. For unit vectors in bf16 the worst case of
    each |e| is 2**-8 (relative rounding of 2**-8 per element), so absolute <= about
    2*2**-8 + 2.3e-5 at d=384; the measured E is smaller (rounding errors do not all take
    their maximum), which this bound uses. fp16 inputs are exact in fp16: E = 0.
    """
    import torch

    n, d = x16.shape
    dtype = half_dtype(half)
    norm = rounded_norm = err = 0.0
    for lo in range(0, n, block_rows):
        x = torch.from_numpy(np.ascontiguousarray(x16[lo:lo + block_rows])).float()
        xr = x.to(dtype).float()
        norm = max(norm, float(x.norm(dim=1).max()))
        rounded_norm = max(rounded_norm, float(xr.norm(dim=1).max()))
        err = max(err, float((xr - x).norm(dim=1).max()))
    # Norms are computed in fp32; a relative margin of 1e-5 covers their own rounding.
    norm, rounded_norm, err = (v * (1 + 1e-5) for v in (norm, rounded_norm, err))
    g = d * F32_UNIT_ROUNDOFF / (1 - d * F32_UNIT_ROUNDOFF)
    u = HALF_UNIT_ROUNDOFF[half]
    return ErrorBound(absolute=err * rounded_norm + norm * err + g * rounded_norm ** 2,
                      relative=u / (1 - u))


def half_dtype(half: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[half]


def pick_half(device: str) -> str:
    """bf16 on CPUs, fp16 on CUDA (tensor cores; fp16 keeps 3 more mantissa bits)."""
    return "fp16" if device.startswith("cuda") else "bf16"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def exact_dots(x16: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """x16[rows[p]] . x16[cols[p]] for each pair p, exactly, rounded once to fp32.

    Products of two fp16 numbers are exact in fp32 (22 significant bits, no underflow), and
    their fp64 sum is exact (module docstring), so the fp32 products are summed in fp64."""
    return _exact_dots_of_rows(x16, np.asarray(rows), np.arange(len(rows)), cols)


def _exact_dots_of_rows(x16: np.ndarray, rows: np.ndarray, rr: np.ndarray,
                        cols: np.ndarray) -> np.ndarray:
    """exact_dots(x16, rows[rr], cols), converting each of `rows` to fp32 once; compiled
    (kernels.exact_dots), as the re-rank's candidates are many short gathers."""
    import torch

    from graphbuild.graph.kernels import F16_AS_F32, exact_dots, threads_as_torch

    q = torch.from_numpy(x16[rows]).float().numpy()
    out = np.empty(len(rr), np.float32)
    threads_as_torch()
    exact_dots(np.ascontiguousarray(x16).view(np.uint16), F16_AS_F32, q,
               np.asarray(rr, np.int64), np.asarray(cols, np.int64), out)
    return out


class _Candidates:
    """For each of n rows, the `capacity` best approximate scores offered so far (best
    first), their column ids, the best score ever pushed out (`dropped`), and a keep
    threshold `thr` below which no score can matter (any entry under it may be skipped).

    Hits are offered in bulk (`add`: flat row, column, score triples) and merged lazily:
    thresholds only rise, so filtering with a stale (lower) threshold is safe, just looser."""

    def __init__(self, n: int, k: int, capacity: int, bound: ErrorBound, id_dtype, device,
                 half_dtype=None, merge_every: int = 1 << 16):
        import torch

        self.k, self.capacity, self.bound, self.half_dtype = k, capacity, bound, half_dtype
        # Scores are half-precision products, so the half dtype holds them exactly: half the
        # bytes of fp32 (the largest buffer of the search).
        self.scores = torch.full((n, capacity), -torch.inf, dtype=half_dtype or torch.float32,
                                 device=device)
        self.ids = torch.full((n, capacity), -1, dtype=id_dtype, device=device)
        self.dropped = torch.full((n,), -torch.inf, dtype=torch.float32, device=device)
        # Filtering thresholds and their int16 keys (`_int16_key`), one extra sentinel entry
        # (+inf: passes nothing) for padding rows. Never below SCORE_FLOOR, which is under
        # any real score, so -inf sentinels (self, padding) never pass.
        self.thr = torch.full((n + 1,), SCORE_FLOOR, dtype=torch.float32, device=device)
        self.thr[n] = torch.inf
        self.key = _int16_key(self.thr, half_dtype)
        self.pending: list[tuple] = []
        self.pending_count = 0
        self.merge_every = merge_every

    def threshold(self, lo: int, hi: int):
        return self.bound.keep_threshold(self.scores[lo:hi, self.k - 1].float())

    def by_threshold(self, lo: int, hi: int):
        """Rows lo..hi, lowest filtering threshold first."""
        import torch

        return torch.argsort(self.thr[lo:hi]) + lo

    def _refresh(self, at) -> None:
        thr = self.bound.keep_threshold(self.scores[at, self.k - 1].float())
        thr.clamp_(min=SCORE_FLOOR)
        self.thr[at] = thr
        self.key[at] = _int16_key(thr, self.half_dtype)

    def add(self, rows, cols, vals) -> None:
        """Queue hits (row index into this buffer, column id, approximate score)."""
        if len(rows):
            self.pending.append((rows, cols, vals))
            self.pending_count += len(rows)
            if self.pending_count >= self.merge_every:
                self.flush()

    def flush(self) -> None:
        import torch

        if not self.pending:
            return
        rows = torch.cat([p[0] for p in self.pending])
        cols = torch.cat([p[1] for p in self.pending])
        vals = torch.cat([p[2] for p in self.pending])
        self.pending, self.pending_count = [], 0
        self._merge_sparse(rows, cols, vals)

    def offer(self, lo: int, hi: int, scores, cols, counted: bool = True) -> None:
        """Merge dense scores of rows lo..hi (dim 0) against the columns with ids `cols`.

        Only scores that reach the current threshold can matter, and the threshold only
        rises, so a block adds at most its per-row count of those (capped at capacity + 1:
        the top capacity + 1 of the union is all the merge needs). counted=False skips the
        count (a pass as slow as the top-k) where most rows will pass anyway."""
        import torch

        m = self.capacity + 1
        if counted:
            # int32 sums: a bool sum widens to int64 and runs ~3x slower on CPU
            hits = (scores.float() >= self.thr[lo:hi, None]).sum(dim=1, dtype=torch.int32)
            m = min(m, int(hits.max()))
            if m == 0:
                return
        m = min(m, scores.shape[1])
        vals, pos = torch.topk(scores, m, dim=1, sorted=False)  # as fast in bf16 as in fp32
        self._merge_rows(torch.arange(lo, hi, device=vals.device), vals.float(),
                         cols[pos].to(self.ids.dtype))

    def _merge_sparse(self, rows, cols, vals) -> None:
        """Merge (row, column, score) hits, padded per band of hit counts (hits.py)."""
        for touched, pv, pi in padded_bands(rows, vals, cols.to(self.ids.dtype), len(self.thr),
                                            MERGE_BANDS):
            self._merge_rows(touched, pv, pi)

    def _merge_rows(self, at, vals, ids) -> None:
        """Keep the best `capacity` of each listed row's buffer plus its new (vals, ids)."""
        import torch

        all_v = torch.cat([self.scores[at].float(), vals], dim=1)
        all_i = torch.cat([self.ids[at], ids], dim=1)
        top_v, top_p = torch.topk(all_v, min(self.capacity + 1, all_v.shape[1]), dim=1)
        self.scores[at] = top_v[:, :self.capacity].to(self.scores.dtype)  # exact: see init
        self.ids[at] = torch.gather(all_i, 1, top_p[:, :self.capacity])
        if top_v.shape[1] > self.capacity:
            self.dropped[at] = torch.maximum(self.dropped[at], top_v[:, self.capacity])
        self._refresh(at)

    def finish(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, which to re-rank, which rows overflowed) for rows lo..hi."""
        self.flush()
        thr = self.threshold(lo, hi)
        keep = (self.scores[lo:hi] >= thr[:, None]) & (self.ids[lo:hi] >= 0)
        overflow = self.dropped[lo:hi] >= thr
        return (self.ids[lo:hi].cpu().numpy(), keep.cpu().numpy(), overflow.cpu().numpy())


class _CompiledCandidates:
    """_Candidates and _Blocks for CPU searches, in compiled loops (kernels.py): each row
    appends the scores that reach its filter key to a buffer of `capacity`; a full buffer
    is compacted, its k-th best raising the key. No hit lists, no top-k passes. Scores are
    bf16, held as int16 keys that order like their values (kernels._ordered)."""

    def __init__(self, n: int, k: int, capacity: int, bound: ErrorBound, id_dtype):
        import torch

        from graphbuild.graph import kernels

        self.k, self.bound = k, bound
        self.cand_k = np.full((n, capacity), kernels.EMPTY_KEY, np.int16)
        self.cand_i = np.full((n, capacity), -1, torch.empty(0, dtype=id_dtype).numpy().dtype)
        self.count = np.zeros(n, np.int32)
        self.dropped = np.full(n, kernels.EMPTY_KEY, np.int16)
        self.filter_keys = filter_keys(bound)
        # one extra entry for padding rows (the sentinel): a key no score reaches
        self.key = np.append(np.full(n, self.filter_keys[0], np.int16), kernels.NO_PASS_KEY)
        kernels.threads_as_torch()

    def _state(self):
        return (self.k, self.cand_k, self.cand_i, self.count, self.dropped, self.filter_keys,
                self.key)

    def by_threshold(self, lo: int, hi: int):
        """Rows lo..hi, lowest filter key first."""
        import torch

        return torch.argsort(torch.from_numpy(self.key[lo:hi])) + lo

    def offer(self, lo: int, hi: int, scores, cols, counted: bool = True) -> None:
        """Offer dense bf16 scores of rows lo..hi against the columns with ids `cols`."""
        from graphbuild.graph.kernels import offer_dense

        offer_dense(_bits(scores), lo, cols.numpy(), *self._state())

    def pairs(self, s, ip, ig, jl: int, cols, want_i: bool, want_j: bool) -> None:
        """As _Blocks.pairs."""
        import torch

        from graphbuild.graph.kernels import offer_to_columns, offer_to_rows

        gmax = s.view(s.shape[0] // GROUP, GROUP, s.shape[1]).view(torch.int16).amax(dim=1)
        bits, gmax = _bits(s), gmax.numpy()
        if want_i:
            offer_to_rows(bits, gmax, ip.numpy(), cols.numpy(), *self._state())
        if want_j:
            offer_to_columns(bits, gmax, jl, ig.numpy(), *self._state())

    def finish(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As _Candidates.finish, with the threshold from the k-th best as there (fp32)."""
        import torch

        from graphbuild.graph.kernels import key_values as values
        from graphbuild.graph.kernels import kth_keys

        kth = np.empty(hi - lo, np.int16)
        kth_keys(lo, hi, self.k, self.cand_k, self.cand_i, self.count, kth)
        thr = self.bound.keep_threshold(torch.from_numpy(values(kth))).numpy()
        ids = self.cand_i[lo:hi]
        held = np.arange(ids.shape[1]) < self.count[lo:hi, None]
        keep = (values(self.cand_k[lo:hi]) >= thr[:, None]) & held
        return ids, keep, values(self.dropped[lo:hi]) >= thr


def filter_keys(bound: ErrorBound, margin: float = 1e-6) -> np.ndarray:
    """For each bf16 key t of a k-th best (at [t + 32768]), the largest key whose value is
    at most `keep_threshold` of it: every score that can matter has a key at least this.
    Computed in fp64 and lowered by `margin` * (1 + |t|), far more than the fp32 rounding
    of the threshold that `finish` applies; never below SCORE_FLOOR's key."""
    from graphbuild.graph.kernels import KEY_AS_F32

    t = KEY_AS_F32.astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf: never a k-th best of finite scores
        low = t - bound.absolute - bound.relative * np.abs(t) - bound.absolute
        thr = np.where(low >= 0, low / (1 + bound.relative), low / (1 - bound.relative))
        thr = thr - THRESHOLD_SLACK - margin * (1 + np.abs(t))
    thr = np.maximum(np.nan_to_num(thr, nan=SCORE_FLOOR), SCORE_FLOOR)
    return (np.searchsorted(KEY_AS_F32, thr, side="right") - 1 - 32768).astype(np.int16)


def _bits(scores) -> np.ndarray:
    """A bf16 tensor's bit patterns as an int16 array, without a copy."""
    import torch

    return scores.view(torch.int16).numpy()


def _rerank(x16: np.ndarray, rows: np.ndarray, cand: np.ndarray, keep: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each row's kept candidates: by sim descending, then id ascending."""
    if len(rows) == 0:
        return np.empty((0, k), np.int64), np.empty((0, k), np.float32)
    keep = keep & (cand != rows[:, None])
    if keep.sum(axis=1).min() < k:
        raise AssertionError("a row kept fewer candidates than k; the error bound is broken")
    rr, cc = np.nonzero(keep)
    ids = np.where(keep, cand, np.iinfo(np.int64).max).astype(np.int64)
    sims = np.full(cand.shape, -np.inf, np.float32)
    sims[rr, cc] = _exact_dots_of_rows(x16, rows, rr, ids[rr, cc])
    order = np.lexsort((ids, -sims), axis=1)[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)


def _blocks(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, stop)) for lo in range(start, stop, size)]


class _Search:
    """State and helpers shared by the symmetric pass and the overflow fallback."""

    def __init__(self, x16: np.ndarray, k: int, block_rows: int, device: str, half: str,
                 bound: ErrorBound):
        import torch

        self.x16, self.k, self.block_rows = x16, k, block_rows
        self.device, self.dtype, self.bound = torch.device(device), half_dtype(half), bound
        self.id_dtype = torch.int32 if x16.shape[0] < 2 ** 31 else torch.int64

    def half(self, lo: int, hi: int):
        """Rows lo..hi in the compute type."""
        return self.half_rows(slice(lo, hi))

    def half_rows(self, rows: np.ndarray | slice, step: int = 65536):
        """x16[rows] in the compute type, converted in steps: no fp32 (or fp16) copy of all
        of them at once (at 1M rows that would be 1.5 GiB)."""
        import torch

        count = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
        out = torch.empty((count, self.x16.shape[1]), dtype=self.dtype, device=self.device)
        for lo in range(0, count, step):
            part = (slice(rows.start + lo, rows.start + min(lo + step, count))
                    if isinstance(rows, slice) else rows[lo:lo + step])
            x = torch.from_numpy(np.ascontiguousarray(self.x16[part])).to(self.device)
            out[lo:lo + step] = x if self.device.type == "cuda" else x.float()
        return out

    def scores(self, a, b):
        return a @ b.T

    def plain(self, rows: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows (any ids) against every row, one direction, growing the capacity until no
        row overflows. Used for the rare rows whose near-ties overflow the buffers."""
        import torch

        n = self.x16.shape[0]
        ids = np.empty((len(rows), self.k), np.int64)
        sims = np.empty((len(rows), self.k), np.float32)
        todo = np.arange(len(rows))
        while len(todo):
            capacity = min(capacity * 4, n - 1)
            log.info("%d rows have more near-ties than the candidate buffer; searching them "
                     "again with capacity %d", len(todo), capacity)
            sub = rows[todo]
            cands = _Candidates(len(sub), self.k, capacity, self.bound, self.id_dtype,
                                self.device)
            xq = self.half_rows(sub)
            self_col = torch.from_numpy(sub).to(self.device)
            for clo, chi in _blocks(0, n, self.block_rows):
                s = self.scores(xq, self.half(clo, chi))
                mine = (self_col >= clo) & (self_col < chi)
                s[mine.nonzero()[:, 0], (self_col[mine] - clo)] = -torch.inf
                cands.offer(0, len(sub), s, torch.arange(clo, chi, device=self.device))
            cand, keep, overflow = cands.finish(0, len(sub))
            done = ~overflow if capacity < n - 1 else np.ones(len(sub), bool)
            ids[todo[done]], sims[todo[done]] = _rerank(self.x16, sub[done], cand[done],
                                                        keep[done], self.k)
            todo = todo[~done]
        return ids, sims


def _int16_key(thr, dtype=None):
    """Integer keys for comparing half-precision scores (bf16 or fp16, `dtype`) as int16 bit
    patterns: every score v >= thr has bits(v) >= key. For thr > 0 the key is the pattern of
    thr rounded down to `dtype` (positive values order like their bit patterns, negative
    ones have negative patterns); for thr <= 0 everything passes (the int16 order of
    negative patterns is reversed). +inf maps to the pattern of +inf, above every finite."""
    import torch

    if dtype is None or dtype == torch.bfloat16:
        bits = (thr.view(torch.int32) >> 16).to(torch.int16)   # truncation rounds down
    else:
        h = thr.to(dtype)                                       # nearest; step down if above
        bits = h.view(torch.int16) - (h.float() > thr).to(torch.int16)
    return torch.where(thr > 0, bits, torch.full_like(bits, -32768))


class _Blocks:
    """Filters block products with per-row thresholds through group maxima.

    A product block s (rows of I x rows of J, bf16) is reduced once to the max of each group
    of GROUP consecutive I rows per J column, comparing bf16 bit patterns as int16 (a
    vectorised reduction over contiguous rows). A group can hold a J-row hit only if its
    max reaches that column's key, and an I-row hit only if it reaches the smallest key of
    its rows; I's rows are sorted by threshold so a group's keys are close. Only the groups
    that pass are read again, and each of their entries is compared exactly in fp32."""

    def __init__(self, cands: _Candidates, group: int = GROUP):
        self.cands, self.group = cands, group

    def pairs(self, s, ip, ig, jl: int, cols, want_i: bool, want_j: bool) -> None:
        """Offer the hits of s = (I rows) x (J rows), bf16 of shape (groups * GROUP, bj).

        ip, ig: local (into the candidate buffers) and original ids of s's rows; padding rows
        have -inf scores and ip pointing at the sentinel. cols: original ids of s's columns.
        want_i: offer row r's scores to I's rows; want_j: offer column j to local row jl + j
        (which must then be a query row)."""
        import torch

        g, c = self.group, self.cands
        nb, bj = s.shape[0] // g, s.shape[1]
        s3 = s.view(nb, g, bj)
        gmax = s3.view(torch.int16).amax(dim=1)
        hit = None
        if want_j:
            thr_j = c.thr[jl:jl + bj]
            hit = gmax >= c.key[jl:jl + bj]
        if want_i:
            thr_i = c.thr[ip].view(nb, g)
            hit_i = gmax >= c.key[ip].view(nb, g).amin(dim=1, keepdim=True)
            hit = hit_i if hit is None else hit.logical_or_(hit_i)
        gi, j = hit.nonzero(as_tuple=True)
        if len(gi) == 0:
            return
        v = s3[gi, :, j].float()                                   # (hits, g)
        if want_i:
            f = (v >= thr_i[gi]).view(-1).nonzero()[:, 0]
            h = f // g
            c.add(ip[gi[h] * g + f % g], cols[j[h]], v.view(-1)[f])
        if want_j:
            f = (v >= thr_j[j][:, None]).view(-1).nonzero()[:, 0]
            h = f // g
            c.add(j[h] + jl, ig[gi[h] * g + f % g], v.view(-1)[f])


def locality_order(xq, block_rows: int, iters: int = 8, seed: int = 0):
    """A permutation of xq's rows (half precision, on its device) that puts similar rows
    together: spherical k-means with about one block of rows per cluster, clusters chained
    greedily so that each follows the most similar one left, rows in id order within one.
    Any order gives the same search result; this one makes the thresholds tight early."""
    import torch

    from graphbuild.graph.kmeans import nearest, spherical_kmeans

    n = xq.shape[0]
    n_clusters = n // block_rows
    if n_clusters < 2:
        return torch.arange(n, device=xq.device)
    centres = spherical_kmeans(xq, n_clusters, iters, seed)
    assign = nearest(xq, centres)
    sim = centres @ centres.T
    chain, left = [0], torch.ones(n_clusters, dtype=torch.bool, device=sim.device)
    left[0] = False
    for _ in range(n_clusters - 1):
        nxt = int(torch.where(left, sim[chain[-1]], -torch.inf).argmax())
        chain.append(nxt)
        left[nxt] = False
    rank = torch.empty(n_clusters, dtype=torch.long, device=sim.device)
    rank[torch.tensor(chain, device=sim.device)] = torch.arange(n_clusters, device=sim.device)
    return torch.argsort(rank[assign] * n + torch.arange(n, device=xq.device))


def blocked_topk(x16: np.ndarray, k: int, rows: range | None = None,
                 block_rows: int = options.BLOCK_ROWS, capacity: int | None = None,
                 device: str | None = None, bound: ErrorBound | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 reload: Callable[[], np.ndarray] | None = None,
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Exact top-k neighbours (cosine = dot product of unit rows) of `rows` among all rows
    of x16 (fp16, shape (n, d)), the row itself excluded.

    Yields (first row, ids (r, k) int64, sims (r, k) float32) per block of rows, in order,
    once the search is done; each row's neighbours best first, equal sims by smaller id.
    `on_progress` receives finished work in units of whole query rows, so a rate reads as
    queries/s. `reload` gives x16 again: when `rows` are all of x16's, the search lets x16 go
    while it multiplies (the half-precision copy serves) and reloads it to re-rank, so the
    two copies never coexist (768 MB less at the peak for 1M rows of 384). The caller must
    then hold no other reference to x16.
    """
    import torch

    n, _ = x16.shape
    rows = range(n) if rows is None else rows
    if not 0 < k < n:
        raise ValueError(f"k must be in 1..{n - 1}, got {k}")
    if x16.dtype != np.float16:
        raise ValueError(f"x16 must be float16, got {x16.dtype}")
    device = device or default_device()
    half = pick_half(device)
    bound = bound or error_bound(x16, half)
    capacity = min(capacity or default_capacity(k), n - 1)
    if capacity < k:
        raise ValueError(f"capacity must be at least k={k}, got {capacity}")
    search = _Search(x16, k, block_rows, device, half, bound)
    m = len(rows)
    # Query rows are handled by position 0..m-1 in locality order; gid maps a position to
    # its original id, which is what candidates hold and ties are broken by.
    row_blocks = _blocks(0, m, block_rows)
    other = _blocks(0, rows.start, block_rows) + _blocks(rows.stop, n, block_rows)
    if other and row_blocks:
        log.info("rows %d..%d of %d: symmetric products among these rows, plain products "
                 "against the other %d rows", rows.start, rows.stop, n, n - m)
    progress = _Progress(on_progress, n)
    g, dev = GROUP, search.device
    out_ids = np.empty((m, k), np.int32 if n < 2**31 else np.int64)
    out_sims = np.empty((m, k), np.float32)

    def padded(x, size):
        return x if x.shape[0] == size else torch.cat(
            [x, x.new_zeros((size - x.shape[0], x.shape[1]))])

    with _exact_cuda_matmul():
        order = locality_order(search.half(rows.start, rows.stop), block_rows)
        gid = order + rows.start
        gid_np = gid.cpu().numpy()
        xq = search.half_rows(gid_np)  # the query rows in that order, converted once
        if reload is not None and not other:
            x16 = search.x16 = None
        # The buffers come after the ordering's temporaries are freed and trimmed, so the
        # peak is the search's own: fp16 rows + half query rows + buffers.
        return_freed_memory()
        if search.device.type == "cpu" and COMPILED_ON_CPU:
            cands = filt = _CompiledCandidates(m, k, capacity, bound, search.id_dtype)
        else:
            cands = _Candidates(m, k, capacity, bound, search.id_dtype, search.device,
                                search.dtype)
            filt = _Blocks(cands)
        sentinel = m
        # Diagonal blocks first: in locality order a row's own block holds most of its
        # neighbours, so its k-th best there is a tight first threshold and later blocks
        # pass few entries.
        for lo, hi in row_blocks:
            b = hi - lo
            xi = xq[lo:hi]
            s = search.scores(xi, xi)
            s.fill_diagonal_(-torch.inf)
            # the buffers are empty: each row keeps its block's best, so its first threshold
            # comes from its exact k-th best in the block
            cands.offer(lo, hi, s, gid[lo:hi], counted=False)
            progress.add(b * b)

        def query_block(lo, hi):
            """Rows lo..hi sorted by threshold, so each group's smallest key is close to
            all its keys: (padded half rows, local ids, original ids)."""
            b = hi - lo
            pb = -(-b // g) * g
            perm = cands.by_threshold(lo, hi)
            pad = torch.full((pb - b,), sentinel, device=dev, dtype=perm.dtype)
            # index_select: ~5x faster than xq[perm] for a CPU gather of whole rows
            return (padded(xq.index_select(0, perm), pb), torch.cat([perm, pad]),
                    torch.cat([gid.index_select(0, perm), pad]))

        def masked_scores(xi, xj, b):
            s = search.scores(xi, xj)
            if xi.shape[0] > b:
                s[b:] = -torch.inf
            return s

        # Block pairs by distance in the locality order: neighbouring blocks hold most of
        # each other's neighbours, so thresholds are nearly final before far pairs come.
        nb = len(row_blocks)
        for off in range(1, nb):
            for bi in range(nb - off):
                (lo, hi), (clo, chi) = row_blocks[bi], row_blocks[bi + off]
                xi, ip, ig = query_block(lo, hi)
                s = masked_scores(xi, xq[clo:chi], hi - lo)
                filt.pairs(s, ip, ig, clo, gid[clo:chi], True, True)
                progress.add(2 * (hi - lo) * (chi - clo))
        xi = s = None
        if not other:
            xq = None  # not needed to re-rank: its bytes go to the results
            if x16 is None:
                x16 = search.x16 = reload()
        for lo, hi in row_blocks:
            if other:
                xi, ip, ig = query_block(lo, hi)
            for clo, chi in other:
                s = masked_scores(xi, search.half(clo, chi), hi - lo)
                filt.pairs(s, ip, ig, 0, torch.arange(clo, chi, device=dev), True, False)
                progress.add((hi - lo) * (chi - clo))
            cand, keep, overflow = cands.finish(lo, hi)
            where = gid_np[lo:hi] - rows.start
            ok = ~overflow
            out_ids[where[ok]], out_sims[where[ok]] = _rerank(x16, gid_np[lo:hi][ok], cand[ok],
                                                              keep[ok], k)
            if overflow.any():
                out_ids[where[overflow]], out_sims[where[overflow]] = search.plain(
                    gid_np[lo:hi][overflow], capacity)
    for lo, hi in _blocks(0, m, block_rows):
        yield rows.start + lo, out_ids[lo:hi].astype(np.int64), out_sims[lo:hi]


class _Progress:
    """Turns multiply-adds done into whole query rows (n columns each) for a Reporter."""

    def __init__(self, callback: Callable[[int], None] | None, n_cols: int):
        self.callback, self.n_cols, self.done, self.told = callback, n_cols, 0, 0

    def add(self, pairs: int) -> None:
        self.done += pairs
        rows = self.done // self.n_cols
        if self.callback is not None and rows > self.told:
            self.callback(rows - self.told)
            self.told = rows


class _exact_cuda_matmul:
    """On CUDA, forbid fp16 reductions inside matmuls (the bound assumes fp32 accumulation)."""

    def __enter__(self):
        import torch

        self.saved = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    def __exit__(self, *exc):
        import torch

        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = self.saved
