"""The layout of a batch's targets around its logits: items without a target, views, the
diagonal (or, against columns, each row's own column as self_at states it), the row softmax.
Shared by exact and graph targets, square and rectangular, so all lay a batch out alike.

A logits function `logits_of(keep)` gives scale * cos over the batch's items that have a
target: keep=None for all of them in batch order, else the positions `keep` (int64); against
columns, `logits_of(keep_rows, keep_columns)`. Its result is a fresh float32 tensor, ours to
change in place.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from graphbuild.errors import GraphbuildError
from graphbuild.xclr.data import NO_TARGET

DIAGONALS = ("mask", "keep")

LogitsOf = Callable[[np.ndarray | None], torch.Tensor]


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise GraphbuildError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def check_views(views) -> int:
    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 1:
        raise GraphbuildError(f"views must be an int >= 1, got {views!r}")
    return int(views)


def check_tau(name: str, tau) -> float:
    if not tau > 0:
        raise GraphbuildError(f"{name} must be > 0, got {tau}")
    return tau


def square_targets(nodes: np.ndarray, logits_of: LogitsOf, *, views: int, diagonal: str,
                   device: torch.device) -> torch.Tensor:
    """(views*B, views*B) targets of a batch whose item i has node nodes[i] (NO_TARGET: none).
    An item without a target gets a zero row and column around the others' targets."""
    have = np.flatnonzero(nodes != NO_TARGET)
    if len(have) == len(nodes):
        return softmax_tiled(logits_of(None), views, diagonal)
    n = len(nodes)
    out = torch.zeros(views * n, views * n, device=device)
    if len(have):
        at = torch.from_numpy((have + n * np.arange(views)[:, None]).reshape(-1)).to(device)
        out[at[:, None], at[None, :]] = softmax_tiled(logits_of(have), views, diagonal)
    return out


def softmax_tiled(logits: torch.Tensor, views: int, diagonal: str) -> torch.Tensor:
    """Row softmax of (B, B) logits (a fresh tensor: ours to change), tiled for views; a row
    with no other item under diagonal='mask' (a batch of one) is all zero."""
    if views > 1:
        logits = logits.repeat(views, views)
    if diagonal == "mask":
        if len(logits) == 1:
            return torch.zeros_like(logits)
        logits.fill_diagonal_(float("-inf"))
    return torch.softmax(logits, dim=1)


# Rectangular targets: rows (B_r items) against columns (B_c items), e.g. a rank's samples
# against the batch gathered from every rank, or queries against keys and a queue.

UNSTATED = object()  # self_at's default: where the rows sit among the columns is never guessed

SELF_AT = ("self_at must say where the row samples sit among the columns: an int o (row i "
           "is column o + i, e.g. rank * B under DDP), one column per row (-1: not among "
           "them), or None (no row's own item is among the columns, e.g. MoCo's queries "
           "against keys)")


def self_positions(self_at, rows: np.ndarray, columns: np.ndarray, diagonal: str,
                   who: str) -> np.ndarray:
    """Each row's column (-1: none) as self_at states it, checked (stated_positions), and
    each holding the row's own sample (or node)."""
    at = stated_positions(self_at, len(rows), len(columns), diagonal, who)
    placed = np.flatnonzero(at >= 0)
    wrong = placed[rows[placed] != columns[at[placed]]]
    if len(wrong):
        i = int(wrong[0])
        raise GraphbuildError(f"{who}: row {i} is sample {int(rows[i])} but column "
                              f"{int(at[i])}, where self_at puts it, is sample "
                              f"{int(columns[at[i]])}: self_at does not say where the rows "
                              f"sit among the columns")
    return at


