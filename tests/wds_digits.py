"""The digits as a real WebDataset, a run over their captions keyed by the same keys, and
its export: built with examples/digits_xclr.py's own functions, for the export and stream
tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "digits_xclr.py"


def example():
    spec = importlib.util.spec_from_file_location("digits_xclr", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits_export(root: Path, payload: str = "fp16") -> tuple[Path, Path, Path]:
    """(shards, run, sidecars): all 1,797 digits in 5 tars of 400 (the last 197)."""
    ex = example()
    x, y, _train, _test = ex.load_digits_split()
    return ex.export_digit_shards(root, x, y, np.arange(len(y)), payload, per_shard=400)
