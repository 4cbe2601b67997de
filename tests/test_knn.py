"""The knn stage on real embeddings: exactness, shard invariance, resume, errors, readers."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from graphbuild.errors import GraphbuildError
from tests.conftest import COCO

N_CAPTIONS = 3000  # all of tests/data's COCO captions


@pytest.fixture(scope="session")
def embedded(tmp_path_factory) -> Path:
    """3,000 real COCO captions embedded once (chunks of 1,024 rows: three chunks)."""
    from graphbuild.embedding.stage import EmbedConfig, embed_shard
    from graphbuild.prepare.manifest import load_manifest

    root = tmp_path_factory.mktemp("knn")
    src = root / "captions.tsv"
    with open(COCO, encoding="utf-8") as f:
        src.write_text("".join(next(f) for _ in range(N_CAPTIONS + 1)), encoding="utf-8")
    manifest = root / "coco.yaml"
    manifest.write_text("name: coco-test\nsource: {path: captions.tsv, format: tsv}\n"
                        "id_column: caption_id\ntext_column: caption\n")
    out = root / "run"
    embed_shard(load_manifest(manifest), out, 0, 1, EmbedConfig(precision="bf16",
                                                                  chunk_rows=1024))
    return out


@pytest.fixture
def run(embedded, tmp_path) -> Path:
    """A fresh copy of the embedded run, so each test owns its graph."""
    out = tmp_path / "run"
    shutil.copytree(embedded, out)
    return out


def brute_force(out: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    import zarr

    x = np.asarray(zarr.open_array(str(out / "embeddings.zarr"), mode="r")[:])
    x = x.astype(np.float32).astype(np.float64)
    s = (x @ x.T).astype(np.float32)
    np.fill_diagonal(s, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), s.shape), -s), axis=1)[:, :k]
    return order, np.take_along_axis(s, order, 1)


def graph_table(out: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted((out / "graph").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def knn(out, k, **kw):
    from graphbuild.graph.stage import knn_shard

    return knn_shard(out, k, **kw)


def test_exact_equals_brute_force_and_csr_round_trip(run):
    from graphbuild.rundir.graph import read_graph_csr

    r = knn(run, 10, method="exact", block_rows=512)
    assert r.complete and r.recall == 1.0 and r.edges == 10 * r.rows
    ref_i, ref_s = brute_force(run, 10)
    indptr, ind, sims = read_graph_csr(run)
    assert indptr.dtype == np.int64 and sims.dtype == np.float32
    n = len(indptr) - 1
    assert np.array_equal(sims.reshape(n, 10), ref_s)
    ids = ind.reshape(n, 10)
    tied = np.zeros_like(ids, bool)  # where a sim equals a neighbour's, ids may swap
    tied[:, 1:] |= ref_s[:, 1:] == ref_s[:, :-1]
    tied[:, :-1] |= ref_s[:, :-1] == ref_s[:, 1:]
    assert np.array_equal(ids[~tied], ref_i[~tied])
    assert ind[indptr[7]:indptr[8]].tolist() == ids[7].tolist()
    meta = json.loads((run / "graph" / "_meta.json").read_text())
    assert meta["k"] == 10 and meta["method"] == "exact" and meta["metric"] == "cosine"
    assert meta["provenance"]["model"] == "all-MiniLM-L6-v2" and meta["edges"] == ind.size
    stage = json.loads((run / "run.json").read_text())["stages"]["knn"]
    assert stage["status"] == "done" and stage["k"] == 10 and stage["queries_per_s"] > 0


def test_exact_bytes_do_not_depend_on_shard_count(run, tmp_path):
    tables = {}
    for shards in (1, 3, 4, 7):
        out = tmp_path / f"s{shards}"
        shutil.copytree(run, out)
        for s in range(shards):
            r = knn(out, 8, method="exact", shard=s, num_shards=shards, block_rows=256)
        assert r.complete
        tables[shards] = graph_table(out)
    for shards in (3, 4, 7):
        assert tables[shards].equals(tables[1])
        for col in ("neighbors", "sims"):
            a = tables[1].column(col).combine_chunks().flatten().to_numpy()
            b = tables[shards].column(col).combine_chunks().flatten().to_numpy()
            assert a.tobytes() == b.tobytes()


def test_parts_read_as_is_by_polars_and_pyarrow(run):
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    for s in range(2):
        knn(run, 5, method="exact", shard=s, num_shards=2)
    part = run / "graph" / "part-00001.parquet"
    t = pq.read_table(part)
    assert t.schema.field("node").type == pa.int64()
    assert t.schema.field("neighbors").type == pa.list_(pa.int32())
    assert t.schema.field("sims").type == pa.list_(pa.float32())
    df = pl.read_parquet(run / "graph" / "part-*.parquet")
    assert df["node"].to_list() == list(range(len(df)))
    assert df["neighbors"].list.len().unique().to_list() == [5]
    meta = pq.ParquetFile(part).metadata
    assert meta.row_group(0).num_rows <= 65_536
    # ids and sims rarely repeat: plain pages, no dictionary (rundir/graph.py)
    assert not any(meta.row_group(g).column(c).has_dictionary_page
                   for g in range(meta.num_row_groups) for c in range(meta.num_columns))


def test_resume_skips_done_shard_and_redoes_crashed_one(run, caplog):
    from graphbuild.rundir.paths import RunDir

    first = knn(run, 6, method="exact", shard=0, num_shards=2)
    assert not first.complete and first.missing_shards == [1]
    assert not (run / "graph" / "_meta.json").exists()
    again = knn(run, 6, method="exact", shard=0, num_shards=2)
    assert again.skipped
    # a crash of shard 1: a partial temp file and no marker
    (run / "graph" / ".part-00001.parquet.tmp-999999").write_bytes(b"PAR1 partial")
    done = knn(run, 6, method="exact", shard=1, num_shards=2)
    assert done.complete and not list((run / "graph").glob(".*tmp*"))
    before = graph_table(run)
    # a crash after writing the part but before the marker: the shard is redone
    (RunDir(run).state("knn") / "shard-00001-of-00002.done").unlink()
    redo = knn(run, 6, method="exact", shard=1, num_shards=2)
    assert not redo.skipped and graph_table(run).equals(before)


def test_other_k_or_method_needs_overwrite(run):
    knn(run, 4, method="exact")
    with pytest.raises(GraphbuildError, match="_meta.json"):
        knn(run, 5, method="exact")
    with pytest.raises(GraphbuildError, match="method"):
        knn(run, 4, method="approximate")
    r = knn(run, 5, method="exact", overwrite=True)
    assert r.complete and json.loads((run / "graph" / "_meta.json").read_text())["k"] == 5


def test_k_errors_and_clamping(run, caplog):
    with pytest.raises(GraphbuildError, match="k must be >= 1"):
        knn(run, 0)
    with caplog.at_level(logging.WARNING):
        r = knn(run, 10 ** 6, method="exact", block_rows=1024)
    n = r.rows  # unique captions: a few of the 3,000 repeat
    assert r.k == n - 1 and "dense graph" in caplog.text
    meta = json.loads((run / "graph" / "_meta.json").read_text())
    assert meta["edges"] == n * (n - 1)


def test_refuses_unfinished_embeddings(run):
    from graphbuild.rundir.paths import RunDir

    (RunDir(run).state("embed") / "chunks" / "000001.done").unlink()
    with pytest.raises(GraphbuildError, match=r"chunks 1\b.*embed shards 0 of 1"):
        knn(run, 5)
    assert not (run / "graph").exists() or not list((run / "graph").glob("part-*"))


def test_refuses_incomplete_provenance(run):
    import zarr

    arr = zarr.open_array(str(run / "embeddings.zarr"), mode="r+")
    attrs = dict(arr.attrs)
    del attrs["model_revision"]
    arr.attrs.clear()
    arr.attrs.update(attrs)
    with pytest.raises(GraphbuildError, match="model_revision"):
        knn(run, 5)


def test_approximate_reaches_recall_target(run):
    from graphbuild.rundir.graph import read_graph_csr

    r = knn(run, 10, method="approximate", recall_target=0.95)
    assert r.complete and r.recall >= 0.95 and r.nprobe >= 1
    ref_i, _ = brute_force(run, 10)
    _indptr, ind, _ = read_graph_csr(run)
    ids = ind.reshape(-1, 10)
    assert not (ids == np.arange(len(ids))[:, None]).any()  # self excluded
    measured = np.mean([len(np.intersect1d(a, b)) for a, b in zip(ids, ref_i)]) / 10
    assert measured >= 0.93  # the tuned sample's recall carries over to every row
    meta = json.loads((run / "graph" / "_meta.json").read_text())
    assert meta["method"] == "approximate" and meta["recall"] == r.recall


def test_approximate_progress_follows_the_list_products(run):
    """A shard searched both ways at once still moves its progress bar while it searches:
    the reporter is advanced after list products, not once at the end, and by the shard's
    rows in all."""
    from graphbuild.graph.stage import knn_shard
    from graphbuild.progress import Reporter
    from graphbuild.rundir.store import StoredRows

    class Recording(Reporter):
        def __init__(self):
            self.total, self.steps = None, []

        def start(self, total, unit):
            self.total = total

        def advance(self, n):
            self.steps.append(n)

    seen = Recording()
    knn_shard(run, 10, method="approximate", reporter=seen)
    n = StoredRows(run / "embeddings.zarr").shape[0]
    moved = [s for s in seen.steps if s]
    assert seen.total == n and sum(seen.steps) == n and min(seen.steps) >= 0
    assert len(moved) >= 10 and max(moved) < n / 4, moved


def test_approximate_keeps_only_lists_and_rebuilds_bad_ones(run, caplog):
    """On a CPU the saved index is its lists, not codes that would copy the store; a rerun
    reuses them (no build) and gives the same graph; a damaged lists file is built again
    with a warning, and a stale faiss index beside it is removed."""
    from graphbuild.rundir.graph import read_graph_csr

    folder = run / "graph" / "_index"

    def search_again():  # the graph and its markers go, the index stays
        shutil.rmtree(run / "_state" / "knn")
        for p in (run / "graph").glob("*.*"):
            p.unlink()
        caplog.clear()
        knn(run, 10, method="approximate", recall_target=0.9)
        return read_graph_csr(run)

    caplog.set_level(logging.INFO, logger="graphbuild")
    knn(run, 10, method="approximate", recall_target=0.9)
    assert sorted(p.name for p in folder.iterdir()) == ["index.json", "lists.npz"]
    first = read_graph_csr(run)
    assert all(np.array_equal(a, b) for a, b in zip(first, search_again()))
    assert "lists over" not in caplog.text and "recall@10" not in caplog.text  # nor tuned
    (folder / "lists.npz").write_bytes(b"not an npz")
    (folder / "ivf-sq16.index").write_bytes(b"left by an older version")
    again = search_again()
    assert "unreadable or not this store's lists" in caplog.text and "lists over" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["index.json", "lists.npz"]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_approximate_pq_when_over_budget(run):
    r = knn(run, 5, method="approximate", memory_budget=1)
    info = json.loads((run / "graph" / "_index" / "index.json").read_text())
    assert info["index"]["kind"] == "ivf-pq" and r.complete and r.recall > 0


def test_approximate_on_a_cpu_needs_no_faiss(embedded, tmp_path, monkeypatch):
    """faiss is an extra: without it the CPU's approximate search (its own lists) writes the
    same graph, byte for byte, as with faiss installed."""
    runs = with_faiss, without = tmp_path / "with", tmp_path / "without"
    for out in runs:
        shutil.copytree(embedded, out)
    knn(with_faiss, 10, method="approximate", recall_target=0.9)
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` fails from here on
    knn(without, 10, method="approximate", recall_target=0.9)
    parts = [sorted((out / "graph").glob("part-*.parquet")) for out in runs]
    assert len(parts[0]) == 1 and [p.name for p in parts[0]] == [p.name for p in parts[1]]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*parts))


def test_ivf_pq_without_faiss_is_one_line_before_any_work(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(GraphbuildError) as e:
        knn(run, 5, method="approximate", memory_budget=1)
    assert "IVF-PQ" in str(e.value) and "pip install 'graphbuild[faiss-cpu]'" in str(e.value)
    assert "\n" not in str(e.value)
    assert not (run / "graph").exists() and not (run / "_state" / "knn").exists()


def test_auto_gives_a_reason():
    from graphbuild.graph.stage import choose_method

    method, reason = choose_method(3000, 384, 10, 2 ** 34)
    assert method == "exact" and "N=3,000" in reason
    method, _ = choose_method(10 ** 8, 384, 32, 2 ** 34)
    assert method == "approximate"


def test_cli_errors_exit_2_with_one_line(run, tmp_path):
    from tests.conftest import graphbuild

    r = graphbuild("knn", run, "--k", "0")
    assert r.returncode == 2 and "k must be >= 1, got 0" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (run / "graph" / "_meta.json").exists()
    r = graphbuild("knn", tmp_path / "nothing-here", "--k", "8")
    assert r.returncode == 2 and "no embeddings.zarr" in r.stderr


def test_cli_builds_the_graph(run):
    from tests.conftest import graphbuild

    r = graphbuild("knn", run, "--k", "8", "--method", "exact", "-q")
    assert r.returncode == 0, r.stderr
    assert "graph complete" in r.stderr
    assert json.loads((run / "graph" / "_meta.json").read_text())["k"] == 8


def test_ground_truth_by_bf16_candidates_is_proven_exact(embedded):
    """nprobe tuning's ground truth: bf16 candidates ranked by their exact scores, and only
    the queries whose candidates provably hold their top-k kept (the rest scored in fp32),
    against brute force on real captions; with no candidates beyond k, few are proven."""
    from graphbuild.graph.ann import _fp32_truth, _rescored_truth, ground_truth
    from graphbuild.rundir.store import StoredRows

    arr = StoredRows(embedded / "embeddings.zarr")
    x = np.asarray(arr[:], np.float64)
    sample = np.arange(0, len(x), 7)
    _, ref_s = brute_force(embedded, 10)

    def sims_of(ids):  # ids may differ from brute force's only at exact ties
        return np.sort(np.einsum("qd,qkd->qk", x[sample], x[ids]), axis=1)[:, ::-1]

    truth, proven = _rescored_truth(arr, sample, 10, 1024)
    assert proven.mean() > 0.95
    assert np.abs(sims_of(truth[proven]) - ref_s[sample][proven]).max() < 1e-6
    assert not _rescored_truth(arr, sample, 10, 1024, candidates=10)[1].all()
    for found in (ground_truth(arr, sample, 10, 1024), _fp32_truth(arr, sample, 10, 1024)):
        assert np.abs(sims_of(found) - ref_s[sample]).max() < 1e-6


def test_list_scan_equals_faiss_and_brute_force(embedded):
    """ivf_scan.ListScan probes the lists faiss would and scores the stored rows: with every
    list probed it is exact search, and at a small nprobe it finds what faiss's IVF finds in
    the same lists."""
    from graphbuild.graph.ann import build_index, build_lists, ground_truth, search
    from graphbuild.graph.ivf_scan import ListScan, lists_of
    from graphbuild.rundir.store import StoredRows

    arr = StoredRows(embedded / "embeddings.zarr")
    x32 = np.asarray(arr[:], np.float32)
    scan = ListScan.from_lists(*build_lists(arr, 16, 1024), arr, 1024)
    rows = np.arange(len(x32))
    ids, sims = search(scan, x32, rows, 10, nprobe=16)  # all 16 lists: exhaustive
    ref_i, ref_s = brute_force(embedded, 10)
    assert np.abs(sims - ref_s).max() < 1e-5
    assert (ids == ref_i).all(axis=1).mean() > 0.99  # the rest differ only at exact ties
    sample = np.array([0, 5, 1023, 1024, len(x32) - 1])
    truth = ground_truth(arr, sample, 10, 1024)  # what nprobe tuning scores recall against
    assert np.mean([len(np.intersect1d(a, b)) for a, b in zip(truth, ref_i[sample])]) > 0.99
    index = build_index(arr, "ivf-sq16", 16, 1000)
    ours, _ = search(ListScan.from_lists(*lists_of(index), arr, 1024), x32, rows, 10, nprobe=2)
    theirs, _ = search(index, x32, rows, 10, nprobe=2)
    same = np.mean([len(np.intersect1d(a, b)) for a, b in zip(ours, theirs)]) / 10
    assert same > 0.99  # faiss scores fp16 residual codes: rounding apart, the same lists


def test_adaptive_probes_search_the_lists_within_the_gap(embedded):
    """With a probe gap, each query probes the lists whose centroids score within the gap of
    its nearest one's (4 to 32 of them), the gap tuned to give nprobe on average; the search
    returns the exact top k among the rows of those lists (numpy brute force)."""
    import torch

    from graphbuild.graph.ann import build_lists, search
    from graphbuild.graph.ivf_scan import (
        PROBE_CAP,
        PROBE_MIN,
        ListScan,
        centroid_scores,
        probe_gap_for,
        probes,
    )
    from graphbuild.rundir.store import StoredRows

    arr = StoredRows(embedded / "embeddings.zarr")
    x32 = np.asarray(arr[:], np.float32)
    scan = ListScan.from_lists(*build_lists(arr, 64, 1024), arr, 1024)
    rows = np.arange(0, len(x32), 7)
    xq = x32[rows]
    gap = probe_gap_for(xq, scan.centroids, 10)
    scores = torch.cat([s for _, s in centroid_scores(torch.from_numpy(xq), scan.centroids)])
    s = scores.float().numpy()
    home, pair_q, pair_l = probes(scores, 10, gap)
    probed = [set(pair_l[pair_q == i]) | {home[i]} for i in range(len(xq))]
    assert all(len(p) == 1 + (pair_q == i).sum() for i, p in enumerate(probed))  # no repeats
    assert (s[np.arange(len(s)), home] == s.max(axis=1)).all()
    counts = np.array([len(p) for p in probed])
    assert 10 <= counts.mean() < 11 and PROBE_MIN <= counts.min() and counts.max() <= PROBE_CAP
    # bf16 scores are exact in fp32, where the gap is applied
    within = s >= (s.max(axis=1) - np.float32(gap))[:, None]
    for i, p in enumerate(probed):
        if PROBE_MIN < counts[i] < PROBE_CAP:
            assert p == set(np.flatnonzero(within[i]))
        assert s[i, list(p)].min() >= np.delete(s[i], list(p)).max()  # the best lists
    ids, sims = search(scan, xq, rows, 10, 10, gap)
    list_of = np.repeat(np.arange(scan.nlist), np.diff(scan.offsets))[np.argsort(scan.ids)]
    for i, r in enumerate(rows):
        cand = np.flatnonzero(np.isin(list_of, list(probed[i])) & (np.arange(len(x32)) != r))
        ref = cand[np.argsort(-(x32[cand] @ x32[r]), kind="stable")[:10]]
        assert np.allclose(sims[i], x32[ref] @ x32[r], atol=1e-5)
        assert len(np.intersect1d(ids[i], ref)) >= 9  # the rest: exact ties
    fewer = probe_gap_for(xq, scan.centroids, 6)
    assert fewer < gap


def test_list_scan_reads_rows_in_store_order(embedded):
    """Tuning's exact search reads the scan's in-memory rows as store slices: the same bytes."""
    from graphbuild.graph.ann import build_index
    from graphbuild.graph.ivf_scan import ListScan, lists_of
    from graphbuild.rundir.store import StoredRows

    arr = StoredRows(embedded / "embeddings.zarr")
    view = ListScan.from_lists(*lists_of(build_index(arr, "ivf-sq16", 16, 1024)), arr,
                               1024).in_store_order()
    assert view.shape == arr.shape
    for lo, hi in ((0, 1024), (1000, 2500), (arr.shape[0] - 7, arr.shape[0] + 50)):
        assert np.array_equal(view[lo:hi], np.asarray(arr[lo:hi]))


def test_nearest_list_is_the_fp32_nearest_up_to_bf16_rounding(embedded):
    """The build's list assignment (bf16 products where the CPU has them) picks the fp32
    nearest centroid, or one whose fp32 score is within bf16 rounding of it."""
    import torch
    import zarr

    from graphbuild.graph.ivf_scan import nearest_list

    x = torch.from_numpy(np.asarray(zarr.open_array(str(embedded / "embeddings.zarr"),
                                                    mode="r")[:], np.float32))
    centroids = torch.nn.functional.normalize(x[::37] + x[1::37][:len(x[::37])], dim=1)
    got = torch.from_numpy(nearest_list(x, centroids))
    scores = x @ centroids.T
    best = scores.max(dim=1).values
    assert (got == scores.argmax(dim=1)).float().mean() > 0.97
    assert (best - scores.gather(1, got[:, None])[:, 0]).max() < 2 * 2**-8


@pytest.mark.parametrize("blocks", [9, 1])
def test_heaps_keep_each_querys_best_in_any_order(blocks):
    """kernels.offer and sort_heaps against numpy: each query's kk best (score, id),
    best first, equal scores by smaller id, empty slots -inf and -1, whatever the order and
    grouping of the score blocks offered. A block's first offer to a heap skips the scores
    below the row's floor (`_row_floor`): with one block every row goes that way."""
    from graphbuild.graph.kernels import empty_heaps, offer, sort_heaps

    rng = np.random.default_rng(5)
    m, n, kk = 40, 300, 10
    scores = rng.integers(0, 30, (m, n)).astype(np.float32) / 8  # many equal scores
    scores[:, ::7] *= -1e30  # very negative and positive magnitudes order too
    scores[5] = 1.5  # every score ties
    ids = rng.permutation(n).astype(np.int32)
    offered = np.ones((m, n), bool)
    offered[3, :] = False  # query 3: nothing offered; query 4: fewer than kk
    offered[4, 5:] = False
    heap_s, heap_i = empty_heaps(m, kk, np.int32)
    for cols in np.array_split(rng.permutation(n), blocks):  # lists of rows, random order
        q = rng.permutation(np.flatnonzero(offered[:, cols].any(axis=1))).astype(np.int32)
        block = np.where(offered[q][:, cols], scores[q][:, cols], -np.inf).astype(np.float32)
        offer(block, q, ids[cols], heap_s, heap_i)
    sort_heaps(heap_s, heap_i)
    for r in range(m):
        mine = np.flatnonzero(offered[r])
        top = mine[np.lexsort((ids[mine], -scores[r, mine]))][:kk]
        want_s = np.full(kk, -np.inf, np.float32)
        want_i = np.full(kk, -1, np.int32)
        want_s[:len(top)], want_i[:len(top)] = scores[r, top], ids[top]
        assert np.array_equal(heap_s[r], want_s) and np.array_equal(heap_i[r], want_i), r


