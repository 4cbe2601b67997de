"""`graphbuild embed | knn | run`: the commands that build a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from graphbuild import options
from graphbuild.cli.app import (
    ChunkRows,
    Device,
    Engine,
    Model,
    NumShards,
    Precision,
    Quiet,
    Scheduler,
    Shard,
    SkipBad,
    Source,
    TokenBudget,
    TrustCode,
    _logging,
    app,
)
from graphbuild.errors import GraphbuildError

DEFAULT_MANIFEST = Path("data_manifests/imagenet1k.yaml")


def _on_dask(engine: str, scheduler: Optional[str], shard: Optional[int]) -> bool:
    from graphbuild.scale.engine import check_engine

    check_engine(engine, scheduler)
    if engine == "dask" and shard is not None:
        raise GraphbuildError("--engine dask runs every shard; drop --shard")
    return engine == "dask"


def _embed_echo(r) -> None:
    typer.echo(f"embed shard {r.shard}/{r.num_shards}: {r.texts_encoded} texts in "
               f"{r.seconds:.1f}s ({r.texts_per_s:,.0f} texts/s), {r.chunks_skipped} chunks "
               "already done", err=True)


def _embed_on_dask(client, manifest: Path, source, out: Path, num_shards, config) -> None:
    from graphbuild.scale import engine

    results = engine.embed(client, manifest, source, out, config, num_shards, _embed_echo)
    state = "complete" if any(r.complete for r in results) else "incomplete"
    typer.echo(f"embed: {len(results)} shards on dask, "
               f"{sum(r.texts_encoded for r in results)} texts encoded; embeddings {state}",
               err=True)


def _knn_on_dask(client, out: Path, k: int, method: str, num_shards, block_rows: int,
                 recall_target: float, overwrite: bool) -> None:
    from graphbuild.scale import engine

    results = engine.knn(client, out, k, method, num_shards, block_rows, recall_target,
                         overwrite, lambda r: _knn_summary(r, r.shard, r.num_shards))
    typer.echo(f"knn: {len(results)} shards on dask; graph "
               f"{'complete' if any(r.complete for r in results) else 'incomplete'}", err=True)


def _dask(scheduler: Optional[str]):
    from graphbuild.scale.engine import dask_client

    return dask_client(scheduler)


@app.command()
def embed(
    manifest: Annotated[Path, typer.Argument(help="Dataset manifest (YAML).")],
    out: Annotated[Path, typer.Option(help="Run directory.")],
    source: Source = None,
    shard: Shard = None,
    num_shards: NumShards = None,
    model: Model = "all-MiniLM-L6-v2",
    device: Device = "auto",
    precision: Precision = "auto",
    token_budget: TokenBudget = None,
    chunk_rows: ChunkRows = 8192,
    skip_bad_rows: SkipBad = False,
    trust_remote_code: TrustCode = False,
    engine: Engine = "local",
    scheduler: Scheduler = None,
    quiet: Quiet = False,
) -> None:
    """Embed a dataset's unique texts into OUT/embeddings.zarr (fp16, unit norm). Resumable."""
    from graphbuild.embedding.stage import EmbedConfig, embed_shard
    from graphbuild.prepare.manifest import load_manifest
    from graphbuild.progress import reporter_for
    from graphbuild.shards import resolve_shard

    _logging(quiet)
    options.embed_options(chunk_rows, token_budget, precision, device)
    ds = load_manifest(manifest, source)
    config = EmbedConfig(model=model, device=device, precision=precision,
                         token_budget=token_budget, chunk_rows=chunk_rows,
                         skip_bad_rows=skip_bad_rows, trust_remote_code=trust_remote_code)
    if _on_dask(engine, scheduler, shard):
        with _dask(scheduler) as client:
            return _embed_on_dask(client, manifest, source, out, num_shards, config)
    s, n = resolve_shard(shard, num_shards)
    r = embed_shard(ds, out, s, n, config, reporter_for(f"embed {s}/{n}", quiet))
    state = "complete" if r.complete else f"{len(r.missing_chunks)} chunks still to do by other shards"
    typer.echo(f"embed shard {s}/{n}: {r.texts_encoded} texts in {r.seconds:.1f}s "
               f"({r.texts_per_s:,.0f} texts/s), {r.chunks_skipped} chunks already done; "
               f"embeddings {state}", err=True)


K = Annotated[int, typer.Option("--k", "-k", help="Neighbours per node (clamped to n_nodes - 1).")]
Method = Annotated[str, typer.Option(
    help="auto (exact where affordable), exact, or approximate (faiss IVF).")]
RecallTarget = Annotated[float, typer.Option(
    help="Approximate mode: tune nprobe until sampled recall@k reaches this.")]
BlockRows = Annotated[int, typer.Option(help="Rows per block of the exact search (memory).")]


