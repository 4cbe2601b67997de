"""`graphbuild neighbors | stats | validate | report`: looking at a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from graphbuild import options
from graphbuild.cli.app import Device, Quiet, _logging, app
from graphbuild.errors import GraphbuildError

RunArg = Annotated[Path, typer.Argument(metavar="RUN", help="A finished run directory.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
TauS = Annotated[float, typer.Option("--tau-s", help="Soft-target temperature of the entropy.")]
BatchSize = Annotated[int, typer.Option(help="Samples per random batch for the entropy.")]
Batches = Annotated[int, typer.Option(help="Random batches for the entropy.")]
Seed = Annotated[int, typer.Option(help="Seed of the random batches and examples.")]


@app.command()
def neighbors(
    run_dir: RunArg,
    text: Annotated[Optional[str], typer.Argument(
        help="Any text; one that is not a node is embedded with the run's own model.")] = None,
    node: Annotated[Optional[int], typer.Option(help="A node id, instead of a text.")] = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Neighbours to show.")] = options.NEIGHBORS,
    model: Annotated[Optional[str], typer.Option(
        help="Where the run's model is now, if it moved (its weights must match).")] = None,
    device: Device = "auto",
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """The nearest nodes of a text or a node, with cosine, text and samples per node."""
    import json

    from graphbuild.inspect.neighbors import format_neighbors, node_neighbors, text_neighbors

    _logging(quiet)
    options.at_least("--k", k)
    options.device(device)
    if (text is None) == (node is None):
        raise GraphbuildError("give a TEXT or --node ID (one of them)")
    r = (node_neighbors(run_dir, node, k) if node is not None
         else text_neighbors(run_dir, text, k, device, model))
    typer.echo(json.dumps(r.as_dict(), indent=2) if as_json else format_neighbors(r))


@app.command()
def stats(
    run_dir: RunArg,
    tau_s: TauS = options.TAU_S,
    batch_size: BatchSize = options.BATCH_SIZE,
    batches: Batches = options.BATCHES,
    seed: Seed = options.SEED,
    as_json: AsJson = False,
) -> None:
    """Duplicates, similarity percentiles, degrees and hubness, recall, soft-target entropy."""
    import json

    from graphbuild.inspect.stats import format_stats, run_stats

    options.entropy_options(tau_s, batch_size, batches)
    s = run_stats(run_dir, tau_s, batch_size, batches, seed)
    typer.echo(json.dumps(s, indent=2) if as_json else format_stats(s))


@app.command()
def validate(run_dir: RunArg) -> None:
    """Check every file of a run; one line per problem, exit 1 if any (checks: see README)."""
    from graphbuild.inspect.validate import validate as check_run

    v = check_run(run_dir)
    for problem in v.problems:
        typer.echo(str(problem))
    if not v.ok:
        typer.echo(f"{run_dir}: {len(v.problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo(v.summary())


@app.command()
def report(
    run_dir: RunArg,
    out: Annotated[Optional[Path], typer.Option(
        help="The HTML file; its PNGs go beside it. Default: RUN/report.html.")] = None,
    tau_s: TauS = options.TAU_S,
    batch_size: BatchSize = options.BATCH_SIZE,
    batches: Batches = options.BATCHES,
    seed: Seed = options.SEED,
) -> None:
    """A self-contained HTML report with plots: similarities, in-degree, entropy, examples."""
    from graphbuild.inspect.report import write_report

    options.entropy_options(tau_s, batch_size, batches)
    r = write_report(run_dir, out or run_dir / "report.html", tau_s, batch_size, batches, seed)
    typer.echo(f"report: {r.html} (images: {', '.join(p.name for p in r.images)})")
