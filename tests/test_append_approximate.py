"""`graphbuild embed --append` then approximate `graphbuild knn`: the graph is updated.

The promise (graph/ann_update.py): new rows join the base graph's lists; the updated graph's
recall, measured again on a sample, is recorded and at least the target, and is the graph's
recall against brute force within sampling error; new rows enter old rows' lists; a large
append, a faiss index or a recall below the target rebuild the graph instead, saying why.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import graphbuild
from graphbuild.graph import ann_update
from graphbuild.graph.ann import tuning_key
from graphbuild.graph.stage import knn_shard
from graphbuild.rundir.graph import read_meta
from graphbuild.rundir.store import StoredRows
from tests.conftest import graphbuild as cli
from tests.conftest import one_error
from tests.test_append import manifest, tsv

OLD = range(1, 2001)   # 1,996 nodes
NEW = range(2001, 2151)  # 150 nodes: 0.075 of the old, below APPROX_UPDATE_MAX_SHARE
LARGE = range(2001, 2401)  # 0.2 of the old: above it
K, TARGET = 8, 0.9


def knn(out: Path, shards: int = 1, **kw) -> list:
    """Approximate knn, shard by shard (stage.knn_shard: it takes a memory budget)."""
    return [knn_shard(out, K, method="approximate", recall_target=TARGET, shard=s,
                      num_shards=shards, block_rows=256, **kw) for s in range(shards)]


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """Finished runs over the old file, approximate graphs in 1 and 3 shards."""
    tmp = tmp_path_factory.mktemp("append-approx")
    runs = {}
    for shards in (1, 3):
        folder = tmp / f"old{shards}"
        if shards == 1:
            tsv(folder / "src" / "a.tsv", OLD)
            graphbuild.embed(manifest(folder), folder / "run")
        else:  # the same store, another graph layout
            shutil.copytree(tmp / "old1", folder)
            shutil.rmtree(folder / "run" / "graph")
            shutil.rmtree(folder / "run" / "_state" / "knn")
        knn(folder / "run", shards)
        runs[shards] = folder / "run"
    return runs


def appended(old: Path, to: Path, lines: range = NEW) -> Path:
    shutil.copytree(old.parent, to)
    out = to / "run"
    tsv(to / "src" / "b.tsv", lines)
    graphbuild.embed(to / "m.yaml", out, append=True)
    return out


def graph_lists(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, sims) of every node's list, read through the trainer-side reader."""
    from graphbuild.xclr import Graph

    g = Graph(out)
    indptr, indices, sims = g.csr
    assert (np.diff(indptr) == K).all()
    return np.asarray(indices, np.int64).reshape(-1, K), np.asarray(sims).reshape(-1, K)


def brute_force(out: Path) -> np.ndarray:
    """Exact top-K ids of every row (numpy, fp32 products of the stored rows, self out)."""
    x = StoredRows(out / "embeddings.zarr").load().astype(np.float32)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :K]


