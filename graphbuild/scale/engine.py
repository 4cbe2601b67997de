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

Every knn task loads all rows, so `knn` runs only as many at once as the workers' memory holds
(the rule is in dask_memory.py): it checks the need against the workers before any task
starts, and first resizes a LocalCluster that we started to fit it (`_fit_local_cluster`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from graphbuild import options
from graphbuild.errors import GraphbuildError
from graphbuild.scale.gpus import gpu_count, local_workers, worker_device

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


@dataclass
class _Local:
    """A LocalCluster that dask_client started: what knn may resize it within."""
    cluster: object
    memory: int  # bytes its workers may have in all
    most: int    # workers at most: one a core, or one a GPU


_STARTED: dict[int, _Local] = {}  # by id(client), while dask_client's block runs


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None,
                memory: int | None = None) -> Iterator:
    """A distributed.Client: to `scheduler` (address or scheduler file) if given, else to a
    new LocalCluster that is closed afterwards, whose workers share `memory` bytes (default:
    the memory available now) equally as their memory_limit."""
    from distributed import Client, LocalCluster

    from graphbuild.graph.stage import available_memory

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
    memory = memory or available_memory()
    log.info("dask: LocalCluster of %d worker processes, %d torch thread(s) and a memory_limit "
             "of %.2f GiB each (%.2f GiB available)%s", n, threads, memory // n / 2**30,
             memory / 2**30, f", one GPU each of {n_gpus}" if n_gpus else "")
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                      dashboard_address=":0", resources={"GPU": 1} if n_gpus else None,
                      memory_limit=memory // n, env=env) as cluster, Client(cluster) as client:
        _STARTED[id(client)] = _Local(cluster, memory, n)
        try:
            yield client
        finally:
            del _STARTED[id(client)]
            # torch's threads can keep a worker alive past the nanny's grace period at close;
            # it is then killed, which is harmless here: every shard is done or marked.
            logging.getLogger("distributed.nanny").setLevel(logging.ERROR)


def _device(requested: str) -> str:
    """The device for a shard on this worker: "cpu" and "cuda:N" as asked; "auto" and "cuda"
    this worker's own GPU (scale/gpus.worker_device: the i-th worker of a LocalCluster that
    we started takes GPU i, any other worker the first it sees), made torch's current device
    so that nothing of the shard lands on GPU 0 unasked. Without GPUs, "auto" stays (the
    stage picks the CPU) and "cuda" stays (the stage refuses it in one line)."""
    if requested not in ("auto", "cuda"):
        return requested
    n = _local_gpus()
    if n == 0:
        return requested
    from distributed import get_worker

    slots = os.environ.get(LOCAL_SLOTS_ENV)
    device = worker_device(get_worker().name, n, int(slots) if slots else None)
    _make_current(device)
    return device


def _make_current(device: str) -> None:
    """torch.cuda.set_device for a "cuda:N" device: kernels and allocations that name no
    device (inside libraries too) go to this worker's GPU."""
    import torch

    from graphbuild.devices import cuda_index

    if device.startswith("cuda"):
        torch.cuda.set_device(cuda_index(device))


def _limit_threads() -> None:
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def embed_task(manifest: str, source: str | None, out: str, config, shard: int,
               num_shards: int):
    """One embed shard on a worker; the manifest is read there, from a path it can see."""
    from graphbuild.embedding.stage import embed_shard
    from graphbuild.prepare.manifest import load_manifest

    _limit_threads()
    try:
        ds = load_manifest(Path(manifest), source)
        return embed_shard(ds, out, shard, num_shards, replace(config, device=_device(config.device)))
    except GraphbuildError as e:
        return Failed(str(e))


def knn_task(out: str, k: int, method: str, block_rows: int, recall_target: float,
             overwrite: bool, memory_budget: int, device: str | None, shard: int,
             num_shards: int):
    """One knn shard on a worker, within the memory the client sized it for (not the free
    memory the worker sees, which its sibling workers share)."""
    from graphbuild.graph.stage import knn_shard

    _limit_threads()
    device = _device(device or "auto")
    try:
        return knn_shard(out, k, method, shard, num_shards, block_rows, recall_target,
                         overwrite=overwrite, memory_budget=memory_budget,
                         device=None if device == "auto" else device)
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
               on_result: Callable | None = None, resources: dict | None = None) -> list:
    """Run fn(*args, shard, num_shards) for each shard as a Dask task; results by shard.
    Each task holds `resources` (and a GPU when the workers have them) while it runs.

    Task keys are `graphbuild-{stage}-{shard:05d}-of-{num_shards:05d}-{token}`.
    """
    from distributed import as_completed

    shards = list(range(num_shards)) if shards is None else shards
    token = uuid.uuid4().hex[:8]
    resources = {**(resources or {}), **({"GPU": 1} if _uses_gpus(client) else {})} or None
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


