"""Per-rank cost of targets for a batch spread over W ranks, against the square matrix.

A rank holding B of the W x B samples needs its B rows of the global targets, against all
W x B columns: SoftTargets(mine, columns=every_rank_ids, self_at=rank * B). Without columns
it would build the whole (W*B, W*B) matrix and keep 1/W of it. Simulated in one process on
the real-captions run (benchmarks/graph_targets_kl.py builds it): each step draws a global
batch of W x B samples and times, interleaved so load on a shared machine hits both alike,
  square       SoftTargets(global batch): the (WB, WB) matrix, as a rank builds it today
  square, one product   the same with the CPU's symmetric product off (what a GPU does:
               one (WB, d) x (d, WB) product)
  per rank     SoftTargets(rank's B, columns=global batch, self_at=rank*B), every rank in turn
in exact mode (fp32) and graph mode (top-16). Then the ids' gather: a tensor all-gather of B
int64 over W gloo processes (CPU; on GPUs it is NCCL's latency for W x 8 KB). Prints medians
(ms) and the ratios; asserts nothing.

    python benchmarks/targets_ddp.py [--workdir /tmp/graphbuild-xclr] [--world 8] [--batch 1024]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_targets_kl import build


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


def compare(square, square_one_product, rank_rows, batches, world: int, b: int) -> dict:
    """Median ms per call of each, over the batches (the first one is a warm-up)."""
    times: dict[str, list[float]] = {"square": [], "square, one product": [], "per rank": []}
    for step, idx in enumerate(batches):
        got = {"square": timed(square, idx),
               "per rank": np.mean([timed(rank_rows, idx, r) for r in range(world)])}
        if square_one_product is not None:
            got["square, one product"] = timed(square_one_product, idx)
        if step:
            for name, ms in got.items():
                times[name].append(ms)
    return {name: float(np.median(ms)) for name, ms in times.items() if ms}


def one_product_gram(gram):
    """exact.gram with its CPU symmetric blocks off: one full product, as on a GPU."""
    return lambda x, blocks=4: gram(x, blocks=1)


def gather_ms(world: int, b: int, repeats: int = 50) -> float:
    """Median ms of a tensor all-gather of b int64 over `world` gloo processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gather_rank, args=(world, b, repeats, tmp), nprocs=world, join=True)
        return float(np.load(Path(tmp) / "ms.npy"))


def _gather_rank(rank: int, world: int, b: int, repeats: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world)
    ids = torch.arange(rank * b, (rank + 1) * b)
    out = [torch.empty_like(ids) for _ in range(world)]
    ms = []
    for _ in range(repeats + 1):
        dist.barrier()
        ms.append(timed(dist.all_gather, out, ids))
    if rank == 0:
        np.save(Path(tmp) / "ms.npy", np.median(ms[1:]))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/graphbuild-xclr"))
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1024, help="samples per rank")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--graph-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = build(args.workdir)

    from graphbuild.xclr import Graph, SoftTargets, exact, read_sample_nodes

    w, b = args.world, args.batch
    n = len(read_sample_nodes(run))
    rng = np.random.default_rng(0)
    batches = [rng.choice(n, w * b, replace=False) for _ in range(args.steps + 1)]
    print(f"W={w} ranks x B={b} samples = {w * b:,} columns, {n:,} samples, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    exact_t = SoftTargets.from_run(run)
    exact_t(batches[0][:b])  # rows into RAM once, as a trainer's first step does
    plain = exact.gram

    def one_product(idx):
        exact.gram = one_product_gram(plain)
        try:
            return exact_t(idx)
        finally:
            exact.gram = plain

    def exact_rank(idx, r):
        return exact_t(idx[r * b:(r + 1) * b], columns=idx, self_at=r * b)

    rows = {"exact fp32": compare(exact_t, one_product, exact_rank, batches, w, b)}
    indptr, indices, sims = Graph(run).csr
    graph_t = SoftTargets.from_run(run, mode="graph",
                                   graph=Graph.from_arrays(indptr, indices, sims, k=16))

    def graph_rank(idx, r):
        return graph_t(idx[r * b:(r + 1) * b], columns=idx, self_at=r * b)

    rows["graph top-16"] = compare(graph_t, None, graph_rank,
                                   batches[:args.graph_steps + 1], w, b)
    for mode, ms in rows.items():
        for name, value in ms.items():
            print(f"{mode:12s} {name:22s} {value:10.1f} ms")
        ratio = ms["per rank"] / ms["square"]
        line = f"{mode:12s} per rank / square = {ratio:.3f} (1/W = {1 / w:.3f})"
        if "square, one product" in ms:
            line += f"; / square with one product = {ms['per rank'] / ms['square, one product']:.3f}"
        print(line)
    d = exact_t.rows.shape[1]
    print(f"multiply-adds: square {(w * b) ** 2 * d / 1e9:.1f} G as one product "
          f"({(w * b) ** 2 * d * 5 / 8 / 1e9:.1f} G with the CPU's symmetric blocks), "
          f"per rank {b * w * b * d / 1e9:.1f} G; entries {(w * b) ** 2 / 1e6:.1f} M vs "
          f"{b * w * b / 1e6:.1f} M")
    for world in sorted({2, w}):
        print(f"ids all-gather, {world} gloo processes, {b} int64 each: "
              f"{gather_ms(world, b):.3f} ms")


if __name__ == "__main__":
    main()
