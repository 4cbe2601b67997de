"""The embed stage: a dataset's nodes to unit-norm fp16 vectors in embeddings.zarr.

Work is cut into row chunks of the Zarr array. Shard s of n owns a contiguous run of chunks,
writes only those, and marks each chunk done after its data is written (zarr writes each
chunk file through a temp file and a rename). A rerun skips chunks already marked, so a
killed or preempted shard loses at most the chunk it was on. Each chunk is encoded from its
own texts only, so the stored bits do not depend on the shard count or on restarts. A chunk
with a row that is not finite or not of norm 1 +- 0.01 is an error, never written or marked.

Inputs. `prepare` builds the run's tables (nodes.parquet, samples.parquet) once and records
in run.json what they depend on: the reading settings and the class list
(`Dataset.reading`), and per source file its name, format, size, mtime_ns and sha256. Every
later prepare (each array task, each rerun) compares, and refuses in one line a changed
setting, class list, file set or file content. Not compared: templates (the store's
provenance is), examples, the manifest's path.

A file's content follows git's rule: when its size and mtime_ns equal the record's, the
recorded hash is trusted and the file is not read; otherwise it is hashed again, outside the
run lock, and must match, and its new size and mtime are recorded once the embed succeeds (a
copy staged on another node has other mtimes and the same content: accepted). A file written
within 2 s before its recorded hash was taken is hashed again, since a later write in the
same clock tick would leave its mtime as recorded. The first task hashes the files under the
lock, while it builds the tables the others wait for: sha256 of 2M captions (111 MiB) takes
0.09 s against 13 s for building the tables (benchmarks/fingerprint.py). A file it hashed
within 2 s of its last write, it hashes again once the build has outlasted that window, so
that the other tasks do not each hash it again.

A run recorded before per-file hashes (run.json's dataset has a 16-hex "fingerprint") is
verified once: its tables are rebuilt aside from the current inputs and compared row for
row; equal, the run is recorded with these inputs' hashes and goes on; different, it is
refused. Its old fingerprint covered only names and sizes, so trusting it would carry the
same-size edits it missed into the new record.

Markers are not trusted without their data. A chunk counts as done only if its marker
exists and its file has a chunk's size (raw fp16 rows + 4 crc32c bytes), since zarr reads a
missing chunk file as zeros. A rerun also checks its own marked chunks' crc32c, reading them
(7 ms a 6 MiB chunk from the page cache, 0.1% of encoding it), and redoes any chunk failing
either check; the store-wide count of missing chunks (knn's check) is a stat per chunk, and
knn's reads check the crc32c. Tables that are missing, or whose Parquet footer cannot be
read, are rebuilt: the recorded inputs are unchanged, so they are the same tables.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from graphbuild import options
from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point
from graphbuild.manifest import HASH, Dataset, settle_records
from graphbuild.memory import return_freed_memory
from graphbuild.models import DEFAULT_MODEL
from graphbuild.progress import Reporter
from graphbuild.shards import shard_name, shard_range
from graphbuild.storage import (
    PROVENANCE_KEYS,
    RunDir,
    is_done,
    mark_done,
    marker,
    read_json,
    write_json,
)
from graphbuild.texts import build_tables, read_node_texts
from graphbuild.xclr_store import ROW_NUMBER_IDS

log = logging.getLogger(__name__)

CHUNK_ROWS = 8192  # 6 MiB of fp16 at d=384: small enough for cheap random row reads
NORM_TOLERANCE = 1e-2  # a stored row's norm is 1 within this, as knn and validate check
VERIFY_DIR = ".verify-tables"  # tables rebuilt aside to verify a run recorded without hashes


@dataclass
class EmbedConfig:
    model: str = DEFAULT_MODEL
    device: str = "auto"
    precision: str = "auto"
    token_budget: int | None = None
    chunk_rows: int = CHUNK_ROWS
    skip_bad_rows: bool = False
    trust_remote_code: bool = False


@dataclass
class ShardResult:
    shard: int
    num_shards: int
    chunks: int = 0
    chunks_skipped: int = 0
    texts_encoded: int = 0
    seconds: float = 0.0
    complete: bool = False   # every chunk of the whole store is done, not just ours
    missing_chunks: list[int] = field(default_factory=list)

    @property
    def texts_per_s(self) -> float:
        return self.texts_encoded / self.seconds if self.seconds else 0.0


def prepare(ds: Dataset, run: RunDir, skip_bad_rows: bool = False) -> dict:
    """Make sure the run holds this dataset's nodes and samples tables, built from these
    inputs; return its figures (see the module docstring for what is compared).

    The tables are built under the run lock, so the first array task builds them and the
    others wait and reuse them. Where a record exists, files are hashed before the lock."""
    figures, refreshed = _prepare(ds, run, skip_bad_rows)
    _record_refresh(run, refreshed)
    return figures


def _prepare(ds: Dataset, run: RunDir, skip_bad_rows: bool) -> tuple[dict, dict]:
    """prepare's work; also returns what the record should say now that may change without
    changing the tables (`_refreshed`), for the caller to write once its work succeeds."""
    recorded = run.read_run().get("dataset") or {}
    files = ds.source_records(recorded["source_files"]) if "reading" in recorded else None
    with run.lock():
        info = run.read_run()
        have = info.get("dataset")
        if have and have.get("name") != ds.name:
            raise GraphbuildError(f"{run.root}: holds dataset {have.get('name')!r}, not "
                                  f"{ds.name!r}; choose another --out")
        if not have:
            return _build(ds, run, info, skip_bad_rows), {}
        if "reading" not in have:
            return _adopt(ds, run, info, skip_bad_rows), {}
        if files is None or _changed_since(ds, files):
            files = ds.source_records(have["source_files"])
        _check_inputs(ds, run, have, files, skip_bad_rows)
        if not _tables_readable(run, have["figures"]):
            _rebuild(ds, run, have, files, skip_bad_rows)
        return have["figures"], _refreshed(ds, have, files)


def _dataset_entry(ds: Dataset, files: list[dict], figures: dict) -> dict:
    entry = {"name": ds.name, "manifest": str(ds.path), "reading": ds.reading(),
             "source_files": files, "templates": ds.manifest.templates, "figures": figures,
             # the trainer joins dataset items to samples by id; by default by row number,
             # which only a run without an id column has as its ids
             ROW_NUMBER_IDS: ds.manifest.id_column is None and ds.manifest.source is not None}
    if ds.manifest.examples:
        entry["examples"] = ds.manifest.examples
    return entry


def _build(ds: Dataset, run: RunDir, info: dict, skip_bad_rows: bool) -> dict:
    """The tables from scratch, and the record of their inputs in run.json."""
    t0 = time.perf_counter()
    files = ds.source_records()
    figures = build_tables(ds, run.root, skip_bad_rows)
    files = settle_records(files)  # a source written just before: the others need not re-hash
    _check_unchanged(ds, files)
    kill_point("embed.tables_written")
    info["dataset"] = _dataset_entry(ds, files, figures.as_dict())
    write_json(run.run_json, info)
    log.info("%s: %d samples, %d unique texts (%d duplicates) in %.1fs", ds.name,
             figures.samples, figures.nodes, figures.duplicates, time.perf_counter() - t0)
    return figures.as_dict()


def _changed_since(ds: Dataset, files: list[dict]) -> str | None:
    """The first source file whose name, size or mtime differs from `files` (records taken
    earlier in this process), or None."""
    now = ds.source_files()
    if [f.name for f in now] != [r["name"] for r in files]:
        return f"{ds.path}: the source's files"
    for f, r in zip(now, files):
        st = f.stat()
        if (st.st_size, st.st_mtime_ns) != (r["bytes"], r["mtime_ns"]):
            return str(f)
    return None


def _check_unchanged(ds: Dataset, files: list[dict]) -> None:
    """Refuse to record hashes of files that changed while prepare read them."""
    changed = _changed_since(ds, files)
    if changed:
        raise GraphbuildError(f"{changed}: changed while it was read; rerun once it is final")


def _check_inputs(ds: Dataset, run: RunDir, have: dict, files: list[dict], skip: bool) -> None:
    """Refuse inputs other than those the run's tables were built from, naming the first."""
    reading, before = ds.reading(), have["reading"]
    if (before.get("classes"), before.get("classes_sha256")) != (
            reading.get("classes"), reading.get("classes_sha256")):
        cf = ds.classes_file()
        where = f"classes_file {cf}" if cf else f"classes of {ds.path}"
        raise GraphbuildError(
            f"{run.root}: its tables were built from another class list ({before.get('classes')} "
            f"classes, sha256 {str(before.get('classes_sha256'))[:12]}), not this one "
            f"({reading.get('classes')} classes from {where}, sha256 "
            f"{str(reading.get('classes_sha256'))[:12]}); choose another --out")
    for key in dict.fromkeys([*before, *reading]):
        if before.get(key) != reading.get(key):
            raise GraphbuildError(f"{run.root}: its tables were built with {key}="
                                  f"{before.get(key)!r}, the manifest now gives {key}="
                                  f"{reading.get(key)!r}; choose another --out")
    _check_files(run, have["source_files"], files)
    figures = have["figures"]
    skipped = figures.get("skipped_empty", 0) + figures.get("skipped_duplicate_ids", 0)
    if skipped and not skip:
        raise GraphbuildError(f"{run.root}: its tables dropped {skipped} bad rows under "
                              "--skip-bad-rows; give --skip-bad-rows again or choose another --out")


