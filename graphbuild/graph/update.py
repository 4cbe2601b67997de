"""The exact graph updated after an append, instead of rebuilt: same bytes, a fraction of the work.

After `graphbuild embed --append`, the store holds the old rows unchanged, then new rows
from row B (the base graph's node count, one of the store's `appended_at`). The exact top-k
of the grown store is then, per row:

- a new row (>= B): searched against all rows, as any exact search (exact.blocked_topk over
  the shard's new rows, other rows plain columns);
- an old row (< B): its top-k among old rows is its base list, unchanged. A new row can
  enter it only by an exact sim above the list's k-th (at an equal sim the old, smaller id
  wins), so the old rows are multiplied in half precision with the new columns alone, and
  every pair whose score could reach the k-th sim within the error bound (exact.ErrorBound)
  is scored exactly (`new_candidates`); the base list and those merge by sim descending,
  ties by the smaller id, and the first k are its row.

Exact sims are the exact dot products of the stored fp16 rows rounded once to fp32
(exact.py), so a pair's sim is the same whichever search found it, and the merge gives the
bytes a from-scratch exact search gives. Work: old x new products (one direction) plus new x
all, against N x N / 2 for a rebuild.

The base graph is set aside as RUN/graph-base (rundir.paths.RunDir.graph_base) by the first
shard that starts the update, after checking it is whole (every part's footer holds the rows
and edges its _meta.json gives); the old shard markers and parameters go. New parts are
written to graph/ with the new layout and marked as any shard is (their markers record the
grown store's provenance, so none vouches for the base or a half-merged part); graph/_meta.json
comes only once every shard is done, then graph-base is removed. An approximate graph is
set aside, resumed and refused the same way; ann_update.py updates it.
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
    resumed (other settings are refused, --overwrite drops it); a whole graph of the same
    method, k and recall target over the first rows of an appended store is set aside as
    the base (an approximate one then grows its lists: ann_update.py)."""
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
            problem = unusable(base, params, attrs)
            if problem:
                raise GraphbuildError(f"{run.graph_base}: an update of the graph after an "
                                      f"append is under way, but {problem}; rerun knn with its "
                                      "settings, or pass --overwrite to rebuild the graph")
            return base["n_nodes"]
        if (not meta or overwrite or meta.get("n_nodes") not in attrs.get(APPENDED_AT, [])
                or unusable(meta, params, attrs) or broken_part(run.graph, meta)):
            return None
        shutil.rmtree(run.state("knn"), ignore_errors=True)  # they vouch for the base
        kill_point("knn.base_markers_removed")  # _meta.json still vouches for the base
        run.graph.rename(run.graph_base)
        kill_point("knn.base_set_aside")
        log.info("updating the %s graph of %d nodes with the %d rows appended after them "
                 "(the finished graph is kept in %s until the new one is whole)",
                 meta["method"], meta["n_nodes"], attrs["n_nodes"] - meta["n_nodes"],
                 run.graph_base)
        return meta["n_nodes"]


def unusable(base: dict, params: dict, attrs: dict) -> str | None:
    """Why the base graph cannot be updated into the graph asked for, or None."""
    from graphbuild.embedding.stage import APPENDED_AT

    if base.get("method") != params["method"]:
        return f"the base is {base.get('method')}, {params['method']} is asked for"
    if base.get("k") != params["k"]:
        return f"the base has k={base.get('k')}, k={params['k']} is asked for"
    if base.get("recall_target") != params.get("recall_target"):
        return (f"the base has recall target {base.get('recall_target')}, "
                f"{params.get('recall_target')} is asked for")
    if base.get("n_nodes") not in attrs.get(APPENDED_AT, []):
        return f"its {base.get('n_nodes')} nodes are not where an append began"
    then = {**(base.get("provenance") or {}), "n_nodes": params["provenance"]["n_nodes"]}
    if then != params["provenance"]:
        return "it was built from embeddings of another provenance"
    return None


def broken_part(folder: Path, meta: dict) -> str | None:
    """Which part of the graph in `folder` (its _meta.json `meta`) is not whole, and why; or
    None."""
    for p in meta.get("parts", []):
        problem = part_problem(folder / p["file"], p["first"], p["stop"], p["edges"],
                               meta["n_nodes"])
        if problem:
            return f"{folder / p['file']}: {problem}"
    return None


