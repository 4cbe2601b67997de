"""`graphbuild embed --append` then `graphbuild knn`: new captions appended to a finished run.

The promise: the appended run is the run a from-scratch build over the old files then the new
ones gives: the same tables, the same stored rows (when the append starts on a chunk edge;
else the old rows keep their bits and the new ones are encoded apart), the same exact graph
bytes for any shard count. And each way an append can be wrong is one line, exit 2, with the
finished run untouched.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

import graphbuild
from tests.conftest import COCO, one_error, write
from tests.conftest import graphbuild as cli

OLD = range(1, 301)  # caption lines of the old file (line 0 is the header)
NEW = range(301, 341)
K = 8


def tsv(path: Path, lines: range) -> Path:
    rows = COCO.read_text(encoding="utf-8").splitlines()
    return write(path, "\n".join([rows[0], *(rows[i] for i in lines)]) + "\n")


def manifest(folder: Path, templates: str = "") -> Path:
    return write(folder / "m.yaml", "name: coco\nsource: {path: src/*.tsv, format: tsv}\n"
                 f"id_column: caption_id\ntext_column: caption\n{templates}")


def unique_texts(lines: range) -> int:
    rows = COCO.read_text(encoding="utf-8").splitlines()
    return len({" ".join(rows[i].split("\t")[-1].split()) for i in lines})


def knn_all(out: Path, shards: int) -> None:
    for s in range(shards):
        graphbuild.knn(out, K, method="exact", shard=s, num_shards=shards, block_rows=64)


def built(folder: Path, lines: list[range], chunk_rows: int, shards: int) -> Path:
    """A finished run over one file per range (a.tsv, b.tsv, ...), exact k=K."""
    for name, rows in zip("abc", lines):
        tsv(folder / "src" / f"{name}.tsv", rows)
    out = folder / "run"
    graphbuild.embed(manifest(folder), out, chunk_rows=chunk_rows)
    knn_all(out, shards)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Old runs (exact graphs in 1 and 3 shards) and from-scratch runs over old + new files,
    with chunks of the old node count, so the append starts on a chunk edge."""
    tmp = tmp_path_factory.mktemp("append")
    rows = unique_texts(OLD)
    old = {s: built(tmp / f"old{s}", [OLD], rows, s) for s in (1, 3)}
    scratch = {s: built(tmp / f"scratch{s}", [OLD, NEW], rows, s) for s in (1, 3)}
    return {"tmp": tmp, "rows": rows, "old": old, "scratch": scratch}


def copy_run(old: Path, to: Path) -> Path:
    """A copy of a finished run's folder (manifest, src, run) to break or append to."""
    shutil.copytree(old.parent, to)
    return to / "run"


def append(out: Path, rows: int) -> None:
    tsv(out.parent / "src" / "b.tsv", NEW)
    graphbuild.embed(out.parent / "m.yaml", out, chunk_rows=rows, append=True)


def chunk_files(out: Path) -> dict[str, bytes]:
    store = out / "embeddings.zarr" / "c"
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in store.rglob("*")
            if p.is_file()}


def graph_files(out: Path) -> dict[str, bytes]:
    """The graph's parts and _meta.json, and its row moments' (graph/_moments)."""
    graph = out / "graph"
    return {p.relative_to(graph).as_posix(): p.read_bytes()
            for p in (*graph.glob("*"), *(graph / "_moments").glob("*")) if p.is_file()}


@pytest.mark.parametrize("old_shards,new_shards", [(1, 1), (3, 3), (1, 3)])
def test_append_gives_the_from_scratch_run(world, tmp_path, old_shards, new_shards):
    out = copy_run(world["old"][old_shards], tmp_path / "a")
    append(out, world["rows"])
    knn_all(out, new_shards)
    ref = world["scratch"][new_shards]
    for table in ("nodes.parquet", "samples.parquet"):
        assert (out / table).read_bytes() == (ref / table).read_bytes(), table
    assert chunk_files(out) == chunk_files(ref)
    got, want = graph_files(out), graph_files(ref)
    assert sorted(got) == sorted(want) and len(got) == 2 * (new_shards + 1)
    assert [name for name in want if got[name] != want[name]] == []
    assert not (out / "graph-base").exists()
    info = graphbuild.rundir.paths.RunDir(out).read_run()
    assert info["stages"]["knn"]["updated_from_nodes"] == world["rows"]
    assert info["dataset"]["appends"][0]["files"] == ["b.tsv"]


