"""SIGKILL `embed`, `knn` and `run` at many points on real captions; each rerun must finish with
the same bytes as an uninterrupted run, and no marker may ever vouch for partial data.

Kill points are named hooks (graphbuild/faults.py), plus a few timed kills at seeded delays.
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
    assert cli(RUN, manifest=manifest, out=ran).returncode == 0
    refs["run"] = tree_bytes(ran)
    return {"tmp": tmp, "manifest": manifest, "embedded": embedded, "refs": refs}


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
    ("knn", "knn.meta_written"),  # _meta.json in place, run.json not yet
    ("knn", "json.mid_write@4"),  # half of run.json's update
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


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_timed_kill_of_run(world, tmp_path, seed):
    """SIGKILL `graphbuild run` at a seeded moment, wherever it happens to be."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "GRAPHBUILD_KILL_AT"}
    argv = [a.format(manifest=world["manifest"], out=out) for a in RUN]
    p = subprocess.Popen([sys.executable, "-m", "graphbuild", *argv], env=env, cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(3.0, 9.0))
    p.send_signal(signal.SIGKILL)
    p.wait()
    check_markers_vouch(out, world["refs"]["run"])
    rerun = cli(RUN, manifest=world["manifest"], out=out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    check_same_and_whole(out, world["refs"]["run"])
