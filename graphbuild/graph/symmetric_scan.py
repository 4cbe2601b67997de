"""The IVF self-join with each list product offered both ways.

ivf_scan scores a list's rows against the queries that probe it and offers each score to the
query. In a self-join the list's rows are queries too, and the same product holds their
scores against those queries: offering them to the list's rows as well gives each row the
candidates {rows of the lists it probes} and {rows that probe its own list}, for one product.
On 1M derived rows recall 0.95 then takes 5 lists a query instead of 11, and the knn stage
40.5 s instead of 55.8 s (benchmarks/results/peers.txt, graph_choices.txt).

A pair is offered to a row once: a list row takes a prober's score unless the prober's home
list is among the row's own probes (the row's own scan of that list scores the pair). Which
lists a row probes is `RowProbes`: every row's best lists by centroid score, best first, ties
by smaller list number (kernels.top_lists), and a count a row (`counts`: nprobe, or with a
probe gap the lists within it, as ivf_scan.probes picks them). A row's candidates then depend
on the store and the lists alone, not on which rows a shard searches: a shard offers its rows'
products forward, and takes the column offers of every row in the store that probes its rows'
lists, whichever shard that row belongs to.

Since the candidates are known before any product, so is the recall a search reaches against
exact neighbours: it finds a true neighbour exactly when that neighbour is a candidate.
nprobe's tuning counts that (`BothWays.recall`) instead of searching its sample. A fresh
build takes every row's probes from the centroid products that assign the rows to lists
(`build_lists_and_probes`); a process that loads saved lists finds them again (`row_probes`).

Each row's own list comes first, in exact fp32 products: its heap fills from empty. The other
lists' products are screened (screened.py): in bf16 where the CPU multiplies it natively, and
every score that could reach a heap is scored again before it is offered, so the neighbours
and sims are those of fp32 products either way (tests check it bit for bit).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from graphbuild.graph.ivf_scan import (
    PROBE_CAP,
    PROBE_MIN,
    QUERY_STEP,
    ListScan,
    centroid_scores,
    kernel_view,
)
from graphbuild.graph.kernels import (
    candidates_reached,
    empty_heaps,
    offer,
    offer_rescored_rows,
    offer_to_list_rows,
    probers_by_list,
    sort_heaps,
    threads_as_torch,
    top_lists,
)
from graphbuild.graph.screened import (
    COLUMN_PAD,
    ROW_PAD,
    Buffers,
    bf16_screens,
    fp32_rows,
    screen_error,
    screened_product,
)

log = logging.getLogger(__name__)


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
    """RowProbes of every stored row, `width` lists each (at most nlist), its own list first
    (`own_list_first`)."""
    probes = best_lists(scan.in_store_order(), scan.centroids, width, QUERY_STEP)
    own_list_first(probes.lists, probes.values, list_of_rows(scan))
    return probes


def best_lists(arr, centroids: torch.Tensor, width: int, block_rows: int) -> RowProbes:
    """Every row's best `width` lists (at most nlist) by its centroid scores, best first,
    ties by smaller list number (kernels.top_lists), read from `arr` (store order) in blocks
    of block_rows. A row's scores do not depend on the rows scored with it (the products'
    rows are independent; tests check it), so the lists' build and row_probes agree."""
    n, width = arr.shape[0], min(width, len(centroids))
    lists = np.empty((n, width), np.int32)
    values = np.empty((n, width), np.float32)
    threads_as_torch()
    for lo in range(0, n, block_rows):
        x = torch.from_numpy(np.asarray(arr[lo:lo + block_rows]))
        for at, scores in centroid_scores(x, centroids):
            rows = slice(lo + at, lo + at + len(scores))
            top_lists(*kernel_view(scores), lists[rows], values[rows])
    return RowProbes(lists, values)