def test_probe_lists_within_the_gap_and_bounds():
    """kernels.probe_lists against numpy on scores with equal values, rows inside and
    outside the bounds, fp32 and bf16 bits alike: the lists within the gap of the best (the
    best `least` or `most` of them when outside), ties by smaller list number."""
    import torch

    from graphbuild.graph.ivf_scan import kernel_view
    from graphbuild.graph.kernels import probe_lists

    rng = np.random.default_rng(3)
    scores = torch.from_numpy(rng.integers(0, 64, (300, 50)).astype(np.float32) / 64)
    scores[:100] *= 0.1  # a flat third: many lists within the gap, over the cap
    for x, bits in (kernel_view(scores), kernel_view(scores.bfloat16())):
        s = scores.bfloat16().float().numpy() if bits else scores.numpy()
        home, count, others = probe_lists(x, bits, 0.1, 4, 12)
        for r in range(len(s)):
            order = np.lexsort((np.arange(50), -s[r]))  # best first, ties by list number
            within = int((s[r] >= s[r].max() - np.float32(0.1)).sum())
            want = order[:min(max(within, 4), 12)]
            got = others[r][others[r] >= 0]
            assert home[r] == want[0] and count[r] == len(want)
            assert sorted(got) == sorted(want[1:]), r
        assert (count == 12).any() and (count == 4).any() and ((count > 4) & (count < 12)).any()


