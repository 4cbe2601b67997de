"""The Python API: graphbuild.embed, graphbuild.knn, graphbuild.run and graphbuild.export.

The commands `graphbuild embed | knn | run | export` are these functions behind flags: the same
options under the same names, the same defaults (graphbuild/options.py) and the same one-line
GraphbuildErrors for bad values, raised before a source is read or a model loaded. Each
function runs one shard of a stage in this process (embedding/stage.py, graph/stage.py), or
every shard as a task on a Dask cluster (engine="dask", scale/engine.py).

Nothing heavy is imported until a function is called, so `import graphbuild` stays light for
the CLI's start-up and for the trainer side (graphbuild.xclr).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from graphbuild import options
from graphbuild.errors import GraphbuildError

if TYPE_CHECKING:
    from graphbuild.embedding.stage import EmbedConfig, ShardResult
    from graphbuild.graph.stage import KnnResult
    from graphbuild.prepare.manifest import Dataset
    from graphbuild.sidecars.stage import ExportResult

    OnShard = Callable[[ShardResult | KnnResult], None]


@dataclass
class RunResult:
    """What run() did: the run directory, each stage's result (a list by shard on Dask), and
    the first neighbours of the example texts (text -> [(neighbour text, cosine), ...])."""

    out: Path
    embed: ShardResult | list[ShardResult]
    knn: KnnResult | list[KnnResult]
    examples: dict[str, list[tuple[str, float]]] = field(default_factory=dict)


def embed(manifest: str | Path | Dataset, out: str | Path, *, source: str | None = None,
          shard: int | None = None, num_shards: int | None = None,
          model: str = options.MODEL, device: str = "auto", precision: str = "auto",
          token_budget: int | None = None, chunk_rows: int = options.CHUNK_ROWS,
          skip_bad_rows: bool = False, trust_remote_code: bool = False,
          engine: str = "local", scheduler: str | None = None, progress: bool = False,
          on_shard: OnShard | None = None, append: bool = False,
          ) -> ShardResult | list[ShardResult]:
    """Embed a dataset's unique texts into `out`/embeddings.zarr (fp16, unit norm). Resumable:
    a rerun redoes only the chunks not done.

    `append`: source files the run was not built from are appended to it (new texts become
    nodes after the old ones, only they are embedded; prepare/append.py says what is refused);
    without it they are refused. An append runs in one process (engine="local"); the new
    chunks can then be embedded by shards as usual.

    `manifest` is a manifest's path or a Dataset from `load_manifest(path, source)`; `source`
    replaces the manifest's source.path. The options are `graphbuild embed`'s (README). With
    engine="local" this process embeds shard `shard` of `num_shards` (default: the SLURM array
    task's, or 0 of 1) and returns its ShardResult; with engine="dask", every shard is a task
    on the cluster at `scheduler` (default: a LocalCluster here), and the ShardResults come
    back as a list by shard. `progress`: a bar on stderr when it is a terminal (local only).
    `on_shard(result)` is called as each shard finishes.
    """
    config = _embed_config(model, device, precision, token_budget, chunk_rows, skip_bad_rows,
                           trust_remote_code)
    config.append = append
    on_dask = _on_dask(engine, scheduler, shard, num_shards)
    if append and on_dask:
        raise GraphbuildError("--append: an append runs in one process; append with "
                              "--engine local, then embed the new chunks on dask")
    ds = _dataset(manifest, source)
    if on_dask:
        from graphbuild.scale.engine import dask_client

        with dask_client(scheduler) as client:
            return _embed_on_dask(client, ds, out, num_shards, config, on_shard)
    return _embed_here(ds, out, shard, num_shards, config, progress, on_shard)


def knn(run: str | Path, k: int = options.K, *, method: str = "auto",
        recall_target: float = options.RECALL_TARGET, shard: int | None = None,
        num_shards: int | None = None, block_rows: int = options.BLOCK_ROWS,
        overwrite: bool = False, device: str | None = None, engine: str = "local",
        scheduler: str | None = None, progress: bool = False,
        on_shard: OnShard | None = None) -> KnnResult | list[KnnResult]:
    """Build the top-k cosine graph of the run directory `run`: graph/part-*.parquet and
    graph/_meta.json. Resumable: a rerun redoes only the shards not done.

    The options are `graphbuild knn`'s (README); `device` is the exact search's torch device
    (None or "auto": CUDA when there is one, else the CPU; on Dask, each worker's own GPU).
    Shards, engines, `progress` and `on_shard` as in embed(); returns the KnnResult, or on
    Dask a list of them by shard.
    """
    _check_knn(k, method, block_rows, recall_target, device)
    on_dask = _on_dask(engine, scheduler, shard, num_shards)
    if on_dask:
        from graphbuild.scale.engine import dask_client

        with dask_client(scheduler) as client:
            return _knn_on_dask(client, run, k, method, num_shards, block_rows, recall_target,
                                overwrite, _knn_device(device), on_shard)
    return _knn_here(run, k, method, shard, num_shards, block_rows, recall_target, overwrite,
                     _knn_device(device), progress, on_shard)


def run(manifest: str | Path | Dataset, out: str | Path | None = None, *,
        source: str | None = None, model: str = options.MODEL, device: str = "auto",
        precision: str = "auto", token_budget: int | None = None,
        chunk_rows: int = options.CHUNK_ROWS, skip_bad_rows: bool = False,
        trust_remote_code: bool = False, k: int = options.K, method: str = "auto",
        recall_target: float = options.RECALL_TARGET, block_rows: int = options.BLOCK_ROWS,
        overwrite: bool = False, examples: int = options.EXAMPLES, engine: str = "local",
        scheduler: str | None = None, progress: bool = False,
        on_shard: OnShard | None = None) -> RunResult:
    """embed(), then knn(), into `out` (default: runs/<the dataset's name>): in this process
    as one shard each, or every shard on one Dask cluster. The options are embed()'s and
    knn()'s (`device` serves both stages); `examples`: how many neighbours of each example
    text (the manifest's `examples`, else three nodes spread over the run) to look up, 0 for
    none. Returns a RunResult with both stages' results.
    """
    config = _embed_config(model, device, precision, token_budget, chunk_rows, skip_bad_rows,
                           trust_remote_code)
    _check_knn(k, method, block_rows, recall_target, None)
    options.at_least("--examples", examples, 0)
    on_dask = _on_dask(engine, scheduler, None, None)
    ds = _dataset(manifest, source)
    out = Path(out) if out is not None else Path("runs") / ds.name
    knn_device = _knn_device(device)
    if on_dask:
        from graphbuild.scale.engine import dask_client

        with dask_client(scheduler) as client:
            embedded = _embed_on_dask(client, ds, out, None, config, on_shard)
            graph = _knn_on_dask(client, out, k, method, None, block_rows, recall_target,
                                 overwrite, knn_device, on_shard)
    else:  # one shard of each stage, here
        embedded = _embed_here(ds, out, 0, 1, config, progress, on_shard)
        graph = _knn_here(out, k, method, 0, 1, block_rows, recall_target, overwrite, knn_device,
                          progress, on_shard)
    shown = {}
    if examples > 0:
        from graphbuild.inspect.neighbors import example_neighbors

        shown = example_neighbors(out, ds.manifest.examples, examples)
    return RunResult(out, embedded, graph, shown)


def export(run: str | Path, like: str | Path, out: str | Path, *,
           payload: str = options.PAYLOAD, shard: int | None = None,
           num_shards: int | None = None, overwrite: bool = False,
           progress: bool = False) -> ExportResult:
    """Write a sidecar `out`/NAME.parquet for each WebDataset shard `like`/NAME.tar: the
    tar's keys in order, each key's node in the run, and its payload (fp16, int8 or pca-N;
    graphbuild/rundir/sidecar.py), for a trainer that streams the tars
    (graphbuild.xclr.stream). Resumable: a rerun redoes only tars not done.

    This process exports shard `shard` of `num_shards` (default: the SLURM array task's, or
    0 of 1): a contiguous run of the tars in name order. `overwrite` replaces an export of
    another run or payload in `out`. Returns an ExportResult (`complete` once every tar has
    its sidecar).
    """
    from graphbuild.shards import resolve_shard
    from graphbuild.sidecars.stage import export_shard

    options.payload(payload)
    options.at_least("--num-shards", num_shards)
    s, n = resolve_shard(shard, num_shards)
    return export_shard(run, like, out, payload, s, n, overwrite,
                        _reporter(f"export {s}/{n}", progress))


def _embed_config(model: str, device: str, precision: str, token_budget: int | None,
                  chunk_rows: int, skip_bad_rows: bool, trust_remote_code: bool) -> EmbedConfig:
    from graphbuild.embedding.stage import EmbedConfig

    options.embed_options(chunk_rows, token_budget, precision, device)
    return EmbedConfig(model=model, device=device, precision=precision,
                       token_budget=token_budget, chunk_rows=chunk_rows,
                       skip_bad_rows=skip_bad_rows, trust_remote_code=trust_remote_code)


def _check_knn(k: int, method: str, block_rows: int, recall_target: float,
               device: str | None) -> None:
    options.knn_options(k, method, block_rows, recall_target)
    if device is not None:
        options.device(device)


def _knn_device(device: str | None) -> str | None:
    """The exact search takes None for "pick one"."""
    return None if device == "auto" else device


def _on_dask(engine: str, scheduler: str | None, shard: int | None,
             num_shards: int | None) -> bool:
    """Whether the shards run on Dask; refuses a bad engine, scheduler or shard count."""
    from graphbuild.scale.engine import check_engine

    check_engine(engine, scheduler)
    options.at_least("--num-shards", num_shards)
    if engine == "dask" and shard is not None:
        raise GraphbuildError("--engine dask runs every shard; drop --shard")
    return engine == "dask"


def _dataset(manifest: str | Path | Dataset, source: str | None) -> Dataset:
    from graphbuild.prepare.manifest import Dataset, load_manifest

    if not isinstance(manifest, Dataset):
        return load_manifest(manifest, source)
    if source is not None:
        raise GraphbuildError("source= is for a manifest's path; a loaded Dataset has its "
                              "source already (load_manifest(path, source))")
    return manifest


def _reporter(description: str, progress: bool):
    from graphbuild.progress import reporter_for

    return reporter_for(description, quiet=not progress)


def _embed_here(ds: Dataset, out, shard: int | None, num_shards: int | None,
                config: EmbedConfig, progress: bool, on_shard) -> ShardResult:
    from graphbuild.embedding.stage import embed_shard
    from graphbuild.shards import resolve_shard

    s, n = resolve_shard(shard, num_shards)
    result = embed_shard(ds, out, s, n, config, _reporter(f"embed {s}/{n}", progress))
    if on_shard is not None:
        on_shard(result)
    return result


def _embed_on_dask(client, ds: Dataset, out, num_shards: int | None, config: EmbedConfig,
                   on_shard) -> list[ShardResult]:
    from graphbuild.scale import engine

    # the workers read the manifest from its path
    return engine.embed(client, ds.path, ds.source_override, out, config, num_shards, on_shard)


def _knn_here(out, k: int, method: str, shard: int | None, num_shards: int | None,
              block_rows: int, recall_target: float, overwrite: bool, device: str | None,
              progress: bool, on_shard) -> KnnResult:
    from graphbuild.graph.stage import knn_shard
    from graphbuild.shards import resolve_shard

    s, n = resolve_shard(shard, num_shards)
    result = knn_shard(out, k, method, s, n, block_rows, recall_target,
                       _reporter(f"knn {s}/{n}", progress), overwrite, device=device)
    if on_shard is not None:
        on_shard(result)
    return result


def _knn_on_dask(client, out, k: int, method: str, num_shards: int | None, block_rows: int,
                 recall_target: float, overwrite: bool, device: str | None,
                 on_shard) -> list[KnnResult]:
    from graphbuild.scale import engine

    return engine.knn(client, out, k, method, num_shards, block_rows, recall_target,
                      overwrite, on_shard, device=device)
