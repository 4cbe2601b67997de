"""The approximate graph updated after an append: new rows join the base graph's lists.

An approximate graph on a CPU searches ivf-sq16 lists (ann.build_lists: spherical k-means
centroids, each row in its nearest centroid's list; ivf_scan.ListScan reads the rows from
the store). After `graphbuild embed --append` the store holds the base graph's B rows, then
new ones. When knn asks for the same approximate graph (k, recall target) again:

- the lists keep their trained centroids; each new row joins its nearest one's list (as a
  build assigns rows), and the grown lists are saved once, under the run lock, in
  graph/_index (`grow_index`);
- a new row is searched among all rows, as a build searches (symmetric_scan, both ways);
- an old row scores new rows: all of them by one dense product when they are few, else
  the new ones among its candidates of that search (the new members of the lists it probes,
  and the new rows probing its own list: `NewRows`); its best ones and its base list merge
  by sim descending, then id ascending (update.merge_lists). Sims are fp32 products of the
  stored rows either way (as ivf_scan's).

Before any shard searches, the graph's recall is measured again: a seeded sample of queries
over the grown store, each updated as above, against exact search (ann.ground_truth). The
searches that score new rows probe the base's tuned nprobe lists (and probe gap), or a few
times more while the sample falls short of the target (`measure_recall`); the figure is
recorded where a build records its tuning (graph/_index's index.json, then every shard
marker and graph/_meta.json). Still below the target, the update is abandoned and the graph
rebuilt, with one log line; so is it when the lists would hold more than
APPROX_UPDATE_MAX_SHARE of rows they were not trained on (counted over every append since
they were trained), or when this knn would search another kind of index (a faiss index:
IVF-PQ, or on a GPU).

Setting the base aside as graph-base, resuming, refusing other settings and vouching are
the exact update's (update.plan_update, stage.py): no marker vouches for the base or for a
half-merged part.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point
from graphbuild.rundir.files import atomic_path, read_json, write_json
from graphbuild.rundir.graph import read_footer, read_row_group, write_part
from graphbuild.rundir.paths import RunDir

log = logging.getLogger(__name__)

# At most this many rows the lists were not trained on, per row they were trained on. Up to
# 0.10 of 60k real captions, the largest list grew at most 1.11x, whether the new rows were
# like the old or from other caption sets; at 0.2 up to 1.48x, at 0.4 up to 2.92x, while
# nlist stays the base's (benchmarks/append_share.py, results/append.txt). Past it the
# lists are trained again. Below it, the recall check guards the graph: new text unlike
# the old loses recall at the base's nprobe whatever the share (0.94 at 0.02 there).
APPROX_UPDATE_MAX_SHARE = 0.10
# The searches that score new rows (new rows against all, old rows against the new members
# of their lists) probe the base's nprobe lists, or this many times more when the sample
# falls short of the target at the base's: the old rows' lists among old rows stay the
# base's, tuned to the target on another sample, so a fresh sample of the updated graph can
# measure a little below it. Past the last factor, new rows would cost a large part of a
# rebuild's search: the graph is rebuilt.
PROBE_FACTORS = (1, 1.5, 2, 3, 4)
# Old rows score every new row (a dense product) when there are at most this many new rows
# per list the base probes, else only the new members of the lists they probe: below it the
# dense product costs less than gathering the old rows once per probed list
# (benchmarks/results/append.txt).
DENSE_PER_PROBE = 400
SCORES_PER_BLOCK = 1 << 25  # fp32 scores of old rows against new ones held at once (128 MiB)
LISTS_FILE = "lists.npz"


def tune_key(params: dict) -> str:
    """The key of a graph's tuning in graph/_index/index.json (as stage._index writes it for
    the CPU's list scans, the only ones updated)."""
    from graphbuild.graph.ann import tuning_key

    return tuning_key(params["k"], params["recall_target"], both_ways=True)


