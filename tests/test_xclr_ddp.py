"""Targets and loss across real torch.distributed processes (gloo, CPU, 2 and 3 ranks).

Each rank holds its slice of a global batch, all-gathers the sample ids (a tensor
all-gather) and the embeddings (torch.distributed.nn.functional.all_gather, which passes
gradients back to their rank), and takes its rows of the targets against the gathered
columns. Checked in this process against the single-process global batch: every rank's
targets are the matching rows of the global targets; the ranks' losses and gradients add up
to the global loss and gradients; a model under DistributedDataParallel gets the global
batch's parameter gradients.

The global batch holds what the targets treat specially: a sample on two ranks, two samples
of one caption (node), and items without a target (-1)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import REPO

B, DIM, TAU, TAU_S = 12, 16, 0.2, 0.1
CASES = [(mode, diagonal, views) for mode in ("exact", "graph") for diagonal in ("mask", "keep")
         for views in (1, 2)]


def global_batch(run, world: int) -> np.ndarray:
    """world * B samples: random, with a sample on two ranks, a repeated caption's two
    samples on two ranks, and an item without a target on each rank but the last."""
    from graphbuild.xclr import read_sample_nodes

    nodes = read_sample_nodes(run)
    twins = np.flatnonzero(np.bincount(nodes)[nodes] > 1)
    twins = twins[nodes[twins] == nodes[twins[0]]][:2]  # two samples of one node
    rng = np.random.default_rng(world)
    idx = rng.choice(np.setdiff1d(np.arange(len(nodes)), twins), world * B, replace=False)
    idx[1], idx[B + 2] = twins
    idx[B + 5] = idx[4]  # one sample on ranks 0 and 1
    idx[[B * r + 7 for r in range(world - 1)]] = -1
    return idx


def embeddings(n: int, views: int, dtype=torch.float32) -> torch.Tensor:
    """The global batch's embeddings, views stacked view by view."""
    return torch.randn(views * n, DIM, generator=torch.Generator().manual_seed(n + views),
                       dtype=dtype)


def local_items(rank: int, world: int, views: int) -> np.ndarray:
    """Positions of rank `rank`'s items in the global [view 1; view 2; ...] layout."""
    return np.concatenate([np.arange(rank * B, (rank + 1) * B) + v * world * B
                           for v in range(views)])


def gather_ids(local: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return torch.cat(out)


def gather_views(z: torch.Tensor, views: int) -> torch.Tensor:
    """All ranks' [view 1; view 2; ...] rows, laid out view by view over the global batch:
    each view gathered on its own, with gradients back to the rank that owns the rows."""
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # torch 2.13 names a successor; this one runs on 2.4+
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat([torch.cat(all_gather(part)) for part in z.chunk(views)])


def rank_main(rank: int, world: int, run: str, out: str) -> None:
    import torch.distributed as dist

    from graphbuild.xclr import SoftTargets, xclr_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank,
                            world_size=world)
    idx = global_batch(run, world)
    mine = torch.from_numpy(idx[rank * B:(rank + 1) * B])
    ids = gather_ids(mine)  # the columns: every rank's samples, in rank order
    results = {"ids": ids}
    for mode, diagonal, views in CASES:
        targets = SoftTargets.from_run(run, mode=mode, tau_s=TAU_S, diagonal=diagonal)
        t = targets(mine, views=views, columns=ids, self_at=rank * B)
        z = embeddings(world * B, views)[local_items(rank, world, views)].requires_grad_()
        keys = gather_views(z, views)
        # rows with a target over every rank: the global mean's denominator
        count = (t.sum(dim=1) > 0).sum().reshape(1)
        dist.all_reduce(count)
        loss = xclr_loss(z, t, tau=TAU, diagonal=diagonal, keys=keys, self_at=rank * B,
                         views=views, reduction="sum") / count
        loss.backward()
        results[mode, diagonal, views] = (t, loss.detach(), z.grad)
    results["ddp"] = ddp_gradients(rank, world, run, idx)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.barrier()  # leave together: a rank gone first closes gloo's connections under the rest
    dist.destroy_process_group()


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, DIM))


def images(n: int) -> torch.Tensor:
    """Two views of n inputs, stacked view by view."""
    return torch.randn(2 * n, 8, generator=torch.Generator().manual_seed(99))


