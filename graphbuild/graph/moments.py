"""Row moments, over every pair without a pair's product, from one pass over the store
(rundir/moments.py: the file and what it holds). With the store's unit rows x_i (X, n x d) and their cosines s_ij = x_i . x_j:

  t = sum of all rows,  G = X^T X (d x d),  U = G's top r eigenvectors (d x r),
  p_i = U^T x_i (the row's coordinates on the store's top r principal axes, uncentred),
  e_ij = s_ij - p_i . p_j = y_i . y_j with y_i = Q x_i, Q = I - U U^T (the residual),
  sum_j e_ij   = y_i . (Q t) - y_i . y_i
  sum_j e_ij^2 = y_i^T (Q G Q) y_i - (y_i . y_i)^2          (sums over j != i)

so t and G (one pass over the store) give every row's sums without the N x N products a
search makes. t and G are accumulated store chunk by store chunk in chunk order, and a row's
values are computed with its whole block of ROW_BLOCK rows, so the bytes do not depend on the
shard layout.

The d x d work runs in float32 (two to four times float64's speed on CPUs, where it is most of
an exact update's fixed cost): a chunk's X^T X in float32 (the products of fp16 values are
exact there; a chunk's sums round to about 1e-7 relative), summed over chunks in float64; the
quadratic form y_i^T (Q G Q) y_i in float32. Every other step, and every sum, is float64, all
in torch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from graphbuild.faults import kill_point
from graphbuild.rundir.files import marker, read_json, read_marker, write_json
from graphbuild.rundir.moments import (
    RANK,
    RowMoments,
    moments_meta,
    moments_meta_path,
    moments_part_path,
    moments_part_problem,
    write_moments_part,
)
from graphbuild.rundir.paths import RunDir
from graphbuild.rundir.store import StoredRows
from graphbuild.shards import shard_name, shard_range

log = logging.getLogger(__name__)

ROW_BLOCK = 1024  # rows in each of row_moments' products, aligned to the store's chunks


def store_sums(store: StoredRows) -> tuple[np.ndarray, np.ndarray]:
    """(t, G): the sum of all rows (d,) and their Gram matrix X^T X (d, d), float64 (each
    chunk's X^T X in float32)."""
    import torch

    d = store.shape[1]
    total, gram = torch.zeros(d, dtype=torch.float64), torch.zeros((d, d), dtype=torch.float64)
    for c in range(store.n_chunks):
        x = torch.from_numpy(store.chunk(c)).float()
        total += x.sum(dim=0, dtype=torch.float64)
        gram += (x.T @ x).double()
    return total.numpy(), gram.numpy()


def principal_axes(gram: np.ndarray, rank: int = RANK) -> np.ndarray:
    """G's top `rank` eigenvectors (d, r), by eigenvalue, each signed so that its largest
    entry is positive (the same axes for the same G). On one thread: a d x d eigh takes
    milliseconds there, while its threads waiting on each other on a busy machine took
    seconds."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, vectors = torch.linalg.eigh(torch.from_numpy(gram))
    finally:
        torch.set_num_threads(threads)
    axes = vectors.numpy()[:, ::-1][:, :min(rank, len(gram))]
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(axes.shape[1])])
    return np.ascontiguousarray(axes * signs)


def row_moments(store: StoredRows, rows: range, total: np.ndarray, gram: np.ndarray,
                axes: np.ndarray) -> RowMoments:
    """Each node of `rows`: its coordinates on `axes`, and the sum and sum of squares of its
    residual cosines to every other node. Q is symmetric and idempotent and U^T U = I, so
    y_i . (Q t) = x_i . (Q t), y_i . y_i = |x_i|^2 - |p_i|^2 and y_i^T (Q G Q) y_i =
    x_i^T (Q G Q) x_i: no row's residual y_i is formed. p_i and x_i . (Q t) come from one
    float64 product with [U | Q t]."""
    import torch

    u = torch.from_numpy(axes)
    resid = torch.eye(len(gram), dtype=torch.float64) - u @ u.T  # Q
    u_and_q_total = torch.cat([u, (resid @ torch.from_numpy(total))[:, None]], dim=1)
    q_gram = (resid @ torch.from_numpy(gram) @ resid).float()
    r = u.shape[1]
    proj = np.empty((len(rows), r))
    sums, sum_sqs = np.empty(len(rows)), np.empty(len(rows))
    for first, lo, hi, x16 in _row_blocks(store, rows):
        x = x16.double()
        p_and_t = x @ u_and_q_total
        p = p_and_t[:, :r]
        own = (x * x).sum(dim=1) - (p * p).sum(dim=1)  # e_ii = |y_i|^2
        x32 = x16.float()
        quad = ((x32 @ q_gram) * x32).sum(dim=1).double()
        have, to = slice(lo - first, hi - first), slice(lo - rows.start, hi - rows.start)
        proj[to] = p[have].numpy()
        sums[to] = (p_and_t[have, r] - own[have]).numpy()
        sum_sqs[to] = (quad[have] - own[have] ** 2).numpy()
    return RowMoments(proj, sums, sum_sqs)


def _row_blocks(store: StoredRows, rows: range):
    """(first row of the block, first and stop row wanted from it, the block's fp16 rows as a
    tensor) for the ROW_BLOCK-aligned blocks of the store that hold `rows`. A block is always
    computed whole, so a row's values do not depend on where a shard starts; blocks smaller
    than a chunk keep row_moments' temporaries in cache (at 1M rows, about a fifth less time
    than whole 8,192-row chunks: graph_choices.txt)."""
    import torch

    size = store.chunk_rows
    for c in range(rows.start // size, -(-rows.stop // size)):
        chunk = torch.from_numpy(store.chunk(c))
        for b in range(c * size + (max(rows.start - c * size, 0) // ROW_BLOCK) * ROW_BLOCK,
                       min(rows.stop, c * size + len(chunk)), ROW_BLOCK):
            block = chunk[b - c * size:b - c * size + ROW_BLOCK]
            yield b, max(rows.start, b), min(rows.stop, b + len(block)), block


def moments_marker(run: RunDir, shard: int, num_shards: int) -> Path:
    return marker(run.state("knn"), f"moments-{shard_name(shard, num_shards)}")


def vouched_moments(run: RunDir, shard: int, num_shards: int, provenance: dict,
                    n: int) -> tuple[dict | None, str | None]:
    """(the marker's stats, None) when shard's moments marker vouches for its part: it reads,
    records the store's provenance and the shard's rows, and the part's footer holds those
    rows. Otherwise (None, why not); why not is None when there is no marker."""
    path = moments_marker(run, shard, num_shards)
    stats, why_not = read_marker(path)
    if stats is None:
        return None, why_not
    rows = shard_range(n, shard, num_shards)
    rank = min(RANK, provenance["dim"])
    want = {"first": rows.start, "stop": rows.stop, "n_nodes": n, "rank": rank,
            "provenance": provenance}
    for key, value in want.items():
        if stats.get(key) != value:
            return None, f"{path}: records another {key} than this shard's"
    part = moments_part_path(run.root, shard)
    problem = moments_part_problem(part, rows.start, rows.stop, rank)
    if problem:
        return None, f"{part}: {problem}, not what {path.name} records"
    return stats, None


def moments_shard(run: RunDir, store: StoredRows, shard: int, num_shards: int,
                  provenance: dict) -> float:
    """Make shard's moments part vouched for (under the shard's lock): nothing to do if its
    marker vouches for it; else remove _moments/_meta.json and the marker, compute and write
    the part, then the marker. Returns the seconds it took (0.0 when already done)."""
    n = store.shape[0]
    stats, why_not = vouched_moments(run, shard, num_shards, provenance, n)
    if stats is not None:
        return 0.0
    with run.lock():
        moments_meta_path(run.root).unlink(missing_ok=True)
        if why_not is not None:
            log.warning("knn moments of %s: %s; computing them again",
                        shard_name(shard, num_shards), why_not)
            moments_marker(run, shard, num_shards).unlink(missing_ok=True)
    t0 = time.perf_counter()
    rows = shard_range(n, shard, num_shards)
    total, gram = store_sums(store)
    write_moments_part(run.root, shard, rows.start,
                       row_moments(store, rows, total, gram, principal_axes(gram)))
    seconds = time.perf_counter() - t0
    kill_point("knn.moments_written")  # part in place, marker not yet
    write_json(moments_marker(run, shard, num_shards),
               {"first": rows.start, "stop": rows.stop, "rows": len(rows), "n_nodes": n,
                "rank": min(RANK, provenance["dim"]), "provenance": provenance,
                "seconds": round(seconds, 3)})
    log.info("knn moments of %s: %d rows in %.1fs", shard_name(shard, num_shards), len(rows),
             seconds)
    return seconds


def finalize_moments(run: RunDir, num_shards: int, provenance: dict,
                     n: int) -> tuple[list[int], float]:
    """Under the run's lock: write _moments/_meta.json when every shard's marker vouches for
    its part (and it differs), else remove it. Returns the shards whose moments are not done
    and the seconds the done ones took."""
    done = {}
    for s in range(num_shards):
        stats, why_not = vouched_moments(run, s, num_shards, provenance, n)
        if stats is not None:
            done[s] = stats
        elif why_not is not None:
            log.warning("knn moments of %s: %s; its rerun computes them again",
                        shard_name(s, num_shards), why_not)
    missing = [s for s in range(num_shards) if s not in done]
    seconds = sum(st.get("seconds", 0.0) for st in done.values())
    path = moments_meta_path(run.root)
    if missing:
        path.unlink(missing_ok=True)
        return missing, seconds
    parts = [{"file": moments_part_path(run.root, s).name, "first": st["first"],
              "stop": st["stop"]} for s, st in sorted(done.items())]
    meta = moments_meta(n, min(RANK, provenance["dim"]), provenance, parts)
    if read_json(path) != meta:
        write_json(path, meta)
        kill_point("knn.moments_meta_written")
    return missing, seconds
