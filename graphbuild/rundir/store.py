"""embeddings.zarr: its layout, its chunk files, and the one checked reader of its rows.

The embed stage creates and writes the store with zarr (embedding/stage.py); every other
reader, the trainer's included, reads it here without zarr:

  zarr.json   zarr v3 array: shape (n_nodes, dim), float16, regular chunks of whole rows,
              codecs [bytes little-endian, crc32c], default chunk keys with '/'; attributes
              carry the provenance (paths.PROVENANCE_KEYS)
  c/<i>/0     chunk i: rows i*R .. i*R+R-1 as raw little-endian fp16 (the last chunk padded
              to R rows, as zarr stores an edge chunk), then the crc32c of those bytes (4 bytes,
              little-endian)

`StoredRows` refuses, in one line naming the file, a store of another layout, a chunk file
that is missing or not a chunk's size (zarr would read zeros) and a chunk failing its crc32c.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import numpy as np

from graphbuild.errors import GraphbuildError

CRC_BYTES = 4
CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
# A stored row's norm is 1 within this: embed refuses to write a row outside it, knn to
# search one, validate reports one.
NORM_TOLERANCE = 1e-2
REDO = "rerun `graphbuild embed` to redo it"


class StoreError(GraphbuildError):
    """A problem with one file of the store: `file`, then what is wrong and what to do."""

    def __init__(self, file: Path, what: str, remedy: str | None = None):
        self.file, self.what, self.remedy = file, what, remedy
        super().__init__(f"{file}: {self.detail}")

    @property
    def detail(self) -> str:
        """The message without the file's name (validate prints the file apart)."""
        return f"{self.what}; {self.remedy}" if self.remedy else self.what


def chunk_file(store: Path, c: int) -> Path:
    return store / "c" / str(c) / "0"


def chunk_file_problem(store: Path, c: int, size: int) -> str | None:
    """What is wrong with a chunk's file at a glance (a stat): missing or the wrong size."""
    try:
        have = chunk_file(store, c).stat().st_size
    except FileNotFoundError:
        return "is missing"
    return None if have == size else f"is {have} bytes, a chunk is {size}"


def unit_norm_misses(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp32 norms, indices of the rows whose norm is not 1 +- NORM_TOLERANCE, non-finite
    ones included) of fp16 or fp32 rows. torch takes the norms in fp32 straight from fp16, with
    no fp32 copy of the rows: 1M x 384 rows in 0.45 s against numpy's 1.3 s."""
    import torch

    rows = np.ascontiguousarray(rows) if rows.flags.writeable else rows.copy()  # torch warns
    norms = torch.linalg.vector_norm(torch.from_numpy(rows), dim=1, dtype=torch.float32).numpy()
    return norms, np.flatnonzero(~(np.abs(norms - 1) <= NORM_TOLERANCE))


def read_zarr_json(store: Path) -> dict:
    """The store's parsed zarr.json; FileNotFoundError when there is none."""
    path = store / "zarr.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(path, f"cannot read the store's metadata: {e}") from None
    if not isinstance(meta, dict):
        raise StoreError(path, "not a JSON object; not a graphbuild store")
    return meta


def _layout_error(path: Path, what: str) -> StoreError:
    return StoreError(path, what, "graphbuild reads only the layout `graphbuild embed` writes")


def read_layout(store: Path) -> tuple[tuple[int, int], int, dict]:
    """((n_nodes, dim), rows per chunk, attributes) from zarr.json, after checking it
    describes the layout above; anything else is refused in one line naming zarr.json."""
    path = store / "zarr.json"
    try:
        meta = read_zarr_json(store)
    except FileNotFoundError:
        raise GraphbuildError(f"{path}: missing; run `graphbuild embed` first") from None
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise _layout_error(path, "not a zarr v3 array")
    if meta.get("data_type") != "float16":
        raise _layout_error(path, f"data_type {meta.get('data_type')!r}, not float16")
    if meta.get("codecs") != CODECS:
        raise _layout_error(path, "codecs are not [bytes little-endian, crc32c]")
    if meta.get("storage_transformers"):
        raise _layout_error(path, "storage transformers are set")
    key = meta.get("chunk_key_encoding", {})
    if key.get("name") != "default" or key.get("configuration", {}).get("separator", "/") != "/":
        raise _layout_error(path, "chunk key encoding is not default with '/'")
    shape = meta.get("shape", [])
    grid = meta.get("chunk_grid", {})
    chunk = grid.get("configuration", {}).get("chunk_shape", [])
    if (len(shape) != 2 or grid.get("name") != "regular" or len(chunk) != 2
            or chunk[1] != shape[1] or not chunk[0] > 0):
        raise _layout_error(path, f"shape {shape} / chunks {chunk} are not 2-d row chunks")
    attrs = meta.get("attributes", {})
    if not isinstance(attrs, dict):
        raise _layout_error(path, "attributes are not a JSON object")
    return (int(shape[0]), int(shape[1])), int(chunk[0]), attrs


