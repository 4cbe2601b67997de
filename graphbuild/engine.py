"""The Dask engine: the stages' own shard functions as tasks on a `distributed` cluster.

Nothing here schedules: `client.submit` puts one task per shard on the cluster and Dask
places, retries and reschedules them. That is safe because embed_shard and knn_shard are
idempotent and resume from their markers, so a shard whose worker died is simply run again
elsewhere and redoes only its unmarked chunks. A user error (GraphbuildError) is returned as
a value, not raised, so Dask does not retry it; the client raises it once.

The cluster is a LocalCluster on this machine by default (one single-threaded worker per
core, or one worker per visible GPU holding the resource {"GPU": 1}), or any running
scheduler: an address (tcp://host:8786) or a scheduler file (JSON), for example from
dask-jobqueue's SLURMCluster (pipeline/README.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from graphbuild.errors import GraphbuildError
from graphbuild.gpus import gpu_count, local_workers, worker_device

log = logging.getLogger(__name__)

ENGINES = ("local", "dask")
RETRIES = 3
# Set on the workers of a LocalCluster that we start: they share the node's GPUs by index.
LOCAL_SLOTS_ENV = "GRAPHBUILD_LOCAL_WORKERS"


@dataclass
class Failed:
    """A user error inside a task, carried back as a value."""
    message: str


def check_engine(engine: str, scheduler: str | None) -> None:
    if engine not in ENGINES:
        raise GraphbuildError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if scheduler and engine != "dask":
        raise GraphbuildError("--scheduler needs --engine dask")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _local_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return gpu_count(os.environ, torch.cuda.device_count() if torch.cuda.is_available() else 0)


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None) -> Iterator:
    """A distributed.Client: to `scheduler` (address or scheduler file) if given, else to a
    new LocalCluster that is closed afterwards."""
    from distributed import Client, LocalCluster

    if scheduler:
        kw = ({"scheduler_file": scheduler} if scheduler.endswith(".json")
              else {"address": scheduler})
        try:
            client = Client(timeout="30s", **kw)
        except OSError as e:
            raise GraphbuildError(f"--scheduler {scheduler}: cannot connect ({e})") from None
        with client:
            yield client
        return
    n_gpus = _local_gpus()
    n, threads = local_workers(_cpus(), n_gpus)
    n = workers or n
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           LOCAL_SLOTS_ENV: str(n)}
    log.info("dask: LocalCluster of %d worker processes, %d torch thread(s) each%s", n, threads,
             f", one GPU each of {n_gpus}" if n_gpus else "")
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                      dashboard_address=":0", resources={"GPU": 1} if n_gpus else None,
                      env=env) as cluster, Client(cluster) as client:
        yield client
        # torch's threads can keep a worker alive past the nanny's grace period at close;
        # it is then killed, which is harmless here: every shard is done or marked.
        logging.getLogger("distributed.nanny").setLevel(logging.ERROR)


def _device(requested: str) -> str:
    """The device for a shard on this worker: as asked, or for auto, this worker's GPU."""
    if requested != "auto":
        return requested
    n = _local_gpus()
    if n == 0:
        return "auto"
    from distributed import get_worker

    slots = os.environ.get(LOCAL_SLOTS_ENV)
    return worker_device(get_worker().name, n, int(slots) if slots else None)


def _limit_threads() -> None:
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def embed_task(manifest: str, source: str | None, out: str, config, shard: int,
               num_shards: int):
    """One embed shard on a worker; the manifest is read there, from a path it can see."""
    from graphbuild.embed import embed_shard
    from graphbuild.manifest import load_manifest

    _limit_threads()
    try:
        ds = load_manifest(Path(manifest), source)
        return embed_shard(ds, out, shard, num_shards, replace(config, device=_device(config.device)))
    except GraphbuildError as e:
        return Failed(str(e))


def knn_task(out: str, k: int, method: str, block_rows: int, recall_target: float,
             overwrite: bool, shard: int, num_shards: int):
    from graphbuild.knn import knn_shard

    _limit_threads()
    device = _device("auto")
    try:
        return knn_shard(out, k, method, shard, num_shards, block_rows, recall_target,
                         overwrite=overwrite, device=None if device == "auto" else device)
    except GraphbuildError as e:
        return Failed(str(e))


def _uses_gpus(client) -> bool:
    workers = client.scheduler_info().get("workers", {}).values()
    return any(w.get("resources", {}).get("GPU") for w in workers)


def default_shards(client) -> int:
    """One shard per worker thread, the most that run at once."""
    return max(1, sum(client.nthreads().values()))


def map_shards(client, stage: str, fn: Callable, args: tuple, num_shards: int,
               shards: list[int] | None = None, retries: int = RETRIES,
               on_result: Callable | None = None) -> list:
    """Run fn(*args, shard, num_shards) for each shard as a Dask task; results by shard.

    Task keys are `graphbuild-{stage}-{shard:05d}-of-{num_shards:05d}-{token}`.
    """
    from distributed import as_completed

    shards = list(range(num_shards)) if shards is None else shards
    token = uuid.uuid4().hex[:8]
    resources = {"GPU": 1} if _uses_gpus(client) else None
    futures = {client.submit(fn, *args, s, num_shards, pure=False, retries=retries,
                             resources=resources,
                             key=f"graphbuild-{stage}-{s:05d}-of-{num_shards:05d}-{token}"): s
               for s in shards}
    results = {}
    try:
        for fut in as_completed(futures):
            r = fut.result()
            if isinstance(r, Failed):
                raise GraphbuildError(r.message)
            results[futures[fut]] = r
            if on_result is not None:
                on_result(r)
    finally:
        client.cancel([f for f in futures if not f.done()])
    return [results[s] for s in shards]


def embed(client, manifest: Path, source: str | None, out: Path, config,
          num_shards: int | None = None, on_result: Callable | None = None) -> list:
    n = num_shards or default_shards(client)
    source = str(Path(source).absolute()) if source else None  # workers may have another cwd
    args = (str(Path(manifest).resolve()), source, str(Path(out).resolve()), config)
    return map_shards(client, "embed", embed_task, args, n, on_result=on_result)


def knn(client, out: Path, k: int, method: str = "auto", num_shards: int | None = None,
        block_rows: int = 4096, recall_target: float = 0.95, overwrite: bool = False,
        on_result: Callable | None = None) -> list:
    n = num_shards or default_shards(client)
    args = (str(Path(out).resolve()), k, method, block_rows, recall_target, overwrite)
    return map_shards(client, "knn", knn_task, args, n, on_result=on_result)