def knn(client, out: Path, k: int = options.K, method: str = "auto",
        num_shards: int | None = None, block_rows: int = options.BLOCK_ROWS,
        recall_target: float = options.RECALL_TARGET, overwrite: bool = False,
        on_result: Callable | None = None, task_memory: int | None = None,
        device: str | None = None) -> list:
    """Every knn shard as a task, as many at once on a worker as its memory holds
    (dask_memory.py). `task_memory`: the bytes a task needs, instead of the estimate.
    `device`: the exact search's (None: each worker's own GPU, else the CPU)."""
    from graphbuild.graph.stage import check_embeddings, resumed_method
    from graphbuild.scale import dask_memory

    out = Path(out).resolve()
    options.knn_options(k, method, block_rows, recall_target)
    attrs = check_embeddings(out)  # unfinished embeddings: refused here, not in every task
    num_shards = num_shards or default_shards(client)
    shape = dask_memory.KnnShape.of(attrs["n_nodes"], attrs["dim"], k, num_shards, block_rows)
    resumed = resumed_method(out, shape.k)
    gpu = None  # a worker's GPU, when auto would choose for the exact search on it
    if method == "auto" and not resumed and device != "cpu" and _uses_gpus(client):
        gpu = client.submit(_worker_gpu, device, pure=False, resources={"GPU": 1}).result()
    chosen = None  # the method, when a LocalCluster of ours was sized for it
    local = _STARTED.get(id(client))
    if local is not None:
        chosen = _fit_local_cluster(client, local, shape, method, resumed, task_memory, gpu)
    offers = dask_memory.declare_offers(client)
    budget = max((o.offer for o in offers), default=0)  # what one task may take
    need = dask_memory.knn_need(shape, chosen.method if chosen else method, budget, resumed,
                                task_memory, gpu)
    if method == "auto":
        log.info("knn on dask: %s", (chosen or need).reason)
    log.info(dask_memory.rule(need, offers, _remedy(need, shape, budget)))
    # the tasks get the method resolved here, and the budget it was resolved within
    args = (str(out), k, need.method, block_rows, recall_target, overwrite, budget, device)
    return map_shards(client, "knn", knn_task, args, num_shards, on_result=on_result,
                      resources={dask_memory.MEMORY_RESOURCE: need.bytes})


def _remedy(need, shape, budget: int) -> str:
    """What to change when no worker holds a task of `need`."""
    from graphbuild.scale import dask_memory

    text = "start workers with a larger memory_limit (dask worker --memory-limit)"
    if need.method == "exact":
        other = dask_memory.knn_need(shape, "approximate", budget)
        text += f", or use --method approximate (about {dask_memory.gib(other.bytes)} a task)"
    return text + ", or run knn with --engine local on a machine that has the memory"


def _worker_gpu(device: str | None):
    """On a worker: its GPU's free memory and rate (devices.Device), None without one."""
    from graphbuild.devices import cuda_device

    device = _device(device or "auto")
    return cuda_device(device) if device.startswith("cuda") else None


def _fit_local_cluster(client, local: _Local, shape, method: str, resumed: str | None,
                       given: int | None, gpu=None):
    """Resize a LocalCluster that we started so that each worker holds one knn task: at most
    min(workers it may have, memory // the memory a worker needs) workers, sharing its
    memory. Returns the need (dask_memory.KnnNeed), the method resolved within the memory of
    the whole cluster, as the local engine resolves it within the machine's."""
    from graphbuild.scale import dask_memory as dm

    terminate = dm.terminate_fraction()
    need = dm.knn_need(shape, method, dm.task_offer(local.memory, terminate), resumed, given,
                       gpu)
    workers, limit = dm.local_workers(need.bytes, local.memory, local.most, terminate)
    if workers == 0:
        raise GraphbuildError(
            f"knn on dask: {need.method} needs {dm.gib(need.bytes)} a task ({need.how}), so a "
            f"worker needs {dm.gib(dm.worker_memory(need.bytes, terminate))} (with its own "
            f"{dm.gib(dm.WORKER_BASE)}, under Dask's kill threshold of {terminate:g} x its "
            f"memory_limit); this machine has {dm.gib(local.memory)} for its workers; use "
            "--method approximate, a machine with more memory, or --scheduler with bigger "
            "workers")
    cluster = local.cluster
    options = cluster.new_spec["options"]
    have = len(cluster.worker_spec)
    if dm.task_offer(options["memory_limit"], terminate) >= need.bytes and have <= workers:
        return need
    log.info("dask: resizing the LocalCluster for knn, %d workers of %s each (was %d of %s): "
             "min(%d, %s available // %s a worker needs)", workers, dm.gib(limit), have,
             dm.gib(options["memory_limit"]), local.most, dm.gib(local.memory),
             dm.gib(dm.worker_memory(need.bytes, terminate)))
    nanny = logging.getLogger("distributed.nanny")
    level = nanny.level
    nanny.setLevel(logging.ERROR)  # "still alive after 4 s, killing": torch's threads, harmless
    try:
        _rescale(client, cluster, 0)
    finally:
        nanny.setLevel(level)
    cluster.new_spec = {**cluster.new_spec, "options": {**options, "memory_limit": limit}}
    _rescale(client, cluster, workers)
    return need


def _rescale(client, cluster, workers: int, timeout: float = 120.0) -> None:
    """Scale a LocalCluster to `workers` and wait until the scheduler has exactly those."""
    cluster.scale(workers)
    deadline = time.monotonic() + timeout
    while len(client.run_on_scheduler(_worker_names)) != workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the LocalCluster did not reach {workers} workers in {timeout} s")
        time.sleep(0.1)


def _worker_names(dask_scheduler) -> list:
    return [ws.name for ws in dask_scheduler.workers.values()]
