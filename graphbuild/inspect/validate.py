"""Is a run sound? `validate(run)` reads every file of a run and returns its problems.

Each problem is one line, `<check>: <file>: <what is wrong>`, with one of these stable check
names (`CHECKS` holds the names):

  run-files          run.json, nodes.parquet, samples.parquet, embeddings.zarr/zarr.json exist
                     and parse
  tables             nodes.parquet numbers its nodes 0..n-1; samples.parquet maps samples
                     0..S-1 to nodes in range; both agree with run.json's figures
  embed-done         every chunk of embeddings.zarr has its marker in _state/embed/chunks, and
                     run.json's embed stage is done
  knn-done           graph/_meta.json exists; every shard of its layout has its marker in
                     _state/knn, recording _meta.json's k, method, provenance and the part's
                     rows and edges, and its part file; run.json's knn stage is done
  emb-shape          embeddings.zarr has graphbuild's layout (rundir/store.py: float16, chunks
                     of whole rows, crc32c per chunk); (n_nodes, dim) with n_nodes = rows of
                     nodes.parquet, dim and n_nodes as its attrs say
  emb-chunks         every chunk file exists, has a chunk's size and passes its crc32c check
                     (each bad chunk is a line of its own)
  emb-finite         no NaN or inf in any row
  emb-norms          every row has norm 1 +- 0.01
  provenance         graph/_meta.json and _state/knn/params.json carry the embeddings.zarr
                     attrs (every key, recorded on both sides); run.json's dataset and stages
                     agree with them
  graph-meta         graph/_meta.json: n_nodes, k, edges, and parts that cover 0..n-1 in order
  graph-schema       each part reads (every page passing its checksum, where it has one), with
                     columns node int64, neighbors list<int>, sims list<float32>
  rows-sorted        each part's node column is its row range, ascending, no gaps or repeats
  row-length         every row holds k neighbours and as many sims
  ids-in-range       every neighbour id is in 0..n_nodes-1
  no-self-edges      no row lists its own node
  unique-neighbours  no row lists a neighbour twice
  sims-range         every sim is finite and in [-1.01, 1.01]
  sims-descending    every row's sims are non-increasing (best first)
  sims-match         sampled edges' sims equal the dot products of the stored rows (exact graph:
                     1e-5; approximate: 1e-3; IVF-PQ estimates are not checked)
  moments            graph/_moments (the row moments graph-mode targets fill from): _meta.json
                     with the graph's nodes and provenance, every part read (page checksums)
                     holding its nodes in order, finite values (rundir/moments.py)

A path that is not a run directory (no run.json) is an error (GraphbuildError), not a problem.
Memory stays bounded: the graph is read one row group at a time, the store one chunk at a time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphbuild.errors import GraphbuildError
from graphbuild.rundir.files import is_done, read_json
from graphbuild.rundir.paths import RunDir
from graphbuild.rundir.store import NORM_TOLERANCE, StoredRows, StoreError, unit_norm_misses

CHECKS = ("run-files", "tables", "embed-done", "knn-done", "emb-shape", "emb-chunks",
          "emb-finite", "emb-norms", "provenance", "graph-meta", "graph-schema", "rows-sorted",
          "row-length", "ids-in-range", "no-self-edges", "unique-neighbours", "sims-range",
          "sims-descending", "sims-match", "moments")
SIM_LIMIT = 1.01
SIM_TOLERANCE = {"exact": 1e-5, "approximate": 1e-3}
SAMPLED_EDGES = 512  # per row group, for sims-match
MAX_SAMPLED_EDGES = 8192  # in all: bounds the rows held for sims-match
SEED = 0


@dataclass
class Problem:
    check: str
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.check}: {self.path}: {self.message}"


@dataclass
class Validation:
    run: Path
    problems: list[Problem] = field(default_factory=list)
    figures: dict = field(default_factory=dict)  # what was looked at: nodes, chunks, edges...

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, check: str, path: Path, message: str) -> None:
        assert check in CHECKS, check
        self.problems.append(Problem(check, path, message))

    def summary(self) -> str:
        f = self.figures
        chunks, parts = f.get("chunks", 0), f.get("parts", 0)
        return (f"ok: {self.run}: all {len(CHECKS)} checks passed on {f.get('nodes', 0):,} nodes "
                f"({chunks} chunk{'s' * (chunks != 1)}) and {f.get('edges', 0):,} edges "
                f"({parts} part{'s' * (parts != 1)})")


def _n(count: int, noun: str, plural: str | None = None) -> str:
    """'1 row', '3 rows'."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def validate(out: str | Path) -> Validation:
    """Every check in `CHECKS` over the run; problems in the order found."""
    run = RunDir(out)
    if not run.root.is_dir():
        raise GraphbuildError(f"{run.root}: no such run directory")
    if not run.run_json.is_file():
        raise GraphbuildError(f"{run.root}: not a graphbuild run (no run.json)")
    v = Validation(run.root)
    info = _json(v, run.run_json)
    n_nodes = _tables(v, run, info)
    store = _store(v, run, n_nodes)
    meta = _graph_layout(v, run, info, n_nodes)
    attrs = store.attrs if store is not None else None
    if attrs is not None and meta is not None:
        _provenance(v, run, info, attrs, meta)
    edges = _parts(v, run, meta, n_nodes) if meta is not None else None
    if store is not None:
        _embeddings(v, run, store, n_nodes, edges, meta)
    if meta is not None:
        _moments(v, run)
    return v


