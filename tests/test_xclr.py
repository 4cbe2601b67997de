"""X-CLR targets and loss: checked against plain numpy / torch formulas written here."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO
from tests.test_xclr_runs import coco_run

HEAVY = ("zarr", "polars", "faiss", "sentence_transformers", "transformers", "pydantic", "yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return coco_run(tmp_path_factory)


def _reference(run, idx: np.ndarray, tau_s: float, keep_diagonal: bool) -> np.ndarray:
    """softmax_j(cos(t_i, t_j) / tau_s) in float64, from zarr and polars, not our readers."""
    import polars as pl
    import zarr

    emb = np.asarray(zarr.open_array(str(run / "embeddings.zarr"), mode="r")[:], np.float64)
    nodes = pl.read_parquet(run / "samples.parquet").sort("sample")["node"].to_numpy()
    t = emb[nodes[idx]]
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    logits = t @ t.T / tau_s
    if not keep_diagonal:
        np.fill_diagonal(logits, -np.inf)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def test_import_is_light():
    code = ("import sys, graphbuild.xclr\n"
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# Max |targets - float64 formula| allowed, by product dtype: the bounds SoftTargets' docstring
# states. float32's floor: logits reach 1/tau_s = 10, where one float32 ulp is 9.5e-7 (a plain
# float32 formula is ~2e-6 off too).
TOLERANCE = {torch.float32: 3e-6, torch.float64: 1e-6}


def test_docstring_states_the_tested_bounds():
    from graphbuild.xclr import SoftTargets

    def written(x: float) -> str:  # 3e-06 as the docstring writes it: 3e-6
        return f"{x:.0e}".replace("e-0", "e-")

    doc = " ".join(SoftTargets.__doc__.split())
    assert f"float32 (default) {written(TOLERANCE[torch.float32])}," in doc
    assert f"float64 {written(TOLERANCE[torch.float64])} " in doc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("diagonal", ["mask", "keep"])
@pytest.mark.parametrize("mmap", [False, True])
def test_exact_targets_match_numpy(run, diagonal, mmap, dtype):
    from graphbuild.xclr import SoftTargets

    targets = SoftTargets.from_run(run, tau_s=0.1, diagonal=diagonal, mmap=mmap, dtype=dtype)
    rng = np.random.default_rng(0)
    for b in (256, 256, 1024):
        idx = rng.choice(3000, b, replace=False)
        idx[:3] = [0, 1, 2]  # COCO's first captions are of one image; near-duplicate texts
        got = targets(torch.from_numpy(idx))
        assert got.dtype == torch.float32 and got.shape == (b, b)
        want = _reference(run, idx, 0.1, diagonal == "keep")
        assert np.abs(got.numpy() - want).max() < TOLERANCE[dtype]
        assert np.allclose(got.sum(1).numpy(), 1.0, atol=1e-5)


def _repeated_caption(run) -> np.ndarray:
    """Two samples of one node: a caption that occurs twice."""
    import polars as pl

    samples = pl.read_parquet(run / "samples.parquet")
    dup = samples.filter(pl.col("node").is_duplicated()).sort("node")["sample"].to_numpy()[:2]
    assert len(dup) == 2, "the first 3,000 COCO captions hold a repeated caption"
    return dup


def test_two_views_and_shared_nodes(run):
    from graphbuild.xclr import SoftTargets

    idx = np.concatenate([_repeated_caption(run), np.arange(100, 160)])
    t = SoftTargets.from_run(run, tau_s=0.1, dtype=torch.float64)
    sims = t.sample_sims(idx)
    assert float(sims[0, 1]) == 1.0  # same node: an exact positive
    two = t(idx, views=2)
    b = len(idx)
    assert two.shape == (2 * b, 2 * b)
    assert np.abs(two.numpy() - _two_view_reference(run, idx, 0.1)).max() < 1e-6
    assert torch.all(two.diagonal() == 0)
    # each row's largest target is its other view or its same-node twin (cos = 1)
    assert torch.allclose(two[torch.arange(b), torch.arange(b) + b], two.max(1).values[:b])


@pytest.mark.parametrize("copies", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_nodes_in_either_path(run, copies, dtype):
    """A few shared nodes (products in batch order, then the pairs set) and mostly shared
    ones (products over unique nodes, then expanded) both give the reference targets."""
    from graphbuild.xclr import SoftTargets
    from graphbuild.xclr.targets import shared_pairs

    idx = np.concatenate([_repeated_caption(run), np.tile(np.arange(100, 140), copies)])
    t = SoftTargets.from_run(run, tau_s=0.1, dtype=dtype)
    got = t(idx).numpy()
    assert np.abs(got - _reference(run, idx, 0.1, keep_diagonal=False)).max() < TOLERANCE[dtype]
    _, inv = np.unique(t.sample_nodes[idx], return_inverse=True)
    a, b = shared_pairs(inv)
    assert len(a) == 2 + 40 * copies * (copies - 1)
    assert torch.all(t.sample_sims(idx)[a, b] == 1.0)


def test_shared_pairs():
    from graphbuild.xclr.targets import shared_pairs

    a, b = shared_pairs(np.array([0, 1, 0, 2, 0, 1]))
    assert sorted(zip(a.tolist(), b.tolist())) == [(0, 2), (0, 4), (1, 5), (2, 0), (2, 4),
                                                   (4, 0), (4, 2), (5, 1)]


def _two_view_reference(run, idx, tau_s):
    doubled = np.concatenate([idx, idx])
    return _reference(run, doubled, tau_s, keep_diagonal=False)


def test_targets_pickle_and_bf16_option(run):
    from graphbuild.xclr import SoftTargets

    t = SoftTargets.from_run(run)
    idx = np.arange(64)
    first = t(idx)
    copy = pickle.loads(pickle.dumps(t))
    assert copy._table is None  # a worker reopens the files itself
    assert torch.equal(copy(idx), first)
    fast = SoftTargets.from_run(run, dtype=torch.bfloat16)(idx)
    assert (fast - first).abs().max() < 0.05


def _held(nodes: np.ndarray, indptr, indices, k: int) -> np.ndarray:
    """(n, n): same node, or either node in the other's top-k row."""
    rows = [set(indices[indptr[u]:indptr[u + 1]][:k].tolist()) for u in nodes]
    return np.array([[u == v or v in rows[a] or u in rows[b] for b, v in enumerate(nodes)]
                     for a, u in enumerate(nodes)])


