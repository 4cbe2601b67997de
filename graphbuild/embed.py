"""The embed stage: a dataset's nodes to unit-norm fp16 vectors in embeddings.zarr.

Work is cut into row chunks of the Zarr array. Shard s of n owns a contiguous run of chunks,
writes only those, and marks each chunk done after its data is written (zarr writes each
chunk file through a temp file and a rename). A rerun skips chunks already marked, so a
killed or preempted shard loses at most the chunk it was on. Each chunk is encoded from its
own texts only, so the stored bits do not depend on the shard count or on restarts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point
from graphbuild.manifest import Dataset
from graphbuild.memory import return_freed_memory
from graphbuild.models import DEFAULT_MODEL
from graphbuild.progress import Reporter
from graphbuild.shards import shard_name, shard_range
from graphbuild.storage import (
    PROVENANCE_KEYS,
    RunDir,
    is_done,
    mark_done,
    read_json,
    write_json,
)
from graphbuild.texts import build_tables, read_node_texts

log = logging.getLogger(__name__)

CHUNK_ROWS = 8192  # 6 MiB of fp16 at d=384: small enough for cheap random row reads


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
    """Make sure the run holds this dataset's nodes and samples tables; return its figures.

    Under the run lock, so the first array task builds the tables and the others wait and
    reuse them. Refuses a run directory that holds another dataset or other inputs.
    """
    with run.lock():
        info = run.read_run()
        fingerprint = ds.fingerprint()
        have = info.get("dataset")
        if have and have.get("name") != ds.name:
            raise GraphbuildError(f"{run.root}: holds dataset {have.get('name')!r}, not "
                                  f"{ds.name!r}; choose another --out")
        if have and have.get("fingerprint") != fingerprint:
            raise GraphbuildError(f"{run.root}: was built from other inputs for {ds.name!r} "
                                  "(the manifest or a source file changed); choose another --out")
        if have and run.samples.exists():
            return have["figures"]
        t0 = time.perf_counter()
        figures = build_tables(ds, run.root, skip_bad_rows)
        kill_point("embed.tables_written")
        info["dataset"] = {
            "name": ds.name, "manifest": str(ds.path), "fingerprint": fingerprint,
            "source_files": [str(f) for f in ds.source_files()],
            "templates": ds.manifest.templates, "figures": figures.as_dict(),
        }
        if ds.manifest.examples:
            info["dataset"]["examples"] = ds.manifest.examples
        write_json(run.run_json, info)
        log.info("%s: %d samples, %d unique texts (%d duplicates) in %.1fs", ds.name,
                 figures.samples, figures.nodes, figures.duplicates, time.perf_counter() - t0)
        return figures.as_dict()


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
    """A read-only view of embeddings.zarr whose reads turn a chunk failing its crc32c into a
    one-line error naming the chunk's file, instead of a codec traceback."""

    def __init__(self, path: Path):
        import zarr

        self.path = path
        self.arr = zarr.open_array(str(path), mode="r")
        self.shape, self.chunks, self.dtype = self.arr.shape, self.arr.chunks, self.arr.dtype
        self.attrs = self.arr.attrs

    def __getitem__(self, key):
        try:
            return self.arr[key]
        except ValueError as e:
            if "checksum" not in str(e):
                raise
            raise GraphbuildError(self._culprit(key)) from None

    def _culprit(self, key) -> str:
        rows = self.chunks[0]
        span = key[0] if isinstance(key, tuple) else key
        if not isinstance(span, slice):
            span = slice(None)
        lo, hi, _ = span.indices(self.shape[0])
        for c in range(lo // rows, -(-hi // rows)):
            try:
                self.arr[c * rows:(c + 1) * rows]
            except ValueError:
                return (f"{self.path}/c/{c}/0: chunk {c} fails its crc32c check, it is corrupt; "
                        f"delete _state/embed/chunks/{c:06d}.done and rerun `graphbuild embed`")
        return f"{self.path}: a chunk of rows {lo}-{hi} fails its crc32c check"


def chunk_count(arr) -> int:
    return -(-arr.shape[0] // arr.chunks[0])


def _todo(arr, chunks_dir: Path, shard: int, num_shards: int) -> list[int]:
    """This shard's chunks not yet marked done."""
    mine = shard_range(chunk_count(arr), shard, num_shards)
    return [c for c in mine if not is_done(chunks_dir, f"{c:06d}")]


def missing_chunks(run: RunDir, n_chunks: int) -> list[int]:
    chunks_dir = run.state("embed") / "chunks"
    return [c for c in range(n_chunks) if not is_done(chunks_dir, f"{c:06d}")]


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
    reporter = reporter or Reporter()
    run = RunDir(out)
    figures = prepare(ds, run, config.skip_bad_rows)
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
        chunks_dir = run.state("embed") / "chunks"
        arr = _existing_store(run)
        todo = None if arr is None else _todo(arr, chunks_dir, shard, num_shards)
        if todo == []:  # a rerun of a finished shard: check provenance, skip the model load
            _check_provenance(run, dict(arr.attrs), known)
            provenance, encoder = dict(arr.attrs), None
        else:
            model = load_sentence_transformer(ref, device, config.trust_remote_code)
            encoder = TextEncoder(model, device, precision, config.token_budget)
            provenance = {**known, "dim": encoder.dim, "max_seq_length": encoder.max_seq_length}
            arr = _open_store(run, provenance, config.chunk_rows)
            todo = _todo(arr, chunks_dir, shard, num_shards)
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
    result.missing_chunks = missing_chunks(run, n_chunks)
    result.complete = not result.missing_chunks
    _record_stage(run, figures, provenance, result)
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
        emb = _embed_rows(encoder, texts, templates, reporter.advance)
        kill_point("embed.chunk_encoded")
        _remove_partial_writes(run.embeddings / "c" / str(c))
        arr[lo:hi] = emb.astype(np.float16)
        kill_point("embed.chunk_written")  # data in place, marker not yet
        mark_done(run.state("embed") / "chunks", f"{c:06d}")
        return_freed_memory()  # the encoder threads' arenas: RSS stays flat over chunks
    reporter.stop()
    return total


def _remove_partial_writes(folder: Path) -> None:
    """zarr writes a file to a temp beside it and renames it; a killed writer leaves the temp.
    Callers hold the lock of whatever writes in `folder`, so any temp there is stale."""
    for tmp in folder.glob("*.partial"):
        tmp.unlink(missing_ok=True)


def _record_stage(run: RunDir, figures: dict, provenance: dict, result: ShardResult) -> None:
    """Fold this shard into run.json; the stage is 'done' once every chunk is."""
    shard_stats = [read_json(p) for p in sorted(run.state("embed").glob("shard-*.done"))]
    seconds = sum(s.get("seconds", 0.0) for s in shard_stats)
    encoded = sum(s.get("texts_encoded", 0) for s in shard_stats)

    def change(info: dict) -> None:
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
    return dict(arr.attrs), missing_chunks(run, chunk_count(arr))
