"""Row moments (graph/moments.py, rundir/moments.py) and graph mode's calibrated fill, on the
COCO fixture: the stored values against a numpy brute force over every pair, their bytes for
any shard layout, a rerun that adds them to a graph built without them, readers refusing
missing, stale or damaged ones, and the targets they give."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from graphbuild.errors import GraphbuildError
from tests.test_xclr_runs import coco_run

MOMENTS = Path("graph/_moments")
TAU_S = 0.1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return coco_run(tmp_path_factory)


def copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def brute_force(run: Path) -> dict:
    """Every cosine of the stored rows (read with zarr, float64), the top 16 uncentred
    principal axes from numpy's eigh of X^T X, and each row's residual sums over j != i."""
    import zarr

    x = np.asarray(zarr.open_array(str(run / "embeddings.zarr"), mode="r")[:], np.float64)
    sims = x @ x.T
    _, vectors = np.linalg.eigh(x.T @ x)
    proj = x @ vectors[:, ::-1][:, :16]
    resid = sims - proj @ proj.T
    np.fill_diagonal(resid, 0.0)
    return {"sims": sims, "proj": proj, "sum": resid.sum(1), "sum_sq": (resid ** 2).sum(1)}


def test_moments_equal_a_brute_force(run):
    from graphbuild.rundir.moments import read_moments

    want, got = brute_force(run), read_moments(run)
    assert got.proj.shape == (len(want["sims"]), 16) and got.proj.dtype == np.float32
    signs = np.sign((want["proj"] * got.proj).sum(0))  # an eigenvector's sign is arbitrary
    assert np.all(signs != 0)
    assert np.allclose(got.proj, want["proj"] * signs, rtol=0, atol=1e-6)
    # the d x d products run in float32 (graph/moments.py): measured here, 1.9e-6 absolute
    # on the sums and 3.7e-7 relative on the sums of squares; the bounds allow ten times that
    assert np.allclose(got.sum, want["sum"], rtol=0, atol=2e-5)
    assert np.allclose(got.sum_sq, want["sum_sq"], rtol=4e-6, atol=0)
    # the first axes carry much of every row's cosines: the residual is smaller than the whole
    assert np.abs(got.sum).mean() < np.abs(want["sims"].sum(1) - 1).mean()


def test_moments_bytes_do_not_depend_on_the_shard_layout(run, tmp_path):
    from graphbuild.graph.stage import knn_shard
    from graphbuild.rundir.moments import read_moments

    out = copy(run, tmp_path)
    shutil.rmtree(out / "graph")
    shutil.rmtree(out / "_state/knn")
    results = [knn_shard(out, k=16, method="exact", shard=s, num_shards=3) for s in range(3)]
    assert results[-1].complete and all(r.moments_seconds > 0 for r in results)
    one, three = read_moments(run), read_moments(out)
    for a, b in zip(one, three):
        assert a.tobytes() == b.tobytes()


def test_a_rerun_adds_missing_moments_without_searching_again(run, tmp_path):
    from graphbuild.graph.stage import knn_shard

    out = copy(run, tmp_path)
    part = (out / "graph/part-00000.parquet").read_bytes()
    stored = (out / MOMENTS / "part-00000.parquet").read_bytes()
    shutil.rmtree(out / MOMENTS)  # a graph built before the knn stage stored them
    (out / "_state/knn/moments-shard-00000-of-00001.done").unlink()
    r = knn_shard(out, k=16, method="exact")
    assert r.skipped and r.complete and r.moments_seconds > 0
    assert (out / "graph/part-00000.parquet").read_bytes() == part
    assert (out / MOMENTS / "part-00000.parquet").read_bytes() == stored
    again = knn_shard(out, k=16, method="exact")
    assert again.skipped and again.moments_seconds == 0.0


def test_a_marker_that_does_not_vouch_has_its_moments_computed_again(run, tmp_path):
    from graphbuild.graph.stage import knn_shard

    out = copy(run, tmp_path)
    stored = (out / MOMENTS / "part-00000.parquet").read_bytes()
    (out / MOMENTS / "part-00000.parquet").write_bytes(stored[:-100])  # truncated part
    r = knn_shard(out, k=16, method="exact")
    assert r.complete and r.moments_seconds > 0
    assert (out / MOMENTS / "part-00000.parquet").read_bytes() == stored
    marker = out / "_state/knn/moments-shard-00000-of-00001.done"
    stats = json.loads(marker.read_text())
    marker.write_text(json.dumps({**stats, "provenance": {**stats["provenance"],
                                                          "precision": "fp32"}}))
    r = knn_shard(out, k=16, method="exact")
    assert r.moments_seconds > 0
    assert json.loads(marker.read_text())["provenance"] == stats["provenance"]


def test_an_unfinished_moments_shard_leaves_no_moments_meta(run, tmp_path):
    from graphbuild.graph.stage import knn_shard
    from graphbuild.rundir.moments import read_moments

    out = copy(run, tmp_path)
    shutil.rmtree(out / "graph")
    shutil.rmtree(out / "_state/knn")
    r = knn_shard(out, k=16, method="exact", shard=0, num_shards=2)
    assert not r.complete and r.missing_shards == [1]
    assert not (out / MOMENTS / "_meta.json").exists()
    with pytest.raises(GraphbuildError, match="graph is not complete"):
        read_moments(out)


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert text and "\n" not in text
    return text


def test_graph_mode_refuses_missing_moments(run, tmp_path):
    from graphbuild.xclr import SoftTargets

    out = copy(run, tmp_path)
    (out / MOMENTS / "_meta.json").unlink()
    with pytest.raises(GraphbuildError) as e:
        SoftTargets.from_run(out, mode="graph")  # the default rule, at construction
    assert _one_line(e).startswith(f"{out / MOMENTS / '_meta.json'}: missing")
    assert "rerun `graphbuild knn RUN`" in str(e.value)
    floor = SoftTargets.from_run(out, mode="graph", rule="floor")  # needs no moments
    assert floor(np.arange(8)).shape == (8, 8)


def test_graph_mode_refuses_stale_moments(run, tmp_path):
    from graphbuild.xclr import SoftTargets

    out = copy(run, tmp_path)
    meta_file = out / MOMENTS / "_meta.json"
    meta = json.loads(meta_file.read_text())
    meta["provenance"]["precision"] = "fp32"  # as if from other embeddings
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(GraphbuildError, match="built from other embeddings.*precision.*stale"):
        SoftTargets.from_run(out, mode="graph")
    meta = json.loads(meta_file.read_text())
    meta["n_nodes"] = 2999
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(GraphbuildError, match="over 2999 nodes"):
        SoftTargets.from_run(out, mode="graph")


@pytest.mark.parametrize("damage", ["corrupt", "other rows", "removed"])
def test_graph_mode_refuses_a_damaged_part(run, tmp_path, damage):
    from graphbuild.xclr import SoftTargets

    out = copy(run, tmp_path)
    part = out / MOMENTS / "part-00000.parquet"
    if damage == "corrupt":  # bytes flipped inside the column data: the footer still reads
        data = bytearray(part.read_bytes())
        for i in range(len(data) // 3, len(data) // 3 + 100):
            data[i] ^= 0xFF
        part.write_bytes(bytes(data))
        want = "cannot read row moments"
    elif damage == "other rows":
        meta_file = out / MOMENTS / "_meta.json"
        meta = json.loads(meta_file.read_text())
        meta["parts"][0]["stop"] = 2000
        meta_file.write_text(json.dumps(meta))
        want = "does not hold nodes 0..1999|parts end at node 2000"
    else:
        part.unlink()
        want = "cannot read row moments"
    targets = SoftTargets.from_run(out, mode="graph")  # the files are read at the first batch
    with pytest.raises(GraphbuildError, match=want) as e:
        targets(np.arange(8))
    _one_line(e)


def _held(nodes: np.ndarray, indptr, indices) -> np.ndarray:
    """held[a, b]: node b is in node a's row, or a in b's, or they are one node."""
    n = len(nodes)
    held = nodes[:, None] == nodes[None, :]
    for a in range(n):
        row = set(indices[indptr[nodes[a]]:indptr[nodes[a] + 1]].tolist())
        held[a] |= np.isin(nodes, list(row))
    return held | held.T


def test_calibrated_fill_against_the_brute_force(run):
    """The fill of a pair the graph does not hold is p_i . p_j + c_i, c_i from the exact
    moments of row i's residuals over its unheld pairs, capped at its k-th sim."""
    import polars as pl

    from graphbuild.rundir.graph import read_graph_csr
    from graphbuild.xclr import SoftTargets

    want = brute_force(run)
    indptr, indices, sims = read_graph_csr(run)
    nodes_of = pl.read_parquet(run / "samples.parquet").sort("sample")["node"].to_numpy()
    idx = np.random.default_rng(0).choice(len(nodes_of), 200, replace=False)
    nodes = nodes_of[idx]
    t = SoftTargets.from_run(run, mode="graph", tau_s=TAU_S)
    got = t.sample_sims(idx).numpy().astype(np.float64)
    held = _held(nodes, indptr, indices)
    proj = want["proj"]
    resid = want["sims"] - proj @ proj.T
    fills = np.empty(len(nodes))
    for a, u in enumerate(nodes):
        unheld = np.ones(len(proj), bool)
        unheld[u] = False
        unheld[indices[indptr[u]:indptr[u + 1]]] = False
        e = resid[u, unheld]
        fills[a] = e.mean() + e.var() / (2 * TAU_S)
    expect = np.minimum(proj[nodes] @ proj[nodes].T + fills[:, None],
                        sims[indptr[nodes + 1] - 1][:, None])
    assert (~held).sum() > 30_000
    assert np.allclose(got[~held], expect[~held], rtol=0, atol=1e-5)
    assert np.allclose(got[held], want["sims"][np.ix_(nodes, nodes)][held], atol=2e-3)


