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
provenance is), examples, the manifest's path. With `append` (embedding/append.py), source
files after the recorded ones are appended instead: the store grows, only new chunks (and
the one chunk that gains rows) are encoded.

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

import itertools
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graphbuild import options
from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point
from graphbuild.memory import return_freed_memory
from graphbuild.progress import Reporter
from graphbuild.rundir.files import is_done, mark_done, marker, read_json, write_json
from graphbuild.rundir.paths import PROVENANCE_KEYS, RunDir
from graphbuild.rundir.store import StoredRows, StoreError, unit_norm_misses
from graphbuild.shards import shard_name, shard_range

if TYPE_CHECKING:
    from graphbuild.prepare.manifest import Dataset

log = logging.getLogger(__name__)
APPENDED_AT = "appended_at"  # store attribute: the first row of each append, in order


@dataclass
class EmbedConfig:
    """How embed_shard embeds; the defaults are graphbuild/options.py's."""
    model: str = options.MODEL
    device: str = "auto"
    precision: str = "auto"
    token_budget: int | None = None
    chunk_rows: int = options.CHUNK_ROWS
    skip_bad_rows: bool = False
    trust_remote_code: bool = False
    append: bool = False  # new source files are appended (prepare/append.py), not refused


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


def _open_for_writing(run: RunDir, provenance: dict, chunk_rows: int):
    """Open the store for writing, or create it; refuse one whose provenance differs from
    ours."""
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


def _todo(run: RunDir, shard: int, num_shards: int) -> list[int]:
    """This shard's chunks not done: no marker, or a marker whose chunk file is missing, not
    a chunk's size, or fails its crc32c (such a marker is removed). Reads the shard's chunk
    files once (benchmarks/fingerprint.py gives the cost); the caller holds the shard lock."""
    store = StoredRows(run.embeddings)
    chunks_dir = run.state("embed") / "chunks"
    todo = []
    for c in shard_range(store.n_chunks, shard, num_shards):
        if not is_done(chunks_dir, f"{c:06d}"):
            todo.append(c)
            continue
        try:
            store.check(c)
        except StoreError as e:
            log.warning("%s: %s, though marked done; redoing it", e.file, e.what)
            marker(chunks_dir, f"{c:06d}").unlink(missing_ok=True)
            todo.append(c)
    return todo


def missing_chunks(run: RunDir, store: StoredRows) -> list[int]:
    """Chunks without a marker, or whose file is missing or not a chunk's size (a stat per
    chunk; the crc32c is checked by whoever reads the chunk)."""
    chunks_dir = run.state("embed") / "chunks"
    return [c for c in range(store.n_chunks) if not is_done(chunks_dir, f"{c:06d}")
            or store.file_problem(c)]


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
    # prepare (polars) is imported here, not at the top: knn imports this module for
    # embeddings_status and reads no tables.
    from graphbuild.embedding.encode import TextEncoder, pick_device, pick_precision
    from graphbuild.embedding.models import load_sentence_transformer, resolve_model
    from graphbuild.prepare.stage import _prepare

    config = config or EmbedConfig()
    options.embed_options(config.chunk_rows, config.token_budget, config.precision,
                          config.device)
    reporter = reporter or Reporter()
    run = RunDir(out)
    device = pick_device(config.device)
    precision = pick_precision(config.precision, device)
    ref = resolve_model(config.model)
    # What we know without loading the model (dim and max_seq_length need it).
    known = {"model": ref.name, "model_revision": ref.revision, "normalized": True,
             "precision": precision, "templates": ds.manifest.templates, "dtype": "float16"}
    if config.append:
        from graphbuild.embedding.append import append_to_run

        append_to_run(ds, run, known, config.skip_bad_rows)
    figures, refreshed = _prepare(ds, run, config.skip_bad_rows)
    n_nodes = known["n_nodes"] = figures["nodes"]
    grow_store(run, n_nodes)  # after an append, also one cut short before the store grew
    # A duplicate of this array task waits here, then finds the work done.
    with run.shard_lock("embed", shard_name(shard, num_shards)):
        arr = _existing_store(run)
        todo = None if arr is None else _todo(run, shard, num_shards)
        if todo == []:  # a rerun of a finished shard: check provenance, skip the model load
            _check_provenance(run, dict(arr.attrs), known)
            provenance, encoder = dict(arr.attrs), None
        else:
            model = load_sentence_transformer(ref, device, config.trust_remote_code)
            encoder = TextEncoder(model, device, precision, config.token_budget)
            provenance = {**known, "dim": encoder.dim, "max_seq_length": encoder.max_seq_length}
            arr = _open_for_writing(run, provenance, config.chunk_rows)
            if todo is None:
                todo = _todo(run, shard, num_shards)
        store = StoredRows(run.embeddings)
        rows_per_chunk = store.chunk_rows
        mine = shard_range(store.n_chunks, shard, num_shards)
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
    result.missing_chunks = missing_chunks(run, store)
    result.complete = not result.missing_chunks
    _record_stage(run, figures, provenance, result, refreshed)
    return result


