"""The X-CLR loss, and SimCLR and SupCon as special cases of its targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphbuild.errors import GraphbuildError
from graphbuild.xclr.layout import DIAGONALS, check_choice


def xclr_loss(z: torch.Tensor, targets: torch.Tensor, tau: float = 0.1,
              diagonal: str = "mask") -> torch.Tensor:
    """Mean over rows of the cross-entropy between `targets` (rows sum to 1) and
    softmax_j(z_i . z_j / tau), z L2-normalised here. Rows whose targets are all zero (e.g. a
    SupCon anchor with no positive, an item without a target) are left out of the mean; with
    none left the loss is 0 (zero gradients), not NaN. float64 z gives float64 math and
    loss; any other dtype float32 (bf16 autocast: the logits are taken to float32 before the
    softmax)."""
    check_choice("diagonal", diagonal, DIAGONALS)
    if not tau > 0:
        raise GraphbuildError(f"tau must be > 0, got {tau}")
    if z.ndim != 2 or targets.shape != (len(z), len(z)):
        raise GraphbuildError(f"targets must be ({len(z)}, {len(z)}) for z of shape "
                              f"{tuple(z.shape)}, got {tuple(targets.shape)}")
    if len(z) == 0:
        raise GraphbuildError("xclr_loss: empty batch (z has 0 rows)")
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    targets = targets.to(z.device, dtype)
    _check_targets(targets, diagonal)
    valid = targets.sum(dim=1) > 0
    z = F.normalize(z, dim=1)
    logits = (z @ z.T).to(dtype) / tau
    if not valid.any():  # nothing to learn from; log_softmax of a lone masked row is NaN
        return logits.sum() * 0.0
    if diagonal == "mask":
        eye = torch.eye(len(z), dtype=torch.bool, device=logits.device)
        logp = torch.log_softmax(logits.masked_fill(eye, float("-inf")), dim=1)
        logp = logp.masked_fill(eye, 0.0)
    else:
        logp = torch.log_softmax(logits, dim=1)
    rows = -(targets * logp).sum(dim=1)
    return rows[valid].sum() / valid.sum()


def _check_targets(targets: torch.Tensor, diagonal: str) -> None:
    """Refuse targets with NaN, inf or negative entries, or built with the other diagonal."""
    if not bool((torch.isfinite(targets) & (targets >= 0)).all()):
        raise GraphbuildError("targets hold NaN, inf or negative entries")
    if diagonal == "mask" and bool(targets.diagonal().abs().max() > 0):
        raise GraphbuildError("diagonal='mask' needs targets with a zero diagonal; build "
                              "them with diagonal='mask' too")
    if diagonal == "keep":
        massless_self = (targets.sum(dim=1) > 0) & (targets.diagonal() <= 0)
        if bool(massless_self.any()):
            raise GraphbuildError("diagonal='keep' needs targets with mass on the diagonal; "
                                  "these have a zero one (built with diagonal='mask'): give "
                                  "xclr_loss diagonal='mask'")


def simclr_targets(batch_size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The augmentation graph of a [view 1; view 2] batch: each row's target is its other view.
    With xclr_loss(diagonal="mask") this is NT-Xent."""
    n = 2 * batch_size
    t = torch.zeros(n, n, device=device)
    i = torch.arange(batch_size, device=device)
    t[i, i + batch_size] = 1.0
    t[i + batch_size, i] = 1.0
    return t


def supcon_targets(labels, views: int = 2, device: str | torch.device = "cpu") -> torch.Tensor:
    """The class graph: uniform over the other members of the same class among all views of
    the batch (stacked view by view). With xclr_loss(diagonal="mask") this is SupCon's L_out."""
    labels = torch.as_tensor(labels, device=device).reshape(-1).repeat(views)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    t = same.float()
    return t / t.sum(dim=1, keepdim=True).clamp_min(1.0)
