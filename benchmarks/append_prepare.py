"""An append's prepare: the tables extended from the new files, against the whole-source build.

    python benchmarks/append_prepare.py [--rows 2000000] [--share 0.01] [--data DIR]
                                        [--workdir /tmp/graphbuild-append-prepare]

The old source is --rows real captions with string ids ("id<TAB>caption", CC12M-like keys),
as benchmarks/fingerprint.py builds its 2M rows: the 91,307 captions of ../shared/data in a
fixed shuffled order, then again suffixed " 1", " 2", ...; the new file holds the next
--share x --rows captions of the same sequence (new texts, new ids). The old run's tables are
prepared once into --workdir (the old file dated an hour back, so its recorded hash is
trusted as a finished run's is) and reused. Each run of this script then appends the new file
to two copies of it: `prepare_append` extended (the new file and the run's tables) and
whole-source (every file read again, as before extend.py), timed one after the other, the
tables compared byte for byte. Asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import benchmarks.embed as embed_bench

MANIFEST = "name: append-prepare\nsource: {path: src/*.tsv, format: tsv}\nid_column: id\n" \
           "text_column: caption\n"


def write_captions(path: Path, lo: int, hi: int, pool: list[str]) -> None:
    """Captions lo..hi-1 of the sequence (ids "c{i:09d}"), written through a temp file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("id\tcaption\n")
        f.writelines(f"c{i:09d}\t{pool[i % len(pool)]}"
                     + (f" {i // len(pool)}" if i >= len(pool) else "") + "\n"
                     for i in range(lo, hi))
    tmp.replace(path)


def old_run(w: Path, rows: int, new_rows: int) -> Path:
    """The old run's folder (m.yaml, src/a.tsv, run/ prepared), built once; b.tsv held aside."""
    from graphbuild.prepare.manifest import load_manifest
    from graphbuild.prepare.stage import prepare
    from graphbuild.rundir.paths import RunDir

    base = w / f"base-{rows}-{new_rows}"
    if (base / "run" / "run.json").exists():
        return base
    shutil.rmtree(base, ignore_errors=True)
    pool = embed_bench.caption_pool()
    pool = random.Random(0).sample(pool, len(pool))
    (base / "src").mkdir(parents=True)
    (base / "m.yaml").write_text(MANIFEST)
    write_captions(base / "src" / "a.tsv", 0, rows, pool)
    write_captions(base / "b.tsv.held", rows, rows + new_rows, pool)
    hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(base / "src" / "a.tsv", ns=(hour_ago, hour_ago))
    prepare(load_manifest(base / "m.yaml"), RunDir(base / "run"))
    return base


def timed_append(base: Path, w: Path, whole_source: bool) -> tuple[float, Path]:
    """Seconds of prepare_append of b.tsv on a copy of the old run."""
    from graphbuild.prepare.append import prepare_append
    from graphbuild.prepare.manifest import load_manifest
    from graphbuild.rundir.paths import RunDir

    out = w / ("whole" if whole_source else "extended")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base / "run", out)
    new = base / "src" / "b.tsv"
    (base / "b.tsv.held").replace(new)
    try:
        t0 = time.perf_counter()
        added = prepare_append(load_manifest(base / "m.yaml"), RunDir(out), False,
                               before=lambda: None, whole_source=whole_source)
        seconds = time.perf_counter() - t0
    finally:
        new.replace(base / "b.tsv.held")
    assert [r["name"] for r in added] == ["b.tsv"]
    return seconds, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--share", type=float, default=0.01)
    p.add_argument("--data", type=Path, default=embed_bench.DATA)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/graphbuild-append-prepare"))
    a = p.parse_args()
    embed_bench.DATA = a.data  # caption_pool reads it
    new_rows = round(a.rows * a.share)
    base = old_run(a.workdir, a.rows, new_rows)
    size = (base / "src" / "a.tsv").stat().st_size
    whole, whole_out = timed_append(base, a.workdir, whole_source=True)
    extended, out = timed_append(base, a.workdir, whole_source=False)
    same = all((out / t).read_bytes() == (whole_out / t).read_bytes()
               for t in ("nodes.parquet", "samples.parquet"))
    print(f"append prepare, {new_rows:,} new captions onto {a.rows:,} ({size / 2**20:,.0f} MiB "
          f"TSV, page cache): whole-source {whole:.2f}s, extended {extended:.2f}s: "
          f"extended/whole {extended / whole:.3f}; tables byte-identical: {same}")


if __name__ == "__main__":
    main()
