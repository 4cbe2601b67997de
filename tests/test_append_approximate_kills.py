"""SIGKILL the approximate graph's update after an append at its kill points; each rerun must
end with the bytes of an update nobody interrupted, no marker may vouch for a half-merged
graph in between, and a knn with other settings is refused in one line mid-update."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from tests.conftest import graphbuild as run_cli
from tests.conftest import one_error
from tests.test_append import tsv, unique_texts
from tests.test_append_kills import APPEND, appended_world, assert_same_tree
from tests.test_append_kills import knn as kill_knn
from tests.test_kill_points import cli, tree_bytes

NEW = range(301, 326)  # 25 rows on 300: below APPROX_UPDATE_MAX_SHARE
KNN = ["knn", "{out}", "--k", "8", "--method", "approximate", "--recall-target", "0.9",
       "--block-rows", "64", "-q"]
KNN3 = [*KNN, "--num-shards", "3", "--shard"]


def knn(out: Path, **kill) -> None:
    kill_knn(out, KNN3, **kill)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished run (approximate, three knn shards), and the same run appended to and
    updated without a kill."""
    out, ref = appended_world(tmp_path_factory.mktemp("append-approx-kill"), NEW, KNN3)
    index = json.loads((ref / "graph/_index/index.json").read_text())
    assert index["index"]["grown_from"] == 300
    return {"old": out, "ref": tree_bytes(ref), "nodes": unique_texts(range(1, 326))}


def check_markers_vouch(run: Path, ref: dict[str, bytes], nodes: int) -> None:
    """Every knn shard marker records the grown store (the base's went before it was set
    aside) and vouches for the final bytes of its part; no _meta.json vouches for the grown
    store while the base is still set aside."""
    grown = f'"n_nodes": {nodes}'
    for marker in (run / "_state/knn").glob("shard-*.done"):
        part = f"graph/part-{int(marker.stem.split('-')[1]):05d}.parquet"
        assert grown in marker.read_text(), marker.name
        assert (run / part).read_bytes() == ref[part], f"{marker.name}: part not whole"
    meta = run / "graph/_meta.json"
    assert not meta.exists() or not (run / "graph-base").exists()


POINTS = [
    "knn.base_set_aside",  # graph/ moved to graph-base, lists not grown
    "ann.grown_index_written",  # grown lists in place, index.json not yet
    "knn.approximate_update_block@2",  # mid-part
    "knn.part_written",  # first part in place, its marker not yet
    "knn.shard_marked@1",
]


@pytest.mark.parametrize("point", POINTS)
def test_kill_the_update_then_rerun(world, tmp_path, point):
    out = shutil.copytree(world["old"].parent, tmp_path / "a") / "run"
    tsv(out.parent / "src" / "b.tsv", NEW)
    assert cli(APPEND, manifest=out.parent / "coco.yaml", out=out).returncode == 0
    killed = cli([*KNN3, "0"], out=out, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, f"never reached {point}: {killed.stderr}"
    check_markers_vouch(out, world["ref"], world["nodes"])
    assert not (out / "graph/_meta.json").exists()
    knn(out)
    assert_same_tree(out, world["ref"])


def test_other_settings_mid_update_are_refused(world, tmp_path):
    """Mid-update, another recall target or method is one line naming --overwrite; readers
    see no graph."""
    out = shutil.copytree(world["old"].parent, tmp_path / "a") / "run"
    tsv(out.parent / "src" / "b.tsv", NEW)
    assert cli(APPEND, manifest=out.parent / "coco.yaml", out=out).returncode == 0
    knn(out, kill_at="knn.shard_marked@1")
    assert (out / "graph-base").exists() and not (out / "graph/_meta.json").exists()
    line = one_error(run_cli("knn", out, "--k", "8", "--method", "approximate",
                             "--recall-target", "0.8", "-q"))
    assert "update of the graph after an append is under way" in line
    assert "recall target 0.9, 0.8 is asked for" in line and "--overwrite" in line
    line = one_error(run_cli("knn", out, "--k", "8", "--method", "exact", "-q"))
    assert "the base is approximate, exact is asked for" in line
    assert "graph" in one_error(run_cli("stats", out))


def test_auto_resumes_an_approximate_update_set_aside(world, tmp_path):
    """Killed once the base is set aside (no _meta.json or params.json left in the run's
    graph), knn with --method auto still resumes the approximate update: the base's method."""
    out = shutil.copytree(world["old"].parent, tmp_path / "a") / "run"
    tsv(out.parent / "src" / "b.tsv", NEW)
    assert cli(APPEND, manifest=out.parent / "coco.yaml", out=out).returncode == 0
    assert cli([*KNN3, "0"], out=out, kill_at="knn.base_set_aside").returncode == -signal.SIGKILL
    auto = [a for a in KNN3 if a not in ("--method", "approximate")]
    for s in range(3):
        r = cli([*auto, str(s)], out=out)
        assert r.returncode == 0, r.stderr[-2000:]
    assert tree_bytes(out) == world["ref"]