def test_append_inside_a_chunk_keeps_old_rows_and_gives_exact_lists(world, tmp_path):
    """chunk_rows 64 does not divide the old node count: the chunk the append grows keeps its
    old rows' bits; the updated graph equals an exact search from scratch of the same store."""
    rows = world["rows"]
    assert rows % 64
    out = built(tmp_path / "a", [OLD], 64, 1)
    before = {c: v for c, v in chunk_files(out).items()}
    old_rows = graphbuild.rundir.store.StoredRows(out / "embeddings.zarr").load()
    tsv(out.parent / "src" / "b.tsv", NEW)
    r = graphbuild.embed(out.parent / "m.yaml", out, chunk_rows=64, append=True)
    assert r.texts_encoded == unique_texts(range(1, 341)) - rows  # old rows kept, not encoded
    now = chunk_files(out)
    last = rows // 64
    assert all(now[c] == v for c, v in before.items() if c != f"{last}/0") and len(now) > len(before)
    grown = graphbuild.rundir.store.StoredRows(out / "embeddings.zarr").load()
    assert np.array_equal(grown[:rows].view(np.uint16), old_rows.view(np.uint16))
    knn_all(out, 2)
    scratch = copy_run(out, tmp_path / "b")
    shutil.rmtree(scratch / "graph")
    shutil.rmtree(scratch / "_state" / "knn")
    knn_all(scratch, 2)
    assert graph_files(out) == graph_files(scratch)


def test_a_rerun_of_append_with_nothing_new_changes_nothing(world, tmp_path):
    out = copy_run(world["old"][1], tmp_path / "a")
    before = tree_digest(out, skip=("run.json", "_state"))
    r = graphbuild.embed(out.parent / "m.yaml", out, chunk_rows=world["rows"], append=True)
    assert r.texts_encoded == 0 and r.complete
    assert tree_digest(out, skip=("run.json", "_state")) == before


def tree_digest(out: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file of a run, lock files aside (taking a lock creates its file)."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and not p.name.endswith(".lock")
            and not p.relative_to(out).as_posix().startswith(skip)}


def refused(out: Path, *extra: str) -> str:
    """Run the append through the CLI; check it is one error line, exit 2, run untouched."""
    before = tree_digest(out)
    r = cli("embed", out.parent / "m.yaml", "--out", out, "--chunk-rows", "64", "--append",
            "-q", *extra)
    line = one_error(r)
    assert tree_digest(out) == before
    return line


@pytest.fixture
def finished(world, tmp_path):
    return copy_run(world["old"][1], tmp_path / "a")


def test_append_refuses_a_changed_old_source(finished):
    old = finished.parent / "src" / "a.tsv"
    old.write_text(old.read_text().replace("A ", "The ", 1))
    tsv(finished.parent / "src" / "b.tsv", NEW)
    line = refused(finished)
    assert str(old) in line and "changed since" in line


def test_append_refuses_a_removed_old_source(finished):
    old = finished.parent / "src" / "a.tsv"
    old.rename(finished.parent / "src" / "b.tsv")
    tsv(finished.parent / "src" / "c.tsv", NEW)
    line = refused(finished)
    assert "a.tsv" in line and "no longer gives it" in line


def test_append_refuses_a_new_file_sorting_before_the_old(finished):
    tsv(finished.parent / "src" / "0.tsv", NEW)
    line = refused(finished)
    assert "0.tsv" in line and "sorts before" in line


def test_append_refuses_another_precision_or_templates(finished):
    tsv(finished.parent / "src" / "b.tsv", NEW)
    assert "precision='bf16'" in refused(finished, "--precision", "fp32")
    manifest(finished.parent, "templates: ['a photo of {}.']\n")
    assert "templates" in refused(finished)


def test_append_refuses_new_rows_with_old_sample_ids(finished):
    rows = COCO.read_text(encoding="utf-8").splitlines()
    write(finished.parent / "src" / "b.tsv", "\n".join([rows[0], rows[341], rows[5]]) + "\n")
    line = refused(finished)
    assert "b.tsv" in line and "duplicate sample id" in line


def test_append_refuses_a_half_done_knn(world, tmp_path):
    out = copy_run(world["old"][1], tmp_path / "a")
    shutil.rmtree(out / "graph")
    shutil.rmtree(out / "_state" / "knn")
    graphbuild.knn(out, K, method="exact", shard=0, num_shards=2, block_rows=64)
    tsv(out.parent / "src" / "b.tsv", NEW)
    assert "knn is half done" in refused(out)