def test_top_lists_and_first_max_against_numpy():
    """kernels.top_lists (each row's best lists, best first, ties by smaller list number) and
    first_max (the first of a row's largest) against numpy, on scores with many equal values,
    -0 beside +0, fp32 and bf16 bits alike, widths from one list to every list."""
    import torch

    from graphbuild.graph.ivf_scan import kernel_view
    from graphbuild.graph.kernels import first_max, top_lists

    rng = np.random.default_rng(4)
    for m, nlist, most in ((200, 300, 32), (100, 40, 32), (50, 33, 33), (30, 7, 1)):
        scores = torch.from_numpy(rng.integers(-40, 64, (m, nlist)).astype(np.float32) / 64)
        scores[::3, ::2] = -0.0
        scores[1::3, 1::2] = 0.0
        scores[2::3] = 0.0  # rows of nothing but ties
        scores[-1] = -scores[-1].abs() - 1 / 64  # a row of negative scores only
        for given in (scores, scores.bfloat16()):
            s = given.float().numpy() + np.float32(0)  # -0 reads as +0, as the kernels compare
            lists, values = np.empty((m, most), np.int32), np.empty((m, most), np.float32)
            top_lists(*kernel_view(given), lists, values)
            order = np.lexsort((np.broadcast_to(np.arange(nlist), s.shape), -s), axis=1)
            assert np.array_equal(lists, order[:, :most])
            assert np.array_equal(values, np.take_along_axis(s, order[:, :most], 1))
            assert np.array_equal(first_max(*kernel_view(given)), order[:, 0])
    # cosines of unit rows, as the lists' build scores them: most rows' 32nd best is positive
    # and near their best (top_lists counts its way to it), some not (sorted insertion)
    centres = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(2000, 384))), dim=1)
    x = torch.from_numpy(rng.normal(size=(300, 384)))
    x[:150] += 30 * centres[0]  # on one centre: their 32nd best is far below it
    given = torch.nn.functional.normalize(x, dim=1).bfloat16() @ centres.bfloat16().T
    s = given.float().numpy() + np.float32(0)
    lists, values = np.empty((300, 32), np.int32), np.empty((300, 32), np.float32)
    top_lists(*kernel_view(given), lists, values)
    order = np.lexsort((np.broadcast_to(np.arange(2000), s.shape), -s), axis=1)[:, :32]
    assert np.array_equal(lists, order) and np.array_equal(values, np.take_along_axis(s, order, 1))
    assert np.array_equal(first_max(*kernel_view(given)), order[:, 0])


