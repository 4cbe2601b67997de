"""A dataset's source files read a bounded batch at a time, parsed as polars parses them whole.

polars' own scans read a whole CSV or JSON lines file into memory before the first row comes
out, so text files are cut here into blocks of about `block_bytes` at row boundaries, and each
block is parsed by polars with the options a whole-file read would use. CSV and TSV blocks
start with the file's first row (the header, after any blank lines before it, or the first
row of a headerless file, dropped again), so every block sees the columns a whole-file read
sees. Parquet is read a batch of rows at a time, which holds one row group of the wanted
columns at most.

Compressed text files (.gz, .bz2 and .xz through the standard library, .zst through pyarrow's
zstd codec; the format is the suffix before, as in x.tsv.gz) are unpacked as they are read,
into the same blocks as their plain copy. Before any row is read, a text file's first 64 KiB
are checked: a Parquet file, compressed data under a plain name, other binary data, or text
that is not UTF-8 is refused by what it looks like (a byte that is not UTF-8 further on is
named by its line when polars stops at it). Column types are checked too: a text column holds
strings (in JSON lines row by row as well: a number or list among strings is refused); ids and
labels are strings or integers.

A value is null when the row lacks the field (a CSV or TSV row with too few fields, a JSON key
absent or null, a Parquet null) and "" when the field is there but empty. polars reads both as
null in CSV and TSV, so a block holding nulls is read again by Python's csv module, which
tells them apart by each row's field count.

A bad row is named by the physical line (1-based) it starts on in a text file and by its row
number in Parquet. The line is worked out only when an error is reported, from the rows each
block held (`block_rows`, one number per block of about 1 MiB) and the csv module's (or, for
JSON lines, the non-blank lines') reading of the one block holding the row.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import re
from collections.abc import Iterator, MutableSequence
from pathlib import Path
from typing import BinaryIO

import polars as pl

from graphbuild.errors import GraphbuildError
from graphbuild.prepare.manifest import COMPRESSIONS, Dataset

BLOCK_BYTES = 1 << 20  # parsing a block costs ~15x its size at peak; 1 MiB reads as fast as 16
BATCH_ROWS = 65_536
HEAD_BYTES = 64 << 10  # the first bytes of a text file checked for what it is
SAMPLE_BYTES = 1 << 20  # a compressed file's bytes unpacked to estimate its unpacked size
SAMPLE_OUT = 64 << 20  # ...or fewer, if they unpack to this much

# First bytes that say a file is not text: (pattern, what it is, the suffix that unpacks it)
_SIGNATURES = (
    (rb"PAR1", "a Parquet file", None),
    (rb"\x1f\x8b", "gzip-compressed data", ".gz"),
    (rb"BZh[1-9](1AY&SY|\x17rE8P\x90)", "bzip2-compressed data", ".bz2"),
    (rb"\xfd7zXZ\x00", "xz-compressed data", ".xz"),
    (rb"\x28\xb5\x2f\xfd", "zstd-compressed data", ".zst"),
    (rb"PK\x03\x04", "a zip archive", None),
    (rb"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", None),
    (rb"ARROW1", "an Arrow IPC file", None),
    (rb"\x00\x00\xfe\xff|\xff\xfe\x00\x00", "UTF-32 text", None),
    (rb"\xfe\xff|\xff\xfe", "UTF-16 text", None),
)
# A JSON value polars turned into a string may have been a number, a boolean, a list or an object.
_MAYBE_NOT_A_STRING = r"^(?:-?[0-9]|\[|\{|true$|false$)"


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def _cannot_read(file: Path, fmt: str, e: BaseException) -> GraphbuildError:
    return GraphbuildError(f"{file}: cannot read as {fmt}: {_one_line(e)}")


def _read_errors() -> tuple[type[BaseException], ...]:
    import lzma
    import zlib

    import pyarrow as pa

    # EOFError: a compressed file cut short; zlib.error, LZMAError: damaged compressed data
    return (pl.exceptions.PolarsError, OSError, EOFError, zlib.error, lzma.LZMAError,
            pa.ArrowException, UnicodeDecodeError)


# --- opening: unpacked as the suffix says, the first bytes checked ------------------------

def _compression(file: Path) -> str | None:
    return COMPRESSIONS.get(file.suffix.lower())


def _unpacked(file: Path, raw: BinaryIO) -> BinaryIO:
    """A reader of raw's bytes unpacked as file's suffix says; raw itself for a plain file."""
    import bz2
    import gzip
    import lzma

    kind = _compression(file)
    if kind is None:
        return raw
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == "bz2":
        return bz2.BZ2File(raw)
    if kind == "xz":
        return lzma.LZMAFile(raw)
    import pyarrow as pa

    if not pa.Codec.is_available("zstd"):
        raise GraphbuildError(f"{file}: this pyarrow cannot unpack zstd; unpack the file first")
    return pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd")


@contextlib.contextmanager
def _open(file: Path) -> Iterator[BinaryIO]:
    with open(file, "rb") as raw, _unpacked(file, raw) as f:
        yield f


def _check_head(file: Path, fmt: str) -> None:
    """Refuse a text source whose first bytes say it is something else."""
    with _open(file) as f:
        head = f.read(HEAD_BYTES)
    for pattern, what, suffix in _SIGNATURES:
        if re.match(pattern, head):
            hint = (f" (name it {file.name}{suffix} to have it unpacked)" if suffix else
                    " (a Parquet source needs format: parquet)" if what.endswith("Parquet file")
                    else "")
            raise GraphbuildError(f"{file}: looks like {what}, not {fmt} text{hint}")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise GraphbuildError(f"{file}: looks like binary data, not {fmt} text (a NUL byte on "
                              f"line {_line_of(head, nul)})")
    try:  # final=False: the head may end inside a character
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        raise _not_utf8(file, head, 1, e.start) from None


def _line_of(buf: bytes, offset: int, first_line: int = 1) -> int:
    """The line buf[offset] is on, buf's first byte being on line first_line."""
    return first_line + buf.count(b"\n", 0, offset)