def stated_positions(self_at, n_r: int, n_c: int, diagonal: str, who: str) -> np.ndarray:
    """Each of n_r rows' column among n_c (-1: none) as self_at states it: in range and
    distinct; under diagonal='mask' no more rows than columns."""
    if self_at is UNSTATED:
        raise GraphbuildError(f"{who}: {SELF_AT}")
    if diagonal == "mask" and n_r > n_c:
        raise GraphbuildError(f"{who}: {n_r} rows against {n_c} columns under diagonal='mask': "
                              f"the rows cannot all be among the columns, so which item is a "
                              f"row's own is unclear; swap rows and columns, or use "
                              f"diagonal='keep'")
    if self_at is None:
        return np.full(n_r, -1, np.int64)
    if isinstance(self_at, (int, np.integer)) and not isinstance(self_at, bool):
        if not 0 <= self_at <= n_c - n_r:
            raise GraphbuildError(f"{who}: self_at={self_at} puts the {n_r} rows at columns "
                                  f"{self_at}..{self_at + n_r - 1}, outside the {n_c} columns")
        return np.arange(self_at, self_at + n_r, dtype=np.int64)
    if isinstance(self_at, torch.Tensor):
        self_at = self_at.detach().cpu().numpy()
    at = np.asarray(self_at)
    if at.shape != (n_r,) or (at.size and at.dtype.kind not in "iu"):
        raise GraphbuildError(f"{who}: self_at must be an int, None, or {n_r} integers (one "
                              f"column per row), got {at.dtype} of shape {at.shape}")
    at = at.astype(np.int64, copy=False)
    if len(at) and (at.min() < -1 or at.max() >= n_c):
        bad = int(at[(at < -1) | (at >= n_c)][0])
        raise GraphbuildError(f"{who}: self_at holds column {bad}, outside -1..{n_c - 1}")
    placed = at[at >= 0]
    if len(np.unique(placed)) != len(placed):
        raise GraphbuildError(f"{who}: self_at puts two rows at one column")
    return at


def own_items(self_at: np.ndarray, n_r: int, n_c: int,
              views: int) -> tuple[np.ndarray, np.ndarray]:
    """(row item, column item) of each row item's own column item, views laid out view by
    view on both axes: row sample i of view v sits at column sample self_at[i] of view v."""
    own = np.flatnonzero(self_at >= 0)
    shift = np.arange(views)[:, None]
    return (own + n_r * shift).reshape(-1), (self_at[own] + n_c * shift).reshape(-1)


CrossLogitsOf = Callable[[np.ndarray | None, np.ndarray | None], torch.Tensor]


def cross_targets(row_nodes: np.ndarray, col_nodes: np.ndarray, self_at: np.ndarray,
                  logits_of: CrossLogitsOf, *, views: int, diagonal: str,
                  device: torch.device) -> torch.Tensor:
    """(views*B_r, views*B_c) targets of rows against columns, both laid out view by view;
    self_at (checked) gives each row sample's own column sample. logits_of(keep_r, keep_c)
    gives the logits of the rows and columns that have a target (None: all). An item without
    a target gets a zero row or column."""
    have_r = np.flatnonzero(row_nodes != NO_TARGET)
    have_c = np.flatnonzero(col_nodes != NO_TARGET)
    n_r, n_c = len(row_nodes), len(col_nodes)
    if len(have_r) == n_r and len(have_c) == n_c:
        return softmax_cross(logits_of(None, None), self_at, n_c, views, diagonal)
    out = torch.zeros(views * n_r, views * n_c, device=device)
    if len(have_r) and len(have_c):
        col_at = np.full(n_c, -1, np.int64)
        col_at[have_c] = np.arange(len(have_c))
        own = self_at[have_r]  # a row with a target sits at a column with the same sample
        own = np.where(own >= 0, col_at[own], -1)
        sub = softmax_cross(logits_of(have_r if len(have_r) < n_r else None,
                                      have_c if len(have_c) < n_c else None),
                            own, len(have_c), views, diagonal)
        at_r = torch.from_numpy((have_r + n_r * np.arange(views)[:, None]).reshape(-1))
        at_c = torch.from_numpy((have_c + n_c * np.arange(views)[:, None]).reshape(-1))
        out[at_r.to(device)[:, None], at_c.to(device)[None, :]] = sub
    return out


def softmax_cross(logits: torch.Tensor, self_at: np.ndarray, n_c: int, views: int,
                  diagonal: str) -> torch.Tensor:
    """Row softmax of (B_r, B_c) logits (a fresh tensor: ours to change), tiled for views;
    under diagonal='mask' each row's own column is left out, and a row left with no column
    (its own was the only one) is all zero."""
    r, c = own_items(self_at, len(logits), n_c, views)
    if views > 1:
        logits = logits.repeat(views, views)
    masked = diagonal == "mask" and len(r) > 0
    if masked:
        r, c = torch.from_numpy(r).to(logits.device), torch.from_numpy(c).to(logits.device)
        logits[r, c] = float("-inf")
    out = torch.softmax(logits, dim=1)
    if masked and views * n_c == 1:
        out[r] = 0.0
    return out
