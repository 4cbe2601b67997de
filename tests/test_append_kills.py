"""SIGKILL `embed --append` and the knn update at their kill points; each rerun must end with
the bytes of an append nobody interrupted, and no marker may vouch for partial data (a chunk
or a half-merged graph) in between."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from tests.conftest import caption_manifest, coco_subset
from tests.test_append import NEW, tsv
from tests.test_kill_points import cli, tree_bytes

CHUNK_ROWS = 64  # 300 old nodes: the append grows chunk 4 and adds chunk 5
EMBED = ["embed", "{manifest}", "--out", "{out}", "--chunk-rows", str(CHUNK_ROWS), "-q"]
APPEND = [*EMBED, "--append"]
KNN = ["knn", "{out}", "--k", "8", "--method", "exact", "--block-rows", "64", "-q"]
KNN3 = [*KNN, "--num-shards", "3", "--shard"]


def knn(out: Path, knn3: list[str] = KNN3, **kill) -> None:
    """knn's three shards (`knn3` + the shard's number), stopping at a kill's SIGKILL."""
    for s in range(3):
        r = cli([*knn3, str(s)], out=out, **kill)
        if kill and r.returncode == -signal.SIGKILL:
            return
        assert r.returncode == 0, r.stderr[-2000:]


def appended_world(tmp: Path, new: range, knn3: list[str]) -> tuple[Path, Path]:
    """(old, ref): a finished run of 300 COCO captions in tmp/old (knn in three shards by
    `knn3`), and a copy in tmp/ref appended to with the caption lines `new` and updated,
    without a kill."""
    src = tmp / "old" / "src"
    coco_subset(src, 300).rename(src / "a.tsv")
    manifest = caption_manifest(tmp / "old", Path("src/*.tsv"))  # relative: copies move
    out = tmp / "old" / "run"
    assert cli(EMBED, manifest=manifest, out=out).returncode == 0
    knn(out, knn3)
    ref = shutil.copytree(tmp / "old", tmp / "ref") / "run"
    tsv(ref.parent / "src" / "b.tsv", new)
    assert cli(APPEND, manifest=ref.parent / "coco.yaml", out=ref).returncode == 0
    knn(ref, knn3)
    assert not (ref / "graph-base").exists()
    return out, ref


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished run (three knn shards), and the same run appended to without a kill."""
    out, ref = appended_world(tmp_path_factory.mktemp("append-kill"), NEW, KNN3)
    return {"old": out, "ref": tree_bytes(ref)}


def check_markers_vouch(run: Path, ref: dict[str, bytes]) -> None:
    """Every chunk marker, knn shard marker and _meta.json present vouches for the final
    bytes or, where the update has not started, for the finished base graph."""
    grown = json.loads((run / "embeddings.zarr/zarr.json").read_text())["shape"][0] == 340
    for marker in (run / "_state/embed/chunks").glob("*.done"):
        key = f"embeddings.zarr/c/{int(marker.stem)}/0"
        same = (run / key).read_bytes() == ref[key]
        assert same or (not grown and int(marker.stem) == 4), f"chunk {marker.stem}: not whole"
    graph = run / "graph"
    meta = graph / "_meta.json"
    for marker in (run / "_state/knn").glob("shard-*.done"):
        part = f"graph/part-{int(marker.stem.split('-')[1]):05d}.parquet"
        if '"n_nodes": 340' in marker.read_text():
            assert (run / part).read_bytes() == ref[part], f"{marker.name}: part not whole"
    if meta.exists() and '"n_nodes": 340' in meta.read_text():
        for name, data in ref.items():
            if name.startswith("graph/part-"):
                assert (run / name).read_bytes() == data


POINTS = [
    ("embed", "append.tables_built"),  # tables built aside, not moved
    ("embed", "append.table_moved@1"),  # nodes.parquet moved in, samples.parquet not
    ("embed", "append.table_moved@2"),  # both moved, run.json not yet
    ("embed", "append.chunk_unmarked"),  # grown chunk unmarked, store not grown
    ("embed", "append.store_grown"),  # zarr.json grown, nothing encoded
    ("embed", "zarr.mid_write@1"),  # half of the grown chunk's file
    ("embed", "embed.chunk_written@1"),  # grown chunk written, not marked
    ("knn", "knn.base_markers_removed"),  # old markers gone, base still in graph/
    ("knn", "knn.base_set_aside"),  # graph/ moved to graph-base
    ("knn", "knn.update_block_merged@3"),  # mid-part
    ("knn", "knn.part_written"),  # first part in place, its marker not yet
    ("knn", "knn.shard_marked@1"),
]


@pytest.mark.parametrize("stage,point", POINTS, ids=[f"{s}-{p}" for s, p in POINTS])
def test_kill_append_then_rerun(world, tmp_path, stage, point):
    out = shutil.copytree(world["old"].parent, tmp_path / "a") / "run"
    manifest = out.parent / "coco.yaml"
    tsv(out.parent / "src" / "b.tsv", NEW)
    if stage == "embed":
        killed = cli(APPEND, kill_at=point, manifest=manifest, out=out)
        assert killed.returncode == -signal.SIGKILL, f"never reached {point}: {killed.stderr}"
        check_markers_vouch(out, world["ref"])
        assert cli(APPEND, manifest=manifest, out=out).returncode == 0
        knn(out)
    else:
        assert cli(APPEND, manifest=manifest, out=out).returncode == 0
        knn(out, kill_at=point)
        check_markers_vouch(out, world["ref"])
        assert not (out / "graph/_meta.json").exists() or not (out / "graph-base").exists() \
            or '"n_nodes": 300' not in (out / "graph/_meta.json").read_text()
        knn(out)
    assert_same_tree(out, world["ref"])


def assert_same_tree(out: Path, ref: dict) -> None:
    """The run's files are `ref`'s, byte for byte (tree_bytes), and no update base is left."""
    got = tree_bytes(out)
    assert sorted(got) == sorted(ref), set(got) ^ set(ref)
    assert [n for n in got if got[n] != ref[n]] == []
    assert not (out / "graph-base").exists()

def test_a_killed_update_leaves_no_graph_for_readers(world, tmp_path):
    """Mid-update, readers see no graph (no _meta.json vouches for a half-merged one)."""
    from tests.conftest import graphbuild as run_cli
    from tests.conftest import one_error

    out = shutil.copytree(world["old"].parent, tmp_path / "a") / "run"
    tsv(out.parent / "src" / "b.tsv", NEW)
    assert cli(APPEND, manifest=out.parent / "coco.yaml", out=out).returncode == 0
    knn(out, kill_at="knn.shard_marked@1")
    assert not (out / "graph/_meta.json").exists() and (out / "graph-base").exists()
    assert "graph" in one_error(run_cli("stats", out))
