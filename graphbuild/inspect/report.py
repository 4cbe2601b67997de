"""An HTML report of a finished run: one self-contained file, plus its plots as PNGs beside it.

The page holds its CSS inline and its images as base64 data: URIs, and links to nothing, so it
opens offline from anywhere. Sections (by id): summary, similarity, degree, entropy, examples,
provenance. Figures come from `stats`; plots are drawn by matplotlib's Agg backend.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphbuild import options
from graphbuild.errors import GraphbuildError
from graphbuild.inspect.stats import (
    RunArrays,
    figures,
    format_stats,
    load,
    soft_target_entropy,
)
from graphbuild.rundir.files import atomic_path

SECTIONS = {"summary": "Summary", "similarity": "Similarities", "degree": "In-degree and hubs",
            "entropy": "Soft-target entropy", "examples": "Example nodes",
            "provenance": "Provenance"}
TAUS = [0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0]
EXAMPLES = 5      # nodes per kind in the examples table
SHOWN = 5         # neighbours shown per example node

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2733;
background:#f5f7fa}
header{background:#1f3a5f;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:24px} header p{margin:4px 0 0;opacity:.85}
main{padding:8px 32px 40px;max-width:1200px}
section{background:#fff;border:1px solid #d9e0e8;border-radius:8px;padding:12px 20px;
margin:16px 0}
h2{font-size:19px;color:#1f3a5f;margin:6px 0 10px}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{border-bottom:1px solid #e4e9ef;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2f7} td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f0f3f7;padding:10px;white-space:pre-wrap;font-size:12px}
img{max-width:100%;border:1px solid #e4e9ef}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#eef4fb;border-radius:6px;padding:8px 14px;min-width:150px}
.card b{display:block;font-size:20px;color:#1f3a5f} .card span{font-size:12px;color:#51606f}
.kind{font-weight:600;color:#8a4b00}
"""


@dataclass
class Report:
    html: Path
    images: list[Path] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def write_report(out: str | Path, html_path: str | Path, tau_s: float = options.TAU_S,
                 batch_size: int = options.BATCH_SIZE, batches: int = options.BATCHES,
                 seed: int = options.SEED) -> Report:
    """Write the report of run `out` to `html_path` and its PNGs beside it."""
    options.entropy_options(tau_s, batch_size, batches)
    html_path = Path(html_path)
    if html_path.suffix.lower() not in (".html", ".htm"):
        raise GraphbuildError(f"{html_path}: the report is an .html file")
    data = load(out)
    stats = figures(data, tau_s, batch_size, batches, seed)
    taus = sorted(set(TAUS) | {tau_s})
    curve = soft_target_entropy(data.out, data.sample_nodes, taus, batch_size, batches, seed)
    try:
        html_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GraphbuildError(f"{html_path.parent}: cannot create: {e.strerror}") from None
    stem = html_path.with_suffix("")
    images = {
        "similarity": _plot_similarity(data, stats, Path(f"{stem}-similarity.png")),
        "degree": _plot_in_degree(data, stats, Path(f"{stem}-in-degree.png")),
        "entropy": _plot_entropy(curve, tau_s, Path(f"{stem}-entropy.png")),
    }
    page = _page(data, stats, curve, images, tau_s, seed)
    try:
        with atomic_path(html_path) as tmp:
            tmp.write_text(page, encoding="utf-8")
    except OSError as e:
        raise GraphbuildError(f"{html_path}: cannot write: {e.strerror}") from None
    return Report(html_path, list(images.values()), stats)


# ---------------------------------------------------------------- plots


def _figure(size=(8.0, 4.2)):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=110)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as e:
        raise GraphbuildError(f"{path}: cannot write: {e.strerror}") from None
    finally:
        plt.close(fig)
    return path


