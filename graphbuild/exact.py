"""Exact top-k cosine neighbours by blocked search: no N x N matrix, no I/O.

The plan, for rows R of an fp16 matrix X (unit-norm rows) against all its rows:

1. Candidate pass in half precision. Blocks of rows are multiplied in bf16 on CPUs (fast on
   AVX-512 BF16 / AMX; fp16 matrix products are ~100x slower there) and in fp16 on CUDA. Each
   row keeps the `capacity` best approximate scores seen so far (`_Candidates`).
2. Symmetry. Inside R, the product of block I with block J (I < J) is computed once and used
   for I's rows and, transposed, for J's rows: about half the multiply-adds. Rows outside R
   (other query shards own them) are plain columns: R's rows against them, in one direction.
3. Exact re-rank. A rigorous bound b(v) on |approximate - exact| (see `ErrorBound`) says
   which candidates can still be in the exact top-k: every candidate whose score could reach
   the lowest value the exact k-th best can take. Those are scored again exactly and the
   best k kept, ties broken by the smaller node id.
4. Capacity overflow. If a row ever dropped a candidate that could still matter, the row is
   searched again in a plain pass with a larger capacity, so the result stays exact.

Exact scores are fp64 dot products of the stored fp16 values: every product of two fp16
numbers is a multiple of 2**-48 with at most 22 significant bits, and every partial sum
stays a multiple of 2**-48 below 2**5 when |x|*|y| < 32, so fp64 holds each step exactly,
whatever the summation order. The stored sim is that exact value rounded once to fp32, so
the output does not depend on block size, shard count, thread count or BLAS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

F32_UNIT_ROUNDOFF = 2.0 ** -24
# Unit roundoff (half the spacing just above 1.0) of the half-precision compute types.
HALF_UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
EXACT_NORM_LIMIT = 5.0     # |x| below this keeps fp64 dot products of fp16 values exact
THRESHOLD_SLACK = 2e-6     # covers fp32 rounding of the threshold and of the stored sims
DEFAULT_BLOCK_ROWS = 4096  # 32 MiB of bf16 scores per block pair
GROUP = 16  # entries per max-pooled group when filtering a block of scores


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


def exact_dots(x16: np.ndarray, rows: np.ndarray, cols: np.ndarray,
               chunk: int = 16384) -> np.ndarray:
    """x16[rows[p]] . x16[cols[p]] for each pair p, exactly, rounded once to fp32."""
    out = np.empty(len(rows), np.float32)
    for lo in range(0, len(rows), chunk):
        a = x16[rows[lo:lo + chunk]].astype(np.float64)
        b = x16[cols[lo:lo + chunk]].astype(np.float64)
        out[lo:lo + chunk] = np.einsum("pd,pd->p", a, b)
    return out


class _Candidates:
    """For each of n rows, the `capacity` best approximate scores seen so far (sorted, best
    first), their column ids, and the best score ever pushed out (`dropped`)."""

    def __init__(self, n: int, k: int, capacity: int, bound: ErrorBound, id_dtype, device):
        import torch

        self.k, self.capacity, self.bound = k, capacity, bound
        self.scores = torch.full((n, capacity), -torch.inf, dtype=torch.float32, device=device)
        self.ids = torch.full((n, capacity), -1, dtype=id_dtype, device=device)
        self.dropped = torch.full((n,), -torch.inf, dtype=torch.float32, device=device)

    def threshold(self, lo: int, hi: int):
        return self.bound.keep_threshold(self.scores[lo:hi, self.k - 1])

    def offer(self, lo: int, hi: int, scores, col0: int) -> None:
        """Merge scores of rows lo..hi (dim 0) against columns col0.. (dim 1), any layout.

        Only scores that reach the current threshold can matter, and the threshold only
        rises, so a block adds at most its per-row count of those (capped at capacity + 1:
        the top capacity + 1 of the union is all the merge needs)."""
        import torch

        thr = self.threshold(lo, hi)
        m = int((scores >= thr[:, None]).sum(dim=1).max())
        if m == 0:
            return
        m = min(m, self.capacity + 1, scores.shape[1])
        vals, pos = torch.topk(scores.float(), m, dim=1, sorted=False)
        self._merge(lo, hi, vals, (pos + col0).to(self.ids.dtype))

    def offer_columns(self, lo: int, hi: int, m, col0: int, group: int = GROUP) -> None:
        """Merge a contiguous (b, hi - lo) block whose column j holds row lo + j's scores
        against columns col0..col0 + b.

        Most scores fall below the row thresholds. The max over each group of `group`
        consecutive entries is cheap to take along dim 0 (a vectorised reduction over
        contiguous rows); only groups whose max reaches the threshold are looked at. Rows
        seen for the first time (no threshold yet) take the dense path instead."""
        import torch

        b, r = m.shape
        thr = self.threshold(lo, hi)
        fresh = torch.isneginf(thr)
        if bool(fresh.any()):
            cols = fresh.nonzero()[:, 0]
            top = min(self.capacity + 1, b)
            vals, pos = torch.topk(m[:, cols].float(), top, dim=0, sorted=False)
            self._merge_rows(lo, cols, vals.T, (pos.T + col0).to(self.ids.dtype))
            thr = torch.where(fresh, torch.inf, thr)
        rows, cols, vals = [], [], []
        for start, size in ((0, b - b % group), (b - b % group, b % group)):
            if size == 0:
                continue
            view = m[start:start + size].view(size // group if size >= group else 1,
                                              min(group, size), r)
            hit = view.amax(dim=1).float() >= thr[None, :]
            gi, j = hit.nonzero(as_tuple=True)
            if len(gi) == 0:
                continue
            v = view[gi, :, j].float()
            c = ((gi * view.shape[1] + start + col0)[:, None]
                 + torch.arange(view.shape[1], device=m.device))
            keep = v >= thr[j][:, None]
            rows.append(j[:, None].expand_as(v)[keep])
            cols.append(c[keep])
            vals.append(v[keep])
        if rows:
            self._merge_sparse(lo, hi, torch.cat(rows), torch.cat(cols), torch.cat(vals))

    def _merge_sparse(self, lo: int, hi: int, rows, cols, vals) -> None:
        """Merge (row, column, score) hits: pad them into a (rows, most hits) matrix."""
        import torch

        order = torch.argsort(rows, stable=True)
        rows, cols, vals = rows[order], cols[order], vals[order]
        counts = torch.bincount(rows, minlength=hi - lo)
        width = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        dev = rows.device
        slot = torch.arange(len(rows), device=dev) - starts[rows]
        touched = counts.nonzero()[:, 0]
        at = torch.full((hi - lo,), -1, dtype=torch.long, device=dev)
        at[touched] = torch.arange(len(touched), device=dev)
        pv = torch.full((len(touched), width), -torch.inf, dtype=torch.float32, device=dev)
        pi = torch.full((len(touched), width), -1, dtype=self.ids.dtype, device=dev)
        pv[at[rows], slot] = vals
        pi[at[rows], slot] = cols.to(self.ids.dtype)
        self._merge_rows(lo, touched, pv, pi)

    def _merge(self, lo: int, hi: int, vals, ids) -> None:
        import torch

        self._merge_rows(lo, torch.arange(hi - lo, device=vals.device), vals, ids)

    def _merge_rows(self, lo: int, rows, vals, ids) -> None:
        """Keep the best `capacity` of each listed row's buffer plus its new (vals, ids)."""
        import torch

        at = rows + lo
        all_v = torch.cat([self.scores[at], vals], dim=1)
        all_i = torch.cat([self.ids[at], ids], dim=1)
        top_v, top_p = torch.topk(all_v, min(self.capacity + 1, all_v.shape[1]), dim=1)
        self.scores[at] = top_v[:, :self.capacity]
        self.ids[at] = torch.gather(all_i, 1, top_p[:, :self.capacity])
        if top_v.shape[1] > self.capacity:
            self.dropped[at] = torch.maximum(self.dropped[at], top_v[:, self.capacity])

    def finish(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, which to re-rank, which rows overflowed) for rows lo..hi."""
        thr = self.threshold(lo, hi)
        keep = (self.scores[lo:hi] >= thr[:, None]) & (self.ids[lo:hi] >= 0)
        overflow = self.dropped[lo:hi] >= thr
        return (self.ids[lo:hi].cpu().numpy(), keep.cpu().numpy(), overflow.cpu().numpy())


def _rerank(x16: np.ndarray, rows: np.ndarray, cand: np.ndarray, keep: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each row's kept candidates: by sim descending, then id ascending."""
    if len(rows) == 0:
        return np.empty((0, k), np.int64), np.empty((0, k), np.float32)
    keep = keep & (cand != rows[:, None])
    rr, cc = np.nonzero(keep)
    ids = cand[rr, cc].astype(np.int64)
    sims = exact_dots(x16, rows[rr], ids)
    order = np.lexsort((ids, -sims, rr))
    counts = np.bincount(rr, minlength=len(rows))
    if counts.size and counts.min() < k:
        raise AssertionError("a row kept fewer candidates than k; the error bound is broken")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    take = order[starts[:, None] + np.arange(k)]
    return ids[take], sims[take]


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
        import torch

        x = torch.from_numpy(np.ascontiguousarray(self.x16[lo:hi])).to(self.device)
        return x.to(self.dtype) if self.device.type == "cuda" else x.float().to(self.dtype)

    def half_rows(self, rows: np.ndarray):
        import torch

        x = torch.from_numpy(self.x16[rows]).to(self.device)
        return x.to(self.dtype) if self.device.type == "cuda" else x.float().to(self.dtype)

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
                cands.offer(0, len(sub), s, clo)
            cand, keep, overflow = cands.finish(0, len(sub))
            done = ~overflow if capacity < n - 1 else np.ones(len(sub), bool)
            ids[todo[done]], sims[todo[done]] = _rerank(self.x16, sub[done], cand[done],
                                                        keep[done], self.k)
            todo = todo[~done]
        return ids, sims