def _check_files(run: RunDir, before: list[dict], now: list[dict]) -> None:
    names_before, names_now = [r["name"] for r in before], [r["name"] for r in now]
    for r in now:
        if r["name"] not in names_before:
            raise GraphbuildError(f"{r['path']}: a source file this run was not built from; "
                                  "choose another --out")
    for r in before:
        if r["name"] not in names_now:
            raise GraphbuildError(f"{run.root}: was built from source file {r['path']}, which "
                                  "the source no longer gives; choose another --out")
    if names_before != names_now:
        raise GraphbuildError(f"{run.root}: was built from {', '.join(names_before)} in that "
                              f"order, the source now gives {', '.join(names_now)}")
    for old, new in zip(before, now):
        if old[HASH] != new[HASH]:
            raise GraphbuildError(
                f"{new['path']}: changed since {run.root} was built from it ({HASH} "
                f"{new[HASH][:12]}, recorded {old[HASH][:12]}; same name, other content); "
                "choose another --out")
        if old["format"] != new["format"]:
            raise GraphbuildError(f"{new['path']}: read as {new['format']}, but this run's "
                                  f"tables read it as {old['format']}; choose another --out")


def _tables_readable(run: RunDir, figures: dict) -> bool:
    """Both tables present, their Parquet footers readable, with the recorded row counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path, rows, columns in ((run.nodes, figures["nodes"], {"node", "text"}),
                                (run.samples, figures["samples"], {"sample", "sample_id", "node"})):
        try:
            meta = pq.read_metadata(path)
        except (OSError, pa.ArrowException):
            return False
        if meta.num_rows != rows or not columns <= set(meta.schema.names):
            return False
    return True


def _rebuild(ds: Dataset, run: RunDir, have: dict, files: list[dict], skip: bool) -> None:
    """Tables missing or unreadable: build them again from the inputs just checked unchanged."""
    log.warning("%s: nodes.parquet or samples.parquet is missing or unreadable; rebuilding "
                "them from the recorded (unchanged) inputs", run.root)
    figures = build_tables(ds, run.root, skip).as_dict()
    _check_unchanged(ds, files)
    if figures != have["figures"]:
        raise GraphbuildError(f"{run.root}: tables rebuilt from its recorded inputs give "
                              f"{figures}, run.json recorded {have['figures']}; choose another "
                              "--out")


def _refreshed(ds: Dataset, have: dict, files: list[dict]) -> dict:
    """What changed in the record without changing the tables: the files' sizes, mtimes,
    paths and hash times after a re-hash that matched, the manifest's path, the examples."""
    now = {"source_files": files, "manifest": str(ds.path),
           "examples": ds.manifest.examples or None}
    return {k: v for k, v in now.items() if have.get(k) != v}


