"""Rebuild or check the COCO caption fixture from ../shared/data.

    python tests/data/make_fixture.py          # check the committed file against the source
    python tests/data/make_fixture.py --write  # write it again

The fixture is the header and the first 3,000 data rows of COCO val2017's captions (600
images, five captions each, in the source's order), so tests that take "the first N
captions" see the same rows with or without ../shared.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[2] / "shared" / "data" / "captions" / "coco_val2017_captions.tsv"
FIXTURE = HERE / "coco_val2017_captions_3k.tsv"
ROWS = 3000


def build() -> bytes:
    lines = SOURCE.read_text(encoding="utf-8").splitlines()[: ROWS + 1]
    return ("\n".join(lines) + "\n").encode("utf-8")


def main() -> int:
    if not SOURCE.exists():
        print(f"{SOURCE}: not present; cannot rebuild the fixture", file=sys.stderr)
        return 2
    data = build()
    if "--write" in sys.argv[1:]:
        FIXTURE.write_bytes(data)
    same = FIXTURE.exists() and FIXTURE.read_bytes() == data
    print(f"{FIXTURE.name}: sha256 {hashlib.sha256(data).hexdigest()} "
          f"{'matches' if same else 'DIFFERS FROM'} the first {ROWS} rows of {SOURCE.name}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