def base_meta(run: RunDir) -> dict:
    """The base graph's _meta.json, once every part it lists is whole (its footer)."""
    meta = read_json(run.graph_base / "_meta.json")
    problem = broken_part(run.graph_base, meta)
    if problem:
        raise GraphbuildError(f"{problem}; the base graph of this update is damaged: pass "
                              "--overwrite to rebuild the graph")
    return meta


def base_lists(run: RunDir, lo: int, hi: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, sims float32), shape (hi - lo, k): rows lo..hi-1 of the base graph, read
    from the parts that hold them (page checksums verified, nodes and lengths checked)."""
    meta = base_meta(run)
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
                copy_rows(path, t, row, a, b, k, ids[a - lo:b - lo], sims[a - lo:b - lo])
            row += count
    return ids, sims


def copy_rows(path: Path, t, row: int, a: int, b: int, k: int, ids: np.ndarray,
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


SCORES_PER_BLOCK = 1 << 26  # half-precision scores held at once by new_candidates (128 MiB)


def floor_threshold(floor: np.ndarray, bound) -> np.ndarray:
    """Per row, the lowest computed score (float64) whose pair can still enter the row's list:
    a computed score v stands for an exact score of at most v + b(v) (exact.ErrorBound), so a
    pair matters only when that reaches the row's `floor` (its base list's k-th sim). A new
    column scoring below the floor cannot enter the list (at an equal score the old, smaller
    id wins)."""
    from graphbuild.graph.exact import THRESHOLD_SLACK

    low = np.asarray(floor, np.float64) - bound.absolute
    thr = np.where(low >= 0, low / (1 + bound.relative), low / (1 - bound.relative))
    return thr - THRESHOLD_SLACK


def new_candidates(x16: np.ndarray, rows: range, cols: range, floor: np.ndarray, bound,
                   device: str, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(row positions in `rows`, column ids) of every pair whose exact score could reach the
    row's `floor` (floor_threshold), among the columns `cols` alone.

    Per block of rows, one half-precision product with all of `cols` (appended rows; the
    block shrinks so it holds at most SCORES_PER_BLOCK scores), compared in the compute type
    against the threshold lowered by more than its rounding there."""
    import torch

    from graphbuild.graph.exact import half_dtype, pick_half

    dtype, dev = half_dtype(pick_half(device)), torch.device(device)

    def half(lo: int, hi: int):
        return torch.from_numpy(x16[lo:hi]).to(dev).float().to(dtype)

    # below the threshold by more than a half-precision rounding of values of magnitude <= 2
    thr = torch.from_numpy(floor_threshold(floor, bound) - 2.0 ** -7).to(dev).to(dtype)
    xc = half(cols.start, cols.stop)
    step = max(1, min(block_rows, SCORES_PER_BLOCK // len(cols)))
    found_rows, found_cols = [], []
    for lo in range(rows.start, rows.stop, step):
        hi = min(lo + step, rows.stop)
        s = half(lo, hi) @ xc.T
        rr, cc = (s >= thr[lo - rows.start:hi - rows.start, None]).nonzero(as_tuple=True)
        found_rows.append(rr.cpu().numpy() + (lo - rows.start))
        found_cols.append(cc.cpu().numpy() + cols.start)
    return np.concatenate(found_rows), np.concatenate(found_cols)


class OldRowPairs:
    """The same pairs as new_candidates, for the old rows `old` and the new rows a search
    has as its query rows, read from that search's own products (exact.blocked_topk's
    on_plain_block: the new rows against the old, plain, columns), so no product is made
    twice. Per block, the group maxima (int16 bit patterns) say which (group, old row) can
    hold a pair; only those groups' scores are compared, in fp32, with the threshold."""

    def __init__(self, old: range, floor: np.ndarray, bound, half: str, device: str):
        import torch

        from graphbuild.graph.exact import _int16_key, half_dtype

        self.old = old
        self.thr = torch.from_numpy(floor_threshold(floor, bound)).float().to(device)
        self.key = _int16_key(self.thr, half_dtype(half))
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []

    def __call__(self, s, gmax, row_ids, clo: int, chi: int) -> None:
        from graphbuild.graph.exact import GROUP

        a, b = max(clo, self.old.start), min(chi, self.old.stop)
        if a >= b:
            return
        at = slice(a - self.old.start, b - self.old.start)
        gi, j = (gmax[:, a - clo:b - clo] >= self.key[at]).nonzero(as_tuple=True)
        if len(gi) == 0:
            return
        v = s.view(-1, GROUP, s.shape[1])[gi, :, j + (a - clo)].float()   # (hits, GROUP)
        f = (v >= self.thr[at][j][:, None]).view(-1).nonzero()[:, 0]
        h = f // GROUP
        self.rows.append((j[h] + a).cpu().numpy())
        self.cols.append(row_ids[gi[h] * GROUP + f % GROUP].cpu().numpy())

    def by_row(self) -> tuple[np.ndarray, np.ndarray]:
        """(old row ids, new row ids), sorted by old row."""
        rows = np.concatenate(self.rows) if self.rows else np.empty(0, np.int64)
        cols = np.concatenate(self.cols) if self.cols else np.empty(0, np.int64)
        order = np.argsort(rows, kind="stable")
        return rows[order].astype(np.int64), cols[order].astype(np.int64)


def merged_with_new(x16: np.ndarray, rows: range, base_ids: np.ndarray, base_sims: np.ndarray,
                    pair_rows: np.ndarray, pair_cols: np.ndarray,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows' base lists merged with their new candidates scored exactly: per row the
    first k by sim descending, then id ascending."""
    from graphbuild.graph.exact import _exact_dots_of_rows

    sims = _exact_dots_of_rows(x16, np.arange(rows.start, rows.stop), pair_rows, pair_cols)
    per_row = np.bincount(pair_rows, minlength=len(rows))
    width = int(per_row.max()) if len(pair_rows) else 0
    ids = np.full((len(rows), width), np.iinfo(np.int64).max, np.int64)
    new_sims = np.full((len(rows), width), -np.inf, np.float32)
    order = np.argsort(pair_rows, kind="stable")
    slot = np.arange(len(order)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    ids[pair_rows[order], slot] = pair_cols[order]
    new_sims[pair_rows[order], slot] = sims[order]
    return merge_lists(base_ids, base_sims, ids, new_sims, k)


def update_blocks(run: RunDir, x16: np.ndarray, k: int, rows: range, base_n: int,
                  block_rows: int, device: str | None,
                  reporter) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The shard's rows of the updated graph, (first row, ids, sims) in row order.

    The shard's new rows are searched first (exact.blocked_topk, every other row a plain
    column); their products with the shard's old rows also give those old rows' pairs with
    them (OldRowPairs). Old rows are multiplied only with the new rows other shards search
    (new_candidates); then each block of old rows is merged with its pairs."""
    from graphbuild.graph.exact import blocked_topk, default_device, error_bound, pick_half

    device = device or default_device()
    n = len(x16)
    old, new = range(rows.start, min(rows.stop, base_n)), range(max(rows.start, base_n),
                                                               rows.stop)
    others_new = range(max(rows.stop, base_n), n)
    bound = error_bound(x16, pick_half(device), device=device)
    if len(old):
        base_ids, base_sims = base_lists(run, old.start, old.stop, k)
    pairs = (OldRowPairs(old, base_sims[:, -1], bound, pick_half(device), device)
             if len(old) and len(new) else None)
    if len(new):
        new_ids, new_sims = blocked_topk(x16, k, new, block_rows=block_rows, device=device,
                                         bound=bound, on_progress=reporter.advance,
                                         on_plain_block=pairs)
    pair_rows, pair_cols = pairs.by_row() if pairs else (np.empty(0, np.int64),) * 2
    for lo in range(old.start, old.stop, block_rows):
        hi = min(lo + block_rows, old.stop)
        at = slice(lo - old.start, hi - old.start)
        a, b = np.searchsorted(pair_rows, [lo, hi])
        found_rows, found_cols = [pair_rows[a:b] - lo], [pair_cols[a:b]]
        if len(others_new):
            more = new_candidates(x16, range(lo, hi), others_new, base_sims[at, -1], bound,
                                  device, block_rows)
            found_rows.append(more[0])
            found_cols.append(more[1])
        ids, sims = merged_with_new(x16, range(lo, hi), base_ids[at], base_sims[at],
                                    np.concatenate(found_rows), np.concatenate(found_cols), k)
        reporter.advance(hi - lo)
        kill_point("knn.update_block_merged")
        yield lo, ids, sims
    for lo in range(0, len(new), block_rows):
        yield new.start + lo, new_ids[lo:lo + block_rows], new_sims[lo:lo + block_rows]