def _moments(v: Validation, run: RunDir) -> None:
    """The row moments, read whole through their one checked reader."""
    from graphbuild.rundir.moments import read_moments

    try:
        read_moments(run.root)
    except GraphbuildError as e:
        path, _, what = str(e).partition(": ")
        v.fail("moments", Path(path), what)


def _json(v: Validation, path: Path) -> dict | None:
    if not path.is_file():
        v.fail("run-files", path, "missing")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        v.fail("run-files", path, f"not readable JSON ({e})")
        return None


def _columns(v: Validation, path: Path, *columns: str) -> list[np.ndarray] | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        v.fail("run-files", path, "missing")
        return None
    try:
        t = pq.read_table(path, columns=list(columns))
        return [t.column(c).to_numpy() for c in columns]
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        v.fail("run-files", path, f"cannot read columns {', '.join(columns)}: "
               f"{str(e).splitlines()[0]}")
        return None


def _tables(v: Validation, run: RunDir, info: dict | None) -> int | None:
    """n_nodes from nodes.parquet, after checking both tables."""
    nodes = (_columns(v, run.nodes, "node") or [None])[0]
    samples, sample_nodes = _columns(v, run.samples, "sample", "node") or (None, None)
    figures = (info or {}).get("dataset", {}).get("figures", {})
    n = None
    if nodes is not None:
        n = len(nodes)
        wrong = nodes != np.arange(n)
        if wrong.any():
            i = _first(wrong)
            v.fail("tables", run.nodes, f"row {i} has node {nodes[i]}; nodes must be 0..{n - 1} "
                   "in order")
        if figures and figures.get("nodes") != n:
            v.fail("tables", run.nodes, f"{n} nodes, run.json says {figures.get('nodes')}")
    if sample_nodes is not None and samples is not None:
        s = len(samples)
        if not np.array_equal(np.sort(samples), np.arange(s)):
            v.fail("tables", run.samples, f"column sample is not a permutation of 0..{s - 1}")
        if n is not None and s:
            bad = (sample_nodes < 0) | (sample_nodes >= n)
            if bad.any():
                i = _first(bad)
                v.fail("tables", run.samples, f"{int(bad.sum())} samples point at nodes outside "
                       f"0..{n - 1} (first: row {i}, node {sample_nodes[i]})")
        if figures and figures.get("samples") != s:
            v.fail("tables", run.samples, f"{s} samples, run.json says {figures.get('samples')}")
    v.figures["nodes"] = n or 0
    return n


