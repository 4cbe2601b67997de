"""Dataset manifests: a small YAML file that says where the texts are and how to read them.

Paths inside a manifest are resolved relative to the manifest file, never the working
directory, so a manifest can be moved together with its data. YAML is read with the safe
loader: tags that would build Python objects are refused.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from graphbuild.errors import GraphbuildError

Format = Literal["parquet", "csv", "tsv", "jsonl"]
_SUFFIX_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv",
                   ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
# A text file with one of these suffixes is read unpacked (graphbuild/sources.py); its format
# is the suffix before, as in x.tsv.gz.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}


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

    @property
    def is_labels(self) -> bool:
        return self.text_column is None


class Dataset:
    """A validated manifest with its paths resolved."""

    def __init__(self, manifest: Manifest, path: Path, source_override: str | None = None):
        self.manifest = manifest
        self.path = path
        self._source_override = source_override

    @property
    def name(self) -> str:
        return self.manifest.name

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
        m = self.manifest
        if m.classes is not None:
            entries = [c if isinstance(c, ClassEntry) else ClassEntry(name=c) for c in m.classes]
        else:
            cf = self.path.parent / m.classes_file
            try:
                lines = cf.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise GraphbuildError(f"{cf}: cannot read classes_file: {e}") from None
            entries = []
            for line in lines:
                if not line.strip():
                    continue
                # "n01440764 tench, Tinca tinca" (ImageNet's synset mapping) or a bare name
                key, sep, rest = line.strip().partition(" ")
                if sep and key[:1] == "n" and key[1:].isdigit():
                    entries.append(ClassEntry(name=rest.split(",")[0].strip(), key=key))
                else:
                    entries.append(ClassEntry(name=line.strip()))
        for i, e in enumerate(entries):
            if not e.name.strip():
                raise GraphbuildError(f"{self.path}: classes[{i}]: empty class name")
        return entries

    def fingerprint(self) -> str:
        """Changes when the manifest, the set of source file names, or a file's size changes.

        Names and sizes, not paths and mtimes, so staging a copy of the data on another node
        (as array tasks often do) still counts as the same input.
        """
        h = hashlib.sha256(self.manifest.model_dump_json().encode())
        for f in self.source_files():
            h.update(json.dumps([f.name, f.stat().st_size]).encode())
        return h.hexdigest()[:16]


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
    return Dataset(manifest, path.resolve(), source)
