"""An append's tables from its new source files alone, extending the run's own tables.

An append's tables are those of a from-scratch build over the old files then the new ones
(append.py). The old files come first, so that build's old rows, nodes and samples are the
run's, and what it does with a new row depends on the old rows only through what the run's
tables hold:
- Row numbers: the new files' rows are numbered after the old files' rows, which run.json's
  figures count (samples plus skipped rows). Without an id column these are the new
  samples' ids.
- Repeated sample ids: a new row whose id an old sample has (samples.parquet) or an earlier
  new row has is a repeat, as in the from-scratch build: one line naming the first such
  row, or dropped under --skip-bad-rows. An old row dropped for its id had an old sample's
  id, so it adds nothing.
- Nodes: a new text equal to an old node's text (nodes.parquet; both whitespace-normalised
  as texts.py does) is that node; the other new texts are numbered after the old nodes, in
  first-seen order (dedup.number_nodes with `known`). Label datasets keep the class nodes.
- Tables: the old tables' rows, copied, then the new rows, through the same writer, so the
  files' bytes are a from-scratch build's.

The old source files are not opened; the old tables are read column-wise, a row group at a
time, checked to be numbered 0, 1, 2, ... with the recorded row counts. Held in memory
besides what a from-scratch build holds: 8 bytes per new row (the hash of its text; of its
id too), and the old nodes and ids whose hashes match those (each then compared whole).

`CannotExtend` (append.py then builds over every file, as before, and logs why), before
anything is written:
- run.json's figures lack the skipped-row counts, so the new rows' numbers are unknown;
- the run skipped bad rows and this append does not give --skip-bad-rows: the from-scratch
  build stops at the first old bad row, which only the old files can name;
- the new files' ids change the files' common id type (say strings after integers): the
  from-scratch build reads the old ids as another type.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from graphbuild.errors import GraphbuildError
from graphbuild.prepare import dedup
from graphbuild.prepare.manifest import Dataset
from graphbuild.prepare.texts import (
    ROW_GROUP,
    TMP,
    Layout,
    Rows,
    TextFigures,
    class_nodes,
    clean_text,
    empty_text,
    label_node,
    not_a_class,
    read_checked,
    release_memory,
    samples_schema,
    table_writer,
    write_samples,
)
from graphbuild.rundir.paths import RunDir

SKIPPED = ("skipped_missing", "skipped_empty", "skipped_duplicate_ids")


class CannotExtend(Exception):
    """This append's tables cannot be derived from the run's tables alone (why, in words)."""


def extend_tables(ds: Dataset, run: RunDir, out: Path, old: dict, files: list[Path],
                  skip_bad_rows: bool, layout: Layout | None = None) -> TextFigures:
    """Write into `out` the tables of the run (figures `old`) with the source files `files`
    appended (the module docstring's rules); return the appended tables' figures. A bad new
    row raises before either table is written; CannotExtend before anything is."""
    layout = layout or Layout()
    first_row = _first_new_row(old, skip_bad_rows)
    old_id_type = pl.read_parquet_schema(run.samples)["sample_id"]
    m = ds.manifest
    rows = Rows(ds, m.label_column if m.is_labels else m.text_column, layout, files, first_row,
                old_id_type)
    if rows.id_type != old_id_type:
        raise CannotExtend(f"the new files' ids make the sample ids {rows.id_type}, the run's "
                           f"are {old_id_type}")
    tmp = out / TMP
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed append
    try:
        if m.is_labels:
            return _extend_labels(ds, run, out, tmp, rows, old, skip_bad_rows, layout)
        return _extend_texts(ds, run, out, tmp, rows, old, skip_bad_rows, layout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        release_memory()


def _first_new_row(old: dict, skip: bool) -> int:
    """The from-scratch row number of the first new row: the old files' row count."""
    if any(key not in old for key in SKIPPED):
        raise CannotExtend("its run.json figures do not count the rows it skipped, so the new "
                           "rows' numbers are unknown")
    skipped = sum(old[key] for key in SKIPPED)
    if skipped and not skip:
        raise CannotExtend(f"it skipped {skipped} bad rows and this append does not give "
                           "--skip-bad-rows; only the old files name the first of them")
    return old["samples"] + skipped


def _extend_texts(ds: Dataset, run: RunDir, out: Path, tmp: Path, rows: Rows, old: dict,
                  skip: bool, layout: Layout) -> TextFigures:
    texts = dedup.Spill(tmp / "texts", layout.partitions_for(rows.source_bytes), "text",
                        {"g": pl.Int64, "id": rows.id_type, "text": pl.Utf8}, layout.flush_rows,
                        keep_hashes=True)
    n_missing, n_empty, dropped = read_checked(
        rows, clean_text(pl.col("value")).alias("text"), empty_text(ds.manifest.text_column),
        texts, skip, tmp, layout, _old_ids_matching(run, old) if rows.id_col else None)
    with table_writer(out / "nodes.parquet", {"node": pl.Int64, "text": pl.Utf8}) as write:
        among, known = _HashSet(texts.key_hashes()), []
        for t in old_rows(run.nodes, "node", old["nodes"], ["node", "text"]):
            write(t)
            df = pl.from_arrow(t).select("text", "node")
            known.append(df.filter(among.holds(df["text"].hash())))
        del among
        known = pl.concat(known) if known else pl.DataFrame(schema={"text": pl.Utf8,
                                                                     "node": pl.Int64})
        n_nodes, numbered = dedup.number_nodes(texts, dropped, tmp / "nodes", layout.window_rows,
                                               write, known, old["nodes"])
    with table_writer(out / "samples.parquet", samples_schema(rows.id_type)) as write:
        _copy_samples(run, old, rows, write)
        new = write_samples(write, dedup.in_row_order(numbered, layout.window_rows),
                            old["samples"])
    samples = old["samples"] + new
    return TextFigures(samples=samples, nodes=n_nodes, duplicates=samples - n_nodes,
                       **_skipped(old, n_missing, n_empty, dropped))


def _extend_labels(ds: Dataset, run: RunDir, out: Path, tmp: Path, rows: Rows, old: dict,
                   skip: bool, layout: Layout) -> TextFigures:
    nodes = class_nodes(ds)
    kept = dedup.Spill(tmp / "kept", 1, None,
                       {"g": pl.Int64, "id": rows.id_type, "node": pl.Int64}, layout.flush_rows)
    n_missing, n_bad, dropped = read_checked(
        rows, label_node(ds), not_a_class(ds.manifest.label_column), kept, skip, tmp, layout,
        _old_ids_matching(run, old) if rows.id_col else None)
    with table_writer(out / "nodes.parquet", nodes.schema) as write:
        write(nodes)
    used = np.zeros(nodes.height, dtype=bool)  # classes some sample has

    def new_rows() -> Iterator[pl.DataFrame]:
        for df in dedup.segments(kept.path(0)):
            df = dedup.without(df, dropped)
            used[df["node"].to_numpy()] = True
            yield df

    with table_writer(out / "samples.parquet", samples_schema(rows.id_type)) as write:
        _copy_samples(run, old, rows, write, used)
        new = write_samples(write, new_rows(), old["samples"])
    samples = old["samples"] + new
    return TextFigures(samples=samples, nodes=nodes.height, duplicates=samples - int(used.sum()),
                       **_skipped(old, n_missing, n_bad, dropped))


def _skipped(old: dict, missing: int, empty: int, dropped: np.ndarray) -> dict:
    return {"skipped_missing": old["skipped_missing"] + missing,
            "skipped_empty": old["skipped_empty"] + empty,
            "skipped_duplicate_ids": old["skipped_duplicate_ids"] + len(dropped)}


def _copy_samples(run: RunDir, old: dict, rows: Rows, write: Callable[[pl.DataFrame], None],
                  used: np.ndarray | None = None) -> None:
    """The old samples to `write`; checks their nodes are the old nodes' (and, where ids are
    row numbers, that they precede the new rows'); `used` gets the classes they have."""
    n_nodes = old["nodes"] if used is None else len(used)
    for t in old_rows(run.samples, "sample", old["samples"], ["sample", "sample_id", "node"]):
        node = t.column("node").to_numpy()
        if node.min() < 0 or node.max() >= n_nodes:
            raise GraphbuildError(f"{run.samples}: a sample of node {node.max()} or "
                                  f"{node.min()}, outside the run's {n_nodes} nodes; the "
                                  "table is damaged: rebuild into another --out")
        last_id = t.column("sample_id")[-1].as_py()  # row numbers: increasing
        if rows.id_col is None and last_id >= rows.first_row:
            raise GraphbuildError(f"{run.samples}: sample id {last_id}, not a row of the "
                                  f"{rows.first_row} rows run.json's figures count; "
                                  "rebuild into another --out")
        if used is not None:
            used[node] = True
        write(t)


def old_rows(path: Path, numbered: str, count: int,
             columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A run's table (`columns` of it) a row group at a time, checked: column `numbered` is
    0, 1, 2, ... in order, and there are `count` rows (run.json's figure)."""
    import pyarrow.parquet as pq

    n = 0
    f = pq.ParquetFile(path)
    try:
        for batch in f.iter_batches(batch_size=ROW_GROUP, columns=columns):
            if not np.array_equal(batch.column(numbered).to_numpy(),
                                  np.arange(n, n + batch.num_rows)):
                raise GraphbuildError(f"{path}: column {numbered!r} is not the row number "
                                      f"in rows {n} to {n + batch.num_rows - 1}; the table is "
                                      "damaged: rebuild into another --out")
            n += batch.num_rows
            yield pa.Table.from_batches([batch])
    finally:
        f.close()
    if n != count:
        raise GraphbuildError(f"{path}: holds {n} rows, run.json records {count}; rebuild "
                              "into another --out")


def _old_ids_matching(run: RunDir, old: dict) -> Callable[[np.ndarray], pl.Series | None]:
    """For read_checked: the old samples' ids whose hash is among the given sorted hashes."""

    def matching(hashes: np.ndarray) -> pl.Series | None:
        among = _HashSet(hashes)
        found = []
        for t in old_rows(run.samples, "sample", old["samples"], ["sample", "sample_id"]):
            ids = pl.from_arrow(t.column("sample_id"))
            found.append(ids.filter(among.holds(ids.hash())))
        return pl.concat(found) if found else None

    return matching


class _HashSet:
    """Sorted distinct hashes, looked up a batch at a time: a bitmap of their low bits (one
    to two bytes per hash) rules most other hashes out, a binary search settles the rest."""

    def __init__(self, sorted_hashes: np.ndarray):
        self.sorted = sorted_hashes
        bits = max(16, (8 * len(sorted_hashes)).bit_length())  # 8 to 16 slots a hash
        self.mask = np.uint64((1 << bits) - 1)
        self.bitmap = np.zeros(1 << (bits - 3), dtype=np.uint8)
        slot = sorted_hashes & self.mask
        np.bitwise_or.at(self.bitmap, slot >> np.uint64(3),
                         (1 << (slot & np.uint64(7))).astype(np.uint8))

    def holds(self, hashes: pl.Series) -> pl.Series:
        """Whether each hash is one of the set's."""
        h = hashes.to_numpy()
        slot = h & self.mask
        maybe = np.flatnonzero((self.bitmap[slot >> np.uint64(3)] >> (slot & np.uint64(7))
                                .astype(np.uint8)) & 1)
        out = np.zeros(len(h), dtype=bool)
        if len(maybe):
            at = np.minimum(np.searchsorted(self.sorted, h[maybe]), len(self.sorted) - 1)
            out[maybe] = self.sorted[at] == h[maybe]
        return pl.Series(out)
