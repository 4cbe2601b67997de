"""Trainer-side readers of a run directory: embeddings, samples and the graph.

Imports only numpy, pyarrow and google_crc32c (zarr's own checksum library; and graphbuild's
light modules), never zarr: the embeddings are read chunk by chunk straight from
embeddings.zarr/c/<i>/0, which holds rows*dim*2 raw little-endian fp16 bytes and then the
little-endian crc32c of those bytes. Any other layout is refused, not guessed. Each chunk's
crc is checked once per process: at load in RAM mode, at a chunk's first read when
memory-mapped; a chunk failing it is a one-line error naming its file.

The samples table is checked as it is read: `sample` is 0..S-1, `sample_id` has no nulls and
no repeats, and every node is a row of what it indexes (the store's rows, the graph's nodes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from graphbuild.errors import GraphbuildError
from graphbuild.graph import read_graph_csr, read_meta
from graphbuild.storage import RunDir, read_json

CRC_BYTES = 4
# run.json's dataset entry: true when sample ids are the source's row numbers (no id_column)
ROW_NUMBER_IDS = "ids_are_row_numbers"
_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


def _fail(path: Path, what: str) -> GraphbuildError:
    return GraphbuildError(f"{path}: {what}; the trainer reads only graphbuild's own layout")


class ZarrRows:
    """Rows of embeddings.zarr as fp16 numpy, from RAM (default) or memory-mapped chunks.

    Picklable and lazy: nothing is read until the first call, and a pickled copy (e.g. in a
    DataLoader worker) reopens the files itself and checks their crcs again.
    """

    def __init__(self, path: str | Path, mmap: bool = False):
        self.path = Path(path)
        self.mmap = mmap
        self.shape, self.chunk_rows = self._read_meta()
        self._data: np.ndarray | None = None
        self._chunks: list[np.ndarray | None] | None = None

    def _read_meta(self) -> tuple[tuple[int, int], int]:
        meta_file = self.path / "zarr.json"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise GraphbuildError(f"{meta_file}: cannot read array metadata: {e}") from None
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            raise _fail(meta_file, "not a zarr v3 array")
        if meta.get("data_type") != "float16":
            raise _fail(meta_file, f"data_type {meta.get('data_type')!r}, not float16")
        if meta.get("codecs") != _CODECS:
            raise _fail(meta_file, "codecs are not [bytes little-endian, crc32c]")
        if meta.get("storage_transformers"):
            raise _fail(meta_file, "storage transformers are set")
        key = meta.get("chunk_key_encoding", {})
        if key.get("name") != "default" or key.get("configuration", {}).get("separator",
                                                                             "/") != "/":
            raise _fail(meta_file, "chunk key encoding is not default with '/'")
        shape = meta.get("shape", [])
        grid = meta.get("chunk_grid", {})
        chunk = grid.get("configuration", {}).get("chunk_shape", [])
        if (len(shape) != 2 or grid.get("name") != "regular" or len(chunk) != 2
                or chunk[1] != shape[1]):
            raise _fail(meta_file, f"shape {shape} / chunks {chunk} are not 2-d row chunks")
        return (int(shape[0]), int(shape[1])), int(chunk[0])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None, "_chunks": None}

    @property
    def n_chunks(self) -> int:
        return -(-self.shape[0] // self.chunk_rows)

    def _chunk_file(self, i: int) -> Path:
        """Chunk i's file, after checking it has the size of uncompressed fp16 + crc32c."""
        file = self.path / "c" / str(i) / "0"
        want = self.chunk_rows * self.shape[1] * 2 + CRC_BYTES
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise GraphbuildError(f"{file}: chunk missing; finish `graphbuild embed`") from None
        if size != want:
            raise _fail(file, f"{size} bytes, expected {want} (uncompressed fp16 + crc32c)")
        return file

    def _checked(self, i: int, raw: np.ndarray) -> np.ndarray:
        """The (chunk_rows, dim) fp16 rows of chunk i's bytes `raw`, once their crc32c
        matches the one stored in the file's last 4 bytes."""
        data = raw[:-CRC_BYTES]
        if google_crc32c.value(data) != int.from_bytes(raw[-CRC_BYTES:].tobytes(), "little"):
            raise GraphbuildError(
                f"{self.path / 'c' / str(i) / '0'}: chunk {i} fails its crc32c check, it is "
                "corrupt; rerun `graphbuild embed` to redo it")
        return data.view("<f2").reshape(self.chunk_rows, self.shape[1])

    def _chunk(self, i: int) -> np.ndarray:
        """Chunk i as (chunk_rows, dim) fp16, its crc checked: read into RAM, or mapped."""
        file = self._chunk_file(i)
        if self.mmap:
            raw = np.memmap(file, dtype=np.uint8, mode="r")
        else:
            raw = np.fromfile(file, dtype=np.uint8)
            raw.flags.writeable = False  # google_crc32c reads read-only buffers only
        return self._checked(i, raw)

    def load(self) -> np.ndarray:
        """All rows, (n, dim) fp16, in RAM; every chunk's crc checked."""
        if self._data is None:
            n, d = self.shape
            out = np.empty((n, d), np.float16)
            for i in range(self.n_chunks):
                lo = i * self.chunk_rows
                hi = min(n, lo + self.chunk_rows)
                out[lo:hi] = self._chunk(i)[: hi - lo]
            self._data = out
        return self._data

    def rows(self, nodes: np.ndarray) -> np.ndarray:
        """(len(nodes), dim) fp16 rows, in the order given."""
        nodes = np.asarray(nodes, np.int64)
        if not self.mmap:
            return self.load()[nodes]
        if self._chunks is None:
            self._chunks = [None] * self.n_chunks
        out = np.empty((len(nodes), self.shape[1]), np.float16)
        which, offset = np.divmod(nodes, self.chunk_rows)
        for c in np.unique(which).tolist():
            if self._chunks[c] is None:  # first touch: map the chunk and check its crc
                self._chunks[c] = self._chunk(c)
            sel = np.flatnonzero(which == c)
            out[sel] = self._chunks[c][offset[sel]]
        return out


