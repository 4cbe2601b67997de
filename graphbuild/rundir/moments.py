"""Row moments: per node, where it sits on the store's top principal axes and the moments of
the rest of its cosines to every other node.

Graph-mode targets fill the pairs the top-k graph does not hold from these (xclr/graph.py):
a pair's fill is p_i . p_j plus a per-row term from the moments of row i's residual cosines
to the nodes it does not hold (its sums less its held pairs'). The knn stage writes them
beside the graph (graph/moments.py computes them), one part per knn shard:

  graph/_moments/part-NNNNN.parquet  node int64; proj fixed_size_list<float32>[r]: p_i = U^T
                            x_i, the row's coordinates on the top r eigenvectors U of X^T X
                            (uncentred principal axes of the store's rows X); sum, sum_sq
                            float64: over every other node j, the sum of e_ij and of e_ij ** 2,
                            e_ij = s_ij - p_i . p_j the residual of the cosine s_ij (float64
                            products of the stored fp16 rows); sorted by node; page checksums
  graph/_moments/_meta.json  n_nodes, rank r, provenance (the store's, as graph/_meta.json
                            records it), the parts and their rows; written once every shard's
                            marker (_state/knn/moments-shard-*.done) vouches for its part

They depend on the store alone (not on k or the method), and sit under a name starting with
"_" so that readers of graph/ as a Parquet dataset see only the graph's parts. A reader
(`read_moments`) trusts them only when _meta.json's provenance equals the graph's, which
read_meta checks against the store, and reads every part with its page checksums verified.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point
from graphbuild.rundir.files import ParquetRows, atomic_path, read_json
from graphbuild.rundir.graph import (
    PAGE_CHECKS,
    ROW_GROUP,
    first_line,
    footer_problem,
    meta_path,
    read_meta,
)
from graphbuild.rundir.paths import RunDir

FORMAT_VERSION = 1
RANK = 16  # principal axes per row: KL(exact || graph) falls with r (benchmarks/results)
REDO = "rerun `graphbuild knn RUN` with the graph's settings (it adds them, keeping the graph)"


class RowMoments(NamedTuple):
    """Per node: proj (n, r) coordinates on the principal axes; sum and sum_sq (n,) of its
    residual cosines to every other node."""
    proj: np.ndarray
    sum: np.ndarray
    sum_sq: np.ndarray


def schema(rank: int) -> pa.Schema:
    return pa.schema([("node", pa.int64()), ("proj", pa.list_(pa.float32(), rank)),
                      ("sum", pa.float64()), ("sum_sq", pa.float64())])


def moments_dir(out: str | Path) -> Path:
    return RunDir(out).graph / "_moments"


def moments_part_path(out: str | Path, shard: int) -> Path:
    return moments_dir(out) / f"part-{shard:05d}.parquet"


def moments_meta_path(out: str | Path) -> Path:
    return moments_dir(out) / "_meta.json"


def write_moments_part(out: str | Path, shard: int, first: int, rows: RowMoments) -> None:
    """Write shard's part: nodes first..first+len(rows.sum)-1, atomically."""
    path = moments_part_path(out, shard)
    n, rank = rows.proj.shape
    proj = pa.FixedSizeListArray.from_arrays(
        pa.array(np.asarray(rows.proj, np.float32).reshape(-1)), rank)
    table = pa.Table.from_arrays(
        [pa.array(np.arange(first, first + n, dtype=np.int64)), proj,
         pa.array(np.asarray(rows.sum, np.float64)), pa.array(np.asarray(rows.sum_sq, np.float64))],
        schema=schema(rank))
    with (atomic_path(path) as tmp,
          # node ids and floats rarely repeat: no dictionary pages
          ParquetRows(tmp, schema(rank), ROW_GROUP, page_checksums=True,
                      after_group=lambda: kill_point("parquet.row_group_written"),
                      dictionary=False) as writer):
        writer.write_table(table)


def moments_part_problem(path: Path, first: int, stop: int, rank: int) -> str | None:
    """What is wrong with a part that should hold nodes first..stop-1 at `rank`, or None.
    Reads the footer only (rundir.graph.footer_problem)."""
    return footer_problem(path, schema(rank), f"a moments part's of rank {rank}", first, stop)[0]