@app.command()
def knn(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory with embeddings.")],
    k: K = 32,
    method: Method = "auto",
    recall_target: RecallTarget = 0.95,
    shard: Shard = None,
    num_shards: NumShards = None,
    block_rows: BlockRows = 4096,
    overwrite: Annotated[bool, typer.Option(help="Replace a graph built with other settings.")] = False,
    engine: Engine = "local",
    scheduler: Scheduler = None,
    quiet: Quiet = False,
) -> None:
    """Build the top-k cosine graph of a run: RUN/graph/part-*.parquet. Resumable."""
    from graphbuild.graph.stage import knn_shard
    from graphbuild.progress import reporter_for
    from graphbuild.shards import resolve_shard

    _logging(quiet)
    options.knn_options(k, method, block_rows, recall_target)
    if _on_dask(engine, scheduler, shard):
        with _dask(scheduler) as client:
            return _knn_on_dask(client, run_dir, k, method, num_shards, block_rows,
                                recall_target, overwrite)
    s, n = resolve_shard(shard, num_shards)
    r = knn_shard(run_dir, k, method, s, n, block_rows, recall_target,
                  reporter_for(f"knn {s}/{n}", quiet), overwrite)
    _knn_summary(r, s, n)


def _knn_summary(r, s: int, n: int) -> None:
    recall = "" if r.recall is None else f", recall@{r.k} {r.recall:.3f}"
    did = "already done" if r.skipped else (
        f"{r.rows} queries in {r.seconds:.1f}s ({r.queries_per_s:,.0f} queries/s)")
    state = "complete" if r.complete else f"waiting for shards {r.missing_shards}"
    typer.echo(f"knn shard {s}/{n} ({r.method}, k={r.k}{recall}): {did}; graph {state}", err=True)


@app.command()
def run(
    manifest: Annotated[Path, typer.Argument(help="Dataset manifest (YAML).")] = DEFAULT_MANIFEST,
    out: Annotated[Optional[Path], typer.Option(help="Run directory. Default: runs/<name>.")] = None,
    source: Source = None,
    model: Model = "all-MiniLM-L6-v2",
    device: Device = "auto",
    precision: Precision = "auto",
    token_budget: TokenBudget = None,
    skip_bad_rows: SkipBad = False,
    trust_remote_code: TrustCode = False,
    k: K = 32,
    method: Method = "auto",
    recall_target: RecallTarget = 0.95,
    examples: Annotated[int, typer.Option(help="Neighbours to print per example text.")] = 5,
    engine: Engine = "local",
    scheduler: Scheduler = None,
    quiet: Quiet = False,
) -> None:
    """Embed and build the graph in this process (default: ImageNet-1k); print examples."""
    from graphbuild.embedding.stage import EmbedConfig, embed_shard
    from graphbuild.graph.stage import knn_shard
    from graphbuild.prepare.manifest import load_manifest
    from graphbuild.progress import reporter_for

    _logging(quiet)
    options.embed_options(None, token_budget, precision, device)
    options.knn_options(k, method, None, recall_target)
    options.at_least("--examples", examples, 0)
    ds = load_manifest(manifest, source)
    out = out or Path("runs") / ds.name
    config = EmbedConfig(model=model, device=device, precision=precision,
                         token_budget=token_budget, skip_bad_rows=skip_bad_rows,
                         trust_remote_code=trust_remote_code)
    if _on_dask(engine, scheduler, None):
        with _dask(scheduler) as client:
            _embed_on_dask(client, manifest, source, out, None, config)
            _knn_on_dask(client, out, k, method, None, 4096, recall_target, False)
    else:
        r = embed_shard(ds, out, 0, 1, config, reporter_for("embed", quiet))
        typer.echo(f"embedded {r.texts_encoded} texts in {r.seconds:.1f}s into "
                   f"{out}/embeddings.zarr", err=True)
        kr = knn_shard(out, k, method, recall_target=recall_target,
                       reporter=reporter_for("knn", quiet))
        _knn_summary(kr, 0, 1)
    if examples > 0:
        _print_examples(out, ds.manifest.examples, examples)


def _print_examples(out: Path, texts: list[str], k: int) -> None:
    """For a few nodes, their first neighbours in the built graph."""
    import numpy as np

    from graphbuild.inspect.neighbors import find_nodes, node_texts
    from graphbuild.rundir.graph import read_graph_csr
    from graphbuild.rundir.paths import RunDir

    found = find_nodes(out, texts) if texts else {}
    if not found:  # no examples named: three nodes spread over the run
        n = RunDir(out).read_run()["dataset"]["figures"]["nodes"]
        found = {t: i for i, t in node_texts(out, [0, n // 2, n - 1]).items()}
    indptr, indices, sims = read_graph_csr(out)
    rows = {q: slice(indptr[i], min(indptr[i] + k, indptr[i + 1])) for q, i in found.items()}
    names = node_texts(out, np.concatenate([indices[r] for r in rows.values()]))
    for q, r in rows.items():
        near = ", ".join(f"{names[int(i)]} ({s:.2f})" for i, s in zip(indices[r], sims[r]))
        typer.echo(f"{q}  ->  {near}")
