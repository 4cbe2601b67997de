"""The exact graph updated after an append, instead of rebuilt: same bytes, a fraction of the work.

After `graphbuild embed --append`, the store holds the old rows unchanged, then new rows
from row B (the base graph's node count, one of the store's `appended_at`). The exact top-k
of the grown store is then, per row:

- a new row (>= B): searched against all rows, as any exact search (exact.blocked_topk over
  the shard's new rows, other rows plain columns);
- an old row (< B): its top-k among old rows is its base list, unchanged; its top-k among the
  new rows comes from a blocked search of the old rows against only the new columns
  (`top_among`: half-precision products, then an exact re-rank of every candidate the error
  bound cannot rule out, as exact.py does); the two merge by sim descending, ties by the
  smaller id, and the first k are its row.

Exact sims are the exact dot products of the stored fp16 rows rounded once to fp32
(exact.py), so a pair's sim is the same whichever search found it, and the merge gives the
bytes a from-scratch exact search gives. Work: old x new products (one direction) plus new x
all, against N x N / 2 for a rebuild.

The base graph is set aside as RUN/graph-base (rundir.paths.RunDir.graph_base) by the first
shard that starts the update, after checking it is whole (every part's footer holds the rows
and edges its _meta.json gives); the old shard markers and parameters go. New parts are
written to graph/ with the new layout and marked as any shard is (their markers record the
grown store's provenance, so none vouches for the base or a half-merged part); graph/_meta.json
comes only once every shard is done, then graph-base is removed.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point
from graphbuild.rundir.files import read_json
from graphbuild.rundir.graph import part_problem, read_footer, read_row_group
from graphbuild.rundir.paths import RunDir

log = logging.getLogger(__name__)


def plan_update(run: RunDir, params: dict, attrs: dict, overwrite: bool) -> int | None:
    """The node count of the base graph this knn updates, or None for a build as usual.

    Under the run lock: a finished update's leftover base is removed; an update under way is
    resumed (other settings are refused, --overwrite drops it); a whole exact graph of the
    same k over the first rows of an appended store is set aside as the base."""
    from graphbuild.embedding.stage import APPENDED_AT

    with run.lock():
        meta = read_json(run.graph / "_meta.json")
        if meta and meta.get("provenance") == params["provenance"]:
            if run.graph_base.exists():
                shutil.rmtree(run.graph_base)  # the update finished; its base outlived it
            return None
        base = read_json(run.graph_base / "_meta.json")
        if base:
            if overwrite:
                shutil.rmtree(run.graph_base)
                return None
            problem = _unusable(base, params, attrs)
            if problem:
                raise GraphbuildError(f"{run.graph_base}: an update of the graph after an "
                                      f"append is under way, but {problem}; rerun knn with its "
                                      "settings, or pass --overwrite to rebuild the graph")
            return base["n_nodes"]
        if (not meta or overwrite or meta.get("n_nodes") not in attrs.get(APPENDED_AT, [])
                or _unusable(meta, params, attrs) or _broken_part(run.graph, meta)):
            return None
        shutil.rmtree(run.state("knn"), ignore_errors=True)  # they vouch for the base
        kill_point("knn.base_markers_removed")  # _meta.json still vouches for the base
        run.graph.rename(run.graph_base)
        kill_point("knn.base_set_aside")
        log.info("updating the exact graph of %d nodes with the %d rows appended after them "
                 "(the finished graph is kept in %s until the new one is whole)",
                 meta["n_nodes"], attrs["n_nodes"] - meta["n_nodes"], run.graph_base)
        return meta["n_nodes"]


def _unusable(base: dict, params: dict, attrs: dict) -> str | None:
    """Why the base graph cannot be updated into the graph asked for, or None."""
    from graphbuild.embedding.stage import APPENDED_AT

    if base.get("method") != "exact" or params["method"] != "exact":
        return (f"only exact graphs are updated (the base is {base.get('method')}, "
                f"{params['method']} is asked for)")
    if base.get("k") != params["k"]:
        return f"the base has k={base.get('k')}, k={params['k']} is asked for"
    if base.get("n_nodes") not in attrs.get(APPENDED_AT, []):
        return f"its {base.get('n_nodes')} nodes are not where an append began"
    then = {**(base.get("provenance") or {}), "n_nodes": params["provenance"]["n_nodes"]}
    if then != params["provenance"]:
        return "it was built from embeddings of another provenance"
    return None


def _broken_part(folder: Path, meta: dict) -> str | None:
    for p in meta.get("parts", []):
        problem = part_problem(folder / p["file"], p["first"], p["stop"], p["edges"],
                               meta["n_nodes"])
        if problem:
            return f"{folder / p['file']}: {problem}"
    return None


def base_lists(run: RunDir, lo: int, hi: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, sims float32), shape (hi - lo, k): rows lo..hi-1 of the base graph, read
    from the parts that hold them (page checksums verified, nodes and lengths checked)."""
    meta = read_json(run.graph_base / "_meta.json")
    problem = _broken_part(run.graph_base, meta)
    if problem:
        raise GraphbuildError(f"{problem}; the base graph of this update is damaged: pass "
                              "--overwrite to rebuild the graph")
    ids = np.empty((hi - lo, k), np.int64)
    sims = np.empty((hi - lo, k), np.float32)
    for part in meta["parts"]:
        if part["stop"] <= lo or part["first"] >= hi:
            continue
        path = run.graph_base / part["file"]
        row = part["first"]
        for g in range(read_footer(path).num_row_groups):
            t = read_row_group(path, g)
            count = t.num_rows
            a, b = max(row, lo), min(row + count, hi)
            if a < b:
                _copy_rows(path, t, row, a, b, k, ids[a - lo:b - lo], sims[a - lo:b - lo])
            row += count
    return ids, sims


