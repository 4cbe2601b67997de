"""The IVF self-join with each list product offered both ways.

ivf_scan scores a list's rows against the queries that probe it and offers each score to the
query. In a self-join the list's rows are queries too, and the same product holds their
scores against those queries: offering them to the list's rows as well gives each row the
candidates {rows of the lists it probes} and {rows that probe its own list}, for one product.
On 1M derived rows that reached recall 0.9514 probing 5 lists a query where offering one way
needed 11 (0.9531), and the scan took 22.8 s against 32.4 s (graph_choices.txt).

A pair is offered to a row once: a list row takes a prober's score unless the prober's home
list is among the row's own probes (the row's own scan of that list scores the pair). Which
lists a row probes is `RowProbes`: every row's best lists by centroid score, best first, ties
by smaller list number (kernels.top_lists), and a count a row (`counts`: nprobe, or with a
probe gap the lists within it, as ivf_scan.probes picks them). A row's candidates then depend
on the store and the lists alone, not on which rows a shard searches: a shard offers its rows'
products forward, and takes the column offers of every row in the store that probes its rows'
lists, whichever shard that row belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphbuild.graph.ivf_scan import PROBE_CAP, PROBE_MIN, ListScan, _kernel_view, centroid_scores
from graphbuild.graph.kernels import (
    empty_heaps,
    offer,
    offer_to_list_rows,
    sort_heaps,
    threads_as_torch,
    top_lists,
)


@dataclass
class RowProbes:
    """Every row's best `width` lists (store order), best first, and their centroid scores."""

    lists: np.ndarray   # (n, width) int32
    values: np.ndarray  # (n, width) float32

    @property
    def width(self) -> int:
        return self.lists.shape[1]

    def counts(self, nprobe: int, gap: float | None) -> np.ndarray:
        """Lists each row probes: nprobe, or with `gap` those scoring within it of the row's
        best, at least PROBE_MIN and at most PROBE_CAP (ivf_scan.probes)."""
        n = len(self.lists)
        if gap is None:
            if nprobe > self.width:
                raise ValueError(f"nprobe {nprobe} is beyond the {self.width} lists kept a row")
            return np.full(n, nprobe, np.int32)
        within = (self.values >= self.values[:, :1] - np.float32(gap)).sum(axis=1)
        return np.clip(within, min(PROBE_MIN, self.width), min(PROBE_CAP, self.width)).astype(
            np.int32)


def row_probes(scan: ListScan, width: int) -> RowProbes:
    """RowProbes of every stored row, `width` lists each (at most nlist)."""
    width = min(width, scan.nlist)
    n = scan.ntotal
    lists = np.empty((n, width), np.int32)
    values = np.empty((n, width), np.float32)
    threads_as_torch()
    for lo, scores in centroid_scores(scan.rows, scan.centroids):  # rows in list order
        at = scan.ids[lo:lo + len(scores)]
        part_l = np.empty((len(scores), width), np.int32)
        part_v = np.empty((len(scores), width), np.float32)
        top_lists(*_kernel_view(scores), part_l, part_v)
        lists[at], values[at] = part_l, part_v
    return RowProbes(lists, values)


def search_both_ways(scan: ListScan, probes: RowProbes, counts: np.ndarray, rows: np.ndarray,
                     kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Like ListScan.search over the stored rows `rows` (store ids, ascending): (sims, ids),
    each (len(rows), kk), best first, the row itself included; every list product offered
    to its probers and to its rows (module docstring)."""
    n = scan.ntotal
    m = len(rows)
    heap_of = np.full(n, -1, np.int64)
    heap_of[rows] = np.arange(m)
    position = np.empty(n, np.int64)
    position[scan.ids] = np.arange(n)
    home = np.ascontiguousarray(probes.lists[:, 0])
    best_s, best_i = empty_heaps(m, kk, scan.ids.dtype)
    threads_as_torch()

    def vectors(ids: np.ndarray) -> torch.Tensor:
        return scan.rows.index_select(0, torch.from_numpy(position[ids])).float()

    # each searched row against its own list first: its heap fills with good candidates
    by_home = rows[np.argsort(home[rows], kind="stable")]
    for lst, queries in _groups(home[by_home], by_home, scan.nlist):
        lo, hi = scan.offsets[lst], scan.offsets[lst + 1]
        scores = (vectors(queries) @ scan.rows[lo:hi].float().T).numpy()
        offer(scores, heap_of[queries], scan.ids[lo:hi], best_s, best_i)

    # then every (row, other probed list) pair of the store, by list
    slot = np.arange(1, probes.width)
    prober, rank = np.nonzero(slot[None, :] < counts[:, None])
    listed = probes.lists[prober, rank + 1]
    order = np.argsort(listed, kind="stable")
    for lst, sources in _groups(listed[order], prober[order], scan.nlist):
        lo, hi = scan.offsets[lst], scan.offsets[lst + 1]
        members = scan.ids[lo:hi].astype(np.int64)
        searched = heap_of[sources] >= 0
        taking = heap_of[members] >= 0
        if taking.all():  # one product serves both ways (always so on one shard)
            scores = (vectors(sources) @ scan.rows[lo:hi].float().T).numpy()
            forward = scores if searched.all() else np.ascontiguousarray(scores[searched])
            if len(forward):
                offer(forward, heap_of[sources[searched]], scan.ids[lo:hi], best_s, best_i)
            offer_to_list_rows(scores, sources.astype(scan.ids.dtype), home[sources], members,
                               heap_of[members], probes.lists, counts, best_s, best_i)
            continue
        if searched.any():
            mine = sources[searched]
            scores = (vectors(mine) @ scan.rows[lo:hi].float().T).numpy()
            offer(scores, heap_of[mine], scan.ids[lo:hi], best_s, best_i)
        if taking.any():
            cols = members[taking]
            scores = (vectors(sources) @ vectors(cols).T).numpy()
            offer_to_list_rows(scores, sources.astype(scan.ids.dtype), home[sources], cols,
                               heap_of[cols], probes.lists, counts, best_s, best_i)
    sort_heaps(best_s, best_i)
    return best_s, best_i


def _groups(keys: np.ndarray, values: np.ndarray, nlist: int):
    """(list, its values) for each list present in `keys` (sorted), values as int64."""
    bounds = np.searchsorted(keys, np.arange(nlist + 1))
    for lst in np.flatnonzero(bounds[1:] > bounds[:-1]):
        yield lst, values[bounds[lst]:bounds[lst + 1]].astype(np.int64)
