"""A full disk and a read-only output: one clear line, exit 2, and a rerun after the fix
finishes with the same bytes. Real filesystems: a small tmpfs, a read-only bind mount."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import caption_manifest, coco_subset, graphbuild, one_error

pytestmark = [pytest.mark.skipif(os.geteuid() != 0,
                                 reason="not root: the tmpfs and bind mounts need root")]


def mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], check=False, capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount here: {r.stderr.strip()}")


@pytest.fixture
def mountpoint(tmp_path):
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disk")
    m = caption_manifest(tmp, coco_subset(tmp, 1000))
    ref = tmp / "ref"
    assert graphbuild("embed", m, "--out", ref, "--chunk-rows", "128", "-q").returncode == 0
    return m, ref


def embeddings(run: Path) -> np.ndarray:
    return zarr.open_array(str(run / "embeddings.zarr"), mode="r")[:]


def test_disk_full_then_rerun_after_space_is_freed(inputs, mountpoint):
    m, ref = inputs
    mount("-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mountpoint))
    out = mountpoint / "run"
    r = graphbuild("embed", m, "--out", out, "--chunk-rows", "128", "-q")
    assert "No space left on device" in one_error(r)
    done = list((out / "_state/embed/chunks").glob("*.done"))
    assert 0 < len(done) < 8, "the disk should fill part-way through the chunks"
    mount("-o", "remount,size=16m", str(mountpoint))
    assert graphbuild("embed", m, "--out", out, "--chunk-rows", "128", "-q").returncode == 0
    assert np.array_equal(embeddings(out), embeddings(ref))


def test_read_only_output_then_rerun_when_writable(inputs, tmp_path, mountpoint):
    m, ref = inputs
    source = tmp_path / "writable"
    source.mkdir()
    mount("--bind", str(source), str(mountpoint))
    mount("-o", "remount,bind,ro", str(mountpoint))
    out = mountpoint / "run"
    assert "Read-only file system" in one_error(
        graphbuild("embed", m, "--out", out, "--chunk-rows", "128", "-q"))
    assert not any(source.iterdir())
    mount("-o", "remount,bind,rw", str(mountpoint))
    assert graphbuild("embed", m, "--out", out, "--chunk-rows", "128", "-q").returncode == 0
    mount("-o", "remount,bind,ro", str(mountpoint))
    r = graphbuild("knn", out, "--k", "8", "-q")
    assert "Read-only file system" in one_error(r)
    mount("-o", "remount,bind,rw", str(mountpoint))
    assert graphbuild("knn", out, "--k", "8", "-q").returncode == 0
    assert np.array_equal(embeddings(out), embeddings(ref))
