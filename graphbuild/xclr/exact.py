"""Exact X-CLR targets from a batch's stored fp16 rows.

targets_from_rows is the one exact path: SoftTargets(mode="exact") runs it on rows taken
from the run's store (the table in RAM, or memory-mapped chunks), and a trainer that holds
the rows already (streamed beside its samples) runs it on those; the same rows give the same
bits. A row source `rows_at(positions)` gives the fp16 rows of batch positions (None: every
position, in batch order) on the target device.

The product. Rows are renormalised in float32 and scaled by sqrt(1/tau_s), so one product
gives the logits, in the `dtype` asked for. Three branches, by how many items share a node:
none, a product in batch order; a few (under half), the same product, then every same-node
pair set to exactly 1/tau_s; many, one product over the distinct nodes, expanded to the batch.
A node with itself is exactly 1/tau_s, never 1 +- rounding. Rows against columns: one
(B, C) product, each axis in batch order or over its distinct nodes (when at least half its
items share one), same-node pairs set to exactly 1/tau_s.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from graphbuild.errors import GraphbuildError
from graphbuild.xclr.data import NO_TARGET
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

RowsAt = Callable[[np.ndarray | None], torch.Tensor]


def targets_from_rows(rows, nodes, *, tau_s: float, diagonal: str = "mask", views: int = 1,
                      dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", column_rows=None,
                      column_nodes=None, self_at=UNSTATED) -> torch.Tensor:
    """Targets of a batch given its samples' stored fp16 rows in batch order (rows[i] is the
    row of node nodes[i]; equal nodes carry equal rows; nodes[i] == -1 (NO_TARGET): no
    target, its row ignored): the (views*B, views*B) matrix SoftTargets(mode="exact") gives
    for the same samples, bit for bit.

    rows: (B, dim) tensor or array, the store's fp16 rows (another float dtype is taken as
    given: bit-identity holds for the stored fp16 values).

    Rectangular: with column_rows and column_nodes (the same kinds, e.g. a batch gathered
    from every rank, or keys and a queue), the (views*B, views*C) targets of the rows over
    the columns, as SoftTargets(idx, columns=..., self_at=...) gives them; self_at states
    where the rows sit among the columns (see SoftTargets.__call__).

    Refused: nodes that are not integers >= -1, rows of another length than their nodes,
    two items of one node whose rows differ, a missing or wrong self_at."""
    check_choice("diagonal", diagonal, DIAGONALS)
    check_tau("tau_s", tau_s)
    views = check_views(views)
    device = torch.device(device)
    nodes = batch_nodes(nodes, "targets_from_rows")
    rows = batch_rows(rows, nodes, "rows").to(device)
    if column_rows is None and column_nodes is None:
        if self_at is not UNSTATED:
            raise GraphbuildError("targets_from_rows: self_at is for rows against columns; "
                                  "give column_rows and column_nodes too")
        return exact_targets(nodes, rows_source(rows), tau_s=tau_s, diagonal=diagonal,
                             views=views, dtype=dtype, device=device)
    if column_rows is None or column_nodes is None:
        raise GraphbuildError("targets_from_rows: give both column_rows and column_nodes")
    col_nodes = batch_nodes(column_nodes, "targets_from_rows (columns)")
    col_rows = batch_rows(column_rows, col_nodes, "column_rows").to(device)
    if col_rows.shape[1] != rows.shape[1]:
        raise GraphbuildError(f"targets_from_rows: rows have {rows.shape[1]} dims, "
                              f"column_rows {col_rows.shape[1]}")
    own = self_positions(self_at, nodes, col_nodes, diagonal, "targets_from_rows")
    return exact_cross_targets(nodes, rows_source(rows), col_nodes, rows_source(col_rows),
                               own, tau_s=tau_s, diagonal=diagonal, views=views, dtype=dtype,
                               device=device)


def rows_source(rows: torch.Tensor) -> RowsAt:
    """Rows handed in, in batch order, as a row source."""

    def rows_at(sel: np.ndarray | None) -> torch.Tensor:
        return rows if sel is None else rows.index_select(
            0, torch.from_numpy(sel).to(rows.device))

    return rows_at


def exact_targets(nodes: np.ndarray, rows_at: RowsAt, *, tau_s: float, diagonal: str,
                  views: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The core of targets_from_rows: nodes checked (int64, NO_TARGET: none), rows from
    `rows_at`."""
    scale = 1.0 / tau_s

    def logits_of(keep: np.ndarray | None) -> torch.Tensor:
        return exact_logits(nodes if keep is None else nodes[keep], subset(rows_at, keep),
                            scale, dtype)

    return square_targets(nodes, logits_of, views=views, diagonal=diagonal, device=device)