def _not_utf8(file: Path, buf: bytes, first_line: int, offset: int) -> GraphbuildError:
    return GraphbuildError(f"{file}: line {_line_of(buf, offset, first_line)}: not UTF-8 text "
                           f"(byte 0x{buf[offset]:02x}); graphbuild reads UTF-8")


# --- schema and column types ---------------------------------------------------------------

def column_types(ds: Dataset, file: Path, wanted: list[str],
                 block_bytes: int = BLOCK_BYTES) -> dict[str, pl.DataType]:
    """dtypes of the wanted columns of one file; a missing column, or one of a type its role
    (text, label or id) cannot have, is a one-line error."""
    fmt = ds.source_format(file)
    try:
        names = _schema(ds, file, fmt, block_bytes)
    except _read_errors() as e:
        raise _cannot_read(file, fmt, e) from None
    missing = [c for c in wanted if c not in names]
    if missing:
        raise GraphbuildError(f"{file}: no column {missing[0]!r} (columns: {', '.join(names)})")
    for c in wanted:
        _check_type(ds, file, c, names[c])
    return {c: names[c] for c in wanted}


def _is_string(dtype: pl.DataType) -> bool:
    # Null: a column with no values at all, so every row lacks the field
    return dtype in (pl.String, pl.Null) or isinstance(dtype, (pl.Categorical, pl.Enum))


def _check_type(ds: Dataset, file: Path, column: str, dtype: pl.DataType) -> None:
    """Texts are strings; labels and ids are strings or integers. Numbers are refused as
    texts: a numeric text column is most likely the wrong column (a class index belongs in
    label_column), and embedding "17" as a caption would be a silent wrong result."""
    m = ds.manifest
    if column == m.text_column and not _is_string(dtype):
        if isinstance(dtype, (pl.List, pl.Array)):
            hint = "one text per row: explode the lists into rows first"
        elif dtype == pl.Binary:
            hint = "write the texts as UTF-8 strings"
        elif dtype.is_numeric() or dtype == pl.Boolean:
            hint = "numbers are not texts: class indices go in label_column"
        else:
            hint = "text_column must name a column of strings"
        raise GraphbuildError(f"{file}: column {column!r} has type {dtype}, not string; {hint}")
    if column in (m.label_column, m.id_column) and not (_is_string(dtype) or dtype.is_integer()):
        what = ("labels are class indices (integers), keys or names (strings)"
                if column == m.label_column else "sample ids are strings or integers")
        raise GraphbuildError(f"{file}: column {column!r} has type {dtype}; {what}")


def _schema(ds: Dataset, file: Path, fmt: str, block_bytes: int) -> pl.Schema:
    if fmt == "parquet":
        if _compression(file):
            raise GraphbuildError(f"{file}: a compressed Parquet file; unpack it first "
                                  "(Parquet compresses its own pages)")
        return pl.scan_parquet(file).collect_schema()
    _check_head(file, fmt)
    if fmt == "jsonl":  # inferred over every row, as scan_ndjson(infer_schema_length=None) does
        frames = [pl.DataFrame(schema=_parse_jsonl(file, line, block, None).schema)
                  for line, block in _numbered(_blocks(file, block_bytes, None)) if block.strip()]
        return pl.concat(frames, how="diagonal_relaxed").schema if frames else pl.Schema()
    options = _csv_options(ds, fmt)
    first = next(_csv_blocks(file, block_bytes, options), b"")
    return pl.scan_csv(io.BytesIO(first), **options).collect_schema()


