"""`graphbuild status`: how far a run is, from its completion markers, run.json and logs.

Per stage: the shard layout, shards done / pending / failed, throughput and an ETA.

- **Done** is a marker with its data: an embed shard is done when every chunk it owns is
  marked and its file is there at a chunk's size (so a shard finished under another layout
  still counts), a knn shard when its marker vouches for
  its part (the part's footer holds the rows and edges the marker records) and its moments
  marker for its row moments' part.
- **Failed** is a shard that is not done and whose newest SLURM log (OUT/logs/STAGE-JOB_SHARD
  .out, by modification time) last says it failed: its last `graphbuild: exit RC` line has
  RC != 0, or a `slurmstepd: error:` line (cancelled, time limit, out of memory, node failure)
  or our CLI's `error:` line follows the last `graphbuild: start` line. A shard whose newest log
  ends in a start line is *running* (or died with its node: squeue knows). Every other shard
  not done is *pending*; Dask runs write no logs, so theirs are all pending.
- **Throughput**: per task, the sum of the work over the sum of the seconds in the shard
  markers' stats; overall (wall clock), the work done over the span of the marker times, the
  first one less its own seconds. **ETA** = work left / overall rate (or the per-task rate
  when only one marker exists). It assumes the same parallelism as so far.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from graphbuild.errors import GraphbuildError
from graphbuild.rundir.files import read_json
from graphbuild.rundir.paths import RunDir
from graphbuild.shards import shard_name, shard_range

START = re.compile(r"^graphbuild: start ")
EXIT = re.compile(r"^graphbuild: exit (\d+)")
ERROR = re.compile(r"^(slurmstepd: error: .*|error: .*|Traceback .*)$")
LOG_NAME = re.compile(r"^(embed|knn)-(\d+)_(\d+)\.out$")


def embed_layout(out: str | Path) -> dict | None:
    """n_nodes, chunk_rows and n_chunks of the store, read from zarr.json; None if absent."""
    meta = read_json(RunDir(out).embeddings / "zarr.json")
    if not meta:
        return None
    n, dim = meta["shape"]
    rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    return {"n_nodes": n, "dim": dim, "chunk_rows": rows, "n_chunks": -(-n // rows)}


def _done_chunks(run: RunDir) -> set[int]:
    """Chunks marked done whose file is there at a chunk's size: a marker alone is not work
    done (its file may have been deleted since), and embed redoes such a chunk."""
    from graphbuild.rundir.store import chunk_file_problem

    layout = embed_layout(run.root)
    if layout is None:
        return set()
    size = layout["chunk_rows"] * layout["dim"] * 2 + 4  # fp16 rows + crc32c
    marked = {int(p.stem) for p in (run.state("embed") / "chunks").glob("*.done")
              if p.stem.isdigit()}
    return {c for c in marked if chunk_file_problem(run.embeddings, c, size) is None}


def unfinished_embed_shards(out: str | Path, num_shards: int) -> list[int]:
    layout = embed_layout(out)
    if layout is None:
        return list(range(num_shards))
    done = _done_chunks(RunDir(out))
    return [s for s in range(num_shards)
            if any(c not in done for c in shard_range(layout["n_chunks"], s, num_shards))]


def unfinished_knn_shards(out: str | Path, num_shards: int) -> list[int]:
    """Shards without a marker that vouches for their part: the part's footer holds the rows
    and edges the marker records (knn redoes any other shard), or without one that vouches
    for their row moments (knn adds them)."""
    from graphbuild.rundir.graph import part_path, part_problem

    run = RunDir(out)
    layout = embed_layout(out)
    todo = []
    for s in range(num_shards):
        try:
            stats = read_json(run.state("knn") / f"{shard_name(s, num_shards)}.done")
        except GraphbuildError:
            stats = {}
        recorded = [stats.get(key) for key in ("first", "stop", "edges")]
        of_nodes = (stats.get("provenance") or {}).get("n_nodes")
        if (layout is None or not all(isinstance(v, int) for v in recorded)
                or of_nodes not in (None, layout["n_nodes"])  # a graph from before an append
                or part_problem(part_path(out, s), *recorded, layout["n_nodes"])
                or not _moments_done(run, s, num_shards)):
            todo.append(s)
    return todo


def _moments_done(run: RunDir, shard: int, num_shards: int) -> bool:
    """Whether shard's moments marker reads and its part's footer holds what it records."""
    from graphbuild.rundir.moments import moments_part_path, moments_part_problem

    try:
        stats = read_json(run.state("knn") / f"moments-{shard_name(shard, num_shards)}.done")
    except GraphbuildError:
        return False
    recorded = [stats.get(key) for key in ("first", "stop", "rank")]
    return (all(isinstance(v, int) for v in recorded)
            and moments_part_problem(moments_part_path(run.root, shard), *recorded) is None)


def log_state(path: Path) -> tuple[str, str]:
    """(state, the line that says so) of one task log: running, failed or exited."""
    state, why = "running", ""
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if START.match(line):
                state, why = "running", ""
            elif m := EXIT.match(line):
                state, why = ("exited" if m.group(1) == "0" else "failed"), line
            elif ERROR.match(line) and state == "running":
                state, why = "failed", line
    return state, why


def task_logs(out: str | Path, stage: str) -> dict[int, Path]:
    """The newest log of each array task (= shard) of a stage."""
    newest: dict[int, Path] = {}
    for p in RunDir(out).logs().glob(f"{stage}-*_*.out"):
        m = LOG_NAME.match(p.name)
        if m and m.group(1) == stage:
            s = int(m.group(3))
            if s not in newest or p.stat().st_mtime > newest[s].stat().st_mtime:
                newest[s] = p
    return newest


def _layout(run: RunDir, stage: str) -> int | None:
    """The stage's shard count: the last SLURM submission's, the knn params', or the most
    common one among the markers."""
    sub = read_json(run.root / "slurm" / "submitted.json").get("jobs", {}).get(stage)
    if sub:
        return sub["num_shards"]
    if stage == "knn" and (n := read_json(run.state("knn") / "params.json").get("num_shards")):
        return n
    counts: dict[int, int] = {}
    for p in run.state(stage).glob("shard-*-of-*.done"):
        n = int(p.stem.split("-of-")[1])
        counts[n] = counts.get(n, 0) + 1
    if counts:
        return max(counts, key=lambda n: (counts[n], n))
    if stage == "embed":
        return read_json(run.run_json).get("stages", {}).get("embed", {}).get("num_shards_last")
    return None


def _rates(markers: list[tuple[float, float, int]]) -> tuple[float | None, float | None]:
    """(per-task rate, wall-clock rate) from (end time, seconds, units) of finished work."""
    seconds = sum(m[1] for m in markers)
    units = sum(m[2] for m in markers)
    per_task = units / seconds if seconds > 0 else None
    if len(markers) < 2:
        return per_task, per_task
    span = max(m[0] for m in markers) - min(m[0] - m[1] for m in markers)
    return per_task, (units / span if span > 0 else per_task)


def _stage(run: RunDir, stage: str, num_shards: int | None, total: int | None,
           unfinished: list[int], marker_stats: list[tuple[float, float, int]],
           units_done: int, unit: str) -> dict:
    logs = task_logs(run.root, stage)
    failed, running = [], []
    for s in unfinished:
        if s in logs:
            state, why = log_state(logs[s])
            if state == "failed":
                failed.append({"shard": s, "log": str(logs[s]), "reason": why})
            elif state == "running":
                running.append(s)
    failed_ids = {f["shard"] for f in failed}
    per_task, wall = _rates(marker_stats)
    left = None if total is None else max(0, total - units_done)
    eta = None
    if left == 0:
        eta = 0.0
    elif left and wall:
        eta = left / wall
    shards = num_shards or 0
    return {
        "num_shards": num_shards,
        "done": shards - len(unfinished) if num_shards else 0,
        "pending": [s for s in unfinished if s not in failed_ids and s not in running],
        "running": running,
        "failed": failed,
        "unit": unit, "units_done": units_done, "units_total": total,
        "rate_per_task": None if per_task is None else round(per_task, 1),
        "rate": None if wall is None else round(wall, 1),
        "eta_seconds": None if eta is None else round(eta, 1),
    }


def run_status(out: str | Path) -> dict:
    run = RunDir(out)
    info = run.read_run()
    ds = info.get("dataset", {})
    n_nodes = ds.get("figures", {}).get("nodes")
    stages = {}

    # embed: chunk markers say what is done; chunk marker times give the wall-clock rate.
    n = _layout(run, "embed")
    layout = embed_layout(out)
    chunk_dir = run.state("embed") / "chunks"
    if layout:
        done = _done_chunks(run)
        rows = layout["chunk_rows"]
        size = {c: min(rows, layout["n_nodes"] - c * rows) for c in range(layout["n_chunks"])}
        units_done = sum(size[c] for c in done if c in size)
        per_chunk = []
        shard_stats = [read_json(p) for p in run.state("embed").glob("shard-*.done")]
        per_task, _ = _rates([(0.0, s.get("seconds", 0.0), s.get("texts_encoded", 0))
                              for s in shard_stats])
        for c in done:
            p = chunk_dir / f"{c:06d}.done"
            if c in size and p.exists():
                # a chunk's own time is not recorded; estimate it from the per-task rate
                per_chunk.append((p.stat().st_mtime, size[c] / per_task if per_task else 0.0,
                                  size[c]))
        total = layout["n_nodes"]
    else:
        units_done, per_chunk, total = 0, [], n_nodes
    unfinished = unfinished_embed_shards(out, n) if n else []
    st = _stage(run, "embed", n, total, unfinished, per_chunk, units_done, "texts")
    if layout:
        st["chunks_done"], st["chunks_total"] = len(_done_chunks(run)), layout["n_chunks"]
        if per_task is not None:
            st["rate_per_task"] = round(per_task, 1)
    stages["embed"] = st

    # knn: one marker per shard with rows and seconds.
    n = _layout(run, "knn")
    marks = []
    if n:
        for s in range(n):
            p = run.state("knn") / f"{shard_name(s, n)}.done"
            if p.exists():
                m = read_json(p)
                marks.append((p.stat().st_mtime, m.get("seconds", 0.0), m.get("rows", 0)))
    unfinished = unfinished_knn_shards(out, n) if n else []
    total = layout["n_nodes"] if layout else n_nodes
    stages["knn"] = _stage(run, "knn", n, total, unfinished, marks,
                           sum(m[2] for m in marks), "queries")
    knn_info = info.get("stages", {}).get("knn", {})
    stages["knn"]["k"], stages["knn"]["method"] = knn_info.get("k"), knn_info.get("method")
    meta = read_json(run.graph / "_meta.json")
    covers = meta.get("n_nodes")
    short = layout is not None and covers is not None and covers != layout["n_nodes"]
    stages["knn"]["complete"] = (bool(meta) and not short
                                 and (run.graph / "_moments" / "_meta.json").exists())
    # after an append: the graph covers the first rows only, or its update is under way
    base = read_json(run.graph_base / "_meta.json") or (meta if short else {})
    if base and layout:
        stages["knn"]["graph_covers"] = base.get("n_nodes")
        stages["knn"]["updating"] = run.graph_base.exists()
    return {"run": str(run.root), "dataset": ds.get("name"), "nodes": n_nodes,
            "samples": ds.get("figures", {}).get("samples"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": stages}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _rate(x: float | None, unit: str) -> str:
    return "-" if x is None else f"{x:,.0f} {unit}/s"


def format_status(st: dict) -> str:
    head = f"run {st['run']}"
    if st["dataset"]:
        head += f" ({st['dataset']}: {st['samples']:,} samples, {st['nodes']:,} nodes)"
    lines = [head, f"{'stage':6} {'shards':>6} {'done':>5} {'pending':>8} {'running':>8} "
             f"{'failed':>6}  {'progress':>22}  {'rate (all)':>16}  {'per task':>16}  ETA"]
    for name, s in st["stages"].items():
        if not s["num_shards"]:
            lines.append(f"{name:6} {'-':>6}  not started")
            continue
        total = s["units_total"]
        progress = (f"{s['units_done']:,}/{total:,} {s['unit']}" if total else "-")
        eta = "done" if s["eta_seconds"] == 0 else _duration(s["eta_seconds"])
        if s["failed"] and not s["running"] and eta != "-":
            eta += " once resubmitted"
        lines.append(f"{name:6} {s['num_shards']:>6} {s['done']:>5} {len(s['pending']):>8} "
                     f"{len(s['running']):>8} {len(s['failed']):>6}  {progress:>22}  "
                     f"{_rate(s['rate'], s['unit']):>16}  "
                     f"{_rate(s['rate_per_task'], s['unit']):>16}  {eta}")
    knn = st["stages"].get("knn", {})
    if knn.get("graph_covers") is not None:
        lines.append(f"knn: the graph covers the first {knn['graph_covers']:,} nodes of an "
                     "appended run; " + ("its update is under way" if knn["updating"]
                                         else "`graphbuild knn` updates it"))
    for name, s in st["stages"].items():
        for f in s["failed"]:
            lines.append(f"failed: {name} shard {f['shard']}: {f['reason']}  ({f['log']})")
        if s["pending"] and len(s["pending"]) <= 20:
            lines.append(f"pending: {name} shards {','.join(map(str, s['pending']))}")
    return "\n".join(lines)


def to_json(st: dict) -> str:
    return json.dumps(st, indent=2, sort_keys=True)