def build_lists_and_probes(arr, nlist: int, block_rows: int, width: int,
                           ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], RowProbes]:
    """ann.build_lists, with every row's RowProbes (`width` lists) from the same centroid
    products: a row's list is its best one, the first of its probes. One pass over the store
    instead of an assignment and then row_probes' products again."""
    from graphbuild.graph.ann import grouped_by_list, list_centroids

    t0 = time.perf_counter()
    centroids = list_centroids(arr, nlist)
    t1 = time.perf_counter()
    probes = best_lists(arr, torch.from_numpy(centroids), width, block_rows)
    lists = (centroids, *grouped_by_list(probes.lists[:, 0].astype(np.int64), nlist))
    log.info("built %d lists over %d vectors, each row's %d best with them (train %.1fs, "
             "assign %.1fs)", nlist, len(probes.lists), probes.width, t1 - t0,
             time.perf_counter() - t1)
    return lists, probes


def list_of_rows(scan: ListScan) -> np.ndarray:
    """The list holding each stored row (store order), int32."""
    own = np.empty(scan.ntotal, np.int32)
    own[scan.ids] = np.repeat(np.arange(scan.nlist, dtype=np.int32), np.diff(scan.offsets))
    return own


def own_list_first(lists: np.ndarray, values: np.ndarray, own: np.ndarray) -> None:
    """Each row's own list first, in place: the list its search starts with, and where the
    pair rule takes the row to be. The lists' build put each row in its nearest list, but
    centroid scores computed again in other batches can round a near tie the other way; the
    own list then moves to the front, from its place among the best or in place of the last
    (the first value stays the best score, which the probe gap counts from)."""
    for r in np.flatnonzero(lists[:, 0] != own):
        where = np.flatnonzero(lists[r] == own[r])
        at = where[0] if len(where) else lists.shape[1] - 1
        lists[r, 1:at + 1] = lists[r, :at].copy()
        values[r, 1:at + 1] = values[r, :at].copy()
        lists[r, 0] = own[r]


