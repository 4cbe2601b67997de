"""Looking up nodes of a run by text, and texts by node; the neighbours of a node or of any text.

A node's neighbours come from its stored graph row. A text that is a node of the run is that
node; any other text is embedded with the run's own model, precision and templates (read from
the embeddings.zarr attributes, the weights checked against the recorded revision), rounded to
fp16 as a stored row would be, and searched exactly against every stored row: scores are the
fp64 dot products of the fp16 values rounded to fp32, as the exact graph stores them, and equal
scores go to the smaller node id. Stored rows are read through rundir.store.StoredRows: a
chunk whose file is missing or that fails its crc32c is an error naming the file.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from graphbuild import options
from graphbuild.errors import GraphbuildError
from graphbuild.rundir.paths import RunDir
from graphbuild.rundir.store import StoredRows

log = logging.getLogger(__name__)

SEARCH_BLOCK_ROWS = 16_384


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


def open_run(out: str | Path) -> dict:
    """graph/_meta.json of a finished run. One-line errors (GraphbuildError) for a path that is
    not a run, unfinished or unlabelled embeddings, or a graph that is not complete."""
    from graphbuild.graph.stage import check_embeddings
    from graphbuild.rundir.graph import read_meta

    run = RunDir(out)
    if not run.root.is_dir():
        raise GraphbuildError(f"{run.root}: no such run directory")
    if not run.run_json.is_file():
        raise GraphbuildError(f"{run.root}: not a graphbuild run (no run.json)")
    for table in (run.nodes, run.samples):
        if not table.is_file():
            raise GraphbuildError(f"{table}: missing; run `graphbuild embed` first")
    check_embeddings(out)
    return read_meta(out)


def sample_counts(out: str | Path, n_nodes: int) -> np.ndarray:
    """How many samples share each node, (n_nodes,) int64."""
    import pyarrow.parquet as pq

    path = RunDir(out).samples
    try:
        node = pq.read_table(path, columns=["node"]).column("node").to_numpy()
    except (OSError, ValueError) as e:
        raise GraphbuildError(f"{path}: cannot read samples table: {e}") from None
    if len(node) and (node.min() < 0 or node.max() >= n_nodes):
        raise GraphbuildError(f"{path}: column node holds ids outside 0..{n_nodes - 1}")
    return np.bincount(node, minlength=n_nodes)


@dataclass
class Neighbor:
    rank: int
    node: int
    cos: float
    samples: int
    text: str


@dataclass
class Neighbors:
    """A query (a node, or a text) and its nearest nodes, best first."""

    query: str
    node: int | None          # the query's node; None for a text that is not a node
    samples: int              # samples sharing the query's node (0 for a new text)
    source: str               # "graph" or "exact search"
    k_stored: int             # neighbours per node in the graph
    neighbors: list[Neighbor] = field(default_factory=list)
    model: str | None = None  # for a new text: how it was embedded
    precision: str | None = None
    vector: np.ndarray | None = field(default=None, repr=False)  # a new text's fp16 vector

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("vector")
        return d


def _check_node(out: str | Path, node: int, n_nodes: int) -> None:
    if not 0 <= node < n_nodes:
        raise GraphbuildError(f"{RunDir(out).nodes}: node {node} out of range 0..{n_nodes - 1}")


def _result(out: str | Path, query: str, node: int | None, ids: np.ndarray, sims: np.ndarray,
            counts: np.ndarray, source: str, meta: dict) -> Neighbors:
    texts = node_texts(out, ids)
    rows = [Neighbor(r + 1, int(i), float(s), int(counts[i]), texts.get(int(i), ""))
            for r, (i, s) in enumerate(zip(ids, sims))]
    return Neighbors(query, node, int(counts[node]) if node is not None else 0, source,
                     meta["k"], rows)


def node_neighbors(out: str | Path, node: int, k: int = options.NEIGHBORS) -> Neighbors:
    """A node's best `k` neighbours from the graph (at most the k the graph stores)."""
    from graphbuild.rundir.graph import read_node_row

    meta = open_run(out)
    _check_node(out, node, meta["n_nodes"])
    if k < 1:
        raise GraphbuildError(f"{RunDir(out).graph}: --k must be >= 1, got {k}")
    ids, sims = read_node_row(out, meta, node)
    counts = sample_counts(out, meta["n_nodes"])
    text = node_texts(out, np.array([node])).get(node, "")
    return _result(out, text, node, ids[:k], sims[:k], counts, "graph", meta)


