"""What checking a run's inputs and chunks costs, against the work it guards.

    python benchmarks/fingerprint.py [--rows N] [--repeats R] [--data DIR]

1. Source content hashes (graphbuild/prepare/stage.py). A TSV of N (default 2,000,000) real
   captions, built in a temp dir as benchmarks/embed.py builds its sources (the 91,307
   captions of ../shared/data, then the same again suffixed " 1", " 2", ...). Times, with the
   file in the page cache: sha256 and blake2b over it; prepare's own work on it (the tables,
   `build_tables`); a first prepare (tables + sha256); a rerun's prepare when size and mtime
   are as recorded (no read) and after a touch (one re-hash). Best of --repeats, except
   the reruns.
2. A rerun's crc32c check of its own chunks (embed._todo): a store of 16 chunks of 8,192 x 384
   fp16 rows, each file read and checked, against encoding a chunk (at the bf16 rate measured
   in benchmarks/results/embed.txt).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import benchmarks.embed as embed_bench
from benchmarks.embed import caption_pool, caption_source

BF16_TEXTS_PER_S = 1351  # benchmarks/results/embed.txt, graphbuild bf16 on these 2 cores


def hash_seconds(path: Path, algorithm: str, repeats: int) -> float:
    best = float("inf")
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    for _ in range(repeats):
        t0 = time.perf_counter()
        h = hashlib.new(algorithm)
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        h.hexdigest()
        best = min(best, time.perf_counter() - t0)
    return best


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def source_hashes(rows: int, repeats: int, tmp: Path) -> None:
    from graphbuild.prepare.manifest import load_manifest
    from graphbuild.prepare.stage import prepare
    from graphbuild.prepare.texts import build_tables
    from graphbuild.rundir.paths import RunDir

    manifest = caption_source(rows, caption_pool(), tmp)
    ds = load_manifest(manifest)
    src = ds.source_files()[0]
    size = src.stat().st_size
    print(f"source: {rows:,} captions, {size / 2**20:,.1f} MiB TSV (in the page cache)")
    hashes = {a: hash_seconds(src, a, repeats) for a in ("sha256", "blake2b")}
    for a, s in hashes.items():
        print(f"  {a:<8} {s:6.2f} s  {size / s / 2**20:6,.0f} MiB/s")
    tables = min(timed(lambda: build_tables(ds, tmp / "tables")) for _ in range(repeats))
    print(f"  build_tables (prepare's own work)       {tables:7.3f} s   sha256 is "
          f"{hashes['sha256'] / tables:.1%} of it")
    runs = [RunDir(tmp / f"run{i}") for i in range(repeats)]
    first = min(timed(lambda r=r: prepare(load_manifest(manifest), r)) for r in runs)
    print(f"  first prepare (tables + sha256)         {first:7.3f} s")
    run = runs[0]
    trusted = timed(lambda: prepare(load_manifest(manifest), run))
    print(f"  rerun, size and mtime as recorded       {trusted:7.3f} s")
    os.utime(src)
    touched = timed(lambda: prepare(load_manifest(manifest), run))
    print(f"  rerun after a touch (one re-hash)       {touched:7.3f} s")


def chunk_checks(tmp: Path, repeats: int) -> None:
    import zarr
    from zarr.codecs import Crc32cCodec

    from graphbuild.rundir.store import StoredRows

    rows, dim, n_chunks = 8192, 384, 16
    store = tmp / "embeddings.zarr"
    arr = zarr.create_array(store=str(store), shape=(rows * n_chunks, dim), chunks=(rows, dim),
                            dtype="float16", compressors=[Crc32cCodec()], fill_value=0)
    x = np.random.default_rng(0).standard_normal((rows * n_chunks, dim), dtype=np.float32)
    arr[:] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    rows_of = StoredRows(store)  # embed's rerun check reads each marked chunk: `check`
    size = sum(rows_of.chunk_file(c).stat().st_size for c in range(n_chunks))
    best = min(timed(lambda: [rows_of.check(c) for c in range(n_chunks)])
               for _ in range(repeats))
    per_chunk = best / n_chunks
    encode = rows / BF16_TEXTS_PER_S
    print(f"chunk crc32c check: {n_chunks} chunks of {rows:,} x {dim} fp16, {size / 2**20:.0f} MiB "
          f"(in the page cache)")
    print(f"  {best:.3f} s, {size / best / 2**20:,.0f} MiB/s, {per_chunk * 1e3:.1f} ms a chunk; "
          f"encoding a chunk at {BF16_TEXTS_PER_S:,} texts/s takes {encode:.1f} s "
          f"({per_chunk / encode:.2%})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", type=Path, default=embed_bench.DATA,
                   help="the captions folder of shared/data (default: beside the repository)")
    args = p.parse_args()
    embed_bench.DATA = args.data  # caption_pool reads it
    print(f"$ python benchmarks/fingerprint.py --rows {args.rows} --repeats {args.repeats} "
          f"--data {args.data}")
    print(f"{os.cpu_count()} cores, Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as d:
        source_hashes(args.rows, args.repeats, Path(d))
    with tempfile.TemporaryDirectory() as d:
        chunk_checks(Path(d), args.repeats)


if __name__ == "__main__":
    main()
