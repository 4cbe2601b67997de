"""The export stage: a run's soft-target payload, one sidecar per WebDataset tar.

`export_shard(run, like, out, payload, shard, num_shards)` writes, for each tar that shard
`shard` of `num_shards` owns (a contiguous run of SHARDS' tars in name order), `out/NAME.parquet`
(rundir/sidecar.py): the tar's keys in order, each key's node in the run (through the run's
sample ids, the manifest's id_column), and the payload of that node's stored row. A key the run
holds no sample for (a skipped row, an image the run never saw) has a null node and payload;
it never shifts another row, and is counted.

Before any tar: the tars exist, the store is complete and of the run's tables, the payload
fits the store, `out/_meta.json` (if any) is of this run and payload, and the first tar's
first keys are sample ids of the run. Then, once per directory and under its lock: the PCA
basis (pca-N), `_meta.json`, and the samples index (sidecars/index.py). Then, through the
index, every tar still to export has a sample of the run among its first keys (a foreign tar
is refused before any sidecar is written). Then each tar: keys,
nodes, the rows gathered from the store (StoredRows, memory-mapped, each chunk's crc32c
checked once), the sidecar written atomically, and a done marker after it
(`out/_state/export/NAME.tar.done`) recording the tar's size and mtime, the sidecar's bytes,
the run's id and the payload. A rerun skips a tar only when its marker still vouches for all
of that, so a killed or preempted export resumes, and a tar replaced since is exported again.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphbuild.errors import GraphbuildError
from graphbuild.faults import kill_point
from graphbuild.progress import Reporter
from graphbuild.rundir.files import mark_done, marker, read_json, write_json
from graphbuild.rundir.locks import file_lock
from graphbuild.rundir.paths import RunDir
from graphbuild.rundir.samples import check_store_matches_tables
from graphbuild.rundir.sidecar import (
    FORMAT,
    META,
    PCA_FILE,
    VERSION,
    Payload,
    RunIdentity,
    check_identity,
    dir_meta,
    run_identity,
    sidecar_name,
    write_sidecar,
)
from graphbuild.rundir.store import StoredRows
from graphbuild.shards import shard_name, shard_range
from graphbuild.sidecars.index import SamplesIndex, any_sample, ensure_index, index_dir
from graphbuild.sidecars.payloads import encode, fit_basis, load_basis, save_basis
from graphbuild.sidecars.tars import list_tars, tar_keys

log = logging.getLogger(__name__)

PROBE_KEYS = 64  # the first tar's first keys, looked up before any work


@dataclass
class ExportResult:
    """What one export_shard call did; `complete`: every tar of SHARDS has its sidecar."""
    shard: int
    num_shards: int
    out: Path
    payload: str
    run_id: str
    tars: int = 0
    tars_exported: int = 0
    tars_skipped: int = 0
    samples: int = 0
    missing: int = 0
    bytes: int = 0
    seconds: float = 0.0
    complete: bool = False

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def state_dir(out: Path) -> Path:
    return out / "_state" / "export"


def export_shard(run: str | Path, like: str | Path, out: str | Path, payload: str,
                 shard: int = 0, num_shards: int = 1, overwrite: bool = False,
                 reporter: Reporter | None = None) -> ExportResult:
    """Export the sidecars of shard `shard`'s tars (module docstring). Safe to rerun."""
    run, like, out = Path(run), Path(like), Path(out)
    reporter = reporter or Reporter()
    t0 = time.perf_counter()
    tars = list_tars(like)
    if out.resolve() == like.resolve():
        raise GraphbuildError(f"--out {out} is --like: give the sidecars a directory of their "
                              "own (img2dataset keeps a NAME.parquet of its own beside NAME.tar)")
    rows = _complete_store(run)
    spec = Payload.parse(payload, rows.shape[1])
    ident = run_identity(run)
    _probe(tars[0], run)
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / ".lock"):
        basis = _directory(out, run, like, rows, spec, ident, overwrite)
        index = SamplesIndex(ensure_index(run, out, ident.run_id))
    ours = shard_range(len(tars), shard, num_shards)
    mine = tars[ours.start:ours.stop]
    result = ExportResult(shard, num_shards, out, spec.spec, ident.run_id, tars=len(mine))
    with file_lock(state_dir(out) / f"{shard_name(shard, num_shards)}.lock"):
        todo = {t for t in mine if not _vouched(out, t, spec, ident.run_id)}
        _probe_each(sorted(todo), index, run)
        reporter.start(len(mine), "tars")
        for tar in mine:
            if tar not in todo:
                result.tars_skipped += 1
            else:
                n, missing, size = _export_tar(out, tar, index, rows, spec, basis, ident)
                result.tars_exported += 1
                result.samples += n
                result.missing += missing
                result.bytes += size
            reporter.advance(1)
        reporter.stop()
    result.complete = all(_vouched(out, t, spec, ident.run_id) for t in tars)
    result.seconds = time.perf_counter() - t0
    return result


def _complete_store(run: Path) -> StoredRows:
    """The run's store, memory-mapped, refused unless every chunk is done and it is of the
    run's tables."""
    from graphbuild.embedding.stage import missing_chunks

    rd = RunDir(run)
    if not rd.run_json.is_file():
        raise GraphbuildError(f"{rd.run_json}: missing; RUN must be a graphbuild run directory")
    rows = StoredRows(rd.embeddings, mmap=True)
    missing = missing_chunks(rd, rows)
    if missing:
        raise GraphbuildError(f"{rd.embeddings}: {len(missing)} chunks not done (first: "
                              f"{missing[0]}); finish `graphbuild embed` first")
    check_store_matches_tables(run, rows)
    return rows


