"""WebDataset sidecars: each tar's soft-target payload, in the tar's sample order, beside it.

`graphbuild export RUN --like SHARDS --out DIR` writes them (graphbuild/sidecars/); the trainer
reads them in its webdataset stream (graphbuild/xclr/stream.py), with no store on the node.
Light: numpy, pyarrow and google-crc32c, like the rest of rundir.

  DIR/_meta.json    format, version, payload spec and its dims, the store's provenance
                    (paths.PROVENANCE_KEYS) and the run's id (`RunIdentity`); written before
                    any sidecar, so every sidecar of DIR is of one run and one payload
  DIR/NAME.parquet  for SHARDS/NAME.tar: one row per sample of the tar, in the tar's order:
                    key string, node int64 (null: the run holds no sample with that key), the
                    payload (null with node). One row group; Parquet page checksums, verified
                    by every reader. Its schema metadata repeats run id, payload and the tar's
                    name, so a file copied in from another export is refused.
  DIR/_pca.npy      pca-N only: the (store dim, N) float32 basis the rows were projected on
  DIR/_index/, DIR/_state/   the export's own (the samples index, done markers)

Payloads (`Payload`), with their columns:
  fp16    embedding        fixed_size_list<float16>[d]: the stored row, bit for bit
  int8    embedding_int8   fixed_size_binary[d], the d int8 values q, and scale float32:
                           row ~ q * scale (binary, not a list of int8: Parquet would store
                           each int8 in 4 bytes and the payload would shrink by 25%, not 50%)
  pca-N   embedding_pca    fixed_size_list<float16>[N]: the stored row projected on the top N
                           principal axes of the store (uncentred: they keep inner products)
The trainer renormalises every row before its product, so targets use only directions.

In the stream a sample's payload travels as one row of `Payload.row_bytes` bytes (a uint8
array): its node (int64 little-endian, -1 for none), then the payload's bytes as stored
(float16 or int8 values, and for int8 the float32 scale); `unpack` reads a batch of them.

The run's id is "<P>-<R>": P, 16 hex of the sha256 of the store's provenance; R, 16 hex of
the sha256 of the run's tables' record in run.json (dataset name, reading settings, source
files' sha256 and sizes, figures) and of every chunk's stored crc32c. Two runs share an id
only when they hold the same samples, nodes and stored bits; a trainer that names its run
(the directory, or this id) is refused a sidecar of another run or provenance.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from graphbuild.errors import GraphbuildError
from graphbuild.rundir.files import atomic_path, read_json
from graphbuild.rundir.paths import PROVENANCE_KEYS, RunDir
from graphbuild.rundir.store import StoredRows

FORMAT = "graphbuild-sidecar"
VERSION = 1
META = "_meta.json"
PCA_FILE = "_pca.npy"
FILE_KEY = b"graphbuild.sidecar"  # the Parquet schema metadata key of each sidecar
PAGE_CHECKS = {"page_checksum_verification": True}
NODE_BYTES = 8
RUN_ID = re.compile(r"[0-9a-f]{16}-[0-9a-f]{16}")
PAYLOAD_SPEC = re.compile(r"fp16|int8|pca-([1-9][0-9]*)")


@dataclass(frozen=True)
class Payload:
    """What a sidecar row holds: kind "fp16", "int8" or "pca", and `dim` values per row."""
    kind: str
    dim: int

    @classmethod
    def parse(cls, spec: str, store_dim: int | None = None) -> Payload:
        """'fp16' | 'int8' | 'pca-N' (1 <= N < the store's dim) for a store of `store_dim`."""
        m = PAYLOAD_SPEC.fullmatch(spec) if isinstance(spec, str) else None
        if m is None:
            raise GraphbuildError(f"--payload must be fp16, int8 or pca-N (N >= 1), got {spec!r}")
        if m.group(1) is None:
            return cls(spec, store_dim or 0)
        n = int(m.group(1))
        if store_dim is not None and n >= store_dim:
            raise GraphbuildError(f"--payload {spec}: N must be below the store's dim "
                                  f"{store_dim} (fp16 keeps every dim exactly)")
        return cls("pca", n)

    @property
    def spec(self) -> str:
        return f"pca-{self.dim}" if self.kind == "pca" else self.kind

    @property
    def column(self) -> str:
        return {"fp16": "embedding", "int8": "embedding_int8", "pca": "embedding_pca"}[self.kind]

    @property
    def column_type(self) -> pa.DataType:
        if self.kind == "int8":
            return pa.binary(self.dim)
        return pa.list_(pa.float16(), self.dim)

    @property
    def value_dtype(self) -> np.dtype:
        return np.dtype(np.int8 if self.kind == "int8" else np.float16)

    @property
    def row_bytes(self) -> int:
        """A sample's bytes in the stream: node, values, and int8's scale."""
        scale = 4 if self.kind == "int8" else 0
        return NODE_BYTES + self.dim * self.value_dtype.itemsize + scale

    def schema(self, file_meta: dict | None = None) -> pa.Schema:
        fields = [("key", pa.string()), ("node", pa.int64()), (self.column, self.column_type)]
        if self.kind == "int8":
            fields.append(("scale", pa.float32()))
        meta = {FILE_KEY: json.dumps(file_meta, sort_keys=True)} if file_meta else None
        return pa.schema(fields, metadata=meta)


@dataclass(frozen=True)
class RunIdentity:
    """A run's store provenance and id (module docstring)."""
    provenance: dict
    run_id: str

    @property
    def provenance_id(self) -> str:
        return self.run_id.split("-")[0]


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:16]


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()