def read_samples(run: str | Path, ids: bool = False) -> tuple[np.ndarray, pa.Array | None]:
    """Each sample's node (the `node` column in `sample` order 0..S-1, int64) and, with
    ids=True, its `sample_id` (checked: no nulls, no repeats); else None for the ids."""
    path = RunDir(run).samples
    try:
        table = pq.read_table(path, columns=["sample", "node"] + (["sample_id"] if ids else []))
    except (OSError, ValueError, pa.ArrowException) as e:
        raise GraphbuildError(f"{path}: cannot read samples table: {e}") from None
    sample = table.column("sample").to_numpy()
    if not np.array_equal(sample, np.arange(len(sample))):
        order = np.argsort(sample, kind="stable")
        if not np.array_equal(sample[order], np.arange(len(sample))):
            raise GraphbuildError(f"{path}: sample column is not 0..{len(sample) - 1}")
        table = table.take(order)
    node = table.column("node").to_numpy().astype(np.int64)
    if len(node) and node.min() < 0:
        raise GraphbuildError(f"{path}: node {node.min()} in column 'node' is negative")
    if not ids:
        return node, None
    sample_ids = table.column("sample_id").combine_chunks()
    check_unique_ids(sample_ids, f"{path}: column 'sample_id'", "sample")
    return node, sample_ids


def read_sample_nodes(run: str | Path) -> np.ndarray:
    """node of each dataset index (the `sample` column, 0..S-1), as int64."""
    return read_samples(run)[0]