def test_search_results_best_first_self_dropped_ties_by_id():
    """ann._best_first against numpy's lexsort: self and empty slots (-1) drop to -inf, then
    sims descend, equal sims by smaller id."""
    from graphbuild.graph.ann import _best_first

    rng = np.random.default_rng(6)
    rows = np.arange(200, 400)
    s = rng.choice(np.float32([0.9, 0.5, 0.5, 0.25, -0.5, -1e30]), (200, 12))  # many ties
    i = rng.integers(0, 1000, (200, 12))
    i[::7, 3] = rows[::7]  # the query itself
    i[::5, -2:] = -1  # slots faiss leaves empty
    s[::5, -2:] = -np.inf
    got_s, got_i = _best_first(s.copy(), i.copy(), rows, 10)
    want_s = np.where((i == rows[:, None]) | (i < 0), -np.inf, s)
    order = np.lexsort((i, -want_s), axis=1)[:, :10]
    assert np.array_equal(got_s, np.take_along_axis(want_s, order, 1))
    assert np.array_equal(got_i, np.take_along_axis(i, order, 1))


def test_list_scan_small_lists_search_more(embedded):
    """Rows whose probed lists hold fewer than k others are searched again with more lists
    (ann.search), so every row still gets k distinct neighbours, itself excluded."""
    import zarr

    from graphbuild.graph.ann import build_index, search
    from graphbuild.graph.ivf_scan import ListScan, lists_of

    x16 = np.asarray(zarr.open_array(str(embedded / "embeddings.zarr"), mode="r")[:400])
    index = build_index(x16, "ivf-sq16", 10, 400)  # ~40 rows a list
    scan = ListScan.from_lists(*lists_of(index), x16, 400)
    rows = np.arange(len(x16))
    ids, sims = search(scan, x16.astype(np.float32), rows, 60, nprobe=1)
    assert (ids >= 0).all() and np.isfinite(sims).all()
    assert not (ids == rows[:, None]).any()
    assert all(len(set(r)) == 60 for r in ids)
    assert (np.diff(sims, axis=1) <= 0).all()