def provenance_id(provenance: dict) -> str:
    return _digest(_canonical({k: provenance[k] for k in PROVENANCE_KEYS}))


def run_identity(run: str | Path) -> RunIdentity:
    """The identity of a finished run: reads run.json, the store's zarr.json and each chunk
    file's last 4 bytes (its crc32c), no rows."""
    rd = RunDir(run)
    rows = StoredRows(rd.embeddings)
    missing = [k for k in PROVENANCE_KEYS if k not in rows.attrs]
    if missing:
        raise GraphbuildError(f"{rd.embeddings}: provenance incomplete, attrs lack {missing[0]}; "
                              "embed again into a new --out")
    provenance = {k: rows.attrs[k] for k in PROVENANCE_KEYS}
    dataset = rd.read_run().get("dataset") or {}
    files = dataset.get("source_files")
    if "reading" not in dataset or not isinstance(files, list) or any(
            not isinstance(f, dict) or "sha256" not in f for f in files):
        raise GraphbuildError(f"{rd.run_json}: records no content hashes of the run's sources; "
                              "rerun `graphbuild embed` on it once to record them")
    tables = {"name": dataset.get("name"), "reading": dataset["reading"],
              "sources": [[f["sha256"], f["bytes"]] for f in files],
              "figures": dataset.get("figures")}
    crcs = b"".join(rows.stored_crc(c) for c in range(rows.n_chunks))
    prov = provenance_id(provenance)
    return RunIdentity(provenance, f"{prov}-{_digest(_canonical(tables), crcs)}")


def expected_identity(run: str | Path | RunIdentity) -> RunIdentity | str:
    """What a trainer names as its run: a RunIdentity, a run directory, or a run id string
    (returned as is)."""
    if isinstance(run, RunIdentity):
        return run
    if isinstance(run, str) and RUN_ID.fullmatch(run) and not Path(run).exists():
        return run
    if not Path(run).is_dir():
        raise GraphbuildError(f"run={run!r}: neither a run directory nor a run id "
                              "(`graphbuild export` prints it, DIR/_meta.json holds it)")
    return run_identity(run)


def dir_meta(payload: Payload, ident: RunIdentity, store_dim: int, run: Path, like: Path,
             pca_sha256: str | None = None) -> dict:
    """DIR/_meta.json's content for an export."""
    meta = {"format": FORMAT, "version": VERSION, "payload": payload.spec, "dim": payload.dim,
            "store_dim": store_dim, "run_id": ident.run_id, "provenance": ident.provenance,
            "run": str(run), "shards": str(like)}
    if pca_sha256 is not None:
        meta["pca"] = {"file": PCA_FILE, "sha256": pca_sha256}
    return meta


