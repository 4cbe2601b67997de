"""The graph on disk: one parquet part per query shard, _meta.json, and a CSR reader.

  graph/part-NNNNN.parquet  node int64, neighbors list<int32> (int64 from 2**31 nodes),
                            sims list<float32>; sorted by node; row groups <= 65,536 rows
  graph/_meta.json          k, metric, method, recall, provenance, counts, shard layout

Every data page carries a CRC32 (Parquet's page checksum), which graphbuild's readers verify
(`PAGE_CHECKS`): a flipped byte in a part is an error, not a wrong neighbour or sim.

A part is written to a temp file and moved into place; the shard's done marker comes after
it, and _meta.json only once every shard of the layout is done. A marker vouches for its part
only while the part's footer holds the rows and edges the marker records (`part_problem`).
Readers trust only a graph that has _meta.json and was built from the run's current store
(`read_meta`), and turn a part that does not read or does not hold its rows into a one-line
error. Every reader of parts reads through one of: `read_graph_csr` (the whole graph as CSR
arrays), `read_row_group` (one row group, as GraphRows and validate stream them),
`read_node_row` (one node's row) and `read_footer` (schema, row groups, statistics).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point
from graphbuild.rundir.files import ParquetRows, atomic_path, read_json
from graphbuild.rundir.paths import PROVENANCE_KEYS, RunDir, store_attrs

log = logging.getLogger(__name__)

ROW_GROUP = 65_536
PAGE_CHECKS = {"page_checksum_verification": True}  # for pq.ParquetFile / pq.read_table
FORMAT_VERSION = 1


def part_path(out: str | Path, shard: int) -> Path:
    return RunDir(out).graph / f"part-{shard:05d}.parquet"


def meta_path(out: str | Path) -> Path:
    return RunDir(out).graph / "_meta.json"


def id_type(n_nodes: int) -> pa.DataType:
    return pa.int32() if n_nodes < 2 ** 31 else pa.int64()


def schema(n_nodes: int) -> pa.Schema:
    return pa.schema([("node", pa.int64()), ("neighbors", pa.list_(id_type(n_nodes))),
                      ("sims", pa.list_(pa.float32()))])


def _table(first: int, ids: np.ndarray, sims: np.ndarray, n_nodes: int) -> pa.Table:
    rows, k = ids.shape
    offsets = pa.array(np.arange(0, rows * k + 1, k, dtype=np.int32))
    id_np = np.int32 if n_nodes < 2 ** 31 else np.int64
    return pa.Table.from_arrays(
        [pa.array(np.arange(first, first + rows, dtype=np.int64)),
         pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1).astype(id_np, copy=False))),
         pa.ListArray.from_arrays(offsets, pa.array(sims.reshape(-1).astype(np.float32)))],
        schema=schema(n_nodes))


def remove_stale_temps(out: str | Path, shard: int) -> None:
    """A killed writer leaves its temp file behind; only this shard's are ours to remove."""
    part = part_path(out, shard)
    for tmp in part.parent.glob(f".{part.name}.tmp-*"):
        log.info("removing %s, left by an interrupted run", tmp)
        tmp.unlink(missing_ok=True)


def write_part(out: str | Path, shard: int, rows: range, n_nodes: int,
               blocks: Iterable[tuple[int, np.ndarray, np.ndarray]]) -> int:
    """Write the part of `rows` from (first row, ids, sims) blocks in row order; return the
    edge count. Blocks are gathered into row groups of ROW_GROUP rows."""
    part = part_path(out, shard)
    remove_stale_temps(out, shard)
    edges, expect = 0, rows.start
    with (atomic_path(part) as tmp,
          # ids and sims rarely repeat: no dictionary pages (graph_choices.txt)
          ParquetRows(tmp, schema(n_nodes), ROW_GROUP, page_checksums=True,
                      after_group=lambda: kill_point("parquet.row_group_written"),
                      dictionary=False) as writer):
        for first, ids, sims in blocks:
            if first != expect:
                raise RuntimeError(f"blocks out of order: got row {first}, wanted {expect}")
            expect += len(ids)
            edges += ids.size
            writer.write_table(_table(first, ids, sims, n_nodes))
        if expect != rows.stop:
            raise RuntimeError(f"part {part.name}: rows end at {expect}, not {rows.stop}")
    return edges


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def footer_problem(path: Path, want: pa.Schema, what: str, first: int,
                   stop: int) -> tuple[str | None, pq.FileMetaData | None]:
    """(what is wrong, None) with a Parquet part that should hold nodes first..stop-1 sorted,
    in `want`'s schema, or (None, its footer). Reads only the footer: the schema, the row
    count and each row group's node range (the first column's min and max statistics)."""
    if not path.is_file():
        return "missing", None
    try:
        md = pq.ParquetFile(path).metadata
        have = md.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as e:
        return f"unreadable ({first_line(e)})", None
    if not have.equals(want):
        return f"schema {have.to_string(show_schema_metadata=False)!r} is not {what}", None
    if md.num_rows != stop - first:
        return f"holds {md.num_rows} rows, not the {stop - first} of nodes {first}..{stop - 1}", None
    row = first
    for g in range(md.num_row_groups):
        group = md.row_group(g)
        stats = group.column(0).statistics
        rows = group.num_rows
        if rows and (stats is None or not stats.has_min_max
                     or (stats.min, stats.max) != (row, row + rows - 1)):
            got = "no statistics" if stats is None or not stats.has_min_max else (
                f"it holds {stats.min}..{stats.max}")
            return f"row group {g} does not hold nodes {row}..{row + rows - 1} ({got})", None
        row += rows
    return None, md


