"""The layout of a batch's targets around its logits: items without a target, views, the
diagonal, the row softmax. Shared by exact and graph targets, so both lay a batch out alike.

A logits function `logits_of(keep)` gives scale * cos over the batch's items that have a
target: keep=None for all of them in batch order, else the positions `keep` (int64). Its
result is a fresh float32 tensor, ours to change in place.
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
