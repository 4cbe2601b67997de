"""The X-CLR loss, and SimCLR and SupCon as special cases of its targets; each over one
batch, or a local batch against keys (a batch gathered from every rank, a queue)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from graphbuild.errors import GraphbuildError
from graphbuild.xclr.layout import (
    DIAGONALS,
    UNSTATED,
    check_choice,
    check_tau,
    check_views,
    own_items,
    stated_positions,
)

REDUCTIONS = ("mean", "sum")


def xclr_loss(z: torch.Tensor, targets: torch.Tensor, tau: float = 0.1,
              diagonal: str = "mask", *, keys: torch.Tensor | None = None, self_at=UNSTATED,
              views: int = 1, reduction: str = "mean") -> torch.Tensor:
    """The cross-entropy between `targets` (rows sum to 1) and softmax_j(z_i . z_j / tau),
    z L2-normalised here; or, with `keys`, softmax_j(z_i . k_j / tau) over the keys (a
    gathered batch, or keys and a queue), the targets being SoftTargets(idx, columns=...,
    self_at=...) with the same self_at and views. Gradients flow into z, and into keys as far
    as they carry any: a batch gathered with torch.distributed.nn.functional.all_gather
    passes them back to the rank that owns each key.

    Rows whose targets are all zero (e.g. a SupCon anchor with no positive, an item without
    a target) are left out; with none left the loss is 0 (zero gradients), not NaN.
    reduction="mean" averages over the rows left, "sum" adds them (divide by a count of your
    own, e.g. the rows with targets over every rank). float64 z gives float64 math and
    loss; any other dtype float32 (bf16 autocast: the logits are taken to float32 before the
    softmax).

    With keys, self_at states where the rows sit among the keys, as for the targets: under
    diagonal="mask" that logit is left out of the softmax, under "keep" it stays; views lay
    out both z and keys view by view."""
    check_choice("diagonal", diagonal, DIAGONALS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_tau("tau", tau)
    if z.ndim != 2:
        raise GraphbuildError(f"xclr_loss: z must be an (n, dim) matrix, got shape "
                              f"{tuple(z.shape)}")
    if len(z) == 0:
        raise GraphbuildError("xclr_loss: empty batch (z has 0 rows)")
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    if keys is None:
        if self_at is not UNSTATED or views != 1:
            raise GraphbuildError("xclr_loss: self_at and views are for z against keys; give "
                                  "keys too")
        targets, logits, own = _square(z, targets, diagonal, dtype, tau)
    else:
        targets, logits, own = _cross(z, keys, targets, diagonal, dtype, tau, self_at, views)
    valid = targets.sum(dim=1) > 0
    if not valid.any():  # nothing to learn from; log_softmax of a lone masked row is NaN
        return logits.sum() * 0.0
    if diagonal == "mask" and own is not None:
        minus_inf = torch.tensor(float("-inf"), dtype=dtype, device=logits.device)
        logp = torch.log_softmax(logits.index_put(own, minus_inf), dim=1)
        logp = logp.index_put(own, torch.zeros((), dtype=dtype, device=logits.device))
    else:
        logp = torch.log_softmax(logits, dim=1)
    rows = -(targets * logp).sum(dim=1)
    total = rows[valid].sum()
    return total / valid.sum() if reduction == "mean" else total


def _square(z: torch.Tensor, targets: torch.Tensor, diagonal: str, dtype: torch.dtype,
            tau: float) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """(targets checked, logits, the diagonal's positions) of z against itself."""
    if targets.shape != (len(z), len(z)):
        raise GraphbuildError(f"targets must be ({len(z)}, {len(z)}) for z of shape "
                              f"{tuple(z.shape)}, got {tuple(targets.shape)}")
    targets = targets.to(z.device, dtype)
    diag = torch.arange(len(z), device=z.device)
    _check_targets(targets, diagonal, (diag, diag))
    z = F.normalize(z, dim=1)
    logits = (z @ z.T).to(dtype) / tau
    return targets, logits, (diag, diag)


def _cross(z: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, diagonal: str,
           dtype: torch.dtype, tau: float, self_at,
           views) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """(targets checked, logits, the rows' own keys' positions or None) of z against keys."""
    views = check_views(views)
    n_q, n_k = len(z), len(keys)
    if keys.ndim != 2 or n_k == 0 or keys.shape[1] != z.shape[1]:
        raise GraphbuildError(f"xclr_loss: keys must be a non-empty (n, {z.shape[1]}) matrix "
                              f"like z, got shape {tuple(keys.shape)}")
    if n_q % views or n_k % views:
        raise GraphbuildError(f"xclr_loss: views={views} do not match: z has {n_q} rows and "
                              f"keys {n_k}, and each must be views x its samples")
    if targets.shape != (n_q, n_k):
        raise GraphbuildError(f"xclr_loss: targets must be ({n_q}, {n_k}) for z of {n_q} rows "
                              f"and {n_k} keys, got {tuple(targets.shape)} (targets, z and "
                              f"keys must have the same views and samples)")
    at = stated_positions(self_at, n_q // views, n_k // views, diagonal, "xclr_loss")
    r, c = own_items(at, n_q // views, n_k // views, views)
    own = (torch.from_numpy(r).to(z.device), torch.from_numpy(c).to(z.device)) \
        if len(r) else None
    targets = targets.to(z.device, dtype)
    _check_targets(targets, diagonal, own, against_keys=True)
    q, k = F.normalize(z, dim=1), F.normalize(keys.to(z.dtype), dim=1)
    return targets, (q @ k.T).to(dtype) / tau, own


def _check_targets(targets: torch.Tensor, diagonal: str, own: tuple | None,
                   against_keys: bool = False) -> None:
    """Refuse targets with NaN, inf or negative entries, or built with the other diagonal
    (or, against keys, another self_at): `own` holds (rows, columns) of each row's own item,
    None when no row has one among the columns."""
    if not bool((torch.isfinite(targets) & (targets >= 0)).all()):
        raise GraphbuildError("targets hold NaN, inf or negative entries")
    if own is None:
        return
    at_own = targets[own]
    if diagonal == "mask" and bool(at_own.abs().max() > 0):
        if against_keys:
            raise GraphbuildError("diagonal='mask' needs targets with zeros where self_at puts "
                                  "each row's own key; build them with diagonal='mask' too "
                                  "and the same self_at and views")
        raise GraphbuildError("diagonal='mask' needs targets with a zero diagonal; build "
                              "them with diagonal='mask' too")
    if diagonal == "keep":
        massless_self = (targets[own[0]].sum(dim=1) > 0) & (at_own <= 0)
        if bool(massless_self.any()):
            if against_keys:
                raise GraphbuildError("diagonal='keep' needs targets with mass where self_at "
                                      "puts each row's own key; these have none (built with "
                                      "diagonal='mask', or another self_at): give xclr_loss "
                                      "diagonal='mask'")
            raise GraphbuildError("diagonal='keep' needs targets with mass on the diagonal; "
                                  "these have a zero one (built with diagonal='mask'): give "
                                  "xclr_loss diagonal='mask'")


def simclr_targets(batch_size: int, device: str | torch.device = "cpu", *,
                   columns: int | None = None, self_at=UNSTATED) -> torch.Tensor:
    """The augmentation graph of a [view 1; view 2] batch: each row's target is its other view.
    With xclr_loss(diagonal="mask") this is NT-Xent.

    Against keys of `columns` samples ([view 1; view 2] of them, e.g. a gathered batch):
    (2B, 2*columns), row sample i's other view at column sample self_at + i (an int), or at
    self_at[i] (one per row; -1: none, a zero row)."""
    if columns is None:
        if self_at is not UNSTATED:
            raise GraphbuildError("simclr_targets: self_at is for columns; give columns too")
        n = 2 * batch_size
        t = torch.zeros(n, n, device=device)
        i = torch.arange(batch_size, device=device)
        t[i, i + batch_size] = 1.0
        t[i + batch_size, i] = 1.0
        return t
    if self_at is None:
        raise GraphbuildError("simclr_targets: a row's positive is its own sample's other "
                              "view among the columns, so self_at must place the rows")
    at = stated_positions(self_at, batch_size, columns, "mask", "simclr_targets")
    r, c = own_items(at, batch_size, columns, 2)
    t = torch.zeros(2 * batch_size, 2 * columns, device=device)
    other = np.where(c < columns, c + columns, c - columns)  # the same sample, other view
    t[torch.from_numpy(r).to(device), torch.from_numpy(other).to(device)] = 1.0
    return t


def supcon_targets(labels, views: int = 2, device: str | torch.device = "cpu", *,
                   columns=None, self_at=UNSTATED) -> torch.Tensor:
    """The class graph: uniform over the other members of the same class among all views of
    the batch (stacked view by view). With xclr_loss(diagonal="mask") this is SupCon's L_out.

    Against keys whose labels are `columns` (e.g. gathered from every rank), views laid out
    alike: uniform over the keys of the row's class but its own, which sits at column
    self_at + i (an int), self_at[i] (one per row, -1: none) or nowhere (None)."""
    views = check_views(views)
    labels = torch.as_tensor(labels, device=device).reshape(-1)
    if columns is None:
        if self_at is not UNSTATED:
            raise GraphbuildError("supcon_targets: self_at is for columns; give columns too")
        labels = labels.repeat(views)
        same = labels[:, None] == labels[None, :]
        same.fill_diagonal_(False)
    else:
        cols = torch.as_tensor(columns, device=device).reshape(-1)
        at = stated_positions(self_at, len(labels), len(cols), "mask", "supcon_targets")
        placed = np.flatnonzero(at >= 0)
        if not bool((labels[placed] == cols[at[placed]]).all()):
            raise GraphbuildError("supcon_targets: a row's label differs from the label of "
                                  "the column self_at puts it at")
        same = labels.repeat(views)[:, None] == cols.repeat(views)[None, :]
        r, c = own_items(at, len(labels), len(cols), views)
        same[torch.from_numpy(r).to(device), torch.from_numpy(c).to(device)] = False
    t = same.float()
    return t / t.sum(dim=1, keepdim=True).clamp_min(1.0)