def check_unique_ids(ids: pa.Array, where: str, what: str) -> None:
    """Refuse ids with a null or a repeat, naming the first one and its position."""
    if ids.null_count:
        first = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise GraphbuildError(f"{where}: {what} {first} has no id (null)")
    first_seen = pc.index_in(ids, value_set=ids).to_numpy(zero_copy_only=False)
    again = np.flatnonzero(first_seen != np.arange(len(ids)))
    if len(again):
        at = int(again[0])
        raise GraphbuildError(f"{where}: {what}s {first_seen[at]} and {at} have the same id "
                              f"{ids[at].as_py()!r}; ids must be unique")


def check_nodes_fit(run: str | Path, nodes: np.ndarray, n_rows: int, rows_of: Path) -> None:
    """Refuse sample nodes that are not rows of what they index (the store, the graph): the
    samples table and that file are then of different runs."""
    if len(nodes) and nodes.max() >= n_rows:
        raise GraphbuildError(f"{RunDir(run).samples}: node {nodes.max()} is not one of the "
                              f"{n_rows} rows of {rows_of}; the samples table and it are of "
                              "different runs: rerun `graphbuild embed` and `graphbuild knn`")


def check_store_matches_tables(run: str | Path, rows: ZarrRows) -> None:
    """Refuse a store whose row count differs from nodes.parquet's: one node, one row."""
    path = RunDir(run).nodes
    try:
        n = pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise GraphbuildError(f"{path}: cannot read nodes table: {e}") from None
    if n != rows.shape[0]:
        raise GraphbuildError(f"{rows.path}: holds {rows.shape[0]} rows, {path} {n} nodes; "
                              "the store is of another run: rerun `graphbuild embed`")


@dataclass(frozen=True)
class SourceRows:
    """What run.json says about the source's rows and the run's sample ids.

    row_numbers: True when the sample ids are the source's row numbers (the manifest has no
    id_column), False when they are an id column's values or class keys, None when run.json
    does not say (runs written before the builder recorded it). skipped: rows the run dropped
    under --skip-bad-rows (empty texts, unknown labels, repeated ids); None if not recorded."""
    row_numbers: bool | None
    skipped: int | None
    samples: int | None

    @property
    def total(self) -> int | None:
        """The source's row count: samples kept plus rows skipped."""
        if self.samples is None or self.skipped is None:
            return None
        return self.samples + self.skipped


def read_source_rows(run: str | Path) -> SourceRows:
    dataset = read_json(RunDir(run).run_json).get("dataset") or {}
    figures = dataset.get("figures") or {}
    row_numbers = dataset.get(ROW_NUMBER_IDS)
    skips = [figures.get("skipped_missing", 0), figures.get("skipped_empty"),
             figures.get("skipped_duplicate_ids")]
    skipped = sum(skips) if all(isinstance(k, int) for k in skips) else None
    samples = figures.get("samples") if isinstance(figures.get("samples"), int) else None
    return SourceRows(row_numbers if isinstance(row_numbers, bool) else None, skipped, samples)


