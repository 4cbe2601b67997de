"""graphbuild: embed texts once, build a top-k similarity graph, serve X-CLR soft targets.

    import graphbuild
    graphbuild.embed("data_manifests/coco.yaml", "runs/coco")   # -> embeddings.zarr
    graphbuild.knn("runs/coco", k=64)                          # -> graph/part-*.parquet
    graphbuild.run("data_manifests/coco.yaml", k=64)           # both, into runs/<name>
    graphbuild.export("runs/cc3m", "/data/cc3m-wds", "/data/cc3m-xclr")  # sidecars per tar

embed, knn, run and export (api.py) are the Python face of the commands of the same names.
They import their machinery when called, so `import graphbuild` loads no torch,
sentence-transformers, polars, zarr or typer: the CLI starts quickly and the trainer side
(graphbuild.xclr) pays only for what it uses. Packages:

  prepare/    stage 1: a manifest's source to the nodes and samples tables
  embedding/  stage 2: the nodes' texts to embeddings.zarr
  graph/      stage 3: the stored rows to the top-k graph
  sidecars/   the stored rows as sidecars of a WebDataset's tars, for streaming trainers
  inspect/    looking at a run: neighbors, stats, validate, report
  scale/      Dask and SLURM
  rundir/     the run directory's format, read by everyone
  xclr/       the trainer side: soft targets, loss, samplers
  cli/        the command line, a thin layer over api.py
options.py holds every default and the checks of user values; errors.py the one error type;
devices.py what a CUDA device offers a stage, and its out-of-memory errors as one line.
"""

from graphbuild.api import RunResult, embed, export, knn, run

__all__ = ["RunResult", "__version__", "embed", "export", "knn", "run"]


def __getattr__(name: str):
    # __version__ on first use: reading package metadata costs more than the rest of the import
    if name == "__version__":
        from importlib import metadata

        try:
            return metadata.version("graphbuild")
        except metadata.PackageNotFoundError:  # a source tree that was never installed
            return "0+unknown"
    raise AttributeError(f"module 'graphbuild' has no attribute {name!r}")
