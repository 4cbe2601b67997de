"""A dataset's source files read a bounded batch at a time, parsed as polars parses them whole.

polars' own scans read a whole CSV or JSON lines file into memory before the first row comes
out, so text files are cut here into blocks of about `block_bytes` at row boundaries, and each
block is parsed by polars with the options a whole-file read would use. CSV and TSV blocks
start with the file's first line (the header, or the first row of a headerless file, dropped
again), so every block sees the columns a whole-file read sees. Parquet is read a batch of
rows at a time, which holds one row group of the wanted columns at most.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from graphbuild.errors import GraphbuildError
from graphbuild.manifest import Dataset

BLOCK_BYTES = 1 << 20  # parsing a block costs ~15x its size at peak; 1 MiB reads as fast as 16
BATCH_ROWS = 65_536


class _Unreadable(Exception):
    """A parse error inside a source file, turned into one line by `_reading`."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def _cannot_read(file: Path, fmt: str, e: BaseException) -> GraphbuildError:
    return GraphbuildError(f"{file}: cannot read as {fmt}: {_one_line(e)}")


def _read_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (pl.exceptions.PolarsError, OSError, pa.ArrowException, UnicodeDecodeError)


def column_types(ds: Dataset, file: Path, wanted: list[str],
                 block_bytes: int = BLOCK_BYTES) -> dict[str, pl.DataType]:
    """dtypes of the wanted columns of one file; a missing column is a one-line error."""
    fmt = ds.source_format(file)
    try:
        names = _schema(ds, file, fmt, block_bytes)
    except _read_errors() as e:
        raise _cannot_read(file, fmt, e) from None
    missing = [c for c in wanted if c not in names]
    if missing:
        raise GraphbuildError(f"{file}: no column {missing[0]!r} (columns: {', '.join(names)})")
    return {c: names[c] for c in wanted}


def _schema(ds: Dataset, file: Path, fmt: str, block_bytes: int) -> pl.Schema:
    if fmt == "parquet":
        return pl.scan_parquet(file).collect_schema()
    if fmt == "jsonl":  # inferred over every row, as scan_ndjson(infer_schema_length=None) does
        frames = [pl.DataFrame(schema=pl.read_ndjson(io.BytesIO(b), infer_schema_length=None).schema)
                  for b in _blocks(file, block_bytes, None) if b.strip()]
        return pl.concat(frames, how="diagonal_relaxed").schema if frames else pl.Schema()
    return _scan_csv(ds, file, fmt).collect_schema()


def _csv_options(ds: Dataset, fmt: str) -> dict:
    src = ds.manifest.source
    return {"separator": "\t" if fmt == "tsv" else ",", "has_header": src.has_header,
            "new_columns": src.columns, "quote_char": None if fmt == "tsv" else '"',
            "infer_schema": False,  # ids and texts stay strings, as written
            "encoding": "utf8"}


def _scan_csv(ds: Dataset, file: Path, fmt: str) -> pl.LazyFrame:
    return pl.scan_csv(file, **_csv_options(ds, fmt))


def batches(ds: Dataset, file: Path, types: dict[str, pl.DataType],
            block_bytes: int = BLOCK_BYTES, batch_rows: int = BATCH_ROWS) -> Iterator[pl.DataFrame]:
    """The file's rows in order, a batch at a time: the columns of `types`, with those dtypes."""
    fmt = ds.source_format(file)
    if fmt == "parquet":
        parts = _parquet_batches(file, list(types), batch_rows)
    elif fmt == "jsonl":
        parts = _jsonl_batches(ds, file, types, block_bytes)
    else:
        parts = _csv_batches(ds, file, fmt, list(types), block_bytes)
    errors = _read_errors()
    while True:
        try:
            df = next(parts)
        except StopIteration:
            return
        except errors as e:
            raise _cannot_read(file, fmt, e) from None
        yield df.select(pl.col(c).cast(t) for c, t in types.items())


def _parquet_batches(file: Path, columns: list[str], batch_rows: int) -> Iterator[pl.DataFrame]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(file) as pf:
        for b in pf.iter_batches(batch_size=batch_rows, columns=columns):
            yield pl.from_arrow(b)


def _jsonl_batches(ds: Dataset, file: Path, types: dict[str, pl.DataType],
                   block_bytes: int) -> Iterator[pl.DataFrame]:
    schema = _schema(ds, file, "jsonl", block_bytes)
    for block in _blocks(file, block_bytes, None):
        if block.strip():
            yield pl.read_ndjson(io.BytesIO(block), schema=schema).select(list(types))


def _csv_batches(ds: Dataset, file: Path, fmt: str, columns: list[str],
                 block_bytes: int) -> Iterator[pl.DataFrame]:
    options = _csv_options(ds, fmt)
    quote = None if options["quote_char"] is None else options["quote_char"].encode()
    first: bytes | None = None
    for block in _blocks(file, block_bytes, quote):
        if first is None:  # the header, or a headerless file's first row
            yield _parse_csv(block, options, columns)
            first = block[: _row_end(block, quote) + 1]
            continue
        df = _parse_csv(first + block, options, columns)
        yield df if options["has_header"] else df.slice(1)


def _parse_csv(block: bytes, options: dict, columns: list[str]) -> pl.DataFrame:
    # lazily, like a whole-file scan: with the projection pushed down, polars does not
    # check the fields of columns nobody asked for
    return pl.scan_csv(io.BytesIO(block), **options).select(columns).collect()


def _row_end(buf: bytes, quote: bytes | None, stop: int | None = None) -> int:
    """Index of the first newline in buf[:stop] outside quotes, or -1."""
    pos = buf.find(b"\n", 0, stop)
    if quote is None:
        return pos
    quotes = 0
    start = 0
    while pos >= 0:
        quotes += buf.count(quote, start, pos)
        if quotes % 2 == 0:
            return pos
        start = pos
        pos = buf.find(b"\n", pos + 1, stop)
    return -1


def _last_row_end(buf: bytes, quote: bytes | None) -> int:
    """Index of the last newline of buf outside quotes, or -1. buf starts at a row start.

    Inside quotes means after an odd number of quote characters, which is how polars
    itself finds row ends when it splits a file for its threads."""
    pos = buf.rfind(b"\n")
    if quote is None or pos < 0:
        return pos
    quotes = buf.count(quote, 0, pos)
    while pos >= 0 and quotes % 2:
        prev = buf.rfind(b"\n", 0, pos)
        quotes -= buf.count(quote, prev + 1, pos)
        pos = prev
    return pos


def _blocks(file: Path, block_bytes: int, quote: bytes | None) -> Iterator[bytes]:
    """The file's bytes in blocks of whole rows (about block_bytes each, or one long row)."""
    with open(file, "rb") as f:
        buf = b""
        while True:
            chunk = f.read(block_bytes)
            if not chunk:
                if buf:
                    yield buf
                return
            buf += chunk
            cut = _last_row_end(buf, quote)
            if cut >= 0:
                yield buf[: cut + 1]
                buf = buf[cut + 1:]


def data_bytes(ds: Dataset, file: Path) -> int:
    """About how many bytes the file's rows take unpacked: its size, or for Parquet the
    uncompressed size of its row groups."""
    if ds.source_format(file) != "parquet":
        return file.stat().st_size
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(file)
    except _read_errors():
        return file.stat().st_size  # reading it will say what is wrong
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