def test_graph_targets_rules(run):
    import polars as pl

    from graphbuild.rundir.graph import read_graph_csr
    from graphbuild.xclr import SoftTargets

    indptr, indices, sims = read_graph_csr(run)
    nodes_of = pl.read_parquet(run / "samples.parquet").sort("sample")["node"].to_numpy()
    first = {}
    for s, u in enumerate(nodes_of.tolist()):
        first.setdefault(u, s)
    node = 7
    pick = [node, *indices[indptr[node]:indptr[node] + 6].tolist(), nodes_of[2000],
            nodes_of[2500], nodes_of[2999]]
    idx = np.array([first[int(u)] for u in pick] + [first[node]])  # last: same node as first
    nodes = nodes_of[idx]
    exact = SoftTargets.from_run(run).sample_sims(idx).numpy()
    g = SoftTargets.from_run(run, mode="graph", rule="floor", floor=-0.5).sample_sims(idx)
    g = g.numpy()
    held = _held(nodes, indptr, indices, 16)
    assert held[0, -1] and g[0, -1] == 1.0
    assert np.allclose(g[held], exact[held], atol=2e-3)  # stored sims are of the fp16 rows
    assert (~held).sum() > 0 and np.all(g[~held] == -0.5)
    assert np.array_equal(g, g.T)
    kth = SoftTargets.from_run(run, mode="graph", rule="kth").sample_sims(idx).numpy()
    last = sims[indptr[nodes + 1] - 1]
    assert np.allclose(kth[~held], np.minimum.outer(last, last)[~held])
    assert np.all(exact[~held] <= kth[~held] + 2e-3)  # the k-th sim bounds absent pairs
    tail = SoftTargets.from_run(run, mode="graph", rule="tail")
    tg = tail.sample_sims(idx).numpy()
    floors = tail.graph.tail_floors(0.1)[nodes]
    r, c = np.nonzero(~held)
    assert np.allclose(tg[r, c], floors[r])  # row i's own estimate for the pairs it lacks
    assert np.all(floors <= last + 1e-6) and np.all(floors >= -1)
    top4 = SoftTargets.from_run(run, mode="graph", k=4, rule="floor").sample_sims(idx).numpy()
    held4 = _held(nodes, indptr, indices, 4)
    assert (held & ~held4).sum() > 0 and np.all(top4[~held4] == 0.0)
    assert np.allclose(top4[held4], exact[held4], atol=2e-3)
    t = SoftTargets.from_run(run, mode="graph")(idx, views=2)
    assert t.shape == (2 * len(idx), 2 * len(idx))
    assert torch.allclose(t.sum(1), torch.ones(1))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent, written out: l(i, j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    s = z @ z.T / tau
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = torch.cat([s[i, :i], s[i, i + 1:]])
        total = total - (s[i, j] - torch.logsumexp(others, 0))
    return total / (2 * n)


def supcon(z: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """SupCon L_out (Khosla et al. eq. 2), written out over anchors with positives."""
    z = F.normalize(z, dim=1)
    s = z @ z.T / tau
    losses = []
    for i in range(len(z)):
        pos = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        denom = torch.logsumexp(torch.cat([s[i, :i], s[i, i + 1:]]), 0)
        losses.append(-sum(s[i, p] - denom for p in pos) / len(pos))
    return torch.stack(losses).mean()


def test_simclr_is_xclr_with_the_augmentation_graph():
    from graphbuild.xclr import simclr_targets, xclr_loss

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    got = xclr_loss(torch.cat([z1, z2]), simclr_targets(12), tau=0.2)
    assert torch.allclose(got, nt_xent(z1, z2, 0.2), atol=1e-5)


def test_supcon_is_xclr_with_the_class_graph():
    from graphbuild.xclr import supcon_targets, xclr_loss

    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])
    z = torch.randn(16, 8, generator=g)
    got = xclr_loss(z, supcon_targets(labels, views=2), tau=0.1)
    assert torch.allclose(got, supcon(z, labels.repeat(2), 0.1), atol=1e-5)
    one = xclr_loss(z[:8], supcon_targets(labels, views=1), tau=0.1)  # class 3 has no positive
    assert torch.allclose(one, supcon(z[:8], labels, 0.1), atol=1e-5)