def per_row_recall(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([len(np.intersect1d(f, t)) / K for f, t in zip(found, truth)])


@pytest.mark.parametrize("old_shards,new_shards,dense",
                         [(1, 1, True), (3, 3, True), (1, 3, True), (1, 3, False)])
def test_the_updated_graph_meets_its_recorded_recall(old, tmp_path, old_shards, new_shards,
                                                      dense, caplog, monkeypatch):
    """dense: old rows score all 150 new rows; else (DENSE_PER_PROBE 0) only the new members
    of the lists they probe."""
    if not dense:
        monkeypatch.setattr(ann_update, "DENSE_PER_PROBE", 0)
    base_ids, _ = graph_lists(old[old_shards])
    base_n = len(base_ids)
    out = appended(old[old_shards], tmp_path / "a")
    with caplog.at_level(logging.INFO, logger="graphbuild.graph"):
        results = knn(out, new_shards)
    assert results[-1].complete and "joined the base's" in caplog.text
    meta = read_meta(out)
    index = json.loads((out / "graph" / "_index" / "index.json").read_text())
    tuned = index["tuning"][tuning_key(K, TARGET, both_ways=True)]
    assert meta["n_nodes"] == base_n + 150 and index["index"]["grown_from"] == base_n
    assert tuned["update"]["dense"] == dense
    assert meta["recall"] == tuned["recall"] == tuned["update"]["recall"] >= TARGET
    assert all(r.recall == meta["recall"] for r in results)
    info = graphbuild.rundir.paths.RunDir(out).read_run()
    assert info["stages"]["knn"]["updated_from_nodes"] == base_n
    assert not (out / "graph-base").exists()

    ids, _ = graph_lists(out)
    truth = brute_force(out)
    rows = per_row_recall(ids, truth)
    assert rows.mean() >= TARGET
    # the recorded recall is a 1,000-query sample's: within 4 standard errors of the whole's
    se = rows.std() / np.sqrt(1000) * np.sqrt(1 - 1000 / len(rows))
    assert abs(rows.mean() - meta["recall"]) <= 4 * se + 1e-3, (rows.mean(), meta["recall"])

    # old rows: their lists are their base lists with new rows merged in, best first ...
    old_ids = ids[:base_n]
    for r in range(base_n):
        kept = old_ids[r][old_ids[r] < base_n]
        assert np.array_equal(kept, base_ids[r][:len(kept)]), r
    # ... and new rows enter them where brute force puts them, about as often as any row
    should = (truth[:base_n] >= base_n)
    found = np.array([[t in row for t in want] for row, want in zip(old_ids, truth[:base_n])])
    # (all of them when old rows score every new row: their best new rows are exact)
    assert should.sum() > 100
    assert found[should].mean() >= (0.999 if dense else TARGET - 0.05), found[should].mean()


def test_readers_see_the_updated_graph(old, tmp_path):
    out = appended(old[1], tmp_path / "a")
    knn(out)
    meta = read_meta(out)
    r = cli("validate", out)
    assert r.returncode == 0 and f"on {meta['n_nodes']:,} nodes" in r.stdout, r.stdout + r.stderr
    stats = cli("stats", out)
    assert stats.returncode == 0 and f"measured recall@{K} {meta['recall']:.4f}" in stats.stdout
    status = json.loads(cli("status", out, "--json").stdout)
    assert status["stages"]["knn"]["complete"] and "graph_covers" not in status["stages"]["knn"]


def test_a_large_append_rebuilds_the_lists(old, tmp_path, caplog):
    out = appended(old[1], tmp_path / "a", LARGE)
    with caplog.at_level(logging.WARNING, logger="graphbuild.graph"):
        r = knn(out)[0]
    assert "rebuilding the approximate graph" in caplog.text
    assert "APPROX_UPDATE_MAX_SHARE=0.1" in caplog.text
    meta = read_meta(out)
    index = json.loads((out / "graph" / "_index" / "index.json").read_text())
    assert r.complete and meta["recall"] == r.recall >= TARGET and "grown_from" not in index["index"]
    info = graphbuild.rundir.paths.RunDir(out).read_run()
    assert "updated_from_nodes" not in info["stages"]["knn"]
    assert meta["n_nodes"] == index["index"]["n_nodes"] == StoredRows(
        out / "embeddings.zarr").shape[0]


def test_a_recall_below_the_target_abandons_the_update(old, tmp_path, caplog, monkeypatch):
    measured = ann_update.measure_recall

    def short(*args, **kw):
        tuned = measured(*args, **kw)
        return {**tuned, "update": {**tuned["update"], "recall": TARGET - 0.01}}

    monkeypatch.setattr(ann_update, "measure_recall", short)
    out = appended(old[1], tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger="graphbuild.graph"):
        r = knn(out)[0]
    assert f"recall@{K} {TARGET - 0.01:.4f}" in caplog.text and "below the target" in caplog.text
    meta = read_meta(out)
    assert r.complete and meta["recall"] == r.recall >= TARGET and not (out / "graph-base").exists()
    assert "updated_from_nodes" not in graphbuild.rundir.paths.RunDir(out).read_run()[
        "stages"]["knn"]


def test_a_faiss_index_is_rebuilt_not_grown(old, tmp_path, caplog):
    """A memory budget below the rows' fp16 codes asks for an IVF-PQ index: the base's
    lists cannot become one."""
    out = appended(old[1], tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger="graphbuild.graph"):
        r = knn(out, memory_budget=1 << 20)[0]
    assert "faiss ivf-pq index" in caplog.text and r.complete
    assert (out / "graph" / "_index" / "ivf-pq.index").exists()


def test_other_settings_are_stale_not_updated(old, tmp_path):
    """Another recall target or k after an append is the stale graph's one-line refusal."""
    out = appended(old[1], tmp_path / "a")
    line = one_error(cli("knn", out, "--k", str(K), "--method", "approximate",
                         "--recall-target", "0.8", "-q"))
    assert "recall_target=0.9" in line and "--overwrite" in line
    line = one_error(cli("knn", out, "--k", str(K), "--method", "exact", "-q"))
    assert "--overwrite" in line and not (out / "graph-base").exists()
