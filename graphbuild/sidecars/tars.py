"""The WebDataset shards an export answers: the tars of a directory and each tar's keys, read
as webdataset reads them.

webdataset groups a tar's regular files into samples by key: a file's key is its path up to
the first dot of its base name (`dir/000123.jpg` -> `dir/000123`), and consecutive files of
one key are one sample. Files named `__...__` and files without a dot in the base name are
skipped. `tar_keys` applies the same rules (tests/test_export.py holds it to webdataset's own
reader) and reads only the tar's headers, seeking past the data.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

from graphbuild.errors import GraphbuildError

KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def list_tars(like: Path) -> list[Path]:
    """The tars directly in `like`, sorted by name; refuses a directory with none."""
    if not like.is_dir():
        raise GraphbuildError(f"--like {like}: not a directory of WebDataset shards")
    tars = sorted(p for p in like.glob("*.tar") if p.is_file())
    if not tars:
        raise GraphbuildError(f"--like {like}: holds no .tar files; give the directory of the "
                              "WebDataset shards (NAME.tar) the trainer streams")
    return tars


def _key(name: str) -> str | None:
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None
    if META.match(name):
        return None
    m = KEY.match(name)
    return m.group(1) if m else None


def tar_keys(path: Path, limit: int | None = None) -> list[str]:
    """The tar's sample keys in order (the first `limit` of them); a key that comes back
    after another key's files is an error, since a sidecar row is found by key."""
    keys: list[str] = []
    seen: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tf:
            for member in tf:
                key = _key(member.name) if member.isreg() else None
                if key is None or (keys and keys[-1] == key):
                    continue
                if key in seen:
                    raise GraphbuildError(f"{path}: key {key!r} is two samples (its files are "
                                          "not together); a sidecar row is found by key")
                if limit is not None and len(keys) == limit:
                    break
                keys.append(key)
                seen.add(key)
                tf.members = []  # headers already walked are not needed again
    except (tarfile.TarError, OSError, EOFError) as e:
        raise GraphbuildError(f"{path}: cannot read tar: {e}") from None
    return keys