def drop_unupdatable(run: RunDir, params: dict, attrs: dict, kind: str, on_cpu: bool) -> None:
    """Under the run lock: an approximate graph of this k and recall target over the first
    rows of an appended store (one update.plan_update would set aside) that cannot be
    updated is removed, with one log line saying why, so this knn builds it again."""
    from graphbuild.embedding.stage import APPENDED_AT
    from graphbuild.graph.update import broken_part, unusable

    with run.lock():
        meta = read_json(run.graph / "_meta.json")
        if (not meta or meta.get("method") != "approximate"
                or meta.get("provenance") == params["provenance"]
                or meta.get("n_nodes") not in attrs.get(APPENDED_AT, [])
                or unusable(meta, params, attrs) or broken_part(run.graph, meta)):
            return
        why = _not_growable(run.graph / "_index", meta["n_nodes"], attrs, kind, on_cpu)
        if why:
            _rebuild(run, meta["n_nodes"], attrs["n_nodes"], why)


def _not_growable(folder: Path, base_n: int, attrs: dict, kind: str,
                  on_cpu: bool) -> str | None:
    """Why the base graph's lists (in its _index `folder`) cannot take the new rows, or
    None."""
    if kind != "ivf-sq16" or not on_cpu:
        return (f"this knn searches a faiss {kind} index{'' if on_cpu else ' on a GPU'}; only "
                "ivf-sq16 lists searched on a CPU take new rows")
    index = read_json(folder / "index.json").get("index") or {}
    if not _lists_of(index, attrs, n_nodes=base_n):
        return f"{folder}: holds no ivf-sq16 lists over the base graph's {base_n} rows"
    trained = index.get("trained_nodes", base_n)
    share = (attrs["n_nodes"] - trained) / trained
    if share > APPROX_UPDATE_MAX_SHARE:
        return (f"the lists would hold {attrs['n_nodes'] - trained} rows they were not trained "
                f"on, {share:.3f} of the {trained} they were, above "
                f"APPROX_UPDATE_MAX_SHARE={APPROX_UPDATE_MAX_SHARE}")
    return None


def _lists_of(index: dict, attrs: dict, **rows) -> bool:
    """Whether an index.json record is of ivf-sq16 lists of this store's model and dim, with
    the `rows` entries given (n_nodes, grown_from)."""
    want = {"kind": "ivf-sq16", "file": LISTS_FILE, "dim": attrs["dim"],
            "model": attrs["model"], "model_revision": attrs["model_revision"], **rows}
    return all(index.get(key) == value for key, value in want.items())

def _rebuild(run: RunDir, base_n: int, n: int, why: str) -> None:
    """Remove the graph (and a base set aside for it) so that knn builds it from scratch:
    its markers and parameters first, the base last, so a kill in between decides again."""
    log.warning("rebuilding the approximate graph rather than updating the one of %d nodes "
                "with the %d rows appended: %s", base_n, n - base_n, why)
    shutil.rmtree(run.state("knn"), ignore_errors=True)
    (run.graph / "_meta.json").unlink(missing_ok=True)
    shutil.rmtree(run.graph, ignore_errors=True)
    shutil.rmtree(run.graph_base, ignore_errors=True)