def test_append_refuses_a_concurrent_append(finished):
    from graphbuild.rundir.locks import file_lock

    tsv(finished.parent / "src" / "b.tsv", NEW)
    with file_lock(finished / ".append.lock"):
        line = refused(finished)
    assert "another append into this run is running" in line


def test_without_append_a_new_file_is_refused_naming_the_flag(finished):
    tsv(finished.parent / "src" / "b.tsv", NEW)
    before = tree_digest(finished)
    line = one_error(cli("embed", finished.parent / "m.yaml", "--out", finished, "-q"))
    assert "b.tsv" in line and "--append" in line and tree_digest(finished) == before


def test_a_stale_graph_after_append_is_refused_until_knn(world, tmp_path):
    out = copy_run(world["old"][1], tmp_path / "a")
    append(out, world["rows"])
    stale = cli("validate", out)
    assert stale.returncode == 1 and "the run was appended to since" in stale.stdout, stale.stdout
    assert "appended to since" in one_error(cli("stats", out))
    status = cli("status", out)
    assert "the graph covers the first 300 nodes of an appended run" in status.stdout
    knn_all(out, 1)
    r = cli("validate", out)
    nodes = unique_texts(range(1, 341))
    assert r.returncode == 0 and f"on {nodes} nodes" in r.stdout, r.stdout + r.stderr
    stats = cli("stats", out, "--json")
    assert stats.returncode == 0 and '"nodes": 340' in stats.stdout.replace(" ", " ")
    status = cli("status", out, "--json")
    assert '"complete": true' in status.stdout and "graph_covers" not in status.stdout


def test_the_trainer_sees_the_new_samples(world, tmp_path):
    """WithNodes joins appended ids to their nodes, and exact and graph targets cover them."""
    import torch

    from graphbuild.xclr import Graph, SoftTargets, WithNodes

    out = copy_run(world["old"][1], tmp_path / "a")
    append(out, world["rows"])
    knn_all(out, 1)
    rows = COCO.read_text(encoding="utf-8").splitlines()
    ids = [rows[i].split("\t")[0] for i in (*OLD, *NEW)]  # the run's ids are strings
    data = WithNodes(list(range(len(ids))), run=out, ids=ids, with_node=True)
    _, sample, node = data[len(ids) - 1]
    assert sample == len(ids) - 1 and node >= world["rows"]
    batch = torch.tensor([0, len(ids) - 2, len(ids) - 1])
    for mode in ("exact", "graph"):
        t = SoftTargets.from_run(out, mode=mode, tau_s=0.1)(batch)
        assert t.shape == (3, 3) and torch.allclose(t.sum(1), torch.ones(3))
    graph = Graph(out)
    assert graph.n_nodes == unique_texts(range(1, 341))
    indptr, indices, _ = graph.csr
    assert indptr[-1] - indptr[-2] == K and indices[indptr[-2]:].max() < graph.n_nodes


def test_an_approximate_graph_after_a_large_append_is_rebuilt(world, tmp_path, caplog):
    """40 new rows on 300 are above APPROX_UPDATE_MAX_SHARE: knn with the graph's settings
    rebuilds it, saying why, with its recall measured; other settings are refused as stale
    (tests/test_append_approximate.py: the update below the share)."""
    import logging

    out = copy_run(world["old"][1], tmp_path / "a")
    graphbuild.knn(out, K, method="approximate", overwrite=True, recall_target=0.9)
    append(out, world["rows"])
    line = one_error(cli("knn", out, "--k", str(K), "--recall-target", "0.8", "-q"))
    assert "recall_target=0.9" in line and "--overwrite" in line
    with caplog.at_level(logging.WARNING, logger="graphbuild.graph"):
        r = graphbuild.knn(out, K, method="approximate", recall_target=0.9)
    assert "rebuilding the approximate graph" in caplog.text and "0.133" in caplog.text
    meta = graphbuild.rundir.graph.read_meta(out)
    assert r.complete and meta["n_nodes"] == 340 and meta["recall"] == r.recall >= 0.9


