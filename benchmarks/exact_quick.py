"""Quick check of exact blocked search against faiss IndexFlatIP on the first N real rows.

Interleaves faiss and graphbuild runs in one process (the machine is shared, so only the
ratio is meaningful) and prints the best of --reps; --profile prints a cProfile of one
graphbuild run; --save/--check store or compare the (ids, sims) bytes.

    python benchmarks/exact_quick.py 20000 [--reps 2] [--profile] [--rows 0:5000]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ZARR = "/tmp/graphbuild-bench/run/embeddings.zarr"
K = 32


def main() -> None:
    import torch
    import zarr

    from graphbuild.graph.exact import blocked_topk, exact_dots
    from graphbuild.graph.faiss_loader import load_faiss

    faiss = load_faiss()

    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int, nargs="?", default=20000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--block-rows", type=int, default=None)
    ap.add_argument("--save", type=Path)
    ap.add_argument("--check", type=Path)
    args = ap.parse_args()
    x16 = np.asarray(zarr.open_array(ZARR, mode="r")[:args.n])
    n, d = x16.shape
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    x32 = x16.astype(np.float32)
    index = faiss.IndexFlatIP(d)
    index.add(x32)
    kw = {} if args.block_rows is None else {"block_rows": args.block_rows}

    def ours():
        return blocked_topk(x16, K, device="cpu", **kw)

    flops = 2 * n * n * d
    tf = tg = np.inf
    for _ in range(args.reps):
        t0 = time.perf_counter()
        _, f_ids = index.search(x32, K + 1)
        tf = min(tf, time.perf_counter() - t0)
        t0 = time.perf_counter()
        ids, sims = ours()
        tg = min(tg, time.perf_counter() - t0)
    print(f"N={n} threads={threads} faiss {tf:.2f}s ({flops / tf / 1e9:.0f} GFLOP/s)  "
          f"graphbuild {tg:.2f}s ({flops / tg / 1e9:.0f} GFLOP/s effective)  "
          f"ratio {tf / tg:.2f}x")
    # faiss's ids with self dropped, against ours: identical, or different only at ties
    f_ids = np.array([r[r != i][:K] for i, r in enumerate(f_ids)])
    same = (f_ids == ids).all(axis=1)
    ties = sum(np.array_equal(np.sort(exact_dots(x16, np.full(K, r), f_ids[r]))[::-1], sims[r])
               for r in np.flatnonzero(~same))
    print(f"ids vs faiss: {int(same.sum())} identical, {ties} differ only at exact ties, "
          f"{int((~same).sum()) - ties} differ otherwise")
    if args.save:
        np.savez(args.save, ids=ids, sims=sims)
    if args.check:
        ref = np.load(args.check)
        print("byte-identical to", args.check, np.array_equal(ref["ids"], ids)
              and ref["sims"].tobytes() == sims.tobytes())
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        ours()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
