"""`graphbuild status` and `graphbuild submit slurm`: runs spread over a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from graphbuild import options
from graphbuild.cli.app import ChunkRows, Model, Precision, Quiet, Source, _logging, app
from graphbuild.cli.build import K, Method, RecallTarget
from graphbuild.errors import GraphbuildError


@app.command()
def status(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Shards done / pending / failed per stage, throughput and ETA, from markers and logs."""
    from graphbuild.scale.status import format_status, run_status, to_json

    if not run_dir.is_dir():
        raise GraphbuildError(f"{run_dir}: no such run directory")
    st = run_status(run_dir)
    typer.echo(to_json(st) if as_json else format_status(st))


submit_app = typer.Typer(no_args_is_help=True, help="Submit a run to a cluster's scheduler.")
app.add_typer(submit_app, name="submit")


@submit_app.command("slurm")
def submit_slurm(
    manifest: Annotated[Path, typer.Argument(help="Dataset manifest (YAML).")],
    out: Annotated[Path, typer.Option(help="Run directory, on a filesystem all nodes share.")],
    k: K = options.K,
    embed_shards: Annotated[int, typer.Option(help="Embed array size.")] = 1,
    knn_shards: Annotated[int, typer.Option(help="Knn array size.")] = 1,
    source: Source = None,
    model: Model = options.MODEL,
    precision: Precision = "auto",
    chunk_rows: ChunkRows = options.CHUNK_ROWS,
    method: Method = "auto",
    recall_target: RecallTarget = options.RECALL_TARGET,
    partition: Annotated[Optional[str], typer.Option(help="sbatch --partition.")] = None,
    account: Annotated[Optional[str], typer.Option(help="sbatch --account.")] = None,
    time_limit: Annotated[Optional[str], typer.Option(
        "--time", help="sbatch --time per task, e.g. 02:00:00.")] = None,
    cpus_per_task: Annotated[Optional[int], typer.Option(help="sbatch --cpus-per-task.")] = None,
    mem: Annotated[Optional[str], typer.Option(help="sbatch --mem, e.g. 32G.")] = None,
    gpus_per_task: Annotated[Optional[int], typer.Option(
        help="sbatch --gpus-per-task; 1 gives one shard per GPU.")] = None,
    max_parallel: Annotated[Optional[int], typer.Option(
        help="At most this many tasks of an array at once (--array=...%N).")] = None,
    sbatch: Annotated[Optional[list[str]], typer.Option(
        help="An extra #SBATCH option, e.g. --sbatch=--qos=high; repeatable.")] = None,
    setup: Annotated[str, typer.Option(
        help="A shell line each task runs first, e.g. 'source ~/venvs/gb/bin/activate'.")] = "",
    command: Annotated[str, typer.Option(help="How a task calls graphbuild.")] = "graphbuild",
    dry_run: Annotated[bool, typer.Option(help="Print the scripts and sbatch commands only.")] = False,
    quiet: Quiet = False,
) -> None:
    """sbatch an embed array and a knn array (afterok) over the shards not yet done."""
    import shlex

    from graphbuild.prepare.manifest import load_manifest
    from graphbuild.scale.slurm import SbatchOptions, plan, submit

    _logging(quiet)
    # refuse bad values and a bad manifest here, not in 64 tasks
    options.embed_options(chunk_rows, None, precision, "auto")
    options.knn_options(k, method, None, recall_target)
    options.at_least("--embed-shards", embed_shards)
    options.at_least("--knn-shards", knn_shards)
    options.at_least("--max-parallel", max_parallel)
    ds = load_manifest(manifest, source)
    opts = SbatchOptions(partition=partition, account=account, time=time_limit,
                         cpus_per_task=cpus_per_task, mem=mem, gpus_per_task=gpus_per_task,
                         max_parallel=max_parallel, extra=sbatch or [], setup=setup,
                         command=command, job_name=f"gb-{ds.name}")
    embed_args = ["--model", model, "--precision", precision, "--chunk-rows", str(chunk_rows)]
    if source:
        embed_args += ["--source", str(Path(source).absolute())]
    knn_args = ["--k", str(k), "--method", method, "--recall-target", str(recall_target)]
    jobs = plan(manifest, out, opts, embed_shards, knn_shards, embed_args, knn_args)
    if not jobs:
        typer.echo(f"{out}: every embed and knn shard is done; nothing to submit", err=True)
        return
    submit(jobs, out.resolve(), dry_run)
    for job in jobs:
        if dry_run:
            typer.echo(f"# ---- {job.script}\n{job.text}")
        typer.echo(("" if not dry_run else "# ") + shlex.join(job.command)
                   + ("" if dry_run else f"   -> job {job.job_id}"))
        typer.echo(f"{job.stage}: shards {len(job.shards)} of {job.num_shards} "
                   f"({job.command[2].split('=', 1)[1]})", err=True)
