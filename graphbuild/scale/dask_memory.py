"""How many knn tasks a Dask worker runs at once: as many as its memory holds.

Every knn shard loads all rows (CC12M: 9.2 GB), and a task that measures free memory sees the
whole machine's, not what its sibling workers take. So knn on Dask is sized here, once, on the
client, before any task starts:

- need: peak bytes of one knn task beyond its worker's own. Exact: `knn.exact_memory(N, d,
  rows, k, block_rows)` for the largest shard's rows. Approximate: `approximate_memory`, an
  estimate from what ann.py and ivf_scan.py hold (at N=1M, d=384, k=32 it gives 1.60 GiB; the
  knn benchmark measured a peak RSS of 2.04-2.27 GiB there, the process itself included).
- offer: what a worker gives its knn tasks: memory_limit x the fraction at which Dask's nanny
  kills a worker (distributed.worker.memory.terminate, 0.95 by default), less WORKER_BASE for
  the worker itself. Each worker declares it as the Dask resource MEMORY_RESOURCE
  (`DeclareOffer`, a worker plugin: workers that join or restart later declare it too; a
  worker started with that resource keeps its own figure).
- rule: a knn task asks for `need` of that resource, so a worker runs at most
  floor(offer / need) knn tasks at once, and no more than its threads. Dask enforces it: the
  scheduler places a task only on a worker whose offer covers it, and the worker holds it
  back until enough is free, also when the task is retried after its worker died. (A client
  counting its own submissions could not tell on which worker, or beside what, the scheduler
  runs a task.) A need above every worker's offer is one GraphbuildError.
- A LocalCluster we start (engine.dask_client) is sized to the need: min(cores, memory //
  worker_memory(need)) workers, each with memory_limit memory // workers (`local_workers`).

This module imports distributed: import it only for --engine dask.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import dask
from distributed.diagnostics.plugin import WorkerPlugin

from graphbuild.errors import GraphbuildError

MEMORY_RESOURCE = "graphbuild-memory"
# A worker's own memory with knn's libraries loaded (interpreter, distributed, torch, numba,
# faiss): RSS 500 MiB after an exact knn task on 3,000 rows, 597 MiB after an approximate one.
# Rounded up to 768 MiB for what the estimates leave out: exact search at 1M rows peaked
# 0.76 GiB above exact_memory in the knn benchmark (2.41 GiB RSS, the process included).
WORKER_BASE = 768 * 2**20
GiB = 2**30


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def terminate_fraction() -> float:
    """The share of memory_limit at which Dask's nanny kills a worker (1 when it never does)."""
    fraction = dask.config.get("distributed.worker.memory.terminate", 0.95)
    return float(fraction) if fraction else 1.0


def task_offer(memory_limit: int, terminate: float) -> int:
    """Bytes of a worker's memory_limit that its knn tasks may take, all together."""
    return max(0, int(memory_limit * terminate) - WORKER_BASE)


def worker_memory(need: int, terminate: float) -> int:
    """The smallest memory_limit whose offer holds one task of `need` bytes."""
    return math.ceil((need + WORKER_BASE) / terminate)


