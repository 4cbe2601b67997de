"""`graphbuild submit slurm` on a real one-node SLURM cluster started here (tests/slurm_cluster.py).

Needs root and Debian's slurm-wlm and munge (`./dev.sh test` installs them when it can);
without them the cluster tests skip and say why. The script-writing tests need neither.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from graphbuild.rundir.files import write_json
from graphbuild.scale.slurm import SbatchOptions, array_spec, plan, render
from tests import scaleout
from tests.conftest import graphbuild, write
from tests.slurm_cluster import SlurmCluster, why_not_available
from tests.test_status import write_chunk_file, write_graph_part, write_moments_part

COMMAND = f"{sys.executable} -m graphbuild"


def test_array_spec():
    assert array_spec([0, 1, 2, 3]) == "0-3"
    assert array_spec([3, 7, 12]) == "3,7,12"
    assert array_spec([7, 0, 1, 2, 5, 8], 4) == "0-2,5,7-8%4"


def test_script_has_the_options_and_the_explicit_shard(tmp_path):
    opts = SbatchOptions(partition="gpu", account="proj", time="02:00:00", cpus_per_task=8,
                         mem="32G", gpus_per_task=1, extra=["--qos=high", "#SBATCH -C a100"],
                         setup="source ~/venvs/gb/bin/activate", job_name="gb-cc12m")
    text = render("embed", opts, tmp_path / "run dir", 64, ["--chunk-rows", "8192"],
                  tmp_path / "cc12m.yaml")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=02:00:00",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --qos=high", "#SBATCH -C a100", "#SBATCH --requeue",
                 f'#SBATCH --output="{tmp_path}/run dir/logs/embed-%A_%a.out"',
                 "source ~/venvs/gb/bin/activate"):
        assert line in text.splitlines(), line
    # every #SBATCH line comes before the first command, or sbatch ignores it
    lines = [x for x in text.splitlines() if x and not x.startswith("#")]
    assert text.index(lines[0]) > text.rindex("#SBATCH")
    assert '--shard "$shard" --num-shards 64' in text
    knn = render("knn", opts, tmp_path / "run", 32, ["--k", "64"])
    assert "#SBATCH --kill-on-invalid-dep=yes" in knn and "knn " in knn


def test_dry_run_prints_and_submits_nothing(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("name: t\nclasses: [a, b, c]\n")
    r = graphbuild("submit", "slurm", m, "--out", tmp_path / "run", "--embed-shards", "4",
                   "--knn-shards", "2", "--max-parallel", "2", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "sbatch --parsable '--array=0-3%2'" in r.stdout or \
        "sbatch --parsable --array=0-3%2" in r.stdout
    assert "--dependency=afterok:EMBED_JOB_ID" in r.stdout
    assert not (tmp_path / "run").exists()


def test_resubmission_lists_only_unfinished_shards(tmp_path):
    """Markers of a partial run (as embed_shard leaves them): the plan holds the embed
    shards with missing chunks, under any layout, and every knn shard not done."""
    m = write(tmp_path / "m.yaml", "name: t\nclasses: [a, b, c]\n")
    out = tmp_path / "run"
    write_json(out / "embeddings.zarr" / "zarr.json", {
        "shape": [600, 384], "chunk_grid": {"configuration": {"chunk_shape": [100, 384]}}})
    for c in (0, 1, 4, 5):  # shards 0 and 2 of 3 finished, shard 1 not started
        write_chunk_file(out, c, 100 * 384 * 2 + 4)
        write_json(out / "_state" / "embed" / "chunks" / f"{c:06d}.done", {})
    write_graph_part(out, 1, range(200, 400), n_nodes=600, k=4)
    write_json(out / "_state" / "knn" / "shard-00001-of-00003.done",
               {"first": 200, "stop": 400, "edges": 800})
    write_moments_part(out, 1, range(200, 400), num_shards=3)  # knn's shard 1 is whole
    jobs = plan(m, out, SbatchOptions(), 3, 3, [], [])
    assert [(j.stage, j.shards, j.command[2]) for j in jobs] == [
        ("embed", [1], "--array=1"), ("knn", [0, 2], "--array=0,2")]
    # the same chunks under another layout: 6 shards of one chunk, 2 and 3 are missing
    assert plan(m, out, SbatchOptions(), 6, 3, [], [])[0].shards == [2, 3]
    for c in (2, 3):
        write_chunk_file(out, c, 100 * 384 * 2 + 4)
        write_json(out / "_state" / "embed" / "chunks" / f"{c:06d}.done", {})
    assert [j.stage for j in plan(m, out, SbatchOptions(), 3, 3, [], [])] == ["knn"]


# ---- a real cluster ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = why_not_available()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def _submit(manifest: Path, out: Path, monkeypatch, cluster) -> str:
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    r = graphbuild("submit", "slurm", manifest, "--out", out, "--k", scaleout.K,
                   "--embed-shards", 3, "--knn-shards", scaleout.KNN_SHARDS,
                   "--chunk-rows", scaleout.CHUNK_ROWS, "--precision", scaleout.PRECISION,
                   "--method", "exact", "--cpus-per-task", 1, "--time", "00:10:00",
                   "--command", COMMAND)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _pid_of(out: Path, shard: int) -> int | None:
    """The `graphbuild embed --shard N` process of this run, found in /proc."""
    for d in Path("/proc").iterdir():
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"embed" in args and str(out).encode() in args and b"--shard" in args
                and args[args.index(b"--shard") + 1] == str(shard).encode()):
            return int(d.name)
    return None


def test_real_arrays_with_a_killed_task_equal_a_single_process_run(tmp_path, monkeypatch,
                                                                   cluster):
    """A real embed array (3 tasks) and knn array (2 tasks, afterok). SIGKILL embed shard 1
    part-way: its task fails, the knn array is cancelled, status names the failed shard and
    its log; a resubmission reruns only that shard, then knn; the run equals the local one
    bit for bit. The run directory has a space in its name (quoting in the scripts)."""
    m, out = scaleout.manifest(tmp_path), tmp_path / "run 1"
    printed = _submit(m, out, monkeypatch, cluster)
    assert "--array=0-2 " in printed and "--dependency=afterok:" in printed, printed
    first_embed_job = printed.split("-> job ")[1].split()[0]
    chunks = out / "_state" / "embed" / "chunks"
    mine = range(8, 16)  # shard 1 of 3 owns chunks 8..15 of 24
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [c for c in mine if (chunks / f"{c:06d}.done").exists()]
        if len(done) >= 2 and (pid := _pid_of(out, 1)):
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    else:
        pytest.fail("shard 1 never got going")
    cluster.wait_idle(600)
    killed_with = sorted(c for c in mine if (chunks / f"{c:06d}.done").exists())
    assert 2 <= len(killed_with) < 8, "the kill should land part-way through shard 1"
    other = {c: (chunks / f"{c:06d}.done").stat().st_mtime_ns
             for c in range(24) if (chunks / f"{c:06d}.done").exists()}

    st = graphbuild("status", out)
    print(st.stdout)  # the closing note shows it
    assert "failed: embed shard 1: graphbuild: exit 137" in st.stdout, st.stdout
    assert "embed       3     2        0        0      1" in st.stdout
    assert not list((out / "logs").glob("knn-*.out")), "knn must not start after a failed embed"
    assert not (out / "graph").exists()

    printed = _submit(m, out, monkeypatch, cluster)
    assert "--array=1 " in printed and "--array=0-1 " in printed, printed
    cluster.wait_idle(600)
    logs = sorted((out / "logs").glob("*.out"))
    assert len(logs) == 3 + 1 + scaleout.KNN_SHARDS, logs
    for p in logs:
        ok = p.name != f"embed-{first_embed_job}_1.out"
        assert p.read_text().splitlines()[-1].startswith(f"graphbuild: exit {0 if ok else 137}")
    # the chunks done before the kill were not redone, by this shard or any other
    assert all((chunks / f"{c:06d}.done").stat().st_mtime_ns == t for c, t in other.items())
    scaleout.assert_same_run(out, scaleout.reference())
    st = graphbuild("status", out, "--json")
    assert '"failed": []' in st.stdout