def _store(v: Validation, run: RunDir, n_nodes: int | None) -> StoredRows | None:
    """The store's reader after the layout, shape and completion checks, or None if its
    zarr.json is missing, does not parse, or is not graphbuild's layout."""
    meta_file = run.embeddings / "zarr.json"
    if _json(v, meta_file) is None:
        return None
    try:
        store = StoredRows(run.embeddings)
    except StoreError as e:
        v.fail("emb-shape", meta_file, e.detail)
        return None
    attrs, shape = store.attrs, store.shape
    if n_nodes is not None and shape[0] != n_nodes:
        v.fail("emb-shape", meta_file, f"shape {shape}: {shape[0]} rows, nodes.parquet has "
               f"{n_nodes}")
    if (attrs.get("n_nodes"), attrs.get("dim")) != shape:
        v.fail("emb-shape", meta_file, f"shape {shape}, attrs say n_nodes="
               f"{attrs.get('n_nodes')} dim={attrs.get('dim')}")
    v.figures["chunks"] = store.n_chunks
    marks = run.state("embed") / "chunks"
    missing = [c for c in range(store.n_chunks) if not is_done(marks, f"{c:06d}")]
    if missing:
        v.fail("embed-done", marks, f"{len(missing)} of {_n(store.n_chunks, 'chunk')} without a "
               f"done marker (first: {missing[0]:06d}.done)")
    return store