def test_tuned_nprobe_is_the_smallest_reaching_the_target(embedded):
    """Doubling, then bisecting: every nprobe tried below the chosen one misses the target,
    and the one just below it was tried (so no smaller one reaches it)."""
    from graphbuild.graph.ann import build_index, tune_nprobe
    from graphbuild.graph.ivf_scan import ListScan, lists_of
    from graphbuild.rundir.store import StoredRows

    arr = StoredRows(embedded / "embeddings.zarr")
    scan = ListScan.from_lists(*lists_of(build_index(arr, "ivf-sq16", 64, 1024)), arr, 1024)
    t = tune_nprobe(scan, arr, 10, 0.97, 1024, sample=300)
    tried = {c["nprobe"]: c["recall"] for c in t.curve}
    assert t.recall >= 0.97 and tried[t.nprobe] == round(t.recall, 4)
    assert all(r < 0.97 for p, r in tried.items() if p < t.nprobe)
    assert t.nprobe == 1 or t.nprobe - 1 in tried
    assert list(tried) == sorted(tried)


def _symmetric_setup(embedded, nlist=24, nprobe=5):
    from graphbuild.graph.ann import build_lists
    from graphbuild.graph.ivf_scan import ListScan, probe_gap_for
    from graphbuild.graph.symmetric_scan import row_probes
    from graphbuild.rundir.store import StoredRows

    arr = StoredRows(embedded / "embeddings.zarr")
    x32 = np.asarray(arr[:], np.float32)
    scan = ListScan.from_lists(*build_lists(arr, nlist, 1024), arr, 1024)
    probes = row_probes(scan, 32)
    gap = probe_gap_for(x32, scan.centroids, nprobe)
    return x32, scan, probes, probes.counts(nprobe, gap), gap


