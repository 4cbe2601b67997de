"""X-CLR soft targets for a batch, over itself or over other columns (a batch gathered across
ranks, a queue): exact from the stored rows, or from the top-k graph.

Imports numpy, pyarrow and torch only (no zarr, polars, faiss or sentence-transformers), keeps
no global state, and every object is picklable and opens its files lazily, so it works in
DataLoader workers and under DDP.

Targets. Sample i's target over samples j of a batch is softmax_j(cos(t_i, t_j) / tau_s),
where t is the text embedding of the sample's node; samples sharing a node have cos = 1.
A batch is given as the run's samples (0..S-1), as WithNodes returns them (data.py
joins dataset items to samples by id); an integer tensor, array or list.

- mode="exact": gather the batch's node rows from embeddings.zarr (fp16, in RAM or
  memory-mapped, each chunk's crc32c checked once) and hand them to
  exact.targets_from_rows: renormalised in fp32, one (B, B) product, row softmax. A trainer
  holding the rows already (streamed beside its samples) gets the same bits from
  targets_from_rows itself. The samples table must fit the store: every node a row of it,
  and as many rows as nodes.parquet has nodes.
- mode="graph": cosines from the top-k graph alone, for when the embeddings cannot sit beside
  the trainer. The graph must have been built from the run's current embeddings (checked at
  construction: a stale graph is refused). Rule for the pairs: a pair held by either row's
  top-k gets its stored sim (the two directions are symmetrised by taking the larger); a pair
  of the same node gets 1; a pair held by neither row gets a fill by `rule`:
  - "calibrated" (default): p_i . p_j + c_i, at most s_k(i), row i's k-th stored sim (which
    bounds every sim an exact graph does not hold). p are the rows' coordinates on the
    store's top 16 principal axes, and c_i keeps the softmax mass of row i's unheld pairs
    (Graph.row_fills), both from the row moments the knn stage writes beside the graph
    (rundir/moments.py), checked at construction: missing or stale moments are an error
    saying how to add them.
  - "floor": a constant (`floor`, 0.0 unless given, i.e. treated as unrelated).
  - "kth": min(s_k(i), s_k(j)), the rows' k-th stored sims.
  - "tail": row i's soft mean of the sims it does not hold, tau_s * log(mean exp(s/tau_s)),
    extrapolated from its stored sims by rank alone (Graph.tail_floors).
  benchmarks/graph_targets_kl.py measures them against exact targets on real captions:
  "calibrated" is well below the best constant floor, "kth" worse than a 0.0 floor.

No target. Sample index -1 marks a dataset item the run holds no sample for (WithNodes
returns it for an id the run skipped). Its targets row is all zero and so is its column:
the other rows' targets are those of the batch without it, and no row puts mass on it.
A row with no other sample to put mass on (a batch of one under diagonal="mask", or one
whose other samples all lack a target) is a zero row too, never NaN. xclr_loss leaves zero
rows out of its mean; in its softmax over the model's logits every batch item still
competes, so an item without a target acts as a plain negative. NeighborBatchSampler never
yields an item without a target, nor a batch of one.

Diagonal. diagonal="mask" (default) leaves j = i out of the target softmax and of the loss's
softmax, as NT-Xent and SupCon do, so SimCLR and SupCon are exact special cases.
diagonal="keep" softmaxes over every j including i (the X-CLR formula read literally); then
the loss keeps the self logit too. Targets and loss must use the same choice, and xclr_loss
checks it: "mask" targets have a zero diagonal, "keep" targets put mass on the diagonal of
every row that has any (cos(t_i, t_i) = 1 is the row's largest); either mismatch is an error.

Two views. targets(idx, views=2) is (2B, 2B) for embeddings stacked [view 1; view 2]: each
sample's other view is a same-node pair (cos = 1).

Columns. targets(idx, columns=cols, self_at=...) is (B, C): each row's softmax runs over the
column samples instead (a rank's samples against the batch gathered from every rank, or
queries against keys and a queue), in both modes, with views tiling both axes view by view
and -1 in either. Where a row sits among the columns is stated, never guessed: self_at=o
(row i is column o + i), one column per row (-1: none), or None (no row's own item is
among them). Under "mask" that column, in the row's own view, is left out; every other
column of its sample or node has cos = 1. self_at is checked against the samples: a row's
column must hold its sample. xclr_loss(z, t, keys=k, self_at=..., views=...) is the loss.

Loss dtype. xclr_loss computes in float64 for float64 embeddings (torch.autograd.gradcheck
holds) and in float32 otherwise, bf16 and fp16 included (under autocast too).

Errors (one-line GraphbuildError): sample or column indices that are float, bool, out of
range or empty; views < 1; k < 1 in graph mode; under rule="calibrated", row moments that are
missing or stale (at construction) or damaged (at the first batch, which reads them);
tau_s or tau <= 0; columns without self_at,
a self_at out of range, putting two rows at one column or a row at another sample's column;
under "mask", more rows than columns; an empty batch, targets of another shape (or, against
keys, other views), or targets with NaN, inf or negative entries in xclr_loss.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from graphbuild.errors import GraphbuildError
from graphbuild.rundir.graph import meta_path
from graphbuild.rundir.moments import RowMoments, check_moments, read_moments
from graphbuild.rundir.paths import RunDir
from graphbuild.rundir.samples import check_nodes_fit, check_store_matches_tables, read_sample_nodes
from graphbuild.rundir.store import StoredRows
from graphbuild.xclr.data import NO_TARGET
from graphbuild.xclr.exact import (
    RowsAt,
    exact_cross_targets,
    exact_logits,
    exact_targets,
    gram,
    matching_pairs,
    shared_pairs,
)
from graphbuild.xclr.graph import Graph
from graphbuild.xclr.layout import (
    DIAGONALS,
    UNSTATED,
    check_choice,
    check_tau,
    check_views,
    cross_targets,
    self_positions,
    square_targets,
)

__all__ = ["DIAGONALS", "SoftTargets", "gram", "shared_pairs", "soft_targets"]

MODES = ("exact", "graph")
RULES = ("calibrated", "floor", "kth", "tail")


def soft_targets(sims: torch.Tensor, tau_s: float, diagonal: str = "mask") -> torch.Tensor:
    """Row softmax of a (n, n) cosine matrix at temperature tau_s, float32."""
    logits = sims.float() / tau_s  # a new tensor, so the in-place fill below is safe
    if diagonal == "mask":
        logits.fill_diagonal_(float("-inf"))
    return torch.softmax(logits, dim=1)


class SoftTargets:
    """X-CLR targets for batches of the run's samples (what WithNodes returns; -1: none).

    `SoftTargets.from_run(run)(idx)` -> (B, B) float32; `(idx, views=2)` -> (2B, 2B).
    `dtype` is the matmul dtype of mode="exact". At tau_s=0.1 targets stay within these bounds
    of a float64 formula (tests/test_xclr.py holds them to the same): float32 (default) 3e-6,
    the float32 floor: logits reach 1/tau_s = 10, where one ulp is 9.5e-7; float64 1e-6 (its
    logits are float32 before the softmax), for about 2x the product time; bfloat16 ~1e-3,
    faster on CPUs with native bf16. Measured on real captions (the 3,000- and 65,474-caption
    runs, 32 random batches each at B=256 and 1024, diagonal mask and keep): at most 2.6e-6
    for float32, where a plain float32 torch formula is 2.1e-6 off, and 9.2e-7 for float64.
    """

    def __init__(self, run: str | Path, mode: str = "exact", tau_s: float = 0.1,
                 diagonal: str = "mask", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, mmap: bool = False, k: int | None = None,
                 rule: str = "calibrated", floor: float = 0.0, graph: Graph | None = None,
                 moments: RowMoments | None = None):
        check_choice("mode", mode, MODES)
        check_choice("rule", rule, RULES)
        check_choice("diagonal", diagonal, DIAGONALS)
        check_tau("tau_s", tau_s)
        self.run = Path(run)
        self.mode, self.tau_s, self.diagonal = mode, tau_s, diagonal
        self.device, self.dtype = torch.device(device), dtype
        self.rule, self.floor = rule, floor
        self.rows = StoredRows(RunDir(run).embeddings, mmap=mmap) if mode == "exact" else None
        # graph: an in-memory Graph to use instead of the run's (e.g. one cut to another k)
        self.graph = (graph or Graph(run, k)) if mode == "graph" else None
        self._nodes: np.ndarray | None = None
        self._table: torch.Tensor | None = None
        self._tail: np.ndarray | None = None
        self._calibrated: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        # moments: in-memory row moments to use instead of the run's (e.g. of another rank)
        self.moments = moments
        if self.rows is not None:
            check_store_matches_tables(run, self.rows)
        if self.graph is not None and rule == "calibrated" and moments is None:
            check_moments(run)  # now, not at the first step: missing or stale is an error
        self.sample_nodes  # noqa: B018  read and checked now, before any training step

    @classmethod
    def from_run(cls, run: str | Path, **options) -> SoftTargets:
        """Targets over a finished run directory; options as in the constructor."""
        return cls(run, **options)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_nodes": None, "_table": None, "_tail": None,
                "_calibrated": None}

    @property
    def sample_nodes(self) -> np.ndarray:
        """Each sample's node, checked to be a row of the store (exact) or graph (graph)."""
        if self._nodes is None:
            nodes = read_sample_nodes(self.run)
            if self.rows is not None:
                check_nodes_fit(self.run, nodes, self.rows.shape[0], self.rows.path)
            else:  # reads graph/_meta.json, which refuses a graph of other embeddings
                where = meta_path(self.run) if self.graph.run is not None else "the graph"
                check_nodes_fit(self.run, nodes, self.graph.n_nodes, where)
            self._nodes = nodes
        return self._nodes

    def __call__(self, idx, views: int = 1, *, columns=None,
                 self_at=UNSTATED) -> torch.Tensor:
        """Targets of samples `idx` (-1: no target) over themselves, (views*B, views*B); or,
        with `columns` (samples too, e.g. the batch gathered from every rank, or keys and a
        queue), over those columns, (views*B, views*C): softmax_j over the columns j.

        Views tile both axes view by view: items [view 1 of idx; view 2 of idx; ...] against
        [view 1 of columns; view 2 of columns; ...]. self_at states where the rows sit among
        the columns, never guessed: an int o (row sample i is column sample o + i, e.g.
        rank * B of a gathered batch), one column position per row (-1: not among them), or
        None (no row's own item is among the columns, e.g. queries against another encoder's
        keys). Under diagonal="mask" a row's own column (in its own view) is left out, under
        "keep" it is kept; any other column of the same sample or node (another view, a
        repeat in a queue) has cos 1. self_at is checked: each row's column must hold its
        sample."""
        idx = self._samples(idx, allow_no_target=True)
        views = check_views(views)
        nodes = self._nodes_of(idx)
        scale = 1.0 / self.tau_s
        if columns is None:
            if self_at is not UNSTATED:
                raise GraphbuildError("SoftTargets: self_at is for rows against columns; give "
                                      "columns too")
            if self.mode == "exact":
                return exact_targets(nodes, self._store_rows(nodes), tau_s=self.tau_s,
                                     diagonal=self.diagonal, views=views, dtype=self.dtype,
                                     device=self.device)
            return square_targets(
                nodes, lambda keep: self._graph_logits(nodes if keep is None else nodes[keep],
                                                       scale),
                views=views, diagonal=self.diagonal, device=self.device)
        cols = self._samples(columns, allow_no_target=True, what="column sample")
        own = self_positions(self_at, idx, cols, self.diagonal, "SoftTargets")
        col_nodes = self._nodes_of(cols)
        if self.mode == "exact":
            return exact_cross_targets(nodes, self._store_rows(nodes), col_nodes,
                                       self._store_rows(col_nodes), own, tau_s=self.tau_s,
                                       diagonal=self.diagonal, views=views, dtype=self.dtype,
                                       device=self.device)

        def logits_of(keep_r: np.ndarray | None, keep_c: np.ndarray | None) -> torch.Tensor:
            return self._graph_cross_logits(nodes if keep_r is None else nodes[keep_r],
                                            col_nodes if keep_c is None else col_nodes[keep_c],
                                            scale)

        return cross_targets(nodes, col_nodes, own, logits_of, views=views,
                             diagonal=self.diagonal, device=self.device)

    def _nodes_of(self, idx: np.ndarray) -> np.ndarray:
        """The nodes of samples `idx` (checked), NO_TARGET where idx is."""
        return np.where(idx == NO_TARGET, NO_TARGET, self.sample_nodes[idx])

    def sample_sims(self, idx) -> torch.Tensor:
        """(B, B) cosines between the texts of the given samples, float32 on `device`."""
        return self._scaled_sims(self._samples(idx, allow_no_target=False), 1.0)

    def _samples(self, idx, allow_no_target: bool, what: str = "sample") -> np.ndarray:
        """The batch as int64 samples, refusing float, bool and out-of-range indices."""
        if isinstance(idx, torch.Tensor):
            idx = idx.detach().cpu().numpy()
        arr = np.asarray(idx)
        if arr.size == 0:
            raise GraphbuildError(f"SoftTargets: empty batch (no {what} indices)")
        if arr.dtype.kind not in "iu":
            raise GraphbuildError(f"SoftTargets: {what} indices must be integers, got "
                                  f"{arr.dtype}")
        arr = arr.reshape(-1).astype(np.int64, copy=False)
        lo, n = (NO_TARGET if allow_no_target else 0), len(self.sample_nodes)
        if arr.min() < lo or arr.max() >= n:
            bad = int(arr[(arr < lo) | (arr >= n)][0])
            raise GraphbuildError(f"{RunDir(self.run).samples}: {what} index {bad} is out of "
                                  f"range {lo}..{n - 1}" + (" (-1: no target)" if lo else ""))
        return arr

    def _scaled_sims(self, idx: np.ndarray, scale: float) -> torch.Tensor:
        """scale * cosines of samples `idx` (checked, none -1), (B, B) float32."""
        nodes = self.sample_nodes[idx]
        if self.mode == "exact":
            return exact_logits(nodes, self._store_rows(nodes), scale, self.dtype)
        return self._graph_logits(nodes, scale)

    def _store_rows(self, nodes: np.ndarray) -> RowsAt:
        """The store as a row source for a batch of nodes: fp16 rows of batch positions, from
        the table in RAM (loaded once, on the device) or from memory-mapped chunks."""

        def rows_at(sel: np.ndarray | None) -> torch.Tensor:
            want = nodes if sel is None else nodes[sel]
            if self.rows.mmap:
                return torch.from_numpy(self.rows.gather(want)).to(self.device)
            if self._table is None:
                self._table = torch.from_numpy(self.rows.load()).to(self.device)
            return self._table.index_select(0, torch.from_numpy(want).to(self.device))

        return rows_at

    def _graph_logits(self, nodes: np.ndarray, scale: float) -> torch.Tensor:
        """scale * cosines from the graph over items of nodes `nodes` (all >= 0): computed
        over the distinct nodes, expanded to the items."""
        uniq, inv = np.unique(nodes, return_inverse=True)
        if len(uniq) == len(nodes):  # no shared node: work in batch order, no expansion
            return self._graph(nodes, nodes).mul_(scale)
        sims = self._graph(uniq, uniq).mul_(scale)
        inv_t = torch.from_numpy(inv.reshape(-1)).to(sims.device)
        return sims.index_select(0, inv_t).index_select(1, inv_t)

    def _graph_cross_logits(self, row_nodes: np.ndarray, col_nodes: np.ndarray,
                            scale: float) -> torch.Tensor:
        """scale * cosines from the graph of row items against column items (nodes >= 0)."""
        r_nodes, r_inv = distinct(row_nodes)
        c_nodes, c_inv = distinct(col_nodes)
        sims = self._graph(r_nodes, c_nodes).mul_(scale)
        if r_inv is not None:
            sims = sims.index_select(0, torch.from_numpy(r_inv).to(sims.device))
        if c_inv is not None:
            sims = sims.index_select(1, torch.from_numpy(c_inv).to(sims.device))
        return sims

    def _graph(self, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        """Cosines from the graph between distinct row nodes and distinct column nodes,
        (n_r, n_c) float32, by the rule for pairs it does not hold."""
        n_r, n_c = len(rows), len(cols)
        if self.rule == "kth":
            kth = self.graph.kth_sims()
            out = np.minimum.outer(kth[rows], kth[cols]).astype(np.float32)
        elif self.rule == "tail":  # row i's own estimate: targets are row distributions
            if self._tail is None:
                self._tail = self.graph.tail_floors(self.tau_s)
            out = np.repeat(self._tail[rows][:, None], n_c, axis=1)
        elif self.rule == "calibrated":  # p_i . p_j + c_i, at most row i's k-th sim
            proj, fills, kth = self._calibration()
            # einsum, not a BLAS product: each entry the same bits whatever the batch's shape,
            # so a rank's rows against gathered columns equal the single-process targets
            out = (np.einsum("ik,jk->ij", proj[rows].astype(np.float64),
                             proj[cols].astype(np.float64)) + fills[rows][:, None])
            out = np.minimum(out, kth[rows][:, None]).astype(np.float32)
        else:
            out = np.full((n_r, n_c), self.floor, np.float32)
        held = np.full((n_r, n_c), -np.inf, np.float32)
        a, b, s = self.graph.pairs(rows, among=cols)  # column b in row a's stored row
        held[a, b] = s
        c, r, s = self.graph.pairs(cols, among=rows)  # row r in column c's stored row
        held[r, c] = np.maximum(held[r, c], s)  # the two directions: the larger
        known = np.isfinite(held)
        out[known] = held[known]
        a, b = matching_pairs(rows, cols)
        out[a, b] = 1.0
        return torch.from_numpy(out).to(self.device)


    def _calibration(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """rule "calibrated"'s per-row data, read once: principal coordinates (float32, as
        stored), c_i and the k-th stored sim."""
        if self._calibrated is None:
            moments = self.moments if self.moments is not None else read_moments(self.run)
            self._calibrated = (moments.proj, self.graph.row_fills(self.tau_s, moments),
                                self.graph.kth_sims().astype(np.float64))
        return self._calibrated


def distinct(nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(the distinct nodes, how to expand them to the items), or (nodes, None) if no two
    items share a node."""
    uniq, inv = np.unique(nodes, return_inverse=True)
    return (nodes, None) if len(uniq) == len(nodes) else (uniq, inv.reshape(-1))
