"""samples.parquet and run.json's record of the source, as the trainer reads them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from graphbuild.errors import GraphbuildError
from graphbuild.rundir.files import read_json
from graphbuild.rundir.paths import RunDir
from graphbuild.rundir.store import StoredRows

# run.json's dataset entry: true when sample ids are the source's row numbers (no id_column)
ROW_NUMBER_IDS = "ids_are_row_numbers"


def read_samples(run: str | Path, ids: bool = False) -> tuple[np.ndarray, pa.Array | None]:
    """Each sample's node (the `node` column in `sample` order 0..S-1, int64) and, with
    ids=True, its `sample_id` (checked: no nulls, no repeats); else None for the ids."""
    path = RunDir(run).samples
    try:
        table = pq.read_table(path, columns=["sample", "node"] + (["sample_id"] if ids else []))
    except (OSError, ValueError, pa.ArrowException) as e:
        raise GraphbuildError(f"{path}: cannot read samples table: {e}") from None
    sample = table.column("sample").to_numpy()
    if not np.array_equal(sample, np.arange(len(sample))):
        order = np.argsort(sample, kind="stable")
        if not np.array_equal(sample[order], np.arange(len(sample))):
            raise GraphbuildError(f"{path}: sample column is not 0..{len(sample) - 1}")
        table = table.take(order)
    node = table.column("node").to_numpy().astype(np.int64)
    if len(node) and node.min() < 0:
        raise GraphbuildError(f"{path}: node {node.min()} in column 'node' is negative")
    if not ids:
        return node, None
    sample_ids = table.column("sample_id").combine_chunks()
    check_unique_ids(sample_ids, f"{path}: column 'sample_id'", "sample")
    return node, sample_ids


def read_sample_nodes(run: str | Path) -> np.ndarray:
    """node of each dataset index (the `sample` column, 0..S-1), as int64."""
    return read_samples(run)[0]


def check_unique_ids(ids: pa.Array, where: str, what: str) -> None:
    """Refuse ids with a null or a repeat, naming the first one and its position."""
    if ids.null_count:
        first = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise GraphbuildError(f"{where}: {what} {first} has no id (null)")
    first_seen = pc.index_in(ids, value_set=ids).to_numpy(zero_copy_only=False)
    again = np.flatnonzero(first_seen != np.arange(len(ids)))
    if len(again):
        at = int(again[0])
        raise GraphbuildError(f"{where}: {what}s {first_seen[at]} and {at} have the same id "
                              f"{ids[at].as_py()!r}; ids must be unique")


def check_nodes_fit(run: str | Path, nodes: np.ndarray, n_rows: int, rows_of: Path) -> None:
    """Refuse sample nodes that are not rows of what they index (the store, the graph): the
    samples table and that file are then of different runs."""
    if len(nodes) and nodes.max() >= n_rows:
        raise GraphbuildError(f"{RunDir(run).samples}: node {nodes.max()} is not one of the "
                              f"{n_rows} rows of {rows_of}; the samples table and it are of "
                              "different runs: rerun `graphbuild embed` and `graphbuild knn`")


def check_store_matches_tables(run: str | Path, rows: StoredRows) -> None:
    """Refuse a store whose row count differs from nodes.parquet's: one node, one row."""
    path = RunDir(run).nodes
    try:
        n = pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise GraphbuildError(f"{path}: cannot read nodes table: {e}") from None
    if n != rows.shape[0]:
        raise GraphbuildError(f"{rows.path}: holds {rows.shape[0]} rows, {path} {n} nodes; "
                              "the store is of another run: rerun `graphbuild embed`")


@dataclass(frozen=True)
class SourceRows:
    """What run.json says about the source's rows and the run's sample ids.

    row_numbers: True when the sample ids are the source's row numbers (the manifest has no
    id_column), False when they are an id column's values or class keys, None when run.json
    does not say (runs written before the builder recorded it). skipped: rows the run dropped
    under --skip-bad-rows (empty texts, unknown labels, repeated ids); None if not recorded."""
    row_numbers: bool | None
    skipped: int | None
    samples: int | None

    @property
    def total(self) -> int | None:
        """The source's row count: samples kept plus rows skipped."""
        if self.samples is None or self.skipped is None:
            return None
        return self.samples + self.skipped


def read_source_rows(run: str | Path) -> SourceRows:
    dataset = read_json(RunDir(run).run_json).get("dataset") or {}
    figures = dataset.get("figures") or {}
    row_numbers = dataset.get(ROW_NUMBER_IDS)
    skips = [figures.get("skipped_missing", 0), figures.get("skipped_empty"),
             figures.get("skipped_duplicate_ids")]
    skipped = sum(skips) if all(isinstance(k, int) for k in skips) else None
    samples = figures.get("samples") if isinstance(figures.get("samples"), int) else None
    return SourceRows(row_numbers if isinstance(row_numbers, bool) else None, skipped, samples)