def test_row_probes_are_the_lists_the_scan_probes(embedded):
    """RowProbes' first `count` lists of a row are the lists ivf_scan.probes picks for it."""
    import torch

    from graphbuild.graph.ivf_scan import centroid_scores, probes

    x32, scan, row_lists, counts, gap = _symmetric_setup(embedded)
    scores = torch.cat([s for _, s in centroid_scores(torch.from_numpy(x32), scan.centroids)])
    home, pair_q, pair_l = probes(scores, 5, gap)
    assert (row_lists.lists[:, 0] == home).all()
    assert 5 <= counts.mean() < 6
    for r in range(len(x32)):
        assert set(row_lists.lists[r, 1:counts[r]]) == set(pair_l[pair_q == r])


def test_search_both_ways_is_the_top_k_of_both_candidate_sets(embedded):
    """Each row's result is the exact top k (fp32, ties by id) among the rows of the lists it
    probes and the rows that probe its own list (numpy over the definition), each once."""
    from graphbuild.graph.symmetric_scan import search_both_ways

    x32, scan, row_lists, counts, _ = _symmetric_setup(embedded)
    n, k = len(x32), 10
    sims, ids = search_both_ways(scan, row_lists, counts, np.arange(n), k + 1)
    list_of = np.empty(n, np.int64)
    list_of[scan.ids] = np.repeat(np.arange(scan.nlist), np.diff(scan.offsets))
    probed = [set(row_lists.lists[r, :counts[r]]) for r in range(n)]
    home = row_lists.lists[:, 0]
    assert (home == list_of).all()  # each row's own list first
    assert all(len(set(row)) == k + 1 for row in ids)  # no id twice
    probers = [np.flatnonzero([home[r] in p for p in probed]) for r in range(n)]
    exact_ties = 0
    for r in range(0, n, 5):
        cand = np.union1d(np.flatnonzero(np.isin(list_of, list(probed[r]))), probers[r])
        s = x32[cand] @ x32[r]
        ref = cand[np.lexsort((cand, -s))[:k + 1]]
        assert np.allclose(sims[r], np.sort(s)[::-1][:k + 1], atol=1e-5)
        exact_ties += not np.array_equal(ids[r], ref)
    assert exact_ties <= 3  # BLAS rounding apart, the same rows