def read_dir_meta(out: str | Path) -> dict:
    """DIR/_meta.json, checked to be a sidecar directory's of this format."""
    path = Path(out) / META
    meta = read_json(path)
    if not meta:
        raise GraphbuildError(f"{path}: missing; {out} is not a finished `graphbuild export` "
                              "directory")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise GraphbuildError(f"{path}: format {meta.get('format')!r} version "
                              f"{meta.get('version')!r}, not {FORMAT} {VERSION}")
    return meta


def meta_payload(meta: dict, where: Path) -> Payload:
    payload = Payload.parse(meta.get("payload"), meta.get("store_dim"))
    if payload.dim != meta.get("dim"):
        raise GraphbuildError(f"{where}: payload {payload.spec} with dim {meta.get('dim')}")
    return payload


def check_identity(meta: dict, want: RunIdentity | str, where: Path) -> None:
    """Refuse a sidecar directory of another provenance or run than the one named."""
    have = str(meta.get("run_id"))
    want_id = want if isinstance(want, str) else want.run_id
    if have == want_id:
        return
    prov = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else {}
    if isinstance(want, RunIdentity):
        for key in PROVENANCE_KEYS:
            if prov.get(key) != want.provenance[key]:
                raise GraphbuildError(
                    f"{where}: exported from embeddings with {key}={prov.get(key)!r}, the run "
                    f"has {key}={want.provenance[key]!r}; export this run into another --out")
    kind = ("provenance" if have.split("-")[0] != want_id.split("-")[0] else "run")
    raise GraphbuildError(f"{where}: exported from run {have}, not {want_id} (another {kind}); "
                          "export this run into another --out")


def sidecar_name(url: str) -> str:
    """NAME.parquet for a shard's URL or path ending in NAME.tar (a `pipe:` command's last
    word, a query string dropped)."""
    last = str(url).split()[-1] if str(url).split() else ""
    name = PurePosixPath(last.split("?")[0].replace("\\", "/")).name
    if not name.endswith(".tar") or name == ".tar":
        raise GraphbuildError(f"shard {url!r}: its name does not end in .tar, so no sidecar "
                              "NAME.parquet answers to it")
    return name[:-len(".tar")] + ".parquet"


def write_sidecar(path: Path, payload: Payload, file_meta: dict, keys: list[str],
                  nodes: np.ndarray, values: np.ndarray, scale: np.ndarray | None) -> int:
    """Write one tar's sidecar atomically: keys, nodes (-1: none, stored null) and the
    payload's (n, dim) values (and int8 scales); returns its bytes."""
    n = len(keys)
    have = nodes >= 0
    values = np.ascontiguousarray(values, payload.value_dtype)
    if payload.kind == "int8":
        valid = pa.array(have, pa.bool_()).buffers()[1]
        stored = pa.FixedSizeBinaryArray.from_buffers(payload.column_type, n,
                                                      [valid, pa.py_buffer(values.tobytes())])
    else:
        stored = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), payload.dim,
                                                   mask=pa.array(~have))
    columns = [pa.array(keys, pa.string()), pa.array(nodes, pa.int64(), mask=~have), stored]
    if payload.kind == "int8":
        columns.append(pa.array(scale.astype(np.float32), pa.float32(), mask=~have))
    table = pa.Table.from_arrays(columns, schema=payload.schema(file_meta))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=max(n, 1), compression="zstd",
                       use_dictionary=False, write_page_checksum=True)
        size = tmp.stat().st_size
    return size


@dataclass
class Sidecar:
    """One tar's sidecar in memory: keys in tar order, and `packed` (n, row_bytes) uint8,
    each row a sample's stream bytes (module docstring)."""
    keys: list[str]
    packed: np.ndarray
    file_meta: dict