def grow_index(run: RunDir, arr, attrs: dict, params: dict, base_n: int,
               block_rows: int) -> bool:
    """Under the run lock, once: the base's lists grown by the new rows, the updated graph's
    recall measured on a sample, both saved in graph/_index. False when there is no update
    to make after all: the base is gone (another shard abandoned it), or its lists cannot be
    read, or the recall falls below the target (the graph is then removed for a rebuild)."""
    from graphbuild.graph.ivf_scan import ListScan, load_lists, save_lists

    n, d = arr.shape
    step = arr.block_step(block_rows)
    with run.lock():
        if not run.graph_base.exists():
            return False
        if _grown(run, attrs, params, base_n, n, d) is not None:
            return True
        base_info = read_json(run.graph_base / "_index" / "index.json")
        why = _not_growable(run.graph_base / "_index", base_n, attrs, "ivf-sq16", True)
        lists = None if why else load_lists(run.graph_base / "_index" / LISTS_FILE, base_n, d)
        tuning = base_info.get("tuning", {}).get(tune_key(params))
        if not why and (lists is None or tuning is None):
            why = (f"{run.graph_base / '_index'}: its lists do not read back whole, or hold no "
                   f"tuning for {tune_key(params)}")
        if not why:
            grown = grow_lists(lists, arr, base_n, step)
            scan = ListScan.from_lists(*grown, arr, step)
            tuned = measure_recall(run, scan, base_n, params["k"], tuning,
                                   params["recall_target"], step)
            measured = tuned["update"]
            if measured["recall"] < params["recall_target"]:
                why = (f"the updated graph's recall@{params['k']} {measured['recall']:.4f} on "
                       f"{measured['sample']} sampled queries is below the target "
                       f"{params['recall_target']}, the new rows' searches probing up to "
                       f"{tuned['nprobe']} lists (the base's {tuning['nprobe']} times "
                       f"{PROBE_FACTORS[-1]})")
        if why:
            _rebuild(run, base_n, n, why)
            return False
        index = {**base_info["index"], "n_nodes": n, "grown_from": base_n,
                 "trained_nodes": base_info["index"].get("trained_nodes", base_n)}
        folder = run.graph / "_index"
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / LISTS_FILE) as tmp:
            save_lists(tmp, grown)
        kill_point("ann.grown_index_written")  # lists in place, index.json not yet
        write_json(folder / "index.json", {"index": index, "tuning": {tune_key(params): tuned}})
        on_new = ("" if measured["recall_new"] is None else
                  f"{measured['recall_new']:.4f} on the {measured['sample_new']} new among them; ")
        log.info("the %d rows appended joined the base's %d lists; the updated graph's "
                 "recall@%d %.4f on %d sampled queries (%starget %.2f); new rows scored "
                 "probing %d lists (the base's nprobe: %d)", n - base_n, scan.nlist,
                 params["k"], measured["recall"], measured["sample"], on_new,
                 params["recall_target"], tuned["nprobe"], tuning["nprobe"])
        return True


def _grown(run: RunDir, attrs: dict, params: dict, base_n: int, n: int,
           d: int) -> tuple[tuple, dict] | None:
    """(grown lists, tuning) saved in graph/_index for this update, or None."""
    from graphbuild.graph.ivf_scan import load_lists

    info = read_json(run.graph / "_index" / "index.json")
    index, tuning = info.get("index") or {}, (info.get("tuning") or {}).get(tune_key(params))
    if tuning is None or not _lists_of(index, {**attrs, "dim": d}, n_nodes=n,
                                       grown_from=base_n):
        return None
    lists = load_lists(run.graph / "_index" / LISTS_FILE, n, d)
    return None if lists is None else (lists, tuning)