def ddp_gradients(rank: int, world: int, run: str, idx: np.ndarray) -> dict[str, list]:
    """Parameter gradients under DistributedDataParallel, as a trainer computes them: (1) the
    plain pattern, each rank's loss the mean over its rows, on a batch where every item has a
    target; (2) with items without a target, the exact pattern: the rank's sum over the
    global count of rows with targets, times the world size (DDP averages over ranks)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from graphbuild.xclr import SoftTargets, xclr_loss

    targets = SoftTargets.from_run(run, tau_s=TAU_S)
    x = images(world * B)[local_items(rank, world, 2)]
    out = {}
    for name, batch in (("mean", np.abs(idx)), ("sum", idx)):
        net = DistributedDataParallel(model())
        mine = torch.from_numpy(batch[rank * B:(rank + 1) * B])
        ids = gather_ids(mine)
        t = targets(mine, views=2, columns=ids, self_at=rank * B)
        z = net(x)
        keys = gather_views(z, 2)
        if name == "mean":
            loss = xclr_loss(z, t, tau=TAU, keys=keys, self_at=rank * B, views=2)
        else:
            count = (t.sum(dim=1) > 0).sum().reshape(1)
            dist.all_reduce(count)
            loss = xclr_loss(z, t, tau=TAU, keys=keys, self_at=rank * B, views=2,
                             reduction="sum") * world / count
        loss.backward()
        out[name] = [p.grad.clone() for p in net.module.parameters()]
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_give_the_global_batchs_targets_loss_and_gradients(coco3k, tmp_path, world):
    from graphbuild.xclr import SoftTargets, xclr_loss

    mp.spawn(rank_main, args=(world, str(coco3k), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    idx = global_batch(coco3k, world)
    assert all(torch.equal(r["ids"], torch.from_numpy(idx)) for r in ranks)
    for mode, diagonal, views in CASES:
        case = mode, diagonal, views
        targets = SoftTargets.from_run(coco3k, mode=mode, tau_s=TAU_S, diagonal=diagonal)
        full = targets(idx, views=views)
        z = embeddings(world * B, views).requires_grad_()
        loss = xclr_loss(z, full, tau=TAU, diagonal=diagonal)
        loss.backward()
        total = 0.0
        for rank, got in enumerate(ranks):
            t, rank_loss, grad = got[case]
            rows = local_items(rank, world, views)
            assert t.shape == (views * B, views * world * B), case
            assert torch.allclose(t, full[rows], rtol=0, atol=1e-6), case
            assert torch.allclose(grad, z.grad[rows], rtol=1e-5, atol=1e-7), case
            total = total + rank_loss
        assert torch.allclose(total, loss, rtol=1e-6), case
        # the -1 items: zero rows and columns, as in the global targets
        none = np.flatnonzero(np.tile(idx, views) == -1)
        assert len(none) == views * (world - 1) and bool((full[:, none] == 0).all())
    for name, batch in (("mean", np.abs(idx)), ("sum", idx)):
        net = model()
        t = SoftTargets.from_run(coco3k, tau_s=TAU_S)(batch, views=2)
        xclr_loss(net(images(world * B)), t, tau=TAU).backward()
        for rank, got in enumerate(ranks):
            for mine, want in zip(got["ddp"][name], net.parameters(), strict=True):
                assert torch.allclose(mine, want.grad, rtol=1e-5, atol=1e-7), (name, rank)


def test_moco_queue_targets_and_loss_equal_a_float64_formula(coco3k):
    """Queries of B samples against their keys (another encoder's view) and a queue of 4 x B
    past samples (some of them the batch's own, some of its node): targets and loss as
    written out here in float64, from zarr's rows."""
    import polars as pl
    import zarr

    from graphbuild.xclr import SoftTargets, xclr_loss

    emb = np.asarray(zarr.open_array(str(coco3k / "embeddings.zarr"), mode="r")[:], np.float64)
    nodes = pl.read_parquet(coco3k / "samples.parquet").sort("sample")["node"].to_numpy()
    rng = np.random.default_rng(3)
    idx = rng.choice(3000, B, replace=False)
    queue = rng.choice(3000, 4 * B, replace=False)
    queue[:2] = idx[:2]  # the batch's samples seen an epoch ago
    twins = np.flatnonzero(np.bincount(nodes)[nodes] > 1)
    twins = twins[nodes[twins] == nodes[twins[0]]][:2]
    idx[5], queue[9] = twins  # a caption's two samples: one a query, one in the queue
    columns = np.concatenate([idx, queue])

    t = emb / np.linalg.norm(emb, axis=1, keepdims=True)  # by node
    cos = t[nodes[idx]] @ t[nodes[columns]].T
    cos[nodes[idx][:, None] == nodes[columns][None, :]] = 1.0
    want = np.exp(cos / TAU_S - (cos / TAU_S).max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    for diagonal in ("mask", "keep"):  # no query is among the keys: nothing to leave out
        for dtype, tol in ((torch.float32, 3e-6), (torch.float64, 1e-6)):
            got = SoftTargets.from_run(coco3k, tau_s=TAU_S, diagonal=diagonal, dtype=dtype)(
                idx, columns=columns, self_at=None)
            assert got.shape == (B, 5 * B)
            assert np.abs(got.numpy() - want).max() < tol, (diagonal, dtype)

    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, DIM, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, DIM, generator=g, dtype=torch.float64, requires_grad=True)
    past = torch.randn(4 * B, DIM, generator=g, dtype=torch.float64)  # the queue: no gradient
    targets = torch.from_numpy(want)
    loss = xclr_loss(q, targets, tau=TAU, keys=torch.cat([k, past]), self_at=None)
    qn = q.detach().numpy() / np.linalg.norm(q.detach().numpy(), axis=1, keepdims=True)
    keys = np.concatenate([k.detach().numpy(), past.numpy()])
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    logits = qn @ keys.T / TAU
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert abs(loss.item() - float(-(want * logp).sum(1).mean())) < 1e-12
    assert torch.autograd.gradcheck(
        lambda a, b: xclr_loss(a, targets, tau=TAU, keys=torch.cat([b, past]), self_at=None),
        (q, k))
    loss.backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


def test_digits_example_trains_on_two_processes(tmp_path):
    """examples/digits_xclr.py --ddp 2: each objective trained on 2 gloo processes with
    gathered negatives, and the kNN accuracy printed as in one process."""
    pytest.importorskip("sklearn")
    done = subprocess.run([sys.executable, str(REPO / "examples" / "digits_xclr.py"), "--run",
                           str(tmp_path / "digits"), "--epochs", "1", "--seeds", "0",
                           "--limit", "256", "--ddp", "2"], cwd=REPO, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batch 128 (2 processes)" in done.stdout
    for objective in ("simclr", "supcon", "xclr"):
        line = next(x for x in done.stdout.splitlines()
                    if x.startswith(f"  {objective:7s} seed 0: kNN acc"))
        assert 0.5 < float(line.split()[5]) <= 1.0, line  # 10 classes: chance is 0.1
