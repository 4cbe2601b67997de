"""Texts to nodes: read a dataset's rows, clean them, deduplicate texts into nodes.

Writes two tables into the run directory:
  nodes.parquet    node (int64), text         one row per unique text, in first-seen order
  samples.parquet  sample (int64), sample_id, node (int64)   one row per source row

Node numbering depends only on the source rows and their order, so every shard of every
stage computes the same numbering.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point
from graphbuild.manifest import Dataset
from graphbuild.storage import atomic_path

log = logging.getLogger(__name__)
ROW_GROUP = 65_536


@dataclass
class TextFigures:
    samples: int
    nodes: int
    duplicates: int
    skipped_empty: int = 0
    skipped_duplicate_ids: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _position(ds: Dataset, files: list[Path], file_idx: int, row: int) -> str:
    """Where a 0-based data row lives, as a user would look it up."""
    file = files[file_idx]
    fmt = ds.source_format(file)
    if fmt == "parquet":
        return f"{file}: row {row}"
    header = 1 if fmt in ("csv", "tsv") and ds.manifest.source.has_header else 0
    return f"{file}: line {row + 1 + header}"


def _read_file(ds: Dataset, file: Path, wanted: list[str]) -> pl.DataFrame:
    src = ds.manifest.source
    fmt = ds.source_format(file)
    try:
        if fmt == "parquet":
            lf = pl.scan_parquet(file)
        elif fmt == "jsonl":
            lf = pl.scan_ndjson(file, infer_schema_length=None)
        else:
            lf = pl.scan_csv(
                file,
                separator="\t" if fmt == "tsv" else ",",
                has_header=src.has_header,
                new_columns=src.columns,
                quote_char=None if fmt == "tsv" else '"',
                infer_schema=False,  # ids and texts stay strings, as written
                encoding="utf8",
            )
        names = lf.collect_schema().names()
        missing = [c for c in wanted if c not in names]
        if missing:
            raise GraphbuildError(f"{file}: no column {missing[0]!r} (columns: {', '.join(names)})")
        return lf.select(wanted).collect(engine="streaming")
    except GraphbuildError:
        raise
    except (pl.exceptions.PolarsError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise GraphbuildError(f"{file}: cannot read as {fmt}: {first}") from None


def read_rows(ds: Dataset) -> tuple[pl.DataFrame, list[Path]]:
    """All source rows as one frame: id, value (text or label), _file, _row."""
    m = ds.manifest
    value_col = m.label_column if m.is_labels else m.text_column
    files = ds.source_files()
    wanted = [value_col] + ([m.id_column] if m.id_column else [])
    parts = []
    for i, f in enumerate(files):
        df = _read_file(ds, f, list(dict.fromkeys(wanted)))
        parts.append(df.select(
            (pl.col(m.id_column) if m.id_column else pl.lit(None, pl.Int64)).alias("id"),
            pl.col(value_col).alias("value"),
            pl.lit(i, pl.Int32).alias("_file"),
            pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"),
        ))
    df = pl.concat(parts, how="vertical_relaxed") if parts else pl.DataFrame()
    if m.id_column is None:
        df = df.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("id"))
    return df, files


def _check_or_skip(df: pl.DataFrame, bad: pl.Expr, skip: bool, what: str,
                   ds: Dataset, files: list[Path]) -> tuple[pl.DataFrame, int]:
    flagged = df.filter(bad)
    if flagged.height == 0:
        return df, 0
    if not skip:
        first = flagged.row(0, named=True)
        what = what.replace("{value}", repr(first.get("value"))[:80])
        raise GraphbuildError(f"{_position(ds, files, first['_file'], first['_row'])}: {what} "
                              f"({flagged.height} such rows; --skip-bad-rows drops them)")
    log.warning("skipping %d rows: %s", flagged.height, what)
    return df.filter(~bad), flagged.height


def build_tables(ds: Dataset, skip_bad_rows: bool = False) -> tuple[pl.DataFrame, pl.DataFrame, TextFigures]:
    """Return (nodes, samples, figures) for a dataset. Pure: writes nothing."""
    m = ds.manifest
    if m.is_labels:
        return _label_tables(ds, skip_bad_rows)
    df, files = read_rows(ds)
    df = df.with_columns(
        pl.col("value").cast(pl.Utf8).str.replace_all(r"\s+", " ").str.strip_chars().alias("text"))
    df, n_empty = _check_or_skip(df, pl.col("text").is_null() | (pl.col("text") == ""), skip_bad_rows,
                                 f"empty text in column {m.text_column!r}", ds, files)
    df, n_dup = _check_or_skip(df, ~pl.col("id").is_first_distinct(), skip_bad_rows,
                               f"duplicate sample id in column {m.id_column!r}", ds, files)
    if df.height == 0:
        raise GraphbuildError(f"{ds.path}: the source holds no rows")
    nodes = (df.select("text").unique(maintain_order=True)
             .with_row_index("node").with_columns(pl.col("node").cast(pl.Int64)))
    samples = (df.select("id", "text").join(nodes, on="text", how="left", maintain_order="left")
               .select(pl.int_range(pl.len(), dtype=pl.Int64).alias("sample"),
                       pl.col("id").alias("sample_id"), "node"))
    figures = TextFigures(samples=samples.height, nodes=nodes.height,
                          duplicates=samples.height - nodes.height,
                          skipped_empty=n_empty, skipped_duplicate_ids=n_dup)
    return nodes.select("node", "text"), samples, figures


def _label_tables(ds: Dataset, skip_bad_rows: bool):
    entries = ds.class_entries()
    nodes = pl.DataFrame({
        "node": pl.Series(range(len(entries)), dtype=pl.Int64),
        "text": [" ".join(e.name.split()) for e in entries],
        "key": [e.key for e in entries],
    }, schema={"node": pl.Int64, "text": pl.Utf8, "key": pl.Utf8})
    if ds.manifest.source is None:  # the classes themselves are the samples
        samples = nodes.select(pl.col("node").alias("sample"),
                               pl.coalesce("key", pl.col("node").cast(pl.Utf8)).alias("sample_id"),
                               "node")
        return nodes, samples, TextFigures(samples=samples.height, nodes=nodes.height, duplicates=0)
    lookup: dict[str, int] = {}
    for i, e in enumerate(entries):  # index, then key, then name; first spelling wins
        lookup.setdefault(str(i), i)
    for i, e in enumerate(entries):
        if e.key:
            lookup.setdefault(e.key, i)
    for i, e in enumerate(entries):
        lookup.setdefault(e.name, i)
    df, files = read_rows(ds)
    df = df.with_columns(pl.col("value").cast(pl.Utf8).str.strip_chars()
                         .replace_strict(lookup, default=None, return_dtype=pl.Int64).alias("node"))
    col = ds.manifest.label_column
    df, n_bad = _check_or_skip(df, pl.col("node").is_null(), skip_bad_rows,
                               f"label {{value}} in column {col!r} is not in the class list", ds, files)
    df, n_dup = _check_or_skip(df, ~pl.col("id").is_first_distinct(), skip_bad_rows,
                               f"duplicate sample id in column {ds.manifest.id_column!r}", ds, files)
    samples = df.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("sample"),
                        pl.col("id").alias("sample_id"), "node")
    figures = TextFigures(samples=samples.height, nodes=nodes.height,
                          duplicates=samples.height - samples["node"].n_unique(),
                          skipped_empty=n_bad, skipped_duplicate_ids=n_dup)
    return nodes, samples, figures


def write_tables(nodes: pl.DataFrame, samples: pl.DataFrame, run_dir: Path) -> None:
    """Write both tables through temp files; samples last, so its presence means both are whole."""
    for name, df in (("nodes.parquet", nodes), ("samples.parquet", samples)):
        with atomic_path(run_dir / name) as tmp:
            df.write_parquet(tmp, row_group_size=ROW_GROUP, statistics=True)
        kill_point("tables.table_written")


def read_node_texts(run_dir: Path, start: int, stop: int) -> list[str]:
    """Texts of nodes [start, stop), read without loading the whole table."""
    lf = pl.scan_parquet(run_dir / "nodes.parquet").slice(start, stop - start)
    return lf.select("text").collect()["text"].to_list()
