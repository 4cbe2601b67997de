"""Exact top-k cosine neighbours by blocked search: no N x N matrix, no I/O.

The plan, for rows R of an fp16 matrix X (unit-norm rows) against all its rows:

1. Candidate pass in half precision. Blocks of rows are multiplied in bf16 on CPUs (fast on
   AVX-512 BF16 / AMX; fp16 matrix products run at a few GFLOP/s there) and in fp16 on
   CUDA. Each row keeps the `capacity` best approximate scores offered so far (`_Candidates`;
   on CPUs `_CompiledCandidates`, the same rules in compiled loops, without torch's top-k
   passes).
2. Filtering. Each row has a keep threshold (from its current k-th best, first taken in
   its diagonal block, offered first), and only scores reaching it are offered. A
   block of scores is reduced once to maxima over groups of rows (`offer_block`), compared as
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
   searched again, after every block is re-ranked, in a plain pass with a larger capacity,
   so the result stays exact. The pass starts from each row's final filter (its k-th best
   is known from the first pass), so only the candidates that can matter enter its buffer,
   and all such rows share one product with each block of columns.
6. Locality order. R's rows are searched in an order that puts similar rows together (a few
   bf16 k-means iterations, clusters about one block each, chained so neighbouring clusters
   are alike). Each row's diagonal block then holds most of its neighbours, so its first
   threshold is close to the final one and far blocks pass almost nothing. Candidates carry
   original ids throughout and results are returned in the original order, so the order
   changes speed, never output.

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
from typing import Any

import numpy as np

from graphbuild import options
from graphbuild.graph.hits import padded_bands
from graphbuild.graph.screened import BF16_UNIT_ROUNDOFF, F32_UNIT_ROUNDOFF
from graphbuild.graph.screened import SLACK as THRESHOLD_SLACK
from graphbuild.memory import return_freed_memory

log = logging.getLogger(__name__)

# Sees a product of query rows with plain columns (blocked_topk's on_plain_block): the
# half-precision scores, rows padded to whole groups of GROUP (padding rows score -inf);
# their group maxima as int16 bit patterns, (groups, columns); the rows' ids (padding rows
# carry no real id); the first column's id and the stop.
PlainBlockObserver = Callable[[Any, Any, Any, int, int], None]

# The accumulation's unit roundoff in the bound, by device type. cuBLAS promises only "at
# least 32-bit" accumulation for half-precision products with fp32 compute, not round to
# nearest in fp32 (tensor cores may truncate), so on CUDA the bound takes twice fp32's unit
# roundoff: the full spacing 2**-23, which covers truncation. It widens the bound by about
# 2.3e-5 at d=384, too little to change what passes the filters measurably.
ACCUMULATION_ROUNDOFF = {"cpu": F32_UNIT_ROUNDOFF, "cuda": 2.0 ** -23}
# Unit roundoff (half the spacing just above 1.0) of the half-precision compute types.
HALF_UNIT_ROUNDOFF = {"bf16": BF16_UNIT_ROUNDOFF, "fp16": 2.0 ** -11}
GROUP = 16  # rows per max-pooled group when filtering a block of scores
MERGE_BANDS = (16, 64)  # hit counts per row that bound one padded merge (hits.py)
SCORE_FLOOR = -1e30  # below every finite score; filtering thresholds never go lower
COMPILED_ON_CPU = True  # CPU searches use the compiled candidate buffers (tests flip it)
# On CUDA, every row is uploaded once (`_Search.hold_all_rows`) when its fp16 bytes fit the
# device's free memory with this much to spare; CPUs convert each block as it is used (a
# second copy of the rows in host memory would cost more than the conversions). Tests set
# RESIDENT_ON_CPU to run the CUDA path on a CPU.
RESIDENT_HEADROOM = 1 << 30
RESIDENT_ON_CPU = False
# Query rows whose products with other shards' rows (plain columns) are made together: each
# block of plain columns is converted (and uploaded) once per group of query blocks, whose
# threshold-sorted copies in the compute type hold at most this many bytes.
OTHER_ROWS_GROUP_BYTES = 256 << 20
PLAIN_QUERY_ROWS = 4096  # overflowed rows per product in the re-search (scores: 16 MiB a block)


def default_capacity(k: int) -> int:
    """Candidates kept per row: the k best plus room for near-ties within the error bound."""
    return 2 * k + 16


@dataclass(frozen=True)
class ErrorBound:
    """|v - s| <= absolute + relative * |v| for every computed half-precision score v of an
    exact score s (derivation in `error_bound`)."""

    absolute: float
    relative: float

    @classmethod
    def of_norms(cls, norm: float, rounded_norm: float, err: float, d: int,
                 half: str, accumulation: float = F32_UNIT_ROUNDOFF) -> ErrorBound:
        """The bound for products of rows of d values whose norms are at most `norm`, at most
        `rounded_norm` once rounded to `half`, and whose rounding errors have norms at most
        `err`, summed with unit roundoff `accumulation` (derivation in `error_bound`)."""
        g = d * accumulation / (1 - d * accumulation)
        u = HALF_UNIT_ROUNDOFF[half]
        return cls(absolute=err * rounded_norm + norm * err + g * rounded_norm ** 2,
                   relative=u / (1 - u))

    def highest(self, v):
        """The highest exact score that a computed score v can stand for: v + b(v)."""
        return v + self.absolute + self.relative * abs(v)

    def lowest_kth(self, t):
        """The lowest value the exact k-th best can take when the approximate k-th best is t:
        k candidates have v >= t, and v - b(v) increases with v."""
        return t - self.absolute - self.relative * abs(t)

    def keep_threshold(self, t):
        """Smallest v whose upper bound v + b(v) reaches lowest_kth(t); b(v) grows with |v|,
        so v + b(v) increases and can be inverted piecewise. Works on torch tensors and on
        numpy arrays."""
        low = self.lowest_kth(t) - self.absolute
        up = low / (1.0 + self.relative)
        down = low / (1.0 - self.relative)
        return _where(low >= 0, up, down) - THRESHOLD_SLACK


def _where(condition, a, b):
    """torch.where for tensors, np.where for arrays."""
    if isinstance(condition, np.ndarray):
        return np.where(condition, a, b)
    import torch

    return torch.where(condition, a, b)


def error_bound(x16: np.ndarray, half: str = "bf16", block_rows: int = 65536,
                device: str = "cpu") -> ErrorBound:
    """A rigorous bound for half-precision dot products of the rows of x16 (fp16), computed
    on `device` (its accumulation: ACCUMULATION_ROUNDOFF; 2**-24 below, 2**-23 on CUDA).

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
    return ErrorBound.of_norms(norm, rounded_norm, err, d, half,
                               ACCUMULATION_ROUNDOFF[device.split(":")[0]])


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

    from graphbuild.graph.kernels import exact_dots, threads_as_torch

    q = torch.from_numpy(x16[rows]).float().numpy()
    out = np.empty(len(rr), np.float32)
    threads_as_torch()
    exact_dots(np.ascontiguousarray(x16).view(np.uint16), q, np.asarray(rr, np.int64),
               np.asarray(cols, np.int64), out)
    return out


