"""The top-k graph in memory (CSR) with what the trainer asks of it: the pairs of a batch it
holds, and what to fill the others with (from a row's stored sims alone, or calibrated by the
run's row moments)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graphbuild.errors import GraphbuildError
from graphbuild.rundir.graph import read_graph_csr, read_meta
from graphbuild.rundir.moments import RowMoments


class Graph:
    """The CSR graph with helpers to find the pairs of a batch it holds. Lazy and picklable."""

    def __init__(self, run: str | Path | None, k: int | None = None):
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer))
                              or k < 1):
            raise GraphbuildError(f"k must be an int >= 1 (or None: every stored neighbour), "
                                  f"got {k!r}")
        self.run = Path(run) if run is not None else None
        self.k = k  # keep only each row's best k (rows are stored best first)
        self._csr: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_arrays(cls, indptr: np.ndarray, indices: np.ndarray, sims: np.ndarray,
                    k: int | None = None) -> Graph:
        """A graph held in memory, e.g. built by another tool; rows best first."""
        graph = cls(None, k)
        indptr = np.asarray(indptr, np.int64)
        if k is not None:
            indptr, indices, sims = truncate(indptr, indices, sims, k)
        graph._csr = indptr, np.asarray(indices, np.int64), np.asarray(sims, np.float32)
        return graph

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_csr": None} if self.run is not None else self.__dict__

    @property
    def n_nodes(self) -> int:
        """Rows of the graph. For a run's graph this reads graph/_meta.json, which refuses a
        graph built from other embeddings than the run's current store."""
        if self._csr is None and self.run is not None:
            return int(read_meta(self.run)["n_nodes"])
        return len(self.csr[0]) - 1

    @property
    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._csr is None:
            indptr, indices, sims = read_graph_csr(self.run)
            if self.k is not None:
                indptr, indices, sims = truncate(indptr, indices, sims, self.k)
            self._csr = indptr, indices.astype(np.int64), sims
        return self._csr

    def kth_sims(self) -> np.ndarray:
        """Each row's last (k-th) stored sim: an upper bound on its sims to absent nodes."""
        indptr, _, sims = self.csr
        out = np.full(len(indptr) - 1, -1.0, np.float32)
        full = indptr[1:] > indptr[:-1]
        out[full] = sims[indptr[1:][full] - 1]
        return out

    def tail_floors(self, tau_s: float, points: int = 128) -> np.ndarray:
        """Per row, the soft mean tau_s * log(mean exp(s/tau_s)) of its sims to the nodes it
        does not hold, estimated from the row alone: fit s(r) = a + b log r to its stored sims
        by rank r, extrapolate over ranks k+1..n (clipped to [-1, s_k]) and average."""
        indptr, _, sims = self.csr
        n = len(indptr) - 1
        counts = np.diff(indptr)
        k = int(counts.max()) if n else 0
        dense = np.full((n, k), np.nan, np.float64)  # rows padded to k
        pos = np.arange(indptr[-1]) - np.repeat(indptr[:-1], counts)
        dense[np.repeat(np.arange(n), counts), pos] = sims
        logr = np.log(np.arange(1, k + 1))
        ok = ~np.isnan(dense)
        m = ok.sum(1).clip(1)
        mx, my = (ok * logr).sum(1) / m, np.nansum(dense, 1) / m
        dx = np.where(ok, logr - mx[:, None], 0.0)
        b = (dx * np.nan_to_num(dense - my[:, None])).sum(1) / np.maximum((dx ** 2).sum(1), 1e-12)
        a = my - b * mx
        ranks = np.geomspace(k + 1, max(n, k + 2), points)
        weights = np.gradient(ranks)  # trapezoid-like: each point stands for its rank span
        last = self.kth_sims().astype(np.float64)
        s = np.clip(a[:, None] + b[:, None] * np.log(ranks), -1.0, last[:, None])
        z = s / tau_s
        top = z.max(1, keepdims=True)
        mean = (np.exp(z - top) * weights).sum(1) / weights.sum()
        return (tau_s * (np.log(mean) + top[:, 0])).astype(np.float32)

    def row_fills(self, tau_s: float, moments: RowMoments) -> np.ndarray:
        """Per row i, c_i: the fill of pair (i, j) that it does not hold is p_i . p_j + c_i
        (p: the rows' principal coordinates; rundir/moments.py). c_i keeps the softmax mass of
        row i's unheld pairs: tau_s * log(mean exp(e / tau_s)) over their residual cosines
        e_ij = s_ij - p_i . p_j, which is m + v / (2 tau_s) for Gaussian residuals of mean m
        and variance v. m and v are exact: the row's residual sums over every other node less
        those of the pairs it holds. float64; 0 for a row that holds every other node."""
        indptr, indices, sims = self.csr
        n = len(indptr) - 1
        if len(moments.sum) != n:
            raise GraphbuildError(f"row moments for {len(moments.sum)} nodes, the graph has {n}")
        held = np.diff(indptr)
        row = np.repeat(np.arange(n), held)
        proj = moments.proj.astype(np.float64)
        resid = sims - np.einsum("ij,ij->i", proj[row], proj[indices])  # e of the held pairs
        count = n - 1 - held
        per = np.maximum(count, 1)
        mean = (moments.sum - np.bincount(row, resid, n)) / per
        var = np.maximum((moments.sum_sq - np.bincount(row, resid * resid, n)) / per
                         - mean * mean, 0.0)
        return np.where(count > 0, mean + var / (2 * tau_s), 0.0)

    def pairs(self, nodes: np.ndarray,
              among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pairs (a, b, sim) of positions in `nodes` and in `among` (each distinct node ids;
        among=None: `nodes` itself) where node among[b] is in node nodes[a]'s stored row:
        one direction each, as stored."""
        indptr, indices, sims = self.csr
        nodes = np.asarray(nodes, np.int64)
        among = nodes if among is None else np.asarray(among, np.int64)
        starts, stops = indptr[nodes], indptr[nodes + 1]
        counts = stops - starts
        row = np.repeat(np.arange(len(nodes)), counts)
        # flat positions of all edges of the batch's rows, without a Python loop
        flat = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        flat += np.repeat(starts, counts)
        order = np.argsort(among, kind="stable")
        sorted_nodes = among[order]
        pos = np.searchsorted(sorted_nodes, indices[flat])
        pos = np.minimum(pos, len(among) - 1)
        hit = sorted_nodes[pos] == indices[flat]
        return row[hit], order[pos[hit]], sims[flat[hit]]


def truncate(indptr: np.ndarray, indices: np.ndarray, sims: np.ndarray,
             k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-k graph inside a top-K graph (K >= k): each row's first k entries."""
    counts = np.minimum(np.diff(indptr), k)
    new_ptr = np.zeros_like(indptr)
    np.cumsum(counts, out=new_ptr[1:])
    keep = np.arange(indptr[-1]) - np.repeat(indptr[:-1], np.diff(indptr)) < np.repeat(
        counts, np.diff(indptr))
    return new_ptr, indices[keep], sims[keep]
