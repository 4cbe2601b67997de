"""Locks over a run's shared files and over a shard's work, that say who holds them."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from graphbuild.errors import GraphbuildError

log = logging.getLogger(__name__)


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