def _row_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p, q = p.double(), q.double()
    return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()),
                       0.0).sum(1)


def test_calibrated_targets_beat_every_constant_floor(run):
    """On real captions: valid targets (finite, non-negative, rows summing to 1, zero
    diagonal), closer to exact ones than those of any constant floor, and a row's mass on the
    pairs the graph does not hold close to the exact mass there, where a 0.0 floor puts far
    less."""
    import polars as pl

    from graphbuild.rundir.graph import read_graph_csr
    from graphbuild.xclr import SoftTargets
    from graphbuild.xclr.data import random_batches

    exact = SoftTargets.from_run(run, tau_s=TAU_S)
    calibrated = SoftTargets.from_run(run, mode="graph", tau_s=TAU_S)
    floors = {f: SoftTargets.from_run(run, mode="graph", tau_s=TAU_S, rule="floor", floor=f)
              for f in (0.0, 0.1, 0.15, 0.2, 0.25, 0.3)}
    indptr, indices, _ = read_graph_csr(run)
    nodes_of = pl.read_parquet(run / "samples.parquet").sort("sample")["node"].to_numpy()
    kl = {"calibrated": [], **{f: [] for f in floors}}
    mass = {"exact": [], "calibrated": [], "floor": []}
    for idx in random_batches(3000, 256, seed=0)[:4]:
        p, q = exact(idx), calibrated(idx)
        assert torch.isfinite(q).all() and (q >= 0).all() and (q.diagonal() == 0).all()
        assert torch.allclose(q.sum(1), torch.ones(1, dtype=q.dtype), atol=1e-5)
        kl["calibrated"].append(_row_kl(p, q))
        for f, t in floors.items():
            kl[f].append(_row_kl(p, t(idx)))
        unheld = torch.from_numpy(~_held(nodes_of[idx], indptr, indices))
        for name, t in (("exact", p), ("calibrated", q), ("floor", floors[0.0](idx))):
            mass[name].append((t * unheld).sum(1))
    means = {name: torch.cat(v).mean().item() for name, v in kl.items()}
    best_floor = min(v for name, v in means.items() if name != "calibrated")
    assert means["calibrated"] < 0.8 * best_floor, means
    exact_mass, cal_mass, floor_mass = (torch.cat(mass[n]).mean().item()
                                        for n in ("exact", "calibrated", "floor"))
    assert abs(cal_mass - exact_mass) < 0.05 < exact_mass - floor_mass, (
        exact_mass, cal_mass, floor_mass)


def test_calibrated_targets_from_given_moments_and_after_pickling(run):
    """In-memory moments (as the benchmark passes them) and a pickled copy (a DataLoader
    worker's, which reads the moments again) give the run's own targets, bit for bit."""
    import pickle

    from graphbuild.rundir.moments import read_moments
    from graphbuild.xclr import SoftTargets

    idx = np.arange(0, 3000, 7)
    t = SoftTargets.from_run(run, mode="graph")
    want = t(idx)
    given = SoftTargets.from_run(run, mode="graph", moments=read_moments(run))
    assert torch.equal(given(idx), want)
    assert torch.equal(pickle.loads(pickle.dumps(t))(idx), want)
