"""embeddings.zarr: its chunk files, and the checked readers of its rows."""

from __future__ import annotations

import json
from pathlib import Path

import google_crc32c
import numpy as np

from graphbuild.errors import GraphbuildError


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

CRC_BYTES = 4
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
