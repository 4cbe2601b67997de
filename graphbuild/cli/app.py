"""The typer app, its shared options, and logging for the commands."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Optional

import typer

from graphbuild import options
from graphbuild.errors import GraphbuildError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Embed texts once, offline; build top-k similarity graphs for X-CLR.")
log = logging.getLogger("graphbuild")

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
    help="Padded tokens per forward pass. Default: "
         f"{options.TOKEN_BUDGET['cpu']} on CPU, {options.TOKEN_BUDGET['cuda']} on CUDA.")]
SkipBad = Annotated[bool, typer.Option(
    help="Drop rows with a missing field or id, empty text, an unknown label or a repeated id "
         "instead of failing; they are counted.")]
ChunkRows = Annotated[int, typer.Option(
    help="Rows per Zarr chunk, the unit of work and of resume. Fixed when the store is created.")]
TrustCode = Annotated[bool, typer.Option(help="Let the model run code shipped with it.")]


@app.callback()
def _options(
    lock_timeout: Annotated[Optional[float], typer.Option(
        help="Seconds to wait for a lock held by another process (a run's metadata, or a shard "
             "a duplicate task is running) before giving up with an error naming the holder. "
             "Default: $GRAPHBUILD_LOCK_TIMEOUT, or wait as long as the holder lives.")] = None,
) -> None:
    """Embed texts once, offline; build top-k similarity graphs for X-CLR."""
    if lock_timeout is not None:
        from graphbuild.rundir.locks import LOCK_TIMEOUT_ENV

        if not lock_timeout >= 0:  # also refuses nan
            raise GraphbuildError(f"--lock-timeout must be seconds >= 0, got {lock_timeout}")
        os.environ[LOCK_TIMEOUT_ENV] = str(lock_timeout)  # Dask workers we start inherit it


def _logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


# --engine dask on embed, knn and run (graphbuild/scale/engine.py).
Engine = Annotated[str, typer.Option(
    help="local: this process runs one shard (--shard, or the SLURM array task's). dask: every "
         "shard as a task on a Dask cluster (--scheduler, or a LocalCluster here).")]
Scheduler = Annotated[Optional[str], typer.Option(
    help="With --engine dask: a running scheduler, tcp://HOST:PORT or a scheduler file (.json). "
         "Default: a LocalCluster on this machine.")]