class _Candidates:
    """For each of n rows, the `capacity` best approximate scores offered so far (best
    first), their column ids, the best score ever pushed out (`dropped`), and a keep
    threshold `thr` below which no score can matter (any entry under it may be skipped).

    Hits are offered in bulk (`add`: flat row, column, score triples) and merged lazily:
    thresholds only rise, so filtering with a stale (lower) threshold is safe, just looser.

    Block products are filtered through group maxima (`offer_block`): a block s (rows of I x
    rows of J) is reduced once to the max of each group of GROUP consecutive I rows per J
    column, comparing half-precision bit patterns as int16 (a vectorised reduction over
    contiguous rows). A group can hold a J-row hit only if its max reaches that column's key,
    and an I-row hit only if it reaches the smallest key of its rows; I's rows come sorted by
    threshold so a group's keys are close. Only the groups that pass are read again, and
    each of their entries is compared exactly in fp32."""

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

    def by_threshold(self, lo: int, hi: int):
        """Rows lo..hi, lowest filtering threshold first."""
        import torch

        return torch.argsort(self.thr[lo:hi]) + lo

    def _refresh(self, at) -> None:
        import torch

        thr = self.bound.keep_threshold(self.scores[at, self.k - 1].float())
        thr = torch.maximum(thr.clamp_(min=SCORE_FLOOR), self.thr[at])  # a seed may be higher
        self.thr[at] = thr
        self.key[at] = _int16_key(thr, self.half_dtype)

    def seed(self, kth) -> None:
        """Start each row's filter from its k-th best approximate score `kth` (fp32, as
        `finish` gives it), known from an earlier pass over the same columns."""
        import torch

        thr = self.bound.keep_threshold(torch.from_numpy(kth).to(self.thr.device))
        thr = thr.clamp_(min=SCORE_FLOOR)
        self.thr[:len(kth)] = thr
        self.key[:len(kth)] = _int16_key(thr, self.half_dtype)

    def offer_filtered(self, lo: int, hi: int, scores, cols) -> None:
        """Offer dense scores of rows lo..hi whose filters are about final (`seed`)."""
        self.offer(lo, hi, scores, cols)

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
            # int32 sums: a bool sum widens to int64 and runs slower on CPU
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

    def offer_block(self, s, rows, row_ids, cols, col_rows: int | None = None):
        """Offer a block of half-precision scores s, shape (groups * GROUP, c), to its rows:
        row r's scores to buffer row rows[r] (padding rows score -inf and point at the
        sentinel), against the column ids `cols`. With `col_rows`, the columns are query rows
        too: column j's scores go to buffer row col_rows + j as well, against the row ids
        `row_ids`. Returns the block's group maxima, (groups, c) int16 bit patterns."""
        import torch

        g = GROUP
        nb, bj = s.shape[0] // g, s.shape[1]
        s3 = s.view(nb, g, bj)
        gmax = s3.view(torch.int16).amax(dim=1)
        thr_i = self.thr[rows].view(nb, g)
        hit = gmax >= self.key[rows].view(nb, g).amin(dim=1, keepdim=True)
        if col_rows is not None:
            thr_j = self.thr[col_rows:col_rows + bj]
            hit.logical_or_(gmax >= self.key[col_rows:col_rows + bj])
        gi, j = hit.nonzero(as_tuple=True)
        if len(gi) == 0:
            return gmax
        v = s3[gi, :, j].float()                                   # (hits, g)
        f = (v >= thr_i[gi]).view(-1).nonzero()[:, 0]
        h = f // g
        self.add(rows[gi[h] * g + f % g], cols[j[h]], v.view(-1)[f])
        if col_rows is not None:
            f = (v >= thr_j[j][:, None]).view(-1).nonzero()[:, 0]
            h = f // g
            self.add(j[h] + col_rows, row_ids[gi[h] * g + f % g], v.view(-1)[f])
        return gmax

    def finish(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, which to re-rank, which rows overflowed, k-th best approximate scores) for
        rows lo..hi. A buffer always holds its row's k best of all scores offered, so once
        every column was offered, the k-th best is the row's k-th best of all columns."""
        self.flush()
        kth = self.scores[lo:hi, self.k - 1].float()
        thr = self.bound.keep_threshold(kth)
        keep = (self.scores[lo:hi] >= thr[:, None]) & (self.ids[lo:hi] >= 0)
        overflow = self.dropped[lo:hi] >= thr
        return (self.ids[lo:hi].cpu().numpy(), keep.cpu().numpy(), overflow.cpu().numpy(),
                kth.cpu().numpy())


