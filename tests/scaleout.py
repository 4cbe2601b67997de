"""Shared by the scale-out tests (SLURM, Dask, status): one reference run, and comparisons.

The reference is the local engine in this process: embed as one shard, knn as two shards
run one after the other. Any engine over the same captions and chunk layout must give the
same embedding chunk files, the same graph part files and the same CSR arrays, bit for bit.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tests.conftest import caption_manifest, coco_subset

ROWS = 1500          # COCO captions (1,496 unique)
CHUNK_ROWS = 64      # 24 chunks: several per shard
K = 16
KNN_SHARDS = 2
PRECISION = "bf16"


def manifest(tmp: Path) -> Path:
    return caption_manifest(tmp, coco_subset(tmp, ROWS))


@functools.cache
def reference() -> Path:
    """The local single-process run, built once per test session."""
    from graphbuild.embedding.stage import EmbedConfig, embed_shard
    from graphbuild.graph.stage import knn_shard
    from graphbuild.prepare.manifest import load_manifest

    tmp = Path(tempfile.mkdtemp(prefix="graphbuild-reference-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    out = tmp / "run"
    cfg = EmbedConfig(precision=PRECISION, chunk_rows=CHUNK_ROWS)
    assert embed_shard(load_manifest(manifest(tmp)), out, 0, 1, cfg).complete
    for s in range(KNN_SHARDS):
        knn_shard(out, K, "exact", s, KNN_SHARDS)
    return out


def store_bytes(out: Path) -> dict[str, bytes]:
    root = out / "embeddings.zarr"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "c").rglob("*"))
            if p.is_file()}


def part_tables(out: Path) -> dict[str, object]:
    return {p.name: pq.read_table(p) for p in sorted((out / "graph").glob("part-*.parquet"))}


def assert_same_run(out: Path, ref: Path) -> None:
    """Bit-identical embeddings and graph; every node exactly once in the graph."""
    from graphbuild.rundir.graph import read_graph_csr, read_meta

    assert store_bytes(out) == store_bytes(ref)
    ours, theirs = part_tables(out), part_tables(ref)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].equals(theirs[name]), name
        assert ((out / "graph" / name).read_bytes() == (ref / "graph" / name).read_bytes())
    nodes = np.concatenate([t.column("node").to_numpy() for t in ours.values()])
    n = read_meta(out)["n_nodes"]
    assert np.array_equal(nodes, np.arange(n)), "lost or duplicated graph rows"
    for a, b in zip(read_graph_csr(out), read_graph_csr(ref)):
        assert np.array_equal(a, b)
    assert (out / "nodes.parquet").read_bytes() == (ref / "nodes.parquet").read_bytes()
    assert (out / "samples.parquet").read_bytes() == (ref / "samples.parquet").read_bytes()