def grow_lists(lists: tuple[np.ndarray, np.ndarray, np.ndarray], arr, base_n: int,
               block_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lists (centroids, offsets, ids) with rows base_n.. of `arr` in their nearest
    centroid's list (ivf_scan.nearest_list, as ann.build_lists assigns rows): after the
    list's old members, so ids stay ascending within each list."""
    from graphbuild.graph.ivf_scan import nearest_list

    centroids, offsets, ids = lists
    n, nlist = arr.shape[0], len(centroids)
    c = torch.from_numpy(np.ascontiguousarray(centroids, np.float32))
    joins = np.concatenate([np.asarray(nearest_list(torch.from_numpy(
        np.asarray(arr[lo:min(lo + block_rows, n)])), c), np.int64)
        for lo in range(base_n, n, block_rows)])
    old_counts = np.diff(offsets)
    new_counts = np.bincount(joins, minlength=nlist)
    grown_offsets = np.concatenate([[0], np.cumsum(old_counts + new_counts)])
    new_offsets = np.concatenate([[0], np.cumsum(new_counts)])
    grown = np.empty(n, np.int64)
    grown[np.repeat(grown_offsets[:-1] - offsets[:-1], old_counts) + np.arange(base_n)] = ids
    new_ids = base_n + np.argsort(joins, kind="stable")
    at = np.repeat(grown_offsets[:-1] + old_counts - new_offsets[:-1], new_counts)
    grown[at + np.arange(n - base_n)] = new_ids
    return centroids, grown_offsets, grown


class NewRows:
    """Where old rows find their new neighbours: with at most DENSE_PER_PROBE new rows per
    list the base probes, all of them, scored by one dense product per block of old rows;
    else the new rows among their candidates of a search both ways (symmetric_scan: the new
    members of the lists they probe, and the new rows probing their own list)."""

    def __init__(self, scan, base_n: int, nprobe: int, dense: bool | None = None):
        from graphbuild.graph.symmetric_scan import BothWays

        n_new = scan.ntotal - base_n
        self.base_n = base_n
        self.both = BothWays(scan)  # the new rows' search too
        self.dense = n_new <= DENSE_PER_PROBE * nprobe if dense is None else dense
        if self.dense:
            self.cols = torch.from_numpy(scan.in_store_order()[base_n:scan.ntotal]).float().T

    def best(self, rows: np.ndarray, xq: np.ndarray, k: int,
             tuning: dict) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) of the best new rows of each old row `rows` (fp16 vectors xq), best
        first; empty slots -inf and -1 (its candidates may hold fewer than k new rows)."""
        from graphbuild.graph.kernels import threads_as_torch

        if not self.dense:
            return self.both.search_new(rows, k, tuning["nprobe"], tuning.get("probe_gap"),
                                        self.base_n)
        threads_as_torch()
        sims, ids = [], []
        step = max(1, SCORES_PER_BLOCK // self.cols.shape[1])
        for lo in range(0, len(xq), step):
            top = (torch.from_numpy(xq[lo:lo + step]).float() @ self.cols).topk(
                min(k, self.cols.shape[1]), dim=1)
            sims.append(top.values.numpy())
            ids.append(top.indices.numpy() + self.base_n)
        return np.concatenate(sims), np.concatenate(ids)


def updated_rows(scan, news: NewRows, rows: np.ndarray, base_ids: np.ndarray,
                 base_sims: np.ndarray, base_n: int, k: int,
                 tuning: dict) -> tuple[np.ndarray, np.ndarray]:
    """(ids, sims) of the updated graph's `rows` (ascending; base_ids/base_sims: the base
    lists of those below base_n, in order): new rows searched among all rows, old rows' base
    lists merged with their best new rows (`news`); list products offered both ways."""
    from graphbuild.graph.update import merge_lists

    old = rows < base_n
    ids, sims = np.empty((len(rows), k), np.int64), np.empty((len(rows), k), np.float32)
    if old.any():
        xq = scan.in_store_order()[rows[old]] if news.dense else None  # fp16, as stored
        s, i = news.best(rows[old], xq, k, tuning)
        # empty slots (-inf, -1) sort after every base entry
        ids[old], sims[old] = merge_lists(base_ids, base_sims, i, s, k)
    if not old.all():
        ids[~old], sims[~old] = news.both.search(rows[~old], k, tuning["nprobe"],
                                                 tuning.get("probe_gap"))
    return ids, sims


def measure_recall(run: RunDir, scan, base_n: int, k: int, tuning: dict, target: float,
                   block_rows: int) -> dict:
    """The tuning of the searches that score new rows, as index.json records a tuning, with
    the updated graph's recall@k on a seeded sample of queries over the grown store (the
    tuning's sample size and seed) against exact search: at the base's nprobe and probe gap,
    then, while it falls short of the target, at PROBE_FACTORS times that nprobe (with the
    gap at which the sample probes that many lists on average, as ann.tune_nprobe sets it).
    "update": the chosen one's figures, overall and on the sample's new rows."""
    from graphbuild.graph.ann import SEED, TUNE_QUERIES, ground_truth, recall_at_k, sample_ids
    from graphbuild.graph.ivf_scan import probe_gap_for

    queries = sample_ids(scan.ntotal, TUNE_QUERIES, SEED + 1)
    truth = ground_truth(scan.in_store_order(), queries, k, block_rows)
    old = queries < base_n
    base_ids, base_sims = base_rows_at(run, queries[old], k)
    news = NewRows(scan, base_n, tuning["nprobe"])
    xq = np.asarray(scan.in_store_order()[queries], np.float32)
    curve = []
    for factor in PROBE_FACTORS:
        nprobe = min(scan.nlist, math.ceil(tuning["nprobe"] * factor))
        gap = (tuning.get("probe_gap") if factor == 1
               else probe_gap_for(xq, scan.centroids, nprobe))
        found, _ = updated_rows(scan, news, queries, base_ids, base_sims, base_n, k,
                                {"nprobe": nprobe, "probe_gap": gap})
        curve.append({"nprobe": nprobe, "probe_gap": gap,
                      "recall": round(recall_at_k(found, truth), 4),
                      "recall_new": round(recall_at_k(found[~old], truth[~old]), 4)
                      if (~old).any() else None})
        log.info("updated graph, new rows scored probing %d lists%s: recall@%d %.4f on %d "
                 "sampled queries", nprobe, "" if gap is None else " on average", k,
                 curve[-1]["recall"], len(queries))
        if curve[-1]["recall"] >= target or nprobe >= scan.nlist:
            break
    chosen = curve[-1]
    return {"nprobe": chosen["nprobe"], "probe_gap": chosen["probe_gap"],
            "recall": chosen["recall"], "sample": len(queries), "curve": curve,
            "update": {"recall": chosen["recall"], "sample": len(queries),
                       "recall_new": chosen["recall_new"], "sample_new": int((~old).sum()),
                       "base_nodes": base_n, "base_nprobe": tuning["nprobe"],
                       "dense": news.dense,
                       "base_recall": tuning.get("recall")}}


def base_rows_at(run: RunDir, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, sims) of the base graph's `rows` (ascending), from the row groups holding them
    (the parts checked whole first, as update.base_lists does)."""
    from graphbuild.graph.update import base_meta, copy_rows

    meta = base_meta(run)
    ids, sims = np.empty((len(rows), k), np.int64), np.empty((len(rows), k), np.float32)
    for part in meta["parts"]:
        path, row = run.graph_base / part["file"], part["first"]
        footer = read_footer(path)
        for g in range(footer.num_row_groups):
            count = footer.row_group(g).num_rows
            at = np.flatnonzero((rows >= row) & (rows < row + count))
            if len(at):
                group_ids = np.empty((count, k), np.int64)
                group_sims = np.empty((count, k), np.float32)
                copy_rows(path, read_row_group(path, g), row, row, row + count, k, group_ids,
                           group_sims)
                ids[at], sims[at] = group_ids[rows[at] - row], group_sims[rows[at] - row]
            row += count
    return ids, sims


