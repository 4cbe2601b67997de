"""The run's samples by id, for finding each tar's keys without the whole samples table in
memory.

`DIR/_index/samples_by_id.parquet` holds (sample_id, node) sorted by sample_id, in row groups
of GROUP_ROWS, each with its min and max sample_id in the footer's statistics; it is written
once per export directory (under its lock) and vouched for by `samples_by_id.json` (the run's
id and the row count), written after it.

Building it is an external sort: a table of at most PARTITION_ROWS rows is sorted in memory;
a larger one is cut into ranges of sample_id by quantiles of a systematic sample of its ids,
each range written to its own file in one pass over samples.parquet (one record batch in
memory at a time), then each range, in order, read, sorted and appended. Memory: one range
(about PARTITION_ROWS rows), whatever the run's size.

A tar's lookup (`SamplesIndex.nodes`) reads only the row groups whose [min, max] meets the
tar's [min key, max key]: img2dataset numbers its samples shard by shard, so a tar's keys are
contiguous and touch one or two row groups. Keys scattered over the whole id range still come
out right, at the cost of reading every row group for that tar.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from graphbuild.errors import GraphbuildError
from graphbuild.rundir.files import atomic_path, read_json, write_json
from graphbuild.rundir.paths import RunDir

log = logging.getLogger(__name__)

INDEX = "samples_by_id.parquet"
DONE = "samples_by_id.json"
GROUP_ROWS = 65_536
PARTITION_ROWS = 4_000_000
SAMPLE_EVERY = 1_000  # one id in this many decides the ranges' bounds
PAGE_CHECKS = {"page_checksum_verification": True}


def index_dir(out: Path) -> Path:
    return out / "_index"


def ensure_index(run: Path, out: Path, run_id: str,
                 partition_rows: int = PARTITION_ROWS) -> Path:
    """The index of `run` in `out`, built unless its record vouches for it (the caller holds
    the export directory's lock)."""
    where = index_dir(out)
    path, done = where / INDEX, where / DONE
    record = read_json(done)
    if record.get("run_id") == run_id and path.is_file():
        try:
            if pq.ParquetFile(path).metadata.num_rows == record.get("rows"):
                return path
        except (OSError, pa.ArrowException):
            pass
    done.unlink(missing_ok=True)
    rows = _build(RunDir(run).samples, path, partition_rows)
    write_json(done, {"run_id": run_id, "rows": rows})
    return path


def _read_samples(samples: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(samples)
    except (OSError, pa.ArrowException) as e:
        raise GraphbuildError(f"{samples}: cannot read samples table: {e}") from None


def _batches(pf: pq.ParquetFile):
    yield from pf.iter_batches(batch_size=GROUP_ROWS, columns=["sample_id", "node"])


def _build(samples: Path, path: Path, partition_rows: int) -> int:
    pf = _read_samples(samples)
    n = pf.metadata.num_rows
    schema = pa.schema([pf.schema_arrow.field("sample_id"), ("node", pa.int64())])
    tmp_dir = path.parent / ".partitions"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a killed build
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd",
                                                    write_page_checksum=True) as writer:
        if n <= partition_rows:
            ranges = [pa.Table.from_batches(list(_batches(pf)), schema=schema)]
        else:
            ranges = _ranges(pf, schema, tmp_dir, _bounds(pf, n, partition_rows))
        last = None
        for table in ranges:
            table = table.take(pc.sort_indices(table, [("sample_id", "ascending")]))
            last = _check_unique(table, samples, last)
            for lo in range(0, table.num_rows, GROUP_ROWS):
                writer.write_table(table.slice(lo, GROUP_ROWS), row_group_size=GROUP_ROWS)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return n


def _bounds(pf: pq.ParquetFile, n: int, partition_rows: int) -> np.ndarray:
    """Range bounds: quantiles of every SAMPLE_EVERY-th id, so ranges hold ~partition_rows."""
    picked = [b.column(0).to_numpy(zero_copy_only=False)[::SAMPLE_EVERY] for b in _batches(pf)]
    ids = np.sort(np.concatenate(picked))
    parts = -(-n // partition_rows)
    return np.unique(ids[(np.arange(1, parts) * len(ids)) // parts])


def _ranges(pf: pq.ParquetFile, schema: pa.Schema, tmp_dir: Path, bounds: np.ndarray):
    """The samples cut into files by id range (one pass), then yielded range by range."""
    tmp_dir.mkdir(parents=True)
    files = [tmp_dir / f"range-{i:05d}.parquet" for i in range(len(bounds) + 1)]
    writers = [pq.ParquetWriter(f, schema) for f in files]
    try:
        for batch in _batches(pf):
            ids = batch.column(0).to_numpy(zero_copy_only=False)
            which = np.searchsorted(bounds, ids, side="right")
            table = pa.Table.from_batches([batch]).cast(schema)
            for r in np.unique(which).tolist():
                writers[r].write_table(table.filter(pa.array(which == r)))
    finally:
        for w in writers:
            w.close()
    for f in files:
        yield pq.read_table(f, schema=schema)
        f.unlink()


def _check_unique(table: pa.Table, samples: Path, last):
    """Refuse a repeated sample_id (prepare never writes one; a damaged table could)."""
    ids = table.column("sample_id").combine_chunks()
    if len(ids) == 0:
        return last
    first = ids[0].as_py()
    same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    if (last is not None and first == last) or pc.any(same).as_py():
        at = first if last == first else ids.filter(pc.fill_null(
            pa.concat_arrays([pa.array([False]), same]), False))[0].as_py()
        raise GraphbuildError(f"{samples}: sample_id {at!r} is repeated; ids must be unique")
    return ids[-1].as_py()


def ids_of(keys: list[str], id_type: pa.DataType) -> pa.Array:
    """Tar keys as sample ids of the run's type: text as is; for integer ids, a key's decimal
    value (img2dataset pads its keys with zeros), null where it has none."""
    if not pa.types.is_integer(id_type):
        return pa.array(keys, pa.string()).cast(id_type)
    return pa.array([int(k) if k.isascii() and k.isdecimal() else None for k in keys], id_type)


def any_sample(run: Path, keys: list[str]) -> bool:
    """Whether any key is a sample id of the run: samples.parquet's ids read a batch at a
    time, stopping at the first hit (a tar of the run's first shard hits in the first)."""
    pf = _read_samples(RunDir(run).samples)
    ids = ids_of(keys, pf.schema_arrow.field("sample_id").type).drop_null()
    if not len(ids):
        return False
    return any(pc.any(pc.is_in(b.column(0), value_set=ids)).as_py()
               for b in pf.iter_batches(batch_size=1 << 20, columns=["sample_id"]))


class SamplesIndex:
    """Nodes of sample ids, read from the index a few row groups at a time."""

    def __init__(self, path: Path):
        self.path = path
        self._file = pq.ParquetFile(path, **PAGE_CHECKS)
        md = self._file.metadata
        self.id_type = self._file.schema_arrow.field("sample_id").type
        self.groups = []  # (min, max) per row group, None where the footer has no statistics
        for g in range(md.num_row_groups):
            stats = md.row_group(g).column(0).statistics
            self.groups.append((stats.min, stats.max) if stats is not None
                               and stats.has_min_max else None)

    def nodes(self, keys: list[str]) -> np.ndarray:
        """Each key's node, -1 where the run holds no sample with that id."""
        ids = ids_of(keys, self.id_type)
        out = np.full(len(keys), -1, np.int64)
        present = ids.drop_null()
        if not len(present):
            return out
        lo, hi = pc.min(present).as_py(), pc.max(present).as_py()
        for g, bounds in enumerate(self.groups):
            if bounds is not None and (bounds[1] < lo or bounds[0] > hi):
                continue
            try:
                group = self._file.read_row_group(g, columns=["sample_id", "node"])
            except (OSError, pa.ArrowException) as e:
                raise GraphbuildError(f"{self.path}: cannot read the samples index: {e}; "
                                      "delete it to have it rebuilt") from None
            at = pc.index_in(ids, value_set=group.column("sample_id"))
            hit = at.is_valid().to_numpy(zero_copy_only=False)
            rows = at.fill_null(0).to_numpy().astype(np.int64)
            out[hit] = group.column("node").to_numpy()[rows[hit]]
        return out