class Graph:
    """The CSR graph with helpers to find the pairs of a batch it holds. Lazy and picklable."""

    def __init__(self, run: str | Path | None, k: int | None = None):
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer))
                              or k < 1):
            raise GraphbuildError(f"k must be an int >= 1 (or None: every stored neighbour), "
                                  f"got {k!r}")
        self.run = Path(run) if run is not None else None
        self.k = k  # keep only each row's best k (rows are stored best first)
        self._csr: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_arrays(cls, indptr: np.ndarray, indices: np.ndarray, sims: np.ndarray,
                    k: int | None = None) -> Graph:
        """A graph held in memory, e.g. built by another tool; rows best first."""
        graph = cls(None, k)
        indptr = np.asarray(indptr, np.int64)
        if k is not None:
            indptr, indices, sims = truncate(indptr, indices, sims, k)
        graph._csr = indptr, np.asarray(indices, np.int64), np.asarray(sims, np.float32)
        return graph

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_csr": None} if self.run is not None else self.__dict__

    @property
    def n_nodes(self) -> int:
        """Rows of the graph. For a run's graph this reads graph/_meta.json, which refuses a
        graph built from other embeddings than the run's current store."""
        if self._csr is None and self.run is not None:
            return int(read_meta(self.run)["n_nodes"])
        return len(self.csr[0]) - 1

    @property
    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._csr is None:
            indptr, indices, sims = read_graph_csr(self.run)
            if self.k is not None:
                indptr, indices, sims = truncate(indptr, indices, sims, self.k)
            self._csr = indptr, indices.astype(np.int64), sims
        return self._csr

    def kth_sims(self) -> np.ndarray:
        """Each row's last (k-th) stored sim: an upper bound on its sims to absent nodes."""
        indptr, _, sims = self.csr
        out = np.full(len(indptr) - 1, -1.0, np.float32)
        full = indptr[1:] > indptr[:-1]
        out[full] = sims[indptr[1:][full] - 1]
        return out

    def tail_floors(self, tau_s: float, points: int = 128) -> np.ndarray:
        """Per row, the soft mean tau_s * log(mean exp(s/tau_s)) of its sims to the nodes it
        does not hold, estimated from the row alone: fit s(r) = a + b log r to its stored sims
        by rank r, extrapolate over ranks k+1..n (clipped to [-1, s_k]) and average."""
        indptr, _, sims = self.csr
        n = len(indptr) - 1
        counts = np.diff(indptr)
        k = int(counts.max()) if n else 0
        dense = np.full((n, k), np.nan, np.float64)  # rows padded to k
        pos = np.arange(indptr[-1]) - np.repeat(indptr[:-1], counts)
        dense[np.repeat(np.arange(n), counts), pos] = sims
        logr = np.log(np.arange(1, k + 1))
        ok = ~np.isnan(dense)
        m = ok.sum(1).clip(1)
        mx, my = (ok * logr).sum(1) / m, np.nansum(dense, 1) / m
        dx = np.where(ok, logr - mx[:, None], 0.0)
        b = (dx * np.nan_to_num(dense - my[:, None])).sum(1) / np.maximum((dx ** 2).sum(1), 1e-12)
        a = my - b * mx
        ranks = np.geomspace(k + 1, max(n, k + 2), points)
        weights = np.gradient(ranks)  # trapezoid-like: each point stands for its rank span
        last = self.kth_sims().astype(np.float64)
        s = np.clip(a[:, None] + b[:, None] * np.log(ranks), -1.0, last[:, None])
        z = s / tau_s
        top = z.max(1, keepdims=True)
        mean = (np.exp(z - top) * weights).sum(1) / weights.sum()
        return (tau_s * (np.log(mean) + top[:, 0])).astype(np.float32)

    def pairs(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pairs (a, b, sim) of positions in `nodes` (distinct node ids) where node b is in
        node a's stored row: one direction each, as stored."""
        indptr, indices, sims = self.csr
        nodes = np.asarray(nodes, np.int64)
        starts, stops = indptr[nodes], indptr[nodes + 1]
        counts = stops - starts
        row = np.repeat(np.arange(len(nodes)), counts)
        # flat positions of all edges of the batch's rows, without a Python loop
        flat = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        flat += np.repeat(starts, counts)
        order = np.argsort(nodes, kind="stable")
        sorted_nodes = nodes[order]
        pos = np.searchsorted(sorted_nodes, indices[flat])
        pos = np.minimum(pos, len(nodes) - 1)
        hit = sorted_nodes[pos] == indices[flat]
        return row[hit], order[pos[hit]], sims[flat[hit]]


def truncate(indptr: np.ndarray, indices: np.ndarray, sims: np.ndarray,
             k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-k graph inside a top-K graph (K >= k): each row's first k entries."""
    counts = np.minimum(np.diff(indptr), k)
    new_ptr = np.zeros_like(indptr)
    np.cumsum(counts, out=new_ptr[1:])
    keep = np.arange(indptr[-1]) - np.repeat(indptr[:-1], np.diff(indptr)) < np.repeat(
        counts, np.diff(indptr))
    return new_ptr, indices[keep], sims[keep]
