"""rundir.store.StoredRows, the one checked reader of embeddings.zarr, against zarr's own
reader on a real run (coco3k: 2,993 rows in chunks of 1,024, the last one short and stored
padded): the same values for every kind of read, in RAM and memory-mapped, and a refusal
naming the chunk's file wherever a chunk is missing, truncated or fails its crc32c."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from graphbuild.errors import GraphbuildError
from graphbuild.rundir.store import StoredRows, StoreError

MODES = pytest.mark.parametrize("mmap", [False, True], ids=["ram", "mmap"])


@pytest.fixture(scope="module")
def stored(coco3k) -> np.ndarray:
    """coco3k's rows as zarr reads them."""
    import zarr

    return np.asarray(zarr.open_array(str(coco3k / "embeddings.zarr"), mode="r")[:])


def store_copy(coco3k: Path, tmp_path: Path) -> Path:
    shutil.copytree(coco3k / "embeddings.zarr", tmp_path / "embeddings.zarr")
    return tmp_path / "embeddings.zarr"


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x08
    path.write_bytes(bytes(data))


def zarr_refuses(store: Path, lo: int, hi: int) -> bool:
    """Whether zarr's own reader refuses rows lo..hi-1 (a crc32c mismatch)."""
    import zarr

    try:
        zarr.open_array(str(store), mode="r")[lo:hi]
    except ValueError as e:
        assert "checksum" in str(e)
        return True
    return False


def refusal(store: Path, c: int, rows: str, what: str) -> str:
    """The one line StoredRows gives for chunk c, as a regular expression."""
    return re.escape(f"{store}/c/{c}/0: chunk {c} (rows {rows}) {what}; rerun `graphbuild "
                     "embed` to redo it") + "$"


@MODES
def test_every_kind_of_read_equals_zarrs(coco3k, stored, mmap):
    rows = StoredRows(coco3k / "embeddings.zarr", mmap=mmap)
    n = len(stored)
    assert rows.shape == stored.shape == (2993, 384) and rows.n_chunks == 3
    assert rows.chunk_rows == 1024 and rows.attrs["n_nodes"] == n
    for lo, hi in [(0, n), (0, 1024), (1024, 2048), (2048, n), (5, 6), (1000, 2100),
                   (1023, 1025), (n - 1, n), (7, 7), (2500, n + 100)]:
        got = rows.read(lo, hi)
        assert got.dtype == np.float16 and got.flags.c_contiguous
        assert np.array_equal(got, stored[lo:hi]), (lo, hi)
        assert np.array_equal(rows[lo:hi], stored[lo:hi]), (lo, hi)
    assert np.array_equal(rows.load(), stored)
    blocks = list(rows.blocks(range(700, n), 2000))  # cut at whole chunks: 1024, 2048
    assert [lo for lo, _ in blocks] == [700, 1024, 2048]
    assert np.array_equal(np.concatenate([b for _, b in blocks]), stored[700:])


@MODES
def test_gather_keeps_the_order_given(coco3k, stored, mmap):
    rows = StoredRows(coco3k / "embeddings.zarr", mmap=mmap)
    unsorted = np.array([2992, 0, 1500, 1024, 1023, 0, 2048, 5, 2992])
    for nodes in (unsorted, np.sort(unsorted), unsorted.tolist(), np.arange(0, 2993, 7),
                  np.array([], np.int64)):
        got = rows.gather(nodes)
        assert got.shape == (len(nodes), 384)
        assert np.array_equal(got, stored[np.asarray(nodes, np.int64)])
    assert np.array_equal(rows[unsorted], stored[unsorted])
    with pytest.raises(GraphbuildError, match=r"embeddings.zarr: row 2993 is not one of its 2993"):
        rows.gather([1, 2993])
    with pytest.raises(GraphbuildError, match=r"row -1 is not one of"):
        rows.gather([-1])
    with pytest.raises(TypeError):
        rows.gather(np.ones(3, bool))
    with pytest.raises(TypeError):
        rows[3]


