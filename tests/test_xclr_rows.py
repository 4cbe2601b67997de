"""targets_from_rows: exact targets from rows handed in, bit for bit SoftTargets' exact ones.

The rows are read with zarr (not the trainer's reader) and handed in batch order, as a
trainer streaming them beside its samples would."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from graphbuild.errors import GraphbuildError

TAU_S = 0.1


@pytest.fixture(scope="module")
def stored(coco3k):
    """(run, every node's stored fp16 row, every sample's node), from zarr and polars."""
    import polars as pl
    import zarr

    emb = np.asarray(zarr.open_array(str(coco3k / "embeddings.zarr"), mode="r")[:])
    nodes = pl.read_parquet(coco3k / "samples.parquet").sort("sample")["node"].to_numpy()
    return coco3k, emb, nodes


def batches(nodes: np.ndarray) -> dict[str, np.ndarray]:
    """Sample batches of each kind the exact path branches on, and items without a target."""
    rng = np.random.default_rng(7)
    shared = np.flatnonzero(np.bincount(nodes)[nodes] > 1)  # samples of a repeated caption
    assert len(shared) >= 4
    with_none = rng.choice(3000, 300, replace=False)
    with_none[rng.random(300) < 0.15] = -1
    return {
        "random": rng.choice(3000, 256, replace=False),
        "random-1024": rng.choice(3000, 1024, replace=False),
        "few shared": np.concatenate([shared[:4], rng.choice(3000, 200, replace=False)]),
        "same sample twice": np.concatenate([np.arange(50), np.arange(10)]),
        "mostly shared": np.tile(rng.choice(3000, 40, replace=False), 3),
        "with -1": with_none,
        "-1 and repeats": np.array([5, -1, 5, 9, -1, 9, 9, 12]),
        "all -1": np.array([-1, -1, -1]),
        "one": np.array([17]),
        "one and -1": np.array([-1, 17]),
    }


@pytest.mark.parametrize("diagonal", ["mask", "keep"])
@pytest.mark.parametrize("views", [1, 2])
def test_rows_handed_in_give_soft_targets_bits(stored, diagonal, views):
    from graphbuild.xclr import SoftTargets, targets_from_rows

    run, emb, sample_nodes = stored
    soft = SoftTargets.from_run(run, tau_s=TAU_S, diagonal=diagonal)
    for kind, idx in batches(sample_nodes).items():
        nodes = np.where(idx >= 0, sample_nodes[idx], -1)
        rows = emb[np.maximum(nodes, 0)].copy()
        rows[nodes < 0] = np.nan  # an item without a target: its row is never read
        got = targets_from_rows(torch.from_numpy(rows), nodes, tau_s=TAU_S,
                                diagonal=diagonal, views=views)
        want = soft(idx, views=views)
        assert got.dtype == want.dtype == torch.float32, kind
        assert got.shape == (views * len(idx),) * 2, kind
        assert torch.equal(got, want), kind
        assert not torch.isnan(got).any(), kind


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rows_handed_in_match_other_product_dtypes_and_mmap(stored, dtype):
    from graphbuild.xclr import SoftTargets, targets_from_rows

    run, emb, sample_nodes = stored
    soft = SoftTargets.from_run(run, tau_s=TAU_S, dtype=dtype, mmap=True)
    for kind, idx in batches(sample_nodes).items():
        nodes = np.where(idx >= 0, sample_nodes[idx], -1)
        got = targets_from_rows(emb[np.maximum(nodes, 0)], nodes.tolist(), tau_s=TAU_S,
                                dtype=dtype, views=2)
        assert torch.equal(got, soft(idx, views=2)), kind


def test_rows_handed_in_are_refused_when_they_cannot_be_a_batchs(stored):
    from graphbuild.xclr import targets_from_rows

    _, emb, sample_nodes = stored
    nodes = sample_nodes[:8]
    rows = torch.from_numpy(emb[nodes])
    cases = {
        "rows must be a (8, dim) float array": (rows[:7], nodes),
        "rows must be a (8, dim) float array, one row per node; got torch.int16":
            (rows.view(torch.int16), nodes),
        "nodes must be a 1-d integer sequence, got float64": (rows, nodes.astype(float)),
        "node -2 is below -1": (rows, np.r_[nodes[:7], -2]),
        "empty batch": (rows[:0], nodes[:0]),
    }
    for message, (r, n) in cases.items():
        with pytest.raises(GraphbuildError, match=re.escape(message)):
            targets_from_rows(r, n, tau_s=TAU_S)
    twin = np.r_[nodes, nodes[2]]
    other = torch.cat([rows, rows[3:4]])  # node of item 2, row of item 3
    with pytest.raises(GraphbuildError, match="rows 2 and 8 are of node .* but differ"):
        targets_from_rows(other, twin, tau_s=TAU_S)
    for bad, message in (({"tau_s": 0.0}, "tau_s must be > 0"),
                         ({"tau_s": TAU_S, "views": 0}, "views must be an int >= 1"),
                         ({"tau_s": TAU_S, "diagonal": "zero"}, "diagonal must be one of")):
        with pytest.raises(GraphbuildError, match=message):
            targets_from_rows(rows, nodes, **bad)