def _csv_options(ds: Dataset, fmt: str) -> dict:
    src = ds.manifest.source
    return {"separator": "\t" if fmt == "tsv" else ",", "has_header": src.has_header,
            "new_columns": src.columns, "quote_char": None if fmt == "tsv" else '"',
            "infer_schema": False,  # ids and texts stay strings, as written
            "encoding": "utf8"}


def _scan_csv(ds: Dataset, file: Path, fmt: str) -> pl.LazyFrame:
    return pl.scan_csv(file, **_csv_options(ds, fmt))


def _quote(options: dict) -> bytes | None:
    return None if options["quote_char"] is None else options["quote_char"].encode()


# --- rows, a batch at a time ---------------------------------------------------------------

def batches(ds: Dataset, file: Path, types: dict[str, pl.DataType],
            block_bytes: int = BLOCK_BYTES, batch_rows: int = BATCH_ROWS,
            block_rows: MutableSequence[int] | None = None) -> Iterator[pl.DataFrame]:
    """The file's rows in order, a batch at a time: the columns of `types`, with those dtypes.

    For a text file each batch is one block of it, and `block_rows` (if given) gets each
    block's row count, which `row_place` needs to find a row's line."""
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
        if block_rows is not None and fmt != "parquet":
            block_rows.append(df.height)
        yield df.select(pl.col(c).cast(t) for c, t in types.items())


def _parquet_batches(file: Path, columns: list[str], batch_rows: int) -> Iterator[pl.DataFrame]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(file) as pf:
        for b in pf.iter_batches(batch_size=batch_rows, columns=columns):
            yield pl.from_arrow(b)


def _jsonl_batches(ds: Dataset, file: Path, types: dict[str, pl.DataType],
                   block_bytes: int) -> Iterator[pl.DataFrame]:
    schema = _schema(ds, file, "jsonl", block_bytes)
    text = ds.manifest.text_column
    for line, block in _numbered(_blocks(file, block_bytes, None)):
        if not block.strip():
            yield pl.DataFrame(schema={c: schema[c] for c in types})
            continue
        df = _parse_jsonl(file, line, block, schema).select(list(types))
        if text in types:
            _check_json_strings(file, line, block, df, text)
        yield df


def _parse_jsonl(file: Path, line: int, block: bytes, schema: pl.Schema | None) -> pl.DataFrame:
    try:
        if schema is None:
            return pl.read_ndjson(io.BytesIO(block), infer_schema_length=None)
        return pl.read_ndjson(io.BytesIO(block), schema=schema)
    except _read_errors() as e:
        raise _unparsable(file, "jsonl", line, block, e) from None


def _jsonl_rows(block: bytes) -> list[int]:
    """The line (0-based, in the block) of each row: polars skips blank lines."""
    return [i for i, text in enumerate(block.split(b"\n")) if text.strip(b" \t\r")]


def _check_json_strings(file: Path, line: int, block: bytes, df: pl.DataFrame,
                        column: str) -> None:
    """Refuse a row whose text is a JSON number, boolean, list or object: polars reads such a
    value as its JSON text when other rows hold strings. Only values that could be one
    (starting with a digit, '-', '[', '{', or true/false) are parsed again."""
    if df[column].dtype != pl.String:
        return
    suspects = df.select(pl.arg_where(pl.col(column).str.contains(_MAYBE_NOT_A_STRING)))
    if suspects.height == 0:
        return
    lines = block.split(b"\n")
    starts = _jsonl_rows(block)
    if len(starts) != df.height:
        return  # Python does not see the rows polars read: nothing more to say
    for i in suspects.to_series():
        try:
            value = json.loads(lines[starts[i]]).get(column)
        except (ValueError, AttributeError):
            continue  # polars read it; Python's json cannot say more
        if value is not None and not isinstance(value, str):
            raise GraphbuildError(f"{file}: line {line + starts[i]}: field {column!r} is a JSON "
                                  f"{type(value).__name__}, not a string")