def local_workers(need: int, memory: int, most: int, terminate: float) -> tuple[int, int]:
    """(workers, memory_limit of each) of a LocalCluster of at most `most` single-threaded
    workers on `memory` bytes, each able to run one knn task of `need` bytes; (0, 0) when even
    one worker cannot."""
    workers = min(most, memory // worker_memory(need, terminate))
    return (workers, memory // workers) if workers > 0 else (0, 0)


def approximate_memory(n: int, d: int, rows: int, k: int, budget: int) -> int:
    """Peak bytes of an approximate knn task beyond its process, from what it holds:

    - the index: for ivf-sq16 (`ann.index_kind` with half the budget) the fp16 rows in list
      order, int32 ids, and while the lists are built, int64 list numbers, their argsort and
      row positions: N x (2d + 28) bytes; for ivf-pq its codes and int64 ids; the centroids;
    - then the larger of: building (the k-means sample, fp16 and a working copy: 6 bytes a
      value) and searching. A list scan searches the shard's rows at once, both ways
      (symmetric_scan): every row's PROBE_CAP best lists and their scores, its probes beyond
      its home list grouped by list, row positions and homes; each shard row's heap of k+1
      (id, sim) pairs and its k results; the results' sort for ivf_scan.QUERY_STEP rows at a
      time; one batch of centroid scores (ivf_scan.SCORES). A faiss index searches a block
      of queries (QUERY_STEP at most): fp32 queries, heaps and sorted results of k+1 (id,
      sim) pairs, (query, list) probe pairs up to PROBE_CAP lists a query."""
    from graphbuild.graph.ann import LIST_TRAIN_PER_LIST, index_kind, nlist_for, pq_subquantizers
    from graphbuild.graph.ivf_scan import PROBE_CAP, QUERY_STEP, SCORES

    nlist = nlist_for(n)
    build = nlist * LIST_TRAIN_PER_LIST * d * 6
    queries = min(rows, QUERY_STEP)
    if index_kind(n, d, budget // 2) == "ivf-sq16":
        index = n * (2 * d + 4 + 3 * 8)
        search = (n * (PROBE_CAP * 12 + 24) + rows * ((k + 1) * 8 + k * 12)
                  + queries * (k + 1) * 40 + SCORES * 4)
    else:
        index = n * (pq_subquantizers(d) + 8)
        search = queries * (4 * d + (k + 1) * 36 + PROBE_CAP * 16) + SCORES * 4
    return index + nlist * d * 4 + max(build, search)


@dataclass(frozen=True)
class KnnShape:
    """What a knn task's memory depends on: N x d rows, k (clamped to N - 1 as knn_shard
    does), the rows of the largest shard, block_rows."""
    n: int
    d: int
    k: int
    rows: int
    block_rows: int

    @classmethod
    def of(cls, n: int, d: int, k: int, num_shards: int, block_rows: int) -> KnnShape:
        return cls(n, d, max(1, min(k, n - 1)), -(-n // num_shards), block_rows)


@dataclass(frozen=True)
class KnnNeed:
    """One knn task's method (never auto) and why, its peak bytes and how they were found."""
    method: str
    reason: str
    bytes: int
    how: str


def knn_need(shape: KnnShape, method: str, budget: int, resumed: str | None = None,
             given: int | None = None, gpu=None) -> KnnNeed:
    """The need of a knn task. auto resolves as knn_shard does: the method of the graph being
    resumed, else `knn.choose_method` within `budget` (the most a task may use) and, with
    `gpu` (devices.Device: a worker's GPU), its memory and rate. `given`: bytes to use
    instead of the estimate."""
    from graphbuild.graph.stage import choose_method, exact_memory

    n, d, k, rows, block_rows = shape.n, shape.d, shape.k, shape.rows, shape.block_rows
    reason = f"{method}: as asked"
    if method == "auto" and resumed:
        method, reason = resumed, f"{resumed}: the method of the graph being resumed"
    elif method == "auto":
        method, reason = choose_method(n, d, k, budget, block_rows, gpu)
    if given is not None:
        return KnnNeed(method, reason, given, "as given")
    figures = f"N={n:,}, d={d}, {rows:,} rows a shard, k={k}"
    if method == "exact":
        return KnnNeed(method, reason, exact_memory(n, d, rows, k, block_rows),
                       f"knn.exact_memory: {figures}, block_rows={block_rows}")
    return KnnNeed(method, reason, approximate_memory(n, d, rows, k, budget),
                   f"estimated from what the index and a block's search hold: {figures}")


class DeclareOffer(WorkerPlugin):
    """Declares a worker's offer (`task_offer`) as the resource MEMORY_RESOURCE, unless it was
    started with that resource. A worker without a memory_limit declares nothing: it runs no
    knn tasks."""

    name = MEMORY_RESOURCE
    idempotent = True  # registered again by every knn call: once is enough

    async def setup(self, worker) -> None:
        limit = worker.memory_manager.memory_limit
        if MEMORY_RESOURCE in worker.state.total_resources or not limit:
            return
        offer = task_offer(limit, terminate_fraction())  # the worker's own Dask config
        await worker.set_resources(**{MEMORY_RESOURCE: offer})


@dataclass(frozen=True)
class Offer:
    """A worker as the scheduler sees it: address, memory_limit (0: none), offer, threads."""
    address: str
    memory_limit: int
    offer: int
    threads: int

    def tasks_at_once(self, need: int) -> int:
        return min(self.threads, self.offer // max(1, need))


def declare_offers(client) -> list[Offer]:
    """Have every worker declare its offer (now and when it joins later), then read them back
    from the scheduler."""
    client.register_plugin(DeclareOffer())

    def read(dask_scheduler) -> list[tuple]:
        return [(ws.address, ws.memory_limit or 0, ws.resources.get(MEMORY_RESOURCE, 0),
                 ws.nthreads) for ws in dask_scheduler.workers.values()]

    return [Offer(a, int(m), int(o), int(t)) for a, m, o, t in client.run_on_scheduler(read)]


def rule(need: KnnNeed, offers: list[Offer], remedy: str) -> str:
    """One line: the need, the rule and what it gives on these workers. Raises the one-line
    GraphbuildError when no worker can run a task; `remedy` ends it."""
    terminate = terminate_fraction()
    head = f"knn on dask: {need.method} needs {gib(need.bytes)} a task ({need.how})"
    best = max(offers, key=lambda o: (o.offer, o.memory_limit), default=None)
    if best is None or best.offer < need.bytes:
        largest = ("no workers" if best is None else
                   "no worker declares a memory_limit" if not best.memory_limit else
                   f"the largest, {best.address}, has memory_limit {gib(best.memory_limit)} "
                   f"and gives tasks {gib(best.offer)}")
        raise GraphbuildError(
            f"{head}, more than any worker gives: {largest} (memory_limit x {terminate:g}, "
            f"Dask's kill threshold, less {gib(WORKER_BASE)} for the worker itself); {remedy}")
    groups = Counter((o.memory_limit, o.threads, o.tasks_at_once(need.bytes)) for o in offers)
    what = "; ".join(
        f"{count} worker{'s' * (count > 1)} of {gib(limit) if limit else 'no memory_limit'} "
        f"and {threads} thread{'s' * (threads > 1)}: {slots} at once"
        for (limit, threads, slots), count in sorted(groups.items(), reverse=True))
    total = sum(o.tasks_at_once(need.bytes) for o in offers)
    return (f"{head}; a worker runs floor((memory_limit x {terminate:g} - "
            f"{gib(WORKER_BASE)} for itself) / need) knn tasks at once, at most one a thread: "
            f"{what}; {total} in all")
