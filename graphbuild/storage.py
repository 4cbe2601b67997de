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
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point

log = logging.getLogger(__name__)

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

    def lock(self, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock over the run's shared files (run.json, tables, store metadata).

        Held only for short metadata steps; shards never hold it while computing. A waiter
        says who holds it and may give up (`file_lock`).
        """
        return file_lock(self.root / ".lock", timeout)

    def shard_lock(self, stage: str, shard: str,
                   timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Held while a shard computes, so a duplicate of the same array task waits, then
        finds the work done, instead of racing it over the same files. A waiter says who
        holds it and may give up (`file_lock`)."""
        return file_lock(self.state(stage) / f"{shard}.lock", timeout)

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


LOCK_TIMEOUT_ENV = "GRAPHBUILD_LOCK_TIMEOUT"  # seconds a lock is waited for; unset: for ever
LOCK_REPORT_EVERY = 60.0  # seconds between a waiter's reports of who holds the lock
# A waiter's first report comes after this many seconds: the run lock is held for short
# metadata steps, and a wait that ends within a second is routine, not worth a warning.
LOCK_REPORT_AFTER = 1.0
_POLL_LONGEST = 0.5  # a waiter retries after 10 ms, doubling up to this


def lock_timeout(timeout: float | None = None) -> float | None:
    """Seconds to wait for a lock: `timeout` if given, else $GRAPHBUILD_LOCK_TIMEOUT (so array
    tasks can set it), else None: wait as long as the holder lives."""
    where = "lock timeout"
    if timeout is None:
        value = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
        if not value:
            return None
        where = f"{LOCK_TIMEOUT_ENV}={value!r}"
        try:
            timeout = float(value)
        except ValueError:
            timeout = float("nan")
    if not timeout >= 0:  # also refuses nan
        raise GraphbuildError(f"{where}: must be a number of seconds >= 0")
    return timeout


@contextlib.contextmanager
def file_lock(path: Path, timeout: float | None = None,
              report_every: float = LOCK_REPORT_EVERY) -> Iterator[None]:
    """flock on `path`; released by the kernel if the holder dies, so never stale.

    The holder writes its pid, host and start time into the file. A process that finds the
    lock taken polls for it, logs a warning naming the lock and its holder once it has waited
    LOCK_REPORT_AFTER seconds and again every `report_every` seconds, and raises
    GraphbuildError after `timeout` seconds (`lock_timeout`: default
    $GRAPHBUILD_LOCK_TIMEOUT, else no limit)."""
    timeout = lock_timeout(timeout)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        held = _acquire(fd, path, timeout, report_every)
        if held:
            _write_holder(fd)
        try:
            yield
        finally:
            if held:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # no holder named while nobody holds it
                    fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, timeout: float | None, report_every: float) -> bool:
    """Take the lock, waiting as `file_lock` says; False where the filesystem has no flock
    (some network filesystems), and then nothing is held."""
    start = time.monotonic()
    next_report, pause = start + min(LOCK_REPORT_AFTER, report_every), 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:  # held by another open file: wait below
            pass
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
                return False
            raise
        now = time.monotonic()
        if timeout is not None and now - start >= timeout:
            holder = lock_holder(path)
            raise GraphbuildError(
                f"{path}: still held by {_describe(holder)} after waiting {timeout:g} s; "
                f"{_what_to_do(holder)}")
        if now >= next_report:
            limit = "" if timeout is None else f"; giving up after {timeout:g} s"
            log.warning("%s: waiting for the lock, held by %s; saying so again every %g s%s",
                        path, _describe(lock_holder(path)), report_every, limit)
            next_report = now + report_every
        wait = pause if timeout is None else min(pause, max(0.0, start + timeout - now))
        time.sleep(wait)
        pause = min(2 * pause, _POLL_LONGEST)


def _write_holder(fd: int) -> None:
    """Name this process in the lock file it holds: one JSON line, written at once."""
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        holder["slurm_job"] = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{task}" if task else job
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)


def lock_holder(path: Path) -> dict | None:
    """The holder a lock file names ({pid, host, since[, slurm_job]}), or None if it names
    none (free, held where flock is missing, or caught between truncate and write)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(
        holder.get("since"), (int, float)) and isinstance(holder.get("host"), str)
    return holder if ok else None


def _describe(h: dict | None) -> str:
    """'pid 123 on host node07 (stopped), since 2025-06-01 12:00:00 +0000 (75 s ago)'."""
    if h is None:
        return "another process (it has not named itself in the lock file)"
    since = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(h["since"]))
    job = f", SLURM job {h['slurm_job']}" if h.get("slurm_job") else ""
    return (f"pid {h['pid']} on host {h['host']}{_process_state(h)}{job}, since {since} "
            f"({max(0.0, time.time() - h['since']):.0f} s ago)")


def _process_state(holder: dict) -> str:
    """' (stopped)' when the holder runs on this host and is stopped (SIGSTOP, Ctrl-Z)."""
    if holder["host"] != socket.gethostname():
        return ""
    try:
        stat = Path(f"/proc/{holder['pid']}/stat").read_text()
    except OSError:
        return ""
    state = stat.rsplit(")", 1)[-1].split()[:1]  # the field after "(command name)"
    return " (stopped)" if state in (["T"], ["t"]) else ""


def _what_to_do(h: dict | None) -> str:
    who = f"pid {h['pid']} on host {h['host']}" if h else "the holder"
    return (f"if {who} is gone or stuck (stopped, hung), end it (that frees the lock) and "
            f"rerun; if it is working, wait for it or allow a longer wait (${LOCK_TIMEOUT_ENV}, "
            "seconds)")


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