def read_sidecar(path: Path, payload: Payload, run_id: str, tar: str | None = None) -> Sidecar:
    """A tar's sidecar, checked: page checksums, the payload's schema, and its metadata's run
    id, payload and tar name against the directory's (`tar`: NAME.tar, or None: any)."""
    try:
        table = pq.read_table(path, **PAGE_CHECKS)
    except FileNotFoundError:
        raise GraphbuildError(f"{path}: missing; export the tar's sidecar (`graphbuild "
                              "export`) or leave the tar out") from None
    except (OSError, pa.ArrowException) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GraphbuildError(f"{path}: cannot read sidecar: {first}") from None
    raw = (table.schema.metadata or {}).get(FILE_KEY)
    file_meta = json.loads(raw) if raw else {}
    if file_meta.get("run_id") != run_id:
        raise GraphbuildError(f"{path}: exported from run {file_meta.get('run_id')!r}, its "
                              f"directory's {META} says {run_id}; it was copied in from "
                              "another export")
    if file_meta.get("payload") != payload.spec or not table.schema.equals(payload.schema()):
        raise GraphbuildError(f"{path}: holds payload {file_meta.get('payload')!r}, its "
                              f"directory's {META} says {payload.spec}")
    if tar is not None and file_meta.get("tar") != tar:
        raise GraphbuildError(f"{path}: is the sidecar of {file_meta.get('tar')!r}, not {tar}")
    return Sidecar(table.column("key").to_pylist(), _pack(table, payload), file_meta)


def _pack(table: pa.Table, payload: Payload) -> np.ndarray:
    """The table's rows as stream bytes: node (-1 for null), values (0 for null), scale."""
    n = table.num_rows
    out = np.zeros((n, payload.row_bytes), np.uint8)
    if n == 0:
        return out
    node = table.column("node").combine_chunks()
    nodes = node.fill_null(-1).to_numpy().astype("<i8")
    out[:, :NODE_BYTES] = nodes.view(np.uint8).reshape(n, NODE_BYTES)
    stored = table.column(payload.column).combine_chunks()
    width = payload.dim * payload.value_dtype.itemsize
    end = NODE_BYTES + width
    if payload.kind == "int8":
        raw = np.frombuffer(stored.buffers()[1], np.uint8, n * width, stored.offset * width)
    else:
        flat = stored.values.slice(stored.offset * payload.dim, n * payload.dim)
        if flat.null_count:
            flat = flat.fill_null(0)
        raw = flat.to_numpy(zero_copy_only=False).astype(payload.value_dtype, copy=False)
    out[:, NODE_BYTES:end] = raw.view(np.uint8).reshape(n, width)
    out[nodes < 0, NODE_BYTES:] = 0  # what a null row's slots hold is not defined
    if payload.kind == "int8":
        scale = table.column("scale").combine_chunks().fill_null(0).to_numpy()
        out[:, end:] = scale.astype("<f4").view(np.uint8).reshape(n, 4)
    return out


def unpack(packed: np.ndarray, payload: Payload) -> tuple[np.ndarray, np.ndarray]:
    """(nodes int64, values (B, dim)) of stream rows; int8 values come back dequantised to
    float32 (q * scale), the others as their stored float16."""
    packed = np.ascontiguousarray(packed, np.uint8)
    if packed.ndim != 2 or packed.shape[1] != payload.row_bytes:
        raise GraphbuildError(f"payload rows of {packed.shape[-1] if packed.ndim else 0} bytes, "
                              f"a {payload.spec} row of dim {payload.dim} has "
                              f"{payload.row_bytes}: the batch is not of this sidecar "
                              "directory")
    nodes = packed[:, :NODE_BYTES].copy().view("<i8").reshape(-1).astype(np.int64)
    end = NODE_BYTES + payload.dim * payload.value_dtype.itemsize
    values = packed[:, NODE_BYTES:end].copy().view(payload.value_dtype)
    if payload.kind == "int8":
        scale = packed[:, end:].copy().view("<f4").astype(np.float32)
        values = values.astype(np.float32) * scale
    return nodes, values
