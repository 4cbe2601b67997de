"""Two copies of the same array task leave a correct result; two different shards running at
once never write each other's files (only run.json and the lock files, under the run lock).

Each process records what it writes with a Python audit hook, so the test sees real writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import REPO, caption_manifest, coco_subset, graphbuild

# Runs the CLI with an audit hook that logs every file opened for writing, renamed or removed.
AUDITED = """
import json, runpy, sys
log = open(sys.argv.pop(1), "w")
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[1] and any(c in args[1] for c in "wax+"):
        log.write(json.dumps(["write", args[0]]) + "\\n")
    elif event in ("os.rename", "os.replace", "os.remove"):
        log.write(json.dumps([event, str(args[0]), str(args[1]) if len(args) > 1 else ""]) + "\\n")
    elif event == "open" and isinstance(args[0], str) and isinstance(args[2], int) and args[2] & 0o3:
        log.write(json.dumps(["write", args[0]]) + "\\n")
sys.addaudithook(hook)
sys.argv[0] = "graphbuild"
runpy.run_module("graphbuild", run_name="__main__")
"""


def start(log: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", AUDITED, str(log), *map(str, args)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def written(log: Path, run: Path) -> set[str]:
    """Run-relative paths a process wrote: files it opened for writing, and rename targets."""
    out = set()
    for line in log.read_text().splitlines():
        event, *paths = json.loads(line)
        target = paths[-1] if event in ("os.rename", "os.replace") else paths[0]
        p = Path(target)
        if p.is_relative_to(run):
            rel = p.relative_to(run).as_posix()
            if ".tmp-" not in rel and not rel.endswith(".partial"):  # temps are per process
                out.add(rel)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conc")
    m = caption_manifest(tmp, coco_subset(tmp, 400))
    ref = tmp / "ref"
    assert graphbuild("embed", m, "--out", ref, "--chunk-rows", "64", "-q").returncode == 0
    assert graphbuild("knn", ref, "--k", "8", "-q").returncode == 0
    return m, ref


def finish(*procs: subprocess.Popen) -> list[str]:
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        errs.append(err)
    return errs


def test_two_copies_of_the_same_shard(inputs, tmp_path):
    m, ref = inputs
    out = tmp_path / "run"
    args = ("embed", m, "--out", out, "--chunk-rows", "64", "--shard", "0", "--num-shards", "1")
    errs = finish(start(tmp_path / "a.log", *args), start(tmp_path / "b.log", *args))
    # The shard lock: one copy encoded every text, the other waited and found them done.
    want = zarr.open_array(str(ref / "embeddings.zarr"), mode="r")[:]
    encoded = sorted(int(e.split("embed shard 0/1: ")[1].split(" texts")[0]) for e in errs)
    assert encoded == [0, len(want)], errs
    assert np.array_equal(zarr.open_array(str(out / "embeddings.zarr"), mode="r")[:], want)
    knn = ("knn", out, "--k", "8")
    finish(start(tmp_path / "c.log", *knn), start(tmp_path / "d.log", *knn))
    assert (out / "graph/part-00000.parquet").read_bytes() == \
        (ref / "graph/part-00000.parquet").read_bytes()


def test_different_shards_at_once_write_disjoint_files(inputs, tmp_path):
    m, ref = inputs
    out = tmp_path / "run"
    logs = [tmp_path / f"shard{s}.log" for s in (0, 1)]
    finish(*[start(logs[s], "embed", m, "--out", out, "--chunk-rows", "64", "--shard", s,
                   "--num-shards", "2") for s in (0, 1)])
    knn_logs = [tmp_path / f"knn{s}.log" for s in (0, 1)]
    finish(*[start(knn_logs[s], "knn", out, "--k", "8", "--shard", s, "--num-shards", "2")
             for s in (0, 1)])
    shared = (written(logs[0], out) | written(knn_logs[0], out)) & \
        (written(logs[1], out) | written(knn_logs[1], out))
    # Files both may write, each under the run's lock: run.json, the lock file, the knn
    # parameters both shards claim, and the finished graph's _meta.json and its row moments'
    # (whoever is last).
    allowed = {"run.json", ".lock", "_state/knn/params.json", "graph/_meta.json",
               "graph/_moments/_meta.json"}
    assert shared <= allowed, shared - allowed
    assert written(logs[0], out) & {f"embeddings.zarr/c/{c}/0" for c in range(7)}
    got = zarr.open_array(str(out / "embeddings.zarr"), mode="r")[:]
    assert np.array_equal(got, zarr.open_array(str(ref / "embeddings.zarr"), mode="r")[:])
