"""`graphbuild export`: sidecars of a WebDataset's tars, a call of graphbuild.export
(graphbuild/api.py); it only parses flags and prints the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import graphbuild
from graphbuild import options
from graphbuild.cli.app import NumShards, Quiet, Shard, _logging, app


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="Finished run directory.")],
    like: Annotated[Path, typer.Option(
        help="Directory of the WebDataset shards (NAME.tar) whose keys are the run's ids.")],
    out: Annotated[Path, typer.Option(help="Directory for the sidecars (NAME.parquet).")],
    payload: Annotated[str, typer.Option(
        help="fp16 (the stored rows: targets equal exact mode's), int8 (per-row scale) or "
             "pca-N (N principal axes of the store, fp16).")] = options.PAYLOAD,
    shard: Shard = None,
    num_shards: NumShards = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace an export of another run or payload in OUT.")] = False,
    quiet: Quiet = False,
) -> None:
    """Write OUT/NAME.parquet beside each LIKE/NAME.tar: keys, nodes and payload in the
    tar's order, for a trainer that streams the tars. Resumable."""
    _logging(quiet)
    r = graphbuild.export(run_dir, like, out, payload=payload, shard=shard,
                          num_shards=num_shards, overwrite=overwrite, progress=not quiet)
    done = (f"{r.tars_exported} tars exported ({r.samples} samples, {r.missing} without a "
            f"sample in the run, {r.bytes / 2**20:,.1f} MiB) in {r.seconds:.1f}s")
    state = "complete" if r.complete else "incomplete: other shards still to run"
    typer.echo(f"export shard {r.shard}/{r.num_shards} ({r.payload}, run {r.run_id}): {done}, "
               f"{r.tars_skipped} already done; {r.out} {state}", err=True)
