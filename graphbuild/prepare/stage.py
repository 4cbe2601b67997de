"""The prepare stage: a dataset's nodes and samples tables, rebuilt only when their inputs change."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point
from graphbuild.prepare.manifest import HASH, Dataset, settle_records
from graphbuild.prepare.texts import build_tables
from graphbuild.rundir.files import write_json
from graphbuild.rundir.paths import RunDir
from graphbuild.rundir.samples import ROW_NUMBER_IDS

log = logging.getLogger(__name__)


VERIFY_DIR = ".verify-tables"  # tables rebuilt aside to verify a run recorded without hashes


def prepare(ds: Dataset, run: RunDir, skip_bad_rows: bool = False) -> dict:
    """Make sure the run holds this dataset's nodes and samples tables, built from these
    inputs; return its figures (see the module docstring for what is compared).

    The tables are built under the run lock, so the first array task builds them and the
    others wait and reuse them. Where a record exists, files are hashed before the lock."""
    figures, refreshed = _prepare(ds, run, skip_bad_rows)
    _record_refresh(run, refreshed)
    return figures


def _prepare(ds: Dataset, run: RunDir, skip_bad_rows: bool) -> tuple[dict, dict]:
    """prepare's work; also returns what the record should say now that may change without
    changing the tables (`_refreshed`), for the caller to write once its work succeeds."""
    recorded = run.read_run().get("dataset") or {}
    files = ds.source_records(recorded["source_files"]) if "reading" in recorded else None
    with run.lock():
        info = run.read_run()
        have = info.get("dataset")
        if have and have.get("name") != ds.name:
            raise GraphbuildError(f"{run.root}: holds dataset {have.get('name')!r}, not "
                                  f"{ds.name!r}; choose another --out")
        if not have:
            return _build(ds, run, info, skip_bad_rows), {}
        if "reading" not in have:
            return _adopt(ds, run, info, skip_bad_rows), {}
        if files is None or _changed_since(ds, files):
            files = ds.source_records(have["source_files"])
        _check_inputs(ds, run, have, files, skip_bad_rows)
        if not tables_readable(run, have["figures"]):
            rebuild(ds, run, have, files, skip_bad_rows)
        return have["figures"], _refreshed(ds, have, files)


def _dataset_entry(ds: Dataset, files: list[dict], figures: dict) -> dict:
    entry = {"name": ds.name, "manifest": str(ds.path), "reading": ds.reading(),
             "source_files": files, "templates": ds.manifest.templates, "figures": figures,
             # the trainer joins dataset items to samples by id; by default by row number,
             # which only a run without an id column has as its ids
             ROW_NUMBER_IDS: ds.manifest.id_column is None and ds.manifest.source is not None}
    if ds.manifest.examples:
        entry["examples"] = ds.manifest.examples
    return entry


def _build(ds: Dataset, run: RunDir, info: dict, skip_bad_rows: bool) -> dict:
    """The tables from scratch, and the record of their inputs in run.json."""
    t0 = time.perf_counter()
    files = ds.source_records()
    figures = build_tables(ds, run.root, skip_bad_rows)
    files = settle_records(files)  # a source written just before: the others need not re-hash
    _check_unchanged(ds, files)
    kill_point("embed.tables_written")
    info["dataset"] = _dataset_entry(ds, files, figures.as_dict())
    write_json(run.run_json, info)
    log.info("%s: %d samples, %d unique texts (%d duplicates) in %.1fs", ds.name,
             figures.samples, figures.nodes, figures.duplicates, time.perf_counter() - t0)
    return figures.as_dict()


def _changed_since(ds: Dataset, files: list[dict]) -> str | None:
    """The first source file whose name, size or mtime differs from `files` (records taken
    earlier in this process), or None."""
    now = ds.source_files()
    if [f.name for f in now] != [r["name"] for r in files]:
        return f"{ds.path}: the source's files"
    for f, r in zip(now, files):
        st = f.stat()
        if (st.st_size, st.st_mtime_ns) != (r["bytes"], r["mtime_ns"]):
            return str(f)
    return None


def _check_unchanged(ds: Dataset, files: list[dict]) -> None:
    """Refuse to record hashes of files that changed while prepare read them."""
    changed = _changed_since(ds, files)
    if changed:
        raise GraphbuildError(f"{changed}: changed while it was read; rerun once it is final")


def _check_inputs(ds: Dataset, run: RunDir, have: dict, files: list[dict], skip: bool) -> None:
    """Refuse inputs other than those the run's tables were built from, naming the first."""
    check_reading(ds, run, have)
    _check_files(run, have["source_files"], files)
    figures = have["figures"]
    skipped = figures.get("skipped_empty", 0) + figures.get("skipped_duplicate_ids", 0)
    if skipped and not skip:
        raise GraphbuildError(f"{run.root}: its tables dropped {skipped} bad rows under "
                              "--skip-bad-rows; give --skip-bad-rows again or choose another --out")


def check_reading(ds: Dataset, run: RunDir, have: dict) -> None:
    """Refuse reading settings or a class list other than the run's tables were built with."""
    reading, before = ds.reading(), have["reading"]
    if (before.get("classes"), before.get("classes_sha256")) != (
            reading.get("classes"), reading.get("classes_sha256")):
        cf = ds.classes_file()
        where = f"classes_file {cf}" if cf else f"classes of {ds.path}"
        raise GraphbuildError(
            f"{run.root}: its tables were built from another class list ({before.get('classes')} "
            f"classes, sha256 {str(before.get('classes_sha256'))[:12]}), not this one "
            f"({reading.get('classes')} classes from {where}, sha256 "
            f"{str(reading.get('classes_sha256'))[:12]}); choose another --out")
    for key in dict.fromkeys([*before, *reading]):
        if before.get(key) != reading.get(key):
            raise GraphbuildError(f"{run.root}: its tables were built with {key}="
                                  f"{before.get(key)!r}, the manifest now gives {key}="
                                  f"{reading.get(key)!r}; choose another --out")


