"""Pictures and tables of a run: accuracy-matrix heatmap, per-task accuracy curve, terminal table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from norga.metrics import AccuracyMatrix, MethodResult  # noqa: E402
from norga.storage import atomic_write  # noqa: E402

if TYPE_CHECKING:
    from norga.config import RunConfig


#: Figure size of every curve (a run's accuracy_curve.png and compare.png), so they read side by side.
CURVE_SIZE = (6.4, 4.0)
UNEVALUATED = {"facecolor": "#eeeeee", "edgecolor": "#9a9a9a", "hatch": "///"}  # cells never measured
CMAP = "viridis"


def plot_title(config: RunConfig, label: str | None = None) -> str:
    """``METHOD · BENCHMARK · BACKBONE`` of a run (`label` replaces the method's registered name)."""
    return f"{label or config.method} · {config.data.benchmark} · {config.backbone.name}"


def comparison_title(configs: Sequence[RunConfig]) -> str:
    """``BENCHMARK · BACKBONE`` shared by a comparison's runs (the methods are its legend)."""
    benchmarks = dict.fromkeys(config.data.benchmark for config in configs)
    backbones = dict.fromkeys(config.backbone.name for config in configs)
    return f"{', '.join(benchmarks)} · {', '.join(backbones)}"


def plot_run(matrix: AccuracyMatrix, directory: Path, upto: int, title: str | None = None) -> None:
    """Write accuracy_matrix.png and accuracy_curve.png of a run, both titled `title` (and the directory's name)."""
    subtitle = Path(directory).name
    _save(matrix_figure(matrix, title, subtitle), directory / "accuracy_matrix.png")
    _save(curve_figure(matrix, upto, title, subtitle), directory / "accuracy_curve.png")


def matrix_figure(matrix: AccuracyMatrix, title: str | None = None, subtitle: str | None = None):
    """The heatmap of every cell of `matrix` (never-evaluated ones hatched grey, no number), with a colour bar."""
    figure, axis = plt.subplots(figsize=(2.2 + 0.65 * matrix.num_steps, 1.9 + 0.5 * matrix.num_tasks))
    draw_matrix(axis, matrix)
    figure.colorbar(axis.images[0], ax=axis, label="accuracy (%)")
    _title(axis, title, subtitle)
    return figure


def curve_figure(matrix: AccuracyMatrix, upto: int, title: str | None = None, subtitle: str | None = None):
    """Average accuracy on the seen tasks after each task up to `upto`, on the axes `compare.png` uses."""
    figure, axis = plt.subplots(figsize=CURVE_SIZE)
    _plot_curve(axis, matrix, upto, label=None, color=_palette()[0])
    _label_curve_axes(axis, matrix.num_tasks)
    _title(axis, title, subtitle)
    return figure


def draw_matrix(axis, matrix: AccuracyMatrix) -> None:
    """The accuracy matrix as a heatmap: measured cells coloured with their value printed in a colour that reads
    on the cell, never-measured cells hatched grey and left blank (a measured 0 % is a coloured cell)."""
    measured = matrix.total > 0
    values = np.ma.masked_array(matrix.accuracies(), mask=~measured)
    cmap = plt.get_cmap(CMAP).with_extremes(bad=UNEVALUATED["facecolor"])
    norm = Normalize(vmin=0, vmax=100)
    axis.imshow(values, cmap=cmap, norm=norm)
    rows, columns = measured.shape
    for i in range(rows):
        for t in range(columns):
            if measured[i, t]:
                colour = text_colour(cmap(norm(values[i, t])))
                axis.text(t, i, f"{values[i, t]:.0f}", ha="center", va="center", color=colour, fontsize=8)
            else:
                axis.add_patch(Rectangle((t - 0.5, i - 0.5), 1, 1, fill=False, linewidth=0,
                                         hatch=UNEVALUATED["hatch"], edgecolor=UNEVALUATED["edgecolor"]))
    axis.set_xlabel("after joint training" if matrix.joint else "after training task")
    axis.set_ylabel("test set of task")
    axis.set_xticks(range(columns), ["all" if matrix.joint else str(t + 1) for t in range(columns)])
    axis.set_yticks(range(rows), [str(i + 1) for i in range(rows)])
    if not measured.all():
        axis.legend(handles=[Patch(**UNEVALUATED, label="not evaluated")], loc="upper center",
                    bbox_to_anchor=(0.5, -0.22 if rows < 4 else -0.14), frameon=False, fontsize=8)


def text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with a cell of colour `rgba` (WCAG relative luminance)."""
    def linear(channel: float) -> float:
        return channel / 12.92 if channel <= 0.04045 else ((channel + 0.055) / 1.055) ** 2.4

    red, green, blue = (linear(c) for c in rgba[:3])
    return "black" if 0.2126 * red + 0.7152 * green + 0.0722 * blue > 0.179 else "white"


def _title(axis, title: str | None, subtitle: str | None = None) -> None:
    if title:
        axis.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=9)


def _palette() -> list[str]:
    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _label_curve_axes(axis, num_tasks: int) -> None:
    """Integer task ticks 1..T and 0-100 % on every curve, so curves of different runs line up."""
    axis.set_xlabel("tasks learned")
    axis.set_ylabel("average accuracy on seen tasks (%)")
    axis.set_xlim(0.5, num_tasks + 0.5)
    axis.set_xticks(range(1, num_tasks + 1))
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


def _plot_curve(axis, matrix: AccuracyMatrix, upto: int, label: str | None, color: str | None = None) -> None:
    """Average accuracy on the tested tasks after each step; a joint run is one point at "all tasks learned"."""
    averages = [matrix.final_average_accuracy(t) for t in range(upto + 1)]
    if matrix.joint:
        axis.plot([matrix.num_tasks], averages, marker="*", markersize=12, linestyle="none", label=label, color=color)
    else:
        axis.plot(range(1, upto + 2), averages, marker="o", label=label, color=color)


def format_matrix(matrix: AccuracyMatrix, upto: int) -> str:
    """The accuracy matrix as a text table (rows: test task, columns: after task; one column if joint)."""
    values = matrix.accuracies()
    header = "task " + ("  joint" if matrix.joint else " ".join(f"{t + 1:>6}" for t in range(upto + 1)))
    rows = [header]
    for i in range(matrix.tested(upto)):
        cells = [f"{values[i, t]:6.2f}" if matrix.total[i, t] else "     ." for t in range(upto + 1)]
        rows.append(f"{i + 1:>4} " + " ".join(cells))
    return "\n".join(rows)


def format_metric(value: float | None) -> str:
    """A metric with two decimals, or an em dash where it is undefined (None)."""
    return "—" if value is None else f"{value:.2f}"


def format_comparison_table(results: Sequence[MethodResult]) -> str:
    """One line per method: FA, CA, FFM, task-identity and task-incremental accuracy (— where undefined), wall
    time, run directory."""
    width = max([len("method"), *(len(r.label) for r in results)])
    lines = [f"{'method':{width}s} {'FA':>7s} {'CA':>7s} {'FFM':>7s} {'task-id':>8s} {'task-IL':>8s} {'time s':>7s}"
             "  run directory"]
    for r in results:
        m = r.metrics
        seconds = "—" if r.wall_seconds is None else f"{r.wall_seconds:.1f}"
        lines.append(f"{r.label:{width}s} {format_metric(m['final_average_accuracy']):>7s} "
                     f"{format_metric(m['cumulative_average_accuracy']):>7s} {format_metric(m['forgetting']):>7s} "
                     f"{format_metric(r.task_identity_accuracy):>8s} {format_metric(r.task_incremental_accuracy):>8s} "
                     f"{seconds:>7s}  {r.run_dir}")
    return "\n".join(lines)


def format_prompt_effect(results: Sequence[MethodResult], baseline: MethodResult) -> str:
    """What the prompts add: each prompted row's FA and task-IL minus those of `baseline` (the same pipeline
    without prompts), and how far each NoRGa row's gates moved from their start (alpha = tau = 1)."""
    lines = [f"What the prompts add, against {baseline.label} (the same pipeline, settings and seed):"]
    width = max(len(r.label) for r in results)

    def gain(value: float | None, base: float | None) -> str:
        return "—" if value is None or base is None else f"{value - base:+.2f}"

    base_fa = baseline.metrics["final_average_accuracy"]
    for r in results:
        lines.append(f"  {r.label:{width}s}  FA {gain(r.metrics['final_average_accuracy'], base_fa)}"
                     f"  task-IL {gain(r.task_incremental_accuracy, baseline.task_incremental_accuracy)}")
    for r in results:
        if r.gates:
            alphas, taus = [g["alpha"] for g in r.gates], [g["tau"] for g in r.gates]
            blocks = ", ".join(str(g["block"]) for g in r.gates)
            lines.append(f"{r.label}'s gates (blocks {blocks}) moved from alpha = tau = 1 to alpha {min(alphas):.2f}"
                         f"..{max(alphas):.2f}, tau {min(taus):.2f}..{max(taus):.2f}")
    return "\n".join(lines)


def plot_comparison(results: Sequence[MethodResult], path: Path, title: str | None = None) -> None:
    """Average accuracy on the seen tasks after each task, one line per method (joint runs: one star each); the
    same axes and size as a run's accuracy_curve.png."""
    figure, axis = plt.subplots(figsize=CURVE_SIZE)
    palette = _palette()
    colors: dict[str, str] = {}  # a method's joint bound takes its continual line's colour
    for r in results:
        color = colors.setdefault(r.method, palette[len(colors) % len(palette)])
        _plot_curve(axis, r.matrix, r.matrix.num_steps - 1, label=r.label, color=color)
    _label_curve_axes(axis, max((r.matrix.num_tasks for r in results), default=1))
    _title(axis, title, Path(path).parent.name)
    if results:
        axis.legend(fontsize=8)
    _save(figure, path)