def _csv_batches(ds: Dataset, file: Path, fmt: str, columns: list[str],
                 block_bytes: int) -> Iterator[pl.DataFrame]:
    options = _csv_options(ds, fmt)
    quote = _quote(options)
    first: bytes | None = None
    names: list[str] = []
    for k, (line, block) in enumerate(_numbered(_csv_blocks(file, block_bytes, options))):
        if first is None:  # the header (after any blank lines), or a headerless file's first row
            first = block[: _first_row_end(block, quote, options["has_header"]) + 1]
            names = list(pl.scan_csv(io.BytesIO(block), **options).collect_schema())
            df = _parse_csv(file, fmt, line, block, block, options, columns, names)
        else:
            df = _parse_csv(file, fmt, line, block, first + block, options, columns, names)
            df = df if options["has_header"] else df.slice(1)
        yield _present_fields(df, block, options, names, header=k == 0)


def _parse_csv(file: Path, fmt: str, line: int, block: bytes, data: bytes, options: dict,
               columns: list[str], names: list[str]) -> pl.DataFrame:
    # lazily, like a whole-file scan: with the projection pushed down, polars does not
    # check the fields of columns nobody asked for
    try:
        return pl.scan_csv(io.BytesIO(data), **options).select(columns).collect()
    except _read_errors() as e:
        raise _unparsable(file, fmt, line, block, e, options, names, header=data is block) \
            from None


def _present_fields(df: pl.DataFrame, block: bytes, options: dict, names: list[str],
                    header: bool) -> pl.DataFrame:
    """df with "" where polars gave null for a field the row has: polars reads an empty field
    and a missing one both as null. Where Python's csv module does not see the block's rows
    as polars did, the nulls stay (the fields count as missing)."""
    nulls = [c for c in df.columns if df[c].null_count()]
    if not nulls:
        return df
    rows = _csv_rows(block, options, header)
    if rows is None or len(rows) != df.height:
        return df
    fields = pl.Series([n for _, n in rows], dtype=pl.Int64)
    return df.with_columns(
        pl.when(pl.col(c).is_null() & (fields > names.index(c))).then(pl.lit(""))
        .otherwise(pl.col(c)).alias(c) for c in nulls)


@contextlib.contextmanager
def _csv_field_limit(n: int) -> Iterator[None]:
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, n))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _csv_rows(block: bytes, options: dict, header: bool) -> list[tuple[int, int]] | None:
    """(line in the block, 0-based; field count) of each data row of a CSV or TSV block, as
    Python's csv module reads it (a blank line is a row of no fields, as in polars); `header`:
    the block starts the file, so blank lines, then the header, come first. None where the
    csv module cannot read the block."""
    # a lone CR is data to polars, a line end to the csv module; neither changes the lines
    text = block.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", " ")
    if header:
        text = text.removeprefix("\ufeff")
    style = ({"quoting": csv.QUOTE_NONE} if options["quote_char"] is None
             else {"quotechar": options["quote_char"]})
    reader = csv.reader(io.StringIO(text, newline="\n"), delimiter=options["separator"], **style)
    rows: list[tuple[int, int]] = []
    at = 0
    try:
        with _csv_field_limit(len(text)):
            for fields in reader:
                rows.append((at, len(fields)))
                at = reader.line_num
    except csv.Error:
        return None
    if header and options["has_header"]:
        skip = 0
        while skip < len(rows) and rows[skip][1] == 0:  # polars skips blank lines before it
            skip += 1
        rows = rows[skip + 1:]
    return rows


# --- cutting a file into blocks of whole rows ----------------------------------------------

def _row_end(buf: bytes, quote: bytes | None, stop: int | None = None, start: int = 0) -> int:
    """Index of the first newline in buf[start:stop] outside quotes, or -1."""
    pos = buf.find(b"\n", start, stop)
    if quote is None:
        return pos
    quotes = 0
    while pos >= 0:
        quotes += buf.count(quote, start, pos)
        if quotes % 2 == 0:
            return pos
        start = pos
        pos = buf.find(b"\n", pos + 1, stop)
    return -1


def _first_row_end(buf: bytes, quote: bytes | None, has_header: bool) -> int:
    """Index of the newline ending the first row; with a header, blank lines before it (which
    polars skips) do not count as the first row. -1 if buf holds no whole first row."""
    start = 0
    if has_header:
        start = len(buf) - len(buf.lstrip(b"\r\n"))
    return _row_end(buf, quote, start=start)


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
    """The file's bytes (unpacked) in blocks of whole rows (about block_bytes each, or one
    long row)."""
    with _open(file) as f:
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


def _csv_blocks(file: Path, block_bytes: int, options: dict) -> Iterator[bytes]:
    """`_blocks` of a CSV or TSV file, the first one reaching past the header, so that every
    later block can be parsed after the header."""
    quote = _quote(options)
    blocks = _blocks(file, block_bytes, quote)
    first = b""
    for block in blocks:
        first += block
        if not options["has_header"] or _first_row_end(first, quote, True) >= 0:
            break
    if first:
        yield first
    yield from blocks


