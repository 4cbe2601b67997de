"""Data-side helpers for X-CLR: a neighbour-aware batch sampler and dataset adapters.

With random batches of B from N samples a row's top-k neighbours land in its batch about
k*B/N times, near zero at scale, so a top-k graph would add almost nothing to the targets.
NeighborBatchSampler builds each batch from groups: an unused seed sample, then unused
samples of its node and of its graph neighbours' nodes (best first), until the group or the
batch is full; then the next seed, in a shuffled order. Every sample is a seed candidate, so
an epoch covers each sample exactly once; only the last batch can be short.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from graphbuild.errors import GraphbuildError
from graphbuild.graph import read_meta
from graphbuild.storage import RunDir
from graphbuild.xclr_store import Graph, read_sample_nodes


@dataclass
class EdgeReport:
    """Mean in-batch graph edges per batch: ordered pairs (a, b) of samples of one batch whose
    nodes differ and node b is in node a's graph row."""
    sampler: float
    random: float
    batches: int
    batch_size: int


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    on = dist.is_available() and dist.is_initialized()
    world_size = world_size if world_size is not None else (dist.get_world_size() if on else 1)
    rank = rank if rank is not None else (dist.get_rank() if on else 0)
    if not 0 <= rank < world_size:
        raise GraphbuildError(f"rank must be in 0..{world_size - 1}, got {rank}")
    return rank, world_size


class NeighborBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that hold graph neighbours; use as `batch_sampler=`.

    Deterministic for (seed, epoch) (call set_epoch each epoch). Shards like
    DistributedSampler: all ranks build the same global batches and rank r takes batches
    r, r + world_size, ...; without drop_last the list is padded with its first batches so
    each rank gets the same count, with drop_last the short last batch and the remainder
    are dropped. `group_size` samples per seed (default 8) keeps a batch many small
    neighbourhoods rather than one.
    """

    def __init__(self, sample_nodes: np.ndarray, graph: Graph, batch_size: int, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None,
                 drop_last: bool = False, group_size: int = 8):
        if batch_size < 1 or group_size < 1:
            raise GraphbuildError(f"batch_size and group_size must be >= 1, got {batch_size} "
                                  f"and {group_size}")
        self.sample_nodes = np.asarray(sample_nodes, np.int64)
        self.graph, self.batch_size, self.seed = graph, batch_size, seed
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.drop_last, self.group_size, self.epoch = drop_last, group_size, 0

    @classmethod
    def from_run(cls, run: str | Path, batch_size: int, seed: int = 0, k: int | None = 16,
                 **options) -> NeighborBatchSampler:
        """A sampler over a run's samples and its graph cut to each row's best k."""
        return cls(read_sample_nodes(run), Graph(run, k), batch_size, seed, **options)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_count(self) -> int:
        n = len(self.sample_nodes)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        n = self._global_count()
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """Every batch of the epoch, before sharding (the same on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        nodes = self.sample_nodes
        indptr, indices, _ = self.graph.csr
        order = rng.permutation(len(nodes))
        # each node's samples, in the shuffled order; next_free[v] walks node v's list
        by_node = order[np.argsort(nodes[order], kind="stable")]
        n_nodes = max(int(nodes.max()) + 1, len(indptr) - 1)
        node_ptr = np.searchsorted(nodes[by_node], np.arange(n_nodes + 1)).tolist()
        by_node, next_free = by_node.tolist(), node_ptr[:-1]
        used = bytearray(len(nodes))
        batches, cur, room = [], [], self.batch_size
        for s in order.tolist():
            if used[s]:
                continue
            used[s] = 1
            group, u = [s], int(nodes[s])
            want = min(self.group_size, room)
            for v in [u, *indices[indptr[u]:indptr[u + 1]].tolist()]:
                if len(group) >= want:
                    break
                while next_free[v] < node_ptr[v + 1] and len(group) < want:
                    t = by_node[next_free[v]]
                    next_free[v] += 1
                    if not used[t]:
                        used[t] = 1
                        group.append(t)
            cur.extend(group)
            room -= len(group)
            if room == 0:
                batches.append(np.array(cur, np.int64))
                cur, room = [], self.batch_size
        if cur:
            batches.append(np.array(cur, np.int64))
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        if self.drop_last:
            batches = batches[:self._global_count()]
            total = len(batches) // self.world_size * self.world_size
            batches = batches[:total]
        else:
            total = len(self) * self.world_size
            batches = (batches * math.ceil(total / len(batches)))[:total] if batches else []
        for b in batches[self.rank:total:self.world_size]:
            yield b.tolist()

    def batch_edges(self, batch: np.ndarray) -> int:
        """In-batch graph edges of one batch (see EdgeReport)."""
        uniq, counts = np.unique(self.sample_nodes[batch], return_counts=True)
        a, b, _ = self.graph.pairs(uniq)
        return int((counts[a] * counts[b]).sum())

    def edge_report(self, epoch: int | None = None, max_batches: int | None = None) -> EdgeReport:
        """Mean in-batch graph edges per batch for this sampler's batches and for random
        batches of the same size (a shuffled permutation cut into batches)."""
        epoch = self.epoch if epoch is None else epoch
        ours = [b for b in self.global_batches(epoch) if len(b) == self.batch_size]
        perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.sample_nodes))
        rand = [perm[i:i + self.batch_size]
                for i in range(0, len(perm) - self.batch_size + 1, self.batch_size)]
        ours, rand = ours[:max_batches], rand[:max_batches]
        return EdgeReport(float(np.mean([self.batch_edges(b) for b in ours])),
                          float(np.mean([self.batch_edges(b) for b in rand])),
                          len(ours), self.batch_size)


