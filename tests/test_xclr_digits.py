"""The digits example end to end, tiny: targets from a graphbuild run, no text encoder in
the training process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "digits_xclr.py"

GUARD = """
import importlib.abc, runpy, sys
BLOCK = ("sentence_transformers", "transformers")

class NoTextEncoder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCK:
            raise ImportError(f"text encoder imported during training: {name}")
        return None

assert not [m for m in BLOCK if m in sys.modules]
sys.meta_path.insert(0, NoTextEncoder())
sys.argv = ["digits_xclr.py", "--run", sys.argv[1], "--epochs", "1", "--seeds", "0",
            "--limit", "256"]
runpy.run_path(%r, run_name="__main__")
assert not [m for m in BLOCK if m in sys.modules]
"""


def _example():
    spec = importlib.util.spec_from_file_location("digits_xclr", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_training_reads_targets_without_a_text_encoder(tmp_path):
    pytest.importorskip("sklearn")
    from graphbuild.xclr import SoftTargets, read_sample_nodes

    ex = _example()
    _x, y, _train, _test = ex.load_digits_split()
    run = ex.build_run(tmp_path / "digits", y)
    assert np.array_equal(read_sample_nodes(run), y.numpy())  # sample i -> its class node
    t = SoftTargets.from_run(run, tau_s=0.05)(np.arange(20), views=2)
    same = (y[:20, None] == y[None, :20]).repeat(2, 2).numpy()
    np.fill_diagonal(same, False)
    assert t[same].min() > t[~same].max()  # a same-class pair outweighs any other class
    done = subprocess.run([sys.executable, "-c", GUARD % str(EXAMPLE), str(run)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    for objective in ("simclr", "supcon", "xclr"):
        assert f"  {objective:7s} seed 0: kNN acc" in done.stdout
