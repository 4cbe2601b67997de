"""The run directory: its paths, atomic writes, the lock, run.json and completion markers.

Every file that a later step trusts is written to a temp file in the same directory and
moved into place with os.replace, so a reader sees the old file or the whole new one, never
half of one. Completion markers are written last.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point

HOST = socket.gethostname().replace("-", "_")  # temp names split on "-"
# embeddings.zarr attributes that must match for two sets of vectors to be comparable; the
# graph and the knn parameters carry a copy, checked against the store by every reader.
PROVENANCE_KEYS = ("model", "model_revision", "dim", "max_seq_length", "normalized",
                   "precision", "templates", "dtype", "n_nodes")


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


class RunDir:
    """Names of everything in a run directory, in one place."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def nodes(self) -> Path:
        return self.root / "nodes.parquet"

    @property
    def samples(self) -> Path:
        return self.root / "samples.parquet"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings.zarr"

    @property
    def graph(self) -> Path:
        return self.root / "graph"

    def state(self, stage: str) -> Path:
        """Markers and per-shard stats of a stage live here, apart from the data."""
        return self.root / "_state" / stage

    def logs(self) -> Path:
        return self.root / "logs"

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock over the run's shared files (run.json, tables, store metadata).

        Held only for short metadata steps; shards never hold it while computing.
        """
        return file_lock(self.root / ".lock")

    def shard_lock(self, stage: str, shard: str) -> contextlib.AbstractContextManager[None]:
        """Held while a shard computes, so a duplicate of the same array task waits, then
        finds the work done, instead of racing it over the same files."""
        return file_lock(self.state(stage) / f"{shard}.lock")

    def read_run(self) -> dict:
        return read_json(self.run_json)

    def update_run(self, change: Callable[[dict], None]) -> dict:
        """Read, change and rewrite run.json under the lock."""
        with self.lock():
            run = self.read_run()
            change(run)
            run["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_json(self.run_json, run)
            return run


def store_attrs(root: str | Path) -> dict | None:
    """The attributes of a run's embeddings.zarr, read from its zarr.json without zarr (the
    trainer reads them too); None when the run has no store."""
    path = RunDir(root).embeddings / "zarr.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GraphbuildError(f"{path}: cannot read the store's metadata: {e}") from None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    if not isinstance(attrs, dict):
        raise GraphbuildError(f"{path}: no attributes; not a graphbuild store")
    return attrs


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """flock on `path`; released by the kernel if the holder dies, so never stale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # some network filesystems have no flock
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                raise
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)


def marker(directory: Path, name: str) -> Path:
    return directory / f"{name}.done"


def is_done(directory: Path, name: str) -> bool:
    return marker(directory, name).exists()


def mark_done(directory: Path, name: str, stats: dict | None = None) -> None:
    """Write a completion marker (optionally holding stats). Call it after the data is in place."""
    write_json(marker(directory, name), stats or {})


class ParquetRows:
    """A Parquet file written from frames appended in order, in row groups of exactly
    `group` rows (the last one shorter), so its bytes depend on the rows alone, not on the
    frames they came in."""

    def __init__(self, path: Path, schema: dict, group: int = 65_536):  # polars dtypes by name
        import polars as pl
        import pyarrow.parquet as pq

        self.schema = pl.DataFrame(schema=schema).to_arrow().schema
        self.group = group
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self._waiting: list = []
        self._rows = 0

    def write(self, df) -> None:  # a polars DataFrame
        if df.height:
            self._waiting.append(df.to_arrow().cast(self.schema))
            self._rows += df.height
        while self._rows >= self.group:
            self._emit(self.group)

    def _emit(self, n: int) -> None:
        import pyarrow as pa

        table = pa.concat_tables(self._waiting)
        self._writer.write_table(table.slice(0, n).combine_chunks(), row_group_size=n)
        rest = table.slice(n)
        self._waiting = [rest] if rest.num_rows else []
        self._rows -= n

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._rows and exc[0] is None:
            self._emit(self._rows)
        self._writer.close()