def _copy_rows(path: Path, t, row: int, a: int, b: int, k: int, ids: np.ndarray,
               sims: np.ndarray) -> None:
    """Rows a..b-1 of a row group starting at `row` into ids and sims, checked."""
    nodes = t.column("node").to_numpy()[a - row:b - row]
    nb = t.column("neighbors").combine_chunks().slice(a - row, b - a)
    sm = t.column("sims").combine_chunks().slice(a - row, b - a)
    lengths = np.diff(nb.offsets.to_numpy())
    if not np.array_equal(nodes, np.arange(a, b)) or (lengths != k).any():
        raise GraphbuildError(f"{path}: rows {a}..{b - 1} are not those nodes with {k} "
                              "neighbours each; pass --overwrite to rebuild the graph")
    ids[:] = nb.flatten().to_numpy().reshape(b - a, k)
    sims[:] = sm.flatten().to_numpy().reshape(b - a, k)


def merge_lists(ids_a: np.ndarray, sims_a: np.ndarray, ids_b: np.ndarray, sims_b: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first k of both lists by sim descending, then id ascending."""
    ids = np.concatenate([ids_a.astype(np.int64), ids_b.astype(np.int64)], axis=1)
    sims = np.concatenate([sims_a, sims_b], axis=1)
    order = np.lexsort((ids, -sims), axis=1)[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)


def top_among(x16: np.ndarray, rows: range, cols: range, k: int, bound, device: str,
              block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-min(k, len(cols)) of each of `rows` among the columns `cols` alone (disjoint
    from rows): (ids int64, sims float32), by sim descending then id ascending.

    Half-precision products keep each row's `capacity` best scores; every one whose exact
    value could reach the exact kk-th best (bound.keep_threshold of the approximate kk-th
    best) is scored exactly. A row whose capacity-th score still passes (near-ties) has all
    its passing columns gathered in a second pass, so the result stays exact."""
    import torch

    from graphbuild.graph.exact import _exact_dots_of_rows, default_capacity, half_dtype, pick_half

    kk = min(k, len(cols))
    capacity = min(default_capacity(kk), len(cols))
    dtype, dev = half_dtype(pick_half(device)), torch.device(device)

    def half(lo: int, hi: int):
        return torch.from_numpy(x16[lo:hi]).to(dev).float().to(dtype)

    q = half(rows.start, rows.stop)
    best = torch.full((len(rows), 0), -torch.inf)
    best_ids = torch.empty((len(rows), 0), dtype=torch.int64)
    for clo in range(cols.start, cols.stop, block_rows):
        chi = min(clo + block_rows, cols.stop)
        s = (q @ half(clo, chi).T).float().cpu()
        both = torch.cat([best, s], 1)
        both_ids = torch.cat([best_ids, torch.arange(clo, chi).expand(len(rows), -1)], 1)
        best, at = torch.topk(both, min(capacity, both.shape[1]), dim=1)
        best_ids = torch.gather(both_ids, 1, at)
    thr = bound.keep_threshold(best[:, kk - 1].double()).float()
    keep = best >= thr[:, None]
    over = (keep[:, -1] & (capacity < len(cols))).numpy()
    rr, cc = (t.numpy() for t in keep.nonzero(as_tuple=True))
    pair_rows, pair_cols = rr[~over[rr]], best_ids.numpy()[rr, cc][~over[rr]]
    for r in np.flatnonzero(over):  # near-ties beyond the capacity: every passing column
        s = (q[r:r + 1] @ half(cols.start, cols.stop).T).float().cpu()[0]
        hit = np.flatnonzero((s >= thr[r]).numpy()) + cols.start
        pair_rows = np.concatenate([pair_rows, np.full(len(hit), r)])
        pair_cols = np.concatenate([pair_cols, hit])
    row_ids = np.arange(rows.start, rows.stop)
    sims = _exact_dots_of_rows(x16, row_ids, pair_rows, pair_cols)
    order = np.lexsort((pair_cols, -sims, pair_rows))
    pair_rows, pair_cols, sims = pair_rows[order], pair_cols[order], sims[order]
    first = np.searchsorted(pair_rows, np.arange(len(rows)))
    rank = np.arange(len(pair_rows)) - first[pair_rows]
    take = rank < kk
    if np.bincount(pair_rows[take], minlength=len(rows)).min() < kk:
        raise AssertionError("a row kept fewer candidates than k; the error bound is broken")
    return (pair_cols[take].reshape(len(rows), kk).astype(np.int64),
            sims[take].reshape(len(rows), kk))


def update_blocks(run: RunDir, x16: np.ndarray, k: int, rows: range, base_n: int,
                  block_rows: int, device: str | None,
                  reporter) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The shard's rows of the updated graph, (first row, ids, sims) in row order."""
    from graphbuild.graph.exact import blocked_topk, default_device, error_bound, pick_half

    device = device or default_device()
    n = len(x16)
    old, new = range(rows.start, min(rows.stop, base_n)), range(max(rows.start, base_n),
                                                               rows.stop)
    if len(old):
        bound = error_bound(x16, pick_half(device))
        ids0, sims0 = base_lists(run, old.start, old.stop, k)
        for lo in range(old.start, old.stop, block_rows):
            hi = min(lo + block_rows, old.stop)
            ids1, sims1 = top_among(x16, range(lo, hi), range(base_n, n), k, bound, device,
                                    block_rows)
            ids, sims = merge_lists(ids0[lo - old.start:hi - old.start],
                                    sims0[lo - old.start:hi - old.start], ids1, sims1, k)
            reporter.advance(hi - lo)
            kill_point("knn.update_block_merged")
            yield lo, ids, sims
    if len(new):
        ids, sims = blocked_topk(x16, k, new, block_rows=block_rows, device=device,
                                 on_progress=reporter.advance)
        for lo in range(0, len(new), block_rows):
            yield new.start + lo, ids[lo:lo + block_rows], sims[lo:lo + block_rows]
