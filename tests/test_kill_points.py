"""SIGKILL `embed`, `knn` and `run` at many points on real captions; each rerun must finish with
the same bytes as an uninterrupted run, and no marker may ever vouch for partial data.

Kill points are named hooks (graphbuild/faults.py), plus a few timed kills at seeded moments
inside the phases of an uninterrupted run, each checked to have landed while the run was working.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, caption_manifest, coco_subset

CAPTIONS = 320
CHUNK_ROWS = 64  # 5 chunks, so kills land between chunks as well as inside them
EMBED = ["embed", "{manifest}", "--out", "{out}", "--chunk-rows", str(CHUNK_ROWS), "-q"]
KNN = ["knn", "{out}", "--k", "8", "--block-rows", "64", "-q"]
KNN_APPROX = [*KNN, "--method", "approximate", "--recall-target", "0.9"]
RUN = ["run", "{manifest}", "--out", "{out}", "--k", "8", "--examples", "0", "-q"]
# Files whose bytes must not depend on kills; run.json and _state hold timings.
COMPARED = ("nodes.parquet", "samples.parquet", "embeddings.zarr", "graph")


def cli(args: list[str], kill_at: str | None = None, **fmt) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GRAPHBUILD_KILL_AT"}
    if kill_at:
        env["GRAPHBUILD_KILL_AT"] = kill_at
    argv = [a.format(**fmt) for a in args]
    return subprocess.run([sys.executable, "-m", "graphbuild", *argv], capture_output=True,
                          check=False,  # the exit code is what the tests look at
                          text=True, timeout=600, env=env, cwd=REPO)


def tree_bytes(root: Path) -> dict[str, bytes]:
    out = {}
    for name in COMPARED:
        base = root / name
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for p in files:
            rel = p.relative_to(root).as_posix()
            if "/_index/" not in f"/{rel}":  # the faiss index: a cache, not a result
                out[rel] = p.read_bytes()
    return out


# Files that appear, in this order, as `graphbuild run` works (RUN: one embed chunk, one knn
# shard), and the phase each one starts; graph/_meta.json ends the work.
MILESTONES = {
    "_state/embed/shard-00000-of-00001.lock": "loading the model",
    "embeddings.zarr/zarr.json": "encoding",
    "_state/knn/params.json": "searching",
    "graph/_meta.json": "finishing",
}
FINISHED = "graph/_meta.json"
POLL = 0.002


def start_run(manifest: Path, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "GRAPHBUILD_KILL_AT"}
    argv = [a.format(manifest=manifest, out=out) for a in RUN]
    return subprocess.Popen([sys.executable, "-m", "graphbuild", *argv], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs, and reference runs nobody interrupted."""
    tmp = tmp_path_factory.mktemp("kill")
    manifest = caption_manifest(tmp, coco_subset(tmp, CAPTIONS))
    embedded = tmp / "embedded"
    assert cli(EMBED, manifest=manifest, out=embedded).returncode == 0
    refs = {}
    for name, args in (("exact", KNN), ("approx", KNN_APPROX)):
        shutil.copytree(embedded, tmp / name)
        assert cli(args, out=tmp / name).returncode == 0
        refs[name] = tree_bytes(tmp / name)
    ran = tmp / "ran"
    p, timeline = start_run(manifest, ran), {}
    while True:
        exited = p.poll() is not None
        timeline.update((name, time.monotonic()) for name in MILESTONES
                        if name not in timeline and (ran / name).exists())
        if exited:
            break
        time.sleep(POLL)
    assert p.returncode == 0 and list(timeline) == list(MILESTONES), timeline
    refs["run"] = tree_bytes(ran)
    return {"tmp": tmp, "manifest": manifest, "embedded": embedded, "refs": refs,
            "timeline": timeline}


def check_markers_vouch(run: Path, ref: dict[str, bytes]) -> None:
    """Everything a done marker (or _meta.json) vouches for is whole and correct."""
    import zarr

    chunks = sorted((run / "_state/embed/chunks").glob("*.done"))
    if chunks:
        arr = zarr.open_array(str(run / "embeddings.zarr"), mode="r")
        for marker in chunks:
            c = int(marker.stem)
            key = f"embeddings.zarr/c/{c}/0"
            assert (run / key).read_bytes() == ref[key], f"chunk {c} marked done, data differs"
            assert np.isfinite(arr[c * CHUNK_ROWS:(c + 1) * CHUNK_ROWS].astype(np.float32)).all()
    for marker in (run / "_state/knn").glob("shard-*.done"):
        part = f"graph/part-{int(marker.stem.split('-')[1]):05d}.parquet"
        assert (run / part).read_bytes() == ref[part], f"{marker.name}: its part is not whole"
    for marker in (run / "_state/knn").glob("moments-shard-*.done"):
        part = f"graph/_moments/part-{int(marker.stem.split('-')[2]):05d}.parquet"
        assert (run / part).read_bytes() == ref[part], f"{marker.name}: its part is not whole"
    if (run / "graph/_moments/_meta.json").exists():
        for name, data in ref.items():
            if name.startswith("graph/_moments/part-"):
                assert (run / name).read_bytes() == data
    if (run / "graph/_meta.json").exists():
        for name, data in ref.items():
            if name.startswith("graph/part-"):
                assert (run / name).read_bytes() == data
    if (run / "samples.parquet").exists():  # written last of the two tables
        assert (run / "nodes.parquet").read_bytes() == ref["nodes.parquet"]


