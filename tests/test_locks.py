"""A process waiting for a lock says who holds it (pid, host, since when), says it again
while it waits, and gives up after a timeout with one error line; once the holder ends, the
kernel frees the lock and the waiter goes on.

The holder is a real process that takes the lock with file_lock and is then stopped
(SIGSTOP), the case of the issue: a stopped process keeps its lock and never ends."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graphbuild.errors import GraphbuildError
from graphbuild.rundir.locks import LOCK_TIMEOUT_ENV, file_lock, lock_holder, lock_timeout
from tests.conftest import REPO, graphbuild, one_error

HOLD = """
import sys, time
from pathlib import Path
from graphbuild.rundir.locks import file_lock
with file_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(3600)
"""
KNN_SHARD_LOCK = "_state/knn/shard-00000-of-00001.lock"


@contextlib.contextmanager
def stopped_holder(lock: Path):
    """A process that holds `lock` and is stopped; continued and killed afterwards."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        os.kill(proc.pid, signal.SIGSTOP)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


def test_the_holder_names_itself_in_the_lock_file(tmp_path):
    lock = tmp_path / "x.lock"
    before = time.time()
    with stopped_holder(lock) as holder:
        named = lock_holder(lock)
        assert named["pid"] == holder.pid and named["host"] == socket.gethostname()
        assert before - 1 <= named["since"] <= time.time()
    # killed: the kernel freed the lock; the next holder names itself
    with file_lock(lock, timeout=5):
        assert lock_holder(lock)["pid"] == os.getpid()
    assert lock_holder(lock) is None  # released: the file names nobody


def test_a_waiter_reports_the_holder_again_and_again_then_gives_up(tmp_path, caplog):
    lock = tmp_path / "x.lock"
    with (stopped_holder(lock) as holder, caplog.at_level(logging.WARNING),
          pytest.raises(GraphbuildError) as e, file_lock(lock, timeout=2, report_every=0.4)):
        pass
    reports = [r.getMessage() for r in caplog.records if "waiting for the lock" in r.getMessage()]
    assert len(reports) >= 3, reports  # every 0.4 s for 2 s
    who = f"pid {holder.pid} on host {socket.gethostname()} (stopped)"
    assert all(m.startswith(f"{lock}: waiting for the lock, held by {who}, since ")
               for m in reports), reports
    assert "again every 0.4 s; giving up after 2 s" in reports[0]
    assert str(e.value).startswith(f"{lock}: still held by {who}, since ")
    assert f"if pid {holder.pid} on host {socket.gethostname()} is gone or stuck" in str(e.value)


@pytest.mark.parametrize("lock", [".lock", KNN_SHARD_LOCK], ids=["run-lock", "shard-lock"])
def test_knn_waiting_for_a_stopped_holder_says_who_and_gives_up(coco3k, tmp_path, monkeypatch,
                                                                 lock):
    """`graphbuild knn` on a finished run whose run lock (taken first, to check the graph's
    parameters) or shard lock is held by a stopped process: a warning naming the holder at
    once, then, after GRAPHBUILD_LOCK_TIMEOUT, exit 2 with one error line."""
    run = tmp_path / "run"
    shutil.copytree(coco3k, run)
    with stopped_holder(run / lock) as holder:
        monkeypatch.setenv(LOCK_TIMEOUT_ENV, "4")
        r = graphbuild("knn", run, "--k", "16", timeout=300)
    who = f"held by pid {holder.pid} on host {socket.gethostname()} (stopped), since "
    waiting = [line for line in r.stderr.splitlines() if "waiting for the lock" in line]
    assert waiting and f"{run / lock}: waiting for the lock, {who}" in waiting[0], r.stderr
    error = one_error(r)
    assert error.startswith(f"error: {run / lock}: still {who}"), error
    assert "after waiting 4 s; if pid" in error


def test_knn_waits_for_a_stopped_holder_and_goes_on_when_it_ends(coco3k, tmp_path):
    """Without a timeout the waiter waits as documented (a duplicated array task waits, then
    finds the work done), and says who it waits for while it does."""
    run = tmp_path / "run"
    shutil.copytree(coco3k, run)
    err = tmp_path / "stderr"
    with stopped_holder(run / KNN_SHARD_LOCK) as holder, open(err, "w") as f:
        env = {k: v for k, v in os.environ.items() if k != LOCK_TIMEOUT_ENV}
        waiter = subprocess.Popen([sys.executable, "-m", "graphbuild", "knn", str(run),
                                   "--k", "16"], cwd=REPO, stderr=f, text=True, env=env)
        try:
            deadline = time.time() + 300
            while f"held by pid {holder.pid}" not in err.read_text() and time.time() < deadline:
                assert waiter.poll() is None, err.read_text()
                time.sleep(0.2)
            assert f"held by pid {holder.pid}" in err.read_text()
        finally:
            holder.kill()  # a stopped process dies of SIGKILL; the kernel frees its lock
            holder.wait()
        assert waiter.wait(timeout=300) == 0, err.read_text()
    assert "already done" in err.read_text()


def test_the_timeout_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv(LOCK_TIMEOUT_ENV, raising=False)
    assert lock_timeout() is None  # no limit unless asked
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "90")
    assert lock_timeout() == 90.0 and lock_timeout(5) == 5.0
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(LOCK_TIMEOUT_ENV, bad)
        with pytest.raises(GraphbuildError, match=rf"^{LOCK_TIMEOUT_ENV}='{bad}': must be a"):
            lock_timeout()
    with pytest.raises(GraphbuildError, match="^lock timeout: must be"):
        lock_timeout(-2)