def _check_files(run: RunDir, before: list[dict], now: list[dict]) -> None:
    names_before, names_now = [r["name"] for r in before], [r["name"] for r in now]
    for r in now:
        if r["name"] not in names_before:
            raise GraphbuildError(f"{r['path']}: a source file this run was not built from; "
                                  "pass --append to add it, or choose another --out")
    for r in before:
        if r["name"] not in names_now:
            raise GraphbuildError(f"{run.root}: was built from source file {r['path']}, which "
                                  "the source no longer gives; choose another --out")
    if names_before != names_now:
        raise GraphbuildError(f"{run.root}: was built from {', '.join(names_before)} in that "
                              f"order, the source now gives {', '.join(names_now)}")
    for old, new in zip(before, now):
        if old[HASH] != new[HASH]:
            raise GraphbuildError(
                f"{new['path']}: changed since {run.root} was built from it ({HASH} "
                f"{new[HASH][:12]}, recorded {old[HASH][:12]}; same name, other content); "
                "choose another --out")
        if old["format"] != new["format"]:
            raise GraphbuildError(f"{new['path']}: read as {new['format']}, but this run's "
                                  f"tables read it as {old['format']}; choose another --out")


def tables_readable(run: RunDir, figures: dict) -> bool:
    """Both tables present, their Parquet footers readable, with the recorded row counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path, rows, columns in ((run.nodes, figures["nodes"], {"node", "text"}),
                                (run.samples, figures["samples"], {"sample", "sample_id", "node"})):
        try:
            meta = pq.read_metadata(path)
        except (OSError, pa.ArrowException):
            return False
        if meta.num_rows != rows or not columns <= set(meta.schema.names):
            return False
    return True


def rebuild(ds: Dataset, run: RunDir, have: dict, files: list[dict], skip: bool) -> None:
    """Tables missing or unreadable: build them again from the inputs just checked unchanged."""
    log.warning("%s: nodes.parquet or samples.parquet is missing or unreadable; rebuilding "
                "them from the recorded (unchanged) inputs", run.root)
    figures = build_tables(ds, run.root, skip).as_dict()
    _check_unchanged(ds, files)
    if figures != have["figures"]:
        raise GraphbuildError(f"{run.root}: tables rebuilt from its recorded inputs give "
                              f"{figures}, run.json recorded {have['figures']}; choose another "
                              "--out")


def _refreshed(ds: Dataset, have: dict, files: list[dict]) -> dict:
    """What changed in the record without changing the tables: the files' sizes, mtimes,
    paths and hash times after a re-hash that matched, the manifest's path, the examples."""
    now = {"source_files": files, "manifest": str(ds.path),
           "examples": ds.manifest.examples or None}
    return {k: v for k, v in now.items() if have.get(k) != v}


def _record_refresh(run: RunDir, refreshed: dict) -> None:
    if refreshed:
        run.update_run(lambda info: _apply_refresh(info, refreshed))


def _apply_refresh(info: dict, refreshed: dict) -> None:
    entry = info["dataset"]
    entry.update(refreshed)
    if entry.get("examples") is None:
        entry.pop("examples", None)


def _adopt(ds: Dataset, run: RunDir, info: dict, skip: bool) -> dict:
    """A run recorded before per-file content hashes: its record cannot say whether a source
    changed at the same size. Rebuild the tables aside from the current inputs; equal row for
    row, the run is recorded with these inputs' hashes; otherwise it is refused."""
    have = info["dataset"]
    if not tables_readable(run, have["figures"]):
        raise GraphbuildError(f"{run.root}: recorded before graphbuild kept its sources' "
                              "content hashes, and its tables are missing or unreadable, so "
                              "nothing shows what its embeddings hold; choose another --out")
    aside = run.root / VERIFY_DIR
    shutil.rmtree(aside, ignore_errors=True)  # left by a killed verification
    try:
        files = ds.source_records()
        figures = build_tables(ds, aside, skip).as_dict()
        _check_unchanged(ds, files)
        for table in (run.nodes, run.samples):
            if not _same_rows(table, aside / table.name):
                raise GraphbuildError(
                    f"{table}: differs from a rebuild from the current inputs, so a source "
                    "file or the manifest changed since this run was built (it was recorded "
                    "before graphbuild kept content hashes); choose another --out")
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    info["dataset"] = _dataset_entry(ds, files, figures)
    write_json(run.run_json, info)
    log.info("%s: verified against its inputs and recorded their content hashes", run.root)
    return figures


def _same_rows(a: Path, b: Path) -> bool:
    """Two Parquet tables hold the same rows in the same order, read a window at a time."""
    import polars as pl

    return same_rows(pl.scan_parquet(a), pl.scan_parquet(b))


def same_rows(left, right, window: int = 1 << 20) -> bool:
    """Two lazy frames hold the same rows in the same order, read a window at a time."""
    import polars as pl

    n = left.select(pl.len()).collect().item()
    if n != right.select(pl.len()).collect().item():
        return False
    return all(left.slice(lo, window).collect().equals(right.slice(lo, window).collect())
               for lo in range(0, n, window))