def test_old_lists_merged_with_new_rows_equal_a_full_search_with_ties():
    """Old rows whose new neighbours tie with old ones (repeated vectors on both sides): the
    merge keeps the smaller id, as a full exact search does."""
    from graphbuild.graph.exact import blocked_topk, error_bound
    from graphbuild.graph.update import merged_with_new, new_candidates

    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 48)).astype(np.float32)
    x[500:540] = x[100:140]  # new rows repeating old ones: exact ties across the boundary
    x[540:560] = x[0:20] * -1
    x16 = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    base, k = 500, 10
    base_ids, base_sims = blocked_topk(x16[:base], k, block_rows=128, device="cpu")
    pairs = new_candidates(x16, range(base), range(base, 600), base_sims[:, -1],
                           error_bound(x16), "cpu", 128)
    ids, sims = merged_with_new(x16, range(base), base_ids, base_sims, *pairs, k)
    want_ids, want_sims = blocked_topk(x16, k, range(base), block_rows=128, device="cpu")
    assert np.array_equal(ids, want_ids) and np.array_equal(sims, want_sims)
    assert (ids >= base).any()  # the new rows did enter lists


def test_an_append_larger_than_a_shard_gives_the_exact_graph(tmp_path):
    """New rows in two of three shards: the middle shard's old rows take their pairs with its
    own new rows from that search's products, and with the last shard's new rows from their
    own products; every shard's rows equal a from-scratch exact search of the same store."""
    out = built(tmp_path / "a", [range(1, 121)], 64, 3)
    tsv(out.parent / "src" / "b.tsv", range(121, 341))
    graphbuild.embed(out.parent / "m.yaml", out, chunk_rows=64, append=True)
    from graphbuild.shards import shard_range

    n = graphbuild.rundir.store.StoredRows(out / "embeddings.zarr").shape[0]
    base = unique_texts(range(1, 121))
    middle = shard_range(n, 1, 3)
    assert middle.start < base < middle.stop  # old and new rows; shard 2 holds new rows only
    knn_all(out, 3)
    assert graphbuild.rundir.paths.RunDir(out).read_run()["stages"]["knn"][
        "updated_from_nodes"] == base
    scratch = copy_run(out, tmp_path / "b")
    shutil.rmtree(scratch / "graph")
    shutil.rmtree(scratch / "_state" / "knn")
    knn_all(scratch, 3)
    assert graph_files(out) == graph_files(scratch)


@pytest.mark.parametrize("old_rows,searched", [(range(500), range(500, 600)),
                                               (range(200, 500), range(500, 550))])
def test_old_rows_pairs_from_the_new_rows_search_give_exact_lists(old_rows, searched):
    """OldRowPairs reads, from the products of the new rows' search (blocked_topk's
    on_plain_block), every pair of an old row with a searched new row that can enter its list
    (repeated vectors make exact ties across the boundary); new rows searched elsewhere come
    from new_candidates. The merged lists equal a full exact search's."""
    from graphbuild.graph.exact import blocked_topk, error_bound
    from graphbuild.graph.update import OldRowPairs, merged_with_new, new_candidates

    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 48)).astype(np.float32)
    x[500:540] = x[100:140]
    x[560:580] = x[300:320]  # ties with new rows the search of 500..550 does not hold
    x16 = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    base, k, bound = 500, 10, error_bound(x16)
    base_ids, base_sims = blocked_topk(x16[:base], k, old_rows, block_rows=64, device="cpu")
    pairs = OldRowPairs(old_rows, base_sims[:, -1], bound, "bf16", "cpu")
    blocked_topk(x16, k, searched, block_rows=64, device="cpu", bound=bound,
                 on_plain_block=pairs)
    rows, cols = pairs.by_row()
    assert set(cols) <= set(searched) and len(rows)
    rest = range(searched.stop, 600)
    if len(rest):
        more = new_candidates(x16, old_rows, rest, base_sims[:, -1], bound, "cpu", 64)
        rows, cols = np.concatenate([rows - old_rows.start, more[0]]), np.concatenate(
            [cols, more[1]])
    else:
        rows = rows - old_rows.start
    ids, sims = merged_with_new(x16, old_rows, base_ids, base_sims, rows, cols, k)
    want_ids, want_sims = blocked_topk(x16, k, old_rows, block_rows=64, device="cpu")
    assert np.array_equal(ids, want_ids) and np.array_equal(sims, want_sims)
    assert (ids >= base).any() and (np.isin(ids, list(rest)).any() if len(rest) else True)