def part_problem(path: Path, first: int, stop: int, edges: int, n_nodes: int) -> str | None:
    """What is wrong with a graph part that should hold rows first..stop-1 and `edges` edges,
    or None. Reads only the footer (footer_problem, then the neighbour count), so checking a
    shard costs no data reads."""
    problem, md = footer_problem(path, schema(n_nodes), "a graph part's", first, stop)
    if problem is not None:
        return problem
    values = sum(md.row_group(g).column(1).num_values for g in range(md.num_row_groups))
    if values != edges:
        return f"holds {values} neighbours, not {edges}"
    return None


def read_meta(out: str | Path) -> dict:
    """graph/_meta.json of a complete graph that was built from the run's current store.

    Every reader of the graph comes through here, so a graph left from embeddings that were
    since replaced (another model, precision, templates or node count) is refused, not read.
    A run whose store is not beside the graph (graph-only copies for a trainer) is checked
    only for its node count against nodes.parquet, when that is there."""
    path = meta_path(out)
    meta = read_json(path)
    if not meta:
        raise GraphbuildError(f"{path}: missing; the graph is not complete (run `graphbuild "
                              "knn` for every shard)")
    check_current(out, meta)
    return meta


def check_current(out: str | Path, meta: dict) -> None:
    """Refuse a graph whose recorded provenance differs from the run's embeddings: every
    provenance key must be recorded on both sides and equal (a key absent from both is not a
    match)."""
    path = meta_path(out)
    attrs = store_attrs(out)
    have = meta.get("provenance")
    if not isinstance(have, dict):
        raise GraphbuildError(f"{path}: no provenance recorded; rebuild the graph with "
                              "`graphbuild knn RUN --overwrite`")
    if attrs is None:
        _check_node_count(out, meta)
        return
    store = RunDir(out).embeddings
    for key in PROVENANCE_KEYS:
        if key not in have:
            raise GraphbuildError(f"{path}: provenance lacks {key}; the graph cannot be checked "
                                  "against the store: rebuild it with `graphbuild knn RUN "
                                  "--overwrite`")
        if key not in attrs:
            raise GraphbuildError(f"{store}: provenance incomplete, attrs lack {key}; embed "
                                  "again into a new --out")
        if key == "n_nodes" and have[key] in attrs.get("appended_at", []):
            raise GraphbuildError(
                f"{path}: built over the first {have[key]} of the {attrs[key]} rows of "
                f"{store}, which was appended to since; update the graph with `graphbuild "
                "knn RUN` (same k)")
        if have[key] != attrs[key]:
            raise GraphbuildError(
                f"{path}: built from embeddings with {key}={have[key]!r}, but {store} now has "
                f"{key}={attrs[key]!r}; the graph is stale: rebuild it with `graphbuild knn "
                "RUN --overwrite`")


def _check_node_count(out: str | Path, meta: dict) -> None:
    """A graph without its store beside it (a graph-only copy for a trainer) can only be
    checked against the nodes table, when that is there."""
    nodes = RunDir(out).nodes
    if not nodes.exists():
        return
    try:
        n = pq.ParquetFile(nodes).metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise GraphbuildError(f"{nodes}: cannot read nodes table: {first_line(e)}") from None
    if n != meta.get("n_nodes"):
        raise GraphbuildError(f"{meta_path(out)}: built over {meta.get('n_nodes')} nodes, "
                              f"{nodes} holds {n}; rebuild the graph")


