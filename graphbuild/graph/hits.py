"""Scattered (row, score, id) hits, reduced to each row's best.

`padded_bands` pads them into per-row matrices for a row-wise top-k or merge. Padding every
row to the widest one wastes most of the work when a few rows hold far more hits than the
rest (common: hub rows, loose thresholds), so rows are padded in bands of hit counts, each
band only as wide as its own widest row."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def padded_bands(rows: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor, n_rows: int,
                 bands: tuple[int, ...]) -> Iterator[tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]]:
    """For each band of hit counts (edges in `bands`, ascending, upper bounds inclusive; the
    last band is open), yield (row numbers, scores (r, width) padded with -inf, ids padded
    with -1). A row's hits keep their given order."""
    order = torch.sort(rows.to(torch.int32), stable=True).indices
    rows, vals, ids = (t.index_select(0, order) for t in (rows, vals, ids))
    counts = torch.bincount(rows, minlength=n_rows)
    dev = rows.device
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows), device=dev) - first.index_select(0, rows)
    # each row's band (-1: no hits), and each hit's row's band
    band_of = torch.bucketize(counts, torch.tensor(bands, dtype=counts.dtype, device=dev))
    band_of[counts == 0] = -1
    hit_band = band_of.index_select(0, rows)
    at = torch.empty(n_rows, dtype=torch.long, device=dev)
    for b in range(len(bands) + 1):
        band = (band_of == b).nonzero()[:, 0]
        if len(band) == 0:
            continue
        width = int(counts.index_select(0, band).max())
        at[band] = torch.arange(len(band), device=dev) * width
        mine = (hit_band == b).nonzero()[:, 0]
        flat = at.index_select(0, rows.index_select(0, mine)) + slot.index_select(0, mine)
        pv = torch.full((len(band) * width,), -torch.inf, dtype=vals.dtype, device=dev)
        pi = torch.full((len(band) * width,), -1, dtype=ids.dtype, device=dev)
        pv.index_copy_(0, flat, vals.index_select(0, mine))
        pi.index_copy_(0, flat, ids.index_select(0, mine))
        yield band, pv.view(len(band), width), pi.view(len(band), width)


def descending_bits(vals: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2**32) of fp32 values, ascending as the values descend (-inf last),
    to be packed with a row or id into one int64 sort key."""
    bits = vals.neg().view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # int order = float order
    return bits.add_(2**31)
