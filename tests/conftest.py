"""Shared fixtures. Real text comes from tests/data (the repository's own fixture); the few
tests that need ../shared/data's size skip without it and say so. Tests marked `gpu` skip
without CUDA ("no CUDA")."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data"
COCO = FIXTURES / "coco_val2017_captions_3k.tsv"  # the first 3,000 COCO val2017 captions
SHARED = REPO.parent / "shared" / "data"
STS_TEST = SHARED / "sts" / "stsb_sts-test.csv"

needs_shared = pytest.mark.skipif(not SHARED.is_dir(),
                                  reason=f"no ../shared: {SHARED} is not present")


@functools.cache
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_runtest_setup(item):
    """A test marked `gpu` needs CUDA; torch is imported only when such a test runs."""
    if item.get_closest_marker("gpu") and not cuda_available():
        pytest.skip("no CUDA: a GPU test (benchmarks/gpu_check.sh runs them on a GPU machine)")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def coco_subset(tmp: Path, rows: int) -> Path:
    """The first `rows` (at most 3,000) COCO captions as a TSV of our own (the header kept)."""
    assert rows <= 3000, "tests/data holds the first 3,000 COCO captions"
    lines = COCO.read_text(encoding="utf-8").splitlines()[: rows + 1]
    return write(tmp / "coco.tsv", "\n".join(lines) + "\n")


def caption_manifest(tmp: Path, source: Path, name: str = "coco") -> Path:
    return write(tmp / f"{name}.yaml",
                 f"name: {name}\nsource: {{path: {source}, format: tsv}}\n"
                 "id_column: caption_id\ntext_column: caption\n")


def graphbuild(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "graphbuild", *map(str, args)], check=False,
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="session")
def st_model():
    """The default model as plain sentence-transformers, for independent comparisons."""
    from graphbuild.embedding.models import load_sentence_transformer, resolve_model

    return load_sentence_transformer(resolve_model("all-MiniLM-L6-v2"), "cpu")


def cli_in_process(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from graphbuild.cli import main

    monkeypatch.setattr(sys, "argv", ["graphbuild", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


def one_error(r: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a failed command, after checking it failed as promised."""
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def coco3k(tmp_path_factory):
    """3,000 COCO captions, k=16, three chunks of 1,024 rows (the last one short), built once
    per session by test_xclr_runs. Read-only: tests that break things break copies."""
    from tests.test_xclr_runs import coco_run

    return coco_run(tmp_path_factory)