def read_graph_csr(out: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr int64 (n+1,), indices, sims float32) of a complete graph: row i's neighbours
    are indices[indptr[i]:indptr[i+1]], best first. A part that does not read, or whose rows
    are not the contiguous nodes _meta.json gives it, is a one-line error."""
    meta = read_meta(out)
    n = meta["n_nodes"]
    indptr = np.zeros(n + 1, np.int64)
    indices = np.empty(meta["edges"], np.int32 if n < 2 ** 31 else np.int64)
    sims = np.empty(meta["edges"], np.float32)
    row = edge = 0
    for part in meta["parts"]:
        path = RunDir(out).graph / part["file"]
        for t in _row_groups(path):
            nodes = t.column("node").to_numpy()
            if len(nodes) and (nodes[0] != row or nodes[-1] != row + len(nodes) - 1):
                raise GraphbuildError(f"{path}: rows are not the contiguous nodes from {row}")
            nb = t.column("neighbors").combine_chunks()
            sm = t.column("sims").combine_chunks()
            offsets = nb.offsets.to_numpy().astype(np.int64)
            count = int(offsets[-1] - offsets[0])
            if edge + count > meta["edges"] or row + len(nodes) > n:
                raise GraphbuildError(f"{path}: holds more rows or edges than {meta_path(out)} "
                                      f"says ({n} nodes, {meta['edges']} edges)")
            indptr[row + 1:row + len(nodes) + 1] = edge + offsets[1:] - offsets[0]
            indices[edge:edge + count] = nb.flatten().to_numpy()
            sims[edge:edge + count] = sm.flatten().to_numpy()
            row += len(nodes)
            edge += count
    if row != n or edge != meta["edges"]:
        raise GraphbuildError(f"{meta_path(out)}: says {n} nodes and {meta['edges']} edges, the "
                              f"parts hold {row} and {edge}")
    return indptr, indices, sims


def _row_groups(path: Path) -> Iterator[pa.Table]:
    """The row groups of a part, one at a time, page checksums verified; a part that cannot
    be read (missing, truncated, a page failing its checksum) is a one-line error naming it."""
    for g in range(row_group_count(path)):
        yield read_row_group(path, g)


def read_footer(path: Path) -> pq.FileMetaData:
    """A part's footer: its schema, row groups and their statistics. A part that cannot be
    read is a one-line error naming it."""
    try:
        return pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException) as e:
        raise GraphbuildError(f"{path}: cannot read graph part: {first_line(e)}") from None


def row_group_count(path: Path) -> int:
    return read_footer(path).num_row_groups


def read_row_group(path: Path, g: int) -> pa.Table:
    """Row group g of a part (node, neighbors, sims), its page checksums verified."""
    try:
        return pq.ParquetFile(path, **PAGE_CHECKS).read_row_group(
            g, columns=["node", "neighbors", "sims"])
    except (OSError, pa.ArrowException, KeyError) as e:
        raise GraphbuildError(f"{path}: cannot read graph part: {first_line(e)}") from None


def read_node_row(out: str | Path, meta: dict, node: int) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour ids int64, sims float32) of one node, best first, from the row group of the
    part that holds it (`meta`: from read_meta), its page checksums verified."""
    part = next((p for p in meta["parts"] if p["first"] <= node < p["stop"]), None)
    if part is None:
        raise GraphbuildError(f"{meta_path(out)}: no part holds node {node}")
    path = RunDir(out).graph / part["file"]
    footer = read_footer(path)
    first = part["first"]  # a part's rows are its nodes in order (part_problem, read_graph_csr)
    for g in range(footer.num_row_groups):
        rows = footer.row_group(g).num_rows
        if node < first + rows:
            t = read_row_group(path, g)
            at = node - first
            if t.column("node")[at].as_py() != node:
                raise GraphbuildError(f"{path}: row group {g}, row {at} holds node "
                                      f"{t.column('node')[at].as_py()}, not {node}")
            return (np.asarray(t.column("neighbors")[at].as_py(), np.int64),
                    np.asarray(t.column("sims")[at].as_py(), np.float32))
        first += rows
    raise GraphbuildError(f"{path}: holds no row for node {node}")