def update_part(run: RunDir, arr, attrs: dict, params: dict, rows: range, shard: int,
                block_rows: int, reporter) -> tuple[int, dict]:
    """The shard's part of the updated approximate graph (edges, tuning), from the grown
    lists grow_index saved."""
    from graphbuild.graph.ivf_scan import QUERY_STEP, ListScan
    from graphbuild.graph.update import base_lists

    n, d = arr.shape
    base_n, k = params["updates"], params["k"]
    saved = _grown(run, attrs, params, base_n, n, d)
    if saved is None:
        raise GraphbuildError(f"{run.graph / '_index'}: holds no lists grown for this update; "
                              "pass --overwrite to rebuild the graph")
    lists, tuning = saved
    scan = ListScan.from_lists(*lists, arr, arr.block_step(block_rows))
    news = NewRows(scan, base_n, tuning["nprobe"], dense=tuning["update"]["dense"])
    old = range(rows.start, min(rows.stop, base_n))
    base_ids, base_sims = base_lists(run, old.start, old.stop, k) if len(old) else (None, None)
    log.info("approximate update: rows %d..%d, %d of them new", rows.start, rows.stop,
             len(rows) - len(old))

    def blocks():
        for lo in range(rows.start, rows.stop, max(block_rows, QUERY_STEP)):
            hi = min(lo + max(block_rows, QUERY_STEP), rows.stop)
            mine = np.arange(lo, hi)
            b_lo, b_hi = min(lo, old.stop) - old.start, min(hi, old.stop) - old.start
            ids, sims = updated_rows(scan, news, mine, base_ids[b_lo:b_hi] if len(old) else None,
                                     base_sims[b_lo:b_hi] if len(old) else None, base_n, k,
                                     tuning)
            for off in range(0, hi - lo, block_rows):
                piece = slice(off, off + block_rows)
                reporter.advance(len(ids[piece]))
                kill_point("knn.approximate_update_block")
                yield lo + off, ids[piece], sims[piece]

    return write_part(run.root, shard, rows, n, blocks()), tuning
