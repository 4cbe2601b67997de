"""The GPU paths against their CPU references. Marked `gpu`: without CUDA they skip ("no CUDA"),
and benchmarks/gpu_check.sh runs them on a GPU machine. The same code runs on the CPU in
test_embed.py (fp32 and bf16 against plain encode), test_exact.py (its `cuda` cases are the
exact search on CUDA against brute force), test_knn.py (approximate recall) and test_dask.py.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests import scaleout
from tests.conftest import graphbuild
from tests.gpu import MAX_ONE_MINUS_COS, RECALL_SLACK, RECALL_TARGET, one_minus_cos, recall

pytestmark = pytest.mark.gpu


def stored(run: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(str(run / "embeddings.zarr"), mode="r")[:], np.float32)


def without_graph(src: Path, dst: Path) -> Path:
    """A copy of a finished run with its graph and knn state removed."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "graph")
    shutil.rmtree(dst / "_state" / "knn")
    return dst


def graph_ids(run: Path) -> np.ndarray:
    from graphbuild.rundir.graph import read_graph_csr

    indptr, ind, _ = read_graph_csr(run)
    return ind.reshape(len(indptr) - 1, -1)


def test_fp16_cuda_embeddings_match_cpu_fp32(coco3k, tmp_path, st_model):
    """3,000 COCO captions embedded in fp16 on CUDA (the default there) against plain
    sentence-transformers in fp32 on the CPU."""
    import polars as pl
    import zarr

    from graphbuild.embedding.stage import EmbedConfig, embed_shard
    from graphbuild.prepare.manifest import load_manifest

    run = tmp_path / "run"
    r = embed_shard(load_manifest(coco3k.parent / "coco.yaml"), run,
                    config=EmbedConfig(device="cuda", precision="auto"))
    texts = pl.read_parquet(run / "nodes.parquet")["text"].to_list()
    assert r.complete and r.texts_encoded == len(texts)
    assert zarr.open_array(str(run / "embeddings.zarr"), mode="r").attrs["precision"] == "fp16"
    plain = st_model.encode(texts, batch_size=64, normalize_embeddings=True)
    worst = float(one_minus_cos(stored(run), plain).max())
    print(f"fp16 on CUDA vs fp32 on CPU: max(1 - cos) {worst:.2e} over {len(texts):,} texts")
    assert worst <= MAX_ONE_MINUS_COS["fp16"]


def test_exact_knn_on_cuda_writes_the_cpu_bytes(coco3k, tmp_path):
    """The knn stage's exact search on CUDA (fp16 candidates, exact re-rank) writes the same
    part, byte for byte, as on the CPU; in 3 shards, the same CSR arrays."""
    from graphbuild.graph.stage import knn_shard
    from graphbuild.rundir.graph import read_graph_csr

    cpu, cuda = without_graph(coco3k, tmp_path / "cpu"), without_graph(coco3k, tmp_path / "cuda")
    knn_shard(cpu, 16, "exact", device="cpu")
    assert knn_shard(cuda, 16, "exact", device="cuda").complete
    part = "graph/part-00000.parquet"
    assert (cuda / part).read_bytes() == (cpu / part).read_bytes()
    shards = without_graph(coco3k, tmp_path / "shards")
    for s in range(3):
        knn_shard(shards, 16, "exact", s, 3, device="cuda")
    for a, b in zip(read_graph_csr(shards), read_graph_csr(cpu)):
        assert np.array_equal(a, b)


def test_faiss_gpu_approximate_search_reaches_its_recall(coco3k, tmp_path, caplog):
    """With faiss-gpu the approximate index is a faiss IVF index searched on GPU 0; the tuned
    recall holds over every row, against the exact graph."""
    from graphbuild.graph.ann import faiss_gpus
    from graphbuild.graph.stage import knn_shard

    if faiss_gpus() == 0:
        pytest.skip("no faiss-gpu: faiss here has no GPU (GRAPHBUILD_FAISS=gpu ./dev.sh setup)")
    run = without_graph(coco3k, tmp_path / "run")
    caplog.set_level(logging.INFO, logger="graphbuild")
    r = knn_shard(run, 16, "approximate", recall_target=RECALL_TARGET)
    assert r.complete and r.recall >= RECALL_TARGET
    assert "searching on GPU 0" in caplog.text
    assert sorted(p.name for p in (run / "graph" / "_index").iterdir()) == [
        "index.json", "ivf-sq16.index"]
    ids = graph_ids(run)
    assert not (ids == np.arange(len(ids))[:, None]).any()  # self excluded
    measured = recall(ids, graph_ids(coco3k))
    print(f"faiss-gpu approximate: recall@16 {r.recall:.4f} tuned (nprobe {r.nprobe}), "
          f"{measured:.4f} over all {len(ids):,} rows")
    assert measured >= RECALL_TARGET - RECALL_SLACK


def test_dask_runs_one_worker_per_gpu(tmp_path):
    """The default LocalCluster has one worker per visible GPU, worker i on cuda:i; embed and
    exact knn on it give the local engine's bytes."""
    import torch
    from distributed import get_worker

    from graphbuild.scale.engine import _device, dask_client

    gpus = torch.cuda.device_count()

    def device_here() -> tuple[object, str]:
        return get_worker().name, _device("auto")

    with dask_client() as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == gpus
        assert all(w["resources"] == {"GPU": 1} for w in workers.values())
        devices = dict(client.gather([client.submit(device_here, workers=[address], pure=False)
                                      for address in workers]))
    assert devices == {i: f"cuda:{i}" for i in range(gpus)}

    m = scaleout.manifest(tmp_path)
    embed = ["embed", m, "--chunk-rows", scaleout.CHUNK_ROWS, "--precision", "fp16", "-q"]
    knn = ["--k", scaleout.K, "--method", "exact", "-q"]
    local, dask = tmp_path / "local", tmp_path / "dask"
    r = graphbuild(*embed, "--out", local, "--device", "cuda")
    assert r.returncode == 0, r.stderr
    r = graphbuild(*embed, "--out", dask, "--engine", "dask", "--num-shards", 2 * gpus)
    assert r.returncode == 0, r.stderr
    assert scaleout.store_bytes(dask) == scaleout.store_bytes(local)
    assert graphbuild("knn", local, *knn).returncode == 0
    r = graphbuild("knn", dask, *knn, "--engine", "dask", "--num-shards", 2 * gpus)
    assert r.returncode == 0, r.stderr
    from graphbuild.rundir.graph import read_graph_csr

    for a, b in zip(read_graph_csr(dask), read_graph_csr(local)):
        assert np.array_equal(a, b)
