"""Nearest neighbours of a few nodes, by exact search over the stored embeddings.

For looking at a run (the main job's closing examples), not for building the graph: it
streams the store chunk by chunk, so memory stays at one chunk whatever the run's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from graphbuild.storage import RunDir


def find_nodes(out: str | Path, texts: list[str]) -> dict[str, int]:
    """Node ids of the texts that are nodes of the run (after whitespace clean-up)."""
    wanted = {" ".join(t.split()): t for t in texts}
    found = (pl.scan_parquet(RunDir(out).nodes).filter(pl.col("text").is_in(list(wanted)))
             .select("node", "text").collect())
    return {wanted[t]: n for n, t in found.iter_rows()}


def exact_neighbors(out: str | Path, nodes: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, sims), each (len(nodes), k), best first, the node itself excluded."""
    import zarr

    arr = zarr.open_array(str(RunDir(out).embeddings), mode="r")
    n, step = arr.shape[0], arr.chunks[0]
    k = min(k, n - 1)
    queries = np.asarray(arr.get_orthogonal_selection((np.asarray(nodes), slice(None))), np.float32)
    best_s = np.full((len(nodes), k), -np.inf, np.float32)
    best_i = np.full((len(nodes), k), -1, np.int64)
    for lo in range(0, n, step):
        block = np.asarray(arr[lo:lo + step], np.float32)
        sims = queries @ block.T
        ids = np.broadcast_to(np.arange(lo, lo + block.shape[0]), sims.shape)
        sims = np.where(ids == np.asarray(nodes)[:, None], -np.inf, sims)
        all_s = np.concatenate([best_s, sims], axis=1)
        all_i = np.concatenate([best_i, ids], axis=1)
        top = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(all_s, top, 1)
        best_i = np.take_along_axis(all_i, top, 1)
    return best_i, best_s


def node_texts(out: str | Path, ids: np.ndarray) -> dict[int, str]:
    wanted = sorted({int(i) for i in np.ravel(ids) if i >= 0})
    df = pl.scan_parquet(RunDir(out).nodes).filter(pl.col("node").is_in(wanted)).collect()
    return dict(zip(df["node"].to_list(), df["text"].to_list()))