class WithNodes(Dataset):
    """Any map-style dataset, each item extended with its dataset index (= the run's `sample`)
    and, with `with_node=True`, its node id: (item..., sample_idx[, node])."""

    def __init__(self, dataset, run: str | Path | None = None, with_node: bool = False):
        if with_node and run is None:
            raise GraphbuildError("WithNodes(with_node=True) needs run=")
        self.dataset, self.run, self.with_node = dataset, run, with_node
        self._nodes: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_nodes": None}

    def __len__(self) -> int:
        return len(self.dataset)

    def _node(self, i: int) -> int:
        if self._nodes is None:
            nodes = read_sample_nodes(self.run)
            if len(nodes) != len(self.dataset):
                raise GraphbuildError(f"{RunDir(self.run).samples}: {len(nodes)} samples, the "
                                      f"dataset has {len(self.dataset)} items")
            self._nodes = nodes
        return int(self._nodes[i])

    def __getitem__(self, i: int) -> tuple:
        item = self.dataset[i]
        extra = (i, self._node(i)) if self.with_node else (i,)
        return (*item, *extra) if isinstance(item, tuple) else (item, *extra)


class GraphRows(IterableDataset):
    """Streams (node, neighbors int64 array, sims float32 array) from the graph's parquet
    parts, best first, without building the CSR. Row groups are split across (rank,
    world_size) and then across DataLoader workers, so each row comes out exactly once."""

    def __init__(self, run: str | Path, rank: int | None = None,
                 world_size: int | None = None):
        self.run = Path(run)
        self.rank, self.world_size = _rank_world(rank, world_size)

    def _groups(self) -> list[tuple[Path, int]]:
        meta = read_meta(self.run)
        out = []
        for part in meta["parts"]:
            path = RunDir(self.run).graph / part["file"]
            out += [(path, g) for g in range(pq.ParquetFile(path).num_row_groups)]
        return out

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        mine = self._groups()[self.rank * workers + worker::self.world_size * workers]
        for path, g in mine:
            t = pq.ParquetFile(path).read_row_group(g)
            nb, sm = t.column("neighbors").combine_chunks(), t.column("sims").combine_chunks()
            offsets = nb.offsets.to_numpy()
            ids = nb.flatten().to_numpy().astype(np.int64)
            sims = sm.flatten().to_numpy()
            base = offsets[0]
            for r, node in enumerate(t.column("node").to_numpy().tolist()):
                lo, hi = offsets[r] - base, offsets[r + 1] - base
                yield node, ids[lo:hi], sims[lo:hi]


def random_batches(n: int, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """A shuffled permutation of range(n) cut into batches (the last may be short)."""
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]

