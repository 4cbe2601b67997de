"""Deduplication that holds one partition or one window of rows, never the whole dataset.

Every row carries `g`, its row number over the whole source. A text's node is the rank of
its first row among the first rows of all texts (first-seen order), so:

1. `Spill`: rows go to P files on disk by a hash of their text (or id), each in row order.
2. `repeated_rows`: per id partition, the rows whose id an earlier row already had.
3. `number_nodes`: per text partition, its texts' first rows, and each row's index into
   them; then the partitions' first rows, merged in windows of row numbers, get node ids
   in order (and are written out as the nodes); then per partition, each row's node id.
   An append (extend.py) passes the old nodes that its texts repeat: those keep their
   node, and only the other texts are numbered, after the old nodes.
4. `in_row_order`: the partitions' rows, merged in windows of row numbers: the samples.

Equal texts always land in the same partition, so a partition alone knows a text's first
row. Memory holds one partition (steps 2 and 3) or one window of row numbers plus one small
batch per partition (the merges). The files are Arrow IPC segments, lz4-compressed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl

from graphbuild.errors import GraphbuildError

FLUSH_ROWS = 65_536  # rows a Spill holds before writing them to its parts
MIN_BATCH_ROWS = 128  # rows of a segment read during a merge, at least


def _append_segment(path: Path, df: pl.DataFrame) -> None:
    """Append df to path as one length-prefixed Arrow IPC stream."""
    import pyarrow as pa

    table = df.to_arrow()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema,
                           options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
        w.write_table(table)
    buf = sink.getvalue()
    with open(path, "ab") as f:  # opened per segment: no handles held between writes
        f.write(len(buf).to_bytes(8, "little"))
        f.write(buf)


def segments(path: Path) -> Iterator[pl.DataFrame]:
    """The frames appended to path, in order; nothing if it was never written."""
    import pyarrow as pa

    if not path.exists():
        return
    with open(path, "rb") as f:
        while head := f.read(8):
            table = pa.ipc.open_stream(f.read(int.from_bytes(head, "little"))).read_all()
            yield pl.from_arrow(table)


def write_frame(path: Path, df: pl.DataFrame, batch_rows: int) -> None:
    """df as segments of batch_rows rows, so a merge reads it a little at a time."""
    for lo in range(0, df.height, batch_rows):
        _append_segment(path, df.slice(lo, batch_rows))


def read_frame(path: Path, schema: dict) -> pl.DataFrame:
    parts = list(segments(path))
    return pl.concat(parts) if parts else pl.DataFrame(schema=schema)


class Spill:
    """Rows appended in row order, split into `parts` files by a hash of column `key`.

    Within a part, rows keep the order they were appended in. Rows wait in memory until
    `flush_rows` of them do, then each part's waiting rows become one segment of its file."""

    def __init__(self, folder: Path, parts: int, key: str | None, schema: dict,
                 flush_rows: int = FLUSH_ROWS, keep_hashes: bool = False):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.parts, self.key, self.schema = folder, parts, key, schema
        self.flush_rows = flush_rows
        self._waiting: list[list[pl.DataFrame]] = [[] for _ in range(parts)]
        self._rows = 0
        # keep_hashes: every row's key hash, 8 bytes a row, for `key_hashes` (an append's
        # lookup of the old rows its keys repeat)
        self._hashes: list[np.ndarray] | None = [] if keep_hashes else None

    def path(self, p: int) -> Path:
        return self.folder / f"{p:05d}.arrow"

    def part_of(self, keys: pl.Series) -> pl.Series:
        """The partition of each key (polars hashes are fixed within a process; the files
        do not outlive it)."""
        return keys.hash() % self.parts

    def append(self, df: pl.DataFrame) -> None:
        if df.height == 0:
            return
        if self._hashes is not None:
            self._hashes.append(df[self.key].hash().to_numpy())
        if self.parts == 1:
            self._waiting[0].append(df)
        else:
            part = self.part_of(df[self.key]).alias("_part")
            for (p,), piece in df.with_columns(part).partition_by(
                    "_part", as_dict=True, include_key=False, maintain_order=True).items():
                self._waiting[p].append(piece)
        self._rows += df.height
        if self._rows >= self.flush_rows:
            self.flush()

    def key_hashes(self) -> np.ndarray:
        """The distinct hashes of the keys of the rows appended so far, sorted (keep_hashes);
        a key hashed the same way (`pl.Series.hash`, same dtype) is among them if it equals
        one of these keys."""
        return np.unique(np.concatenate([np.empty(0, np.uint64), *self._hashes]))

    def flush(self) -> None:
        for p, pieces in enumerate(self._waiting):
            if pieces:
                _append_segment(self.path(p), pl.concat(pieces))
        self._waiting = [[] for _ in range(self.parts)]
        self._rows = 0

    def read(self, p: int) -> pl.DataFrame:
        return read_frame(self.path(p), self.schema)

    def remove(self, p: int) -> None:
        self.path(p).unlink(missing_ok=True)


