"""sweep.png: per metric, the mean over seeds of each (method, setting, benchmark) with ± sd error bars and the
seeds' own values as dots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from norga.storage import atomic_write  # noqa: E402
from norga.sweep.aggregate import GROUP_KEYS, METRICS, setting_label  # noqa: E402

SWEEP_PLOT = "sweep.png"
PANELS_PER_ROW = 3


def plot_sweep(summary: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], path: Path) -> None:
    """`sweep_figure` written to `path` as PNG (atomically)."""
    figure = sweep_figure(summary, rows)
    atomic_write(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


def sweep_figure(summary: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> plt.Figure:
    """One panel per metric that any trial recorded, bars labelled by what varies (each bar as wide as its label
    needs, so long settings do not run into each other); nothing to draw gives a figure saying so."""
    metrics = [m for m in METRICS if any(g[m]["mean"] is not None for g in summary)]
    varying = [key for key in GROUP_KEYS if len({g[key] for g in summary}) > 1] or ["method"]
    labels = ["\n".join(setting_label(g[key]) if key == "setting" else str(g[key]) for key in varying) for g in summary]
    panels = max(1, len(metrics))
    columns = min(panels, PANELS_PER_ROW)
    grid_rows = math.ceil(panels / columns)
    longest = max((len(line) for label in labels for line in label.splitlines()), default=0)
    per_bar = max(0.9, 0.075 * longest)  # inches: a label line at font size 8 takes ~0.06 in a character
    figure, grid = plt.subplots(grid_rows, columns, squeeze=False,
                                figsize=(1.6 + per_bar * max(1, len(summary)) * columns, 3.8 * grid_rows))
    axes = list(grid.flat)
    for unused in axes[panels:]:
        unused.set_axis_off()
    if not metrics:
        axes[0].text(0.5, 0.5, "no finished trial yet", ha="center", va="center")
        axes[0].set_axis_off()
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, metric in zip(axes, metrics, strict=False):
        for x, group in enumerate(summary):
            stats = group[metric]
            if stats["mean"] is None:
                continue
            color = palette[x % len(palette)]
            axis.bar(x, stats["mean"], yerr=stats["sd"] or 0.0, capsize=4, color=color, alpha=0.7)
            seeds = [r[metric] for r in rows if r["status"] == "complete" and r[metric] is not None
                     and all(r[key] == group[key] for key in GROUP_KEYS)]
            axis.plot([x] * len(seeds), seeds, "k.", markersize=4)
        axis.set_xticks(range(len(summary)), labels, fontsize=8)
        axis.set_title(f"{METRICS[metric]} (%)")
        axis.grid(axis="y", alpha=0.3)
    n = sorted({g["n"] for g in summary})
    figure.suptitle(f"mean ± sd over seeds (n = {', '.join(map(str, n)) or 0}); dots: single seeds", fontsize=9)
    figure.tight_layout()
    return figure