def moments_meta(n_nodes: int, rank: int, provenance: dict, parts: list[dict]) -> dict:
    """graph/_moments/_meta.json's content. parts: {file, first, stop} in node order."""
    return {"format_version": FORMAT_VERSION, "n_nodes": n_nodes, "rank": rank,
            "provenance": provenance, "parts": parts,
            "values": "per node i: proj p_i = U^T x_i (U: top rank eigenvectors of X^T X); "
                      "over every other node j, sum of e_ij and of e_ij ** 2, e_ij = s_ij - "
                      "p_i . p_j, s_ij the float64 dot product of the stored fp16 rows"}


def check_moments(out: str | Path) -> dict:
    """graph/_moments/_meta.json, checked: present, of this format, over the graph's nodes and
    built from the embeddings the graph was (read_meta refuses a graph of other embeddings).
    A missing or stale file is a one-line GraphbuildError saying what to do."""
    path = moments_meta_path(out)
    graph = read_meta(out)
    have = read_json(path)
    if not have:
        raise GraphbuildError(f"{path}: missing: the graph's row moments are not there (a "
                              f"graph built before they were, or not finished); {REDO}")
    if have.get("format_version") != FORMAT_VERSION:
        raise GraphbuildError(f"{path}: format_version {have.get('format_version')!r}, this "
                              f"graphbuild reads {FORMAT_VERSION}; {REDO}")
    if have.get("n_nodes") != graph["n_nodes"]:
        raise GraphbuildError(f"{path}: over {have.get('n_nodes')} nodes, {meta_path(out)} "
                              f"over {graph['n_nodes']}; {REDO}")
    if have.get("provenance") != graph["provenance"]:
        key = next((k for k in graph["provenance"]
                    if (have.get("provenance") or {}).get(k) != graph["provenance"][k]), None)
        raise GraphbuildError(f"{path}: built from other embeddings than {meta_path(out)} "
                              f"({key} differs); they are stale: {REDO}")
    return have


def read_moments(out: str | Path) -> RowMoments:
    """The row moments of the run's graph, checked (check_moments), each part read with its
    page checksums verified and holding the nodes _meta.json gives it."""
    meta = check_moments(out)
    n, rank = meta["n_nodes"], meta.get("rank")
    if not isinstance(rank, int) or rank < 0:
        raise GraphbuildError(f"{moments_meta_path(out)}: rank {rank!r} is not a count; {REDO}")
    rows = RowMoments(np.empty((n, rank), np.float32), np.empty(n), np.empty(n))
    row = 0
    for part in meta["parts"]:
        path = moments_dir(out) / part["file"]
        first, stop = part["first"], part["stop"]
        if first != row or not first < stop <= n:
            raise GraphbuildError(f"{moments_meta_path(out)}: parts do not cover nodes "
                                  f"0..{n - 1} in order (at {part['file']}); {REDO}")
        table = _read_part(path, rank)
        if not np.array_equal(table.column("node").to_numpy(), np.arange(first, stop)):
            raise GraphbuildError(f"{path}: does not hold nodes {first}..{stop - 1} in order; "
                                  f"{REDO}")
        proj = table.column("proj").combine_chunks().flatten().to_numpy()
        rows.proj[first:stop] = proj.reshape(stop - first, rank)
        rows.sum[first:stop] = table.column("sum").to_numpy()
        rows.sum_sq[first:stop] = table.column("sum_sq").to_numpy()
        row = stop
    if row != n:
        raise GraphbuildError(f"{moments_meta_path(out)}: parts end at node {row}, the graph "
                              f"has {n}; {REDO}")
    finite = np.isfinite(rows.proj).all(axis=1) & np.isfinite(rows.sum) & np.isfinite(
        rows.sum_sq)
    if not finite.all():
        raise GraphbuildError(f"{moments_dir(out)}: node {int(np.flatnonzero(~finite)[0])}'s "
                              f"moments are not finite; {REDO}")
    return rows


def _read_part(path: Path, rank: int) -> pa.Table:
    """A part's table, page checksums verified, of a moments part's schema at `rank`."""
    try:
        table = pq.read_table(path, **PAGE_CHECKS)
    except (OSError, pa.ArrowException) as e:
        raise GraphbuildError(f"{path}: cannot read row moments: {first_line(e)}; "
                              f"{REDO}") from None
    if not table.schema.equals(schema(rank)):
        raise GraphbuildError(f"{path}: not a moments part of rank {rank} (schema); {REDO}")
    return table