def without(df: pl.DataFrame, dropped: np.ndarray) -> pl.DataFrame:
    """df without the rows whose g is in `dropped`."""
    return df.filter(~pl.col("g").is_in(pl.Series(dropped).implode())) if len(dropped) else df


def repeated_rows(spill: Spill, key: str = "id", seen: pl.Series | None = None) -> np.ndarray:
    """Sorted row numbers of the rows whose `key` an earlier row had (the spill's key); with
    `seen`, the keys of rows before all of the spill's (an append's old rows), also of the
    rows whose key is among them."""
    found = [np.empty(0, dtype=np.int64)]
    repeated = ~pl.col(key).is_first_distinct()
    if seen is not None and len(seen):
        repeated = repeated | pl.col(key).is_in(seen.implode())
    for p in range(spill.parts):
        df = spill.read(p)
        found.append(df.filter(repeated)["g"].to_numpy())
        spill.remove(p)
    return np.sort(np.concatenate(found))


def _in_windows(paths: list[Path], window: int) -> Iterator[list[pl.DataFrame | None]]:
    """Files of rows sorted by g, read side by side: for each window of row numbers
    [lo, lo + window), the rows of each file inside it (None for none)."""
    streams = [_Sorted(p) for p in paths]
    hi = 0
    while not all(s.done for s in streams):
        hi += window
        yield [s.below(hi) for s in streams]


class _Sorted:
    """One file of rows sorted by g, handed out by increasing g."""

    def __init__(self, path: Path):
        self._segments = segments(path)
        self._buf: pl.DataFrame | None = None
        self.done = False

    def below(self, hi: int) -> pl.DataFrame | None:
        out = []
        while not self.done:
            if self._buf is None:
                self._buf = next(self._segments, None)
                if self._buf is None:
                    self.done = True
                    break
            k = int(self._buf["g"].search_sorted(hi, side="left"))
            out.append(self._buf.head(k))
            if k < self._buf.height:
                self._buf = self._buf.slice(k)
                break
            self._buf = None
        out = [df for df in out if df.height]
        return pl.concat(out) if out else None


