"""Spherical k-means by torch matrix products in the rows' own dtype.

In bf16 on a CPU with bf16 hardware a training row costs about half what it does in faiss's
fp32 k-means (benchmarks/results/graph_choices.txt); centres are summed and normalized in
fp32. Used by exact's
locality order and by the inverted lists of approximate search (ann.build_lists).
"""

from __future__ import annotations

import torch

# Rows at a time: no (n, clusters) score matrix, no fp32 copy of all rows. Against 2,000 bf16
# centres, 4,096 rows' scores stay in cache for their maxima, unlike 16,384's (graph_choices.txt).
STEP = 4096


def nearest(x: torch.Tensor, centres: torch.Tensor, step: int = STEP) -> torch.Tensor:
    """Each row's centre: its largest inner product, computed in x's dtype, the first of
    equal ones. On a CPU by kernels.first_max: a k-means round at 1M took about a fifth less
    than with torch's `max` on the bf16 scores (graph_choices.txt)."""
    c = centres.to(x.dtype).T
    if x.device.type == "cpu":
        from graphbuild.graph.ivf_scan import kernel_view
        from graphbuild.graph.kernels import first_max, threads_as_torch

        threads_as_torch()

        def best(scores):
            return torch.from_numpy(first_max(*kernel_view(scores)))
    else:
        def best(scores):
            return scores.max(dim=1).indices
    return torch.cat([best(x[lo:lo + step] @ c) for lo in range(0, len(x), step)])


def spherical_kmeans(x: torch.Tensor, n_clusters: int, iters: int, seed: int = 0,
                     ) -> torch.Tensor:
    """(n_clusters, d) unit fp32 centres: seeded random rows of x to start, then `iters`
    rounds of assigning each row to its nearest centre and taking the normalized sum of its
    rows. A centre left without rows stays where it was."""
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=g)[:n_clusters].to(x.device)].float()
    for _ in range(iters):
        assign = nearest(x, centres)
        sums = torch.zeros_like(centres)
        for lo in range(0, len(x), STEP):
            sums.index_add_(0, assign[lo:lo + STEP], x[lo:lo + STEP].float())
        empty = sums.abs().sum(dim=1) == 0
        sums[empty] = centres[empty]
        centres = torch.nn.functional.normalize(sums, dim=1)
    return centres