def _encode_chunks(run: RunDir, arr, todo: list[int], encoder, templates: list[str],
                   reporter: Reporter) -> int:
    """Encode and store each chunk of `todo`, marking each done once its data is in place;
    return the texts encoded. A chunk is encoded from its own texts alone, in segments split
    where an append began (APPENDED_AT), so a chunk an append grew keeps its old rows' bits;
    a segment its file holds already (`_encoded`) is kept, not encoded again."""
    from graphbuild.prepare.texts import read_node_texts

    rows_per_chunk, n_nodes = arr.chunks[0], arr.shape[0]
    starts = arr.attrs.get(APPENDED_AT, [])
    plan = {}  # chunk -> its segments, and its rows as stored where an append split it
    for c in todo:
        lo, hi = c * rows_per_chunk, min((c + 1) * rows_per_chunk, n_nodes)
        cuts = [0, *(s - lo for s in starts if lo < s < hi), hi - lo]
        plan[c] = list(itertools.pairwise(cuts)), _stored_rows(run, c) if len(cuts) > 2 else None
    total = sum(b - a for segments, stored in plan.values() for a, b in segments
                if not _encoded(stored, a, b)) * len(templates)
    reporter.start(total, "texts")
    for c in todo:
        lo, hi = c * rows_per_chunk, min((c + 1) * rows_per_chunk, n_nodes)
        texts = read_node_texts(run.root, lo, hi)
        segments, stored = plan.pop(c)
        emb = np.concatenate([
            stored[a:b] if _encoded(stored, a, b) else
            _embed_rows(encoder, texts[a:b], templates, reporter.advance).astype(np.float16)
            for a, b in segments])
        _check_rows(run, emb, c, lo, texts)
        kill_point("embed.chunk_encoded")
        _remove_partial_writes(run.embeddings / "c" / str(c))
        arr[lo:hi] = emb
        kill_point("embed.chunk_written")  # data in place, marker not yet
        mark_done(run.state("embed") / "chunks", f"{c:06d}")
        return_freed_memory()  # the encoder threads' arenas: RSS stays flat over chunks
    reporter.stop()
    return total


def _stored_rows(run: RunDir, c: int) -> np.ndarray | None:
    """Chunk c's rows as its file holds them (crc32c checked), or None if it does not read."""
    try:
        return StoredRows(run.embeddings).chunk(c)
    except StoreError:
        return None


def _encoded(stored: np.ndarray | None, a: int, b: int) -> bool:
    """Rows a..b-1 of a chunk an append grew are in its file already: every one of unit norm.
    The file is the chunk as last written whole (zarr replaces a chunk file at once), so its
    rows are each an encoding of its segment or the zero fill past the rows of that time;
    a segment encoded again gives the same bits, so this only saves the work."""
    return stored is not None and not len(unit_norm_misses(stored[a:b])[1])


def grow_store(run: RunDir, n_nodes: int) -> None:
    """Grow the store to `n_nodes` rows after an append to the tables: when it holds fewer rows
    and run.json records an append that began at its row count. The chunk that gains rows
    loses its marker first (its new rows are to encode), then zarr.json gets the new shape,
    n_nodes and the append's first row (APPENDED_AT) in one atomic write. Anything else is
    left for the provenance check to refuse."""
    from graphbuild.prepare.append import APPENDS
    from graphbuild.rundir.paths import store_attrs
    from graphbuild.rundir.store import read_zarr_json

    with run.lock():
        attrs = store_attrs(run.root)
        have = None if attrs is None else attrs.get("n_nodes")
        appends = (run.read_run().get("dataset") or {}).get(APPENDS, [])
        if have is None or have >= n_nodes or have not in [a["nodes_before"] for a in appends]:
            return
        meta = read_zarr_json(run.embeddings)
        rows_per_chunk = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        if have % rows_per_chunk:
            marker(run.state("embed") / "chunks", f"{have // rows_per_chunk:06d}").unlink(
                missing_ok=True)
            kill_point("append.chunk_unmarked")
        meta["shape"][0] = n_nodes
        meta["attributes"].update(n_nodes=n_nodes,
                                  **{APPENDED_AT: [*attrs.get(APPENDED_AT, []), have]})
        write_json(run.embeddings / "zarr.json", meta)
        kill_point("append.store_grown")
        log.info("%s: grown from %d to %d rows; the new rows are to embed", run.embeddings,
                 have, n_nodes)


def _check_rows(run: RunDir, rows: np.ndarray, c: int, lo: int, texts: list[str]) -> None:
    """Refuse a chunk's rows (as stored, fp16) unless each is finite with norm 1 +- 0.01."""
    norms, bad = unit_norm_misses(rows)
    if not len(bad):
        return
    i = int(bad[0])
    what = "non-finite values" if not np.isfinite(rows[i]).all() else f"norm {norms[i]:.4f}"
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
    from graphbuild.prepare.stage import _apply_refresh

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
    run = RunDir(out)
    if not (run.embeddings / "zarr.json").exists():
        raise GraphbuildError(f"{run.root}: no embeddings.zarr; run `graphbuild embed` first")
    store = StoredRows(run.embeddings)
    return store.attrs, missing_chunks(run, store)
