"""`graphbuild embed | knn | run`: the commands that build a run, each a call of the function
of the same name in graphbuild/api.py; they only parse flags and print results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import graphbuild
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

DEFAULT_MANIFEST = Path("data_manifests/imagenet1k.yaml")


def _echo_shard(r) -> None:
    """One line per finished shard, as it finishes (on Dask too): an embed ShardResult or a
    KnnResult."""
    from graphbuild.embedding.stage import ShardResult

    if isinstance(r, ShardResult):
        state = ("complete" if r.complete
                 else f"{len(r.missing_chunks)} chunks still to do by other shards")
        typer.echo(f"embed shard {r.shard}/{r.num_shards}: {r.texts_encoded} texts in "
                   f"{r.seconds:.1f}s ({r.texts_per_s:,.0f} texts/s), {r.chunks_skipped} chunks "
                   f"already done; embeddings {state}", err=True)
        return
    recall = "" if r.recall is None else f", recall@{r.k} {r.recall:.3f}"
    did = "already done" if r.skipped else (
        f"{r.rows} queries in {r.seconds:.1f}s ({r.queries_per_s:,.0f} queries/s)")
    state = "complete" if r.complete else f"waiting for shards {r.missing_shards}"
    typer.echo(f"knn shard {r.shard}/{r.num_shards} ({r.method}, k={r.k}{recall}): {did}; "
               f"graph {state}", err=True)


def _dask_summary(stage: str, results) -> None:
    """After every shard of a stage ran on Dask: how many, and whether the output is whole."""
    if not isinstance(results, list):
        return
    done = "complete" if any(r.complete for r in results) else "incomplete"
    if stage == "embed":
        typer.echo(f"embed: {len(results)} shards on dask, "
                   f"{sum(r.texts_encoded for r in results)} texts encoded; embeddings {done}",
                   err=True)
    else:
        typer.echo(f"knn: {len(results)} shards on dask; graph {done}", err=True)


@app.command()
def embed(
    manifest: Annotated[Path, typer.Argument(help="Dataset manifest (YAML).")],
    out: Annotated[Path, typer.Option(help="Run directory.")],
    source: Source = None,
    shard: Shard = None,
    num_shards: NumShards = None,
    model: Model = options.MODEL,
    device: Device = "auto",
    precision: Precision = "auto",
    token_budget: TokenBudget = None,
    chunk_rows: ChunkRows = options.CHUNK_ROWS,
    skip_bad_rows: SkipBad = False,
    trust_remote_code: TrustCode = False,
    engine: Engine = "local",
    scheduler: Scheduler = None,
    quiet: Quiet = False,
    append: Annotated[bool, typer.Option(
        "--append", help="Append source files the run was not built from: only their new "
                         "texts are embedded; then `graphbuild knn` updates the graph.")] = False,
) -> None:
    """Embed a dataset's unique texts into OUT/embeddings.zarr (fp16, unit norm). Resumable."""
    _logging(quiet)
    results = graphbuild.embed(
        manifest, out, source=source, shard=shard, num_shards=num_shards, model=model,
        device=device, precision=precision, token_budget=token_budget, chunk_rows=chunk_rows,
        skip_bad_rows=skip_bad_rows, trust_remote_code=trust_remote_code, engine=engine,
        scheduler=scheduler, progress=not quiet, on_shard=_echo_shard, append=append)
    _dask_summary("embed", results)


K = Annotated[int, typer.Option("--k", "-k", help="Neighbours per node (clamped to n_nodes - 1).")]
Method = Annotated[str, typer.Option(
    help="auto (exact where affordable), exact, or approximate (faiss IVF).")]
RecallTarget = Annotated[float, typer.Option(
    help="Approximate mode: tune nprobe until sampled recall@k reaches this.")]
BlockRows = Annotated[int, typer.Option(help="Rows per block of the exact search (memory).")]
Overwrite = Annotated[bool, typer.Option(help="Replace a graph built with other settings.")]


@app.command()
def knn(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory with embeddings.")],
    k: K = options.K,
    method: Method = "auto",
    recall_target: RecallTarget = options.RECALL_TARGET,
    shard: Shard = None,
    num_shards: NumShards = None,
    block_rows: BlockRows = options.BLOCK_ROWS,
    overwrite: Overwrite = False,
    device: Device = "auto",
    engine: Engine = "local",
    scheduler: Scheduler = None,
    quiet: Quiet = False,
) -> None:
    """Build the top-k cosine graph of a run: RUN/graph/part-*.parquet. Resumable.
    --device: where the exact search runs and faiss searches (auto: CUDA when there is one;
    on Dask, each worker's own GPU)."""
    _logging(quiet)
    results = graphbuild.knn(
        run_dir, k, method=method, recall_target=recall_target, shard=shard,
        num_shards=num_shards, block_rows=block_rows, overwrite=overwrite, device=device,
        engine=engine, scheduler=scheduler, progress=not quiet, on_shard=_echo_shard)
    _dask_summary("knn", results)


@app.command()
def run(
    manifest: Annotated[Path, typer.Argument(help="Dataset manifest (YAML).")] = DEFAULT_MANIFEST,
    out: Annotated[Optional[Path], typer.Option(help="Run directory. Default: runs/<name>.")] = None,
    source: Source = None,
    model: Model = options.MODEL,
    device: Device = "auto",
    precision: Precision = "auto",
    token_budget: TokenBudget = None,
    chunk_rows: ChunkRows = options.CHUNK_ROWS,
    skip_bad_rows: SkipBad = False,
    trust_remote_code: TrustCode = False,
    k: K = options.K,
    method: Method = "auto",
    recall_target: RecallTarget = options.RECALL_TARGET,
    block_rows: BlockRows = options.BLOCK_ROWS,
    overwrite: Overwrite = False,
    examples: Annotated[int, typer.Option(
        help="Neighbours to print per example text (0: none).")] = options.EXAMPLES,
    engine: Engine = "local",
    scheduler: Scheduler = None,
    quiet: Quiet = False,
) -> None:
    """Embed and build the graph in this process (default: ImageNet-1k); print examples."""
    _logging(quiet)
    r = graphbuild.run(
        manifest, out, source=source, model=model, device=device, precision=precision,
        token_budget=token_budget, chunk_rows=chunk_rows, skip_bad_rows=skip_bad_rows,
        trust_remote_code=trust_remote_code, k=k, method=method, recall_target=recall_target,
        block_rows=block_rows, overwrite=overwrite, examples=examples, engine=engine,
        scheduler=scheduler, progress=not quiet, on_shard=_echo_shard)
    _dask_summary("embed", r.embed)
    _dask_summary("knn", r.knn)
    typer.echo(f"run: wrote {r.out}/embeddings.zarr and {r.out}/graph", err=True)
    for text, near in r.examples.items():
        typer.echo(f"{text}  ->  " + ", ".join(f"{t} ({s:.2f})" for t, s in near))