@pytest.mark.parametrize("screened", [False, True])
def test_search_both_ways_does_not_depend_on_the_rows_searched(embedded, monkeypatch, screened):
    """A shard's rows get the same neighbours as in a search of every row: their candidates
    come from the whole store's probes, whichever rows a shard searches. With the list
    products screened (graph/screened.py, where this CPU screens in bf16) and without."""
    from graphbuild.graph.symmetric_scan import search_both_ways

    monkeypatch.setattr("graphbuild.graph.screened._OWN_PROCESS", screened)
    x32, scan, row_lists, counts, _ = _symmetric_setup(embedded)
    n = len(x32)
    _, every = search_both_ways(scan, row_lists, counts, np.arange(n), 11)
    all_but_list_0 = np.flatnonzero(row_lists.lists[:, 0] != 0)  # other lists: whole
    for part in (np.arange(1000, 2000), np.arange(0, n, 7), all_but_list_0):
        sims, ids = search_both_ways(scan, row_lists, counts, part, 11)
        same = (ids == every[part]).all(axis=1).mean()
        assert same > 0.99, same  # the rest: near-ties that other products round otherwise
        assert np.isfinite(sims).all()


def test_screened_products_are_within_their_bound(embedded, monkeypatch):
    """screened.screen_error bounds every screened score's distance to the pair's re-score
    (kernels._dot32), on the fixture's rows, whether this CPU screens in bf16 or not."""
    import torch

    from graphbuild.graph.kernels import _dot32
    from graphbuild.graph.screened import bf16_screens, fp32_rows, screen_error, screened_product

    monkeypatch.setattr("graphbuild.graph.screened._OWN_PROCESS", True)
    every, scan = _symmetric_setup(embedded)[:2]
    norm = scan.max_norm()  # what search_both_ways bounds with
    assert np.linalg.norm(every, axis=1).max() <= norm <= np.linalg.norm(every, axis=1).max() + 1e-4
    x32 = np.asarray(every[:700])
    a, b = torch.from_numpy(x32[:300]), torch.from_numpy(x32[300:])
    for bf16 in {False, bf16_screens()}:
        v = screened_product(fp32_rows(a, 256), fp32_rows(b, 64), 300, bf16)[:, :400]
        r = np.array([[_dot32(x32, i, x32, 300 + j) for j in range(400)] for i in range(300)])
        tol = screen_error(norm, x32.shape[1], bf16)
        assert np.abs(v - r).max() <= tol
        if bf16:  # the inputs were rounded: not the fp32 product
            assert np.abs(v - r).max() > 10 * screen_error(norm, x32.shape[1], False)