class StoredRows:
    """The rows of embeddings.zarr as fp16 numpy, every chunk checked before use.

    Reads a row range (`read`, or `store[lo:hi]`), chunk-aligned blocks (`blocks`), all rows
    into RAM (`load`), or given rows in any order (`gather`, or `store[nodes]`). Bytes read
    from a chunk's file are checked each time they are read; with mmap=True each chunk is
    instead mapped and checked once, at its first use, and kept mapped by this object.

    Picklable and lazy: opening reads only zarr.json, and a pickled copy (a DataLoader
    worker's) maps and checks its chunks again.
    """

    dtype = np.dtype(np.float16)

    def __init__(self, path: str | Path, mmap: bool = False):
        self.path = Path(path)
        self.mmap = mmap
        self.shape, self.chunk_rows, self.attrs = read_layout(self.path)
        self._mapped: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mapped": {}}

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def n_chunks(self) -> int:
        return -(-self.shape[0] // self.chunk_rows)

    @property
    def chunk_bytes(self) -> int:
        """A chunk file's size: its rows (an edge chunk is stored whole) + the crc32c."""
        return self.chunk_rows * self.shape[1] * self.dtype.itemsize + CRC_BYTES

    def chunk_file(self, c: int) -> Path:
        return chunk_file(self.path, c)

    def file_problem(self, c: int) -> str | None:
        """What a stat shows wrong with chunk c's file (missing, wrong size), or None."""
        return chunk_file_problem(self.path, c, self.chunk_bytes)

    def _span(self, c: int) -> tuple[int, int]:
        """(first row, end row) of chunk c's rows that are rows of the store."""
        return c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.shape[0])

    def _error(self, c: int, what: str) -> StoreError:
        lo, hi = self._span(c)
        return StoreError(self.chunk_file(c), f"chunk {c} (rows {lo}-{hi - 1}) {what}", REDO)

    def _sound_file(self, c: int) -> Path:
        problem = self.file_problem(c)
        if problem:
            raise self._error(c, problem)
        return self.chunk_file(c)

    def _check_crc(self, c: int, crc: int, stored: bytes) -> None:
        if crc != int.from_bytes(stored, "little"):
            raise self._error(c, "fails its crc32c check, it is corrupt")

    def stored_crc(self, c: int) -> bytes:
        """The crc32c chunk c's file records (its last 4 bytes), read without its rows and
        not checked against them: a fingerprint of the chunk (rundir/sidecar.py's run id)."""
        with open(self._sound_file(c), "rb") as f:
            f.seek(self.chunk_bytes - CRC_BYTES)
            return f.read(CRC_BYTES)

    def check(self, c: int) -> None:
        """Refuse chunk c (StoreError) unless its file is sound; reads and checks it."""
        self.chunk(c)

    def chunk(self, c: int) -> np.ndarray:
        """Chunk c's rows of the store, (rows, dim) fp16, checked: mapped (kept) or read."""
        if not self.mmap:
            lo, hi = self._span(c)
            return self._read_chunk(c, np.empty((hi - lo, self.shape[1]), self.dtype))
        if c not in self._mapped:
            raw = np.memmap(self._sound_file(c), dtype=np.uint8, mode="r")
            if len(raw) != self.chunk_bytes:  # replaced since the stat
                raise self._error(c, f"is {len(raw)} bytes, a chunk is {self.chunk_bytes}")
            self._check_crc(c, google_crc32c.value(raw[:-CRC_BYTES]),
                            raw[-CRC_BYTES:].tobytes())
            lo, hi = self._span(c)
            rows = raw[:-CRC_BYTES].view(self.dtype).reshape(self.chunk_rows, self.shape[1])
            self._mapped[c] = rows[:hi - lo]
        return self._mapped[c]

    def _read_chunk(self, c: int, into: np.ndarray) -> np.ndarray:
        """Read chunk c's rows of the store straight into `into` (C-contiguous, as many rows
        as the chunk holds of the store), the padding of an edge chunk aside, and check the
        crc32c of all of them; returns `into`."""
        file = self._sound_file(c)
        data = memoryview(into).cast("B")
        pad = self.chunk_bytes - CRC_BYTES - len(data)
        with open(file, "rb", buffering=0) as f:
            got = _read_fully(f, data)
            tail = f.read(pad + CRC_BYTES + 1)
        if got + len(tail) != self.chunk_bytes:  # replaced since the stat
            raise self._error(c, f"is {got + len(tail)} bytes, a chunk is {self.chunk_bytes}")
        crc = google_crc32c.value(into)
        if pad:
            crc = google_crc32c.extend(crc, tail[:pad])
        self._check_crc(c, crc, tail[pad:])
        return into

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi-1 (clipped to the store) as a new (rows, dim) fp16 array."""
        n, d = self.shape
        lo, hi = max(lo, 0), min(hi, n)
        out = np.empty((max(hi - lo, 0), d), self.dtype)
        if hi <= lo:
            return out
        for c in range(lo // self.chunk_rows, -(-hi // self.chunk_rows)):
            first, end = self._span(c)
            a, b = max(lo, first), min(hi, end)
            if not self.mmap and (a, b) == (first, end):  # the whole chunk: no copy
                self._read_chunk(c, out[a - lo:b - lo])
            else:
                out[a - lo:b - lo] = self.chunk(c)[a - first:b - first]
        return out

    def load(self) -> np.ndarray:
        """All rows, (n, dim) fp16, in RAM."""
        return self.read(0, self.shape[0])

    def blocks(self, rows: range, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, fp16 block) over `rows`, cut at multiples of `block_rows` rounded to
        whole chunks, so no chunk is read twice."""
        step = self.block_step(block_rows)
        cut = -(-rows.start // step) * step
        cuts = sorted({rows.start, rows.stop, *range(cut, rows.stop, step)})
        for lo, hi in itertools.pairwise(cuts):
            yield lo, self.read(lo, hi)

    def block_step(self, block_rows: int) -> int:
        """`block_rows` rounded down to whole chunks (at least one)."""
        return max(1, block_rows // self.chunk_rows) * self.chunk_rows

    def gather(self, nodes) -> np.ndarray:
        """(len(nodes), dim) fp16 rows of the given nodes, in the order given (repeats
        allowed), reading each chunk they touch once."""
        nodes = np.asarray(nodes)
        if nodes.size and nodes.dtype.kind not in "iu":
            raise TypeError(f"rows are gathered by integer row numbers, not {nodes.dtype}")
        nodes = nodes.astype(np.int64, copy=False).reshape(-1)
        n = self.shape[0]
        if len(nodes) and (nodes.min() < 0 or nodes.max() >= n):
            bad = int(nodes[(nodes < 0) | (nodes >= n)][0])
            raise GraphbuildError(f"{self.path}: row {bad} is not one of its {n} rows")
        out = np.empty((len(nodes), self.shape[1]), self.dtype)
        which, offset = np.divmod(nodes, self.chunk_rows)
        order = np.argsort(which, kind="stable")
        touched, starts = np.unique(which[order], return_index=True)
        for c, a, b in zip(touched.tolist(), starts, [*starts[1:], len(order)]):
            sel = order[a:b]
            out[sel] = self.chunk(c)[offset[sel]]
        return out

    def __getitem__(self, key) -> np.ndarray:
        """store[lo:hi] reads a row range, store[nodes] gathers (nodes: a 1-d sequence): the
        reads the search code makes of a store or of an array of rows alike."""
        if isinstance(key, slice):
            if key.step not in (None, 1):
                raise TypeError(f"the store is read by row ranges, not {key!r}")
            lo, hi, _ = key.indices(self.shape[0])
            return self.read(lo, hi)
        if np.ndim(key) != 1:
            raise TypeError(f"the store is read by row ranges or lists of rows, not {key!r}")
        return self.gather(key)


def _read_fully(f, data: memoryview) -> int:
    """Read into `data` until it is full or the file ends; the bytes read."""
    got = 0
    while got < len(data):
        step = f.readinto(data[got:])
        if not step:
            break
        got += step
    return got


# The trainer's name for the reader (graphbuild.xclr exports it).
ZarrRows = StoredRows