def _record_refresh(run: RunDir, refreshed: dict) -> None:
    if refreshed:
        run.update_run(lambda info: _apply_refresh(info, refreshed))


def _apply_refresh(info: dict, refreshed: dict) -> None:
    entry = info["dataset"]
    entry.update(refreshed)
    if entry.get("examples") is None:
        entry.pop("examples", None)


def _adopt(ds: Dataset, run: RunDir, info: dict, skip: bool) -> dict:
    """A run recorded before per-file content hashes: its record cannot say whether a source
    changed at the same size. Rebuild the tables aside from the current inputs; equal row for
    row, the run is recorded with these inputs' hashes; otherwise it is refused."""
    have = info["dataset"]
    if not _tables_readable(run, have["figures"]):
        raise GraphbuildError(f"{run.root}: recorded before graphbuild kept its sources' "
                              "content hashes, and its tables are missing or unreadable, so "
                              "nothing shows what its embeddings hold; choose another --out")
    aside = run.root / VERIFY_DIR
    shutil.rmtree(aside, ignore_errors=True)  # left by a killed verification
    try:
        files = ds.source_records()
        figures = build_tables(ds, aside, skip).as_dict()
        _check_unchanged(ds, files)
        for table in (run.nodes, run.samples):
            if not _same_rows(table, aside / table.name):
                raise GraphbuildError(
                    f"{table}: differs from a rebuild from the current inputs, so a source "
                    "file or the manifest changed since this run was built (it was recorded "
                    "before graphbuild kept content hashes); choose another --out")
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    info["dataset"] = _dataset_entry(ds, files, figures)
    write_json(run.run_json, info)
    log.info("%s: verified against its inputs and recorded their content hashes", run.root)
    return figures