def blocked_topk(x16: np.ndarray, k: int, rows: range | None = None,
                 block_rows: int = DEFAULT_BLOCK_ROWS, capacity: int | None = None,
                 device: str | None = None, bound: ErrorBound | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Exact top-k neighbours (cosine = dot product of unit rows) of `rows` among all rows
    of x16 (fp16, shape (n, d)), the row itself excluded.

    Yields (first row, ids (r, k) int64, sims (r, k) float32) per block of rows, in order;
    each row's neighbours best first, equal sims by smaller id. `on_progress` receives
    finished work in units of whole query rows, so a rate reads as queries/s.
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
    search = _Search(x16, k, block_rows, device, half, bound)
    row_blocks = _blocks(rows.start, rows.stop, block_rows)
    other = _blocks(0, rows.start, block_rows) + _blocks(rows.stop, n, block_rows)
    if other and row_blocks:
        log.info("rows %d..%d of %d: symmetric products among these rows, plain products "
                 "against the other %d rows", rows.start, rows.stop, n, n - len(rows))
    cands = _Candidates(len(rows), k, capacity, bound, search.id_dtype, search.device)
    progress = _Progress(on_progress, n)
    a = rows.start
    with _exact_cuda_matmul():
        for bi, (lo, hi) in enumerate(row_blocks):
            xi = search.half(lo, hi)
            for clo, chi in other:
                # (their rows x our rows): the layout offer_columns filters fastest
                cands.offer_columns(lo - a, hi - a, search.scores(search.half(clo, chi), xi), clo)
                progress.add((hi - lo) * (chi - clo))
            for clo, chi in row_blocks[bi:]:
                if clo == lo:
                    s = search.scores(xi, xi)
                    s.fill_diagonal_(-torch.inf)
                    cands.offer_columns(lo - a, hi - a, s, lo)
                    progress.add((hi - lo) * (hi - lo))
                else:
                    s = search.scores(xi, search.half(clo, chi))
                    cands.offer_columns(clo - a, chi - a, s, lo)
                    cands.offer_columns(lo - a, hi - a, s.T.contiguous(), clo)
                    progress.add(2 * (hi - lo) * (chi - clo))
            cand, keep, overflow = cands.finish(lo - a, hi - a)
            block_rows_ids = np.arange(lo, hi)
            ids = np.empty((hi - lo, k), np.int64)
            sims = np.empty((hi - lo, k), np.float32)
            ok = ~overflow
            ids[ok], sims[ok] = _rerank(x16, block_rows_ids[ok], cand[ok], keep[ok], k)
            if overflow.any():
                ids[overflow], sims[overflow] = search.plain(block_rows_ids[overflow], capacity)
            yield lo, ids, sims


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
