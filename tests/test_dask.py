"""--engine dask on a real LocalCluster: the same bytes as the local engine, a killed worker
recovered, and dask-jobqueue's SLURMCluster as a documented option."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests import scaleout
from tests.conftest import REPO, graphbuild, write

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as c, Client(c) as client:
        yield c, client


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "graphbuild", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_worker_is_retried_and_the_run_equals_the_local_one(tmp_path, cluster):
    """3 embed shards on 2 worker processes; SIGKILL the worker running a shard part-way.
    Dask reruns that shard on a live worker, it resumes from its markers, and embeddings and
    the exact graph (2 shards, also on Dask) equal the local engine's bit for bit."""
    lc, client = cluster
    m, out = scaleout.manifest(tmp_path), tmp_path / "run"
    chunks = out / "_state" / "embed" / "chunks"
    proc = _cli("embed", m, "--out", out, "--engine", "dask", "--scheduler",
                lc.scheduler_address, "--num-shards", 3, "--chunk-rows", scaleout.CHUNK_ROWS,
                "--precision", scaleout.PRECISION, "-q")
    pids = client.run(os.getpid)
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and proc.poll() is None:
        for worker, keys in client.processing().items():
            for key in keys:
                m_ = re.match(r"graphbuild-embed-(\d+)-of-00003-", str(key))
                if not m_:
                    continue
                s = int(m_.group(1))
                done = sum((chunks / f"{c:06d}.done").exists() for c in range(8 * s, 8 * s + 8))
                if 2 <= done < 8:
                    os.kill(pids[worker], signal.SIGKILL)
                    killed = (s, done)
                    break
            if killed:
                break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=600)
    assert killed is not None, f"no shard was caught part-way: {err}"
    assert proc.returncode == 0, err
    s, done_before = killed
    # the retried shard skipped what it had finished before its worker died
    line = re.search(rf"embed shard {s}/3: \d+ texts .*, [1-9] chunks already done", err)
    assert line, err
    print(f"killed the worker running embed shard {s} after {done_before} of its 8 chunks; "
          f"retried: {line.group(0)}")

    proc = _cli("knn", out, "--k", scaleout.K, "--method", "exact", "--engine", "dask",
                "--scheduler", lc.scheduler_address, "--num-shards", scaleout.KNN_SHARDS, "-q")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "graph complete" in err, err
    scaleout.assert_same_run(out, scaleout.reference())


def test_run_on_a_default_local_cluster_equals_a_local_run(tmp_path):
    """`graphbuild run --engine dask` starts its own LocalCluster (one worker per core)."""
    classes = ", ".join(f"class {i}" for i in range(40))
    m = write(tmp_path / "c.yaml", f"name: c\nclasses: [tabby cat, school bus, {classes}]\n"
              "templates: ['a photo of a {}.']\nexamples: [tabby cat]\n")
    args = ["--k", "8", "--method", "exact", "--precision", "bf16", "-q"]
    local = graphbuild("run", m, "--out", tmp_path / "local", *args)
    dask = graphbuild("run", m, "--out", tmp_path / "dask", "--engine", "dask", *args)
    assert local.returncode == 0 and dask.returncode == 0, dask.stderr
    assert "shards on dask" in dask.stderr
    assert dask.stdout == local.stdout and dask.stdout.startswith("tabby cat  ->")
    assert scaleout.store_bytes(tmp_path / "dask") == scaleout.store_bytes(tmp_path / "local")
    from graphbuild.rundir.graph import read_graph_csr

    for a, b in zip(read_graph_csr(tmp_path / "dask"), read_graph_csr(tmp_path / "local")):
        assert (a == b).all()


def test_engine_flags_are_checked(tmp_path):
    m = write(tmp_path / "c.yaml", "name: c\nclasses: [a, b]\n")
    r = graphbuild("embed", m, "--out", tmp_path / "r", "--engine", "ray")
    assert r.returncode == 2 and "--engine must be one of local, dask" in r.stderr
    r = graphbuild("embed", m, "--out", tmp_path / "r", "--scheduler", "tcp://x:1")
    assert r.returncode == 2 and "--scheduler needs --engine dask" in r.stderr
    r = graphbuild("knn", tmp_path / "r", "--engine", "dask", "--shard", "1")
    assert r.returncode == 2 and "drop --shard" in r.stderr


def test_slurmcluster_is_an_option():
    """pipeline/README.md: a SLURMCluster's scheduler, given to --scheduler."""
    jobqueue = pytest.importorskip("dask_jobqueue")
    with jobqueue.SLURMCluster(cores=8, processes=1, memory="32GB", walltime="02:00:00",
                               queue="gpu", job_extra_directives=["--gpus-per-task=1"],
                               job_script_prologue=["source ~/venvs/gb/bin/activate"],
                               worker_extra_args=["--resources", "GPU=1"],
                               scheduler_options={"dashboard_address": ":0"}) as c:
        script = c.job_script()
    assert "#SBATCH -p gpu" in script and "#SBATCH --gpus-per-task=1" in script
    assert "--resources GPU=1" in script and "source ~/venvs/gb/bin/activate" in script
