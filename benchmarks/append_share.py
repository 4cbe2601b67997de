"""Recall of an approximate graph updated after an append, against the share of rows appended.

Where graph/ann_update.APPROX_UPDATE_MAX_SHARE comes from. On the stored rows of a run
(benchmarks/append.py's appended run: ~90k real captions), two orders:

- mixed: the store's order (shuffled captions of all four sets): new rows like the old;
- new source: old rows are the COCO and Flickr8k captions, new rows CC3M and the LAION-style
  sample (a new crawl of other text).

In each, the first B rows are the base: its lists built (ann.build_lists) and nprobe tuned
to the target (ann.tune_nprobe), as knn does. For each share s, the next s*B rows join the
lists (ann_update.grow_lists) and the updated graph's rows are computed as knn would
(ann_update.updated_rows: the base lists of old rows are their search over the base lists)
for seeded samples of old and new rows, against exact search over the grown rows (with
--rebuild, beside it the nprobe a rebuild over the grown rows tunes to). Prints one line per
share; asserts nothing.

    python benchmarks/append_share.py --run /tmp/graphbuild-append/append/run [--data DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
OLD_SOURCES = ("coco", "flickr")
SAMPLE = 500  # queries among old rows and among new rows, each


def source_of_nodes(run: Path, data: Path) -> np.ndarray:
    """Each node's caption set (its first in append.SOURCES' order)."""
    import polars as pl
    from append import SOURCES
    from knn import _caption_lines

    kind = {}
    for name, k in SOURCES:
        for text in _caption_lines(data / name, k):
            kind.setdefault(text, k)
    texts = pl.read_parquet(run / "nodes.parquet").sort("node")["text"].to_list()
    return np.array([kind.get(" ".join(t.split()), "?") for t in texts])


def sweep(x: np.ndarray, base_n: int, shares: list[float], k: int, target: float,
          label: str, with_rebuild: bool) -> None:
    from graphbuild.graph.ann import (
        SEED,
        build_lists,
        ground_truth,
        nlist_for,
        recall_at_k,
        sample_ids,
        search,
        tune_nprobe,
    )
    from graphbuild.graph.ann_update import NewRows, grow_lists, updated_rows
    from graphbuild.graph.ivf_scan import ListScan

    step = 65536
    base = x[:base_n]
    lists = build_lists(base, nlist_for(base_n), step)
    base_scan = ListScan.from_lists(*lists, base, step)
    tuning = tune_nprobe(base_scan, base_scan.in_store_order(), k, target, step)
    t = {"nprobe": tuning.nprobe, "probe_gap": tuning.probe_gap}
    print(f"{label}: base {base_n:,} rows, {base_scan.nlist} lists, nprobe {tuning.nprobe}"
          f"{'' if tuning.probe_gap is None else ' on average'}: recall@{k} "
          f"{tuning.recall:.4f} (target {target})", flush=True)
    for share in shares:
        t0 = time.perf_counter()
        n = base_n + round(share * base_n)
        grown_rows = x[:n]
        scan = ListScan.from_lists(*grow_lists(lists, grown_rows, base_n, step), grown_rows,
                                   step)
        old_q = sample_ids(base_n, SAMPLE, SEED + 1)
        new_q = base_n + sample_ids(n - base_n, SAMPLE, SEED + 1)
        queries = np.concatenate([old_q, new_q])
        base_ids, base_sims = search(base_scan, base[old_q], old_q, k, t["nprobe"],
                                     t["probe_gap"])
        news = NewRows(scan, base_n, t["nprobe"])
        found, _ = updated_rows(scan, news, queries, base_ids, base_sims, base_n, k, t)
        truth = ground_truth(scan.in_store_order(), queries, k, step)
        old_r = recall_at_k(found[:len(old_q)], truth[:len(old_q)])
        new_r = recall_at_k(found[len(old_q):], truth[len(old_q):])
        whole = (base_n * old_r + (n - base_n) * new_r) / n
        sizes = np.diff(scan.offsets)
        rebuild = ""
        if with_rebuild:
            rebuilt = build_lists(grown_rows, nlist_for(n), step)
            rebuilt_scan = ListScan.from_lists(*rebuilt, grown_rows, step)
            rt = tune_nprobe(rebuilt_scan, rebuilt_scan.in_store_order(), k, target, step)
            rebuild = (f"; a rebuild: {rebuilt_scan.nlist} lists, nprobe {rt.nprobe} for "
                       f"recall {rt.recall:.4f}")
        print(f"  share {share:.2f}: {n - base_n:,} new rows; update at the base's nprobe: "
              f"recall@{k} {whole:.4f} (old rows {old_r:.4f}, new rows {new_r:.4f}; old rows "
              f"score {'all new rows' if news.dense else 'new members of probed lists'}); "
              f"largest list {sizes.max() / np.diff(lists[1]).max():.2f}x the base's{rebuild} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "captions")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--base", type=int, default=60000)
    p.add_argument("--shares", default="0.02,0.05,0.1,0.2,0.4")
    p.add_argument("--rebuild", action="store_true", help="also tune a rebuild per share")
    a = p.parse_args()
    import torch

    from graphbuild.rundir.store import StoredRows

    shares = [float(s) for s in a.shares.split(",")]
    x = StoredRows(a.run / "embeddings.zarr").load()
    kind = source_of_nodes(a.run, a.data)
    print(f"threads: torch {torch.get_num_threads()}; k={a.k}; {len(x):,} rows "
          f"({', '.join(f'{s} {(kind == s).sum():,}' for s in np.unique(kind))}); machine "
          "shared with other work", flush=True)
    sweep(x, a.base, shares, a.k, a.target, "mixed (store order)", a.rebuild)
    old = np.flatnonzero(np.isin(kind, OLD_SOURCES))
    new = np.flatnonzero(~np.isin(kind, OLD_SOURCES))
    if len(old) < a.base or len(new) < max(shares) * a.base:
        sys.exit(f"new source: {len(old):,} old and {len(new):,} new rows, too few")
    order = np.concatenate([old[:a.base], new])
    sweep(x[order], a.base, shares, a.k, a.target, "new source (COCO + Flickr, then CC3M + "
          "LAION-style)", a.rebuild)


if __name__ == "__main__":
    main()