def _same_rows(a: Path, b: Path, window: int = 1 << 20) -> bool:
    """Two Parquet tables hold the same rows in the same order, read a window at a time."""
    import polars as pl

    left, right = pl.scan_parquet(a), pl.scan_parquet(b)
    n = left.select(pl.len()).collect().item()
    if n != right.select(pl.len()).collect().item():
        return False
    return all(left.slice(lo, window).collect().equals(right.slice(lo, window).collect())
               for lo in range(0, n, window))


def _check_provenance(run: RunDir, have: dict, want: dict) -> None:
    """Refuse a store whose provenance differs from ours on any key we know."""
    for key in PROVENANCE_KEYS:
        if key in want and have.get(key) != want[key]:
            raise GraphbuildError(
                f"{run.embeddings}: was embedded with {key}={have.get(key)!r}, this run "
                f"has {key}={want[key]!r}; use another --out or delete the store")


def _existing_store(run: RunDir):
    import zarr

    if not (run.embeddings / "zarr.json").exists():
        return None
    return zarr.open_array(str(run.embeddings), mode="r+")


def _open_store(run: RunDir, provenance: dict, chunk_rows: int):
    """Open the store, or create it; refuse one whose provenance differs from ours."""
    import zarr
    from zarr.codecs import Crc32cCodec

    with run.lock():
        arr = _existing_store(run)
        if arr is not None:
            _check_provenance(run, dict(arr.attrs), provenance)
            return arr
        _remove_partial_writes(run.embeddings)  # a creation cut short
        n, dim = provenance["n_nodes"], provenance["dim"]
        # Crc32c costs 4 bytes a chunk and turns a corrupt chunk into an error, not silent junk.
        return zarr.create_array(
            store=str(run.embeddings), shape=(n, dim), chunks=(min(chunk_rows, max(n, 1)), dim),
            dtype="float16", compressors=[Crc32cCodec()], fill_value=0,
            attributes={**provenance, "chunk_rows": min(chunk_rows, max(n, 1))})