@MODES
def test_a_flipped_byte_is_refused_where_zarr_refuses_it(coco3k, stored, tmp_path, mmap):
    """A byte flipped in chunk 1's rows, in chunk 0's stored crc, and in the padding of the
    short last chunk (the crc32c covers it): every read touching one of them is refused in
    one line naming the chunk's file, exactly where zarr's own reader refuses; the rows of
    sound chunks still read."""
    store = store_copy(coco3k, tmp_path)
    flip(store / "c/1/0", 1000)
    flip(store / "c/0/0", 1024 * 384 * 2 + 1)
    flip(store / "c/2/0", (2993 - 2048 + 10) * 384 * 2)
    assert [zarr_refuses(store, lo, lo + 1) for lo in (0, 1024, 2048)] == [True, True, True]
    rows = StoredRows(store, mmap=mmap)
    corrupt = "fails its crc32c check, it is corrupt"
    reads = (lambda r: rows.gather([r]), lambda r: rows.read(r, r + 1),
             lambda r: rows[r - 1:r + 1])
    for c, span, row in [(0, "0-1023", 3), (1, "1024-2047", 2000), (2, "2048-2992", 2992)]:
        for read in reads:
            for _ in range(2):  # and a failed chunk keeps failing
                with pytest.raises(StoreError, match=refusal(store, c, span, corrupt)):
                    read(row)
    with pytest.raises(StoreError, match=refusal(store, 0, "0-1023", corrupt)):
        rows.load()

    shutil.copy(coco3k / "embeddings.zarr/c/0/0", store / "c/0/0")
    shutil.copy(coco3k / "embeddings.zarr/c/2/0", store / "c/2/0")
    rows = StoredRows(store, mmap=mmap)
    assert np.array_equal(rows.read(0, 1024), stored[:1024])
    assert np.array_equal(rows.gather([2992, 5]), stored[[2992, 5]])
    with pytest.raises(StoreError, match=refusal(store, 1, "1024-2047", corrupt)):
        rows.gather([5, 1500])


@MODES
def test_a_missing_or_truncated_chunk_is_refused_never_zeros(coco3k, stored, tmp_path, mmap):
    import zarr

    store = store_copy(coco3k, tmp_path)
    (store / "c/1/0").unlink()
    assert not np.asarray(zarr.open_array(str(store), mode="r")[1024:2048]).any()  # zarr: zeros
    part = store / "c/2/0"
    part.write_bytes(part.read_bytes()[:-100])
    rows = StoredRows(store, mmap=mmap)
    size = 1024 * 384 * 2 + 4
    assert (rows.chunk_bytes, rows.file_problem(0)) == (size, None)
    assert rows.file_problem(1) == "is missing"
    assert rows.file_problem(2) == f"is {size - 100} bytes, a chunk is {size}"
    with pytest.raises(StoreError, match=refusal(store, 1, "1024-2047", "is missing")):
        rows.gather([3, 1500])
    with pytest.raises(StoreError, match=refusal(store, 2, "2048-2992",
                                                 f"is {size - 100} bytes, a chunk is {size}")):
        rows.read(2100, 2200)
    with pytest.raises(StoreError, match=r"c/1/0: chunk 1 \(rows 1024-2047\) is missing"):
        rows.load()
    assert np.array_equal(rows.read(0, 1024), stored[:1024])


def test_mapped_chunks_are_checked_once_read_ones_at_every_read(coco3k, stored, monkeypatch):
    """mmap: a chunk is mapped and its crc32c checked at its first use, then kept; a pickled
    copy (a DataLoader worker's) maps and checks again. RAM: bytes read from a file are
    checked each time they are read."""
    import google_crc32c

    import graphbuild.rundir.store as store_module

    checked = []
    crc32c = google_crc32c.value

    def counting(data):
        checked.append(len(data))
        return crc32c(data)

    monkeypatch.setattr(store_module.google_crc32c, "value", counting)
    mapped = StoredRows(coco3k / "embeddings.zarr", mmap=True)
    for _ in range(3):
        assert np.array_equal(mapped.gather([7, 1030, 8]), stored[[7, 1030, 8]])
    assert len(checked) == 2  # chunks 0 and 1, once each
    copy = pickle.loads(pickle.dumps(mapped))
    assert np.array_equal(copy.gather([9]), stored[[9]]) and len(checked) == 3
    in_ram = StoredRows(coco3k / "embeddings.zarr")
    for _ in range(3):
        assert np.array_equal(in_ram.gather([7, 1030, 8]), stored[[7, 1030, 8]])
    assert len(checked) == 3 + 6


def test_validate_names_every_bad_chunk(coco3k, tmp_path):
    """validate's emb-chunks check reads through StoredRows and goes on past a bad chunk:
    one line per chunk, with the reader's own words."""
    from graphbuild.inspect.validate import validate

    run = tmp_path / "run"
    shutil.copytree(coco3k, run)
    store = run / "embeddings.zarr"
    flip(store / "c/0/0", 50)
    (store / "c/1/0").unlink()
    flip(store / "c/2/0", 50)
    lines = [str(p) for p in validate(run).problems if p.check == "emb-chunks"]
    redo, corrupt = "; rerun `graphbuild embed` to redo it", "fails its crc32c check, it is corrupt"
    assert lines == [f"emb-chunks: {store}/c/0/0: chunk 0 (rows 0-1023) {corrupt}{redo}",
                     f"emb-chunks: {store}/c/1/0: chunk 1 (rows 1024-2047) is missing{redo}",
                     f"emb-chunks: {store}/c/2/0: chunk 2 (rows 2048-2992) {corrupt}{redo}"]
