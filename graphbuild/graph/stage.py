"""The knn stage: OUT/embeddings.zarr to a top-k cosine graph in OUT/graph/.

Shard s of n owns a contiguous range of query rows (every row is a candidate neighbour), and
writes graph/part-{s:05d}.parquet, then its done marker (its stats: rows, k, method,
provenance). A rerun skips a shard whose marker vouches for its part: the marker records this
graph and the part's footer holds the marker's rows and edges. Any other marker is removed and
the shard done again. The shard that finds every shard of the layout vouched for writes
graph/_meta.json; one that finds a shard not done removes it. Then run.json's stage entry.

Each shard also writes its rows' moments (sum and sum of squares of all their cosines:
graph/moments.py, for graph-mode targets' fill) to graph/_moments/, with a marker and a
_meta.json of their own by the same rules. They depend on the store alone, so a rerun over
a graph built without them adds them without searching again.

What graph a run holds is what every file that vouches for it says: graph/_meta.json,
_state/knn/params.json and each shard marker. A request that differs from any of them (k,
method, shard layout, recall target, or the store's provenance: a stale graph) is refused,
whichever of them are missing; --overwrite replaces the graph.

After `embed --append`, a whole exact graph of the same k over the store's first rows is
updated rather than rebuilt (update.py: set aside as graph-base, old lists merged with the
new rows; the same bytes as a rebuild); so is an approximate one of the same k and recall
target whose lists can take the new rows (ann_update.py: recall measured again; else it is
rebuilt, with a log line saying why); any other graph from before the append is stale.

Methods: exact (exact.py; the same bytes for any shard count) or approximate (ann.py; IVF
with nprobe tuned to a recall target: its own lists on a CPU, a faiss index for IVF-PQ or
on faiss's GPUs). auto picks one from N, d, k and free memory: the host's and a CPU's rate,
or, when the exact search would run on CUDA, the device's free memory and rate (devices.py).
A CUDA out-of-memory error is one line naming the flags that shrink a shard's work.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from graphbuild import options
from graphbuild.devices import Device, cuda_oom_as_error
from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point
from graphbuild.graph.exact import default_capacity
from graphbuild.graph.moments import finalize_moments, moments_shard
from graphbuild.progress import Reporter
from graphbuild.rundir.files import (
    atomic_path,
    mark_done,
    marker,
    read_json,
    read_marker,
    write_json,
)
from graphbuild.rundir.graph import FORMAT_VERSION, meta_path, part_path, part_problem, write_part
from graphbuild.rundir.paths import RunDir
from graphbuild.rundir.store import StoredRows, unit_norm_misses
from graphbuild.shards import id_ranges, shard_name, shard_range

log = logging.getLogger(__name__)

EXACT_MAX_NODES = 2_000_000
EXACT_MAX_SECONDS = 3600.0
# bf16 matrix products on a 2-core AVX-512 BF16 CPU (DESIGN.md); a GPU is far faster, so
# on CPU this is the conservative case for estimating exact time.
CPU_HALF_FLOPS = 300e9
# What a graph is, as params.json, _meta.json and the shard markers record it (with provenance).
SETTINGS = ("k", "method", "num_shards", "recall_target")
# What needs faiss on a CPU (the extra; ivf-sq16 lists are searched without it)
IVF_PQ_USE = ("approximate knn with an IVF-PQ index (chosen when fp16 codes of every row "
              "exceed half the free memory)")


@dataclass
class KnnResult:
    shard: int
    num_shards: int
    k: int
    method: str
    reason: str
    rows: int = 0
    skipped: bool = False
    seconds: float = 0.0
    edges: int = 0
    recall: float | None = None
    nprobe: int | None = None
    probe_gap: float | None = None  # adaptive probing: nprobe is then an average
    moments_seconds: float = 0.0  # the shard's row moments (graph/moments.py); 0: were done
    complete: bool = False   # every shard of the layout is done, both _meta.json written
    missing_shards: list[int] = field(default_factory=list)

    @property
    def queries_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def available_memory() -> int:
    """Bytes of memory available now: psutil when installed, else sysconf."""
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.virtual_memory().available)


def exact_memory(n: int, d: int, rows: int, k: int, block_rows: int) -> int:
    """Peak bytes of exact search beyond the interpreter: fp16 rows, the query rows in half
    precision (a shard's; all rows' replace the fp16 ones while they multiply: exact.py's
    `reload`), candidate buffers (half-precision score + int32 id per slot), results (id +
    sim), and a few block-pair score matrices."""
    block = min(block_rows, n)  # a search over fewer rows than a block has smaller blocks
    return (n * d * 2 + (rows * d * 2 if rows < n else 0)
            + rows * (default_capacity(k) * 6 + k * 8) + 4 * block ** 2 * 4)


def choose_method(n: int, d: int, k: int, budget: int,
                  block_rows: int = options.BLOCK_ROWS,
                  gpu: Device | None = None) -> tuple[str, str]:
    """(method, one-line reason) for method="auto": within `budget` bytes of host memory at
    a CPU's rate, or, with `gpu` (the CUDA device the exact search would run on), within its
    free memory at its rate, the host holding the fp16 rows."""
    need = exact_memory(n, d, n, k, block_rows)
    room, flops = (budget, CPU_HALF_FLOPS) if gpu is None else (gpu.free_bytes, gpu.half_flops)
    est = n * n * d / flops  # symmetric products: N*N*d multiply-adds in all
    where = "" if gpu is None else f" on {gpu.name}"
    figures = f"N={n:,}, d={d}, k={k}, ~{need / 2**30:.1f} GiB, ~{est:,.0f}s estimated{where}"
    if need > room:
        return "approximate", (f"approximate: exact needs {figures} > {room / 2**30:.1f} GiB"
                               + (" free there" if gpu else ""))
    if gpu is not None and n * d * 2 > budget:
        return "approximate", (f"approximate: exact needs {figures}, and the host "
                               f"{n * d * 2 / 2**30:.1f} GiB for the rows > "
                               f"{budget / 2**30:.1f} GiB")
    if n <= EXACT_MAX_NODES or est <= EXACT_MAX_SECONDS:
        return "exact", f"exact: {figures} (N <= {EXACT_MAX_NODES:,} or under 1 hour)"
    return "approximate", f"approximate: {figures} (N > {EXACT_MAX_NODES:,} and over 1 hour)"


def check_embeddings(out: str | Path) -> dict:
    """Provenance attributes of finished embeddings; refuses unfinished or unlabelled ones."""
    from graphbuild.embedding.stage import embeddings_status
    from graphbuild.rundir.paths import PROVENANCE_KEYS

    run = RunDir(out)
    attrs, missing = embeddings_status(out)
    if missing:
        n_chunks = -(-attrs["n_nodes"] // attrs.get("chunk_rows", 1)) if attrs.get(
            "chunk_rows") else None
        shards = _missing_embed_shards(run, missing, n_chunks)
        raise GraphbuildError(
            f"{run.embeddings}: embeddings are not finished: {len(missing)} chunks missing "
            f"(chunks {id_ranges(missing)}{shards}); finish `graphbuild embed` first")
    absent = [key for key in PROVENANCE_KEYS if key not in attrs]
    if absent:
        raise GraphbuildError(f"{run.embeddings}: provenance incomplete, attrs lack "
                              f"{', '.join(absent)}; embed again into a new --out")
    return attrs


def _missing_embed_shards(run: RunDir, missing: list[int], n_chunks: int | None) -> str:
    """'; embed shards 1, 3 of 4' for the layouts seen in the embed markers, if any."""
    layouts = {int(p.stem.split("-of-")[1]) for p in run.state("embed").glob("shard-*-of-*.done")}
    if not layouts or n_chunks is None:
        return ""
    text = []
    for m in sorted(layouts):
        todo = sorted({s for s in range(m) for c in missing
                       if c in shard_range(n_chunks, s, m)})
        text.append(f"embed shards {id_ranges(todo)} of {m}")
    return "; " + ", ".join(text)


def load_rows(store: StoredRows, block_rows: int) -> np.ndarray:
    """The whole store as one fp16 array; refuses a row that is not of unit norm."""
    x16 = store.load()
    step = store.block_step(block_rows)
    for lo in range(0, len(x16), step):
        norms, bad = unit_norm_misses(x16[lo:lo + step])
        if len(bad):
            raise GraphbuildError(f"{store.path}: row {lo + bad[0]} has "
                                  f"norm {norms[bad[0]]:.4f}; knn needs unit-norm rows")
    return x16


def _params(k: int, method: str, num_shards: int, recall_target: float, attrs: dict) -> dict:
    from graphbuild.rundir.paths import PROVENANCE_KEYS

    params = {"k": k, "method": method, "num_shards": num_shards,
              "provenance": {key: attrs[key] for key in PROVENANCE_KEYS}}
    if method == "approximate":
        params["recall_target"] = recall_target
    return params


def _params_file(run: RunDir) -> Path:
    return run.state("knn") / "params.json"


def _recorded(run: RunDir) -> list[tuple[Path, dict]]:
    """Each file that vouches for a graph in the run, with what it records: graph/_meta.json,
    _state/knn/params.json, then every shard marker (its layout taken from its name). Any of
    them may be missing. A marker that does not read vouches for nothing and is left out;
    _meta.json or params.json that does not read is recorded as such."""
    found = []
    for path in (meta_path(run.root), _params_file(run)):
        try:
            have = read_json(path)
        except GraphbuildError as e:
            have = {"unreadable": str(e)}
        if have:
            found.append((path, have))
    for path in sorted(run.state("knn").glob("shard-*-of-*.done")):
        layout = path.stem.rsplit("-of-", 1)[1]
        try:
            stats = read_json(path)
        except GraphbuildError:
            continue
        if layout.isdigit() and isinstance(stats, dict):
            found.append((path, {**stats, "num_shards": int(layout)}))
    return found


def _disagreement(run: RunDir, recorded: list[tuple[Path, dict]], params: dict) -> str | None:
    """How the first recorded file that disagrees with the graph asked for differs, as a
    one-line error; None if none does. A setting a file does not record is not compared."""
    for path, have in recorded:
        if "unreadable" in have:
            return f"{have['unreadable']}; pass --overwrite to replace the graph"
        for key in SETTINGS:
            if key in have and key in params and have[key] != params[key]:
                return (f"{path}: holds a graph with {key}={have[key]!r} (now {params[key]!r}); "
                        "pass --overwrite or use another --out")
        recorded_from = have.get("provenance")
        if recorded_from is None:
            continue
        for key, now in params["provenance"].items():
            then = recorded_from.get(key) if isinstance(recorded_from, dict) else None
            if then != now:
                return (f"{path}: records a graph built from embeddings with {key}={then!r}, "
                        f"but {run.embeddings} now has {key}={now!r}; the graph is stale: pass "
                        "--overwrite to rebuild it")
    return None


def _claim(run: RunDir, params: dict, overwrite: bool) -> None:
    """Record this graph's parameters in params.json, or refuse a run whose graph, as any file
    that vouches for it records it, is another one (other settings, or built from other
    embeddings); with `overwrite`, remove that graph first."""
    path = _params_file(run)
    with run.lock():
        problem = _disagreement(run, _recorded(run), params)
        if problem and not overwrite:
            raise GraphbuildError(problem)
        if problem:
            log.warning("replacing the graph in %s (--overwrite): %s", run.graph, problem)
            shutil.rmtree(run.graph, ignore_errors=True)
            shutil.rmtree(run.state("knn"), ignore_errors=True)
        if read_json(path) != params:
            write_json(path, params)


def _resolve(out: Path, k: int, method: str, n: int, d: int, block_rows: int,
             budget: int, device: str | None) -> tuple[int, str, str]:
    if n < 2:
        raise GraphbuildError(f"{RunDir(out).embeddings}: {n} node(s); a graph needs two")
    if k >= n:
        log.warning("k=%d >= %d nodes: using k=%d, the dense graph", k, n, n - 1)
        k = n - 1
    if method != "auto":
        return k, method, f"{method}: as asked"
    resumed = resumed_method(out, k)
    if resumed:
        return k, resumed, f"{resumed}: the method of the graph being resumed"
    method, reason = choose_method(n, d, k, budget, block_rows, _exact_gpu(device))
    return k, method, reason


def _exact_gpu(device: str | None) -> Device | None:
    """The CUDA device the exact search would run on (exact.default_device for None)."""
    from graphbuild.devices import cuda_device
    from graphbuild.graph.exact import default_device

    device = device or default_device()
    return cuda_device(device) if device.startswith("cuda") else None


def _check_approximate(n: int, d: int, k: int, budget: int, device: str | None) -> None:
    """Before any work: faiss for an IVF-PQ index (one line naming what to install), and k
    and the IVF-PQ sub-quantizers within faiss-gpu's limits when faiss will search on a
    GPU."""
    from graphbuild.graph.faiss_gpu import check_k, gpu_subquantizers, shard_faiss_gpu
    from graphbuild.graph.faiss_loader import load_faiss

    pq = _index_kind(n, d, budget) == "ivf-pq"
    if pq:
        load_faiss(IVF_PQ_USE)
    if shard_faiss_gpu(device) is not None:
        check_k(k)
        if pq:
            gpu_subquantizers(d)


def resumed_method(out: str | Path, k: int) -> str | None:
    """The method of the graph on disk when it has this k (auto keeps it), from what vouches
    for the graph: _meta.json, params.json, the shard markers, or the base graph of an update
    after an append."""
    run = RunDir(out)
    for _, have in [*_recorded(run), (run.graph_base, read_json(run.graph_base / "_meta.json"))]:
        if have.get("k") == k and have.get("method") in options.METHODS[1:]:
            return have["method"]
    return None


def knn_shard(out: str | Path, k: int = options.K, method: str = "auto", shard: int = 0,
              num_shards: int = 1, block_rows: int = options.BLOCK_ROWS,
              recall_target: float = options.RECALL_TARGET, reporter: Reporter | None = None,
              overwrite: bool = False, memory_budget: int | None = None,
              device: str | None = None) -> KnnResult:
    """Build shard `shard` of `num_shards` of the top-k graph. Safe to rerun. `device`: where
    the exact search runs and faiss searches ("cpu", "cuda", "cuda:N"; None: CUDA when there
    is one)."""
    options.knn_options(k, method, block_rows, recall_target)
    if device is not None:
        from graphbuild.devices import check_cuda

        options.device(device)
        check_cuda(device)
        device = None if device == "auto" else device
    out = Path(out)
    run = RunDir(out)
    reporter = reporter or Reporter()
    attrs = check_embeddings(out)
    arr = StoredRows(run.embeddings)  # every read checks each chunk's crc32c
    n, d = arr.shape
    if (n, d) != (attrs["n_nodes"], attrs["dim"]):
        raise GraphbuildError(f"{run.embeddings}: shape {arr.shape} does not match its attrs "
                              f"(n_nodes={attrs['n_nodes']}, dim={attrs['dim']})")
    budget = memory_budget or available_memory()
    k, method, reason = _resolve(out, k, method, n, d, block_rows, budget, device)
    if method == "approximate":
        _check_approximate(n, d, k, budget, device)
    log.info("knn %s: %s", shard_name(shard, num_shards), reason)
    params = _params(k, method, num_shards, recall_target, attrs)
    base_n = _plan_update(run, arr, attrs, params, overwrite, block_rows, budget, device)
    if base_n is not None:
        params["updates"] = base_n  # the graph of the first base_n rows, in graph-base
    _claim(run, params, overwrite)
    kill_point("knn.claimed")

    name = shard_name(shard, num_shards)
    rows = shard_range(n, shard, num_shards)
    result = KnnResult(shard, num_shards, k, method, reason, rows=len(rows))
    with run.shard_lock("knn", name):  # a duplicate of this array task waits, then skips
        stats, why_not = _vouched(run, shard, params, n)
        if stats is not None:
            log.info("knn %s: already done, skipping", name)
            result.skipped = True
            result.edges, result.recall = stats["edges"], stats.get("recall")
            result.nprobe, result.probe_gap = stats.get("nprobe"), stats.get("probe_gap")
        else:
            _unvouch(run, name, why_not)
            _search_shard(run, arr, attrs, params, result, rows, block_rows, budget, device,
                          reporter)
        result.moments_seconds = moments_shard(run, arr, shard, num_shards,
                                               params["provenance"])
    _finalize(run, attrs, params, n, result)
    return result


def _plan_update(run: RunDir, arr, attrs: dict, params: dict, overwrite: bool, block_rows: int,
                 budget: int, device: str | None) -> int | None:
    """The node count of the base graph this knn updates after an append (update.py,
    ann_update.py), or None for a build as usual."""
    from graphbuild.graph import ann_update
    from graphbuild.graph.faiss_gpu import shard_faiss_gpu
    from graphbuild.graph.update import plan_update

    approximate = params["method"] == "approximate"
    if approximate and not overwrite:
        on_cpu = shard_faiss_gpu(device) is None
        ann_update.drop_unupdatable(run, params, attrs, _index_kind(*arr.shape, budget), on_cpu)
    base_n = plan_update(run, params, attrs, overwrite)
    if base_n is not None and approximate and not ann_update.grow_index(
            run, arr, attrs, params, base_n, block_rows):
        return None
    return base_n


def _vouched(run: RunDir, shard: int, params: dict, n: int) -> tuple[dict | None, str | None]:
    """(the marker's stats, None) when shard's marker vouches for its part: it reads, records
    this graph (k, method, provenance, recall target) and the shard's rows and edges, and the
    part's footer holds those rows and edges. Otherwise (None, why not); why not is None when
    there is no marker at all."""
    num_shards = params["num_shards"]
    path = marker(run.state("knn"), shard_name(shard, num_shards))
    stats, why_not = read_marker(path)
    if stats is None:
        return None, why_not
    rows = shard_range(n, shard, num_shards)
    want = {key: params[key] for key in ("k", "method", "provenance", "recall_target")
            if key in params}
    want.update(first=rows.start, stop=rows.stop, rows=len(rows), edges=len(rows) * params["k"])
    for key, value in want.items():
        if stats.get(key) == value:
            continue
        if key == "provenance":
            return None, (f"{path}: records {'no' if key not in stats else 'another'} "
                          "store's provenance")
        return None, f"{path}: records {key}={stats.get(key)!r}, this graph's is {value!r}"
    part = part_path(run.root, shard)
    problem = part_problem(part, rows.start, rows.stop, want["edges"], n)
    if problem:
        return None, f"{part}: {problem}, not what {path.name} records"
    return stats, None


def _unvouch(run: RunDir, name: str, why_not: str | None) -> None:
    """Before a shard is (re)done: remove graph/_meta.json, which vouches for every part, and
    the shard's marker that does not vouch for its part (`why_not`)."""
    with run.lock():
        meta = meta_path(run.root)
        if meta.exists():
            log.warning("%s: removed until every shard is done (%s is being done)",
                        meta, name)
            meta.unlink()
        if why_not is not None:
            log.warning("knn %s: %s; doing the shard again", name, why_not)
            marker(run.state("knn"), name).unlink(missing_ok=True)


def _search_shard(run: RunDir, arr, attrs: dict, params: dict, result: KnnResult, rows: range,
                  block_rows: int, budget: int, device: str | None,
                  reporter: Reporter) -> None:
    """Search `rows`, write the shard's part, then its done marker with its stats (and what
    graph it belongs to: k, method, provenance, recall target)."""
    out, k, method, shard, name = (run.root, result.k, result.method, result.shard,
                                   shard_name(result.shard, result.num_shards))
    t0 = time.perf_counter()
    reporter.start(len(rows), "queries")
    remedy = (f"lower --block-rows (now {block_rows}) or raise --num-shards (now "
              f"{result.num_shards}) so that a shard holds fewer rows on the GPU"
              if method == "exact" else
              "the faiss index does not fit this GPU: use --device cpu, or a GPU with more "
              "memory")
    try:
        with cuda_oom_as_error(f"knn {name} ({method})", remedy):
            if method == "exact" and "updates" in params:
                result.edges = _update_part(run, arr, k, rows, shard, params["updates"],
                                            block_rows, device, reporter)
                result.recall = 1.0
            elif method == "exact":
                result.edges = _exact_part(out, arr, k, rows, shard, block_rows, device,
                                           reporter)
                result.recall = 1.0
            else:
                if "updates" in params:
                    from graphbuild.graph.ann_update import update_part

                    result.edges, tuning = update_part(run, arr, attrs, params, rows, shard,
                                                       block_rows, reporter)
                else:
                    result.edges, tuning = _approximate_part(
                        out, arr, attrs, k, rows, shard, block_rows, params["recall_target"],
                        budget, device, reporter)
                result.recall, result.nprobe = tuning["recall"], tuning["nprobe"]
                result.probe_gap = tuning.get("probe_gap")
    finally:
        reporter.stop()
    result.seconds = time.perf_counter() - t0
    stats = {"rows": len(rows), "first": rows.start, "stop": rows.stop, "k": k,
             "method": method, "edges": result.edges, "seconds": round(result.seconds, 3),
             "queries_per_s": round(result.queries_per_s, 1), "recall": result.recall,
             "nprobe": result.nprobe, "probe_gap": result.probe_gap,
             **{key: params[key] for key in ("provenance", "recall_target") if key in params}}
    kill_point("knn.part_written")  # part in place, marker not yet
    mark_done(run.state("knn"), name, stats)
    kill_point("knn.shard_marked")
    log.info("knn %s: %d queries in %.1fs (%.0f queries/s)", name, len(rows),
             result.seconds, result.queries_per_s)


def _exact_part(out: Path, arr, k: int, rows: range, shard: int, block_rows: int,
                device: str | None, reporter: Reporter) -> int:
    from graphbuild.graph.exact import blocked_topk

    n, d = arr.shape
    log.info("exact search: ~%.2f GiB for rows, candidate buffers, results and block scores",
             exact_memory(n, d, len(rows), k, block_rows) / 2**30)
    def rows_in_memory():
        return load_rows(arr, block_rows)

    # no reference to the rows is kept here, so the search can let them go (`reload`)
    ids, sims = blocked_topk(rows_in_memory(), k, rows, block_rows=block_rows, device=device,
                             on_progress=reporter.advance, reload=rows_in_memory)
    blocks = ((rows.start + lo, ids[lo:lo + block_rows], sims[lo:lo + block_rows])
              for lo in range(0, len(rows), block_rows))
    return write_part(out, shard, rows, n, blocks)


def _update_part(run: RunDir, arr, k: int, rows: range, shard: int, base_n: int,
                 block_rows: int, device: str | None, reporter: Reporter) -> int:
    """The shard's rows of the exact graph updated from the base graph (graph/update.py)."""
    from graphbuild.graph.update import update_blocks

    x16 = load_rows(arr, block_rows)
    log.info("exact update: rows %d..%d, %d of them new", rows.start, rows.stop,
             max(0, rows.stop - max(rows.start, base_n)))
    return write_part(run.root, shard, rows, len(x16),
                      update_blocks(run, x16, k, rows, base_n, block_rows, device, reporter))


def _index(run: RunDir, arr, attrs: dict, k: int, recall_target: float, block_rows: int,
           budget: int, device: str | None):
    """What searches the shared index and its nprobe: built and tuned once under the lock,
    then reused. On a CPU an ivf-sq16 index is only its lists (ListScan reads the rows from
    the store: no codes duplicating the store on disk); else a faiss index, on the GPU of
    `device` if faiss has GPUs (faiss_gpu.py)."""
    from graphbuild.graph import ivf_scan
    from graphbuild.graph.ann import build_index, nlist_for, tune_nprobe, tuning_key
    from graphbuild.graph.faiss_gpu import gpu_subquantizers, on_gpu, shard_faiss_gpu
    from graphbuild.graph.faiss_loader import load_faiss
    from graphbuild.graph.symmetric_scan import BothWays, build_lists_and_probes

    n, d = arr.shape
    step = arr.block_step(block_rows)
    folder = run.graph / "_index"
    kind = _index_kind(n, d, budget)
    gpu = shard_faiss_gpu(device)
    list_scan = kind == "ivf-sq16" and gpu is None
    want = {"kind": kind, "nlist": nlist_for(n), "n_nodes": n, "dim": d,
            "model": attrs["model"], "model_revision": attrs["model_revision"],
            "file": "lists.npz" if list_scan else f"{kind}.index"}
    subquantizers = None
    if kind == "ivf-pq":
        from graphbuild.graph.ann import pq_subquantizers

        subquantizers = pq_subquantizers(d) if gpu is None else gpu_subquantizers(d)
        want["subquantizers"] = subquantizers
    path = folder / want["file"]
    with run.lock():
        info = read_json(folder / "index.json")
        reuse = info.get("index") == want and path.exists()
        if list_scan:
            lists = ivf_scan.load_lists(path, n, d) if reuse else None
            if reuse and lists is None:
                log.warning("%s: unreadable or not this store's lists; building them again",
                            path)
            probes = None
            if lists is None:
                lists, probes = build_lists_and_probes(arr, want["nlist"], step,
                                                       ivf_scan.PROBE_CAP)
                _replace_index_files(folder, path, lambda tmp: ivf_scan.save_lists(tmp, lists))
                info = {"index": want}
            searcher = BothWays(ivf_scan.ListScan.from_lists(*lists, arr, step), probes)
        else:
            faiss = load_faiss(IVF_PQ_USE if kind == "ivf-pq" else f"a faiss {kind} index")
            if reuse:
                index = faiss.read_index(str(path))
            else:
                index = build_index(arr, kind, want["nlist"], step, subquantizers=subquantizers)
                _replace_index_files(folder, path,
                                     lambda tmp: faiss.write_index(index, str(tmp)))
                info = {"index": want}
            searcher = on_gpu(index, device, lambda: faiss.read_index(str(path)))
        tune_key = tuning_key(k, recall_target, both_ways=list_scan)
        if tune_key not in info.get("tuning", {}):
            if list_scan:
                t = tune_nprobe(searcher.scan, searcher.scan.in_store_order(), k,
                                recall_target, step, both_ways=searcher)
            else:
                t = tune_nprobe(searcher, arr, k, recall_target, step)
            info.setdefault("tuning", {})[tune_key] = asdict(t)
            log.info("nprobe %d of %d lists%s: recall@%d %.4f on %d sampled queries (target "
                     "%.2f)", t.nprobe, searcher.nlist,
                     "" if t.probe_gap is None else f" on average (gap {t.probe_gap:.4f})", k,
                     t.recall, t.sample, recall_target)
            write_json(folder / "index.json", info)
    return searcher, {**info["tuning"][tune_key], "kind": kind, "nlist": searcher.nlist}


def _index_kind(n: int, d: int, budget: int) -> str:
    """The approximate index's kind: its codes get half the memory budget."""
    from graphbuild.graph.ann import index_kind

    return index_kind(n, d, budget // 2)


def _replace_index_files(folder: Path, path: Path, write) -> None:
    """Write the index at `path` (atomically, by `write(temp path)`) and remove any other
    index file in `folder`: one built for other hardware is stale once this one exists."""
    for other in [*folder.glob("*.index"), *folder.glob("*.npz")]:
        if other != path:
            other.unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        write(tmp)
    kill_point("ann.index_written")


def _approximate_part(out: Path, arr, attrs: dict, k: int, rows: range, shard: int,
                      block_rows: int, recall_target: float, budget: int, device: str | None,
                      reporter: Reporter) -> tuple[int, dict]:
    import torch

    from graphbuild.graph.ann import search
    from graphbuild.graph.ivf_scan import QUERY_STEP
    from graphbuild.graph.symmetric_scan import BothWays

    index, tuning = _index(RunDir(out), arr, attrs, k, recall_target, block_rows, budget,
                           device)
    nprobe, gap = tuning["nprobe"], tuning.get("probe_gap")

    both_ways = isinstance(index, BothWays)

    def searched():
        """(first row, ids, sims) of the shard's rows: a list scan searches them all at once
        (a row's candidates come from every list product; the bar follows its products), a
        faiss index block by block."""
        if both_ways:
            shown = 0

            def progress(share: float) -> None:
                nonlocal shown
                now = int(len(rows) * share)
                reporter.advance(now - shown)
                shown = now

            found = index.search(np.arange(rows.start, rows.stop), k, nprobe, gap, progress)
            reporter.advance(len(rows) - shown)
            yield rows.start, *found
            return
        for lo, block in arr.blocks(rows, max(block_rows, QUERY_STEP)):
            xq = torch.from_numpy(block).float().numpy()  # far faster than numpy's
            yield lo, *search(index, xq, np.arange(lo, lo + len(block)), k, nprobe, gap)

    def blocks():
        # results handed on in pieces of block_rows
        for lo, ids, sims in searched():
            for off in range(0, len(ids), block_rows):
                piece = slice(off, off + block_rows)
                if not both_ways:
                    reporter.advance(len(ids[piece]))
                kill_point("knn.block_searched")
                yield lo + off, ids[piece], sims[piece]

    return write_part(out, shard, rows, arr.shape[0], blocks()), tuning


def _finalize(run: RunDir, attrs: dict, params: dict, n: int, result: KnnResult) -> None:
    """Once every shard's marker vouches for its part: _meta.json (written when absent or
    different); while any does not, no _meta.json. The same for the row moments'
    _moments/_meta.json (graph/moments.py). Then the stage's figures in run.json."""
    k, method, num_shards = params["k"], params["method"], params["num_shards"]
    with run.lock():
        stats = {}
        for s in range(num_shards):
            shard_stats, why_not = _vouched(run, s, params, n)
            if shard_stats is not None:
                stats[s] = shard_stats
            elif why_not is not None:
                log.warning("knn %s: %s; its rerun does it again", shard_name(s, num_shards),
                            why_not)
        seconds = sum(st.get("seconds", 0.0) for st in stats.values())
        queries = sum(st.get("rows", 0) for st in stats.values())
        first = next(iter(stats.values()), {})
        path = meta_path(run.root)
        parts_missing = [s for s in range(num_shards) if s not in stats]
        if not parts_missing:  # the graph is readable whether or not its moments are done
            meta = _meta(run, attrs, params, stats)
            if read_json(path) != meta:
                write_json(path, meta)
                kill_point("knn.meta_written")
            if run.graph_base.exists():  # an update's base: the new graph is whole
                shutil.rmtree(run.graph_base)
        elif path.exists():
            log.warning("%s: removed: shards %s are not done", path, id_ranges(parts_missing))
            path.unlink()
        moments_missing, moments_seconds = finalize_moments(run, num_shards,
                                                            params["provenance"], n)
        result.missing_shards = sorted({*parts_missing, *moments_missing})
        result.complete = not result.missing_shards

    def change(info: dict) -> None:
        info.setdefault("stages", {})["knn"] = {
            "status": "done" if result.complete else "partial", "k": k, "method": method,
            "recall": first.get("recall"), "nprobe": first.get("nprobe"),
            "seconds": round(seconds, 2),
            "queries_per_s": round(queries / seconds, 1) if seconds else None,
            "shards_done": len(stats), "num_shards": num_shards,
            "moments_seconds": round(moments_seconds, 2),
        }
        if "updates" in params:  # the graph was updated after an append, not rebuilt
            info["stages"]["knn"]["updated_from_nodes"] = params["updates"]

    run.update_run(change)


def _meta(run: RunDir, attrs: dict, params: dict, stats: dict[int, dict]) -> dict:
    """graph/_meta.json of a complete graph, from its parameters and its shards' markers."""
    from graphbuild.rundir.paths import PROVENANCE_KEYS

    method, first = params["method"], stats[0]
    meta = {
        "format_version": FORMAT_VERSION, "k": params["k"], "metric": "cosine",
        "method": method, "recall": first.get("recall"), "nprobe": first.get("nprobe"),
        "probe_gap": first.get("probe_gap"), "n_nodes": attrs["n_nodes"],
        "edges": sum(st["edges"] for st in stats.values()),
        "num_shards": params["num_shards"],
        "parts": [{"file": part_path(run.root, s).name, "first": st["first"],
                   "stop": st["stop"], "edges": st["edges"]} for s, st in sorted(stats.items())],
        "sims": ("exact: fp32 rounding of the dot product of the stored fp16 vectors"
                 if method == "exact" else "faiss index scores"),
        "provenance": {key: attrs[key] for key in PROVENANCE_KEYS},
    }
    if "recall_target" in params:
        meta["recall_target"] = params["recall_target"]
    return meta
