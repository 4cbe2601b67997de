"""Data-side helpers for X-CLR: dataset items joined to a run's samples, and a
neighbour-aware batch sampler.

Indices. Three kinds flow through a training loop, and every one is joined by sample id,
never assumed equal by position:
  dataset position  what the DataLoader hands the dataset (the sampler yields these);
  sample            the run's `sample` (0..S-1), what SoftTargets takes; -1 = no target;
  sample id         the run's `sample_id`: the manifest's id_column, or the source row number.
WithNodes(dataset, run, ids=...) states each item's sample id and joins once (SampleJoin):
each item returns its sample (or -1), and NeighborBatchSampler.from_run(run, ..., dataset=)
yields the positions of the samples it batches. The default ids are the positions themselves,
allowed only where those are the run's ids: run.json says the ids are row numbers, or (older
runs that do not say) the ids are 0..S-1 and no row was skipped.

Checks, each an error by default: two items with one id; a run sample that no item has
(allow_missing=True lets the sampler leave it out); an item whose id the run does not hold,
unless the run accounts for it as a row it skipped (--skip-bad-rows): with row-number ids,
an id below the source's row count; otherwise as many such items as rows skipped
(allow_unknown=True accepts any). Such an item has no target: it returns sample -1, the
sampler never yields it, and SoftTargets gives it a zero row and column (see xclr.py).

Batches. With random batches of B from N samples a row's top-k neighbours land in its batch
about k*B/N times, near zero at scale, so a top-k graph would add almost nothing to the
targets. NeighborBatchSampler builds each batch from groups: an unused seed sample, then
unused samples of its node and of its graph neighbours' nodes (best first), until the group
or the batch is full; then the next seed, in a shuffled order. Every sample is a seed
candidate, so an epoch covers each sample exactly once; only the last batch can be short,
and never a batch of one: a lone last sample joins the batch before it (B + 1 samples).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from graphbuild.errors import GraphbuildError
from graphbuild.rundir.graph import meta_path, read_meta, read_row_group, row_group_count
from graphbuild.rundir.paths import RunDir
from graphbuild.rundir.samples import (
    SourceRows,
    check_nodes_fit,
    check_unique_ids,
    read_samples,
    read_source_rows,
)
from graphbuild.xclr.graph import Graph

log = logging.getLogger(__name__)
NO_TARGET = -1  # the sample of a dataset item the run holds no sample for


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
    """Batches of dataset positions that hold graph neighbours; use as `batch_sampler=`.

    Batches are built over the run's samples and yielded as the positions of their dataset
    items (`positions`: sample -> position, -1 for a sample the dataset lacks, which is left
    out; by default sample s is position s). Deterministic for (seed, epoch) (call set_epoch
    each epoch). Shards like DistributedSampler: all ranks build the same global batches and
    rank r takes batches r, r + world_size, ...; without drop_last the list is padded with
    its first batches so each rank gets the same count, with drop_last the short last batch
    and the remainder are dropped. `group_size` samples per seed (default 8) keeps a batch
    many small neighbourhoods rather than one.
    """

    def __init__(self, sample_nodes: np.ndarray, graph: Graph, batch_size: int, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None,
                 drop_last: bool = False, group_size: int = 8,
                 positions: np.ndarray | None = None):
        if batch_size < 1 or group_size < 1:
            raise GraphbuildError(f"batch_size and group_size must be >= 1, got {batch_size} "
                                  f"and {group_size}")
        self.sample_nodes = np.asarray(sample_nodes, np.int64)
        self.positions = (np.arange(len(self.sample_nodes)) if positions is None
                          else np.asarray(positions, np.int64))
        if self.positions.shape != self.sample_nodes.shape:
            raise GraphbuildError(f"positions has {len(self.positions)} entries, "
                                  f"sample_nodes {len(self.sample_nodes)}")
        self.graph, self.batch_size, self.seed = graph, batch_size, seed
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.drop_last, self.group_size, self.epoch = drop_last, group_size, 0

    @classmethod
    def from_run(cls, run: str | Path, batch_size: int, seed: int = 0, k: int | None = 16,
                 dataset: WithNodes | None = None, **options) -> NeighborBatchSampler:
        """A sampler over the samples of `dataset` (the WithNodes the DataLoader reads, over
        the same run), yielding its positions, with the run's graph cut to each row's best k.
        The graph is checked here: one built from other embeddings is refused."""
        if not isinstance(dataset, WithNodes):
            raise GraphbuildError("NeighborBatchSampler.from_run needs dataset=, the WithNodes "
                                  "the DataLoader reads: batches are its positions")
        if Path(run).resolve() != dataset.run.resolve():
            raise GraphbuildError(f"NeighborBatchSampler.from_run: run {run} is not the run of "
                                  f"dataset=, {dataset.run}")
        graph = Graph(run, k)
        nodes = dataset.join.sample_nodes
        check_nodes_fit(run, nodes, graph.n_nodes, meta_path(run))
        return cls(nodes, graph, batch_size, seed, positions=dataset.join.position_of,
                   **options)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_count(self) -> int:
        n = int((self.positions >= 0).sum())
        if self.drop_last:
            return n // self.batch_size
        full, rest = divmod(n, self.batch_size)
        return full + (rest > 1 or (rest == 1 and full == 0))  # a lone last sample joins in

    def __len__(self) -> int:
        n = self._global_count()
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """Every batch of the epoch as run samples, before sharding (the same on every rank)."""
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
        used = bytearray((self.positions < 0).astype(np.uint8).tobytes())  # absent: never
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
        if len(cur) == 1 and batches and not self.drop_last:
            # a batch of one has no other sample to target: it joins the batch before it
            batches[-1] = np.append(batches[-1], cur)
        elif cur:
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
            yield self.positions[b].tolist()

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
        present = np.flatnonzero(self.positions >= 0)
        rand = [present[b] for b in random_batches(len(present), self.batch_size,
                                                   [self.seed, epoch, 1])
                if len(b) == self.batch_size]
        ours, rand = ours[:max_batches], rand[:max_batches]
        return EdgeReport(float(np.mean([self.batch_edges(b) for b in ours])),
                          float(np.mean([self.batch_edges(b) for b in rand])),
                          len(ours), self.batch_size)


Ids = Sequence[Any] | Callable[[int], Any] | None


class SampleJoin:
    """A dataset's positions joined to a run's samples by sample id (see the module docstring).

    sample_of[p]   the run's sample of dataset item p, or NO_TARGET (-1)
    position_of[s] the dataset position of sample s, or -1 when no item has its id
    sample_nodes   each sample's node
    unknown        items with no target; missing: samples no item has
    """

    def __init__(self, run: str | Path, n_items: int, ids: Ids = None,
                 allow_unknown: bool = False, allow_missing: bool = False):
        self.run = Path(run)
        self.sample_nodes, run_ids = read_samples(run, ids=True)
        source = read_source_rows(run)
        mine = self._dataset_ids(ids, n_items, run_ids, source)
        found = pc.fill_null(pc.index_in(mine, value_set=run_ids), NO_TARGET)
        self.sample_of = found.to_numpy().astype(np.int64)
        self.position_of = np.full(len(run_ids), -1, np.int64)
        known = np.flatnonzero(self.sample_of >= 0)
        self.position_of[self.sample_of[known]] = known
        self.unknown = n_items - len(known)
        self.missing = int((self.position_of < 0).sum())
        sizes = (f"the dataset has {n_items} items, the run {len(run_ids)} samples"
                 + (f" and {source.skipped} skipped rows" if source.skipped else ""))
        if self.missing and not allow_missing:
            first = int(np.flatnonzero(self.position_of < 0)[0])
            raise GraphbuildError(
                f"{RunDir(run).samples}: {self.missing} samples have no dataset item with their "
                f"id (first: sample {first}, id {run_ids[first].as_py()!r}); {sizes}; give "
                "WithNodes the items' ids (ids=), or allow_missing=True to train without them")
        if not allow_unknown:
            self._check_unknown(mine, source, sizes)
        if self.unknown:
            log.info("%d dataset items have no target: the run holds no sample with their id",
                     self.unknown)

    def _dataset_ids(self, ids: Ids, n_items: int, run_ids: pa.Array,
                     source: SourceRows) -> pa.Array:
        """The dataset's ids as an Arrow array of the run's id type, checked unique."""
        if ids is None:
            self._check_positions_are_ids(run_ids, source)
            return pa.array(np.arange(n_items, dtype=np.int64))
        if callable(ids):
            values = [ids(i) for i in range(n_items)]
        else:
            if len(ids) != n_items:
                raise GraphbuildError(f"ids= has {len(ids)} entries, the dataset {n_items} items")
            values = ids.numpy() if isinstance(ids, torch.Tensor) else ids
        try:
            mine = values if isinstance(values, pa.Array) else pa.array(values)
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise GraphbuildError(f"ids=: the dataset's ids are not all of one kind: {e}") \
                from None
        mine = self._as_run_type(mine, run_ids)
        check_unique_ids(mine, "ids=", "dataset item")
        return mine

    def _as_run_type(self, mine: pa.Array, run_ids: pa.Array) -> pa.Array:
        if pa.types.is_integer(mine.type) and pa.types.is_integer(run_ids.type):
            return mine.cast(run_ids.type)  # a safe cast: refuses ids that do not fit
        text = (pa.types.is_string(mine.type) or pa.types.is_large_string(mine.type),
                pa.types.is_string(run_ids.type) or pa.types.is_large_string(run_ids.type))
        if all(text):
            return mine.cast(run_ids.type)
        raise GraphbuildError(
            f"ids=: the dataset's ids are {mine.type}, the run's sample ids ("
            f"{RunDir(self.run).samples}, column 'sample_id') are {run_ids.type}, e.g. "
            f"{run_ids[0].as_py() if len(run_ids) else None!r}; give ids of the run's kind")

    def _check_positions_are_ids(self, run_ids: pa.Array, source: SourceRows) -> None:
        """Dataset positions stand for sample ids only when the ids are row numbers."""
        if source.row_numbers:
            return
        where = RunDir(self.run).run_json
        example = run_ids[0].as_py() if len(run_ids) else None
        if source.row_numbers is False or not pa.types.is_integer(run_ids.type):
            raise GraphbuildError(
                f"{where}: the run's sample ids are not row numbers (they are an id column's "
                f"values or class keys, e.g. {example!r}): give WithNodes each item's id (ids=, "
                "a sequence or a callable of the position)")
        if source.skipped != 0 or not np.array_equal(run_ids.to_numpy(), np.arange(len(run_ids))):
            raise GraphbuildError(
                f"{where}: does not say whether the sample ids are row numbers, and they are "
                "not 0..S-1 with no row skipped: give WithNodes each item's id (ids=)")

    def _check_unknown(self, mine: pa.Array, source: SourceRows, sizes: str) -> None:
        """Items with no target are errors, except as rows the run says it skipped."""
        unknown = np.flatnonzero(self.sample_of < 0)
        if not len(unknown):
            return
        lift = "allow_unknown=True accepts items with no target"
        if source.row_numbers and source.total is not None:
            rows = mine.to_numpy()[unknown]
            foreign = unknown[(rows < 0) | (rows >= source.total)]
            if len(foreign):
                bad = int(foreign[0])
                raise GraphbuildError(
                    f"WithNodes: dataset item {bad} has id {mine[bad].as_py()!r}, not a row "
                    f"number of the source's {source.total} rows ({len(unknown)} items have no "
                    f"target; {sizes}); {lift}")
        elif len(unknown) > (source.skipped or 0):
            bad = int(unknown[0])
            raise GraphbuildError(
                f"WithNodes: {len(unknown)} dataset items have ids the run holds no sample "
                f"for, more than the {source.skipped or 0} rows it skipped (first: item {bad}, "
                f"id {mine[bad].as_py()!r}; {sizes}); {lift}")


class WithNodes(Dataset):
    """Any map-style dataset, each item extended with its sample in the run, joined by id:
    (item..., sample) or, with with_node=True, (item..., sample, node); -1 for an item the
    run holds no sample for (no target).

    ids: each item's sample id, a sequence (ids[p]) or a callable (ids(p)); by default the
    item's position, allowed only when the run's ids are row numbers. The join and its
    checks (module docstring) run here, before any training step."""

    def __init__(self, dataset, run: str | Path, *, ids: Ids = None, with_node: bool = False,
                 allow_unknown: bool = False, allow_missing: bool = False):
        if run is None:
            raise GraphbuildError("WithNodes needs run=: items are joined to its samples by id")
        self.dataset, self.run, self.with_node = dataset, Path(run), with_node
        self.join = SampleJoin(run, len(dataset), ids, allow_unknown, allow_missing)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        item = self.dataset[i]
        sample = int(self.join.sample_of[i])
        extra = (sample,)
        if self.with_node:
            extra += (int(self.join.sample_nodes[sample]) if sample >= 0 else NO_TARGET,)
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
            out += [(path, g) for g in range(row_group_count(path))]
        return out

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        mine = self._groups()[self.rank * workers + worker::self.world_size * workers]
        for path, g in mine:
            t = read_row_group(path, g)
            nb, sm = t.column("neighbors").combine_chunks(), t.column("sims").combine_chunks()
            offsets = nb.offsets.to_numpy()
            ids = nb.flatten().to_numpy().astype(np.int64)
            sims = sm.flatten().to_numpy()
            base = offsets[0]
            for r, node in enumerate(t.column("node").to_numpy().tolist()):
                lo, hi = offsets[r] - base, offsets[r + 1] - base
                yield node, ids[lo:hi], sims[lo:hi]


def random_batches(n: int, batch_size: int, seed: int | Sequence[int] = 0) -> list[np.ndarray]:
    """A shuffled permutation of range(n) cut into batches (the last may be short): an
    epoch of random batches, each sample in one of them."""
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]