class CheckedStore:
    """A read-only view of embeddings.zarr whose reads refuse, in one line naming the chunk's
    file, a chunk file that is missing or not a chunk's size (zarr would return zeros or a
    codec traceback) or that fails its crc32c."""

    def __init__(self, path: Path):
        import zarr

        self.path = path
        self.arr = zarr.open_array(str(path), mode="r")
        self.shape, self.chunks, self.dtype = self.arr.shape, self.arr.chunks, self.arr.dtype
        self.attrs = self.arr.attrs
        self.chunk_bytes = chunk_bytes(self.arr)

    def __getitem__(self, key):
        chunks = self._chunks_of(key)
        for c in chunks:
            problem = chunk_file_problem(self.path, c, self.chunk_bytes)
            if problem:
                raise GraphbuildError(f"{chunk_file(self.path, c)}: chunk {c} "
                                      f"({self._rows(c)}) {problem}; rerun `graphbuild embed` "
                                      "to redo it")
        try:
            return self.arr[key]
        except ValueError as e:
            if "checksum" not in str(e):
                raise
            raise GraphbuildError(self._culprit(chunks)) from None

    def _rows(self, c: int) -> str:
        rows = self.chunks[0]
        return f"rows {c * rows}-{min((c + 1) * rows, self.shape[0]) - 1}"

    def _chunks_of(self, key) -> list[int]:
        """The chunks a read of `key` touches (all of them for a key of another kind)."""
        n, rows = self.shape[0], self.chunks[0]
        span = key[0] if isinstance(key, tuple) else key
        if isinstance(span, slice):
            picked = range(*span.indices(n))
            return list(range(min(picked) // rows, max(picked) // rows + 1)) if picked else []
        if isinstance(span, (int, np.integer)):
            return [(int(span) % n) // rows] if n else []
        if isinstance(span, (list, np.ndarray)):
            idx = np.asarray(span)
            idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)
            return np.unique((idx % max(n, 1)) // rows).tolist()
        return list(range(chunk_count(self.arr)))

    def _culprit(self, chunks: list[int]) -> str:
        rows = self.chunks[0]
        for c in chunks:
            try:
                self.arr[c * rows:(c + 1) * rows]
            except ValueError:
                return (f"{chunk_file(self.path, c)}: chunk {c} fails its crc32c check, it is "
                        "corrupt; rerun `graphbuild embed` to redo it")
        return f"{self.path}: one of chunks {chunks} fails its crc32c check"


def chunk_count(arr) -> int:
    return -(-arr.shape[0] // arr.chunks[0])


def chunk_file(store: Path, c: int) -> Path:
    return store / "c" / str(c) / "0"


def chunk_bytes(arr) -> int:
    """A stored chunk's size: its raw rows (an edge chunk is stored whole) + 4 crc32c bytes."""
    return int(np.prod(arr.chunks)) * arr.dtype.itemsize + 4


def chunk_file_problem(store: Path, c: int, size: int) -> str | None:
    """What is wrong with a chunk's file at a glance (a stat): missing or the wrong size."""
    try:
        have = chunk_file(store, c).stat().st_size
    except FileNotFoundError:
        return "is missing"
    return None if have == size else f"is {have} bytes, a chunk is {size}"


def _crc_fails(path: Path) -> bool:
    """The chunk file's last 4 bytes are not the crc32c (little-endian) of the rest."""
    import google_crc32c

    data = path.read_bytes()
    return google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little")


def _todo(run: RunDir, arr, shard: int, num_shards: int) -> list[int]:
    """This shard's chunks not done: no marker, or a marker whose chunk file is missing, not
    a chunk's size, or fails its crc32c (such a marker is removed). Reads the shard's chunk
    files once (benchmarks/fingerprint.py gives the cost); the caller holds the shard lock."""
    chunks_dir, size = run.state("embed") / "chunks", chunk_bytes(arr)
    todo = []
    for c in shard_range(chunk_count(arr), shard, num_shards):
        if not is_done(chunks_dir, f"{c:06d}"):
            todo.append(c)
            continue
        problem = chunk_file_problem(run.embeddings, c, size)
        if problem is None and _crc_fails(chunk_file(run.embeddings, c)):
            problem = "fails its crc32c check"
        if problem:
            log.warning("chunk %d is marked done but its file %s %s; redoing it", c,
                        chunk_file(run.embeddings, c), problem)
            marker(chunks_dir, f"{c:06d}").unlink(missing_ok=True)
            todo.append(c)
    return todo


def missing_chunks(run: RunDir, arr) -> list[int]:
    """Chunks without a marker, or whose file is missing or not a chunk's size (a stat per
    chunk; the crc32c is checked by whoever reads the chunk)."""
    chunks_dir, size = run.state("embed") / "chunks", chunk_bytes(arr)
    return [c for c in range(chunk_count(arr)) if not is_done(chunks_dir, f"{c:06d}")
            or chunk_file_problem(run.embeddings, c, size)]


def _embed_rows(encoder, texts: list[str], templates: list[str], on_batch) -> np.ndarray:
    """One embedding per text; with several templates, the mean of the templated texts' unit
    vectors, re-normalised (the CLIP zero-shot recipe)."""
    if templates == ["{}"]:
        return encoder.encode(texts, on_batch)
    acc = np.zeros((len(texts), encoder.dim), dtype=np.float64)
    for t in templates:
        acc += encoder.encode([t.replace("{}", x) for x in texts], on_batch)
    return (acc / np.linalg.norm(acc, axis=1, keepdims=True)).astype(np.float32)


def embed_shard(ds: Dataset, out: str | Path, shard: int = 0, num_shards: int = 1,
                config: EmbedConfig | None = None, reporter: Reporter | None = None) -> ShardResult:
    """Embed the chunks that shard `shard` of `num_shards` owns. Safe to rerun."""
    from graphbuild.encode import TextEncoder, pick_device, pick_precision
    from graphbuild.models import load_sentence_transformer, resolve_model

    config = config or EmbedConfig()
    options.embed_options(config.chunk_rows, config.token_budget, config.precision,
                          config.device)
    reporter = reporter or Reporter()
    run = RunDir(out)
    figures, refreshed = _prepare(ds, run, config.skip_bad_rows)
    n_nodes = figures["nodes"]

    device = pick_device(config.device)
    precision = pick_precision(config.precision, device)
    ref = resolve_model(config.model)
    # What we know without loading the model (dim and max_seq_length need it).
    known = {"model": ref.name, "model_revision": ref.revision, "normalized": True,
             "precision": precision, "templates": ds.manifest.templates, "dtype": "float16",
             "n_nodes": n_nodes}
    # A duplicate of this array task waits here, then finds the work done.
    with run.shard_lock("embed", shard_name(shard, num_shards)):
        arr = _existing_store(run)
        todo = None if arr is None else _todo(run, arr, shard, num_shards)
        if todo == []:  # a rerun of a finished shard: check provenance, skip the model load
            _check_provenance(run, dict(arr.attrs), known)
            provenance, encoder = dict(arr.attrs), None
        else:
            model = load_sentence_transformer(ref, device, config.trust_remote_code)
            encoder = TextEncoder(model, device, precision, config.token_budget)
            provenance = {**known, "dim": encoder.dim, "max_seq_length": encoder.max_seq_length}
            arr = _open_store(run, provenance, config.chunk_rows)
            if todo is None:
                todo = _todo(run, arr, shard, num_shards)
        rows_per_chunk, n_chunks = arr.chunks[0], chunk_count(arr)
        mine = shard_range(n_chunks, shard, num_shards)
        result = ShardResult(shard, num_shards, chunks=len(mine),
                             chunks_skipped=len(mine) - len(todo))
        log.info("embed %s: %s on %s, %s; %d of %d chunks to do (%d rows each)",
                 shard_name(shard, num_shards), ref.name, device, precision, len(todo), len(mine),
                 rows_per_chunk)

        t0 = time.perf_counter()
        result.texts_encoded = _encode_chunks(run, arr, todo, encoder, ds.manifest.templates,
                                              reporter)
        result.seconds = time.perf_counter() - t0

        stats = {k: v for k, v in asdict(result).items()
                 if k not in ("complete", "missing_chunks")}
        stats["texts_per_s"] = round(result.texts_per_s, 1)
        if todo or not is_done(run.state("embed"), shard_name(shard, num_shards)):
            mark_done(run.state("embed"), shard_name(shard, num_shards), stats)  # keep timings
        kill_point("embed.shard_marked")
    result.missing_chunks = missing_chunks(run, arr)
    result.complete = not result.missing_chunks
    _record_stage(run, figures, provenance, result, refreshed)
    return result


def _encode_chunks(run: RunDir, arr, todo: list[int], encoder, templates: list[str],
                   reporter: Reporter) -> int:
    """Encode and store each chunk of `todo`, marking each done once its data is in place."""
    rows_per_chunk, n_nodes = arr.chunks[0], arr.shape[0]
    total = sum(min(rows_per_chunk, n_nodes - c * rows_per_chunk) for c in todo) * len(templates)
    reporter.start(total, "texts")
    for c in todo:
        lo, hi = c * rows_per_chunk, min((c + 1) * rows_per_chunk, n_nodes)
        texts = read_node_texts(run.root, lo, hi)
        emb = _embed_rows(encoder, texts, templates, reporter.advance).astype(np.float16)
        _check_rows(run, emb, c, lo, texts)
        kill_point("embed.chunk_encoded")
        _remove_partial_writes(run.embeddings / "c" / str(c))
        arr[lo:hi] = emb
        kill_point("embed.chunk_written")  # data in place, marker not yet
        mark_done(run.state("embed") / "chunks", f"{c:06d}")
        return_freed_memory()  # the encoder threads' arenas: RSS stays flat over chunks
    reporter.stop()
    return total


def _check_rows(run: RunDir, rows: np.ndarray, c: int, lo: int, texts: list[str]) -> None:
    """Refuse a chunk's rows (as stored, fp16) unless each is finite with norm 1 +- 0.01."""
    x = rows.astype(np.float32)
    norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero(~(np.abs(norms - 1) <= NORM_TOLERANCE))
    if not len(bad):
        return
    i = int(bad[0])
    what = "non-finite values" if not np.isfinite(x[i]).all() else f"norm {norms[i]:.4f}"
    text = texts[i] if len(texts[i]) <= 60 else texts[i][:57] + "..."
    raise GraphbuildError(f"{run.embeddings}: chunk {c}: node {lo + i} ({text!r}) embeds to a "
                          f"vector with {what} ({len(bad)} such rows in the chunk), not a "
                          f"finite unit vector; chunk {c} is not written or marked done")


def _remove_partial_writes(folder: Path) -> None:
    """zarr writes a file to a temp beside it and renames it; a killed writer leaves the temp.
    Callers hold the lock of whatever writes in `folder`, so any temp there is stale."""
    for tmp in folder.glob("*.partial"):
        tmp.unlink(missing_ok=True)


def _record_stage(run: RunDir, figures: dict, provenance: dict, result: ShardResult,
                  refreshed: dict) -> None:
    """Fold this shard into run.json (with the dataset record's refreshed entries, see
    _prepare); the stage is 'done' once every chunk is."""
    shard_stats = [read_json(p) for p in sorted(run.state("embed").glob("shard-*.done"))]
    seconds = sum(s.get("seconds", 0.0) for s in shard_stats)
    encoded = sum(s.get("texts_encoded", 0) for s in shard_stats)

    def change(info: dict) -> None:
        _apply_refresh(info, {**refreshed, "templates": provenance["templates"]})
        info.setdefault("stages", {})["embed"] = {
            "status": "done" if result.complete else "partial",
            "texts": figures["samples"], "nodes": figures["nodes"],
            "duplicates": figures["duplicates"],
            "chunks_missing": len(result.missing_chunks),
            "texts_encoded": encoded, "seconds": round(seconds, 2),
            "texts_per_s": round(encoded / seconds, 1) if seconds else None,
            "model": provenance["model"], "model_revision": provenance["model_revision"],
            "precision": provenance["precision"], "dim": provenance["dim"],
            "num_shards_last": result.num_shards,
        }

    run.update_run(change)


def embeddings_status(out: str | Path) -> tuple[dict, list[int]]:
    """(provenance attributes, missing chunk ids) of a run's store; raises if there is none."""
    import zarr

    run = RunDir(out)
    if not (run.embeddings / "zarr.json").exists():
        raise GraphbuildError(f"{run.root}: no embeddings.zarr; run `graphbuild embed` first")
    arr = zarr.open_array(str(run.embeddings), mode="r")
    return dict(arr.attrs), missing_chunks(run, arr)
