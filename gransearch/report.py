"""Reporting, apart from computing: the ablations' CSV rows, markdown tables and plots.

The studies in :mod:`gransearch.ablate` compute rows; this module appends them to CSVs (resumable),
reads them back, and turns them into the tables and figures of ``docs/granularity.md``. Plots need
matplotlib (the ``plot`` extra) and are skipped with a warning without it. Run folders of a search
are written by :mod:`gransearch.runs`.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from typing import Optional, Sequence

import torch

from .plan import GB
from .methods import METHODS
from .spec import ActSpec

log = logging.getLogger(__name__)

__all__ = ["WEIGHT_FIELDS", "ACT_FIELDS", "read_rows", "append_row", "weights_markdown", "activations_markdown", "plot_weights",
           "plot_activations", "diagnosis_heatmap", "act_text"]

WEIGHT_FIELDS = ["model", "method", "spec", "bits", "granularity", "ppl", "delta_pct", "bits_per_weight", "model_bytes",
                 "linear_bytes", "eval_tokens", "eval_seconds"]
ACT_FIELDS = ["model", "config", "kind", "weights", "act", "alpha", "threshold", "outlier_share", "ppl", "delta_pct",
              "eval_tokens", "eval_seconds"]


def read_rows(path: Optional[str], key: Sequence[str]) -> dict[tuple, dict]:
    """Rows of a CSV written by an ablation, keyed by the ``key`` columns (empty if no file)."""
    if not path or not os.path.exists(path):
        return {}
    with open(path, newline="") as fh:
        return {tuple(r[k] for k in key): r for r in csv.DictReader(fh)}


def append_row(path: Optional[str], fields: Sequence[str], row: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fields)
        if fh.tell() == 0:
            w.writeheader()
        w.writerow(row)


def weights_markdown(rows: Sequence[dict]) -> str:
    """One line per (bits, granularity), one column per method: perplexity and its change."""
    fp = next((r for r in rows if r["method"] == "fp"), None)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines = []
    if fp:
        lines.append(f"unquantized: perplexity {float(fp['ppl']):.3f} ({fp['eval_tokens']} tokens), {int(fp['model_bytes']) / GB:.4f} GB\n")
    lines.append("| bits | granularity | bits/weight | model GB | " + " | ".join(methods) + " |")
    lines.append("|---:|---|---:|---:|" + "---:|" * len(methods))
    seen = []
    for r in rows:
        if r["method"] != "fp" and (r["bits"], r["granularity"]) not in seen:
            seen.append((r["bits"], r["granularity"]))
    for b, g in seen:
        cells = {r["method"]: r for r in rows if r["bits"] == b and r["granularity"] == g}
        any_r = next(iter(cells.values()))
        vals = []
        for m in methods:
            c = cells.get(m)
            vals.append("-" if c is None else f"{float(c['ppl']):.3f} ({float(c['delta_pct']):+.1f}%)")
        lines.append(f"| {b} | {g} | {any_r['bits_per_weight']} | {int(any_r['model_bytes']) / GB:.4f} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional
        log.warning("matplotlib is not installed: no plot written")
        return None
    return plt


def plot_weights(rows: Sequence[dict], path: str) -> bool:
    """Perplexity (log scale) against bits per weight, one line per method and granularity.

    Left: every granularity; right: the same without per-tensor rows, whose collapse sets the
    scale of the left panel."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    colors = dict(zip(METHODS, ("tab:gray", "tab:blue", "tab:orange", "tab:green")))
    markers = {"tensor": "x", "channel": "o", "g128": "^", "g64": "s", "g32": "D"}
    styles = {"tensor": ":", "channel": "-", "g128": "-.", "g64": "--", "g32": "-."}
    fp = next((r for r in rows if r["method"] == "fp"), None)
    for ax, grans in zip(axes, (list(markers), [g for g in markers if g != "tensor"])):
        for m in METHODS:
            for g in grans:
                pts = sorted((float(r["bits_per_weight"]), float(r["ppl"])) for r in rows if r["method"] == m and r["granularity"] == g)
                if pts:
                    ax.plot(*zip(*pts), color=colors[m], marker=markers[g], ls=styles[g], ms=5, label=f"{m} {g}")
        if fp:
            ax.axhline(float(fp["ppl"]), color="black", lw=0.8, label="unquantized")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (codes + scales + zeros)")
        ax.set_ylabel("perplexity")
    axes[0].set_title("all granularities", fontsize=9)
    axes[1].set_title("without per-tensor", fontsize=9)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def act_text(act: ActSpec) -> str:
    """How an activation setting reads in a table row: ``8-bit per token, dynamic``."""
    out = f"{act.bits}-bit per {act.granularity}, {'dynamic' if act.dynamic else 'static'}"
    return out + (f", float columns > {act.outlier_threshold:g}" if act.outlier_threshold else "")


def activations_markdown(rows: Sequence[dict]) -> str:
    lines = ["| configuration | kind | weights | activations | columns kept in float | perplexity | change |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        share = f"{100 * float(r['outlier_share']):.3f}%" if r.get("outlier_share") else "-"
        lines.append(f"| {r['config']} | {r['kind']} | {r['weights']} | {r['act']} | {share} | {float(r['ppl']):.3f} | {float(r['delta_pct']):+.2f}% |")
    return "\n".join(lines) + "\n"


def plot_activations(rows: Sequence[dict], path: str) -> bool:
    """Horizontal bars: perplexity change of every activation configuration."""
    plt = _pyplot()
    if plt is None:
        return False
    rs = [r for r in rows if r["config"] != "fp"]
    colors = {"reference": "tab:gray", "granularity": "tab:blue", "smoothquant": "tab:orange", "outliers": "tab:green", "attribution": "tab:red"}
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rs) + 1.2))
    vals = [max(float(r["delta_pct"]), 1e-3) for r in rs]
    ax.barh(range(len(rs)), vals, color=[colors.get(r["kind"], "k") for r in rs])
    ax.set_yticks(range(len(rs)), [r["config"] for r in rs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("perplexity increase over the unquantized model (%), log scale")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def diagnosis_heatmap(diag, metric: str, path: str, title: Optional[str] = None) -> bool:
    """Blocks x layer kinds heatmap of a :class:`~gransearch.diagnostics.Diagnosis` ``metric`` (log10 colour scale)."""
    from .diagnostics import _metric

    plt = _pyplot()
    if plt is None:
        return False
    kinds = list(dict.fromkeys(d.kind for d in diag.layers))
    n_blocks = max(d.block for d in diag.layers) + 1
    grid = torch.full((len(kinds), n_blocks), float("nan"))
    for d in diag.layers:
        v = _metric(d, metric)
        grid[kinds.index(d.kind), d.block] = math.log10(v) if v > 0 else float("nan")
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * n_blocks + 2), 0.45 * len(kinds) + 1.3))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("block")
    ax.set_title(title or f"log10 {metric}", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