def check_same_and_whole(run: Path, ref: dict[str, bytes]) -> None:
    from graphbuild.rundir.graph import read_graph_csr

    got = tree_bytes(run)
    if not (run / "graph").exists():  # an embed-only run: compare what embed writes
        ref = {name: data for name, data in ref.items() if not name.startswith("graph/")}
    assert sorted(got) == sorted(ref), set(got) ^ set(ref)
    assert [n for n in ref if got[n] != ref[n]] == []
    if (run / "graph").exists():  # read_graph_csr checks rows are contiguous: none lost or twice
        indptr, indices, _ = read_graph_csr(run)
        n = len(indptr) - 1
        assert np.all(np.diff(indptr) == 8) and indices.min() >= 0 and indices.max() < n
    assert pq.read_table(run / "samples.parquet").num_rows == CAPTIONS
    assert list(run.rglob("*.tmp-*")) == [] and list(run.rglob("*.partial")) == []


# (stage, kill point): stage picks the command and the starting state.
POINTS = [
    ("embed", "tables.table_written@1"),  # nodes.parquet in place, samples.parquet not
    ("embed", "tables.table_written@2"),
    ("embed", "embed.tables_written"),  # tables in place, run.json not yet
    ("embed", "json.mid_write@1"),  # half of run.json's temp file written
    ("embed", "before_replace@3"),  # run.json's temp file whole, not yet renamed
    ("embed", "zarr.mid_write@1"),  # half of the store's metadata
    ("embed", "zarr.mid_write@2"),  # half of the first chunk
    ("embed", "zarr.mid_write@4"),  # half of the third chunk
    ("embed", "embed.chunk_encoded@1"),
    ("embed", "embed.chunk_written@1"),  # data in place, marker not yet
    ("embed", "embed.chunk_written@4"),
    ("embed", "json.mid_write@3"),  # half of the second chunk's marker
    ("embed", "embed.shard_marked"),  # all done, run.json not yet updated
    ("knn", "knn.claimed"),
    ("knn", "json.mid_write@1"),  # half of params.json
    ("knn", "parquet.row_group_written"),  # row group written, footer not: mid-Parquet
    ("knn", "before_replace@2"),  # the part's temp file whole, not yet renamed
    ("knn", "knn.part_written"),  # part in place, marker not yet
    ("knn", "knn.shard_marked"),
    ("knn", "parquet.row_group_written@2"),  # the moments part's row group, footer not yet
    ("knn", "knn.moments_written"),  # moments part in place, its marker not yet
    ("knn", "json.mid_write@3"),  # half of the moments marker
    ("knn", "knn.meta_written"),  # _meta.json in place, the moments' _meta.json not yet
    ("knn", "knn.moments_meta_written"),  # both _meta.json in place, run.json not yet
    ("knn", "json.mid_write@6"),  # half of run.json's update
    ("approx", "ann.index_written"),  # faiss index saved, tuning not yet
    ("approx", "knn.block_searched@3"),  # mid-search
    ("run", "embed.shard_marked"),
    ("run", "knn.claimed"),
    ("run", "parquet.row_group_written"),
]


@pytest.mark.parametrize("stage,point", POINTS, ids=[f"{s}-{p}" for s, p in POINTS])
def test_kill_then_rerun(world, tmp_path, stage, point):
    out = tmp_path / "run"
    if stage in ("knn", "approx"):
        shutil.copytree(world["embedded"], out)
    args = {"embed": EMBED, "knn": KNN, "approx": KNN_APPROX, "run": RUN}[stage]
    ref = world["refs"]["exact" if stage in ("embed", "knn") else stage]
    killed = cli(args, kill_at=point, manifest=world["manifest"], out=out)
    assert killed.returncode == -signal.SIGKILL, f"never reached {point}: {killed.stderr[-2000:]}"
    check_markers_vouch(out, ref)
    rerun = cli(args, manifest=world["manifest"], out=out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    check_same_and_whole(out, ref)


def kill_mid_run(manifest: Path, out: Path, milestone: str, delay: float) -> str:
    """SIGKILL `graphbuild run` `delay` seconds after `milestone` appears, and make sure the
    kill landed while it was working (alive, its graph not finished). A kill that came too
    late is no test of a killed run: the run is started again with a quarter of the delay, a
    few times, then the test fails. Returns where the kill landed."""
    for _ in range(3):
        p = start_run(manifest, out)
        deadline = time.monotonic() + 300
        while not (out / milestone).exists():
            assert p.poll() is None, f"the run exited ({p.returncode}) before {milestone}"
            assert time.monotonic() < deadline, f"{milestone} never appeared"
            time.sleep(POLL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if p.returncode == -signal.SIGKILL and not (out / FINISHED).exists():
            reached = [n for n in MILESTONES if (out / n).exists()]
            return f"{delay:.3f}s after {milestone}, while {MILESTONES[reached[-1]]}"
        shutil.rmtree(out)  # finished (or exited) before the kill: not a mid-run kill
        delay /= 4
    pytest.fail(f"no kill landed mid-run: the run finished within {4 * delay:.3f}s of "
                f"{milestone}")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_timed_kill_of_run(world, tmp_path, seed):
    """SIGKILL `graphbuild run` at a seeded moment inside one of its phases (seed 1: loading
    the model, 2: encoding, 3: searching), placed by the phase's length in the uninterrupted
    run, wherever in the code that happens to be."""
    out = tmp_path / "run"
    names = list(MILESTONES)
    start, end = names[seed - 1], names[seed]
    length = world["timeline"][end] - world["timeline"][start]
    landed = kill_mid_run(world["manifest"], out, start,
                          random.Random(seed).uniform(0.1, 0.6) * length)
    print(f"killed {landed}")
    check_markers_vouch(out, world["refs"]["run"])
    rerun = cli(RUN, manifest=world["manifest"], out=out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    check_same_and_whole(out, world["refs"]["run"])