def test_screening_changes_no_neighbour(embedded, monkeypatch):
    """search_both_ways with its list products screened in bf16 finds the same neighbours
    and sims, bit for bit, as with fp32 products: every score that can reach a heap is
    scored again the same way (graph/screened.py)."""
    from graphbuild.graph import symmetric_scan
    from graphbuild.graph.screened import bf16_screens

    monkeypatch.setattr("graphbuild.graph.screened._OWN_PROCESS", True)
    if not bf16_screens():
        pytest.skip("this CPU does not screen in bf16")
    x32, scan, row_lists, counts, _ = _symmetric_setup(embedded)
    rows = np.arange(len(x32))
    screened = symmetric_scan.search_both_ways(scan, row_lists, counts, rows, 11)
    monkeypatch.setattr(symmetric_scan, "bf16_screens", lambda: False)
    fp32 = symmetric_scan.search_both_ways(scan, row_lists, counts, rows, 11)
    assert np.array_equal(screened[0], fp32[0]) and np.array_equal(screened[1], fp32[1])


def test_screening_only_where_no_other_thread_runs_products(monkeypatch):
    """The process-wide bf16 setting changes only in a process declared graphbuild's own or
    in a Dask worker with one task thread; called as a library elsewhere, never."""
    import types

    import distributed

    from graphbuild.graph import screened

    monkeypatch.setattr(screened, "_OWN_PROCESS", False)
    assert not screened._alone()
    monkeypatch.setattr(screened, "_OWN_PROCESS", True)
    assert screened._alone()
    for threads, alone in ((1, True), (4, False)):
        worker = types.SimpleNamespace(state=types.SimpleNamespace(nthreads=threads))
        monkeypatch.setattr(distributed, "get_worker", lambda w=worker: w)
        assert screened._alone() is alone


def test_both_ways_recall_without_searching_is_the_searched_recall(embedded):
    """Tuning's recall of a both-ways search, found from candidate sets alone
    (BothWays.recall), equals the recall its search reaches against a numpy brute force, at
    every nprobe from one list to all of them."""
    from graphbuild.graph.ann import recall_at_k
    from graphbuild.graph.ivf_scan import probe_gap_for
    from graphbuild.graph.symmetric_scan import BothWays

    x32, scan, _, _, _ = _symmetric_setup(embedded)
    n, k = len(x32), 10
    rows = np.arange(0, n, 3)
    s = x32[rows] @ x32.T
    s[np.arange(len(rows)), rows] = -np.inf
    truth = np.array([np.lexsort((np.arange(n), -row))[:k] for row in s])
    both = BothWays(scan)
    seen = []
    for nprobe in (1, 2, 5, 8, scan.nlist):
        gap = probe_gap_for(x32[rows], scan.centroids, nprobe)
        searched = recall_at_k(both.search(rows, k, nprobe, gap)[0], truth)
        assert abs(both.recall(rows, truth, nprobe, gap) - searched) <= 2 / truth.size
        seen.append(searched)
    assert seen == sorted(seen) and seen[0] < 0.9 and seen[-1] == 1.0, seen


def test_lists_built_with_probes_are_build_lists_and_row_probes(embedded):
    """build_lists_and_probes, one pass over the store, gives the lists build_lists gives and
    the RowProbes row_probes finds again from them, bit for bit: whichever process built the
    lists, every shard searches with the same probes."""
    from graphbuild.graph.ann import build_lists
    from graphbuild.graph.ivf_scan import ListScan
    from graphbuild.graph.symmetric_scan import build_lists_and_probes, row_probes
    from graphbuild.rundir.store import StoredRows

    arr = StoredRows(embedded / "embeddings.zarr")
    for nlist in (24, 64):  # every list kept a row, or its best 32
        lists, probes = build_lists_and_probes(arr, nlist, 1024, 32)
        for got, want in zip(lists, build_lists(arr, nlist, 1024)):
            assert np.array_equal(got, want)
        again = row_probes(ListScan.from_lists(*lists, arr, 1024), 32)
        assert probes.width == min(nlist, 32)
        assert np.array_equal(probes.lists, again.lists)
        assert np.array_equal(probes.values, again.values)


def test_own_list_first_moves_the_rows_list_to_the_front():
    """A row whose recomputed best lists put another list first (a near tie rounded the other
    way) gets its own list first: from its place among the best, or in place of the last."""
    from graphbuild.graph.symmetric_scan import own_list_first

    lists = np.array([[3, 7, 5, 1], [2, 4, 6, 8], [9, 0, 1, 2]], np.int32)
    values = np.array([[0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6]],
                      np.float32)
    own_list_first(lists, values, np.array([5, 2, 4], np.int32))
    assert lists.tolist() == [[5, 3, 7, 1], [2, 4, 6, 8], [4, 9, 0, 1]]
    # the first value stays the best score (the probe gap counts from it)
    assert np.allclose(values, [[0.9, 0.9, 0.8, 0.6], [0.9, 0.8, 0.7, 0.6],
                                [0.9, 0.9, 0.8, 0.7]])
