"""Dataset manifests: a small YAML file that says where the texts are and how to read them.

Paths inside a manifest are resolved relative to the manifest file, never the working
directory, so a manifest can be moved together with its data. YAML is read with the safe
loader: tags that would build Python objects are refused. A class list is read and checked
when the manifest is loaded, before any work starts.

`Dataset.reading()` and `Dataset.source_records()` are what a run's tables depend on: the
settings that read the source and the class list, and each source file's name, size and
content hash (prepare/stage.py compares them with the run's record).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from graphbuild.errors import GraphbuildError

Format = Literal["parquet", "csv", "tsv", "jsonl"]
_SUFFIX_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv",
                   ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
# A text file with one of these suffixes is read unpacked (sources.py); its format
# is the suffix before, as in x.tsv.gz.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}

log = logging.getLogger(__name__)

WORDNET_KEY = re.compile(r"n[0-9]{8}")  # a classes_file line "n01440764 tench, ..." has one
HASH = "sha256"  # of each source file; from hashlib (benchmarks/fingerprint.py compares them)
HASH_BLOCK = 1 << 20
# A file written this close to (or after) the moment its hash was taken may be written again
# within the same timestamp tick, leaving size and mtime as recorded (git's "racily clean"
# entries); its recorded hash is not trusted. 2 s covers the coarsest common clocks (FAT, some
# network filesystems).
RACY_NS = 2_000_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    path: str | list[str] = Field(description="file, glob, or list of them")
    format: Format | None = Field(None, description="inferred from the suffix when absent")
    has_header: bool = True
    columns: list[str] | None = Field(None, description="column names for headerless files")


class ClassEntry(_Strict):
    name: str
    key: str | None = Field(None, description="another label spelling, e.g. a WordNet id")


class Manifest(_Strict):
    """A dataset: captions (text_column) or class labels (classes or classes_file).

    Class lists, decided so that a label never lands on the wrong class in silence (labels
    are looked up by index, then key, then name; texts.py):
    - classes_file: a line is "KEY NAME[, synonyms]" only when KEY is a WordNet id (n and 8
      digits, ImageNet's LOC_synset_mapping.txt); any other line is the name, whole
      ("n95 respirator").
    - Each class is its own node, node id = class index, even when two share a name:
      ImageNet's usual lists do ("crane", "maillot"; the shipped imagenet1k.yaml has
      "missile" and "sunglasses" twice, with distinct WordNet ids), and labels by index or
      key must keep reaching their class. Such classes get the same text, so the same
      vector; loading warns, naming them. A label spelled as a shared name maps to the
      first of them, which has the same text.
    - A name or key that spells the index of another class (classes '1', '2', '3': label
      "1" would mean class 1, named '2') is refused; numbers that are their own index
      ('0', '1', '2') are fine. A key shared by two classes, or equal to another class's
      name, is refused: one label spelling, two classes.
    - An empty list (classes: [], or a classes_file without names) is refused, as are
      empty templates.
    """

    name: str = Field(min_length=1)
    source: Source | None = None
    id_column: str | None = Field(None, description="absent: the row number is the id")
    text_column: str | None = None
    label_column: str | None = None
    classes: list[str | ClassEntry] | None = None
    classes_file: str | None = None
    templates: list[str] = Field(default_factory=lambda: ["{}"])
    examples: list[str] = Field(default_factory=list, description="texts whose neighbours "
                                "`graphbuild run` prints at the end")

    @model_validator(mode="after")
    def _one_kind(self) -> Manifest:
        has_classes = self.classes is not None or self.classes_file is not None
        if self.classes is not None and self.classes_file is not None:
            raise ValueError("give classes or classes_file, not both")
        if self.text_column is not None and has_classes:
            raise ValueError("give text_column (captions) or classes (labels), not both")
        if self.text_column is None and not has_classes:
            raise ValueError("missing text_column (captions) or classes/classes_file (labels)")
        if self.text_column is not None and self.source is None:
            raise ValueError("text_column needs a source")
        if has_classes and self.source is not None and self.label_column is None:
            raise ValueError("a labelled source needs label_column")
        for t in self.templates:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain '{{}}' exactly once")
        return self

    @field_validator("templates")
    @classmethod
    def _some_templates(cls, templates: list[str]) -> list[str]:
        if not templates:  # no text to embed: every vector would be 0/0
            raise ValueError("an empty list; give at least one template, such as '{}'")
        return templates

    @field_validator("classes")
    @classmethod
    def _some_classes(cls, classes: list | None) -> list | None:
        if classes is not None and not classes:
            raise ValueError("an empty list; give at least one class")
        return classes

    @property
    def is_labels(self) -> bool:
        return self.text_column is None


class Dataset:
    """A validated manifest with its paths resolved."""

    def __init__(self, manifest: Manifest, path: Path, source_override: str | None = None):
        self.manifest = manifest
        self.path = path
        self._source_override = source_override
        self._entries: list[ClassEntry] | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def source_override(self) -> str | None:
        """The --source that replaces the manifest's source.path, if one was given."""
        return self._source_override

    def source_files(self) -> list[Path]:
        """Files of the source, sorted, each glob expanded; raises if a pattern matches none."""
        src = self.manifest.source
        if src is None:
            return []
        if self._source_override is not None:
            patterns = [str(Path(self._source_override).expanduser())]
        else:
            raw = src.path if isinstance(src.path, list) else [src.path]
            patterns = [os.path.normpath(self.path.parent / Path(p).expanduser()) for p in raw]
        files: list[Path] = []
        for pattern in patterns:
            matched = sorted(glob.glob(pattern))
            if not matched:
                where = "--source" if self._source_override is not None else f"{self.path}: source.path"
                raise GraphbuildError(f"{where}: {pattern} matches no file")
            files.extend(Path(m) for m in matched)
        return files

    def source_format(self, file: Path) -> Format:
        fmt = self.manifest.source.format if self.manifest.source else None
        if fmt is not None:
            return fmt
        suffix = file.suffix.lower()
        if suffix in COMPRESSIONS:
            suffix = Path(file.stem).suffix.lower()
        fmt = _SUFFIX_FORMATS.get(suffix)
        if fmt is None:
            raise GraphbuildError(f"{self.path}: source.format: cannot infer the format of "
                                  f"{file.name}; set it to parquet, csv, tsv or jsonl")
        return fmt  # type: ignore[return-value]

    def class_entries(self) -> list[ClassEntry]:
        """The class list, read (classes_file) and checked once; see Manifest for the rules."""
        if self._entries is None:
            entries, places = self._read_classes()
            _check_classes(entries, places)
            self._entries = entries
        return self._entries

    def _read_classes(self) -> tuple[list[ClassEntry], list[str]]:
        """The entries, and where each was given (for messages)."""
        m = self.manifest
        if m.classes is not None:
            entries = [c if isinstance(c, ClassEntry) else ClassEntry(name=c) for c in m.classes]
            return entries, [f"{self.path}: classes[{i}]" for i in range(len(entries))]
        cf = self.classes_file()
        try:
            lines = cf.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise GraphbuildError(f"{cf}: cannot read classes_file: {e}") from None
        entries, places = [], []
        for n, line in enumerate(lines, 1):
            if line.strip():
                entries.append(_class_line(line.strip()))
                places.append(f"{cf}: line {n}")
        if not entries:
            raise GraphbuildError(f"{cf}: holds no class names (classes_file of {self.path})")
        return entries, places

    def classes_file(self) -> Path | None:
        m = self.manifest
        return None if m.classes_file is None else self.path.parent / m.classes_file

    def reading(self) -> dict:
        """Everything besides the source files' bytes that the tables depend on: the columns
        read, the CSV options where a CSV or TSV file is read, the class list (by a hash of
        its names and keys). Not the templates (the store's provenance holds them), the
        examples, or where the manifest lives."""
        m = self.manifest
        out: dict = {}
        if m.source is not None:
            out["id_column"] = m.id_column
            formats = {self.source_format(f) for f in self.source_files()}
            if formats & {"csv", "tsv"}:
                out["has_header"], out["columns"] = m.source.has_header, m.source.columns
        if not m.is_labels:
            out["text_column"] = m.text_column
            return out
        if m.source is not None:
            out["label_column"] = m.label_column
        entries = self.class_entries()
        listed = json.dumps([[e.name, e.key] for e in entries], ensure_ascii=False)
        out["classes"] = len(entries)
        out["classes_sha256"] = hashlib.sha256(listed.encode()).hexdigest()
        return out

    def source_records(self, known: list[dict] | None = None) -> list[dict]:
        """Per source file, in reading order: name, path, format, bytes, mtime_ns, a content
        hash, and hashed_ns (when that hash was started).

        A file whose name, size and mtime equal a `known` record's keeps that record's hash,
        unless the file was written within RACY_NS of that hash; any other file is read and
        hashed now (a staged copy with other mtimes is hashed, and matches)."""
        by_name = {r["name"]: r for r in known or [] if isinstance(r, dict) and HASH in r}
        records = []
        for f in self.source_files():
            started = time.time_ns()
            st = _stat(f)
            record = {"name": f.name, "path": str(f), "format": self.source_format(f),
                      "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
            old = by_name.get(f.name)
            if (old is not None and (old["bytes"], old["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
                    and st.st_mtime_ns < old["hashed_ns"] - RACY_NS):
                record[HASH], record["hashed_ns"] = old[HASH], old["hashed_ns"]
            else:
                record[HASH], record["hashed_ns"] = hash_file(f), started
            records.append(record)
        return records


def settle_records(records: list[dict]) -> list[dict]:
    """The records, with files hashed within RACY_NS of their last write hashed again now if
    that window has passed (then later tasks trust the record); a different hash means the
    file was written while it was read."""
    settled = []
    for r in records:
        started = time.time_ns()
        if r["mtime_ns"] >= r["hashed_ns"] - RACY_NS and started > r["mtime_ns"] + RACY_NS:
            if hash_file(Path(r["path"])) != r[HASH]:
                raise GraphbuildError(f"{r['path']}: changed while it was read; rerun once "
                                      "it is final")
            r = {**r, "hashed_ns": started}
        settled.append(r)
    return settled


def _stat(file: Path) -> os.stat_result:
    try:
        return file.stat()
    except OSError as e:
        raise GraphbuildError(f"{file}: cannot read: {e.strerror}") from None


def hash_file(file: Path) -> str:
    """The file's content hash (HASH), read in blocks of HASH_BLOCK bytes."""
    h = hashlib.new(HASH)
    buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    try:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    except OSError as e:
        raise GraphbuildError(f"{file}: cannot read: {e.strerror}") from None
    return h.hexdigest()


def _class_line(line: str) -> ClassEntry:
    """"n01440764 tench, Tinca tinca" (ImageNet's synset mapping) or a bare name."""
    key, sep, rest = line.partition(" ")
    if sep and WORDNET_KEY.fullmatch(key) and rest.strip():
        return ClassEntry(name=rest.split(",")[0].strip(), key=key)
    return ClassEntry(name=line)


def _index_spelled(text: str | None, n: int) -> int | None:
    """The class index that a label spelled `text` is read as (texts.py matches str(i))."""
    if text is not None and text.isascii() and text.isdigit() and text == str(int(text)):
        return int(text) if int(text) < n else None
    return None


def _check_classes(entries: list[ClassEntry], places: list[str]) -> None:
    """Refuse a class list in which one label spelling means two classes; warn about shared
    names (see Manifest)."""
    n = len(entries)
    key_of, name_of = {}, {}
    for i, e in enumerate(entries):
        if not e.name.strip():
            raise GraphbuildError(f"{places[i]}: empty class name")
        name_of.setdefault(e.name, i)
    for i, e in enumerate(entries):
        for what, text in (("class name", e.name), ("key", e.key)):
            j = _index_spelled(text, n)
            if j is not None and j != i:
                raise GraphbuildError(
                    f"{places[i]}: {what} {text!r} spells the index of class {j} "
                    f"({entries[j].name!r}), so a label {text!r} would mean class {j}; rename "
                    "it, or order the classes so that each number is its own index")
        if e.key is None:
            continue
        if e.key in key_of:
            raise GraphbuildError(f"{places[i]}: key {e.key!r} is also the key of class "
                                  f"{key_of[e.key]}; a label {e.key!r} would mean either")
        if name_of.get(e.key, i) != i:
            raise GraphbuildError(f"{places[i]}: key {e.key!r} is also the name of class "
                                  f"{name_of[e.key]}; a label {e.key!r} would mean either")
        key_of[e.key] = i
    _warn_shared_names(entries)


def _warn_shared_names(entries: list[ClassEntry]) -> None:
    classes: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        classes.setdefault(" ".join(e.name.split()), []).append(i)
    shared = {text: ids for text, ids in classes.items() if len(ids) > 1}
    if not shared:
        return
    listed = ", ".join(f"{text!r} (classes {', '.join(map(str, ids))})"
                       for text, ids in shared.items())
    log.warning("%d class names are shared: %s; each class stays its own node, with the same "
                "text and so the same vector; labels by index or key tell them apart, a label "
                "spelled as a shared name maps to the first class listed", len(shared), listed)


def load_manifest(path: str | Path, source: str | None = None) -> Dataset:
    """Read and validate a manifest; every failure is a one-line GraphbuildError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GraphbuildError(f"{path}: cannot read manifest: {e.__class__.__name__}: "
                              f"{getattr(e, 'strerror', None) or e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GraphbuildError(f"{path}:{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise GraphbuildError(f"{path}: a manifest must be a YAML mapping, got {type(raw).__name__}")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "manifest"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise GraphbuildError(f"{path}: {loc}: {msg}{more}") from None
    if source is not None and manifest.source is None:
        raise GraphbuildError(f"{path}: --source given, but the manifest has no source")
    ds = Dataset(manifest, path.resolve(), source)
    if manifest.is_labels:
        ds.class_entries()  # read and checked now, before any work starts
    return ds
