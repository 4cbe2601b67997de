"""Figures of a finished run: duplicates, similarities, degrees and hubs, soft-target entropy.

Everything is vectorised numpy over the CSR arrays of `graph.read_graph_csr`, so a 100k-node
graph takes about a second. The soft-target figures follow the trainer's exact targets
(`xclr.SoftTargets`, diagonal="mask"): random batches of B samples, cosines of their nodes'
stored rows renormalised in fp32, and per row p_j = softmax_{j != i}(cos_ij / tau_s); the
entropy of a row is -sum_j p_j log p_j in nats, at most log(B - 1) (uniform targets), and its
exponential is the number of samples the target is effectively spread over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphbuild import options
from graphbuild.rundir.paths import RunDir
from graphbuild.rundir.store import StoredRows

PERCENTILES = {"min": 0, "p1": 1, "p5": 5, "p25": 25, "p50": 50, "p75": 75, "p95": 95,
               "p99": 99, "max": 100}
HUB_SHARE = 0.01          # hubness: the share of edges held by this top fraction of nodes
NEAR_DUPLICATE = 0.99     # a node whose best neighbour is at least this similar


@dataclass
class RunArrays:
    """What the figures are computed from, loaded once (the report reuses it)."""

    out: Path
    meta: dict
    info: dict                 # run.json
    indptr: np.ndarray
    indices: np.ndarray
    sims: np.ndarray
    sample_nodes: np.ndarray   # node of each sample
    counts: np.ndarray         # samples per node

    @property
    def n_nodes(self) -> int:
        return len(self.indptr) - 1

    def in_degree(self) -> np.ndarray:
        return np.bincount(self.indices, minlength=self.n_nodes)

    def kth_sims(self) -> np.ndarray:
        """Each non-empty row's last stored sim (its k-th neighbour's)."""
        full = self.indptr[1:] > self.indptr[:-1]
        return self.sims[self.indptr[1:][full] - 1]

    def first_sims(self) -> np.ndarray:
        full = self.indptr[1:] > self.indptr[:-1]
        return self.sims[self.indptr[:-1][full]]


def load(out: str | Path) -> RunArrays:
    """The CSR graph and the sample->node map of a finished run (one-line errors otherwise)."""
    from graphbuild.inspect.neighbors import open_run, sample_counts
    from graphbuild.rundir.graph import read_graph_csr
    from graphbuild.rundir.samples import read_sample_nodes

    meta = open_run(out)
    indptr, indices, sims = read_graph_csr(out)
    return RunArrays(Path(out), meta, RunDir(out).read_run(), indptr, indices, sims,
                     read_sample_nodes(out), sample_counts(out, meta["n_nodes"]))


def percentiles(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {name: math.nan for name in PERCENTILES}
    values = np.percentile(x.astype(np.float64), list(PERCENTILES.values()))
    return {name: round(float(v), 6) for name, v in zip(PERCENTILES, values)}


def hubness(in_degree: np.ndarray, share: float = HUB_SHARE) -> dict:
    """The share of all edges that point at the top `share` of nodes by in-degree."""
    top = max(1, math.ceil(share * len(in_degree)))
    edges = int(in_degree.sum())
    held = int(np.sort(in_degree)[::-1][:top].sum())
    return {"top_fraction": share, "top_nodes": top,
            "edge_share": round(held / edges, 6) if edges else 0.0}


def skewness(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    sd = x.std()
    return round(float(((x - x.mean()) ** 3).mean() / sd ** 3), 4) if sd > 0 else 0.0


def independent_batches(sample_nodes: np.ndarray, batch_size: int, batches: int,
                        seed: int) -> list[np.ndarray]:
    """`batches` batches of sample indices, each drawn uniformly without replacement and on
    its own, so two may share samples and there may be more full batches than the samples
    fill (an epoch's batches, xclr.data.random_batches, are disjoint and end with them)."""
    rng = np.random.default_rng(seed)
    b = min(batch_size, len(sample_nodes))
    return [rng.choice(len(sample_nodes), size=b, replace=False) for _ in range(batches)]


def batch_cosines(x16: np.ndarray) -> np.ndarray:
    """(B, B) cosines of fp16 rows renormalised in fp32, as the trainer's exact targets."""
    x = x16.astype(np.float32)
    x /= np.linalg.norm(x.astype(np.float64), axis=1).astype(np.float32)[:, None]
    s = x @ x.T
    np.fill_diagonal(s, 1.0)
    return s


def row_entropy(cos: np.ndarray, tau_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(entropy in nats, largest target) of each row of softmax_{j != i}(cos_ij / tau_s)."""
    z = cos.astype(np.float64) / tau_s
    np.fill_diagonal(z, -np.inf)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    np.fill_diagonal(z, 0.0)  # e is 0 there; keep 0 * -inf out of the sum
    total = e.sum(axis=1)
    entropy = np.log(total) - (e * z).sum(axis=1) / total
    return entropy, 1.0 / total  # the largest target is exp(0) / total


def soft_target_entropy(out: str | Path, sample_nodes: np.ndarray, taus: list[float],
                        batch_size: int = options.BATCH_SIZE, batches: int = options.BATCHES,
                        seed: int = options.SEED) -> list[dict]:
    """Per tau_s: the row entropy of soft targets over random batches of samples."""
    idx = independent_batches(sample_nodes, batch_size, batches, seed)
    nodes = np.concatenate([sample_nodes[i] for i in idx])
    uniq, inv = np.unique(nodes, return_inverse=True)
    rows = StoredRows(RunDir(out).embeddings).gather(uniq)
    b = len(idx[0])
    cosines = [batch_cosines(rows[inv[j * b:(j + 1) * b]]) for j in range(len(idx))]
    result = []
    for tau in taus:
        h, top = zip(*(row_entropy(c, tau) for c in cosines))
        h, top = np.concatenate(h), np.concatenate(top)
        result.append({"tau_s": tau, "batch_size": b, "batches": len(idx),
                       "entropy_mean": round(float(h.mean()), 4),
                       "entropy_p5": round(float(np.percentile(h, 5)), 4),
                       "entropy_p50": round(float(np.percentile(h, 50)), 4),
                       "entropy_p95": round(float(np.percentile(h, 95)), 4),
                       "entropy_max": round(math.log(b - 1), 4) if b > 1 else 0.0,
                       "effective_targets": round(float(np.exp(h).mean()), 2),
                       "top_target_mean": round(float(top.mean()), 4)})
    return result


def figures(data: RunArrays, tau_s: float = options.TAU_S,
            batch_size: int = options.BATCH_SIZE, batches: int = options.BATCHES,
            seed: int = options.SEED) -> dict:
    """All figures of `run_stats`, from loaded arrays."""
    meta, n = data.meta, data.n_nodes
    samples = len(data.sample_nodes)
    used = int((data.counts > 0).sum())
    out_deg = np.diff(data.indptr)
    in_deg = data.in_degree()
    first = data.first_sims()
    top_node = int(np.argmax(in_deg)) if n else None
    return {
        "run": str(data.out),
        "dataset": data.info.get("dataset", {}).get("name"),
        "samples": samples,
        "nodes": n,
        "duplicates": samples - used,
        "duplicate_ratio": round((samples - used) / samples, 6) if samples else 0.0,
        "shared_nodes": int((data.counts > 1).sum()),
        "max_samples_per_node": int(data.counts.max()) if n else 0,
        "graph": {"k": meta["k"], "method": meta["method"], "edges": int(data.indptr[-1]),
                  "recall": meta.get("recall"), "nprobe": meta.get("nprobe"),
                  "num_shards": meta.get("num_shards")},
        "sims": {"kth": percentiles(data.kth_sims()), "all": percentiles(data.sims),
                 "first": percentiles(first)},
        "near_duplicate_nodes": int((first >= NEAR_DUPLICATE).sum()),
        "out_degree": {"min": int(out_deg.min()), "mean": round(float(out_deg.mean()), 4),
                       "max": int(out_deg.max())},
        "in_degree": {"mean": round(float(in_deg.mean()), 4),
                      "p50": round(float(np.percentile(in_deg, 50)), 2),
                      "p99": round(float(np.percentile(in_deg, 99)), 2), "max": int(in_deg.max()),
                      "max_node": top_node, "zero": int((in_deg == 0).sum()),
                      "skew": skewness(in_deg)},
        "hubness": hubness(in_deg),
        "soft_targets": soft_target_entropy(data.out, data.sample_nodes, [tau_s], batch_size,
                                            batches, seed)[0],
    }


def run_stats(out: str | Path, tau_s: float = options.TAU_S,
              batch_size: int = options.BATCH_SIZE, batches: int = options.BATCHES,
              seed: int = options.SEED) -> dict:
    """The figures `graphbuild stats` prints (and writes with --json)."""
    options.entropy_options(tau_s, batch_size, batches)
    return figures(load(out), tau_s, batch_size, batches, seed)


def _pct_row(label: str, p: dict) -> str:
    return f"  {label:<12}" + "".join(f"{p[name]:>7.3f}" for name in PERCENTILES)


def format_stats(s: dict) -> str:
    """The human-readable form of `run_stats`."""
    g, ind, hub, st = s["graph"], s["in_degree"], s["hubness"], s["soft_targets"]
    od = s["out_degree"]
    recall = ("recall 1 (exact search)" if g["method"] == "exact"
              else f"measured recall@{g['k']} {g['recall']:.4f} (nprobe {g['nprobe']})")
    out_deg = (f"{od['min']} on every row" if od["min"] == od["max"]
               else f"min {od['min']}, mean {od['mean']:.1f}, max {od['max']}")
    lines = [
        f"run           {s['run']} ({s['dataset']})",
        f"samples       {s['samples']:,}; nodes {s['nodes']:,}; duplicates {s['duplicates']:,} "
        f"(ratio {s['duplicate_ratio']:.4f})",
        f"shared nodes  {s['shared_nodes']:,} nodes hold several samples, at most "
        f"{s['max_samples_per_node']:,}",
        f"graph         {g['method']}, k={g['k']}, {g['edges']:,} edges, {recall}",
        "similarity    " + "".join(f"{name:>7}" for name in PERCENTILES),
        _pct_row("k-th nbr", s["sims"]["kth"]),
        _pct_row("all edges", s["sims"]["all"]),
        _pct_row("1st nbr", s["sims"]["first"]),
        f"near dups     {s['near_duplicate_nodes']:,} nodes have a neighbour at cos >= "
        f"{NEAR_DUPLICATE}",
        f"out-degree    {out_deg}",
        f"in-degree     mean {ind['mean']:.1f}, median {ind['p50']:.0f}, p99 {ind['p99']:.0f}, "
        f"max {ind['max']:,} (node {ind['max_node']}), skew {ind['skew']:.2f}; "
        f"{ind['zero']:,} nodes in no row",
        f"hubness       top {hub['top_fraction']:.0%} of nodes by in-degree ({hub['top_nodes']:,}) "
        f"hold {hub['edge_share']:.2%} of edges ({hub['top_fraction']:.0%} if even)",
        f"soft targets  tau_s={st['tau_s']:g}, {st['batches']} random batches of "
        f"B={st['batch_size']:,} samples: row entropy {st['entropy_mean']:.3f} nats",
        f"              (p5 {st['entropy_p5']:.3f}, p95 {st['entropy_p95']:.3f}; uniform "
        f"{st['entropy_max']:.3f}); ~{st['effective_targets']:,.0f} effective targets per row, "
        f"largest {st['top_target_mean']:.3f}",
    ]
    return "\n".join(lines)