def _directory(out: Path, run: Path, like: Path, rows: StoredRows, payload: Payload,
               ident: RunIdentity, overwrite: bool) -> np.ndarray | None:
    """Make `out/_meta.json` say this run and payload (fitting the PCA basis first when the
    payload needs one); refuse a directory of another run or payload unless `overwrite`.
    Returns the PCA basis, or None."""
    path = out / META
    have = read_json(path)
    if have:
        problem = _mismatch(have, payload, ident, path)
        if problem is None:
            if payload.kind != "pca":
                return None
            return load_basis(out / PCA_FILE, have["pca"]["sha256"], payload, rows.shape[1])
        if not overwrite:
            raise GraphbuildError(f"{problem}; choose another --out, or --overwrite to replace "
                                  "its sidecars")
        log.warning("%s; replacing the directory's export (--overwrite)", problem)
        _clear(out)
    basis = sha = None
    if payload.kind == "pca":
        basis = fit_basis(rows, payload.dim)
        sha = save_basis(out / PCA_FILE, basis)
    write_json(path, dir_meta(payload, ident, rows.shape[1], run.resolve(), like.resolve(), sha))
    return basis


def _mismatch(have: dict, payload: Payload, ident: RunIdentity, path: Path) -> str | None:
    """Why an existing directory is not this export's, or None."""
    if have.get("format") != FORMAT or have.get("version") != VERSION:
        return f"{path}: not a {FORMAT} {VERSION} directory"
    if have.get("payload") != payload.spec or have.get("dim") != payload.dim:
        return (f"{path}: holds payload {have.get('payload')} (dim {have.get('dim')}), not "
                f"{payload.spec} (dim {payload.dim})")
    try:
        check_identity(have, ident, path)
    except GraphbuildError as e:
        return str(e).split("; export this run")[0]
    return None


def _clear(out: Path) -> None:
    """Forget an export of another run or payload: its markers, metadata, basis and index.
    Its sidecars stay until rewritten; any left are refused by readers (another run id)."""
    shutil.rmtree(state_dir(out), ignore_errors=True)
    shutil.rmtree(index_dir(out), ignore_errors=True)
    (out / PCA_FILE).unlink(missing_ok=True)
    (out / META).unlink(missing_ok=True)


def _probe(tar: Path, run: Path) -> None:
    """Refuse tars keyed by something other than the run's sample ids, before any work."""
    keys = tar_keys(tar, limit=PROBE_KEYS)
    if keys and not any_sample(run, keys):
        raise GraphbuildError(
            f"{tar}: none of its first {len(keys)} keys (e.g. {keys[0]!r}) is a sample id of "
            f"{run}; the run's manifest must take the tars' keys as its id_column")


def _probe_each(tars: list[Path], index: SamplesIndex, run: Path) -> None:
    """Refuse, before any tar is exported, a tar none of whose first keys is a sample of the
    run (a foreign shard dropped among the dataset's)."""
    for tar in tars:
        keys = tar_keys(tar, limit=PROBE_KEYS)
        if keys and not (index.nodes(keys) >= 0).any():
            raise GraphbuildError(
                f"{tar}: none of its first {len(keys)} keys (e.g. {keys[0]!r}) is a sample id "
                f"of {run}; it is not a shard of the run's dataset: move it out of --like")


def _vouched(out: Path, tar: Path, payload: Payload, run_id: str) -> bool:
    """The tar's marker still vouches for its sidecar: same tar (size, mtime), sidecar of
    the recorded size, same run and payload."""
    record = read_json(marker(state_dir(out), tar.name))
    if not record:
        return False
    side = out / sidecar_name(tar.name)
    try:
        st, size = tar.stat(), side.stat().st_size
    except FileNotFoundError:
        return False
    return (record.get("tar_bytes"), record.get("tar_mtime_ns"), record.get("bytes"),
            record.get("run_id"), record.get("payload")) == (
        st.st_size, st.st_mtime_ns, size, run_id, payload.spec)


def _export_tar(out: Path, tar: Path, index: SamplesIndex, rows: StoredRows, payload: Payload,
                basis: np.ndarray | None, ident: RunIdentity) -> tuple[int, int, int]:
    """Write one tar's sidecar, then its marker; (samples, samples without one, bytes)."""
    st = tar.stat()
    keys = tar_keys(tar)
    nodes = index.nodes(keys)
    have = nodes >= 0
    if have.any() and nodes.max() >= rows.shape[0]:
        raise GraphbuildError(f"{index.path}: node {nodes.max()} is not a row of the store; "
                              "delete the index directory to have it rebuilt")
    stored = np.zeros((len(keys), rows.shape[1]), np.float16)
    stored[have] = rows.gather(nodes[have])
    values, scale = encode(payload, stored, basis)
    file_meta = {"format": FORMAT, "version": VERSION, "payload": payload.spec,
                 "dim": payload.dim, "run_id": ident.run_id, "tar": tar.name,
                 "samples": len(keys)}
    size = write_sidecar(out / sidecar_name(tar.name), payload, file_meta, keys, nodes, values,
                         scale)
    kill_point("export.sidecar_written")
    missing = int((~have).sum())
    if missing:
        log.info("%s: %d of %d samples have no sample in the run", tar.name, missing, len(keys))
    mark_done(state_dir(out), tar.name, {
        "samples": len(keys), "missing": missing, "bytes": size, "tar_bytes": st.st_size,
        "tar_mtime_ns": st.st_mtime_ns, "run_id": ident.run_id, "payload": payload.spec})
    return len(keys), missing, size
