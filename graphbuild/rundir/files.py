"""Files a later step trusts: atomic writes, JSON, completion markers, Parquet rows.

Every file that a later step trusts is written to a temp file in the same directory and
moved into place with os.replace, so a reader sees the old file or the whole new one, never
half of one. Completion markers are written last.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point

log = logging.getLogger(__name__)

HOST = socket.gethostname().replace("-", "_")  # temp names split on "-"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success move it over `path`, on failure remove it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}")
    try:
        yield tmp
        kill_point("before_replace")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _remove_dead_temps(path: Path) -> None:
    """Temp files of `path` left by killed writers on this host. A live writer's temp, or one
    from another host of a shared filesystem, is left alone."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-{HOST}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text[: len(text) // 2])
            f.flush()
            kill_point("json.mid_write")
            f.write(text[len(text) // 2:])
            f.flush()
            os.fsync(f.fileno())


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise GraphbuildError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def marker(directory: Path, name: str) -> Path:
    return directory / f"{name}.done"


def read_marker(path: Path) -> tuple[dict | None, str | None]:
    """A marker's record: (record, None); (None, None) when there is no marker; (None, why)
    when it does not read."""
    if not path.exists():
        return None, None
    try:
        return read_json(path), None
    except GraphbuildError as e:
        return None, str(e)


def is_done(directory: Path, name: str) -> bool:
    return marker(directory, name).exists()


def mark_done(directory: Path, name: str, stats: dict | None = None) -> None:
    """Write a completion marker (optionally holding stats). Call it after the data is in place."""
    write_json(marker(directory, name), stats or {})


class ParquetRows:
    """A Parquet file written from tables appended in order, in row groups of exactly
    `group` rows (the last one shorter), so its bytes depend on the rows alone, not on the
    tables they came in.

    `schema`: an Arrow schema, or polars dtypes by column name. `page_checksums`: a CRC32 on
    every data page, for readers that verify them. `after_group` is called after each row
    group is written (the tests' kill points). `dictionary`: dictionary-encode the columns
    (Parquet's default), which only costs time for columns of few repeats."""

    def __init__(self, path: Path, schema, group: int = 65_536, page_checksums: bool = False,
                 after_group: Callable[[], None] | None = None, dictionary: bool = True):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not isinstance(schema, pa.Schema):
            import polars as pl

            schema = pl.DataFrame(schema=schema).to_arrow().schema
        self.schema = schema
        self.group = group
        self._after_group = after_group
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd",
                                        write_page_checksum=page_checksums,
                                        use_dictionary=dictionary)
        self._waiting: list = []
        self._rows = 0

    def write(self, df) -> None:
        """Append a polars DataFrame's rows (or a pyarrow Table's)."""
        import pyarrow as pa

        self.write_table(df if isinstance(df, pa.Table) else df.to_arrow())

    def write_table(self, table) -> None:
        """Append a pyarrow Table's rows."""
        if table.num_rows:
            self._waiting.append(table.cast(self.schema))
            self._rows += table.num_rows
        while self._rows >= self.group:
            self._emit(self.group)

    def _emit(self, n: int) -> None:
        import pyarrow as pa

        table = pa.concat_tables(self._waiting)
        self._writer.write_table(table.slice(0, n).combine_chunks(), row_group_size=n)
        if self._after_group is not None:
            self._after_group()
        rest = table.slice(n)
        self._waiting = [rest] if rest.num_rows else []
        self._rows -= n

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._rows and exc[0] is None:
            self._emit(self._rows)
        self._writer.close()
