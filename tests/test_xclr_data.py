"""NeighborBatchSampler, WithNodes and GraphRows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.test_xclr_runs import coco_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return coco_run(tmp_path_factory)


def toy(samples: int = 1000, nodes: int = 800, k: int = 4, seed: int = 0):
    """Random sample->node map (every node used) and a random top-k graph over the nodes."""
    from graphbuild.xclr import Graph

    rng = np.random.default_rng(seed)
    sample_nodes = np.concatenate([np.arange(nodes), rng.integers(0, nodes, samples - nodes)])
    rng.shuffle(sample_nodes)
    rows = [rng.choice(np.delete(np.arange(nodes), u), k, replace=False) for u in range(nodes)]
    sims = np.sort(rng.uniform(0, 1, (nodes, k)).astype(np.float32), axis=1)[:, ::-1]
    graph = Graph.from_arrays(np.arange(0, nodes * k + 1, k), np.concatenate(rows),
                              sims.reshape(-1))
    return sample_nodes, graph


def sampler(batch_size=64, **kw):
    from graphbuild.xclr import NeighborBatchSampler

    nodes, graph = toy()
    return NeighborBatchSampler(nodes, graph, batch_size, **kw)


def test_epoch_covers_every_sample_once_and_is_deterministic():
    s = sampler(seed=3, world_size=1, rank=0)
    batches = list(s)
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.arange(1000))
    assert [len(b) for b in batches] == [64] * 15 + [40] and len(s) == 16
    assert list(sampler(seed=3, world_size=1, rank=0)) == batches
    s.set_epoch(1)
    other = list(s)
    assert other != batches and np.array_equal(np.sort(np.concatenate(other)), np.arange(1000))
    s.set_epoch(0)
    assert list(s) == batches
    assert list(sampler(seed=4, world_size=1, rank=0)) != batches


@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_like_distributed_sampler(drop_last):
    world = 3
    shards = [list(sampler(rank=r, world_size=world, drop_last=drop_last)) for r in range(world)]
    counts = {len(sh) for sh in shards}
    assert len(counts) == 1 and counts == {len(sampler(rank=0, world_size=world,
                                                       drop_last=drop_last))}
    flat = np.concatenate([np.concatenate(sh) for sh in shards])
    if drop_last:  # 15 full batches, 5 per rank, no sample twice
        assert counts == {5} and len(flat) == 15 * 64 == len(np.unique(flat))
        assert all(len(b) == 64 for sh in shards for b in sh)
    else:  # 16 batches padded to 18 by repeating the first two, as DistributedSampler pads
        assert counts == {6} and set(flat.tolist()) == set(range(1000))
    with pytest.raises(Exception, match="rank"):
        sampler(rank=3, world_size=3)


def test_sampler_puts_neighbours_together_on_a_toy_graph():
    report = sampler().edge_report()
    assert report.batches == 15 and report.batch_size == 64
    assert report.sampler > 3 * report.random


def test_sampler_yields_dataset_positions_of_present_samples():
    """positions maps samples to dataset positions; a sample the dataset lacks (-1) is left
    out, and the batches are the sample batches, mapped."""
    from graphbuild.xclr import NeighborBatchSampler

    nodes, graph = toy()
    rng = np.random.default_rng(5)
    positions = rng.permutation(len(nodes)) + 7  # the dataset holds 7 other items first
    positions[rng.choice(len(nodes), 50, replace=False)] = -1
    s = NeighborBatchSampler(nodes, graph, 64, rank=0, world_size=1, positions=positions)
    batches = list(s)
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.sort(positions[positions >= 0]))
    assert batches == [positions[b].tolist() for b in s.global_batches()]
    assert len(s) == len(batches) == -(-950 // 64)


def test_a_lone_last_sample_joins_the_batch_before_it():
    s = sampler(batch_size=333, rank=0, world_size=1)  # 1000 = 3 * 333 + 1
    assert [len(b) for b in s] == [333, 333, 334] and len(s) == 3
    s = sampler(batch_size=333, rank=0, world_size=1, drop_last=True)
    assert [len(b) for b in s] == [333, 333, 333] and len(s) == 3


def test_with_nodes_and_dataloader(run):
    """A dataset in its own order, joined by caption id: every item's node is its caption's,
    and the sampler's positions reach the right items through a multi-worker DataLoader."""
    import polars as pl

    from graphbuild.xclr import NeighborBatchSampler, SoftTargets, WithNodes

    samples = pl.read_parquet(run / "samples.parquet").sort("sample")
    ids, nodes = samples["sample_id"].to_list(), samples["node"].to_numpy()
    order = np.random.default_rng(1).permutation(len(ids))  # item p is sample order[p]
    images = TensorDataset(torch.from_numpy(order), torch.from_numpy(order) % 5)
    ds = WithNodes(images, run=run, ids=[ids[s] for s in order], with_node=True)
    s, y, i, node = ds[17]
    assert s == i == order[17] and node == nodes[order[17]] and y == order[17] % 5
    batches = NeighborBatchSampler.from_run(run, batch_size=128, seed=0, rank=0, world_size=1,
                                            dataset=ds)
    loader = DataLoader(ds, batch_sampler=batches, num_workers=2)
    targets = SoftTargets.from_run(run)
    seen = []
    for payload, _y, idx, node in loader:
        assert torch.equal(payload, idx)  # the item the sampler chose is the sample it names
        t = targets(idx, views=2)
        assert t.shape == (2 * len(idx), 2 * len(idx))
        assert torch.equal(node, torch.from_numpy(nodes[idx.numpy()]))
        seen.append(idx)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(len(nodes)))


def test_with_nodes_refuses_a_dataset_of_another_length(run):
    import polars as pl

    from graphbuild.errors import GraphbuildError
    from graphbuild.xclr import WithNodes

    ids = pl.read_parquet(run / "samples.parquet").sort("sample")["sample_id"].to_list()
    with pytest.raises(GraphbuildError, match="2995 samples have no dataset item"):
        WithNodes(list(range(5)), run=run, ids=ids[:5])
    with pytest.raises(GraphbuildError, match="needs run="):
        WithNodes(list(range(5)), run=None)


def test_neighbour_batches_hold_many_more_graph_edges(run):
    from graphbuild.xclr import Graph, NeighborBatchSampler, read_sample_nodes

    s = NeighborBatchSampler(read_sample_nodes(run), Graph(run, 16), 256, rank=0, world_size=1)
    report = s.edge_report()
    assert report.batches == 3000 // 256
    assert report.sampler > 2.5 * report.random  # k*B/N is already 1.4 here: N is small


def test_graph_rows_stream_the_csr(run):
    from graphbuild.rundir.graph import read_graph_csr
    from graphbuild.xclr import GraphRows

    indptr, indices, sims = read_graph_csr(run)
    rows = list(GraphRows(run, rank=0, world_size=1))
    assert [r[0] for r in rows] == list(range(len(indptr) - 1))
    for node, nb, sm in rows[::97]:
        assert np.array_equal(nb, indices[indptr[node]:indptr[node + 1]])
        assert np.array_equal(sm, sims[indptr[node]:indptr[node + 1]])
    halves = [list(GraphRows(run, rank=r, world_size=2)) for r in range(2)]
    assert sorted(r[0] for h in halves for r in h) == list(range(len(indptr) - 1))
    loaded = list(DataLoader(GraphRows(run, rank=0, world_size=1), batch_size=None,
                             num_workers=2))
    assert sorted(int(r[0]) for r in loaded) == list(range(len(indptr) - 1))
