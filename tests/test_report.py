"""graphbuild report: one self-contained HTML file with its PNGs, rendered in headless Chromium."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import graphbuild

CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = ["summary", "similarity", "degree", "entropy", "examples", "provenance"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3,000 COCO captions, k=16: the run test_xclr_runs builds (shared within a session)."""
    from tests.test_xclr_runs import coco_run

    return coco_run(tmp_path_factory)


@pytest.fixture(scope="module")
def report(run, tmp_path_factory) -> Path:
    html = tmp_path_factory.mktemp("report") / "coco report.html"  # a space: file URLs quote it
    r = graphbuild("report", run, "--out", html, "--tau-s", "0.07", "--batches", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(f"report: {html} (images: ")
    return html


def test_report_is_self_contained(report):
    page = report.read_text(encoding="utf-8")
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in page
    imgs = re.findall(r'<img src="([^"]*)"', page)
    assert len(imgs) == 3 and all(s.startswith("data:image/png;base64,") for s in imgs)
    for src in imgs:  # each one a whole PNG
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    # nothing to fetch: no URLs, no scripts, no stylesheets or other resources
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.IGNORECASE)
    assert not re.search(r"<(script|link|iframe|object|embed)\b|@import|url\(", page, re.IGNORECASE)
    assert not re.search(r'\b(src|href)="(?!data:)', page)
    pngs = sorted(p.name for p in report.parent.glob("*.png"))
    assert pngs == sorted(f"coco report-{s}.png" for s in ("similarity", "in-degree", "entropy"))
    for p in report.parent.glob("*.png"):
        assert p.read_bytes().startswith(PNG) and p.stat().st_size > 10_000
    assert '<td class="num">0.07</td>' in page  # the chosen tau_s is a point of the curve


def test_report_renders_in_headless_chromium(report, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium: {CHROMIUM} is not installed (./dev.sh test installs it as root)")
    from PIL import Image

    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
           # any network access would fail: no proxy answers, no name resolves
           "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--virtual-time-budget=5000", f"--screenshot={shot}", "--window-size=1280,4000",
           "--dump-dom", report.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    headings = re.findall(r'<section id="([a-z]+)"><h2>([^<]+)</h2>', dom)
    assert [sid for sid, _ in headings] == SECTIONS
    assert dict(headings)["entropy"] == "Soft-target entropy"
    assert len(re.findall(r'<img src="data:image/png;base64,', dom)) == 3
    assert "graphbuild report: coco" in dom

    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 4000)
    colours = img.getcolors(maxcolors=1 << 20)
    assert len(colours) > 500  # text, tables and plots, not a blank page
    # the plots were decoded and drawn: the in-degree bars' blue (#3d6fa8 at alpha 0.85 on
    # white) covers a good area of the page
    bar = (90, 133, 181)
    near = sum(n for n, c in colours if max(abs(a - b) for a, b in zip(c, bar)) <= 3)
    assert near > 5_000, near