def text_neighbors(out: str | Path, text: str, k: int = options.NEIGHBORS, device: str = "auto",
                   model: str | None = None) -> Neighbors:
    """The best `k` nodes for any text: from the graph when the text is a node, else by
    embedding it with the run's model and an exact search over the stored rows. `model`
    replaces the recorded model name (e.g. a moved directory); its weights must still be the
    recorded revision."""
    meta = open_run(out)
    clean = " ".join(text.split())
    if not clean:
        raise GraphbuildError("the query text is empty")
    if k < 1:
        raise GraphbuildError(f"{RunDir(out).graph}: --k must be >= 1, got {k}")
    found = find_nodes(out, [clean])
    if found:
        result = node_neighbors(out, found[clean], k)
        result.query = clean
        return result
    attrs = StoredRows(RunDir(out).embeddings).attrs
    vector, precision = embed_query(out, clean, attrs, device, model)
    ids, sims = exact_search(out, vector, k)
    counts = sample_counts(out, meta["n_nodes"])
    result = _result(out, clean, None, ids, sims, counts, "exact search", meta)
    result.model, result.precision, result.vector = attrs["model"], precision, vector
    return result


def example_neighbors(out: str | Path, texts: list[str],
                      k: int = options.EXAMPLES) -> dict[str, list[tuple[str, float]]]:
    """The first `k` neighbours (text, cosine) in the built graph of those `texts` that are
    nodes of the run (a manifest's `examples`); with none of them, of three nodes spread over
    the run (first, middle, last). What `graphbuild run` prints."""
    from graphbuild.rundir.graph import read_graph_csr

    found = find_nodes(out, texts) if texts else {}
    if not found:
        n = RunDir(out).read_run()["dataset"]["figures"]["nodes"]
        found = {t: i for i, t in node_texts(out, [0, n // 2, n - 1]).items()}
    indptr, indices, sims = read_graph_csr(out)
    rows = {q: slice(indptr[i], min(indptr[i] + k, indptr[i + 1])) for q, i in found.items()}
    names = node_texts(out, np.concatenate([indices[r] for r in rows.values()]))
    return {q: [(names[int(i)], float(s)) for i, s in zip(indices[r], sims[r])]
            for q, r in rows.items()}


def embed_query(out: str | Path, text: str, attrs: dict, device: str = "auto",
                model: str | None = None) -> tuple[np.ndarray, str]:
    """(fp16 unit vector, precision used) of a text, embedded as the run embedded its nodes."""
    from graphbuild.embedding.encode import TextEncoder, pick_device
    from graphbuild.embedding.models import load_sentence_transformer, resolve_model
    from graphbuild.embedding.stage import _embed_rows

    where = RunDir(out).embeddings
    ref = resolve_model(model or attrs["model"])
    if ref.revision != attrs["model_revision"]:
        raise GraphbuildError(f"{where}: embedded with {attrs['model']} revision "
                              f"{attrs['model_revision']!r}; {ref.path} is {ref.revision!r}")
    device = pick_device(device)
    precision = attrs["precision"]
    if precision == "fp16" and not device.startswith("cuda"):
        log.warning("the run was embedded in fp16 on CUDA; embedding the query in fp32 on %s",
                    device)
        precision = "fp32"
    encoder = TextEncoder(load_sentence_transformer(ref, device), device, precision)
    for key, have in (("dim", encoder.dim), ("max_seq_length", encoder.max_seq_length)):
        if attrs.get(key) != have:
            raise GraphbuildError(f"{where}: {key}={attrs.get(key)!r}, the model gives {have}")
    vec = _embed_rows(encoder, [text], list(attrs["templates"]), None)[0]
    return vec.astype(np.float16), precision


def exact_search(out: str | Path, vector: np.ndarray, k: int,
                 block_rows: int = SEARCH_BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, sims float32) of the `k` stored rows nearest an fp16 vector, best first,
    equal sims by smaller id; read block by block."""
    store = StoredRows(RunDir(out).embeddings)
    n = store.shape[0]
    q = np.asarray(vector, np.float16).astype(np.float64)
    sims = np.empty(n, np.float32)
    for lo, block in store.blocks(range(n), block_rows):
        sims[lo:lo + len(block)] = block.astype(np.float64) @ q
    k = min(k, n)
    top = np.argpartition(-sims, k - 1)[:k] if k < n else np.arange(n)
    cut = sims[top].min()
    cand = np.flatnonzero(sims >= cut)  # every tie of the k-th score, so ties go by id
    order = np.lexsort((cand, -sims[cand]))[:k]
    return cand[order].astype(np.int64), sims[cand[order]]


def format_neighbors(r: Neighbors) -> str:
    """The human-readable form of a `Neighbors` result."""
    if r.node is None:
        head = (f"{r.query!r}: not a node; embedded with {r.model} ({r.precision}), exact "
                "search over the stored embeddings")
    else:
        shared = f"{r.samples:,} sample{'s' if r.samples != 1 else ''}"
        head = (f"node {r.node} {r.query!r} ({shared}): from the graph, which holds "
                f"{r.k_stored} neighbours per node")
    width = max([len(str(n.node)) for n in r.neighbors] + [4])
    lines = [head, f"{'rank':>4}  {'node':>{width}}  {'cos':>6}  {'samples':>7}  text"]
    lines += [f"{n.rank:>4}  {n.node:>{width}}  {n.cos:>6.3f}  {n.samples:>7,}  {n.text}"
              for n in r.neighbors]
    return "\n".join(lines)