def number_nodes(texts: Spill, dropped: np.ndarray, folder: Path, window: int,
                 write_nodes: Callable[[pl.DataFrame], None], known: pl.DataFrame | None = None,
                 first_node: int = 0) -> tuple[int, list[Path]]:
    """Give each distinct text of `texts` (columns g, id, text; rows `dropped` left out) a
    node id in first-seen order; write_nodes gets (node, text) frames in node order.
    `known` (text, node): texts numbered before these rows (an append's old nodes, or more
    of them); a text among them keeps its node, the others are numbered from `first_node`.

    Returns the node count (first_node included) and per partition a file of (g, id, node),
    sorted by g."""
    folder.mkdir(parents=True, exist_ok=True)
    batch = max(MIN_BATCH_ROWS, window // texts.parts)
    known_in = _known_by_part(texts, known)

    def path(kind: str, p: int) -> Path:
        return folder / f"{kind}-{p:05d}.arrow"

    for p in range(texts.parts):  # each partition's texts by first row; rows point at them
        df = without(texts.read(p), dropped)
        first = df.select("g", "text").unique(subset="text", keep="first", maintain_order=True)
        index = first.select("text", pl.int_range(pl.len(), dtype=pl.Int64).alias("local"))
        rows = df.join(index, on="text", how="left", maintain_order="left")
        if known_in is not None:  # per first row its old node, -1 for a text to number
            old = first.join(known_in.get(p, known.clear()), on="text", how="left",
                             maintain_order="left")["node"]
            if len(old) != first.height:
                raise GraphbuildError("the old nodes given to number_nodes hold a text twice")
            old.fill_null(-1).to_numpy().astype(np.int64).tofile(path("old", p))
            first = first.filter(old.is_null())
        write_frame(path("first", p), first, batch)
        write_frame(path("rows", p), rows.select("g", "id", "local"), max(rows.height, 1))
        texts.remove(p)

    n_nodes = first_node  # all partitions' first rows, in row order, are the nodes in node order
    for pieces in _in_windows([path("first", p) for p in range(texts.parts)], window):
        sizes = [0 if x is None else x.height for x in pieces]
        if not any(sizes):
            continue
        both = pl.concat([x for x in pieces if x is not None])
        order = np.argsort(both["g"].to_numpy())
        ids = np.empty(both.height, dtype=np.int64)
        ids[order] = np.arange(n_nodes, n_nodes + both.height)
        write_nodes(pl.DataFrame({"node": np.arange(n_nodes, n_nodes + both.height),
                                  "text": both["text"].gather(order)}))
        at = 0
        for p, size in enumerate(sizes):  # each partition's node ids, in its own order
            if size:
                with open(path("node", p), "ab") as f:
                    ids[at:at + size].tofile(f)
                at += size
        n_nodes += both.height
    for p in range(texts.parts):
        path("first", p).unlink(missing_ok=True)

    numbered = []
    for p in range(texts.parts):  # each row's node, looked up by its local index
        rows = read_frame(path("rows", p), {"g": pl.Int64, "id": texts.schema["id"],
                                            "local": pl.Int64})
        nodes = _ids(path("node", p))  # the partition's numbered first rows, in order
        if known_in is not None:
            old = _ids(path("old", p))
            old[old < 0] = nodes
            nodes = old
        rows = rows.select("g", "id", pl.Series("node", nodes[rows["local"].to_numpy()]))
        write_frame(path("numbered", p), rows, batch)
        for kind in ("rows", "node", "old"):
            path(kind, p).unlink(missing_ok=True)
        numbered.append(path("numbered", p))
    return n_nodes, numbered


def _ids(path: Path) -> np.ndarray:
    """The int64 node ids written to path; none if it was never written."""
    return np.fromfile(path, dtype=np.int64) if path.exists() else np.empty(0, np.int64)


def _known_by_part(texts: Spill, known: pl.DataFrame | None) -> dict[int, pl.DataFrame] | None:
    """`known` (text, node) split by the partition of `texts` each text belongs to."""
    if known is None:
        return None
    parts = known.with_columns(texts.part_of(known["text"]).alias("_part") if texts.parts > 1
                               else pl.lit(0, dtype=pl.UInt64).alias("_part"))
    return {p: df for (p,), df in parts.partition_by("_part", as_dict=True,
                                                      include_key=False).items()}


def in_row_order(paths: list[Path], window: int) -> Iterator[pl.DataFrame]:
    """The rows of files each sorted by g, merged into one sequence sorted by g."""
    for pieces in _in_windows(paths, window):
        present = [x for x in pieces if x is not None]
        if present:
            yield pl.concat(present).sort("g")
    for p in paths:
        p.unlink(missing_ok=True)