def _plot_similarity(data: RunArrays, stats: dict, path: Path) -> Path:
    plt, fig, ax = _figure()
    k = stats["graph"]["k"]
    series = [("all edges", data.sims, "#7f8c9a"), ("1st neighbour", data.first_sims(), "#2a9d8f"),
              (f"k-th neighbour (k={k})", data.kth_sims(), "#e76f51")]
    lo = float(min(s.min() for _, s, _ in series if len(s)))
    bins = np.linspace(max(-1.0, lo - 0.01), 1.0, 80)
    for label, s, colour in series:
        ax.hist(s, bins=bins, density=True, histtype="stepfilled", alpha=0.35, color=colour,
                edgecolor=colour, linewidth=1.2, label=f"{label}: median {np.median(s):.3f}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(f"Similarities in the top-{k} graph ({len(data.sims):,} edges)")
    ax.legend(loc="upper left", fontsize=9)
    return _save(plt, fig, path)


def _plot_in_degree(data: RunArrays, stats: dict, path: Path) -> Path:
    plt, fig, ax = _figure()
    deg = data.in_degree()
    k = stats["graph"]["k"]
    top = int(deg.max())
    bins = np.arange(0, top + 2) - 0.5 if top < 120 else np.linspace(-0.5, top + 0.5, 121)
    ax.hist(deg, bins=bins, color="#3d6fa8", alpha=0.85, log=True)
    ax.axvline(k, color="#e76f51", linestyle="--", label=f"k = {k} (the mean in-degree)")
    hub = stats["hubness"]
    ax.set_xlabel("in-degree (how many rows list the node)")
    ax.set_ylabel("nodes (log scale)")
    ax.set_title(f"In-degree: top {hub['top_fraction']:.0%} of nodes hold "
                 f"{hub['edge_share']:.1%} of edges; {stats['in_degree']['zero']:,} nodes have 0")
    ax.legend(fontsize=9)
    return _save(plt, fig, path)


def _plot_entropy(curve: list[dict], tau_s: float, path: Path) -> Path:
    plt, fig, ax = _figure()
    taus = [c["tau_s"] for c in curve]
    mean = [c["entropy_mean"] for c in curve]
    ax.fill_between(taus, [c["entropy_p5"] for c in curve], [c["entropy_p95"] for c in curve],
                    color="#2a9d8f", alpha=0.25, label="rows p5 to p95")
    ax.plot(taus, mean, "o-", color="#1f6f66", label="mean row entropy")
    hmax = curve[0]["entropy_max"]
    ax.axhline(hmax, color="#7f8c9a", linestyle=":", label=f"uniform: log(B-1) = {hmax:.2f}")
    at = next(c for c in curve if c["tau_s"] == tau_s)
    ax.axvline(tau_s, color="#e76f51", linestyle="--",
               label=f"tau_s = {tau_s:g}: {at['entropy_mean']:.2f} nats, "
                     f"~{at['effective_targets']:,.0f} effective targets")
    ax.set_xscale("log")
    ax.set_xlabel("tau_s (log scale)")
    ax.set_ylabel("row entropy (nats)")
    ax.set_ylim(bottom=0, top=hmax * 1.08)
    sec = ax.secondary_yaxis("right", functions=(np.exp, lambda y: np.log(np.maximum(y, 1e-9))))
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
             if math.log(t) <= hmax * 1.08]
    sec.set_yticks(ticks if len(ticks) <= 8 else ticks[::2])
    sec.set_ylabel("effective targets per row, exp(entropy)")
    ax.set_title(f"Soft-target row entropy, {curve[0]['batches']} random batches of "
                 f"B={curve[0]['batch_size']:,} samples")
    ax.legend(loc="lower right", fontsize=9)
    return _save(plt, fig, path)


# ---------------------------------------------------------------- page


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _table(header: list[str], rows: list[list], num: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_e(c)}</td>' if i in num else f"<td>{c}</td>"
        for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _example_nodes(data: RunArrays, seed: int) -> list[tuple[str, int]]:
    n = data.n_nodes
    rng = np.random.default_rng(seed)
    picked: list[tuple[str, int]] = []
    seen: set[int] = set()

    def add(kind: str, nodes) -> None:
        for i in nodes:
            if int(i) not in seen:
                seen.add(int(i))
                picked.append((kind, int(i)))

    add("random", np.sort(rng.choice(n, min(EXAMPLES, n), replace=False)))
    deg = data.in_degree()
    add("hub", np.lexsort((np.arange(n), -deg))[:EXAMPLES])
    first = np.full(n, np.inf)
    full = data.indptr[1:] > data.indptr[:-1]
    first[full] = data.sims[data.indptr[:-1][full]]
    add("lowest similarity", np.lexsort((np.arange(n), first))[:EXAMPLES])
    return picked