def exact_logits(nodes: np.ndarray, rows_at: RowsAt, scale: float,
                 dtype: torch.dtype) -> torch.Tensor:
    """scale * cos over items of nodes `nodes` (all >= 0), (n, n) float32."""
    uniq, first, inv = np.unique(nodes, return_index=True, return_inverse=True)
    if len(uniq) == len(nodes):  # no shared node: work in batch order, no expansion
        return gram_logits(rows_at(None), scale, dtype)
    inv = inv.reshape(-1)
    if 2 * len(uniq) > len(nodes):
        # few shared nodes: the product in batch order costs about what the unique one
        # does, and saves gathering a (B, B) result (~1.8 ms at B=1024 on a CPU)
        sims = gram_logits(rows_at(None), scale, dtype)
        a, b = shared_pairs(inv)
        sims[torch.from_numpy(a).to(sims.device), torch.from_numpy(b).to(sims.device)] = scale
        return sims
    sims = gram_logits(rows_at(first), scale, dtype)
    inv_t = torch.from_numpy(inv).to(sims.device)
    # rows, then columns: two index_selects run ~4x faster than one 2-D gather
    return sims.index_select(0, inv_t).index_select(1, inv_t)


def subset(rows_at: RowsAt, keep: np.ndarray | None) -> RowsAt:
    """The row source of positions `keep` of a batch (None: the batch itself)."""
    if keep is None:
        return rows_at
    return lambda sel: rows_at(keep if sel is None else keep[sel])


def exact_cross_targets(row_nodes: np.ndarray, row_at: RowsAt, col_nodes: np.ndarray,
                        col_at: RowsAt, self_at: np.ndarray, *, tau_s: float, diagonal: str,
                        views: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows against columns: nodes checked, self_at checked (self_positions)."""
    scale = 1.0 / tau_s

    def logits_of(keep_r: np.ndarray | None, keep_c: np.ndarray | None) -> torch.Tensor:
        rows = row_nodes if keep_r is None else row_nodes[keep_r]
        cols = col_nodes if keep_c is None else col_nodes[keep_c]
        return exact_cross_logits(rows, subset(row_at, keep_r), cols, subset(col_at, keep_c),
                                  scale, dtype)

    return cross_targets(row_nodes, col_nodes, self_at, logits_of, views=views,
                         diagonal=diagonal, device=device)


def exact_cross_logits(row_nodes: np.ndarray, row_at: RowsAt, col_nodes: np.ndarray,
                       col_at: RowsAt, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale * cos of row items against column items (all nodes >= 0), (B_r, B_c) float32.
    Each axis is taken in batch order, or over its distinct nodes and expanded when at least
    half its items share a node; same-node pairs are exactly `scale`."""
    r_nodes, r_sel, r_inv = distinct_or_all(row_nodes)
    c_nodes, c_sel, c_inv = distinct_or_all(col_nodes)
    xr = unit_rows(row_at(r_sel), scale).to(dtype)
    xc = unit_rows(col_at(c_sel), scale).to(dtype)
    sims = (xr @ xc.T).float()
    a, b = matching_pairs(r_nodes, c_nodes)
    sims[torch.from_numpy(a).to(sims.device), torch.from_numpy(b).to(sims.device)] = scale
    if r_inv is not None:
        sims = sims.index_select(0, torch.from_numpy(r_inv).to(sims.device))
    if c_inv is not None:
        sims = sims.index_select(1, torch.from_numpy(c_inv).to(sims.device))
    return sims


def distinct_or_all(nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None,
                                                   np.ndarray | None]:
    """(nodes to compute, their positions in the batch (None: all), how to expand them to
    the batch (None: no need)): the distinct nodes when at least half the items share one."""
    uniq, first, inv = np.unique(nodes, return_index=True, return_inverse=True)
    if 2 * len(uniq) > len(nodes):
        return nodes, None, None
    return uniq, first, inv.reshape(-1)


def matching_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i, j) with a[i] == b[j]."""
    order = np.argsort(b, kind="stable")
    sorted_b = b[order]
    lo = np.searchsorted(sorted_b, a, "left")
    counts = np.searchsorted(sorted_b, a, "right") - lo
    i = np.repeat(np.arange(len(a)), counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return i, order[k + np.repeat(lo, counts)]


def unit_rows(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows renormalised in float32 (a copy) and scaled by sqrt(scale): their products are
    scale * cos."""
    x = x.to(torch.float32, copy=True)
    return x.mul_(x.square().sum(dim=1, keepdim=True).rsqrt_().mul_(scale ** 0.5))