class _CompiledCandidates:
    """_Candidates for CPU searches, in compiled loops (kernels.py): each row
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

    def seed(self, kth) -> None:
        """As _Candidates.seed."""
        from graphbuild.graph.kernels import key_of

        n = len(kth)
        self.key[:n] = np.maximum(self.key[:n],
                                  self.filter_keys[key_of(kth).astype(np.int32) + 32768])

    def offer_filtered(self, lo: int, hi: int, scores, cols) -> None:
        """As _Candidates.offer_filtered."""
        from graphbuild.graph.kernels import offer_above

        offer_above(_bits(scores), lo, cols.numpy(), *self._state())

    def offer_block(self, s, rows, row_ids, cols, col_rows: int | None = None):
        """As _Candidates.offer_block (returns the group maxima)."""
        import torch

        from graphbuild.graph.kernels import offer_to_columns, offer_to_rows

        gmax = s.view(s.shape[0] // GROUP, GROUP, s.shape[1]).view(torch.int16).amax(dim=1)
        bits = _bits(s)
        offer_to_rows(bits, gmax.numpy(), rows.numpy(), cols.numpy(), *self._state())
        if col_rows is not None:
            offer_to_columns(bits, gmax.numpy(), col_rows, row_ids.numpy(), *self._state())
        return gmax

    def finish(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
        return ids, keep, values(self.dropped[lo:hi]) >= thr, values(kth)


def filter_keys(bound: ErrorBound, margin: float = 1e-6) -> np.ndarray:
    """For each bf16 key t of a k-th best (at [t + 32768]), the largest key whose value is
    at most `keep_threshold` of it: every score that can matter has a key at least this.
    Computed in fp64 and lowered by `margin` * (1 + |t|), far more than the fp32 rounding
    of the threshold that `finish` applies; never below SCORE_FLOOR's key."""
    from graphbuild.graph.kernels import KEY_AS_F32

    t = KEY_AS_F32.astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf: never a k-th best of finite scores
        thr = bound.keep_threshold(t) - margin * (1 + np.abs(t))
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


