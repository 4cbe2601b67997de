"""Texts to nodes: read a dataset's rows, clean them, deduplicate texts into nodes.

Writes two tables into the run directory:
  nodes.parquet    node (int64), text         one row per unique text, in first-seen order
  samples.parquet  sample (int64), sample_id, node (int64)   one row per source row kept

Node numbering depends only on the source rows and their order, so every shard of every
stage computes the same numbering. Memory does not grow with the dataset: the source is read
a block at a time (sources.py) and texts are deduplicated through hash-partitioned
files in the run's .prepare-tmp/ (dedup.py). Held for the whole source are only a
row offset per file, a row count per block of a text file (8 bytes per MiB, to find a bad
row's line) and, under --skip-bad-rows, the row numbers of the rows dropped for a repeated
sample id (8 bytes each).

Bad rows, each counted once in the figures, in this order: a row lacking the text or label
field (`skipped_missing`: too few fields in CSV or TSV, a JSON key absent or null, a Parquet
null) or lacking a sample id (null, or an empty or blank string); a text that is there but
empty or blank once whitespace is normalised (`skipped_empty`; for labels, a label not in the
class list); then a sample id an earlier kept row had (`skipped_duplicate_ids`). Without
--skip-bad-rows the earliest row of the first two kinds is an error, or else the first repeat.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point
from graphbuild.memory import return_freed_memory
from graphbuild.prepare import dedup, sources
from graphbuild.prepare.manifest import Dataset
from graphbuild.rundir.files import ParquetRows, atomic_path

log = logging.getLogger(__name__)
ROW_GROUP = 65_536
TMP = ".prepare-tmp"  # in the run directory; removed at the end, and at the next start


@dataclass
class TextFigures:
    samples: int
    nodes: int
    duplicates: int
    skipped_missing: int = 0
    skipped_empty: int = 0
    skipped_duplicate_ids: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Layout:
    """Sizes of the bounded steps. They set the memory prepare needs, whatever the dataset's
    size, and never change the tables. Tests force tiny ones."""
    block_bytes: int = sources.BLOCK_BYTES  # text source bytes parsed at once
    batch_rows: int = sources.BATCH_ROWS  # Parquet source rows read at once
    partition_bytes: int = 4 << 20  # source bytes per hash partition...
    max_partitions: int = 512  # ...up to this many; past 2 GiB of source, partitions grow
    partitions: int | None = None  # a fixed count instead
    window_rows: int = 16_384  # row numbers merged at once
    flush_rows: int = dedup.FLUSH_ROWS  # rows held before they go to the partition files

    def partitions_for(self, source_bytes: int) -> int:
        if self.partitions:
            return self.partitions
        return int(min(self.max_partitions, max(1, -(-source_bytes // self.partition_bytes))))


class Rows:
    """The source's rows in order, a batch at a time: g (the row number over all files), id
    (the id column, or g without one) and value (the text or label column, as read).

    An append (extend.py) reads only `files`, the new ones, numbered from `first_row`, with
    `earlier_id_type` (the old rows' id type) in the files' common id type."""

    def __init__(self, ds: Dataset, value_col: str, layout: Layout,
                 files: list[Path] | None = None, first_row: int = 0,
                 earlier_id_type: pl.DataType | None = None):
        m = ds.manifest
        self.ds, self.layout, self.value_col, self.id_col = ds, layout, value_col, m.id_column
        self.files = ds.source_files() if files is None else files
        wanted = list(dict.fromkeys([value_col] + ([m.id_column] if m.id_column else [])))
        self.types = [sources.column_types(ds, f, wanted, layout.block_bytes) for f in self.files]
        self.id_type = pl.Int64
        if m.id_column:  # as a concatenation of the files would have it; integers or strings
            earlier = [] if earlier_id_type is None else [earlier_id_type]
            frames = [pl.DataFrame(schema={"id": t}) for t in
                      [*earlier, *(t[m.id_column] for t in self.types)]]
            self.id_type = pl.concat(frames, how="vertical_relaxed").schema["id"]
            if not self.id_type.is_integer():
                self.id_type = pl.String
        self.source_bytes = sum(sources.data_bytes(ds, f) for f in self.files)
        self.starts: list[int] = []  # each file's first row number
        self.block_rows = [array("q") for _ in self.files]  # rows per block of a text file
        self.first_row = self.count = first_row

    def __iter__(self) -> Iterator[pl.DataFrame]:
        for file, types, block_rows in zip(self.files, self.types, self.block_rows):
            self.starts.append(self.count)
            for df in sources.batches(self.ds, file, types, self.layout.block_bytes,
                                      self.layout.batch_rows, block_rows):
                g = pl.int_range(self.count, self.count + df.height, dtype=pl.Int64)
                ident = pl.col(self.id_col).cast(self.id_type) if self.id_col else g
                yield df.select(g.alias("g"), ident.alias("id"), pl.col(self.value_col).alias("value"))
                self.count += df.height

    def position(self, g: int) -> str:
        """Where row g is, as a user looks it up: its file, and its line or row there."""
        i = bisect_right(self.starts, g) - 1
        place = sources.row_place(self.ds, self.files[i], g - self.starts[i], self.block_rows[i],
                                  self.layout.block_bytes)
        return f"{self.files[i]}: {place}"

    def missing_id(self) -> pl.Expr:
        """A row without a sample id: null, or a string that is empty or blank."""
        if self.id_type == pl.String:
            return pl.col("id").is_null() | (pl.col("id").str.strip_chars() == "")
        return pl.col("id").is_null()


class _BadRows:
    """The rows failing one check: how many, and the first one's row number and value."""

    def __init__(self, what: str):
        self.what, self.count, self.first = what, 0, None

    def note(self, bad: pl.DataFrame) -> None:
        if bad.height and self.first is None:
            self.first = bad.row(0, named=True)
        self.count += bad.height

    def check_or_skip(self, skip: bool, rows: Rows) -> int:
        """Raise for the first bad row, or (skipping) say how many go; return that count."""
        if self.count == 0:
            return 0
        if not skip:
            what = self.what.replace("{value}", repr(self.first.get("value"))[:80])
            raise GraphbuildError(f"{rows.position(self.first['g'])}: {what} "
                                  f"({self.count} such rows; --skip-bad-rows drops them)")
        log.warning("skipping %d rows: %s", self.count, self.what)
        return self.count


def _check_or_skip_all(checks: list[_BadRows], skip: bool, rows: Rows) -> list[int]:
    """Raise for the earliest bad row of any check, or (skipping) each check's count."""
    found = [c for c in checks if c.count]
    if found and not skip:
        min(found, key=lambda c: c.first["g"]).check_or_skip(False, rows)
    return [c.check_or_skip(skip, rows) for c in checks]


def build_tables(ds: Dataset, out: str | Path, skip_bad_rows: bool = False,
                 layout: Layout | None = None) -> TextFigures:
    """Write a dataset's nodes.parquet and samples.parquet into `out` (samples last, each
    through a temp file); return the figures. A bad row raises before either is written."""
    out = Path(out)
    tmp = out / TMP
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    try:
        if ds.manifest.is_labels:
            return _label_tables(ds, out, tmp, skip_bad_rows, layout or Layout())
        return _text_tables(ds, out, tmp, skip_bad_rows, layout or Layout())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        release_memory()


def release_memory() -> None:
    """Hand what the steps freed back to the OS before the model loads: Arrow's pool keeps
    freed blocks, glibc keeps freed heap pages (polars' jemalloc returns them within 1 s)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    return_freed_memory()


@contextlib.contextmanager
def table_writer(path: Path, schema: dict) -> Iterator[Callable[[pl.DataFrame], None]]:
    """A table written in row groups of ROW_GROUP rows through a temp file; then a kill point."""
    with atomic_path(path) as tmp, ParquetRows(tmp, schema, ROW_GROUP) as rows:
        yield rows.write
    kill_point("tables.table_written")


def clean_text(text: pl.Expr) -> pl.Expr:
    """Whitespace runs to one space, ends stripped; null for a text left empty."""
    text = text.cast(pl.Utf8).str.replace_all(r"\s+", " ").str.strip_chars()
    return pl.when(text != "").then(text)


def read_checked(rows: Rows, value: pl.Expr, what: str, kept: dedup.Spill, skip: bool,
                 tmp: Path, layout: Layout,
                 earlier_ids: Callable[[np.ndarray], pl.Series | None] | None = None,
                 ) -> tuple[int, int, np.ndarray]:
    """Stream the source into `kept` as (g, id, value). Bad rows: a row lacking the field or
    a sample id (missing), then a row whose `value` is null (`what`). Raise for the earliest
    bad row, then for the first repeated sample id, unless skipping. Return the counts of
    missing and of bad rows, and the sorted row numbers of repeated ids (dropped).
    `earlier_ids` (an append): given the sorted hashes of these rows' ids, the ids of the
    rows before them with such a hash; a row with one of those ids is a repeat too."""
    name = value.meta.output_name()
    ids = None if rows.id_col is None else dedup.Spill(
        tmp / "ids", layout.partitions_for(rows.source_bytes), "id",
        {"g": pl.Int64, "id": rows.id_type}, layout.flush_rows,
        keep_hashes=earlier_ids is not None)
    no_field = _BadRows(f"missing field {rows.value_col!r}")
    no_id = _BadRows(f"missing sample id in column {rows.id_col!r}")
    bad = _BadRows(what)
    lacking = [(no_field, pl.col("value").is_null())]
    if ids is not None:
        lacking.append((no_id, rows.missing_id()))
    for df in rows:
        for check, missing in lacking:
            check.note(df.filter(missing))
            df = df.filter(~missing)
        df = df.with_columns(value)
        bad.note(df.filter(pl.col(name).is_null()))
        df = df.filter(pl.col(name).is_not_null())
        kept.append(df.select("g", "id", name))
        if ids is not None:
            ids.append(df.select("g", "id"))
    kept.flush()
    n_field, n_id, n_bad = _check_or_skip_all([no_field, no_id, bad], skip, rows)
    if ids is None:
        return n_field + n_id, n_bad, np.empty(0, dtype=np.int64)
    ids.flush()
    seen = None if earlier_ids is None else earlier_ids(ids.key_hashes())
    dropped = dedup.repeated_rows(ids, seen=seen)
    repeated = _BadRows(f"duplicate sample id in column {rows.id_col!r}")
    repeated.note(pl.DataFrame({"g": dropped}))
    repeated.check_or_skip(skip, rows)
    return n_field + n_id, n_bad, dropped


def _text_tables(ds: Dataset, out: Path, tmp: Path, skip: bool, layout: Layout) -> TextFigures:
    m = ds.manifest
    rows = Rows(ds, m.text_column, layout)
    texts = dedup.Spill(tmp / "texts", layout.partitions_for(rows.source_bytes), "text",
                        {"g": pl.Int64, "id": rows.id_type, "text": pl.Utf8}, layout.flush_rows)
    n_missing, n_empty, dropped = read_checked(
        rows, clean_text(pl.col("value")).alias("text"), empty_text(m.text_column), texts, skip,
        tmp, layout)
    n_samples = rows.count - n_missing - n_empty - len(dropped)
    if n_samples == 0:
        raise GraphbuildError(f"{ds.path}: the source holds no rows")

    with table_writer(out / "nodes.parquet", {"node": pl.Int64, "text": pl.Utf8}) as write:
        n_nodes, numbered = dedup.number_nodes(texts, dropped, tmp / "nodes", layout.window_rows,
                                               write)
    _write_samples(out, dedup.in_row_order(numbered, layout.window_rows), rows.id_type)
    return TextFigures(samples=n_samples, nodes=n_nodes, duplicates=n_samples - n_nodes,
                       skipped_missing=n_missing, skipped_empty=n_empty,
                       skipped_duplicate_ids=len(dropped))


def _write_samples(out: Path, frames: Iterator[pl.DataFrame], id_type) -> None:
    """samples.parquet from frames of (id, node) in row order."""
    with table_writer(out / "samples.parquet", samples_schema(id_type)) as write:
        write_samples(write, frames)


def samples_schema(id_type: pl.DataType) -> dict:
    return {"sample": pl.Int64, "sample_id": id_type, "node": pl.Int64}


def write_samples(write: Callable[[pl.DataFrame], None], frames: Iterator[pl.DataFrame],
                  first_sample: int = 0) -> int:
    """Frames of (id, node) in row order to `write` as samples numbered from first_sample;
    returns how many."""
    n = first_sample
    for df in frames:
        write(df.select(pl.int_range(n, n + df.height, dtype=pl.Int64).alias("sample"),
                        pl.col("id").alias("sample_id"), "node"))
        n += df.height
    return n - first_sample


def class_nodes(ds: Dataset) -> pl.DataFrame:
    """A label dataset's nodes table: its classes, in list order."""
    entries = ds.class_entries()
    return pl.DataFrame({
        "node": pl.Series(range(len(entries)), dtype=pl.Int64),
        "text": [" ".join(e.name.split()) for e in entries],
        "key": [e.key for e in entries],
    }, schema={"node": pl.Int64, "text": pl.Utf8, "key": pl.Utf8})


def label_node(ds: Dataset) -> pl.Expr:
    """A label (column "value") to its class's node, null for a label not in the list."""
    entries = ds.class_entries()
    lookup: dict[str, int] = {}
    for i, e in enumerate(entries):  # index, then key, then name; first spelling wins
        lookup.setdefault(str(i), i)
    for i, e in enumerate(entries):
        if e.key:
            lookup.setdefault(e.key, i)
    for i, e in enumerate(entries):
        lookup.setdefault(e.name, i)
    return (pl.col("value").cast(pl.Utf8).str.strip_chars()
            .replace_strict(lookup, default=None, return_dtype=pl.Int64).alias("node"))


def _label_tables(ds: Dataset, out: Path, tmp: Path, skip: bool, layout: Layout) -> TextFigures:
    nodes = class_nodes(ds)
    if ds.manifest.source is None:  # the classes themselves are the samples
        samples = nodes.select(pl.coalesce("key", pl.col("node").cast(pl.Utf8)).alias("id"), "node")
        with table_writer(out / "nodes.parquet", nodes.schema) as write:
            write(nodes)
        _write_samples(out, iter([samples]), pl.Utf8)
        return TextFigures(samples=nodes.height, nodes=nodes.height, duplicates=0)
    col = ds.manifest.label_column
    rows = Rows(ds, col, layout)
    kept = dedup.Spill(tmp / "kept", 1, None, {"g": pl.Int64, "id": rows.id_type, "node": pl.Int64},
                       layout.flush_rows)
    n_missing, n_bad, dropped = read_checked(rows, label_node(ds), not_a_class(col), kept, skip,
                                             tmp, layout)

    with table_writer(out / "nodes.parquet", nodes.schema) as write:
        write(nodes)
    used = np.zeros(nodes.height, dtype=bool)

    def kept_rows() -> Iterator[pl.DataFrame]:
        for df in dedup.segments(kept.path(0)):
            df = dedup.without(df, dropped)
            used[df["node"].to_numpy()] = True
            yield df

    _write_samples(out, kept_rows(), rows.id_type)
    n_samples = rows.count - n_missing - n_bad - len(dropped)
    return TextFigures(samples=n_samples, nodes=nodes.height,
                       duplicates=n_samples - int(used.sum()), skipped_missing=n_missing,
                       skipped_empty=n_bad, skipped_duplicate_ids=len(dropped))


def empty_text(col: str) -> str:
    """What a bad row of a text dataset is."""
    return f"empty text in column {col!r}"


def not_a_class(col: str) -> str:
    """What a bad row of a label dataset is ({value} is the label)."""
    return f"label {{value}} in column {col!r} is not in the class list"


def read_node_texts(run_dir: Path, start: int, stop: int) -> list[str]:
    """Texts of nodes [start, stop), read without loading the whole table."""
    lf = pl.scan_parquet(run_dir / "nodes.parquet").slice(start, stop - start)
    return lf.select("text").collect()["text"].to_list()