def _numbered(blocks: Iterator[bytes]) -> Iterator[tuple[int, bytes]]:
    """Each block with the file's line number (1-based) its first byte is on."""
    line = 1
    for block in blocks:
        yield line, block
        line += block.count(b"\n")


def _unparsable(file: Path, fmt: str, line: int, block: bytes, e: BaseException,
                options: dict | None = None, names: list[str] | None = None,
                header: bool = False) -> GraphbuildError:
    """One line for a block polars cannot parse, naming the line at fault where it can."""
    try:
        block.decode("utf-8")
    except UnicodeDecodeError as u:
        return _not_utf8(file, block, line, u.start)
    if fmt == "jsonl":
        lines = block.split(b"\n")
        for i in _jsonl_rows(block):
            try:
                json.loads(lines[i])
            except ValueError as j:
                msg = f"{j.msg} at column {j.colno}" if isinstance(j, json.JSONDecodeError) else j
                return GraphbuildError(f"{file}: line {line + i}: cannot read as jsonl: {msg}")
    elif options is not None and names:
        for at, n in _csv_rows(block, options, header) or []:
            if n > len(names):
                return GraphbuildError(f"{file}: line {line + at}: cannot read as {fmt}: {n} "
                                       f"fields, more than the {len(names)} columns")
    last = _line_of(block, max(len(block) - 1, 0), line)
    return GraphbuildError(f"{file}: lines {line}-{last}: cannot read as {fmt}: {_one_line(e)}")


# --- where a row is, how big a file is -----------------------------------------------------

def row_place(ds: Dataset, file: Path, row: int, block_rows: MutableSequence[int],
              block_bytes: int = BLOCK_BYTES) -> str:
    """Where data row `row` (0-based) of a file is, as a user looks it up: "line N", the
    physical line (1-based) it starts on, in a text file read in blocks of `block_bytes` that
    held `block_rows` rows each; "row N" (0-based) in Parquet."""
    fmt = ds.source_format(file)
    if fmt == "parquet":
        return f"row {row}"
    line = _row_line(ds, file, fmt, row, block_rows, block_bytes)
    return f"line {line}" if line is not None else f"data row {row + 1}"


def _row_line(ds: Dataset, file: Path, fmt: str, row: int, block_rows: MutableSequence[int],
              block_bytes: int) -> int | None:
    """None where the block's rows, read again, do not match what polars read."""
    if fmt == "jsonl":
        blocks = _blocks(file, block_bytes, None)
    else:
        options = _csv_options(ds, fmt)
        blocks = _csv_blocks(file, block_bytes, options)
    before = 0
    for k, (line, block) in enumerate(_numbered(blocks)):
        if k >= len(block_rows):
            return None
        if row < before + block_rows[k]:
            if fmt == "jsonl":
                starts = _jsonl_rows(block)
            else:
                starts = [at for at, _ in _csv_rows(block, options, k == 0) or []]
            return line + starts[row - before] if len(starts) == block_rows[k] else None
        before += block_rows[k]
    return None


def data_bytes(ds: Dataset, file: Path) -> int:
    """About how many bytes the file's rows take unpacked: its size; for a compressed text
    file, its size times the ratio its first SAMPLE_BYTES unpack to (the exact size if it is
    smaller); for Parquet the uncompressed size of its row groups."""
    size = file.stat().st_size
    if ds.source_format(file) != "parquet":
        return _unpacked_bytes(file, size) if _compression(file) else size
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(file)
    except _read_errors():
        return size  # reading it will say what is wrong
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def _unpacked_bytes(file: Path, size: int) -> int:
    """The size a compressed file unpacks to: exact if it does so within the sample, else
    extrapolated from the last point of the sample where the unpacked bytes had caught up
    with the packed bytes read (bzip2 gives out a whole block's bytes at once, well after
    reading them)."""
    try:
        with open(file, "rb") as raw, _unpacked(file, raw) as f:
            out, read = 0, raw.tell()
            caught_up = (0, 0)  # (unpacked bytes, packed bytes read) at that point
            while chunk := f.read(1 << 13):
                out += len(chunk)
                if raw.tell() == read:  # these bytes came without reading more
                    caught_up = (out, read)
                read = raw.tell()
                if read >= SAMPLE_BYTES or out >= SAMPLE_OUT:
                    unpacked, packed = caught_up if caught_up[1] else (out, read)
                    return unpacked * size // max(packed, 1)
            return out
    except _read_errors():
        return size  # reading it will say what is wrong
