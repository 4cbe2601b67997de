"""Looking up nodes of a run by text, and texts by node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from graphbuild.storage import RunDir


def find_nodes(out: str | Path, texts: list[str]) -> dict[str, int]:
    """Node ids of those texts that are nodes of the run (after whitespace clean-up), in the
    order given."""
    clean = {t: " ".join(t.split()) for t in texts}
    found = (pl.scan_parquet(RunDir(out).nodes).filter(pl.col("text").is_in(list(clean.values())))
             .select("text", "node").collect())
    node_of = dict(found.iter_rows())
    return {t: node_of[c] for t, c in clean.items() if c in node_of}


def node_texts(out: str | Path, ids: np.ndarray) -> dict[int, str]:
    wanted = sorted({int(i) for i in np.ravel(ids) if i >= 0})
    df = pl.scan_parquet(RunDir(out).nodes).filter(pl.col("node").is_in(wanted)).collect()
    return dict(zip(df["node"].to_list(), df["text"].to_list()))