def gram_logits(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale * cos between the rows of x, (n, n) float32, with an exact diagonal."""
    return gram(unit_rows(x, scale).to(dtype)).fill_diagonal_(scale)


def gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """x @ x.T in float32. On a CPU each block above the diagonal is computed once and
    mirrored: (blocks + 1) / (2 * blocks) of the multiply-adds, and exactly symmetric."""
    n = x.shape[0]
    # small, a GPU, or bf16 (AMX panels run below one full product): one product is faster
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) \
            or n < 128 * blocks:
        return (x @ x.T).float()
    step = -(-n // blocks)
    out = torch.empty(n, n, dtype=x.dtype)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        # rows lo:hi against themselves and all after, written by BLAS straight into the
        # strided view (0.45 ms less per 1024 rows than a panel copied in)
        torch.mm(x[lo:hi], x[lo:].T, out=out[lo:hi, lo:])
        out[hi:, lo:hi] = out[lo:hi, hi:].T
    return out.float()


def shared_pairs(inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All ordered pairs (i, j), i != j, of positions with the same value in `inv`."""
    pos = np.flatnonzero(np.bincount(inv)[inv] > 1)
    same = inv[pos][:, None] == inv[pos][None, :]
    np.fill_diagonal(same, False)
    a, b = np.nonzero(same)
    return pos[a], pos[b]


def batch_nodes(nodes, who: str) -> np.ndarray:
    """A batch's nodes as int64, refusing float, bool, empty or below NO_TARGET."""
    if isinstance(nodes, torch.Tensor):
        nodes = nodes.detach().cpu().numpy()
    arr = np.asarray(nodes)
    if arr.size == 0:
        raise GraphbuildError(f"{who}: empty batch (no nodes)")
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise GraphbuildError(f"{who}: nodes must be a 1-d integer sequence, got "
                              f"{arr.dtype} of shape {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.min() < NO_TARGET:
        raise GraphbuildError(f"{who}: node {int(arr.min())} is below -1 (-1: no target)")
    return arr


def batch_rows(rows, nodes: np.ndarray, name: str) -> torch.Tensor:
    """The rows as a tensor, one per node, refusing two items of one node with other rows."""
    rows = torch.as_tensor(rows)
    if rows.ndim != 2 or len(rows) != len(nodes) or not rows.is_floating_point():
        raise GraphbuildError(f"targets_from_rows: {name} must be a ({len(nodes)}, dim) float "
                              f"array, one row per node; got {rows.dtype} of shape "
                              f"{tuple(rows.shape)}")
    have = np.flatnonzero(nodes != NO_TARGET)
    _, first, inv = np.unique(nodes[have], return_index=True, return_inverse=True)
    again = np.flatnonzero(first[inv.reshape(-1)] != np.arange(len(have)))
    if len(again):
        at, of = have[again], have[first[inv.reshape(-1)[again]]]
        same = rows[torch.from_numpy(at)] == rows[torch.from_numpy(of)]
        if not bool(same.all()):
            bad = int(np.flatnonzero(~same.all(dim=1).numpy())[0])
            raise GraphbuildError(f"targets_from_rows: {name} {int(of[bad])} and "
                                  f"{int(at[bad])} are of node {int(nodes[at[bad]])} but "
                                  f"differ")
    return rows