def _examples(data: RunArrays) -> str:
    from graphbuild.inspect.neighbors import node_texts

    picked = _example_nodes(data, options.SEED)
    deg = data.in_degree()
    rows_of = {i: data.indices[data.indptr[i]:min(data.indptr[i] + SHOWN, data.indptr[i + 1])]
               for _, i in picked}
    texts = node_texts(data.out, np.concatenate([np.array([i for _, i in picked]),
                                                 *rows_of.values()]))
    rows = []
    for kind, i in picked:
        lo = data.indptr[i]
        near = "<br>".join(
            f"{_e(texts.get(int(j), ''))} <small>(node {int(j)}, {data.sims[lo + r]:.3f})</small>"
            for r, j in enumerate(rows_of[i]))
        rows.append([f'<span class="kind">{_e(kind)}</span>', _e(i), _e(texts.get(i, "")),
                     _e(int(data.counts[i])), _e(int(deg[i])), near])
    return _table(["kind", "node", "text", "samples", "in-degree", f"top {SHOWN} neighbours (cos)"],
                  rows, num={1, 3, 4})


def _kv(d: dict) -> str:
    rows = [[_e(k), _e(json.dumps(v) if isinstance(v, (list, dict)) else v)]
            for k, v in d.items()]
    return _table(["key", "value"], rows)


def _page(data: RunArrays, stats: dict, curve: list[dict], images: dict, tau_s: float,
          seed: int) -> str:
    name = stats["dataset"] or data.out.name
    g, st = stats["graph"], stats["soft_targets"]
    cards = [("samples", f"{stats['samples']:,}"), ("nodes", f"{stats['nodes']:,}"),
             ("duplicate ratio", f"{stats['duplicate_ratio']:.2%}"),
             ("graph", f"{g['method']}, k={g['k']}"),
             ("median k-th nbr cos", f"{stats['sims']['kth']['p50']:.3f}"),
             ("top-1% hub edge share", f"{stats['hubness']['edge_share']:.1%}"),
             (f"entropy at tau_s={tau_s:g}", f"{st['entropy_mean']:.2f} nats")]
    if g["method"] != "exact":
        cards.insert(4, (f"recall@{g['k']}", f"{g['recall']:.3f}"))
    card_html = "".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                        for k, v in cards)
    curve_rows = [[f"{c['tau_s']:g}", f"{c['entropy_mean']:.3f}", f"{c['entropy_p5']:.3f}",
                   f"{c['entropy_p95']:.3f}", f"{c['effective_targets']:,.1f}",
                   f"{c['top_target_mean']:.4f}"] for c in curve]
    examples = _examples(data)
    info = data.info
    stages = info.get("stages", {})
    dataset = {k: v for k, v in info.get("dataset", {}).items() if k != "figures"}
    body = {
        "summary": f'<div class="cards">{card_html}</div><pre>{_e(format_stats(stats))}</pre>',
        "similarity": _img(images["similarity"], "similarity histograms")
        + "<p>Cosine of every stored edge, of each node's best neighbour and of its k-th "
          "(last stored) neighbour. A k-th neighbour close to the best means flat rows; a "
          "spike at 1.0 in the best neighbour means near-duplicate texts.</p>",
        "degree": _img(images["degree"], "in-degree distribution")
        + f"<p>Every row lists k={g['k']} neighbours, so the mean in-degree is k. Hubs "
          "(nodes in many rows) pull many samples' targets towards themselves; nodes with "
          "in-degree 0 are nobody's neighbour.</p>",
        "entropy": _img(images["entropy"], "soft-target entropy against tau_s")
        + _table(["tau_s", "mean entropy", "p5", "p95", "effective targets",
                  "mean largest target"], curve_rows, num={0, 1, 2, 3, 4, 5})
        + "<p>Rows of softmax<sub>j&ne;i</sub>(cos(t<sub>i</sub>, t<sub>j</sub>) / tau_s) over "
          "random batches of samples, as the trainer's exact targets (diagonal masked).</p>",
        "examples": examples,
        "provenance": "<h3>Embeddings (graph/_meta.json provenance)</h3>"
        + _kv(data.meta.get("provenance", {}))
        + "<h3>Graph</h3>" + _kv({k: v for k, v in data.meta.items()
                                  if k not in ("provenance", "parts")})
        + "<h3>Dataset</h3>" + _kv(dataset)
        + "".join(f"<h3>Stage {_e(s)}</h3>" + _kv(v) for s, v in stages.items()),
    }
    sections = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{body[sid]}</section>'
                       for sid, title in SECTIONS.items())
    when = time.strftime("%Y-%m-%d %H:%M")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>graphbuild report: {_e(name)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>graphbuild report: {_e(name)}</h1><p>{_e(data.out)} &middot; "
            f"{stats['nodes']:,} nodes &middot; generated {_e(when)}, seed {seed}</p></header>"
            f"<main>{sections}</main></body></html>\n")