def test_loss_diagonal_options_and_errors():
    from graphbuild.errors import GraphbuildError
    from graphbuild.xclr import soft_targets, xclr_loss

    g = torch.Generator().manual_seed(2)
    z = torch.randn(10, 6, generator=g)
    text = F.normalize(torch.randn(10, 5, generator=g), dim=1)
    keep = soft_targets(text @ text.T, 0.1, "keep")
    zn = F.normalize(z, dim=1)
    want = -(keep * torch.log_softmax(zn @ zn.T / 0.5, 1)).sum(1).mean()
    assert torch.allclose(xclr_loss(z, keep, 0.5, diagonal="keep"), want, atol=1e-6)
    with pytest.raises(GraphbuildError, match="zero diagonal"):
        xclr_loss(z, keep, 0.5, diagonal="mask")
    with pytest.raises(GraphbuildError, match="targets must be"):
        xclr_loss(z, keep[:5, :5], 0.5)


def test_gradients_fp32_and_bf16_autocast():
    from graphbuild.xclr import soft_targets, xclr_loss

    g = torch.Generator().manual_seed(3)
    text = F.normalize(torch.randn(32, 24, generator=g), dim=1)
    targets = soft_targets((text @ text.T).repeat(2, 2), 0.1)
    x = torch.randn(64, 20, generator=g)
    lin = torch.nn.Linear(20, 16)
    grads = {}
    for name, ctx in [("fp32", torch.autocast("cpu", enabled=False)),
                      ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))]:
        lin.zero_grad()
        with ctx:
            z = lin(x)
            loss = xclr_loss(z, targets, tau=0.2)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        grads[name] = (loss.item(), lin.weight.grad.clone())
    (l32, g32), (l16, g16) = grads["fp32"], grads["bf16"]
    assert abs(l32 - l16) < 0.02 * abs(l32)
    assert torch.linalg.norm(g16 - g32) < 0.05 * torch.linalg.norm(g32)


@pytest.mark.parametrize("n", [100, 1000, 1027])
def test_gram_mirrors_blocks_exactly(n):
    from graphbuild.xclr.targets import gram

    x = F.normalize(torch.randn(n, 384, generator=torch.Generator().manual_seed(n)), dim=1)
    g = gram(x)
    assert torch.equal(g, g.T)
    assert (g.double() - x.double() @ x.double().T).abs().max() < 1e-6
