"""`graphbuild` command line: a thin layer over the library; heavy imports happen per command."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from graphbuild.errors import GraphbuildError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Embed texts once, offline; build top-k similarity graphs for X-CLR.")
log = logging.getLogger("graphbuild")

DEFAULT_MANIFEST = Path("data_manifests/imagenet1k.yaml")

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, warnings only.")]
Shard = Annotated[Optional[int], typer.Option(
    help="This task's shard, 0-based. Default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, or 0.")]
NumShards = Annotated[Optional[int], typer.Option(
    help="Number of shards. Default: SLURM_ARRAY_TASK_COUNT, or 1.")]
Source = Annotated[Optional[str], typer.Option(
    help="Source file or glob, replacing the manifest's source.path.")]
Model = Annotated[str, typer.Option(help="sentence-transformers model: a local directory, a name "
                                    "in the local HF cache, or the bundled default.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Precision = Annotated[str, typer.Option(
    help="auto (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32), fp32, bf16 or fp16.")]
TokenBudget = Annotated[Optional[int], typer.Option(
    help="Padded tokens per forward pass. Default: 2048 on CPU, 65536 on CUDA.")]
SkipBad = Annotated[bool, typer.Option(
    help="Drop rows with empty text, unknown labels or duplicate ids instead of failing.")]
ChunkRows = Annotated[int, typer.Option(
    help="Rows per Zarr chunk, the unit of work and of resume. Fixed when the store is created.")]
TrustCode = Annotated[bool, typer.Option(help="Let the model run code shipped with it.")]


def _logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _embed_config(**options):
    from graphbuild.embed import EmbedConfig

    return EmbedConfig(**options)


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
    quiet: Quiet = False,
) -> None:
    """Embed a dataset's unique texts into OUT/embeddings.zarr (fp16, unit norm). Resumable."""
    from graphbuild.embed import embed_shard
    from graphbuild.manifest import load_manifest
    from graphbuild.progress import reporter_for
    from graphbuild.shards import resolve_shard

    _logging(quiet)
    ds = load_manifest(manifest, source)
    s, n = resolve_shard(shard, num_shards)
    config = _embed_config(model=model, device=device, precision=precision,
                           token_budget=token_budget, chunk_rows=chunk_rows,
                           skip_bad_rows=skip_bad_rows, trust_remote_code=trust_remote_code)
    r = embed_shard(ds, out, s, n, config, reporter_for(f"embed {s}/{n}", quiet))
    state = "complete" if r.complete else f"{len(r.missing_chunks)} chunks still to do by other shards"
    typer.echo(f"embed shard {s}/{n}: {r.texts_encoded} texts in {r.seconds:.1f}s "
               f"({r.texts_per_s:,.0f} texts/s), {r.chunks_skipped} chunks already done; "
               f"embeddings {state}", err=True)


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
    examples: Annotated[int, typer.Option(help="Neighbours to print per example text.")] = 5,
    quiet: Quiet = False,
) -> None:
    """Run every stage in this process (default: ImageNet-1k), then print example neighbours."""
    from graphbuild.embed import embed_shard
    from graphbuild.manifest import load_manifest
    from graphbuild.progress import reporter_for

    _logging(quiet)
    ds = load_manifest(manifest, source)
    out = out or Path("runs") / ds.name
    config = _embed_config(model=model, device=device, precision=precision,
                           token_budget=token_budget, skip_bad_rows=skip_bad_rows,
                           trust_remote_code=trust_remote_code)
    r = embed_shard(ds, out, 0, 1, config, reporter_for("embed", quiet))
    typer.echo(f"embedded {r.texts_encoded} texts in {r.seconds:.1f}s into {out}/embeddings.zarr",
               err=True)
    if examples > 0:
        _print_examples(out, ds.manifest.examples, examples)


def _print_examples(out: Path, texts: list[str], k: int) -> None:
    from graphbuild.neighbors import exact_neighbors, find_nodes, node_texts
    from graphbuild.storage import RunDir

    found = find_nodes(out, texts) if texts else {}
    if not found:  # no examples named: three nodes spread over the run
        n = RunDir(out).read_run()["dataset"]["figures"]["nodes"]
        found = {t: i for i, t in node_texts(out, [0, n // 2, n - 1]).items()}
    queries = list(found.values())
    ids, sims = exact_neighbors(out, queries, k)
    names = node_texts(out, ids)
    for q, row_i, row_s in zip(found, ids, sims):
        near = ", ".join(f"{names[int(i)]} ({s:.2f})" for i, s in zip(row_i, row_s))
        typer.echo(f"{q}  ->  {near}")


def main() -> None:
    try:
        # Typer turns Ctrl-C into a return value of 130 when not in standalone mode.
        code = app(standalone_mode=False)
    except GraphbuildError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        code = 130
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    if code == 130:
        typer.echo("interrupted: finished work is kept; rerun the same command to resume", err=True)
    sys.exit(code if isinstance(code, int) else 0)