def search_both_ways(scan: ListScan, probes: RowProbes, counts: np.ndarray, rows: np.ndarray,
                     kk: int, first_candidate: int = 0, on_progress=None,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Like ListScan.search over the stored rows `rows` (store ids, ascending): (sims, ids),
    each (len(rows), kk), best first, the row itself included; every list product offered
    to its probers and to its rows (module docstring). `first_candidate`: only rows from it
    on are candidates (an update's old rows, finding their new neighbours). `on_progress`:
    called once for each list with the share of the search's scores (rows scored against
    a list's rows) counted so far, that list's included: 1.0 with the last."""
    n = scan.ntotal
    m = len(rows)
    heap_of = np.full(n, -1, np.int64)
    heap_of[rows] = np.arange(m)
    position = np.empty(n, np.int64)
    position[scan.ids] = np.arange(n)
    home = np.ascontiguousarray(probes.lists[:, 0])
    best_s, best_i = empty_heaps(m, kk, scan.ids.dtype)
    threads_as_torch()
    bf16 = bf16_screens()
    tol = screen_error(scan.max_norm(), scan.rows.shape[1], bf16)

    pad = (ROW_PAD, COLUMN_PAD) if bf16 else (1, 1)  # screened products' shapes
    buffers = Buffers()
    d = scan.rows.shape[1]

    def padded(n: int, multiple: int, name: str | None) -> torch.Tensor | None:
        return None if name is None else buffers.take(name, (n + -n % multiple, d))

    def vectors(ids: np.ndarray, multiple: int = 1, name: str | None = None) -> torch.Tensor:
        """The rows `ids` as fp32, zero rows after them up to a multiple of `multiple`, in
        the buffer `name` if given."""
        at = torch.from_numpy(position[ids])
        gathered = (scan.rows.index_select(0, at) if name is None else torch.index_select(
            scan.rows, 0, at, out=buffers.take(name + " fp16", (len(ids), d), scan.rows.dtype)))
        return fp32_rows(gathered, multiple, padded(len(ids), multiple, name))

    def members_of(lst: int, multiple: int = 1, name: str | None = None,
                   ) -> tuple[np.ndarray, torch.Tensor]:
        """A list's candidate rows: (ids, their vectors as `vectors` gives them)."""
        lo, hi = scan.offsets[lst], scan.offsets[lst + 1]
        ids = scan.ids[lo:hi].astype(np.int64)
        if not first_candidate:
            return ids, fp32_rows(scan.rows[lo:hi], multiple, padded(hi - lo, multiple, name))
        ids = ids[ids >= first_candidate]
        return ids, vectors(ids, multiple, name)

    def product(g: torch.Tensor, c: torch.Tensor, m: int) -> np.ndarray:
        return screened_product(g, c, m, bf16, buffers.take("scores", (len(g), len(c))))

    def forward(queries: np.ndarray, lst: int, home_pass: bool = False) -> None:
        """The queries' scores against a list's rows, offered to their heaps: exact fp32
        products in the home pass (its heaps fill from empty: most of its scores would be
        scored again), screened ones after it."""
        if home_pass:
            members, x = members_of(lst)
            if len(queries) and len(members):
                offer((vectors(queries) @ x.T).numpy(), heap_of[queries],
                      members.astype(scan.ids.dtype), best_s, best_i)
            return
        members, x = members_of(lst, pad[1], "columns")
        if len(queries) and len(members):
            q = vectors(queries, pad[0], "rows")
            offer_rescored_rows(product(q, x, len(queries)), len(members), heap_of[queries],
                                q.numpy(), members.astype(scan.ids.dtype), x.numpy(), tol,
                                best_s, best_i)

    # the other probed lists: each searched row's, and those holding searched rows (their
    # probers' scores go to the rows), every prober of the store in one product
    wanted = np.zeros(scan.nlist, np.bool_)
    wanted[home[rows]] = True
    for t in range(1, probes.width):
        wanted[probes.lists[rows[counts[rows] > t], t]] = True
    offsets, probers = probers_by_list(probes.lists, counts, wanted, scan.nlist)
    sizes = np.diff(scan.offsets)
    home_rows = np.bincount(home[rows], minlength=scan.nlist)
    progress = _Progress(on_progress, home_rows @ sizes + np.diff(offsets) @ sizes)

    # each searched row against its own list first: its heap fills with good candidates
    by_home = rows[np.argsort(home[rows], kind="stable")]
    for lst, queries in _groups(home[by_home], by_home, scan.nlist):
        forward(queries, lst, home_pass=True)
        progress.add(len(queries) * sizes[lst])

    # then the other probed lists
    for lst in np.flatnonzero(offsets[1:] > offsets[:-1]):
        progress.add((offsets[lst + 1] - offsets[lst]) * sizes[lst])
        sources = probers[offsets[lst]:offsets[lst + 1]].astype(np.int64)
        members = scan.ids[scan.offsets[lst]:scan.offsets[lst + 1]].astype(np.int64)
        searched = heap_of[sources] >= 0
        taking = heap_of[members] >= 0
        if not first_candidate and taking.all():  # one product both ways (one shard)
            g, c = vectors(sources, pad[0], "rows"), members_of(lst, pad[1], "columns")[1]
            scores = product(g, c, len(sources))
            mine, g32 = scores, g.numpy()[:len(sources)]
            if not searched.all():
                mine, g32 = np.ascontiguousarray(scores[searched]), g32[searched]
            offer_rescored_rows(mine, len(members), heap_of[sources[searched]], g32,
                                members.astype(scan.ids.dtype), c.numpy(), tol, best_s, best_i)
            cols, givers = members, sources
        else:
            forward(sources[searched], lst)
            cols, givers = members[taking], sources[sources >= first_candidate]
            if not len(cols) or not len(givers):
                continue
            g, c = vectors(givers, pad[0], "rows"), vectors(cols, pad[1], "columns")
            scores = product(g, c, len(givers))
        offer_to_list_rows(scores, len(cols), tol, givers.astype(scan.ids.dtype), g.numpy(),
                           home[givers], cols, c.numpy(), heap_of[cols], probes.lists, counts,
                           best_s, best_i)
    sort_heaps(best_s, best_i)
    return best_s, best_i


class _Progress:
    """Reports the share of `total` scores done to `on_progress` (if any)."""

    def __init__(self, on_progress, total: int):
        self.on_progress, self.total, self.done = on_progress, max(int(total), 1), 0

    def add(self, scores: int) -> None:
        self.done += int(scores)
        if self.on_progress is not None:
            self.on_progress(min(self.done / self.total, 1.0))


def _groups(keys: np.ndarray, values: np.ndarray, nlist: int):
    """(list, its values) for each list present in `keys` (sorted), values as int64."""
    bounds = np.searchsorted(keys, np.arange(nlist + 1))
    for lst in np.flatnonzero(bounds[1:] > bounds[:-1]):
        yield lst, values[bounds[lst]:bounds[lst + 1]].astype(np.int64)


class BothWays:
    """Searches a ListScan's stored rows both ways (`search`), like ann.search: every row's
    probes are found once (RowProbes, widened when a fixed nprobe asks for more lists)."""

    def __init__(self, scan: ListScan, probes: RowProbes | None = None):
        self.scan = scan
        self.nlist = scan.nlist
        self.ntotal = scan.ntotal
        self._probes = probes  # build_lists_and_probes' own, or found when first needed

    def probes(self, nprobe: int, gap: float | None) -> RowProbes:
        width = min(max(PROBE_CAP, nprobe if gap is None else 0), self.nlist)
        if self._probes is None or self._probes.width < width:
            self._probes = row_probes(self.scan, width)
        return self._probes

    def search(self, rows: np.ndarray, k: int, nprobe: int, gap: float | None,
               on_progress=None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (r, k) int64, sims (r, k) float32) of the stored rows `rows` (ascending):
        self excluded, best first, equal sims by smaller id. Rows with fewer than k
        candidates are searched again one way with twice nprobe lists each (ann.search).
        `on_progress`: as search_both_ways'."""
        from graphbuild.graph.ann import _best_first, search

        probes = self.probes(nprobe, gap)
        s, i = search_both_ways(self.scan, probes, probes.counts(nprobe, gap), rows,
                                min(k + 1, self.ntotal), on_progress=on_progress)
        ids, sims = np.empty((len(rows), k), np.int64), np.empty((len(rows), k), np.float32)
        for lo in range(0, len(rows), QUERY_STEP):  # bounds the sort's temporaries
            at = slice(lo, lo + QUERY_STEP)
            sims[at], ids[at] = _best_first(s[at], i[at].astype(np.int64), rows[at], k)
        s = i = None
        short = ~np.isfinite(sims).all(axis=1)
        if short.any():
            xq = self.scan.in_store_order()[rows[short]]
            ids[short], sims[short] = search(self.scan, xq, rows[short], k,
                                             min(nprobe * 2, self.nlist))
        return ids, sims

    def recall(self, rows: np.ndarray, truth: np.ndarray, nprobe: int, gap: float | None,
               ) -> float:
        """recall@k that `search(rows, k, nprobe, gap)` reaches against `truth` (each row's
        exact top-k ids), found without searching: the search ranks a row's candidates by
        their exact scores, so it finds a true neighbour exactly when that neighbour is a
        candidate (kernels.candidates_reached). Two things can set the two apart: a tie at
        the k-th score, which may round either way in either, and a row with fewer than k
        candidates, which the search scans again with more lists (counted here as it stood:
        a lower bound)."""
        probes = self.probes(nprobe, gap)
        hits = candidates_reached(probes.lists, probes.counts(nprobe, gap), rows, truth)
        return int(hits.sum()) / truth.size

    def search_new(self, rows: np.ndarray, k: int, nprobe: int, gap: float | None,
                   first: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) of the stored rows `rows` (an update's old rows, all below `first`):
        their best candidates among the rows from `first` on (its new rows), best first;
        empty slots -inf and -1 (as ListScan.search gives them)."""
        probes = self.probes(nprobe, gap)
        s, i = search_both_ways(self.scan, probes, probes.counts(nprobe, gap), rows,
                                min(k, self.ntotal - first), first)
        return s, i.astype(np.int64)
