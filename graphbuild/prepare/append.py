"""Appending new source files to a finished run's tables (`graphbuild embed --append`).

An append keeps every existing node and sample id and adds the new ones after them, so the
store's rows and the graph's lists of the old nodes stay valid. The rule that makes this
exact: the appended run is the run a from-scratch build over all the files would give.

- The recorded source files must all still be there, unchanged (size and mtime, else their
  sha256), in the recorded order; a changed or removed one is refused by name (a rebuild).
- New files must sort after every recorded one (files are read in name order), so the
  from-scratch order is "old files, then new files": their new texts become nodes after
  the old ones, in first-seen order, and their rows samples after the old ones. A new file
  that sorts before an old one is refused by name.
- The tables are written aside (`APPEND_DIR`), then moved into place. They are built from
  the new files and the run's own tables (extend.py): the old files are not read again,
  so an append's prepare costs the new rows' reading plus a copy of the old tables' rows.
  A new row repeating an old sample id is refused as any repeated id is (one line naming
  the row; --skip-bad-rows drops it, as a from-scratch build would).
- Where extend.py cannot derive them from the tables alone (CannotExtend: its docstring
  lists when), they are built over all the files, with a log line saying why, and checked
  to extend the current ones row for row (old nodes and samples an exact prefix).
- Only the new nodes are embedded (embedding/stage.py).

The caller holds the run lock and the append lock (`append_lock`: a second append at the same
time is refused), and has refused other model, precision or templates and a half-done knn.
run.json's dataset entry records each append under "appends" (nodes and samples before it,
the files it added).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point
from graphbuild.prepare.extend import CannotExtend, extend_tables
from graphbuild.prepare.manifest import HASH, Dataset, settle_records
from graphbuild.prepare.stage import check_reading, rebuild, tables_readable
from graphbuild.prepare.texts import Layout, build_tables
from graphbuild.rundir.files import write_json
from graphbuild.rundir.locks import file_lock
from graphbuild.rundir.paths import RunDir

log = logging.getLogger(__name__)

APPEND_DIR = ".append-tables"  # tables built aside, moved into place once checked
APPENDS = "appends"  # run.json dataset entry: one record per append


@contextlib.contextmanager
def append_lock(run: RunDir) -> Iterator[None]:
    """Held for the whole append (tables and store); a second append is refused at once."""
    path = run.root / ".append.lock"
    try:
        with file_lock(path, timeout=0):
            yield
    except GraphbuildError as e:
        if str(path) not in str(e):
            raise
        raise GraphbuildError(f"{run.root}: another append into this run is running ("
                              f"{str(e).split('still held by ', 1)[-1].split(' after', 1)[0]});"
                              " wait for it to finish, then rerun") from None


class _Only(Dataset):
    """A dataset read from the named files of its source only (a run's recorded ones)."""

    def __init__(self, ds: Dataset, names: list[str]):
        super().__init__(ds.manifest, ds.path, ds.source_override)
        self._names = set(names)

    def source_files(self) -> list[Path]:
        return [f for f in super().source_files() if f.name in self._names]


def prepare_append(ds: Dataset, run: RunDir, skip_bad_rows: bool, before: Callable[[], None],
                   layout: Layout | None = None, whole_source: bool = False) -> list[dict]:
    """Append the source's new files to the run's tables (the module docstring's rules), under
    the run lock; `before()` runs the stage's own refusals once there is something to
    append. Returns the new files' records: empty when there is nothing to append, or no
    finished tables to append to (then the stage builds them as usual). `whole_source`
    builds the tables over every file even where they could be extended (tests/test_extend.py
    and benchmarks/append_prepare.py compare the two)."""
    with run.lock():
        info = run.read_run()
        have = info.get("dataset")
        if not have or "reading" not in have or have.get("name") != ds.name:
            return []  # a first build, or refused by prepare with its own words
        check_reading(ds, run, have)
        added = new_files(ds, run, have)
        if not added:
            log.info("%s: no new source files; nothing to append", run.root)
            return []
        skipped = have["figures"].get("skipped_empty", 0) + have["figures"].get(
            "skipped_duplicate_ids", 0)
        if skipped and not skip_bad_rows:
            raise GraphbuildError(f"{run.root}: its tables dropped {skipped} bad rows under "
                                  "--skip-bad-rows; give --skip-bad-rows again to append")
        before()
        if not tables_readable(run, have["figures"]):  # a killed append moved one table
            old = _Only(ds, [r["name"] for r in have["source_files"]])
            rebuild(old, run, have, have["source_files"], skip_bad_rows)
        append_tables(ds, run, info, added, skip_bad_rows, layout, whole_source)
    return added


def new_files(ds: Dataset, run: RunDir, have: dict) -> list[dict]:
    """The records of the source files this run was not built from, after checking the
    recorded ones are all there, unchanged, in order, and sort before every new one.
    Empty when there is nothing to append."""
    before = have["source_files"]
    now = ds.source_records(before)
    names_now = [r["name"] for r in now]
    for r in before:
        if r["name"] not in names_now:
            raise GraphbuildError(f"{r['path']}: this run was built from it and the source no "
                                  "longer gives it; an append keeps every old file: rebuild "
                                  "into another --out")
    old_now = now[:len(before)]
    if [r["name"] for r in old_now] != [r["name"] for r in before]:
        first_new = next(r for r in now if r["name"] not in {b["name"] for b in before})
        raise GraphbuildError(f"{first_new['path']}: a new source file that sorts before "
                              f"{before[-1]['path']}, one this run was built from; an append "
                              "adds files after the run's own in name order: rename it, or "
                              "rebuild into another --out")
    for old, new in zip(before, old_now):
        if old[HASH] != new[HASH] or old["format"] != new["format"]:
            raise GraphbuildError(f"{new['path']}: changed since {run.root} was built from it "
                                  f"({HASH} {new[HASH][:12]}, recorded {old[HASH][:12]}); an "
                                  "append needs its old files unchanged: rebuild into another "
                                  "--out")
    return now[len(before):]


def append_tables(ds: Dataset, run: RunDir, info: dict, added: list[dict],
                  skip_bad_rows: bool, layout: Layout | None = None,
                  whole_source: bool = False) -> dict:
    """Build the appended tables aside, move them into place and record the append in
    run.json (written through `info`); the new figures."""
    have = info["dataset"]
    old = have["figures"]
    aside = run.root / APPEND_DIR
    shutil.rmtree(aside, ignore_errors=True)  # left by a killed append
    try:
        files = ds.source_records(have["source_files"])
        figures = _appended_tables(ds, run, aside, old, added, skip_bad_rows, layout,
                                   whole_source)
        files = settle_records(files)
        kill_point("append.tables_built")
        for table in (run.nodes, run.samples):  # nodes first: prepare rebuilds either
            os.replace(aside / table.name, table)
            kill_point("append.table_moved")
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    have.update(source_files=files, figures=figures)
    have.setdefault(APPENDS, []).append(
        {"nodes_before": old["nodes"], "samples_before": old["samples"],
         "files": [r["name"] for r in added]})
    write_json(run.run_json, info)
    log.info("%s: appended %d files: %d new samples, %d new nodes (after node %d)", run.root,
             len(added), figures["samples"] - old["samples"], figures["nodes"] - old["nodes"],
             old["nodes"])
    return figures


def _appended_tables(ds: Dataset, run: RunDir, aside: Path, old: dict, added: list[dict],
                     skip: bool, layout: Layout | None, whole_source: bool) -> dict:
    """The appended tables written into `aside`, from the new files and the run's tables
    where extend.py can, else over every file; their figures."""
    if not whole_source:
        try:
            return extend_tables(ds, run, aside, old, [Path(r["path"]) for r in added], skip,
                                 layout).as_dict()
        except CannotExtend as e:
            log.info("%s: the tables cannot be extended from the new files alone: %s; "
                     "building them over every source file", run.root, e)
    figures = build_tables(ds, aside, skip, layout).as_dict()
    _check_extends(run, aside, old, figures)
    return figures


def _check_extends(run: RunDir, aside: Path, old: dict, figures: dict) -> None:
    """The tables built aside hold the run's tables as their first rows, row for row."""
    import polars as pl

    from graphbuild.prepare.stage import same_rows

    for table, key in ((run.nodes, "nodes"), (run.samples, "samples")):
        new = aside / table.name
        if figures[key] < old[key] or not same_rows(
                pl.scan_parquet(table), pl.scan_parquet(new).head(old[key])):
            raise GraphbuildError(f"{table}: the tables built over old and new files do not "
                                  "start with this run's rows, so an old source or the "
                                  "manifest's reading changed; rebuild into another --out")