def _graph_layout(v: Validation, run: RunDir, info: dict | None,
                  n_nodes: int | None) -> dict | None:
    """graph/_meta.json after the completion and layout checks, or None without one."""
    from graphbuild.rundir.graph import meta_path
    from graphbuild.shards import shard_name

    stages = (info or {}).get("stages", {})
    for stage in ("embed", "knn"):
        status = stages.get(stage, {}).get("status")
        if status != "done":
            v.fail(f"{stage}-done", run.run_json, f"stage {stage} is {status or 'absent'}, "
                   "not done")
    path = meta_path(run.root)
    if not path.is_file():
        v.fail("knn-done", path, "missing: the graph is not complete")
        return None
    try:
        meta = read_json(path)
        parts, k, n, edges = meta["parts"], int(meta["k"]), int(meta["n_nodes"]), meta["edges"]
        layout = int(meta["num_shards"])
    except (GraphbuildError, KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"lacks {e}" if isinstance(e, KeyError) else str(e).split(": ", 1)[-1]
        v.fail("graph-meta", path, f"unreadable or incomplete: {what}")
        return None
    state = run.state("knn")
    missing = [s for s in range(layout) if not is_done(state, shard_name(s, layout))]
    if missing:
        v.fail("knn-done", state, f"{len(missing)} of {_n(layout, 'shard')} without a "
               f"done marker (first: {shard_name(missing[0], layout)}.done)")
    _markers_record_meta(v, state, meta, layout)
    for p in parts:
        if not (run.graph / p.get("file", "?")).is_file():
            v.fail("knn-done", run.graph / p.get("file", "?"), "part file missing")
    if n_nodes is not None and n != n_nodes:
        v.fail("graph-meta", path, f"n_nodes={n}, nodes.parquet has {n_nodes}")
    if not 1 <= k <= max(n - 1, 1):
        v.fail("graph-meta", path, f"k={k} is not in 1..n_nodes-1")
    cuts = [(p.get("first"), p.get("stop")) for p in parts]
    if len(parts) != layout or [c[0] for c in cuts] != [0] + [c[1] for c in cuts[:-1]] or (
            cuts and cuts[-1][1] != n):
        v.fail("graph-meta", path, f"parts {cuts} do not cover nodes 0..{n - 1} in "
               f"{layout} contiguous shards")
    if edges != sum(p.get("edges", 0) for p in parts) or edges != k * n:
        v.fail("graph-meta", path, f"edges={edges}; the parts list "
               f"{sum(p.get('edges', 0) for p in parts)}, k * n_nodes = {k * n}")
    v.figures["parts"] = len(parts)
    return meta


def _markers_record_meta(v: Validation, state: Path, meta: dict, layout: int) -> None:
    """Each shard marker must record the graph _meta.json describes (k, method, provenance)
    and its part's rows and edges as _meta.json lists them: `graphbuild knn` trusts no other
    marker and does its shard again."""
    from graphbuild.rundir.files import marker
    from graphbuild.shards import shard_name

    parts = meta["parts"]
    for s in range(layout):
        path = marker(state, shard_name(s, layout))
        if not path.is_file():
            continue
        try:
            stats = read_json(path)
        except GraphbuildError as e:
            v.fail("knn-done", path, str(e).split(": ", 1)[-1])
            continue
        part = parts[s] if s < len(parts) and isinstance(parts[s], dict) else {}
        want = {"k": meta.get("k"), "method": meta.get("method"), "first": part.get("first"),
                "stop": part.get("stop"), "edges": part.get("edges")}
        wrong = [key for key, value in want.items() if stats.get(key) != value]
        if wrong:
            key = wrong[0]
            v.fail("knn-done", path, f"records {key}={stats.get(key)!r}, _meta.json says "
                   f"{want[key]!r}")
        elif stats.get("provenance") != meta.get("provenance"):
            v.fail("knn-done", path, f"records {'no' if 'provenance' not in stats else 'other'} "
                   "provenance than _meta.json")


def _provenance(v: Validation, run: RunDir, info: dict | None, attrs: dict,
                meta: dict) -> None:
    from graphbuild.rundir.paths import PROVENANCE_KEYS

    where = run.embeddings / "zarr.json"
    params_path = run.state("knn") / "params.json"
    params = read_json(params_path) if params_path.is_file() else {}
    for path, prov in ((run.graph / "_meta.json", meta.get("provenance", {})),
                       (params_path, params.get("provenance", {}))):
        if path == params_path and not params:
            v.fail("provenance", path, "missing: the graph's parameters are not recorded")
            continue
        diff = [k for k in PROVENANCE_KEYS
                if k not in prov or k not in attrs or prov[k] != attrs[k]]
        if diff:
            key = diff[0]
            v.fail("provenance", path, f"{_recorded(prov, key)} but {where} has "
                   f"{_recorded(attrs, key)}" + (f" (and {len(diff) - 1} more keys differ)"
                                                 if len(diff) > 1 else "")
                   + ("; the run was appended to since: `graphbuild knn` updates the graph"
                      if diff == ["n_nodes"] and prov.get(key) in attrs.get("appended_at", [])
                      else ""))
    if params and (params.get("k"), params.get("method")) != (meta.get("k"), meta.get("method")):
        v.fail("provenance", params_path, f"k={params.get('k')} method={params.get('method')}, "
               f"_meta.json says k={meta.get('k')} method={meta.get('method')}")
    info = info or {}
    embed = info.get("stages", {}).get("embed", {})
    for key in ("model", "model_revision", "precision", "dim"):
        if key in embed and embed[key] != attrs.get(key):
            v.fail("provenance", run.run_json, f"stages.embed.{key}={embed[key]!r} but {where} "
                   f"has {attrs.get(key)!r}")
    knn = info.get("stages", {}).get("knn", {})
    for key in ("k", "method"):
        if key in knn and knn[key] != meta.get(key):
            v.fail("provenance", run.run_json, f"stages.knn.{key}={knn[key]!r} but "
                   f"graph/_meta.json has {meta.get(key)!r}")
    templates = info.get("dataset", {}).get("templates")
    if templates is not None and templates != attrs.get("templates"):
        v.fail("provenance", run.run_json, f"dataset.templates={templates!r} but {where} has "
               f"{attrs.get('templates')!r}")


def _recorded(record: dict, key: str) -> str:
    """'precision='bf16'', or 'no precision' when the key is absent."""
    return f"{key}={record[key]!r}" if key in record else f"no {key}"


class _PartChecks:
    """Counts of each row-level problem in one part, with the first example of each."""

    def __init__(self):
        self.count: dict[str, int] = {}
        self.example: dict[str, str] = {}

    def add(self, check: str, mask: np.ndarray, describe) -> None:
        hits = int(np.count_nonzero(mask))
        if hits:
            if check not in self.example:
                self.example[check] = describe(_first(mask))
            self.count[check] = self.count.get(check, 0) + hits

    def report(self, v: Validation, path: Path, unit: dict[str, str]) -> None:
        for check in CHECKS:
            if check in self.count:
                v.fail(check, path, f"{_n(self.count[check], *unit[check])} (first: "
                       f"{self.example[check]})")


_UNITS = {"rows-sorted": ("row out of place", "rows out of place"),
          "row-length": ("row with a wrong length", "rows with a wrong length"),
          "ids-in-range": ("neighbour id out of range", "neighbour ids out of range"),
          "no-self-edges": ("self edge",), "unique-neighbours": ("repeated neighbour",),
          "sims-range": ("sim out of range", "sims out of range"),
          "sims-descending": ("sim above the one before", "sims above the one before")}


def _parts(v: Validation, run: RunDir, meta: dict, n_nodes: int | None) -> dict | None:
    """Row-level checks of every part; returns sampled edges (node, neighbour, sim) for
    sims-match."""
    import pyarrow as pa

    from graphbuild.rundir.graph import read_footer, read_row_group

    n = n_nodes if n_nodes is not None else int(meta["n_nodes"])
    k = int(meta["k"])
    rng = np.random.default_rng(SEED)
    sampled: list[tuple[np.ndarray, ...]] = []
    total = 0
    for p, part in enumerate(meta["parts"]):
        path = run.graph / part.get("file", "?")
        if not path.is_file():
            continue  # knn-done said so
        try:
            footer = read_footer(path)
        except GraphbuildError as e:
            v.fail("graph-schema", path, _unprefixed(e, path))
            continue
        schema = footer.schema.to_arrow_schema()
        names, types = schema.names, {f.name: f.type for f in schema}
        want_ok = (names == ["node", "neighbors", "sims"] and types["node"] == pa.int64()
                   and pa.types.is_list(types["neighbors"])
                   and pa.types.is_integer(types["neighbors"].value_type)
                   and types["sims"] == pa.list_(pa.float32()))
        if not want_ok:
            v.fail("graph-schema", path, f"schema {', '.join(f'{a} {t}' for a, t in types.items())}"
                   "; want node int64, neighbors list<int32|int64>, sims list<float>")
            continue
        checks = _PartChecks()
        expect = part.get("first", 0)
        try:
            for g in range(footer.num_row_groups):
                t = read_row_group(path, g)  # page checksums verified
                total += t.num_rows
                edges = _row_group(checks, t, g, expect, n, k)
                expect += t.num_rows
                if edges is not None and len(edges[0]):
                    take = rng.choice(len(edges[0]), min(SAMPLED_EDGES, len(edges[0])),
                                      replace=False)
                    sampled.append((*(e[take] for e in edges), np.full(len(take), p)))
        except GraphbuildError as e:
            v.fail("graph-schema", path, _unprefixed(e, path))
            continue
        if expect != part.get("stop"):
            checks.add("rows-sorted", np.array([True]), lambda _: f"{expect - part.get('first', 0)}"
                       f" rows, _meta.json says {part.get('first')}..{part.get('stop')}")
        checks.report(v, path, _UNITS)
    v.figures["edges"] = int(meta.get("edges", 0))
    v.figures["rows"] = total
    if not sampled:
        return None
    edges = {name: np.concatenate([s[i] for s in sampled])
             for i, name in enumerate(("node", "neighbor", "sim", "part"))}
    if len(edges["node"]) > MAX_SAMPLED_EDGES:
        take = np.sort(rng.choice(len(edges["node"]), MAX_SAMPLED_EDGES, replace=False))
        edges = {name: e[take] for name, e in edges.items()}
    return edges


def _unprefixed(e: GraphbuildError, path: Path) -> str:
    """A one-line error about `path` without the path (a problem line names it apart)."""
    return str(e).removeprefix(f"{path}: ")


def _row_group(checks: _PartChecks, t, g: int, first: int, n: int, k: int):
    """Checks of one row group; (node, neighbour, sim) of its well-formed edges, or None."""
    nodes = t.column("node").to_numpy()
    rows = len(nodes)
    at = lambda i: f"row group {g}, row {i}, node {nodes[i]}"  # noqa: E731
    checks.add("rows-sorted", nodes != np.arange(first, first + rows),
               lambda i: f"row group {g}, row {i}: node {nodes[i]}, expected {first + i}")
    nb = t.column("neighbors").combine_chunks()
    sm = t.column("sims").combine_chunks()
    nb_off = nb.offsets.to_numpy().astype(np.int64)
    sm_off = sm.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(nb_off)
    bad_len = (lengths != k) | (np.diff(sm_off) != lengths)
    checks.add("row-length", bad_len, lambda i: f"{at(i)}: {lengths[i]} neighbours and "
               f"{sm_off[i + 1] - sm_off[i]} sims, k={k}")
    if bad_len.any():
        return None
    ids = nb.flatten().to_numpy().astype(np.int64)
    sims = sm.flatten().to_numpy()
    row = np.repeat(np.arange(rows), lengths)
    edge = lambda e: f"{at(row[e])}, position {e - nb_off[row[e]] + nb_off[0]}"  # noqa: E731
    out = (ids < 0) | (ids >= n)
    checks.add("ids-in-range", out, lambda e: f"{edge(e)}: id {ids[e]} not in 0..{n - 1}")
    checks.add("no-self-edges", ids == nodes[row], lambda e: f"{edge(e)}: lists itself")
    order = np.lexsort((ids, row))
    dup = np.zeros(len(ids), bool)
    dup[order[1:]] = (ids[order[1:]] == ids[order[:-1]]) & (row[order[1:]] == row[order[:-1]])
    checks.add("unique-neighbours", dup, lambda e: f"{edge(e)}: id {ids[e]} again")
    bad_sim = ~(np.abs(sims) <= SIM_LIMIT)
    checks.add("sims-range", bad_sim, lambda e: f"{edge(e)}: sim {sims[e]}")
    rises = np.zeros(len(sims), bool)
    rises[1:] = (sims[1:] > sims[:-1]) & (row[1:] == row[:-1])
    checks.add("sims-descending", rises, lambda e: f"{edge(e)}: sim {sims[e]:.6f} after "
               f"{sims[e - 1]:.6f}")
    good = ~(out | bad_sim)
    return nodes[row][good], ids[good], sims[good]


def _embeddings(v: Validation, run: RunDir, store: StoredRows, n_nodes: int | None,
                edges: dict | None, meta: dict | None) -> None:
    """Per chunk: the file, its crc32c, NaN/inf and norms; then sims-match on sampled edges.
    Every bad chunk is reported, not only the first."""
    n = store.shape[0]
    rows_ok = min(n, n_nodes) if n_nodes is not None else n
    want = np.unique(np.concatenate([edges["node"], edges["neighbor"]])) if edges else None
    held: dict[int, np.ndarray] = {}
    for c in range(store.n_chunks):
        try:
            block = store.chunk(c)
        except StoreError as e:
            v.fail("emb-chunks", e.file, e.detail)
            continue
        lo = c * store.chunk_rows
        block = block[:max(rows_ok - lo, 0)]
        path = store.chunk_file(c)
        x = block.astype(np.float32)
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            i = _first(~finite)
            v.fail("emb-finite", path, f"{_n(int((~finite).sum()), 'row')} with NaN or inf "
                   f"(first: row {lo + i})")
        norms, off = unit_norm_misses(x[finite])
        if len(off):
            i = int(off[0])
            v.fail("emb-norms", path, f"{_n(len(off), 'row')} not unit norm (first: row "
                   f"{lo + np.flatnonzero(finite)[i]}, norm {norms[i]:.4f}; want 1 +- "
                   f"{NORM_TOLERANCE})")
        if want is not None:
            mine = want[(want >= lo) & (want < lo + len(block))]
            held.update(zip(mine.tolist(), block[mine - lo]))
    if edges is not None and meta is not None:
        _sims_match(v, run, edges, held, meta)


def _sims_match(v: Validation, run: RunDir, edges: dict, held: dict, meta: dict) -> None:
    method = meta.get("method")
    kind = read_json(run.graph / "_index" / "index.json").get("index", {}).get("kind")
    tol = None if kind == "ivf-pq" else SIM_TOLERANCE.get(method)
    if tol is None:
        return
    have = np.array([a in held and b in held for a, b in zip(edges["node"].tolist(),
                                                             edges["neighbor"].tolist())], bool)
    if not have.any():
        return
    a, b, s = edges["node"][have], edges["neighbor"][have], edges["sim"][have]
    part = edges["part"][have]
    xa = np.stack([held[i] for i in a.tolist()]).astype(np.float64)
    xb = np.stack([held[i] for i in b.tolist()]).astype(np.float64)
    dots = (xa * xb).sum(axis=1)
    err = np.abs(dots - s)
    err[~np.isfinite(err)] = math.inf
    for p in np.unique(part[err > tol]):
        mine = part == p
        bad = mine & (err > tol)
        i = int(np.argmax(np.where(mine, err, -1.0)))
        v.fail("sims-match", run.graph / meta["parts"][p]["file"],
               f"{int(bad.sum())} of {_n(int(mine.sum()), 'sampled edge')} off the stored "
               f"rows' dot product by more than {tol:g} (worst: node {a[i]} -> {b[i]}: stored "
               f"{s[i]:.6f}, dot {dots[i]:.6f})")
