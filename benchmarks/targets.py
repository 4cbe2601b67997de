"""Cost of X-CLR targets per step on CPU, against encoding the batch's captions on the fly.

B = 1,024 random samples of the real-captions run (benchmarks/graph_targets_kl.py builds it):
exact targets (fp32 matmul, fp64 and bf16), graph targets (top-16 and top-256 graphs), and
all-MiniLM-L6-v2 encoding the same 1,024 captions, all in one process with the same threads.
Prints ms/step and ratios, and the one-off cost of the first exact step (reading the rows
into RAM, each chunk's crc32c checked); asserts nothing.

    python benchmarks/targets.py [--workdir /tmp/graphbuild-xclr] [--steps 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_targets_kl import build

B = 1024


def per_step_ms(fn, batches: list[np.ndarray], warmup: int = 3) -> float:
    for idx in batches[:warmup]:
        fn(idx)
    t0 = time.perf_counter()
    for idx in batches:
        fn(idx)
    return (time.perf_counter() - t0) / len(batches) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/graphbuild-xclr"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--encode-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = build(args.workdir)

    from graphbuild.xclr import Graph, SoftTargets, read_sample_nodes

    nodes = read_sample_nodes(run)
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(nodes), B, replace=False) for _ in range(args.steps)]
    print(f"B={B}, {len(nodes):,} samples, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows = {}
    t0 = time.perf_counter()
    exact = SoftTargets.from_run(run)
    exact(batches[0])  # loads the fp16 rows into RAM once, as a trainer would
    first_ms = (time.perf_counter() - t0) * 1e3
    rows["exact targets, fp32 (default)"] = per_step_ms(exact, batches)
    rows["exact targets, fp64 matmul"] = per_step_ms(
        SoftTargets.from_run(run, dtype=torch.float64), batches)
    rows["exact targets, bf16 matmul"] = per_step_ms(
        SoftTargets.from_run(run, dtype=torch.bfloat16), batches)
    rows["exact targets, memory-mapped"] = per_step_ms(SoftTargets.from_run(run, mmap=True),
                                                       batches)
    full = Graph(run)
    indptr, indices, sims = full.csr
    for k in (16, 256):
        g = SoftTargets.from_run(run, mode="graph",
                                 graph=Graph.from_arrays(indptr, indices, sims, k=k))
        rows[f"graph targets, top-{k}"] = per_step_ms(g, batches)

    import pyarrow.parquet as pq

    from graphbuild.embedding.models import load_sentence_transformer, resolve_model

    texts = pq.read_table(run / "nodes.parquet", columns=["text"]).column("text").to_pylist()
    model = load_sentence_transformer(resolve_model("all-MiniLM-L6-v2"), "cpu")

    def encode(idx: np.ndarray) -> None:
        model.encode([texts[n] for n in nodes[idx]], batch_size=128,
                     normalize_embeddings=True, convert_to_tensor=True)

    enc = per_step_ms(encode, batches[:args.encode_steps], warmup=1)
    print(f"{'on-the-fly encoding (fp32), 1,024 captions':46s} {enc:10.1f} ms/step")
    print(f"{'first exact step: rows into RAM, crcs checked':46s} {first_ms:10.1f} ms, once")
    for name, ms in rows.items():
        print(f"{name:46s} {ms:10.2f} ms/step   {enc / ms:8.0f}x cheaper than encoding")


if __name__ == "__main__":
    main()
