"""Rectangular targets (rows against columns) in one process: the rows of the square
targets they must equal, rows handed in, SimCLR and SupCon against keys, and bad input."""

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


def batch(nodes: np.ndarray, n: int = 90, seed: int = 0) -> np.ndarray:
    """n samples with a repeat, two samples of one caption, and items without a target."""
    rng = np.random.default_rng(seed)
    twins = np.flatnonzero(np.bincount(nodes)[nodes] > 1)
    twins = twins[nodes[twins] == nodes[twins[0]]][:2]
    idx = rng.choice(np.setdiff1d(np.arange(len(nodes)), twins), n, replace=False)
    idx[3], idx[50] = twins
    idx[60] = idx[10]
    idx[[20, 70]] = -1
    return idx


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to float32 precision (the products differ in shape, so BLAS may round apart),
    and exactly zero where the wanted ones are: masked items, items without a target."""
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-6
    assert torch.equal(got == 0, want == 0)


def view_rows(rows: np.ndarray, n: int, views: int) -> np.ndarray:
    return np.concatenate([rows + v * n for v in range(views)])


@pytest.mark.parametrize("mode", ["exact", "graph"])
@pytest.mark.parametrize("diagonal", ["mask", "keep"])
def test_rows_at_any_place_are_the_square_targets_rows(stored, mode, diagonal):
    """Rows stated by an offset, or one column each in any order, give the square targets'
    rows, whether or not some rows sit among the columns."""
    from graphbuild.xclr import SoftTargets

    run, _, nodes = stored
    idx = batch(nodes)
    n = len(idx)
    t = SoftTargets.from_run(run, mode=mode, tau_s=TAU_S, diagonal=diagonal)
    for views in (1, 2):
        full = t(idx, views=views)
        for lo, hi in ((0, 30), (30, 75), (75, 90), (0, 90)):
            got = t(idx[lo:hi], views=views, columns=idx, self_at=lo)
            close(got, full[view_rows(np.arange(lo, hi), n, views)])
        pick = np.array([61, 5, 20, 3, 88])
        got = t(idx[pick], views=views, columns=idx, self_at=pick)
        close(got, full[view_rows(pick, n, views)])
    if diagonal == "keep":  # a row not among the columns: its own item is simply absent
        rest = np.setdiff1d(np.arange(n), [40])
        got = t(idx[[40]], columns=idx[rest], self_at=None)
        own = t(idx[[40]], columns=idx, self_at=40)[:, rest]
        assert torch.allclose(got, own / own.sum(), atol=1e-6)


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("diagonal", ["mask", "keep"])
def test_rows_handed_in_give_soft_targets_columns_bits(stored, views, diagonal):
    from graphbuild.xclr import SoftTargets, targets_from_rows

    run, emb, sample_nodes = stored
    idx = batch(sample_nodes)
    soft = SoftTargets.from_run(run, tau_s=TAU_S, diagonal=diagonal)
    mostly_shared = np.tile(idx[:30], 3)  # the product over distinct nodes, expanded
    for rows, cols, at in ((idx[30:60], idx, 30), (idx[:30], mostly_shared, 30),
                           (mostly_shared[:45], mostly_shared, 0), (idx[:5], idx[40:], None)):
        node_r = np.where(rows >= 0, sample_nodes[rows], -1)
        node_c = np.where(cols >= 0, sample_nodes[cols], -1)
        got = targets_from_rows(emb[np.maximum(node_r, 0)], node_r, tau_s=TAU_S,
                                diagonal=diagonal, views=views,
                                column_rows=emb[np.maximum(node_c, 0)], column_nodes=node_c,
                                self_at=at)
        assert torch.equal(got, soft(rows, views=views, columns=cols, self_at=at))


def test_no_column_with_a_target_and_a_lone_own_column(stored):
    from graphbuild.xclr import SoftTargets

    run, _, _ = stored
    t = SoftTargets.from_run(run, tau_s=TAU_S)
    assert torch.equal(t([4, 5], columns=[-1, -1, -1], self_at=None), torch.zeros(2, 3))
    assert torch.equal(t([4], columns=[4], self_at=0), torch.zeros(1, 1))
    assert torch.equal(t([4], views=2, columns=[4], self_at=0),
                       torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    keep = SoftTargets.from_run(run, tau_s=TAU_S, diagonal="keep")
    assert torch.equal(keep([4, 9], columns=[4], self_at=[0, -1]), torch.ones(2, 1))


def test_simclr_and_supcon_against_keys_are_the_square_rows():
    from graphbuild.xclr import simclr_targets, supcon_targets

    n, lo, hi = 10, 4, 7
    full = simclr_targets(n)
    rows = view_rows(np.arange(lo, hi), n, 2)
    assert torch.equal(simclr_targets(hi - lo, columns=n, self_at=lo), full[rows])
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 3, 1])
    for views in (1, 2):
        rows = view_rows(np.arange(lo, hi), n, views)
        assert torch.equal(supcon_targets(labels[lo:hi], views=views, columns=labels,
                                          self_at=lo),
                           supcon_targets(labels, views=views)[rows])
    with pytest.raises(GraphbuildError, match="label differs"):
        supcon_targets(labels[:3], columns=labels, self_at=1)
    with pytest.raises(GraphbuildError, match="self_at must place the rows"):
        simclr_targets(3, columns=n, self_at=None)


def test_loss_against_keys_with_rows_among_them_is_the_square_loss():
    """z against keys = z itself, self_at=0: the square loss, values and gradients."""
    from graphbuild.xclr import supcon_targets, xclr_loss

    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])
    for diagonal in ("mask", "keep"):
        t = supcon_targets(labels, views=2)
        if diagonal == "keep":
            t = (t + torch.eye(16)) / 2
        z = torch.randn(16, 8, generator=g, dtype=torch.float64, requires_grad=True)
        want = xclr_loss(z, t, tau=0.3, diagonal=diagonal)
        (dz,) = torch.autograd.grad(want, z)
        for views in (1, 2):
            got = xclr_loss(z, t, tau=0.3, diagonal=diagonal, keys=z, self_at=0, views=views)
            assert torch.allclose(got, want, rtol=1e-12)
            assert torch.allclose(torch.autograd.grad(got, z)[0], dz, rtol=1e-10)
        summed = xclr_loss(z, t, tau=0.3, diagonal=diagonal, reduction="sum")
        assert torch.allclose(summed, want * 16, rtol=1e-12)


def test_bad_columns_are_clear_errors(stored):
    from graphbuild.xclr import SoftTargets, targets_from_rows, xclr_loss

    run, emb, nodes = stored
    t = SoftTargets.from_run(run, tau_s=TAU_S)
    idx = np.arange(100, 110)
    cases = {
        "column sample index 3000 is out of range -1..2999":
            lambda: t(idx, columns=np.r_[idx, 3000], self_at=0),
        "column sample indices must be integers":
            lambda: t(idx, columns=idx.astype(float), self_at=0),
        "self_at must say where the row samples sit among the columns":
            lambda: t(idx, columns=idx),
        "self_at is for rows against columns": lambda: t(idx, self_at=0),
        "10 rows against 4 columns under diagonal='mask'":
            lambda: t(idx, columns=idx[:4], self_at=None),
        "self_at=5 puts the 10 rows at columns 5..14, outside the 12 columns":
            lambda: t(idx, columns=np.r_[idx, 1, 2], self_at=5),
        "row 0 is sample 100 but column 0, where self_at puts it, is sample 7":
            lambda: t(idx, columns=np.r_[7, idx], self_at=0),
        "self_at puts two rows at one column": lambda: t(idx[:2], columns=idx, self_at=[3, 3]),
        "self_at holds column 10, outside -1..9": lambda: t(idx[:1], columns=idx, self_at=[10]),
        "self_at must be an int, None, or 2 integers":
            lambda: t(idx[:2], columns=idx, self_at=[0.0, 1.0]),
        "give both column_rows and column_nodes":
            lambda: targets_from_rows(emb[nodes[idx]], nodes[idx], tau_s=TAU_S,
                                      column_nodes=nodes[idx], self_at=0),
        "column_rows must be a (10, dim) float array":
            lambda: targets_from_rows(emb[nodes[idx]], nodes[idx], tau_s=TAU_S,
                                      column_rows=emb[nodes[idx[:9]]], column_nodes=nodes[idx],
                                      self_at=0),
    }
    z, keys = torch.randn(6, 8), torch.randn(9, 8)
    targets_2v = torch.full((6, 8), 1 / 8)
    cases.update({
        "views=2 do not match: z has 6 rows and keys 9":
            lambda: xclr_loss(z, torch.full((6, 9), 1 / 9), keys=keys, self_at=None, views=2),
        "targets must be (6, 9) for z of 6 rows and 9 keys, got (6, 8)":
            lambda: xclr_loss(z, targets_2v, keys=keys, self_at=None),
        "keys must be a non-empty (n, 8) matrix like z":
            lambda: xclr_loss(z, targets_2v, keys=torch.randn(9, 4), self_at=None),
        "xclr_loss: self_at must say where": lambda: xclr_loss(z, targets_2v, keys=keys[:8]),
        "self_at and views are for z against keys": lambda: xclr_loss(z, z @ z.T, self_at=0),
        "6 rows against 4 columns under diagonal='mask'":
            lambda: xclr_loss(z, torch.full((6, 4), 0.25), keys=keys[:4], self_at=None),
        "needs targets with zeros where self_at puts each row's own key":
            lambda: xclr_loss(z, torch.full((6, 9), 1 / 9), keys=keys, self_at=2),
        "mass where self_at puts each row's own key":
            lambda: xclr_loss(z, t(idx[:6], columns=idx[:9], self_at=0), diagonal="keep",
                              keys=keys, self_at=0),
        "reduction must be one of mean, sum":
            lambda: xclr_loss(z, torch.full((6, 9), 1 / 9), keys=keys, self_at=None,
                              reduction="none"),
    })
    for message, call in cases.items():
        with pytest.raises(GraphbuildError, match=re.escape(message)):
            call()
