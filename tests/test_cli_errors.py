"""The command line itself: usage errors and bad flag values are one line and exit 2, before
any work starts (no run directory made, no source read, no model loaded)."""

from __future__ import annotations

import pytest

from tests.conftest import COCO, caption_manifest, cli_in_process, graphbuild, one_error


def test_a_mistyped_command_is_a_usage_error():
    r = graphbuild("exprot")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "No such command 'exprot'" in r.stderr


def test_a_missing_argument_is_a_usage_error():
    r = graphbuild("embed")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "Missing argument" in r.stderr


def test_an_unknown_flag_is_a_usage_error():
    r = graphbuild("knn", "runs/x", "--kk", "3")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--kk" in r.stderr


EMBED = ["embed", "{m}", "--out", "{o}", "-q"]
KNN = ["knn", "{o}", "-q"]
RUN = ["run", "{m}", "--out", "{o}", "-q"]
# (argv, the flag the one error line must name)
CASES = {
    "chunk-rows-0": (EMBED + ["--chunk-rows", "0"], "--chunk-rows"),
    "chunk-rows-negative": (EMBED + ["--chunk-rows", "-3"], "--chunk-rows"),
    "token-budget-0": (EMBED + ["--token-budget", "0"], "--token-budget"),
    "token-budget-negative": (EMBED + ["--token-budget", "-5"], "--token-budget"),
    "precision-int8": (EMBED + ["--precision", "int8"], "--precision"),
    "device-tpu": (EMBED + ["--device", "tpu"], "--device"),
    "block-rows-0": (KNN + ["--block-rows", "0"], "--block-rows"),
    "block-rows-negative": (KNN + ["--block-rows", "-4"], "--block-rows"),
    "recall-above-1": (KNN + ["--recall-target", "1.5"], "--recall-target"),
    "recall-0": (KNN + ["--recall-target", "0"], "--recall-target"),
    "recall-nan": (KNN + ["--recall-target", "nan"], "--recall-target"),
    "k-0": (KNN + ["--k", "0"], "--k"),
    "method-unknown": (KNN + ["--method", "hnsw"], "--method"),
    "knn-device-tpu": (KNN + ["--device", "tpu"], "--device"),
    "run-device-tpu": (RUN + ["--device", "tpu"], "--device"),
    "run-recall-nan": (RUN + ["--recall-target", "nan"], "--recall-target"),
    "stats-tau-nan": (["stats", "{o}", "--tau-s", "nan"], "--tau-s"),
    "stats-tau-0": (["stats", "{o}", "--tau-s", "0"], "--tau-s"),
    "report-tau-negative": (["report", "{o}", "--tau-s", "-1"], "--tau-s"),
    "stats-batch-size-1": (["stats", "{o}", "--batch-size", "1"], "--batch-size"),
    "neighbors-k-0": (["neighbors", "{o}", "a dog", "--k", "0"], "--k"),
    "lock-timeout-negative": (["--lock-timeout", "-1"] + KNN, "--lock-timeout"),
    "submit-shards-0": (["submit", "slurm", "{m}", "--out", "{o}", "--knn-shards", "0",
                         "--dry-run"], "--knn-shards"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_flag_value_stops_before_any_work(case, tmp_path, monkeypatch, capsys):
    argv, flag = CASES[case]
    m, out = caption_manifest(tmp_path, COCO), tmp_path / "run"
    argv = [a.format(m=m, o=out) for a in argv]
    code, _, err = cli_in_process(monkeypatch, capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert flag in errors[0], errors[0]
    assert not out.exists(), "a refused command made its run directory"


def test_bad_flag_through_the_real_cli(tmp_path):
    """The same, as a user meets it: a subprocess, its exit code and its one line."""
    m = caption_manifest(tmp_path, COCO)
    error = one_error(graphbuild("embed", m, "--out", tmp_path / "run", "--chunk-rows", "0"))
    assert "--chunk-rows must be >= 1, got 0" in error
    assert not (tmp_path / "run").exists()


def test_lock_timeout_flag_gives_up_naming_the_holder(coco3k, monkeypatch, capsys):
    """--lock-timeout reaches the lock: with the run's lock held, knn gives up with one line."""
    from graphbuild.rundir.locks import LOCK_TIMEOUT_ENV
    from graphbuild.rundir.paths import RunDir

    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "")  # restored after the test, which the flag sets
    with RunDir(coco3k).lock():  # another open file: flock makes it a second holder
        code, _, err = cli_in_process(monkeypatch, capsys, "--lock-timeout", "0.5", "knn",
                                      coco3k, "--k", "16", "-q")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert ".lock: still held by pid" in errors[0], errors[0]