def blocked_topk(x16: np.ndarray, k: int, rows: range | None = None,
                 block_rows: int = options.BLOCK_ROWS, capacity: int | None = None,
                 device: str | None = None, bound: ErrorBound | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 reload: Callable[[], np.ndarray] | None = None,
                 on_plain_block: PlainBlockObserver | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k neighbours (cosine = dot product of unit rows) of `rows` among all rows
    of x16 (fp16, shape (n, d)), the row itself excluded.

    Returns (ids, sims) of shape (len(rows), k), rows in order: each row's neighbours best
    first, equal sims by smaller id; ids int32 (int64 from 2**31 rows), sims float32.
    `on_progress` receives finished work in units of whole query rows, so a rate reads as
    queries/s. `reload` gives x16 again: when `rows` are all of x16's, the search lets x16 go
    while it multiplies (the half-precision copy serves) and reloads it to re-rank, so the
    two copies never coexist (768 MB less at the peak for 1M rows of 384). The caller must
    then hold no other reference to x16.
    `on_plain_block` sees each product of query rows with rows outside `rows` (the one
    direction search makes): the graph's update after an append reads from the new rows'
    products with the old rows which old rows they can enter (graph/update.py).
    """
    n = x16.shape[0]
    rows = range(n) if rows is None else rows
    if not 0 < k < n:
        raise ValueError(f"k must be in 1..{n - 1}, got {k}")
    if x16.dtype != np.float16:
        raise ValueError(f"x16 must be float16, got {x16.dtype}")
    device = device or default_device()
    half = pick_half(device)
    bound = bound or error_bound(x16, half, device=device)
    capacity = min(capacity or default_capacity(k), n - 1)
    if capacity < k:
        raise ValueError(f"capacity must be at least k={k}, got {capacity}")
    search = _Search(x16, k, block_rows, device, half, bound, on_plain_block)
    del x16  # search.x16 is now this function's only reference: the search may let it go
    with _exact_cuda_matmul():
        return search.run(_Plan(rows, n, block_rows), capacity, _Progress(on_progress, n),
                          reload)


class _Plan:
    """The blocks of a search of `rows` among n rows. The query rows are handled by position
    0..m-1 in locality order, in blocks `own`; the rows outside them (other shards' query
    rows) are plain columns, in blocks `other` of their ids, searched in one direction so
    that shards stay independent."""

    def __init__(self, rows: range, n: int, block_rows: int):
        self.rows, self.block_rows = rows, block_rows
        self.own = _blocks(0, len(rows), block_rows)
        self.other = _blocks(0, rows.start, block_rows) + _blocks(rows.stop, n, block_rows)
        if self.other and self.own:
            log.info("rows %d..%d of %d: symmetric products among these rows, plain products "
                     "against the other %d rows", rows.start, rows.stop, n, n - len(rows))

    def own_groups(self, row_bytes: int) -> list[list[tuple[int, int]]]:
        """The own blocks in groups whose rows in the compute type (`row_bytes` a row) hold
        at most OTHER_ROWS_GROUP_BYTES (at least one block a group)."""
        per = max(1, OTHER_ROWS_GROUP_BYTES // max(1, row_bytes * self.block_rows))
        return [self.own[i:i + per] for i in range(0, len(self.own), per)]

    def pairs_by_distance(self) -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
        """Each pair (I, J), I < J, of own blocks, by distance J - I: in locality order,
        neighbouring blocks hold most of each other's neighbours, so thresholds are nearly
        final before far pairs come."""
        for distance in range(1, len(self.own)):
            for i in range(len(self.own) - distance):
                yield self.own[i], self.own[i + distance]


class _Search:
    """One search, step by step (`run`), and the helpers its steps and the overflow fallback
    (`plain`) share."""

    def __init__(self, x16: np.ndarray, k: int, block_rows: int, device: str, half: str,
                 bound: ErrorBound, on_plain_block: PlainBlockObserver | None = None):
        import torch

        self.x16, self.k, self.block_rows = x16, k, block_rows
        self.on_plain_block = on_plain_block
        self.device, self.dtype, self.bound = torch.device(device), half_dtype(half), bound
        small = x16.shape[0] < 2 ** 31
        self.id_dtype, self.id_np = (torch.int32, np.int32) if small else (torch.int64, np.int64)
        self.resident = None  # every row in the compute type on the device, once held

    def run(self, plan: _Plan, capacity: int, progress: _Progress,
            reload: Callable[[], np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        """Order the query rows; offer each diagonal block, then each pair of own blocks;
        then, block by block, offer the other rows and re-rank the candidates exactly; last,
        search the rows whose buffers overflowed again, together (`plain`)."""
        queries = _Queries(self, plan.rows)
        if reload is not None and not plan.other:
            self.x16 = None  # the half-precision copy serves until the re-rank
        # The buffers come after the ordering's temporaries are freed and trimmed, so the
        # peak is the search's own: fp16 rows + half query rows + buffers.
        return_freed_memory()
        cands = self.candidates(len(plan.rows), capacity)
        self.offer_diagonal_blocks(cands, queries, plan, progress)
        self.offer_block_pairs(cands, queries, plan, progress)
        if not plan.other:
            queries.x = None  # not needed to re-rank: its bytes go to the results
            if self.x16 is None:
                self.x16 = reload()
        ids = np.empty((len(plan.rows), self.k), self.id_np)
        sims = np.empty((len(plan.rows), self.k), np.float32)
        if plan.other:
            self.hold_all_rows()
        overflowed, overflowed_kth = [], []
        for group in plan.own_groups(self.x16.shape[1] * 2):
            if plan.other:
                blocks = [queries.sorted_block(cands, lo, hi) for lo, hi in group]
                self.offer_other_rows(cands, blocks, plan, progress)
                del blocks
            for lo, hi in group:
                at = queries.ids_np[lo:hi]  # row r goes to the results at r - rows.start
                top_ids, top_sims, overflow, kth = self.exact_top(cands, lo, hi, at)
                ids[at - plan.rows.start], sims[at - plan.rows.start] = top_ids, top_sims
                overflowed.append(at[overflow])
                overflowed_kth.append(kth[overflow])
        del cands, queries  # their bytes go to the re-search
        again = np.concatenate(overflowed)
        if len(again):
            ids[again - plan.rows.start], sims[again - plan.rows.start] = self.plain(
                again, np.concatenate(overflowed_kth), capacity)
        return ids, sims

    def candidates(self, m: int, capacity: int) -> _Candidates | _CompiledCandidates:
        """Candidate buffers for m query rows: compiled loops on CPUs, torch's elsewhere."""
        if self.device.type == "cpu" and COMPILED_ON_CPU:
            return _CompiledCandidates(m, self.k, capacity, self.bound, self.id_dtype)
        return _Candidates(m, self.k, capacity, self.bound, self.id_dtype, self.device,
                           self.dtype)

    def offer_diagonal_blocks(self, cands, queries: _Queries, plan: _Plan,
                              progress: _Progress) -> None:
        """Each own block against itself, first: in locality order a row's own block holds
        most of its neighbours, so its k-th best there is a tight first threshold and later
        blocks pass few entries. The buffers are empty, so every row takes its block's best
        (no count of what passes)."""
        import torch

        for lo, hi in plan.own:
            x = queries.x[lo:hi]
            s = self.scores(x, x)
            s.fill_diagonal_(-torch.inf)
            cands.offer(lo, hi, s, queries.ids[lo:hi], counted=False)
            progress.add((hi - lo) * (hi - lo))

    def offer_block_pairs(self, cands, queries: _Queries, plan: _Plan,
                          progress: _Progress) -> None:
        """Each pair of own blocks multiplied once, its scores offered to the rows of both."""
        for (lo, hi), (clo, chi) in plan.pairs_by_distance():
            block = queries.sorted_block(cands, lo, hi)
            s = block.scores(self, queries.x[clo:chi])
            cands.offer_block(s, block.rows, block.ids, queries.ids[clo:chi], col_rows=clo)
            progress.add(2 * (hi - lo) * (chi - clo))

    def offer_other_rows(self, cands, blocks: list[_QueryBlock], plan: _Plan,
                         progress: _Progress) -> None:
        """The rows outside the query rows, offered to blocks of query rows: each block of
        them converted once, multiplied with every query block, and the products shown to
        `on_plain_block`."""
        import torch

        for clo, chi in plan.other:
            xj, col_ids = self.columns(clo, chi), torch.arange(clo, chi, device=self.device)
            for block in blocks:
                s = block.scores(self, xj)
                gmax = cands.offer_block(s, block.rows, block.ids, col_ids)
                if self.on_plain_block is not None:
                    self.on_plain_block(s, gmax, block.ids, clo, chi)
                progress.add(block.count * (chi - clo))

    def exact_top(self, cands, lo: int, hi: int, ids: np.ndarray,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The exact top-k of query positions lo..hi (row ids `ids`), their candidates
        re-ranked by exact score, except for rows whose buffer dropped a candidate that could
        still matter: (ids, sims, which rows overflowed (their ids and sims unset), each
        row's k-th best approximate score)."""
        cand, keep, overflow, kth = cands.finish(lo, hi)
        top_ids = np.empty((hi - lo, self.k), np.int64)
        top_sims = np.empty((hi - lo, self.k), np.float32)
        ok = ~overflow
        top_ids[ok], top_sims[ok] = _rerank(self.x16, ids[ok], cand[ok], keep[ok], self.k)
        return top_ids, top_sims, overflow, kth

    def half(self, lo: int, hi: int):
        """Rows lo..hi in the compute type."""
        return self.half_rows(slice(lo, hi))

    def hold_all_rows(self) -> None:
        """On CUDA, when they fit (RESIDENT_HEADROOM), upload every row once, in the compute
        type: other shards' rows are then the columns of every query block, and of the
        overflow fallback, without a host-to-device copy per block pair (at 375k rows a
        shard and blocks of 4,096 that is about 820 GB of copies a shard)."""
        import torch

        if self.resident is not None:
            return
        n, d = self.x16.shape
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if n * d * 2 + RESIDENT_HEADROOM > free:
                log.info("rows uploaded block by block: all %d need %.1f GiB, %.1f GiB free on "
                         "%s", n, n * d * 2 / 2**30, free / 2**30, self.device)
                return
        elif not RESIDENT_ON_CPU:
            return
        self.resident = self.half(0, n)

    def columns(self, lo: int, hi: int):
        """Rows lo..hi in the compute type: the held rows (`hold_all_rows`), else converted
        (and uploaded) now."""
        return self.half(lo, hi) if self.resident is None else self.resident[lo:hi]

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

    def plain(self, rows: np.ndarray, kth: np.ndarray,
              capacity: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows (any ids) against every row, one direction, growing the capacity until no
        row overflows: the rows whose near-ties overflowed the first pass's buffers. `kth`
        holds each row's k-th best approximate score from that pass (`finish`), which saw
        every column: each row's filter starts final, so its buffer takes only candidates
        that can still matter. All rows share one product with each block of columns."""
        import time

        import torch

        n = self.x16.shape[0]
        ids = np.empty((len(rows), self.k), np.int64)
        sims = np.empty((len(rows), self.k), np.float32)
        todo = np.arange(len(rows))
        self.hold_all_rows()
        started = time.perf_counter()
        while len(todo):
            capacity = min(capacity * 4, n - 1)
            log.info("%d rows have more near-ties than the candidate buffer; searching them "
                     "again with capacity %d", len(todo), capacity)
            sub = rows[todo]
            cands = self.candidates(len(sub), capacity)
            cands.seed(kth[todo])
            self_col = torch.from_numpy(sub).to(self.device)
            xq = (self.half_rows(sub) if self.resident is None
                  else self.resident.index_select(0, self_col))
            for clo, chi in _blocks(0, n, self.block_rows):
                xc = self.columns(clo, chi)
                col_ids = torch.arange(clo, chi, device=self.device)
                for qlo, qhi in _blocks(0, len(sub), PLAIN_QUERY_ROWS):
                    s = self.scores(xq[qlo:qhi], xc)
                    own = self_col[qlo:qhi]
                    mine = (own >= clo) & (own < chi)
                    s[mine.nonzero()[:, 0], (own[mine] - clo)] = -torch.inf
                    cands.offer_filtered(qlo, qhi, s, col_ids)
            cand, keep, overflow, _ = cands.finish(0, len(sub))
            done = ~overflow if capacity < n - 1 else np.ones(len(sub), bool)
            ids[todo[done]], sims[todo[done]] = _rerank(self.x16, sub[done], cand[done],
                                                        keep[done], self.k)
            todo = todo[~done]
        log.info("%d rows searched again in %.1fs", len(rows), time.perf_counter() - started)
        return ids, sims


class _Queries:
    """The query rows in locality order: position p holds row `ids[p]` (a tensor on the
    search's device; `ids_np` on the CPU), and `x` the rows in the compute type, converted
    once."""

    def __init__(self, search: _Search, rows: range):
        order = locality_order(search.half(rows.start, rows.stop), search.block_rows)
        self.ids = order + rows.start
        self.ids_np = self.ids.cpu().numpy()
        self.x = search.half_rows(self.ids_np)
        self.sentinel = len(rows)  # the candidate buffers' row for padding: passes nothing

    def sorted_block(self, cands, lo: int, hi: int) -> _QueryBlock:
        """Positions lo..hi sorted by keep threshold, so each group's smallest key is close to
        all its keys, padded to whole groups of GROUP rows."""
        import torch

        count = hi - lo
        padding = -(-count // GROUP) * GROUP - count
        at = cands.by_threshold(lo, hi)
        pad = torch.full((padding,), self.sentinel, device=at.device, dtype=at.dtype)
        x = self.x.index_select(0, at)  # index_select: a CPU gather of whole rows, fast
        if padding:
            x = torch.cat([x, x.new_zeros((padding, x.shape[1]))])
        ids = torch.cat([self.ids.index_select(0, at), pad])
        return _QueryBlock(x, torch.cat([at, pad]), ids, count)


@dataclass
class _QueryBlock:
    """Query rows sorted and padded by `_Queries.sorted_block`: their rows in the compute
    type, their candidate buffer rows (padding: the sentinel) and their ids; the first
    `count` are real."""

    x: Any
    rows: Any
    ids: Any
    count: int

    def scores(self, search: _Search, xj):
        """Products with the rows xj; padding rows score -inf, so they pass nothing."""
        import torch

        s = search.scores(self.x, xj)
        s[self.count:] = -torch.inf
        return s


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


# torch's switches that let CUDA matmuls of half-precision inputs reduce or accumulate in
# half precision; allow_fp16_accumulation exists from torch 2.7 (absent ones are skipped).
HALF_REDUCTION_FLAGS = ("allow_fp16_reduced_precision_reduction",
                        "allow_bf16_reduced_precision_reduction", "allow_fp16_accumulation")


class _exact_cuda_matmul:
    """Forbid half-precision reductions and accumulation inside CUDA matmuls while the search
    runs, whatever else in the process turned them on (the bound assumes at least fp32
    accumulation; fp16 accumulation makes errors several times the bound), and restore
    them after."""

    def __enter__(self):
        import torch

        matmul = torch.backends.cuda.matmul
        self.saved = {f: getattr(matmul, f) for f in HALF_REDUCTION_FLAGS if hasattr(matmul, f)}
        for flag in self.saved:
            setattr(matmul, flag, False)

    def __exit__(self, *exc):
        import torch

        for flag, value in self.saved.items():
            setattr(torch.backends.cuda.matmul, flag, value)
